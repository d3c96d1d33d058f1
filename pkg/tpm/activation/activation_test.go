package activation

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
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

// rsaPublic wraps an RSA key in a TPM2B_PUBLIC with tmpl's attributes, as a TPM would.
func rsaPublic(tmpl tpm2.TPMTPublic, k *rsa.PublicKey) []byte {
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	return tpm2.Marshal(tpm2.New2B(tmpl))
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
	g.EK = hex.EncodeToString(rsaPublic(tpm2.RSAEKTemplate, &ekPriv.PublicKey))
	g.SRK = hex.EncodeToString(rsaPublic(tpm2.RSASRKTemplate, &srkPriv.PublicKey))
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
	blob, err := Build(&drbg{seed: mustDecodeHex(t, g.Seed)}, ek, srk, key)
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
	parsed, err := Parse(want)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(parsed.Marshal(), want) {
		t.Fatal("Parse then Marshal does not give the same bytes")
	}
	if gotKey := softwareUnwrap(t, parsed, ekPriv, srkPriv, ek, srk); !bytes.Equal(gotKey, key) {
		t.Fatalf("unwrapped key %x, want %x", gotKey, key)
	}
}

// softwareUnwrap does in software what ActivateCredential + Import do in the TPM, checking
// every integrity value on the way, and returns the identity key.
func softwareUnwrap(t *testing.T, b *Blob, ekPriv, srkPriv *rsa.PrivateKey, ek, srk []byte) []byte {
	t.Helper()
	srkPub, err := ParsePublic(srk)
	if err != nil {
		t.Fatal(err)
	}
	srkName, _ := tpm2.ObjectName(srkPub)
	// ActivateCredential: seed from the EK, integrity over encIdentity || Name(SRK).
	seed, err := rsa.DecryptOAEP(sha256.New(), nil, ekPriv, b.Secret, []byte("IDENTITY\x00"))
	if err != nil {
		t.Fatalf("credential secret: %v", err)
	}
	inner := unwrapOuter(t, "credential", seed, srkName.Buffer, b.CredentialBlob)
	if len(inner) < 2 || int(binary.BigEndian.Uint16(inner)) != len(inner)-2 || len(inner)-2 != 16 {
		t.Fatalf("credential is not a 16-byte TPM2B_DIGEST: %x", inner)
	}
	inner = inner[2:]
	// Import: outer wrapper from the SRK seed, then the inner wrapper with the credential.
	idPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](b.IDKeyPublic)
	if err != nil {
		t.Fatal(err)
	}
	idName, _ := tpm2.ObjectName(idPub)
	dupSeed, err := rsa.DecryptOAEP(sha256.New(), nil, srkPriv, b.InSymSeed, []byte("DUPLICATE\x00"))
	if err != nil {
		t.Fatalf("import seed: %v", err)
	}
	encSensitive := unwrapOuter(t, "duplicate", dupSeed, idName.Buffer, b.Duplicate)
	plain := cfb(t, inner, encSensitive)
	n := int(binary.BigEndian.Uint16(plain))
	innerIntegrity, sensitive := plain[2:2+n], plain[2+n:]
	h := sha256.New()
	h.Write(sensitive)
	h.Write(idName.Buffer)
	if !hmac.Equal(h.Sum(nil), innerIntegrity) {
		t.Fatal("inner integrity does not match")
	}
	s, err := tpm2.Unmarshal[tpm2.TPM2BSensitive](sensitive)
	if err != nil {
		t.Fatal(err)
	}
	sc, err := s.Contents()
	if err != nil {
		t.Fatal(err)
	}
	bits, err := sc.Sensitive.Bits()
	if err != nil {
		t.Fatal(err)
	}
	unique, err := idPub.Unique.KeyedHash()
	if err != nil {
		t.Fatal(err)
	}
	if want := sha256.Sum256(append(bytes.Clone(sc.SeedValue.Buffer), bits.Buffer...)); !bytes.Equal(unique.Buffer, want[:]) {
		t.Fatal("identity key unique is not SHA-256(seedValue || key)")
	}
	if !bytes.Equal(idPub.AuthPolicy.Buffer, IdentityKeyPolicy) || idPub.ObjectAttributes.FixedTPM || idPub.ObjectAttributes.FixedParent {
		t.Fatal("identity key public area has the wrong policy or attributes")
	}
	return bits.Buffer
}

// unwrapOuter checks the HMAC of an outer-wrapped TPM2B_DIGEST(hmac) || enc and decrypts enc.
func unwrapOuter(t *testing.T, what string, seed, name, wrapped []byte) []byte {
	t.Helper()
	n := int(binary.BigEndian.Uint16(wrapped))
	mac, enc := wrapped[2:2+n], wrapped[2+n:]
	m := hmac.New(sha256.New, tpm2.KDFa(crypto.SHA256, seed, "INTEGRITY", nil, nil, 256))
	m.Write(enc)
	m.Write(name)
	if !hmac.Equal(m.Sum(nil), mac) {
		t.Fatalf("%s: outer HMAC does not match", what)
	}
	return cfb(t, tpm2.KDFa(crypto.SHA256, seed, "STORAGE", name, nil, 128), enc)
}

func cfb(t *testing.T, key, enc []byte) []byte {
	t.Helper()
	c, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	out := bytes.Clone(enc)
	cipher.NewCFBDecrypter(c, make([]byte, 16)).XORKeyStream(out, out) //nolint:staticcheck
	return out
}

func TestBuildRandomised(t *testing.T) {
	g, ekPriv, srkPriv := loadGolden(t)
	ek, srk := mustDecodeHex(t, g.EK), mustDecodeHex(t, g.SRK)
	for _, n := range []int{1, 16, 32, 64} {
		key := make([]byte, n)
		rand.Read(key)
		b, err := Build(rand.Reader, ek, srk, key)
		if err != nil {
			t.Fatal(err)
		}
		p, err := Parse(b.Marshal())
		if err != nil {
			t.Fatal(err)
		}
		if got := softwareUnwrap(t, p, ekPriv, srkPriv, ek, srk); !bytes.Equal(got, key) {
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
		if _, err := Build(rand.Reader, c.ek, c.srk, c.key); err == nil {
			t.Errorf("%s: Build accepted it", name)
		}
	}
}

func TestParseRejects(t *testing.T) {
	g, _, _ := loadGolden(t)
	good := mustDecodeHex(t, g.Blob)
	if _, err := Parse(good); err != nil {
		t.Fatal(err)
	}
	b, _ := Parse(good)
	noTrailer := good[:len(good)-2-len(b.EncURIData)]
	emptyTrailer := append(bytes.Clone(noTrailer), 0, 0)
	if _, err := Parse(emptyTrailer); err != nil {
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
		"oversize":                       make([]byte, MaxBlobSize+1),
	}
	for name, in := range cases {
		_, err := Parse(in)
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: got %v, want ErrMalformed", name, err)
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
		b, err := Parse(in)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error does not wrap ErrMalformed: %v", err)
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
		pub, err := ParsePublic(in)
		if err != nil {
			return
		}
		if !bytes.Equal(tpm2.Marshal(tpm2.New2B(*pub)), in) {
			t.Fatal("accepted public key does not re-encode to its input")
		}
	})
}
