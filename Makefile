# iothubby: device agent, local IoT Hub (hubsim) and fleet CLI (hubby).
# `make run` and `make test` work on a fresh machine once .ci/run's installs are done
# (Go toolchain with cgo, Node.js for the conformance harness, openssl, swtpm, libssl-dev).

GO        ?= go
BIN       := bin
STATE     ?= .hubby
FUZZTIME  ?= 5s
FUZZLONG  ?= 2m
SOAK      ?= 10m
PKGS      := ./...

.PHONY: all build test test-unit fuzz-brief fuzz-long e2e conformance soak soak-brief bench lint cross run clean package package-test

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./cmd/...

## test: everything CI runs: lint, the agent's ARM cross-build, unit tests with -race, brief
## fuzzing, end-to-end tests on the real binaries, Microsoft's SDKs against hubsim, and a
## two-minute fault soak.
test: lint cross test-unit fuzz-brief e2e conformance package-test soak-brief

test-unit:
	$(GO) test -race -count=1 $(PKGS)
	$(GO) test -race -count=1 ./pkg/hub/ -args -lean
	# stack sizes mean something only without the race detector's larger frames
	$(GO) test -count=1 -run '^TestTwinResponseKeepsRouterStack$$' ./pkg/hub/

fuzz-brief:
	FUZZTIME=$(FUZZTIME) scripts/fuzz-brief.sh

## fuzz-long: every fuzz target for $(FUZZLONG) each (outside CI; e.g. FUZZLONG=10m overnight).
fuzz-long:
	FUZZTIME=$(FUZZLONG) scripts/fuzz-brief.sh

e2e: build
	IOTHUBBY_BIN=$(CURDIR)/$(BIN) $(GO) test -race -count=1 -tags e2e ./test/e2e/...

conformance: build
	@test -d test/conformance/node_modules || (cd test/conformance && npm ci --ignore-scripts --no-audit --no-fund)
	HUBSIM_BIN=$(CURDIR)/$(BIN)/hubsim node test/conformance/run.js

## soak: hubsim, 3 agents and a 20-device fleet through a seeded schedule of faults for $(SOAK)
## (SOAK_SEED=N replays a schedule; SOAK_AGENTS, SOAK_FLEET), then the invariants and a table.
soak: build
	SOAK=$(SOAK) IOTHUBBY_BIN=$(CURDIR)/$(BIN) $(GO) test -race -count=1 -v -tags soak -timeout 2h -run '^TestSoak$$' ./test/soak/

## soak-brief: the two-minute soak of make test, network faults included.
soak-brief:
	$(MAKE) soak SOAK=2m

bench: build
	$(GO) test -run '^$$' -bench . -benchmem -count=1 ./pkg/...
	GODEBUG=adaptivestackstart=0 IOTHUBBY_BIN=$(CURDIR)/$(BIN) $(GO) run ./test/bench

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go') 2>/dev/null); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) vet -tags e2e ./test/e2e/...
	$(GO) tool staticcheck $(PKGS)
	$(GO) tool staticcheck -tags e2e ./test/e2e/...
	$(GO) vet -tags soak ./test/soak/...
	$(GO) tool staticcheck -tags soak ./test/soak/...

## cross: the agent for the edge hardware it mostly runs on (linux/arm64, linux/arm v7), without
## cgo, so without the in-process TPM simulator; and the clear error that backend gives there.
cross:
	CGO_ENABLED=0 GOOS=linux GOARCH=arm64 $(GO) build -o /dev/null ./cmd/agent
	CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=7 $(GO) build -o /dev/null ./cmd/agent
	CGO_ENABLED=0 $(GO) test -count=1 -run '^TestSimulatorNeedsCgo$$' ./pkg/tpm/

## package: .deb and .rpm of agent (as iothubby-agent), hubby and hubsim for amd64, arm64 and
## armhf in dist/, with nfpm (go tool nfpm; deploy/nfpm.yaml). VERSION=1.2.3 to stamp one.
package:
	GO=$(GO) scripts/package.sh

## package-test: builds the packages, installs the amd64 .deb here (root; CI), checks it, purges it.
package-test:
	GO=$(GO) scripts/package-test.sh

run: build
	STATE=$(STATE) scripts/run-local.sh

clean:
	rm -rf $(BIN) dist
