# hubsim, the local IoT Hub and DPS emulator, as a container: a static binary (no cgo) on
# distroless, running as a non-root user.
#
#   docker build -f deploy/docker/hubsim.Dockerfile -t hubsim .
#   docker run --rm -p 8883:8883 -p 8443:8443 -v hubsim:/state hubsim
#
# State (devices, CA, endpoints.json with the service connection string) is in the /state volume.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/hubsim ./cmd/hubsim && mkdir -p /out/state

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/hubsim /usr/bin/hubsim
# A named volume takes this folder's owner: the non-root user (65532).
COPY --from=build --chown=65532:65532 /out/state /state
USER nonroot:nonroot
VOLUME /state
EXPOSE 8883 8443
ENTRYPOINT ["/usr/bin/hubsim"]
CMD ["serve", "--state", "/state", "--mqtt-addr", "0.0.0.0:8883", "--https-addr", "0.0.0.0:8443", "--log-format", "json"]
