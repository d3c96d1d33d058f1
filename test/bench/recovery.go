package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"time"

	"github.com/iothubby/iothubby/pkg/connstr"
	"github.com/iothubby/iothubby/pkg/hub"
	"github.com/iothubby/iothubby/pkg/hubsim"
	"github.com/iothubby/iothubby/pkg/hubsim/endpoints"
	"github.com/iothubby/iothubby/pkg/service"
	"github.com/iothubby/iothubby/pkg/twinsync"
)

// recovery: the real agent (bin/agent) against a real hubsim process (bin/hubsim) that is
// SIGKILLed and restarted on the same state folder and ports n times, each time once the agent's
// connection has been up hub.StableAfter (30 s), so rounds are independent. Each sample is the time
// from hubsim's "hubsim ready" log line to the agent's next "twin synced" line (connected,
// subscribed and the twin fetched and reconciled), both timestamps from the processes' own logs
// on this machine's clock. It is reported as a ratio to the agent's configured backoff floor
// (connection.backoffMin, 1 s), p50 and p99: the floor is the least a reconnect can wait, so
// ~1 means the agent was back one floor after hubsim, and more means it sat in a longer backoff
// step while hubsim started. Targets: p50 <= 1.5, p99 <= 3 (hubsim's start can outlast the
// first 1 s retry, whose successor waits up to 2 s).

const recoveryFloor = time.Second

// logProc is a child process whose JSON log lines are read into a channel.
type logProc struct {
	cmd   *exec.Cmd
	lines chan logLine
	done  chan struct{}
}

type logLine struct {
	msg string
	ts  time.Time
}

// logTime is zap's ISO8601 time encoding.
const logTime = "2006-01-02T15:04:05.000Z0700"

func startLogProc(ctx context.Context, bin string, args ...string) (*logProc, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), "NO_COLOR=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &logProc{cmd: cmd, lines: make(chan logLine, 4096), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) != nil {
				continue
			}
			var l logLine
			l.msg, _ = m["msg"].(string)
			if s, ok := m["ts"].(string); ok {
				l.ts, _ = time.Parse(logTime, s)
			}
			select {
			case p.lines <- l:
			default: // nobody waits for this many lines: drop
			}
		}
		_ = cmd.Wait()
	}()
	return p, nil
}

// await returns the next line with message msg, failing at the deadline or when the process ends.
func (p *logProc) await(msg string, timeout time.Duration) (logLine, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		select {
		case l := <-p.lines:
			if l.msg == msg {
				return l, nil
			}
		case <-p.done:
			return logLine{}, fmt.Errorf("%s exited while waiting for %q", filepath.Base(p.cmd.Path), msg)
		case <-deadline.C:
			return logLine{}, fmt.Errorf("%s: no %q within %v", filepath.Base(p.cmd.Path), msg, timeout)
		}
	}
}

