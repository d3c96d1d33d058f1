package main

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/iothubby/iothubby/pkg/hub"
)

// systemd's STATUS= names the identity-in-use pattern: the reason and the cause in words.
func TestStatusTextNamesIdentityInUse(t *testing.T) {
	st := hub.Status{State: hub.DisconnectedRetrying, Reason: hub.IdentityInUse, Attempt: 3, RetryIn: 2 * time.Second,
		Err: fmt.Errorf("%w: %w", hub.ErrIdentityInUse, errors.New("hub: connection lost: EOF"))}
	got := statusText(st)
	for _, want := range []string{"disconnected (Identity_In_Use)", "another client is connected with this device identity", "retrying in 2s"} {
		if !strings.Contains(got, want) {
			t.Errorf("STATUS=%q lacks %q", got, want)
		}
	}
}
