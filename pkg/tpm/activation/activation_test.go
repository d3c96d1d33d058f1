package activation_test

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/iothubby/iothubby/pkg/tpm/activation"
	"github.com/iothubby/iothubby/pkg/tpm/activation/activationtest"
)

var update = flag.Bool("update", false, "rewrite testdata/golden.json (keys are kept if present)")

// drbg is a deterministic byte stream for golden vectors: SHA-256(seed || counter) blocks.
type drbg struct {
	seed []byte
	ctr  uint64
	buf  []byte
}

func (d *drbg) Read(p []byte) (int, error) {
	for len(d.buf) < len(p) {
		var c [8]byte
		binary.BigEndian.PutUint64(c[:], d.ctr)
		d.ctr++
		h := sha256.Sum256(append(bytes.Clone(d.seed), c[:]...))
		d.buf = append(d.buf, h[:]...)
	}
	n := copy(p, d.buf)
	d.buf = d.buf[n:]
	return n, nil
}

// golden is testdata/golden.json: software EK and SRK (with their private keys, so the test can
// undo every layer without a TPM), the identity key, the random stream's seed and the blob.
type golden struct {
	EKPrivate  string `json:"ekPrivatePKCS8"`
	SRKPrivate string `json:"srkPrivatePKCS8"`
	EK         string `json:"endorsementKey"` // hex TPM2B_PUBLIC
	SRK        string `json:"storageRootKey"` // hex TPM2B_PUBLIC
	Key        string `json:"identityKey"`
	Seed       string `json:"randomSeed"`
	Blob       string `json:"blob"`
}

