package tpm

import (
	"bytes"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string // substring of the error; "" for valid
	}{
		{Config{Backend: BackendDevice}, ""},
		{Config{Backend: BackendDevice, Path: "/dev/tpm0"}, ""},
		{Config{Backend: BackendDevice, Path: "tpm0"}, "not absolute"},
		{Config{Backend: BackendDevice, StateDir: "/ignored"}, ""},
		{Config{Backend: BackendSwtpm, Path: "tcp://127.0.0.1:2321"}, ""},
		{Config{Backend: BackendSwtpm, Path: "unix:///run/swtpm.sock", CommandTimeout: time.Second}, ""},
		{Config{Backend: BackendSwtpm}, "needs an address"},
		{Config{Backend: BackendSwtpm, Path: "127.0.0.1:2321"}, "no scheme"},
		{Config{Backend: BackendSwtpm, Path: "tcp://127.0.0.1:2321", CommandTimeout: -1}, "negative"},
		{Config{Backend: BackendSimulator, StateDir: "/var/lib/x"}, ""},
		{Config{Backend: BackendSimulator}, "state directory"},
		{Config{Backend: BackendSimulator, StateDir: "/x", Path: "/dev/tpm0"}, "takes no path"},
		{Config{}, "no backend"},
		{Config{Backend: "tpm2"}, `unknown backend "tpm2"`},
	} {
		err := tc.cfg.Validate()
		if tc.want == "" {
			if err != nil {
				t.Errorf("%+v: %v", tc.cfg, err)
			}
			continue
		}
		if err == nil || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want ErrConfig saying %q", tc.cfg, err, tc.want)
		}
	}
}

func TestParseSwtpmAddress(t *testing.T) {
	for _, tc := range []struct{ in, network, addr, err string }{
		{in: "tcp://127.0.0.1:2321", network: "tcp", addr: "127.0.0.1:2321"},
		{in: "TCP://localhost:1", network: "tcp", addr: "localhost:1"},
		{in: "tcp://[::1]:65535", network: "tcp", addr: "[::1]:65535"},
		{in: "unix:///run/swtpm/sock", network: "unix", addr: "/run/swtpm/sock"},
		{in: "unix:///run//swtpm/../sock", network: "unix", addr: "/run/sock"},
		{in: "tcp://127.0.0.1", err: "missing port"},
		{in: "tcp://127.0.0.1:", err: "no port"},
		{in: "tcp://a b:1", err: "white space"},
		{in: "tcp://127.0.0.1:0", err: "not 1 to 65535"},
		{in: "tcp://127.0.0.1:65536", err: "not 1 to 65535"},
		{in: "tcp://127.0.0.1:http", err: "not 1 to 65535"},
		{in: "tcp://:2321", err: "no host"},
		{in: "tcp://", err: "no host and port"},
		{in: "tcp://h:1/path", err: "only host:port"},
		{in: "tcp://user@h:1", err: "only host:port"},
		{in: "unix://run/swtpm.sock", err: "absolute"},
		{in: "unix://", err: "absolute"},
		{in: "unix:///a?b", err: "'?'"},
		{in: "mssim://h:2321", err: "unknown scheme"},
		{in: "/dev/tpm0", err: "no scheme"},
	} {
		network, addr, err := parseSwtpmAddress(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: %v, want an error saying %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || network != tc.network || addr != tc.addr {
			t.Errorf("%q: %q %q %v, want %q %q", tc.in, network, addr, err, tc.network, tc.addr)
		}
	}
}

func FuzzParseSwtpmAddress(f *testing.F) {
	for _, s := range []string{"tcp://127.0.0.1:2321", "tcp://[::1]:1", "unix:///run/swtpm.sock", "tcp://h", "unix://x", "tcp://[::1%25eth0]:9", "x://"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		network, addr, err := parseSwtpmAddress(s)
		if err != nil {
			return
		}
		switch network {
		case "tcp":
			host, port, err := net.SplitHostPort(addr)
			if err != nil || host == "" {
				t.Fatalf("%q gave tcp address %q: %v", s, addr, err)
			}
			if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
				t.Fatalf("%q gave port %q", s, port)
			}
		case "unix":
			if !filepath.IsAbs(addr) || filepath.Clean(addr) != addr {
				t.Fatalf("%q gave socket path %q", s, addr)
			}
		default:
			t.Fatalf("%q gave network %q", s, network)
		}
		// What the parser returns reads back as itself.
		n2, a2, err := parseSwtpmAddress(network + "://" + addr)
		if err != nil || n2 != network || a2 != addr {
			t.Fatalf("%q → %s://%s → %q %q %v", s, network, addr, n2, a2, err)
		}
	})
}

