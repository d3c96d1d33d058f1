#!/usr/bin/env bash
# make package: static binaries (CGO_ENABLED=0) of agent, hubby and hubsim for amd64, arm64 and
# armhf (GOARM=7), and a .deb and an .rpm of each with nfpm (deploy/nfpm.yaml), in dist/.
# VERSION defaults to the latest v* tag, else 0.0.0+git<commit>.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
if [ -z "${VERSION:-}" ]; then
	if tag=$(git describe --tags --match 'v[0-9]*' 2>/dev/null); then
		VERSION=${tag#v}
	else
		VERSION=0.0.0+git$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
	fi
fi
ARCHES=${ARCHES:-amd64 arm64 arm7}
mkdir -p dist
for arch in $ARCHES; do
	goarch=$arch goarm=
	if [ "$arch" = arm7 ]; then goarch=arm goarm=7; fi
	build=dist/build/$arch
	mkdir -p "$build"
	CGO_ENABLED=0 GOOS=linux GOARCH=$goarch GOARM=$goarm $GO build -trimpath \
		-ldflags "-s -w -X github.com/iothubby/iothubby/internal/version.stamped=$VERSION" \
		-o "$build/" ./cmd/agent ./cmd/hubby ./cmd/hubsim
	# nfpm expands variables in arch and version, not in file sources: fill in BUILD here.
	sed "s#\${BUILD}#$build#g" deploy/nfpm.yaml >"$build/nfpm.yaml"
	for fmt in deb rpm; do
		ARCH=$arch VERSION=$VERSION $GO tool nfpm package --config "$build/nfpm.yaml" \
			--packager "$fmt" --target dist/ >/dev/null
	done
done
ls -1 dist/*.deb dist/*.rpm