// softwareUnwrap undoes every layer of b with the private keys and returns the identity key.
func softwareUnwrap(t *testing.T, b *activation.Blob, ekPriv, srkPriv *rsa.PrivateKey) []byte {
	t.Helper()
	key, err := activationtest.FromKeys(ekPriv, srkPriv).Unwrap(b)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func loadGolden(t *testing.T) (g golden, ekPriv, srkPriv *rsa.PrivateKey) {
	t.Helper()
	path := filepath.Join("testdata", "golden.json")
	if b, err := os.ReadFile(path); err == nil {
		if err := json.Unmarshal(b, &g); err != nil {
			t.Fatal(err)
		}
	} else if !*update {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	parse := func(s string) *rsa.PrivateKey {
		blk, _ := pem.Decode([]byte(s))
		if blk == nil {
			t.Fatal("bad PEM in golden.json")
		}
		k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return k.(*rsa.PrivateKey)
	}
	gen := func() (*rsa.PrivateKey, string) {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		der, _ := x509.MarshalPKCS8PrivateKey(k)
		return k, string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	}
	if g.EKPrivate == "" {
		ekPriv, g.EKPrivate = gen()
		srkPriv, g.SRKPrivate = gen()
	} else {
		ekPriv, srkPriv = parse(g.EKPrivate), parse(g.SRKPrivate)
	}
	g.EK = hex.EncodeToString(activationtest.RSAPublic(tpm2.RSAEKTemplate, &ekPriv.PublicKey))
	g.SRK = hex.EncodeToString(activationtest.RSAPublic(tpm2.RSASRKTemplate, &srkPriv.PublicKey))
	if g.Key == "" {
		g.Key = hex.EncodeToString(bytes.Repeat([]byte{0x5a}, 32))
		g.Seed = hex.EncodeToString([]byte("iothubby activation golden vector"))
	}
	return g, ekPriv, srkPriv
}

func mustDecodeHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGolden builds the blob from a fixed random stream and compares it byte for byte with the
// stored vector, then parses the stored vector and undoes every layer in software.
func TestGolden(t *testing.T) {
	g, ekPriv, srkPriv := loadGolden(t)
	ek, srk, key := mustDecodeHex(t, g.EK), mustDecodeHex(t, g.SRK), mustDecodeHex(t, g.Key)
	blob, err := activation.Build(&drbg{seed: mustDecodeHex(t, g.Seed)}, ek, srk, key)
	if err != nil {
		t.Fatal(err)
	}
	got := blob.Marshal()
	if *update {
		g.Blob = hex.EncodeToString(got)
		b, _ := json.MarshalIndent(g, "", "  ")
		if err := os.WriteFile(filepath.Join("testdata", "golden.json"), append(b, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want := mustDecodeHex(t, g.Blob)
	if !bytes.Equal(got, want) {
		t.Fatalf("Build drifted from the golden vector:\n got %x\nwant %x", got, want)
	}
	// 806 bytes for RSA-2048 keys, a 32-byte key and 8 bytes of trailing data (protocol-device.md §4.3).
	if len(want) != 54+258+144+258+82+10 {
		t.Fatalf("blob is %d bytes, want 806", len(want))
	}
	parsed, err := activation.Parse(want)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(parsed.Marshal(), want) {
		t.Fatal("Parse then Marshal does not give the same bytes")
	}
	if gotKey := softwareUnwrap(t, parsed, ekPriv, srkPriv); !bytes.Equal(gotKey, key) {
		t.Fatalf("unwrapped key %x, want %x", gotKey, key)
	}
}

func TestBuildRandomised(t *testing.T) {
	g, ekPriv, srkPriv := loadGolden(t)
	ek, srk := mustDecodeHex(t, g.EK), mustDecodeHex(t, g.SRK)
	for _, n := range []int{1, 16, 32, 64} {
		key := make([]byte, n)
		rand.Read(key)
		b, err := activation.Build(rand.Reader, ek, srk, key)
		if err != nil {
			t.Fatal(err)
		}
		p, err := activation.Parse(b.Marshal())
		if err != nil {
			t.Fatal(err)
		}
		if got := softwareUnwrap(t, p, ekPriv, srkPriv); !bytes.Equal(got, key) {
			t.Fatalf("%d-byte key: unwrapped %x", n, got)
		}
	}
}

func TestBuildRefuses(t *testing.T) {
	g, _, _ := loadGolden(t)
	ek, srk := mustDecodeHex(t, g.EK), mustDecodeHex(t, g.SRK)
	key := make([]byte, 32)
	hmacPub := tpm2.Marshal(tpm2.New2B(tpm2.TPMTPublic{
		Type: tpm2.TPMAlgKeyedHash, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{SignEncrypt: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 32)}),
	}))
	cases := map[string]struct{ ek, srk, key []byte }{
		"empty key":        {ek, srk, nil},
		"65-byte key":      {ek, srk, make([]byte, 65)},
		"empty EK":         {nil, srk, key},
		"EK size mismatch": {ek[:len(ek)-1], srk, key},
		"EK trailing byte": {append(bytes.Clone(ek), 0), srk, key},
		"EK is HMAC key":   {hmacPub, srk, key},
		"SRK garbage":      {ek, []byte{0, 3, 1, 2, 3}, key},
	}
	for name, c := range cases {
		if _, err := activation.Build(rand.Reader, c.ek, c.srk, c.key); err == nil {
			t.Errorf("%s: Build accepted it", name)
		}
	}
}

func TestParseRejects(t *testing.T) {
	g, _, _ := loadGolden(t)
	good := mustDecodeHex(t, g.Blob)
	if _, err := activation.Parse(good); err != nil {
		t.Fatal(err)
	}
	b, _ := activation.Parse(good)
	noTrailer := good[:len(good)-2-len(b.EncURIData)]
	emptyTrailer := append(bytes.Clone(noTrailer), 0, 0)
	if _, err := activation.Parse(emptyTrailer); err != nil {
		t.Fatalf("an empty trailing field is valid: %v", err)
	}
	badPub := *b
	badPub.IDKeyPublic = append(bytes.Clone(b.IDKeyPublic), 0)
	rsaPub := *b
	rsaPub.IDKeyPublic = mustDecodeHex(t, g.EK)[2:]
	emptyCred := *b
	emptyCred.CredentialBlob = nil
	badHMAC := *b
	badHMAC.Duplicate = []byte{0xff, 0xff, 1}
	cases := map[string][]byte{
		"empty":                          nil,
		"one byte":                       {0},
		"truncated in field 1":           good[:40],
		"truncated size of field 3":      good[:54+258+1],
		"truncated in field 5":           good[:len(good)-20],
		"missing trailing field":         noTrailer,
		"byte after the trailing field":  append(bytes.Clone(good), 0),
		"identity public has extra byte": badPub.Marshal(),
		"identity key is RSA":            rsaPub.Marshal(),
		"empty credential":               emptyCred.Marshal(),
		"bad duplicate HMAC size":        badHMAC.Marshal(),
		"oversize":                       make([]byte, activation.MaxBlobSize+1),
	}
	for name, in := range cases {
		_, err := activation.Parse(in)
		if !errors.Is(err, activation.ErrMalformed) {
			t.Errorf("%s: got %v, want activation.ErrMalformed", name, err)
			continue
		}
		t.Logf("%s: %v", name, err)
	}
}

func FuzzParse(f *testing.F) {
	if b, err := os.ReadFile(filepath.Join("testdata", "golden.json")); err == nil {
		var g golden
		if json.Unmarshal(b, &g) == nil {
			if blob, err := hex.DecodeString(g.Blob); err == nil {
				f.Add(blob)
				f.Add(blob[:len(blob)-5])
			}
		}
	}
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		b, err := activation.Parse(in)
		if err != nil {
			if !errors.Is(err, activation.ErrMalformed) {
				t.Fatalf("error does not wrap activation.ErrMalformed: %v", err)
			}
			return
		}
		if !bytes.Equal(b.Marshal(), in) {
			t.Fatal("a parsed blob does not marshal back to its input")
		}
	})
}

func FuzzParsePublic(f *testing.F) {
	if b, err := os.ReadFile(filepath.Join("testdata", "golden.json")); err == nil {
		var g golden
		if json.Unmarshal(b, &g) == nil {
			for _, s := range []string{g.EK, g.SRK} {
				if k, err := hex.DecodeString(s); err == nil {
					f.Add(k)
				}
			}
		}
	}
	f.Add([]byte{0, 2, 0, 1})
	f.Fuzz(func(t *testing.T, in []byte) {
		pub, err := activation.ParsePublic(in)
		if err != nil {
			return
		}
		if !bytes.Equal(tpm2.Marshal(tpm2.New2B(*pub)), in) {
			t.Fatal("accepted public key does not re-encode to its input")
		}
	})
}
