package dps

import (
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/hubapi"
)

// deadlock bounds waits that only a lock held across a disk write would make long.
const deadlock = 20 * time.Second

func groupEnrollment(id string) hubapi.Enrollment {
	return hubapi.Enrollment{EnrollmentGroupID: id, AllocationPolicy: hubapi.AllocationStatic, IoTHubs: []string{"hub1"},
		Attestation: &hubapi.AttestationMechanism{Type: hubapi.AttestationSymmetricKey, SymmetricKey: &hubapi.SymmetricKeyAttestation{PrimaryKey: testGroupKey}}}
}

// A service write stalled on the disk must not stall devices: while an enrollment's bbolt write
// cannot finish, another device registers (authentication, assignment, its own write) and a hub
// connect's placement check (HubOf) answers.
func TestEnrollmentWriteDoesNotBlockDevices(t *testing.T) {
	s, _, _ := newServer(t, nil)
	if _, err := s.PutEnrollment(groupEnrollment("g"), true, ""); err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	var first atomic.Bool
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	defer unblock()
	s.beforeWrite = func() error {
		if first.CompareAndSwap(false, true) {
			close(entered)
			<-release
		}
		return nil
	}
	put := make(chan error, 1)
	go func() {
		_, err := s.PutEnrollment(hubapi.Enrollment{RegistrationID: "stalled", Attestation: &hubapi.AttestationMechanism{Type: hubapi.AttestationSymmetricKey}}, false, "")
		put <- err
	}()
	select {
	case <-entered:
	case <-time.After(deadlock):
		t.Fatal("the enrollment write never reached the disk")
	}

	registered := make(chan string, 1)
	go func() {
		tok := deviceToken(t, s.IDScope(), "d1", deriveB64(testGroupKey, "d1"), true)
		code, op, w := registerHTTP(t, s, "d1", tok, `{"registrationId":"d1"}`)
		if code != 200 || op.RegistrationState == nil {
			registered <- "register: " + w.Body.String()
			return
		}
		registered <- op.RegistrationState.AssignedHub
	}()
	select {
	case hub := <-registered:
		if hub != "hub1" {
			t.Fatalf("registration during a stalled enrollment write: %s", hub)
		}
	case <-time.After(deadlock):
		t.Fatal("a device registration waited for an unrelated enrollment's disk write")
	}
	s.mu.Lock()
	gen := s.placed["d1"].generationID
	s.mu.Unlock()
	if hub, ok := s.HubOf("d1", gen); !ok || hub != "hub1" {
		t.Fatalf("HubOf during a stalled write: %q %v", hub, ok)
	}
	if _, err := s.GetEnrollment("stalled", false); err == nil {
		t.Fatal("an enrollment is visible before its write finished")
	}
	unblock()
	select {
	case err := <-put:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(deadlock):
		t.Fatal("the enrollment write did not finish after its release")
	}
	if _, err := s.GetEnrollment("stalled", false); err != nil {
		t.Fatalf("after the write: %v", err)
	}
}

// A failed write is an error to the caller and changes nothing in memory.
func TestWriteErrorsAreNotDropped(t *testing.T) {
	s, _, _ := newServer(t, nil)
	if _, err := s.PutEnrollment(groupEnrollment("g"), true, ""); err != nil {
		t.Fatal(err)
	}
	tok := deviceToken(t, s.IDScope(), "d1", deriveB64(testGroupKey, "d1"), true)
	if code, _, w := registerHTTP(t, s, "d1", tok, `{"registrationId":"d1"}`); code != 200 {
		t.Fatalf("register: %d %s", code, w.Body)
	}
	disk := errors.New("no space left on device")
	s.beforeWrite = func() error { return disk }

	check := func(what string, err error) {
		t.Helper()
		var aerr *apiError
		if !errors.As(err, &aerr) || aerr.status != 500 || !strings.Contains(aerr.msg, disk.Error()) {
			t.Fatalf("%s with a failing disk: %v, want a 500 naming the disk's error", what, err)
		}
	}
	_, err := s.PutEnrollment(hubapi.Enrollment{RegistrationID: "new", Attestation: &hubapi.AttestationMechanism{Type: hubapi.AttestationSymmetricKey}}, false, "")
	check("create", err)
	if _, err := s.GetEnrollment("new", false); err == nil {
		t.Fatal("a failed create is visible")
	}
	check("delete", s.DeleteEnrollment("g", true, ""))
	if _, err := s.GetEnrollment("g", true); err != nil {
		t.Fatalf("a failed delete removed the group: %v", err)
	}
	check("delete registration", s.DeleteRegistrationState("d1", ""))
	if _, err := s.RegistrationState("d1"); err != nil {
		t.Fatalf("a failed delete removed the registration: %v", err)
	}
	// A registration whose record cannot be written fails, and says why.
	tok2 := deviceToken(t, s.IDScope(), "d2", deriveB64(testGroupKey, "d2"), true)
	_, op, w := registerHTTP(t, s, "d2", tok2, `{"registrationId":"d2"}`)
	if op.RegistrationState == nil || op.Status != "failed" || !strings.Contains(op.RegistrationState.ErrorMessage, disk.Error()) {
		t.Fatalf("registration with a failing disk: %s", w.Body)
	}
	if _, err := s.RegistrationState("d2"); err == nil {
		t.Fatal("a registration that was not written is visible")
	}
}
