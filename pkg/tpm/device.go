package tpm

import (
	"context"
	"crypto/sha256"
	"encoding/base32"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/tpm/activation"
)

// Persistent handles the Azure IoT SDKs use (protocol-device.md §4.1).
const (
	// EKHandle holds the endorsement key.
	EKHandle tpm2.TPMHandle = 0x81010001
	// SRKHandle holds the storage root key.
	SRKHandle tpm2.TPMHandle = 0x81000001
	// IdentityKeyHandle holds the HMAC identity key imported from DPS.
	IdentityKeyHandle tpm2.TPMHandle = 0x81000100
)

// defaultInputBuffer is TPM_PT_INPUT_BUFFER when the TPM does not report it.
const defaultInputBuffer = 1024

var (
	// ErrClosed is returned by every operation after Close.
	ErrClosed = errors.New("tpm: device closed")
	// ErrNoIdentityKey is returned by Sign before an identity key was imported.
	ErrNoIdentityKey = errors.New("tpm: no identity key at 0x81000100: import an activation blob first")
	// ErrActivateCredential wraps the TPM's refusal to activate the credential in an
	// activation blob: the blob was not made for this TPM's endorsement key. The credential is
	// also bound to the Name of the storage root key the blob was made for, so a blob made for
	// this EK but another SRK (or an altered one) fails here too.
	ErrActivateCredential = errors.New("tpm: ActivateCredential refused the activation blob: it was not made for this TPM's endorsement key (or it names another storage root key, or was altered)")
	// ErrImport wraps the TPM's refusal to import the identity key in an activation blob whose
	// credential activated: the key was not wrapped to this TPM's storage root key, or was
	// altered.
	ErrImport = errors.New("tpm: Import refused the activation blob's identity key: it was not made for this TPM's storage root key (or was altered)")
	// ErrSimulatorBusy is returned by Open when the in-process simulator is already open.
	ErrSimulatorBusy = errors.New("tpm: the in-process TPM simulator is already open in this process (one per process; close the other Device first)")
)

// srkTemplate is the SRK template of the Azure IoT SDKs (C, Node, C#): go-tpm's
// RSASRKTemplate (RSA 2048, SHA-256, 0x00030472, AES-128-CFB, NULL scheme, exponent 0, no
// authPolicy) but with an empty unique, where the TCG template has 256 zero bytes. The
// template decides the key, so an SRK made by an SDK and one made here are the same.
var srkTemplate = func() tpm2.TPMTPublic {
	t := tpm2.RSASRKTemplate
	t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{})
	return t
}()

// importSymmetric is the inner wrapper algorithm of the identity key: the SDKs hard-code
// AES-128-CFB.
var importSymmetric = tpm2.TPMTSymDef{
	Algorithm: tpm2.TPMAlgAES,
	KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)),
	Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
}

// Device is an open TPM holding a device's DPS identity. It is safe for concurrent use.
type Device struct {
	log         *zap.Logger
	desc        string
	t           transport.TPMCloser
	state       *stateDir // simulator only: where the identity key is saved
	ek, srk     []byte    // TPM2B_PUBLIC as read from the TPM
	ekName      tpm2.TPM2BName
	srkName     tpm2.TPM2BName
	regID       string
	inputBuffer int

	lock   chan struct{} // one TPM command sequence at a time; a channel so waits honour ctx
	closed bool          // under lock
	idName tpm2.TPM2BName
	hasKey atomic.Bool
}

// Open opens the TPM that cfg selects, reads the EK (0x81010001) and SRK (0x81000001) or
// creates and persists them, and notes whether an identity key is at 0x81000100. For the
// simulator it also restores the identity key saved in the state directory. log may be nil.
func Open(ctx context.Context, cfg Config, log *zap.Logger) (*Device, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	switch cfg.Backend {
	case BackendDevice:
		path := cfg.Path
		if path == "" {
			path = DefaultDevicePath
		}
		t, err := openDevice(path)
		if err != nil {
			return nil, err
		}
		return open(ctx, t, nil, "device "+path, log)
	case BackendSwtpm:
		network, addr, err := parseSwtpmAddress(cfg.Path)
		if err != nil {
			return nil, err
		}
		return open(ctx, newStreamTPM(network, addr, cfg.commandTimeout()), nil, "swtpm "+network+"://"+addr, log)
	default: // BackendSimulator; Validate allows nothing else
		t, st, created, err := openSimulator(cfg)
		if err != nil {
			return nil, err
		}
		log.Debug("tpm: in-process simulator started", zap.String("stateDir", cfg.StateDir), zap.Bool("newSeed", created))
		return open(ctx, t, st, "simulator "+cfg.StateDir, log)
	}
}

