package agent

import (
	"crypto/x509"
	"net"

	"github.com/iothubby/iothubby/pkg/dps"
	"github.com/iothubby/iothubby/pkg/hub"
)

// Endpoint is a server the device talks to, for diagnostics (agent check).
type Endpoint struct {
	// Role is "hub" or "dps".
	Role string `json:"role"`
	// Address is the host:port dialled.
	Address string `json:"address"`
	// ServerName is the name the server certificate must carry.
	ServerName string `json:"serverName"`
	// Host is the hub's host name (the SAS resource); for DPS the endpoint's host.
	Host string `json:"host"`
}

// Endpoints returns the servers the device would contact: the hub (from the configuration, or
// with DPS from the cached provisioning result when there is one) and the DPS endpoint.
func (d *Device) Endpoints() []Endpoint {
	var out []Endpoint
	if d.dpsEnabled() {
		dc, err := d.dpsConfig()
		if err == nil {
			ep := dc.Endpoint
			if ep == "" {
				ep = dps.GlobalEndpoint
			}
			port := "8883"
			if dc.Transport == dps.HTTPS {
				port = "443"
			}
			host, addr := ep, net.JoinHostPort(ep, port)
			if h, _, err := net.SplitHostPort(ep); err == nil {
				host, addr = h, ep
			}
			sn := dc.ServerName
			if sn == "" {
				sn = host
			}
			out = append(out, Endpoint{Role: "dps", Address: addr, ServerName: sn, Host: host})
		}
		if res, err := dps.LoadCache(d.cfg.StateDir, d.cfg.DPS.IDScope, d.id.registrationID); err == nil {
			out = append(out, d.hubEndpoint(d.hubConfigFor(res)))
		}
		return out
	}
	return append(out, d.hubEndpoint(d.cfg.hubConfig(d.id)))
}

func (d *Device) hubEndpoint(hc hub.Config) Endpoint {
	ep := Endpoint{Role: "hub", Host: hc.Host}
	if v, err := hub.Validate(hc); err == nil {
		ep.Address, ep.ServerName = v.Address, v.ServerName
	} else {
		ep.Address, ep.ServerName = hc.Address, hc.Host
	}
	return ep
}

// RootCAs returns the roots the device trusts for its servers (nil: the system roots).
func (d *Device) RootCAs() *x509.CertPool { return d.rootCAs }
