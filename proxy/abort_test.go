package proxy_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// destination starts a TCP server on loopback that runs serve for each connection.
func destination(t *testing.T, serve func(c *net.TCPConn)) string {
	t.Helper()
	return testnet.Serve(t, func(c *net.TCPConn) {
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		serve(c)
	})
}

// reset ends c with a TCP reset.
func reset(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}

// readUntilFailure reads c until it fails and returns what it read and the error.
func readUntilFailure(t *testing.T, c net.Conn) (int, error) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	n, err := io.Copy(io.Discard, c)
	if err == nil {
		err = io.EOF // io.Copy reports a clean end as nil
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read %d bytes, then nothing for 20s: the cut was never passed on", n)
	}
	return int(n), err
}

// TestAbortDestinationResetReachesClient: a destination that resets after part
// of a download. Bad input: the destination's RST after 100 KiB. The client must
// see a cut, never a clean end after partial data, and be told that the
// destination reset it; over QUIC the stream reset says peer_reset.
func TestAbortDestinationResetReachesClient(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	// The destination waits for the client's request: a reset right after the
	// accept can reach the server's connect(2) before it returns, and then the
	// dial fails (ECONNRESET) rather than the session.
	dest := destination(t, func(c *net.TCPConn) {
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			return
		}
		_, _ = c.Write(bytes.Repeat([]byte("d"), 100<<10))
		reset(c)
	})
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			c, err := q.udpDialer(t, tr).DialContext(context.Background(), "tcp", dest)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write([]byte("g")); err != nil {
				t.Fatal(err)
			}
			n, err := readUntilFailure(t, c)
			if errors.Is(err, io.EOF) {
				t.Fatalf("read %d bytes, then a clean end: the destination's reset was passed on as completion", n)
			}
			var ce *clients.CutError
			if !errors.As(err, &ce) {
				t.Fatalf("read error %v (%T); want a *clients.CutError", err, err)
			}
			if code, ok := wire.StreamResetCode(err); tr == clients.TransportQUIC && (!ok || code != wire.QUICPeerReset) {
				t.Errorf("QUIC stream reset code %v (reset %v); want peer_reset", code, ok)
			}
			clients.ExplainCut(context.Background(), err)
			if ce.End == nil || ce.End.By != "destination" || ce.End.Code != wire.EndPeerReset || !strings.Contains(ce.End.Reason, dest) {
				t.Fatalf("explained as %q (end %+v); want the destination %s named as the one that cut it", err, ce.End, dest)
			}
		})
	}
}

// TestAbortClientResetReachesDestination: a client that resets mid-upload. Bad
// input: the client's RST (TLS) or RESET_STREAM (QUIC) after 100 KiB. The
// destination must see a reset, not a clean EOF after a partial upload.
func TestAbortClientResetReachesDestination(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	results := make(chan error, 1)
	got := make(chan int, 1)
	dest := destination(t, func(c *net.TCPConn) {
		n, err := io.Copy(io.Discard, c)
		got <- int(n)
		results <- err
	})
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			c, err := q.udpDialer(t, tr).DialContext(context.Background(), "tcp", dest)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Write(bytes.Repeat([]byte("u"), 100<<10)); err != nil {
				t.Fatal(err)
			}
			wire.Abort(c, wire.QUICPeerReset)
			select {
			case err := <-results:
				n := <-got
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("the destination read %d bytes and then %v; want a connection reset, not a clean end", n, err)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("the destination never saw the client's abort")
			}
		})
	}
}