// OpenTransport is Open over any TPM transport, such as go-tpm's linuxudstpm or tcp (the
// Microsoft simulator protocol). The Device owns t and closes it on Close, or at once if
// OpenTransport fails.
func OpenTransport(ctx context.Context, t transport.TPMCloser, log *zap.Logger) (*Device, error) {
	if t == nil {
		return nil, errors.New("tpm: nil transport")
	}
	if log == nil {
		log = zap.NewNop()
	}
	return open(ctx, t, nil, "transport", log)
}

func open(ctx context.Context, t transport.TPMCloser, st *stateDir, desc string, log *zap.Logger) (_ *Device, err error) {
	d := &Device{log: log, desc: desc, t: t, state: st, lock: make(chan struct{}, 1)}
	defer func() {
		if err != nil {
			_ = t.Close()
		}
	}()
	tpm := d.with(ctx)
	if d.inputBuffer, err = readInputBuffer(tpm, log); err != nil {
		return nil, fmt.Errorf("tpm: %s: %w", desc, err)
	}
	log.Debug("tpm: input buffer", zap.Int("bytes", d.inputBuffer))
	if d.ek, d.ekName, err = d.persistentPrimary(tpm, EKHandle, tpm2.TPMRHEndorsement, tpm2.RSAEKTemplate, "endorsement key"); err != nil {
		return nil, err
	}
	if d.srk, d.srkName, err = d.persistentPrimary(tpm, SRKHandle, tpm2.TPMRHOwner, srkTemplate, "storage root key"); err != nil {
		return nil, err
	}
	if _, err := activation.ParsePublic(d.ek); err != nil {
		return nil, fmt.Errorf("tpm: the key at 0x%x cannot serve as the endorsement key: %w", uint32(EKHandle), err)
	}
	if _, err := activation.ParsePublic(d.srk); err != nil {
		return nil, fmt.Errorf("tpm: the key at 0x%x cannot serve as the storage root key: %w", uint32(SRKHandle), err)
	}
	sum := sha256.Sum256(d.ek)
	d.regID = strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(sum[:]))

	if name, ok, err := d.readIdentityKey(tpm); err != nil {
		return nil, err
	} else if ok {
		d.idName = name
		d.hasKey.Store(true)
	}
	if st != nil {
		if err := d.restoreIdentityKey(tpm); err != nil {
			return nil, err
		}
	}
	log.Debug("tpm: open", zap.String("backend", desc), zap.String("registrationId", d.regID), zap.Bool("identityKey", d.hasKey.Load()))
	return d, nil
}

// readInputBuffer reads TPM_PT_INPUT_BUFFER, the largest buffer TPM2_HMAC and
// TPM2_SequenceUpdate accept. It is also the first command sent: a TPM that answers
// TPM_RC_INITIALIZE (swtpm without --flags startup-clear) gets one TPM2_Startup(CLEAR).
func readInputBuffer(tpm transport.TPM, log *zap.Logger) (int, error) {
	get := tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(tpm2.TPMPTInputBuffer), PropertyCount: 1}
	rsp, err := get.Execute(tpm)
	if errors.Is(err, tpm2.TPMRCInitialize) {
		log.Debug("tpm: TPM not started; sending TPM2_Startup(CLEAR)")
		if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
			return 0, fmt.Errorf("TPM2_Startup(CLEAR): %w", err)
		}
		rsp, err = get.Execute(tpm)
	}
	if err != nil {
		return 0, fmt.Errorf("reading TPM_PT_INPUT_BUFFER: %w", err)
	}
	props, err := rsp.CapabilityData.Data.TPMProperties()
	if err != nil {
		return 0, fmt.Errorf("reading TPM_PT_INPUT_BUFFER: %w", err)
	}
	for _, p := range props.TPMProperty {
		if p.Property == tpm2.TPMPTInputBuffer && p.Value > 0 {
			return int(min(p.Value, 0xffff)), nil
		}
	}
	return defaultInputBuffer, nil
}

