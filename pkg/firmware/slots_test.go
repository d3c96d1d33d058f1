package firmware

import "testing"

// Slots alternate, so the third update downloads into the slot the first one used. What the
// first left there is not a partial download of the third: it must not be resumed (a larger
// third image would be its bytes plus the rest, and fail verification) nor taken as complete
// (a same-size one would).
func TestLaterUpdateDoesNotResumeALeftoverImage(t *testing.T) {
	mk := func(n int, tag byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i*7) ^ tag
		}
		return b
	}
	e := newEnv(t, nil)
	e.app.want = nil
	u := e.updater(t, nil)
	stop := run(u)
	defer stop()
	for i, c := range []struct {
		version string
		data    []byte
	}{
		{"2.0.0", mk(100_000, 1)},
		{"3.0.0", mk(100_000, 2)},
		{"4.0.0", mk(100_000, 3)}, // same size as the leftover of 2.0.0
		{"5.0.0", mk(150_000, 4)}, // larger than the leftover of 3.0.0
	} {
		srv := newImageServer(t, c.data)
		if err := u.Start(manifestFor(c.data, c.version, srv.URL+"/fw")); err != nil {
			t.Fatal(err)
		}
		s := e.rep.await(t, func(s Status) bool {
			return s.State.final() && (s.Version == c.version || s.TargetVersion == c.version)
		})
		if s.State != Current || s.Version != c.version {
			t.Fatalf("update %d (%s): %+v", i+1, c.version, s)
		}
	}
}