// TestAbortServerEndsSession: sessions that the server ends itself (a policy
// change, a revoked identity, a shutdown) are aborted with the reason, over
// both transports; none ends as if it were complete.
func TestAbortServerEndsSession(t *testing.T) {
	t.Parallel()
	var deny, revoked atomic.Bool
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			if deny.Load() {
				return authz.Decision{Reason: "db is closed for maintenance"}, nil
			}
			return allowAll(ctx, req)
		})
		c.Identify = func(cs tls.ConnectionState) (authz.Identity, error) {
			if revoked.Load() {
				return authz.Identity{}, errors.New("device alice@laptop is revoked")
			}
			return identifyCN(cs)
		}
	}, proxy.QUICOptions{})
	// The destination sends forever: a session that ends cleanly would be a lie.
	dest := destination(t, func(c *net.TCPConn) {
		buf := bytes.Repeat([]byte("s"), 16<<10)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	for _, tc := range []struct {
		name, code string
		cut        func()
	}{
		{"policy", wire.EndPolicyChanged, func() { deny.Store(true); q.srv.Recheck(context.Background()); deny.Store(false) }},
		{"revoked", wire.EndRevoked, func() { revoked.Store(true); q.srv.Recheck(context.Background()); revoked.Store(false) }},
	} {
		for _, tr := range transports {
			t.Run(tc.name+"/"+tr, func(t *testing.T) {
				c, err := q.udpDialer(t, tr).DialContext(context.Background(), "tcp", dest)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if _, err := io.ReadFull(c, make([]byte, 64<<10)); err != nil {
					t.Fatal(err)
				}
				tc.cut()
				_, err = readUntilFailure(t, c)
				var ce *clients.CutError
				if !errors.As(err, &ce) {
					t.Fatalf("after the server ended the session: %v (%T); want a *clients.CutError", err, err)
				}
				clients.ExplainCut(context.Background(), err)
				if ce.End == nil || ce.End.Code != tc.code || ce.End.By != "server" {
					t.Fatalf("explained as %q (end %+v); want code %s by the server", err, ce.End, tc.code)
				}
			})
		}
	}

	t.Run("shutdown", func(t *testing.T) {
		var conns []net.Conn
		for _, tr := range transports {
			c, err := q.udpDialer(t, tr).DialContext(context.Background(), "tcp", dest)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			conns = append(conns, c)
		}
		// A grace period that has already run out: live sessions are aborted at once.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := q.srv.Shutdown(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("Shutdown = %v; want it to report that it forced sessions closed", err)
		}
		for i, c := range conns {
			_, err := readUntilFailure(t, c)
			var ce *clients.CutError
			if !errors.As(err, &ce) {
				t.Fatalf("%s: after shutdown: %v (%T); want a *clients.CutError", transports[i], err, err)
			}
			if transports[i] == clients.TransportQUIC && !strings.Contains(err.Error(), "shutting down") {
				t.Errorf("QUIC: %v; want it to say the server is shutting down", err)
			}
		}
	})
}

// TestWhyIsOnlyForTheOwner: op "why" answers the identity whose session was cut,
// and nobody else. Bad input: another device asking about alice's session id,
// and ids that were never issued.
func TestWhyIsOnlyForTheOwner(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	dest := destination(t, func(c *net.TCPConn) {
		_, _ = c.Read(make([]byte, 1)) // reset only once the session is up
		reset(c)
	})
	c := e.rawConn(t)
	defer c.Close()
	host, port, _ := net.SplitHostPort(dest)
	if err := wire.WriteClientHello(c, wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: host, Port: mustPort(t, port)}); err != nil {
		t.Fatal(err)
	}
	sh, err := wire.ReadServerHello(c)
	if err != nil || !sh.OK || len(sh.Session) != 32 {
		t.Fatalf("dial answer %+v, %v; want ok with a 32-character session id", sh, err)
	}
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := readUntilFailure(t, c); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("after the destination's reset the client read %v; want a connection reset", err)
	}

	ask := func(cert *tls.Certificate, session string) wire.ServerHello {
		t.Helper()
		cfg := e.clientTLS(cert)
		cfg.NextProtos = []string{wire.ALPN}
		w, err := tls.Dial("tcp", e.addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		_ = w.SetDeadline(time.Now().Add(10 * time.Second))
		if err := wire.WriteClientHello(w, wire.ClientHello{V: wire.Version, Op: wire.OpWhy, Session: session}); err != nil {
			t.Fatal(err)
		}
		sh, err := wire.ReadServerHello(w)
		if err != nil {
			t.Fatal(err)
		}
		return sh
	}
	if got := ask(&e.cert, sh.Session); !got.OK || got.End == nil || got.End.By != "destination" {
		t.Fatalf("alice asking why: %+v; want the destination's reset", got)
	}
	bob := e.ca.ClientCert(t, "bob@phone", testpki.LeafOptions{})
	if got := ask(&bob, sh.Session); got.OK || got.Code != wire.CodeUnknownSession || got.End != nil {
		t.Fatalf("bob asking about alice's session: %+v; want unknown_session and nothing about it", got)
	}
	if got := ask(&e.cert, strings.Repeat("0", 32)); got.OK || got.Code != wire.CodeUnknownSession {
		t.Fatalf("asking about a session that never existed: %+v; want unknown_session", got)
	}
}

