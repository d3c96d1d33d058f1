package agent

import (
	"testing"
	"time"
)

// A fleet reads the host's facts once and hands them to every device: the device reports them
// as given rather than reading /proc/stat and the build information itself.
func TestFactsUseSharedHostFacts(t *testing.T) {
	boot := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	d := &Device{cfg: Config{Shared: Shared{Host: &HostFacts{AgentVersion: "v9.9.9-test", BootTime: boot}}}}
	f := d.facts(d.cfg.Twin)
	if f["agentVersion"] != "v9.9.9-test" || f["bootTime"] != "2001-02-03T04:05:06Z" {
		t.Fatalf("facts = %v, want the shared agentVersion and bootTime", f)
	}
	d = &Device{cfg: Config{Shared: Shared{Host: &HostFacts{AgentVersion: "v1"}}}}
	if bt, ok := d.facts(d.cfg.Twin)["bootTime"]; ok {
		t.Fatalf("an unknown boot time is reported as %v; want it left out", bt)
	}
	// Without shared facts the device reads them itself.
	d = &Device{}
	if got, want := d.facts(d.cfg.Twin)["agentVersion"], AgentVersion(); got != want {
		t.Fatalf("agentVersion %v, want %v", got, want)
	}
}
