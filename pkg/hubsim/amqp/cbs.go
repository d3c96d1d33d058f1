package amqp

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"

	codec "github.com/iothubby/iothubby/pkg/amqp"
	"github.com/iothubby/iothubby/pkg/hubsim/registry"
	"github.com/iothubby/iothubby/pkg/sas"
)

// KindIoTHub is the Claim.Kind of tokens VerifyHubToken accepts.
const KindIoTHub = "iothub"

// attachCBS serves $cbs: put-token requests on the client's sender link, answers on its
// receiver link (protocol-amqp.md §2).
func (s *Server) attachCBS(l *Link) error {
	if l.ClientSends {
		l.OnMessage = s.putToken
	}
	return nil
}

func appString(m *codec.Message, key string) string {
	v, _ := m.ApplicationProperties.Get(key)
	switch v := v.(type) {
	case string:
		return v
	case codec.Symbol:
		return string(v)
	}
	return ""
}

func (s *Server) putToken(d *Delivery) {
	m := d.Message
	var msgID any
	var replyTo string
	if m.Properties != nil {
		msgID, replyTo = m.Properties.MessageID, m.Properties.ReplyTo
	}
	status, desc := 200, "OK"
	op, typ, name := appString(m, "operation"), appString(m, "type"), appString(m, "name")
	token, _ := m.Value.(string)
	if token == "" && len(m.Data) == 1 {
		token = string(m.Data[0])
	}
	switch {
	case op != "put-token":
		status, desc = 400, fmt.Sprintf("unsupported operation %q (only put-token)", op)
	case name == "" || token == "":
		status, desc = 400, "put-token needs the name (audience) property and the token as the body"
	default:
		cl, err := s.verify(name, typ, token, s.cfg.Clock.Now())
		if err != nil {
			status, desc = 401, err.Error()
			break
		}
		c := d.link.conn
		c.lock()
		c.claims[strings.ToLower(name)] = cl
		c.unlock()
	}
	d.Accept()
	if status != 200 {
		d.link.conn.log.Info("amqp put-token refused", zap.Int("status", status), zap.String("reason", desc))
	}
	reply := &codec.Message{
		Properties:            &codec.Properties{CorrelationID: msgID, To: replyTo},
		ApplicationProperties: codec.Map{{Key: "status-code", Value: int32(status)}, {Key: "status-description", Value: desc}},
	}
	rl := d.link.ReplyLink(replyTo)
	if rl == nil {
		d.link.conn.log.Info("amqp put-token: no $cbs receiver link to answer on")
		return
	}
	if err := rl.Post(reply, nil, nil); err != nil {
		d.link.conn.log.Info("amqp put-token reply not sent", zap.Error(err))
	}
}

// verify asks the verifiers about a token.
func (s *Server) verify(audience, typ, token string, now time.Time) (Claim, error) {
	s.mu.Lock()
	vs := append([]TokenVerifier(nil), s.verifiers...)
	s.mu.Unlock()
	for _, v := range vs {
		if cl, ok, err := v(audience, typ, token, now); ok {
			return cl, err
		}
	}
	return Claim{}, fmt.Errorf("no token is accepted for audience %q", audience)
}

// hubHost reports whether an audience names this hub: the host name (any port), optionally
// with a scheme and a trailing slash, and no path.
func (s *Server) hubHost(audience string) (string, bool) {
	a := audience
	if i := strings.Index(a, "://"); i >= 0 {
		a = a[i+3:]
	}
	a = strings.TrimSuffix(a, "/")
	if strings.Contains(a, "/") {
		return "", false
	}
	h := a
	if i := strings.LastIndexByte(h, ':'); i >= 0 {
		h = h[:i]
	}
	for _, n := range append([]string{s.cfg.HostName}, s.cfg.HostNames...) {
		if strings.EqualFold(h, n) {
			return n, true
		}
	}
	return "", false
}

// VerifyHubToken is the IoT Hub put-token verifier: audience the hub host name (as azure-iothub
// and the C# SDK send it), a service SAS over the hub signed with a shared access policy key
// (base64-decoded), not expired. The claim carries the policy's rights.
func (s *Server) VerifyHubToken(audience, _ string, token string, now time.Time) (Claim, bool, error) {
	host, ok := s.hubHost(audience)
	if !ok {
		return Claim{}, false, nil
	}
	tok, err := sas.Parse(token)
	if err != nil {
		return Claim{}, true, fmt.Errorf("malformed token: %v", err)
	}
	if !sas.ResourceCovers(tok.Resource, host) {
		return Claim{}, true, fmt.Errorf("token resource %q is not this hub (%s)", tok.Resource, host)
	}
	if tok.KeyName == "" {
		return Claim{}, true, errors.New("token names no shared access policy (skn)")
	}
	p, ok := s.cfg.Policies.Policy(tok.KeyName)
	if !ok {
		return Claim{}, true, fmt.Errorf("unknown shared access policy %q", tok.KeyName)
	}
	if err := p.Verify(tok, now); err != nil {
		if errors.Is(err, sas.ErrExpired) {
			return Claim{}, true, errors.New("token expired")
		}
		return Claim{}, true, fmt.Errorf("token signature does not match policy %q", tok.KeyName)
	}
	return Claim{Kind: KindIoTHub, Audience: audience, Resource: tok.Resource, KeyName: tok.KeyName,
		Rights: p.Rights, Expiry: tok.Expiry}, true, nil
}

// serviceConnect is the claim IoT Hub's service nodes demand.
func serviceConnect(c Claim) bool {
	return c.Kind == KindIoTHub && c.Rights.Has(registry.ServiceConnect)
}