// TestWhyRecordExpires: op "why" answers about a cut session for one minute
// (docs/PROTOCOL.md) and then no more. The server's clock for its records is
// moved by the test, so the minute passes without waiting for it.
func TestWhyRecordExpires(t *testing.T) {
	e := newEnv(t, nil)
	var skew atomic.Int64 // how far the records' clock runs ahead
	proxy.SetEndRecordClock(e.srv, func() time.Time { return time.Now().Add(time.Duration(skew.Load())) })
	dest := destination(t, func(c *net.TCPConn) {
		_, _ = c.Read(make([]byte, 1)) // reset only once the session is up
		reset(c)
	})
	c := e.rawConn(t)
	defer c.Close()
	host, port, _ := net.SplitHostPort(dest)
	if err := wire.WriteClientHello(c, wire.ClientHello{V: wire.Version, Op: wire.OpDial, Net: "tcp", Host: host, Port: mustPort(t, port)}); err != nil {
		t.Fatal(err)
	}
	sh, err := wire.ReadServerHello(c)
	if err != nil || !sh.OK || sh.Session == "" {
		t.Fatalf("dial answer %+v, %v; want ok with a session id", sh, err)
	}
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := readUntilFailure(t, c); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("after the destination's reset the client read %v; want a connection reset", err)
	}
	ask := func() wire.ServerHello {
		t.Helper()
		cfg := e.clientTLS(&e.cert)
		cfg.NextProtos = []string{wire.ALPN}
		w, err := tls.Dial("tcp", e.addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		_ = w.SetDeadline(time.Now().Add(10 * time.Second))
		if err := wire.WriteClientHello(w, wire.ClientHello{V: wire.Version, Op: wire.OpWhy, Session: sh.Session}); err != nil {
			t.Fatal(err)
		}
		got, err := wire.ReadServerHello(w)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if proxy.EndRecordTTL != time.Minute {
		t.Fatalf("why records live %s; docs/PROTOCOL.md says one minute", proxy.EndRecordTTL)
	}
	skew.Store(int64(proxy.EndRecordTTL - time.Second))
	if got := ask(); !got.OK || got.End == nil || got.End.By != "destination" {
		t.Fatalf("why, a second before the record's minute is up: %+v; want the destination's reset", got)
	}
	skew.Store(int64(proxy.EndRecordTTL + time.Second))
	if got := ask(); got.OK || got.Code != wire.CodeUnknownSession || got.End != nil {
		t.Fatalf("why, a second after the record's minute: %+v; want unknown_session and nothing about it", got)
	}
}

func mustPort(t *testing.T, s string) int {
	t.Helper()
	p, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestCertExpiryCutsTransfers: 100 checksummed transfers, half over TLS and half
// over QUIC, with a client certificate that expires while they run. Each either
// finished before the expiry with the right checksum or is cut with an error that
// says the certificate expired; none ends silently short.
//
// The transfers share 10 client connections (5 over tp-mux, 5 over QUIC),
// 10 streams each, as a client's sessions share its connections: each
// connection's end at the expiry must cut every stream on it. All 100 must be
// connected before the certificate expires, or some are refused at the dial
// instead of cut, which is not what is tested. A loaded, race-instrumented run
// can stretch even 10 handshakes past a fixed time: a round whose dials did
// not all succeed is played again with a certificate that lives twice as long
// (4 s, then 8 s, … up to 64 s), and only a dial that failed counts as not
// having had time. A quiet machine passes the first round.
func TestCertExpiryCutsTransfers(t *testing.T) { // not parallel: its handshakes and 100 transfers race a certificate's expiry
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	for life := 4 * time.Second; ; life *= 2 {
		dialFailed := certExpiryRound(t, q, life)
		if t.Failed() || len(dialFailed) == 0 {
			return
		}
		if life >= 64*time.Second {
			t.Fatalf("with a certificate living %s, %d of 100 dials still failed, e.g. %v", life, len(dialFailed), dialFailed[0])
		}
		t.Logf("%d of 100 dials failed with a certificate living %s (e.g. %v): again with %s", len(dialFailed), life, dialFailed[0], 2*life)
	}
}

// certExpiryRound runs TestCertExpiryCutsTransfers's 100 transfers with a
// certificate that expires life from now, and returns the dials that failed.
func certExpiryRound(t *testing.T, q *quicEnv, life time.Duration) (dialFailed []error) {
	const chunk = 8 << 10
	// The destination sends n chunks, one every pace: i%3 == 0 transfers are
	// short (4 chunks), the others (250 chunks) outlast the certificate by a
	// quarter of its life.
	pace := life / 200
	dest := testnet.Serve(t, func(c *net.TCPConn) {
		_ = c.SetDeadline(time.Now().Add(2*life + 30*time.Second))
		var n [1]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return
		}
		for i := range int(n[0]) {
			if _, err := c.Write(bytes.Repeat([]byte{byte(i)}, chunk)); err != nil {
				return
			}
			time.Sleep(pace) // pacing: in flight when the certificate expires
		}
	})
	cert := q.ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{NotAfter: time.Now().Add(life)})
	type result struct {
		chunks int
		got    []byte
		err    error
		dialed bool
	}
	results := make(chan result, 100)
	dialers := make([]*clients.Dialer, 10)
	for j := range dialers {
		dialers[j] = &clients.Dialer{Server: q.addr, TLSConfig: q.clientTLS(&cert), Transport: transports[j%2], Timeout: life}
		defer dialers[j].Close()
	}
	for i := range 100 {
		chunks := 250
		if i%3 == 0 {
			chunks = 4
		}
		d := dialers[i%len(dialers)]
		go func() {
			c, err := d.DialContext(context.Background(), "tcp", dest)
			if err != nil {
				results <- result{chunks: chunks, err: err}
				return
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(2*life + 30*time.Second))
			_, _ = c.Write([]byte{byte(chunks)})
			got, err := io.ReadAll(c)
			results <- result{chunks, got, clients.ExplainCut(context.Background(), err), true}
		}()
	}
	// What each length of transfer must deliver, built once: built per result,
	// 2 MiB chunk by chunk under the race detector was most of a round.
	wants := map[int][]byte{}
	for _, n := range []int{4, 250} {
		for i := range n {
			wants[n] = append(wants[n], bytes.Repeat([]byte{byte(i)}, chunk)...)
		}
	}
	var complete, cut int
	for range 100 {
		r := <-results
		want := wants[r.chunks]
		var ce *clients.CutError
		switch {
		case !r.dialed:
			dialFailed = append(dialFailed, r.err)
		case r.err == nil && !bytes.Equal(r.got, want):
			t.Errorf("a transfer of %d chunks ended cleanly with %d of %d bytes: silently truncated", r.chunks, len(r.got), len(want))
		case r.err == nil:
			complete++
		case !errors.As(r.err, &ce):
			t.Errorf("a transfer failed with %v (%T); want a *clients.CutError", r.err, r.err)
		case ce.End == nil || ce.End.Code != wire.EndCertExpired:
			if code, ok := wire.StreamResetCode(r.err); !ok || code != wire.QUICCertExpired {
				t.Errorf("a transfer was cut with %q; want cert_expired", r.err)
			}
			cut++
		default:
			cut++
		}
	}
	if len(dialFailed) > 0 {
		return dialFailed
	}
	if cut < 66 {
		t.Errorf("%d transfers were cut; the 66 long ones outlast the certificate", cut)
	}
	t.Logf("certificate expiry during 100 transfers: %d completed with the right content, %d cut with cert_expired, 0 silent truncations", complete, cut)
	return nil
}

