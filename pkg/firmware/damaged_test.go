package firmware

import (
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// A damaged firmware state file is set aside (renamed with a timestamp, logged) and the
// updater starts at InitialVersion instead of failing: the agent must not exit and restart
// forever under its unit. Without an InitialVersion there is nothing to start from: an error.
func TestDamagedStateSetAside(t *testing.T) {
	e := newEnv(t, []byte("image"))
	dir := e.dir
	p := filepath.Join(dir, stateFile)
	if err := os.WriteFile(p, []byte("{\"version\":\"2.0"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := Config{Dir: dir, Applier: e.app, Rebooter: e.reboot, Reporter: e.rep}
	if _, err := New(base); err == nil {
		t.Fatal("damaged state without InitialVersion accepted")
	}
	core, logs := observer.New(zap.WarnLevel)
	u := e.updater(t, func(c *Config) { c.Logger = zap.New(core) })
	if st := u.Status(); st.Version != "1.0.0" {
		t.Fatalf("status after a damaged state: %+v", st)
	}
	aside, _ := filepath.Glob(p + ".damaged-*")
	if len(aside) != 1 {
		t.Fatalf("set-aside files: %v", aside)
	}
	if _, err := os.Stat(p); err == nil {
		if b, _ := os.ReadFile(p); string(b) == "{\"version\":\"2.0" {
			t.Fatal("damaged file still in place")
		}
	}
	if w := logs.FilterMessageSnippet("firmware state file damaged").All(); len(w) != 1 || w[0].ContextMap()["set_aside_as"] != aside[0] {
		t.Fatalf("warning: %+v", w)
	}
}
