package broker

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/hubsim/pki"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
	"github.com/iothubby/iothubby/pkg/wire"
)

// session is one authenticated device connection.
type session struct {
	b   *Broker
	cl  *mqtt.Client
	dc  *devConn
	ds  *deviceState
	log *zap.Logger

	deviceID, moduleID, generationID string
	authType                         string // "sas" or "x509"
	authMethod                       string // iothub-connection-auth-method stamp
	modelID                          string
	remote                           string
	connectedAt                      time.Time

	tmu     sync.Mutex
	timer   *time.Timer
	cause   atomic.Pointer[string]
	endOnce sync.Once

	pid uint16 // last hub-to-device packet ID; guarded by ds.mu

	out outbound // hub-to-device packets waiting to be written

	// established is set once the CONNACK has gone out. The session becomes the device's
	// current one (and, on a takeover, inherits the old subscriptions) before that, so nothing
	// the hub sends on its own may be written to it until then: a client reads the CONNACK first.
	established atomic.Bool

	// pending is the topic OnPacketRead parsed for the publish mochi is about to hand to
	// OnPublish (both run on the connection's goroutine).
	pending    wire.Topic
	hasPending bool
	// faultProps are the properties of a telemetry publish to check for AzIoTHub_Fault*
	// once its PUBACK is written (same goroutine).
	faultProps wire.Properties
}

var errClosedByHub = errors.New("connection closed by the hub")

// close records why the hub drops the connection and closes it. It does not block.
func (s *session) close(reason string) {
	s.cause.CompareAndSwap(nil, &reason)
	s.stopTimer()
	s.cl.Stop(errClosedByHub)
}

func (s *session) stopTimer() {
	s.tmu.Lock()
	if s.timer != nil {
		s.timer.Stop()
	}
	s.tmu.Unlock()
}

func (s *session) subscribedC2D() bool { return s.subscribed(wire.C2DFilter(s.deviceID)) }

// subscribed reports whether the session may be sent messages for filter: it is established
// and holds the subscription.
func (s *session) subscribed(filter string) bool {
	if !s.established.Load() {
		return false
	}
	_, ok := s.cl.State.Subscriptions.Get(filter)
	return ok
}

func (s *session) caller() Caller {
	return Caller{DeviceID: s.deviceID, ModuleID: s.moduleID, GenerationID: s.generationID}
}

// authFailure is a refused CONNECT's reason; it never contains a key, token or signature.
type authFailure string

// authenticate checks a CONNECT's user name, password or client certificate against the
// registry and returns the new session.
func (b *Broker) authenticate(cl *mqtt.Client, dc *devConn, pk packets.Packet) (*session, authFailure) {
	u, err := ParseUsername(string(pk.Connect.Username), pk.Connect.ClientIdentifier)
	if err != nil {
		return nil, authFailure(err.Error())
	}
	if !b.hostOK(u.Host) {
		return nil, authFailure(fmt.Sprintf("user name names host %q, this hub is %q", u.Host, b.cfg.HostName))
	}
	if u.ModuleID != "" {
		return nil, "module identities are not supported by hubsim yet"
	}
	id, ok := b.reg.Identity(u.DeviceID)
	if !ok {
		return nil, "device is not registered"
	}
	if id.Status != registry.StatusEnabled {
		return nil, "device is disabled"
	}
	if b.cfg.HubOf != nil {
		if hub, ok := b.cfg.HubOf(u.DeviceID, id.GenerationID); ok && !hostMatches(u.Host, hub) {
			return nil, authFailure(fmt.Sprintf("device is registered in hub %s, not %s", hub, stripPort(u.Host)))
		}
	}
	if pk.Connect.WillFlag {
		t, err := wire.Parse(pk.Connect.WillTopic)
		if err != nil || t.Kind != wire.KindTelemetry || t.DeviceID != u.DeviceID || t.ModuleID != "" {
			return nil, "will topic must be the device's telemetry topic"
		}
	}
	s := &session{
		b: b, cl: cl, dc: dc,
		deviceID: u.DeviceID, generationID: id.GenerationID, modelID: u.ModelID,
		remote: dc.raw.RemoteAddr().String(), connectedAt: time.Now(),
	}
	var expiry time.Time
	if len(pk.Connect.Password) > 0 {
		tok, err := sas.Parse(string(pk.Connect.Password))
		if err != nil {
			return nil, authFailure("password is not a SAS token: " + err.Error())
		}
		if !tok.Authorizes(sas.DeviceResource(stripPort(u.Host), u.DeviceID)) {
			return nil, authFailure(fmt.Sprintf("token resource %q does not cover device %s", tok.Resource, u.DeviceID))
		}
		now := time.Now()
		scope := "device"
		if tok.KeyName != "" {
			p, ok := b.reg.Policy(tok.KeyName)
			if !ok {
				return nil, authFailure(fmt.Sprintf("token names unknown policy %q", tok.KeyName))
			}
			if !p.Rights.Has(registry.DeviceConnect) {
				return nil, authFailure(fmt.Sprintf("policy %q lacks DeviceConnect", tok.KeyName))
			}
			if err := p.Verify(tok, now); err != nil {
				return nil, authFailure(fmt.Sprintf("policy %q token: %v", tok.KeyName, err))
			}
			scope = "hub"
		} else {
			if id.AuthType != registry.AuthSAS {
				return nil, authFailure(fmt.Sprintf("device uses %s authentication, not a SAS token", id.AuthType))
			}
			err := tok.Verify(id.PrimaryKey, now)
			if errors.Is(err, sas.ErrSignature) {
				err = tok.Verify(id.SecondaryKey, now)
			}
			if err != nil {
				return nil, authFailure(fmt.Sprintf("device token: %v", err))
			}
		}
		expiry = tok.Expiry
		s.authType = "sas"
		s.authMethod = authMethod(scope, "sas")
	} else {
		cs := dc.ConnectionState()
		if len(cs.PeerCertificates) == 0 {
			return nil, "no password and no client certificate"
		}
		if reason := b.verifyCert(id, cs.PeerCertificates); reason != "" {
			return nil, reason
		}
		s.authType = "x509"
		s.authMethod = authMethod("device", "x509")
	}
	s.log = b.log.With(zap.String("device", s.deviceID), zap.String("remote", s.remote))
	if !expiry.IsZero() {
		d := time.Until(expiry.Add(b.cfg.TokenGrace))
		s.tmu.Lock()
		s.timer = time.AfterFunc(d, func() {
			b.grp.Go(func() {
				s.log.Info("closing device connection", zap.String("reason", ReasonTokenExpired))
				s.close(ReasonTokenExpired)
			})
		})
		s.tmu.Unlock()
	}
	return s, ""
}