func TestIdentityFile(t *testing.T) {
	b, err := marshalIdentityFile([]byte("public"), []byte("private"))
	if err != nil {
		t.Fatal(err)
	}
	pub, priv, err := parseIdentityFile(b)
	if err != nil || string(pub) != "public" || string(priv) != "private" {
		t.Fatalf("round trip: %q %q %v", pub, priv, err)
	}
	for _, bad := range [][]byte{nil, {0}, {0, 0}, {0, 1, 'x'}, {0, 1, 'x', 0, 0}, {0, 1, 'x', 0, 2, 'y'}, append(bytes.Clone(b), 0)} {
		if _, _, err := parseIdentityFile(bad); err == nil {
			t.Errorf("%x parsed", bad)
		}
	}
	if _, err := marshalIdentityFile(nil, []byte("x")); err == nil {
		t.Error("empty public part marshalled")
	}
	if _, err := marshalIdentityFile([]byte("x"), make([]byte, 1<<16)); err == nil {
		t.Error("oversized private part marshalled")
	}
}

func FuzzParseIdentityFile(f *testing.F) {
	b, _ := marshalIdentityFile([]byte("public"), []byte("private"))
	f.Add(b)
	f.Add([]byte{0, 1, 'x', 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		pub, priv, err := parseIdentityFile(b)
		if err != nil {
			return
		}
		again, err := marshalIdentityFile(pub, priv)
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("%x parsed but marshals back to %x (%v)", b, again, err)
		}
	})
}

func TestSeedFile(t *testing.T) {
	dir := t.TempDir()
	st, err := openStateDir(filepath.Join(dir, "a", "b"))
	if err != nil {
		t.Fatal(err)
	}
	s1, created, err := st.seed()
	if err != nil || !created {
		t.Fatalf("first seed: %v created=%v", err, created)
	}
	s2, created, err := st.seed()
	if err != nil || created || s1 != s2 {
		t.Fatalf("second seed: %d %v %v, want %d", s2, created, err, s1)
	}
	fi, err := os.Stat(st.path(seedFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("seed file: %v %v", fi.Mode(), err)
	}
	fi, err = os.Stat(st.dir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("state directory: %v %v", fi.Mode(), err)
	}
	if _, err := parseSeed([]byte(" -42\n")); err != nil {
		t.Error(err)
	}
	if _, err := parseSeed([]byte("9223372036854775808")); err == nil {
		t.Error("a seed past int64 parsed")
	}
}

func TestOpenErrors(t *testing.T) {
	ctx := testContext(t)
	if _, err := Open(ctx, Config{Backend: "nope"}, nil); !errors.Is(err, ErrConfig) {
		t.Errorf("bad config: %v", err)
	}
	missing := filepath.Join(t.TempDir(), "tpmrm0")
	if _, err := Open(ctx, Config{Backend: BackendDevice, Path: missing}, nil); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing device: %v", err)
	}
	regular := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(regular, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, Config{Backend: BackendDevice, Path: regular}, nil); err == nil || !strings.Contains(err.Error(), "not a device") {
		t.Errorf("regular file as device: %v", err)
	}
	if _, err := OpenTransport(ctx, nil, nil); err == nil {
		t.Error("OpenTransport(nil) succeeded")
	}
}

// /dev/null is a character device but not a TPM: Open reaches the TPM commands and fails.
func TestOpenDeviceNotATPM(t *testing.T) {
	if _, err := os.Stat("/dev/null"); err != nil {
		t.Skip(err)
	}
	_, err := Open(testContext(t), Config{Backend: BackendDevice, Path: "/dev/null"}, nil)
	if err == nil || !strings.Contains(err.Error(), "device /dev/null") {
		t.Errorf("Open(/dev/null): %v", err)
	}
}
