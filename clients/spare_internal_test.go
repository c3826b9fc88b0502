package clients

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// spareEnv runs a proxy.Server and an echo service on loopback; the Dialer uses TLS.
func spareEnv(t *testing.T) (*Dialer, string) {
	t.Helper()
	addr, tlsConfig := StartTestServer(t, nil)
	echo := testnet.Echo(t)
	d := &Dialer{Server: addr, Transport: TransportTLS, Timeout: 10 * time.Second, TLSConfig: tlsConfig, NoTLSMux: true} // spares are for a connection per tunnel
	// A burst and a spare's life are measured on the clock: on a loaded
	// machine a dial (or a spare's handshake) can take longer than the
	// default 3 s, which these tests are not about.
	d.spare.maxAge, d.spare.window = time.Minute, time.Minute
	t.Cleanup(func() { _ = d.Close() })
	return d, echo
}

func echoOnce(t *testing.T, d *Dialer, addr string) net.Conn {
	t.Helper()
	c, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	if _, err := c.Write([]byte{'x'}); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'x' {
		t.Fatalf("echo: %q, %v", b[:], err)
	}
	return c
}

// waitSpare polls until the Dialer holds a spare connection and returns it.
func waitSpare(t *testing.T, d *Dialer) *tls.Conn {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		d.spare.mu.Lock()
		var c *tls.Conn
		if len(d.spare.conns) > 0 {
			c = d.spare.conns[0].conn
		}
		d.spare.mu.Unlock()
		if c != nil {
			return c
		}
	}
	t.Fatal("no spare connection was made during a burst of dials")
	return nil
}

// In a burst of dials over TLS the next session starts on the spare connection.
func TestSpareTLSUsedInBurst(t *testing.T) {
	t.Parallel()
	d, echo := spareEnv(t)
	echoOnce(t, d, echo)
	d.spare.mu.Lock()
	none := len(d.spare.conns) == 0 && !d.spare.filling
	d.spare.mu.Unlock()
	if !none {
		t.Fatal("a single dial made a spare connection")
	}
	echoOnce(t, d, echo) // the second dial within spareWindow starts a burst
	sp := waitSpare(t, d)
	if c := echoOnce(t, d, echo); c.(*tunnel).Stream != wire.Stream(sp) {
		t.Fatal("the dial did not use the spare connection")
	}
	waitSpare(t, d)
	_ = d.Close()
	d.spare.mu.Lock()
	gone := len(d.spare.conns) == 0
	d.spare.mu.Unlock()
	if !gone {
		t.Fatal("Close kept the spare connection")
	}
}

// A spare the server has closed costs a retry on a new connection, not the dial.
func TestSpareTLSDeadIsRetried(t *testing.T) {
	t.Parallel()
	d, echo := spareEnv(t)
	echoOnce(t, d, echo)
	echoOnce(t, d, echo)
	sp := waitSpare(t, d)
	_ = sp.NetConn().Close()
	if c := echoOnce(t, d, echo); c == net.Conn(sp) {
		t.Fatal("the dial returned the dead spare")
	}
}

// spareConns returns the Dialer's spare connections, oldest first.
func spareConns(d *Dialer) []*tls.Conn {
	d.spare.mu.Lock()
	defer d.spare.mu.Unlock()
	var cs []*tls.Conn
	for _, c := range d.spare.conns {
		cs = append(cs, c.conn)
	}
	return cs
}

// With Spares 2 (an agent's default) a burst leaves two handshaken connections
// ready; a session takes the oldest, and the Dialer makes one more afterwards.
// Bad input: a spare older than spareMaxAge (the server may have closed it for
// its missing hello) is discarded, never used.
func TestSparesKeepsTwo(t *testing.T) {
	t.Parallel()
	d, echo := spareEnv(t)
	d.Spares = 2
	echoOnce(t, d, echo)
	echoOnce(t, d, echo) // a burst
	waitSpares := func(n int) []*tls.Conn {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) { // polling, bounded
			if cs := spareConns(d); len(cs) == n {
				return cs
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d spare connections; want %d", len(spareConns(d)), n)
			}
		}
	}
	cs := waitSpares(2)
	if c := echoOnce(t, d, echo); c.(*tunnel).Stream != wire.Stream(cs[0]) {
		t.Fatal("the dial did not take the oldest spare")
	}
	if got := waitSpares(2); got[0] != cs[1] {
		t.Fatal("the second spare was not kept for the next dial")
	}

	d.spare.mu.Lock()
	old := d.spare.conns[0].conn
	d.spare.conns[0].made = time.Now().Add(-2 * d.spare.maxAgeOr())
	d.spare.mu.Unlock()
	if c := echoOnce(t, d, echo); c.(*tunnel).Stream == wire.Stream(old) {
		t.Fatal("the dial used a spare older than spareMaxAge")
	}
	_ = old.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := old.Read(make([]byte, 1)); err == nil {
		t.Fatal("the stale spare was not closed")
	}
}

// Which failures on a spare connection are retried on a new one. Bad input: a
// spare that failed without an answer after its attach carried the dial's first
// bytes (they may have reached the service): not retried, so the service never
// gets a request twice.
func TestSpareRetryDecision(t *testing.T) {
	t.Parallel()
	lost := &exchangeError{io.ErrUnexpectedEOF}
	for _, tc := range []struct {
		what  string
		err   error
		early *earlyDial
		want  bool
	}{
		{"connection lost before any answer", lost, nil, true},
		{"lost, first bytes still waiting for the ok", lost, &earlyDial{first: []byte("x")}, true},
		{"lost after first bytes went sealed in an attach", lost, &earlyDial{first: []byte("x"), sealed: true}, false},
		{"hello_timeout: the server read nothing", &RefusedError{Code: wire.CodeHelloTimeout}, &earlyDial{sealed: true}, true},
		{"a refusal about the request", &RefusedError{Code: wire.CodePolicyDenied}, nil, false},
		{"the agent's failure after the ok", io.ErrUnexpectedEOF, nil, false},
	} {
		if got := retryOnNew(tc.err, tc.early); got != tc.want {
			t.Errorf("%s: retry %v; want %v", tc.what, got, tc.want)
		}
	}
}

// A dial over QUIC goes again on a new connection after the old one was lost
// only when its first bytes cannot have reached the service. Bad input: a lost
// connection after first bytes went sealed in an attach; a stateless reset
// (the server held nothing of it) is still retried.
func TestResendAfterLostConnection(t *testing.T) {
	t.Parallel()
	sealed := &earlyDial{first: []byte("x"), sealed: true}
	for _, tc := range []struct {
		what  string
		err   error
		early *earlyDial
		want  bool
	}{
		{"no first bytes", io.ErrUnexpectedEOF, nil, true},
		{"first bytes not sealed", io.ErrUnexpectedEOF, &earlyDial{first: []byte("x")}, true},
		{"first bytes sealed, connection lost", io.ErrUnexpectedEOF, sealed, false},
		{"first bytes sealed, stateless reset", &quic.StatelessResetError{}, sealed, true},
	} {
		if got := mayResend(tc.err, tc.early); got != tc.want {
			t.Errorf("%s: resend %v; want %v", tc.what, got, tc.want)
		}
	}
}
