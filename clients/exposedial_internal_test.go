package clients

import (
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// countingEcho is a local service that echoes, counts the connections it
// accepted, and reports for each one when it ends how many bytes it received.
type countingEcho struct {
	addr  string
	mu    sync.Mutex
	got   []int64 // bytes received, per connection that ended
	taken int     // connections accepted
}

func newCountingEcho(t *testing.T) *countingEcho {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	s := &countingEcho{addr: ln.Addr().String()}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.taken++
			s.mu.Unlock()
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(60 * time.Second))
				n, _ := io.Copy(c, c)
				s.mu.Lock()
				s.got = append(s.got, n)
				s.mu.Unlock()
			}()
		}
	}()
	return s
}

// settled waits until every accepted connection ended and returns their byte counts.
func (s *countingEcho) settled(t *testing.T) []int64 {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		s.mu.Lock()
		got, taken := append([]int64(nil), s.got...), s.taken
		s.mu.Unlock()
		if len(got) == taken {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections to the local service never ended (%d of %d did); the agent left some open", taken-len(got), len(got), taken)
		}
		time.Sleep(10 * time.Millisecond) // polling, bounded by the deadline
	}
}

// The agent connects to its local service while a session's end-to-end checks
// run, but only the checks let a byte through, and a refused session's
// connection is closed. Bad input: a session whose header announces dave@pc, in
// the allowed group dev (so the agent connects early), that attaches with bob's
// state: refused; and a session for bob after the relay stopped listing him in
// dev: refused before any connection is made.
func TestAgentLocalDialWaitsForChecks(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	svc := newCountingEcho(t)
	e.a.Exposed[0].Local = svc.addr
	c, err := e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "first")
	svc.settled(t)
	svc.mu.Lock()
	before := svc.taken
	svc.mu.Unlock()

	_, err = e.session(t, header("bob@phone"))
	var re *RefusedError
	if !errors.As(err, &re) || re.Code != CodeAgentDenied {
		t.Fatalf("bob outside dev: %v; want %s", err, CodeAgentDenied)
	}
	e.served.Wait()
	c, err = e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "again") // accepted after any connection the refused session made
	svc.mu.Lock()
	after := svc.taken
	svc.mu.Unlock()
	if after != before+1 {
		t.Fatalf("the session the allow list refused made %d connections to the service; want none", after-before-1)
	}

	_, err = e.session(t, header("dave@pc", "dev"))
	if !errors.As(err, &re) || re.Code != wire.CodeUnauthenticated {
		t.Fatalf("bob's state announced as dave@pc: %v; want %s", err, wire.CodeUnauthenticated)
	}
	e.served.Wait()
	got := svc.settled(t)
	var sum int64
	for _, n := range got {
		sum += n
	}
	if sum != int64(len("first")+len("again")) {
		t.Fatalf("the service received %v bytes per connection; want only the two admitted sessions' (%d)", got, len("first")+len("again"))
	}
}

// Over TLS an agent refills its spare accept connection once a session has its
// first answer, not while the session is being set up: serve calls answered
// once per session, before an admitted session ends (with the agent's ok, while
// the session is still open) and for a refused one.
func TestAgentAnswersOncePerSession(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	var mu sync.Mutex
	calls := 0
	e.answered = func() { mu.Lock(); calls++; mu.Unlock() }
	count := func() int { mu.Lock(); defer mu.Unlock(); return calls }
	c, err := e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); count() != 1; time.Sleep(5 * time.Millisecond) { // polling, bounded
		if time.Now().After(deadline) {
			t.Fatalf("after the agent's ok: answered %d times; want 1 while the session is open", count())
		}
	}
	echoes(t, c, "first")
	c, err = e.session(t, header("bob@phone", "dev")) // attached
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "second")
	e.served.Wait()
	if n := count(); n != 2 {
		t.Fatalf("after two sessions: answered %d times; want 2", n)
	}
	if _, err := e.session(t, header("bob@phone")); err == nil {
		t.Fatal("bob outside dev was admitted")
	}
	e.served.Wait()
	if n := count(); n != 3 {
		t.Fatalf("after a refusal: answered %d times; want 3", n)
	}
}