// kill sends SIGKILL and waits for the exit.
func (p *logProc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// term sends SIGTERM and waits for the exit (SIGKILL after 10 s).
func (p *logProc) term() {
	_ = p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.kill()
	}
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func benchRecovery(ctx context.Context, binDir string, n int, backToBack bool, report func(string, float64, bool, string)) error {
	dir, err := os.MkdirTemp("", "iothubby-bench-recovery-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	state := filepath.Join(dir, "hubsim")
	mqttAddr, err := freePort()
	if err != nil {
		return err
	}
	httpsAddr, err := freePort()
	if err != nil {
		return err
	}
	startHubsim := func() (*logProc, logLine, error) {
		p, err := startLogProc(ctx, filepath.Join(binDir, "hubsim"), "serve", "--state", state, "--mqtt-addr", mqttAddr,
			"--https-addr", httpsAddr, "--amqp-addr", "127.0.0.1:0", "--log-format", "json", "--log-level", "info")
		if err != nil {
			return nil, logLine{}, err
		}
		ready, err := p.await(hubsim.MsgReady, 60*time.Second)
		if err != nil {
			p.kill()
			return nil, logLine{}, err
		}
		return p, ready, nil
	}
	hs, _, err := startHubsim()
	if err != nil {
		return err
	}
	defer func() {
		if hs != nil {
			hs.term()
		}
	}()
	ep, err := endpoints.Read(state)
	if err != nil {
		return err
	}
	svc, err := service.New(service.Config{ConnectionString: ep.ServiceConnectionString, Address: ep.HTTPSAddress, CAFile: ep.CAFile})
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	d, err := svc.CreateDevice(cctx, service.Device{DeviceID: "bench-recovery", Status: "enabled"})
	cancel()
	svc.Close()
	if err != nil {
		return err
	}
	cs := connstr.ConnectionString{HostName: ep.HubHostName, DeviceID: d.DeviceID,
		SharedAccessKey: d.Authentication.SymmetricKey.PrimaryKey, GatewayHostName: ep.MQTTAddress}.String()
	csFile := filepath.Join(dir, "cs")
	if err := os.WriteFile(csFile, []byte(cs), 0o600); err != nil {
		return err
	}
	cfg := fmt.Sprintf("log:\n  format: json\n  level: info\ntls:\n  caFile: %q\nconnection:\n  backoffMin: %s\ntelemetry:\n  interval: 0s\n",
		ep.CAFile, recoveryFloor)
	cfgFile := filepath.Join(dir, "agent.yaml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		return err
	}
	ag, err := startLogProc(ctx, filepath.Join(binDir, "agent"), "run", "--config", cfgFile, "--connection-string-file", csFile)
	if err != nil {
		return err
	}
	defer ag.term()

	var samples, starts []time.Duration
	synced, err := ag.await(twinsync.MsgTwinSynced, 60*time.Second)
	if err != nil {
		return err
	}
	for i := range n {
		// A device that has been running normally: its connection has been up long enough
		// (hub.StableAfter) for the reconnect backoff to start again from the floor. (Kills
		// closer together than that find the agent further up its backoff, by design: a
		// connection that keeps dropping is not hammered.)
		stable := synced.ts.Add(hub.StableAfter + time.Second)
		if backToBack {
			stable = time.Now() // -recovery-back-to-back: kill as soon as the twin is synced
		}
		select {
		case <-time.After(time.Until(stable)):
		case <-ctx.Done():
			return ctx.Err()
		}
		killedAt := time.Now()
		hs.kill()
		if _, err := ag.await(hub.MsgDisconnectedRetrying, 30*time.Second); err != nil {
			return fmt.Errorf("round %d: %w", i, err)
		}
		var ready logLine
		if hs, ready, err = startHubsim(); err != nil {
			return fmt.Errorf("round %d: restart: %w", i, err)
		}
		if synced, err = ag.await(twinsync.MsgTwinSynced, 60*time.Second); err != nil {
			return fmt.Errorf("round %d: %w", i, err)
		}
		if ready.ts.IsZero() || synced.ts.IsZero() {
			return errors.New("log lines without a timestamp")
		}
		samples = append(samples, synced.ts.Sub(ready.ts))
		starts = append(starts, ready.ts.Sub(killedAt))
		fmt.Printf("recovery round %d: hubsim SIGKILL to ready %v, ready to agent twin synced %v\n",
			i+1, starts[i].Round(time.Millisecond), samples[i])
	}
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	p50, p99 := pct(samples, 0.50), pct(samples, 0.99)
	fmt.Printf("recovery: %d hubsim SIGKILL+restarts (hubsim start p50 %v); hubsim ready -> agent twin synced: min %v p50 %v p99 %v max %v (backoff floor %v)\n",
		n, pct(starts, 0.5).Round(time.Millisecond), samples[0], p50, p99, samples[len(samples)-1], recoveryFloor)
	r50, r99 := float64(p50)/float64(recoveryFloor), float64(p99)/float64(recoveryFloor)
	report("recovery p50 / backoff floor", r50, r50 <= 1.5, "<= 1.5")
	report("recovery p99 / backoff floor", r99, r99 <= 3, "<= 3")
	return nil
}
