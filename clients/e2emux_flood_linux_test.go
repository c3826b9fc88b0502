package clients

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// Bad input: an allowed dialer opens streams of its end-to-end carrier and
// aborts each before the agent's answer (a rapid reset), 300 times, while the
// exposed service is too busy to take connections; each stream makes the
// agent start a connect to the service. Past cancelFlood more aborted than
// answered, the agent sends GOAWAY: the dialer can open no further stream,
// the session it had open still works, and the carrier ends with it.
func TestE2EMuxRapidResetGoesAway(t *testing.T) {
	e := newAttachEnv(t)
	e.a.Exposed[0].Local = testnet.Stalled(t) // its one free place goes to the first session
	var logs testlog.Buffer
	e.a.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	first, err := e.carrierSession(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	e.d.mux.mu.Lock()
	m := e.d.mux.carriers[muxTestAddr][0].Conn
	e.d.mux.mu.Unlock()

	for i := range 3 * cancelFlood {
		s, err := m.Open(nil)
		if err != nil {
			t.Logf("the dialer saw the GOAWAY after opening %d aborted streams", i)
			break
		}
		s.Abort(0)
	}
	waitUntil(t, "the dialer saw the agent's GOAWAY", func() bool { return !m.Usable(time.Now()) })
	if _, err := m.Open(nil); err == nil {
		t.Fatal("the dialer opened a stream after the agent's GOAWAY")
	}
	if err := m.Err(); err != nil {
		t.Fatalf("the carrier ended with %v while its first session was open; want it kept for that session", err)
	}
	if _, err := first.Write([]byte("still here")); err != nil {
		t.Fatalf("the first session after the flood: %v; want it still open", err)
	}
	if !strings.Contains(logs.String(), "rapid reset") {
		t.Errorf("the agent did not log the flood:\n%s", logs.String())
	}
	if strings.Contains(logs.String(), "session refused") {
		t.Errorf("the agent answered aborted streams with refusals:\n%s", logs.String())
	}
	// The service never answers the first session either: the dialer ends it
	// with an abort rather than waiting out the linger of a close.
	first.(*muxStream).Abort(0)
	select {
	case <-m.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the carrier outlived its last session after the agent's GOAWAY")
	}
}