// persistentPrimary reads the public area at handle, or creates the primary key from tmpl
// in hierarchy, persists it at handle and reads it back (what every Azure IoT SDK does).
func (d *Device) persistentPrimary(tpm transport.TPM, handle, hierarchy tpm2.TPMHandle, tmpl tpm2.TPMTPublic, what string) ([]byte, tpm2.TPM2BName, error) {
	rsp, err := tpm2.ReadPublic{ObjectHandle: handle}.Execute(tpm)
	if err == nil {
		d.log.Debug("tpm: found the "+what, zap.Stringer("handle", hexHandle(handle)))
		return tpm2.Marshal(rsp.OutPublic), rsp.Name, nil
	}
	if !errors.Is(err, tpm2.TPMRCHandle) {
		return nil, tpm2.TPM2BName{}, fmt.Errorf("tpm: reading the %s at 0x%x: %w", what, uint32(handle), err)
	}
	d.log.Debug("tpm: creating the "+what, zap.Stringer("handle", hexHandle(handle)))
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: hierarchy, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tmpl),
	}.Execute(tpm)
	if err != nil {
		return nil, tpm2.TPM2BName{}, fmt.Errorf("tpm: creating the %s: %w", what, hint(err))
	}
	defer d.flush(tpm, cp.ObjectHandle, what)
	if _, err := (tpm2.EvictControl{
		Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		ObjectHandle:     tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
		PersistentHandle: handle,
	}).Execute(tpm); err != nil {
		return nil, tpm2.TPM2BName{}, fmt.Errorf("tpm: persisting the %s at 0x%x: %w", what, uint32(handle), hint(err))
	}
	rsp, err = tpm2.ReadPublic{ObjectHandle: handle}.Execute(tpm)
	if err != nil {
		return nil, tpm2.TPM2BName{}, fmt.Errorf("tpm: reading the new %s at 0x%x: %w", what, uint32(handle), err)
	}
	return tpm2.Marshal(rsp.OutPublic), rsp.Name, nil
}

