//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/iothubby/iothubby/internal/connectproxy"
	"github.com/iothubby/iothubby/pkg/agent"
	"github.com/iothubby/iothubby/pkg/connstr"
	hubsess "github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/service"
)

// The agent with transport mqtt-ws behind a firewall: HTTPS_PROXY names an HTTP CONNECT proxy
// (with credentials), and the hub's name resolves only at the proxy, so every byte the agent
// exchanges with hubsim goes through it: telemetry is recorded, a cloud-to-device message
// arrives, over MQTT on hubsim's HTTPS port.
func TestAgentMQTTOverWebSocketThroughProxy(t *testing.T) {
	const host = "hubsim-ws.test" // resolved only by the proxy
	h := startHub(t, t.TempDir(), "127.0.0.1:0", "127.0.0.1:0", "--hostname", host)
	_, port, err := net.SplitHostPort(h.ep.HTTPSAddress)
	if err != nil {
		t.Fatal(err)
	}
	target := net.JoinHostPort(host, port)
	px, err := connectproxy.Start(connectproxy.Config{
		User: "agent", Password: "s3cret",
		Resolve: func(addr string) string {
			if addr == target {
				return h.ep.HTTPSAddress
			}
			return addr
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(px.Close)
	t.Setenv("HTTPS_PROXY", px.URL("agent", "s3cret"))
	t.Setenv("https_proxy", "")
	t.Setenv("NO_PROXY", "")
	t.Setenv("no_proxy", "")

	d := createDevice(t, h, "e2e-ws")
	cs := connstr.ConnectionString{HostName: host, DeviceID: d.DeviceID, SharedAccessKey: d.Authentication.SymmetricKey.PrimaryKey,
		GatewayHostName: target}.String()
	a := startAgent(t, h, cs, "transport: mqtt-ws\n")
	a.await(0, "connected", and(msgIs(hubsess.MsgConnected), field("device", d.DeviceID), field("reason", "Connection_Ok")))
	if got := px.Targets(); len(got) == 0 || got[0] != target {
		t.Fatalf("proxy tunnels %v, want %s", got, target)
	}

	eventually(t, "telemetry recorded", func() error {
		msgs, err := h.svc.Telemetry(ctxT(t), d.DeviceID)
		if err != nil {
			return err
		}
		if len(msgs) == 0 {
			return fmt.Errorf("no messages yet")
		}
		var body map[string]any
		if err := json.Unmarshal(msgs[0].Body, &body); err != nil || body["deviceId"] != d.DeviceID {
			t.Fatalf("telemetry body %q: %v", msgs[0].Body, err)
		}
		if msgs[0].SystemProperties["iothub-connection-device-id"] != d.DeviceID {
			t.Fatalf("system properties %v", msgs[0].SystemProperties)
		}
		return nil
	})

	mark := a.numLines()
	if _, err := h.svc.SendC2D(ctxT(t), d.DeviceID, service.C2DMessage{Body: "over the proxy", MessageID: "ws-c2d-1"}); err != nil {
		t.Fatal(err)
	}
	a.await(mark, "the cloud-to-device message", and(msgIs(agent.MsgC2D), field("message_id", "ws-c2d-1")))

	if err := a.stop(); err != nil {
		t.Fatalf("agent exit after SIGTERM: %v", err)
	}
	for _, tg := range px.Targets() {
		if tg != target {
			t.Errorf("proxy tunnelled to %s", tg)
		}
	}
}

// A proxy that refuses the agent's credentials: the agent keeps retrying and logs the proxy's
// answer; hubsim sees no connection.
func TestAgentMQTTOverWebSocketProxyRefused(t *testing.T) {
	const host = "hubsim-ws.test"
	h := startHub(t, t.TempDir(), "127.0.0.1:0", "127.0.0.1:0", "--hostname", host)
	_, port, _ := net.SplitHostPort(h.ep.HTTPSAddress)
	px, err := connectproxy.Start(connectproxy.Config{User: "agent", Password: "right",
		Resolve: func(string) string { return h.ep.HTTPSAddress }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(px.Close)
	t.Setenv("HTTPS_PROXY", px.URL("agent", "wrong"))
	t.Setenv("https_proxy", "")
	t.Setenv("NO_PROXY", "")
	t.Setenv("no_proxy", "")
	d := createDevice(t, h, "e2e-ws-refused")
	cs := connstr.ConnectionString{HostName: host, DeviceID: d.DeviceID, SharedAccessKey: d.Authentication.SymmetricKey.PrimaryKey,
		GatewayHostName: net.JoinHostPort(host, port)}.String()
	a := startAgent(t, h, cs, "transport: mqtt-ws\n")
	a.await(0, "the proxy's refusal", func(l map[string]any) bool {
		e, _ := l["error"].(string)
		return strings.Contains(e, "407 Proxy Authentication Required")
	})
	if got := px.Targets(); len(got) != 0 {
		t.Fatalf("tunnels opened with wrong credentials: %v", got)
	}
	if err := a.stop(); err != nil {
		t.Fatalf("agent exit after SIGTERM: %v", err)
	}
}