func authMethod(scope, typ string) string {
	b, _ := json.Marshal(struct {
		Scope  string `json:"scope"`
		Type   string `json:"type"`
		Issuer string `json:"issuer"`
	}{scope, typ, "iothub"})
	return string(b)
}

// verifyCert applies the device's X.509 rule to the presented chain (leaf first). The TLS layer
// has already checked that the client holds the leaf's private key.
func (b *Broker) verifyCert(id *registry.Identity, chain []*x509.Certificate) authFailure {
	leaf := chain[0]
	now := time.Now()
	switch id.AuthType {
	case registry.AuthSelfSigned:
		if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
			return "client certificate is outside its validity period"
		}
		sha1, sha256 := pki.ThumbprintSHA1(leaf), pki.ThumbprintSHA256(leaf)
		if !slices.ContainsFunc(id.Thumbprints, func(t string) bool { return t == sha1 || t == sha256 }) {
			return "client certificate thumbprint matches neither registered thumbprint"
		}
		return ""
	case registry.AuthCertificateAuthority:
		inter := x509.NewCertPool()
		for _, c := range chain[1:] {
			inter.AddCert(c)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{
			Roots: b.reg.CAPool(), Intermediates: inter, CurrentTime: now,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		}); err != nil {
			return authFailure("client certificate does not chain to a registered CA: " + err.Error())
		}
		if leaf.Subject.CommonName != id.DeviceID {
			return authFailure(fmt.Sprintf("client certificate CN %q is not the device ID", leaf.Subject.CommonName))
		}
		return ""
	}
	return authFailure(fmt.Sprintf("device uses %s authentication, not X.509", id.AuthType))
}

// end runs once per authenticated connection when it is over (from OnDisconnect, or after
// mochi gives up on it before that hook).
func (s *session) end(err error) {
	s.endOnce.Do(func() {
		s.stopTimer()
		s.endOutbound()
		ds := s.ds
		if ds == nil {
			return
		}
		ds.mu.Lock()
		wasCurrent := ds.current == s
		if wasCurrent {
			ds.current = nil
		}
		returned := 0
		var exceeded []*c2dEntry
		ds.queue = slices.DeleteFunc(ds.queue, func(e *c2dEntry) bool {
			if e.sess != s {
				return false
			}
			e.sess, e.pid = nil, 0
			if e.deliveries >= MaxC2DDeliveries {
				exceeded = append(exceeded, e) // dead-lettered, as IoT Hub does
				return true
			}
			returned++
			return false
		})
		next, pending := ds.current, len(ds.queue)
		ds.mu.Unlock()
		if len(exceeded) > 0 {
			s.b.reg.SetCloudToDeviceMessageCount(s.deviceID, s.generationID, pending)
			notifyOutcome(exceeded, FeedbackDeliveryCountExceeded)
		}
		if wasCurrent {
			s.b.reg.SetConnectionState(s.deviceID, s.generationID, false, time.Now())
		}
		if returned > 0 && next != nil {
			s.b.kick(ds)
		}
		reason := "connection closed"
		if c := s.cause.Load(); c != nil {
			reason = *c
		} else if err != nil && !errors.Is(err, errClosedByHub) {
			reason = err.Error()
		}
		s.log.Debug("device disconnected", zap.String("reason", reason), zap.Bool("current", wasCurrent))
		s.b.emit(Event{Kind: EventDisconnected, DeviceID: s.deviceID, Remote: s.remote, Reason: reason, Current: wasCurrent})
	})
}

// maskTopic clips a topic for a log line.
func maskTopic(t string) string {
	if len(t) > 120 {
		return t[:120] + "…"
	}
	return strings.ToValidUTF8(t, "?")
}