// TestShutdownDoesNotWaitForHellos: a connection that has sent no hello when
// Shutdown begins (bad input: a client that connects and stays silent, as a
// spare connection does) holds no session and must not hold up the drain for
// the hello timeout.
func TestShutdownDoesNotWaitForHellos(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) { c.HelloTimeout = time.Minute })
	c := e.rawConn(t) // handshaken, no hello
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown = %v: a silent connection held the drain", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	sh, err := wire.ReadServerHello(c)
	if err != nil || sh.Code != wire.CodeHelloTimeout || !strings.Contains(sh.Reason, "shutting down") {
		t.Fatalf("the silent client got %+v, %v; want hello_timeout saying the server is shutting down", sh, err)
	}
}

// TestForwarderPassesResets: `tp forward`'s local connections. Bad input: the
// destination's reset mid-download, and the local client's reset mid-upload.
// Each reaches the other end as a reset, over TLS and QUIC.
func TestForwarderPassesResets(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	conns := make(chan *net.TCPConn, 4)
	dest := destination(t, func(c *net.TCPConn) {
		conns <- c
		<-t.Context().Done() // the test ends it
	})
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			f := &clients.Forwarder{Dial: q.udpDialer(t, tr).DialContext, Target: dest, Logger: discardLogger()}
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan error, 1)
			go func() { served <- f.Serve(ctx, ln) }()
			defer func() { cancel(); <-served }()
			open := func() (net.Conn, *net.TCPConn) {
				local, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { local.Close() })
				if _, err := local.Write([]byte("hello")); err != nil {
					t.Fatal(err)
				}
				select {
				case d := <-conns:
					if _, err := io.ReadFull(d, make([]byte, 5)); err != nil {
						t.Fatal(err)
					}
					return local, d
				case <-time.After(20 * time.Second):
					t.Fatal("the destination got no connection")
					return nil, nil
				}
			}

			local, d := open()
			d.Write(bytes.Repeat([]byte("d"), 64<<10))
			reset(d)
			if _, err := readUntilFailure(t, local); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("the local client read %v after the destination's reset; want a connection reset", err)
			}

			local, d = open()
			reset(local.(*net.TCPConn))
			if _, err := readUntilFailure(t, d); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("the destination read %v after the local client's reset; want a connection reset", err)
			}
		})
	}
}
