# The iothubby agent (agent run / agent fleet) as a static binary on distroless: no shell,
# non-root (uid 65532), CA certificates included.
#   docker build -t iothubby/agent .
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/agent ./cmd/agent

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/agent /usr/local/bin/agent
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/agent"]
CMD ["fleet", "--config", "/etc/iothubby/fleet.yaml"]
