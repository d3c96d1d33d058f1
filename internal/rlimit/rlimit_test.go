//go:build unix

package rlimit

import (
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestRaiseNoFileLiftsTheSoftLimitToTheHardLimit(t *testing.T) {
	soft0, hard, err := get()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = set(soft0, hard) })
	if hard < 2 {
		t.Skipf("hard limit %d leaves nothing to lower", hard)
	}
	lowered := min(hard-1, 256)
	if err := set(lowered, hard); err != nil {
		t.Fatalf("lowering the soft limit for the test: %v", err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	got, err := RaiseNoFile(zap.New(core))
	if err != nil {
		t.Fatalf("RaiseNoFile: %v", err)
	}
	if got != hard {
		t.Fatalf("RaiseNoFile returned %d, want the hard limit %d", got, hard)
	}
	if now, _, _ := get(); now != hard {
		t.Fatalf("soft limit is %d after RaiseNoFile, want %d", now, hard)
	}
	e := logs.FilterMessage("open-file soft limit raised to the hard limit").All()
	if len(e) != 1 || e[0].ContextMap()["was"] != lowered {
		t.Fatalf("want one debug entry naming the old limit %d, got %v", lowered, logs.All())
	}
	// Already at the hard limit: nothing to do, same answer.
	if again, err := RaiseNoFile(zap.New(core)); err != nil || again != hard {
		t.Fatalf("second RaiseNoFile = %d, %v; want %d, nil", again, err, hard)
	}
}

func TestCapsWarnsOnlyWhenTheLimitIsShort(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	log := zap.New(core)
	if Caps(log, 20000, 10000, "device connections") {
		t.Fatal("20,000 descriptors cap 10,000 connections")
	}
	if Caps(log, 0, 10000, "device connections") {
		t.Fatal("an unknown limit (0) must cap nothing")
	}
	if logs.Len() != 0 {
		t.Fatalf("no warning expected yet, got %v", logs.All())
	}
	if !Caps(log, 1024, 10000, "device connections") {
		t.Fatal("1,024 descriptors must cap 10,000 connections")
	}
	e := logs.All()
	if len(e) != 1 || e[0].Level != zapcore.WarnLevel {
		t.Fatalf("want one warning, got %v", e)
	}
	m := e[0].ContextMap()
	if m["asked"] != int64(10000) || m["possible"] != int64(1024-Reserve) || m["open_file_limit"] != uint64(1024) {
		t.Fatalf("warning fields %v", m)
	}
}