// readIdentityKey reports whether an HMAC key is at IdentityKeyHandle, and its Name.
func (d *Device) readIdentityKey(tpm transport.TPM) (tpm2.TPM2BName, bool, error) {
	rsp, err := tpm2.ReadPublic{ObjectHandle: IdentityKeyHandle}.Execute(tpm)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return tpm2.TPM2BName{}, false, nil
	}
	if err != nil {
		return tpm2.TPM2BName{}, false, fmt.Errorf("tpm: reading the identity key at 0x%x: %w", uint32(IdentityKeyHandle), err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil || pub.Type != tpm2.TPMAlgKeyedHash || !pub.ObjectAttributes.SignEncrypt {
		d.log.Warn("tpm: the object at the identity key handle is not an HMAC key; ignoring it until the next import",
			zap.Stringer("handle", hexHandle(IdentityKeyHandle)))
		return tpm2.TPM2BName{}, false, nil
	}
	return rsp.Name, true, nil
}

// restoreIdentityKey loads the identity key saved in the simulator's state directory: the
// simulator's NV memory does not outlive the process, its SRK does (same seed).
func (d *Device) restoreIdentityKey(tpm transport.TPM) error {
	pub, priv, ok, err := d.state.loadIdentity()
	if err != nil || !ok {
		return err
	}
	name, err := d.persistIdentityKey(tpm, pub, priv)
	if err != nil {
		return fmt.Errorf("tpm: the identity key saved in %s does not load under this TPM's storage root key (was the seed file replaced?); remove the file to start without one: %w",
			d.state.path(identityKeyFile), err)
	}
	d.idName = name
	d.hasKey.Store(true)
	d.log.Debug("tpm: restored the identity key from the state directory")
	return nil
}

// EndorsementKey returns the EK's TPM2B_PUBLIC (2-byte size, then TPMT_PUBLIC) as the TPM
// reported it: what DPS calls endorsementKey, before base64.
func (d *Device) EndorsementKey() []byte { return clone(d.ek) }

// StorageRootKey returns the SRK's TPM2B_PUBLIC as the TPM reported it: DPS's storageRootKey.
func (d *Device) StorageRootKey() []byte { return clone(d.srk) }

// RegistrationID returns the default DPS registration ID of a TPM device, as the C and Node
// SDKs derive it: SHA-256 over EndorsementKey(), base32 (RFC 4648), lower case, no padding
// (52 characters).
func (d *Device) RegistrationID() string { return d.regID }

// HasIdentityKey reports whether an identity key was at 0x81000100 when the Device was
// opened, or has been imported since.
func (d *Device) HasIdentityKey() bool { return d.hasKey.Load() }

// Close releases the TPM (for the simulator, shuts it down so this process can open it
// again). It waits for a command sequence in progress. Closing twice is not an error.
func (d *Device) Close() error {
	d.lock <- struct{}{}
	defer func() { <-d.lock }()
	if d.closed {
		return nil
	}
	d.closed = true
	if err := d.t.Close(); err != nil {
		return fmt.Errorf("tpm: closing %s: %w", d.desc, err)
	}
	d.log.Debug("tpm: closed")
	return nil
}

// String describes the device without key material.
func (d *Device) String() string {
	return fmt.Sprintf("tpm.Device(%s, registration ID %s)", d.desc, d.regID)
}

// GoString is String, so %#v prints no internals either.
func (d *Device) GoString() string { return d.String() }

// acquire takes the device lock, honouring ctx.
func (d *Device) acquire(ctx context.Context) error {
	if ctx.Err() != nil {
		return fmt.Errorf("tpm: %w", context.Cause(ctx))
	}
	select {
	case d.lock <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("tpm: waiting for the TPM: %w", context.Cause(ctx))
	}
	if d.closed {
		<-d.lock
		return ErrClosed
	}
	return nil
}

func (d *Device) release() { <-d.lock }

// with returns the transport bound to ctx for one command sequence.
func (d *Device) with(ctx context.Context) transport.TPM { return ctxTPM{ctx: ctx, t: d.t} }

// flush flushes a transient object or session; a failure only costs a TPM slot until the
// next reset, so it is logged, not returned.
func (d *Device) flush(tpm transport.TPM, h tpm2.TPMHandle, what string) {
	if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(tpm); err != nil {
		d.log.Debug("tpm: flushing the "+what+" failed", zap.Stringer("handle", hexHandle(h)), zap.Error(err))
	}
}

// contextSender is a transport whose commands can honour a context (streamTPM).
type contextSender interface {
	SendContext(ctx context.Context, cmd []byte) ([]byte, error)
}

// ctxTPM binds a context to a transport: a cancelled context stops the sequence before the
// next command, and a contextSender also gets the context for the command itself.
type ctxTPM struct {
	ctx context.Context
	t   transport.TPM
}

func (c ctxTPM) Send(cmd []byte) ([]byte, error) {
	if c.ctx.Err() != nil {
		return nil, context.Cause(c.ctx)
	}
	if cs, ok := c.t.(contextSender); ok {
		return cs.SendContext(c.ctx, cmd)
	}
	return c.t.Send(cmd)
}

// hint adds what usually causes an authorization failure on a real TPM.
func hint(err error) error {
	if errors.Is(err, tpm2.TPMRCBadAuth) || errors.Is(err, tpm2.TPMRCAuthFail) {
		return fmt.Errorf("%w (the owner or endorsement hierarchy has a password; the Azure IoT SDKs and this agent expect none)", err)
	}
	if errors.Is(err, tpm2.TPMRCLockout) {
		return fmt.Errorf("%w (the TPM is in dictionary-attack lockout)", err)
	}
	return err
}

type hexHandle tpm2.TPMHandle

func (h hexHandle) String() string { return fmt.Sprintf("0x%08x", uint32(h)) }

func clone(b []byte) []byte { return append([]byte(nil), b...) }
