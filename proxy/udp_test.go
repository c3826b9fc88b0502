package proxy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

var transports = []string{clients.TransportTLS, clients.TransportQUIC}

// udpDialer returns a Dialer of q using transport.
func (q *quicEnv) udpDialer(t testing.TB, transport string) *clients.Dialer {
	d := q.quicDialer(t)
	d.Transport = transport
	return d
}

// startUDPSink runs a loopback UDP server that counts what it receives.
func startUDPSink(t testing.TB) (string, *atomic.Int64) {
	t.Helper()
	var n atomic.Int64
	addr := testnet.ServeUDP(t, func([]byte, net.Addr) []byte {
		n.Add(1)
		return nil
	})
	return addr, &n
}

// udpEcho sends msg and expects it back within a second, retrying a few times:
// UDP may lose a datagram, and the test is about what arrives.
func udpEcho(t testing.TB, c net.Conn, msg []byte) {
	t.Helper()
	v, _ := udpSent.LoadOrStore(c, &[][]byte{})
	sent := v.(*[][]byte)
	buf := make([]byte, 1<<16)
	for try := 0; try < 5; try++ {
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("write %d bytes: %v", len(msg), err)
		}
		*sent = append(*sent, msg)
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		for {
			n, err := c.Read(buf)
			if errors.Is(err, errTimeout) || isTimeout(err) {
				break // lost on the way, or slow: send it again
			}
			if err == nil && bytes.Equal(buf[:n], msg) {
				return
			}
			if err == nil && slices.ContainsFunc(*sent, func(m []byte) bool { return bytes.Equal(buf[:n], m) }) {
				continue // the late echo of a datagram sent again after a timeout
			}
			t.Fatalf("echo of %d bytes: got %d bytes, %v", len(msg), n, err)
		}
	}
	t.Fatalf("no echo of %d bytes in 5 tries", len(msg))
}

// udpSent is what udpEcho sent on each flow (one test's goroutine each).
var udpSent sync.Map // net.Conn → *[][]byte

var errTimeout = errors.New("timeout")

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestUDPEcho: datagrams of many sizes reach a UDP echo and come back intact, over
// TLS (capsules on the connection) and over QUIC (DATAGRAM frames, and the stream
// for those too large for a frame); the policy is asked with action dial_udp.
func TestUDPEcho(t *testing.T) {
	t.Parallel()
	var reqs sync.Map
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			reqs.Store(req.Source.Transport, req)
			return allowAll(ctx, req)
		})
	}, proxy.QUICOptions{})
	echo := testnet.EchoUDP(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			c := dialVia(t, q.udpDialer(t, tr), "udp", echo)
			flow, ok := c.(*wire.UDPFlow)
			if !ok {
				t.Fatalf("got %T, want *wire.UDPFlow", c)
			}
			if _, dg := flow.FlowID(); dg != (tr == clients.TransportQUIC) {
				t.Fatalf("QUIC datagrams in use: %v on %s", dg, tr)
			}
			for _, size := range []int{0, 1, 100, 1000, 1400, 4000, 20000, 65507} {
				udpEcho(t, c, bytes.Repeat([]byte{byte(size)}, size))
			}
			st := flow.Stats()
			if tr == clients.TransportQUIC && st.Oversize < 3 {
				t.Errorf("oversize datagrams sent on the stream: %d; want at least 3 (4000, 20000, 65507 bytes)", st.Oversize)
			}
			v, _ := reqs.Load(tr)
			req, _ := v.(authz.Request)
			if req.Action != authz.ActionDialUDP || req.Destination.Network != "udp" {
				t.Fatalf("policy saw action %q network %q; want dial_udp, udp", req.Action, req.Destination.Network)
			}
		})
	}
	q.mustEcho(t) // TCP beside it
}

// TestUDPPolicyDenied: a UDP flow the policy refuses is refused with its reason,
// over both transports, while TCP to the same host is allowed.
func TestUDPPolicyDenied(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			if req.Action == authz.ActionDialUDP {
				return authz.Decision{Reason: "UDP to " + req.Destination.Host + " is not allowed for " + req.Identity.DeviceID}, nil
			}
			return allowAll(ctx, req)
		})
	}, proxy.QUICOptions{})
	echo := testnet.EchoUDP(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := q.udpDialer(t, tr).DialContext(ctx, "udp", echo)
			re := refused(t, err, wire.CodePolicyDenied)
			if !strings.Contains(re.Reason, "UDP to 127.0.0.1 is not allowed for alice@laptop") || !errors.Is(err, authz.ErrPolicyDenied) {
				t.Fatalf("refusal %v", err)
			}
		})
	}
	q.mustEcho(t)
	if st := q.srv.UDPStats(); st.Flows != 0 {
		t.Fatalf("flows served: %d", st.Flows)
	}
}

// TestUDPIdleExpiry: a flow that carries nothing for the idle timeout ends on the
// server, the client's reads end, the session log says why, and the bounds are
// released.
func TestUDPIdleExpiry(t *testing.T) {
	t.Parallel()
	var logs testlog.Buffer
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.UDP.IdleTimeout = 300 * time.Millisecond
		c.Logger = slog.New(slog.NewJSONHandler(&logs, nil))
	}, proxy.QUICOptions{})
	echo := testnet.EchoUDP(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			c := dialVia(t, q.udpDialer(t, tr), "udp", echo)
			// One datagram, and its echo if it comes back before the flow
			// idles out (on a loaded machine it may not: the timeout is short).
			start := time.Now()
			if _, err := c.Write([]byte("before idle")); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			buf := make([]byte, 100)
			n, err := c.Read(buf)
			if err == nil && string(buf[:n]) == "before idle" {
				n, err = c.Read(buf)
			}
			if err != io.EOF {
				t.Fatalf("read on an idle flow: %q, %v; want io.EOF when the server ends it", buf[:n], err)
			}
			if took := time.Since(start); took < 250*time.Millisecond {
				t.Fatalf("flow ended %s after its last datagram, before its idle timeout", took)
			}
			waitFor(t, func() bool { return q.srv.UDPStats().Active == 0 })
		})
	}
	waitFor(t, func() bool { return strings.Count(logs.String(), `"end":"idle for 300ms"`) == 2 })
}

// TestUDPTooLarge: a datagram too large for the destination path (65508 bytes
// to IPv4: EMSGSIZE) is counted, logged and reported to the client, which counts
// it too; the flow keeps working.
func TestUDPTooLarge(t *testing.T) {
	t.Parallel()
	var logs testlog.Buffer
	q := newQUICEnv(t, func(c *proxy.Config) { c.Logger = slog.New(slog.NewJSONHandler(&logs, nil)) }, proxy.QUICOptions{})
	echo := testnet.EchoUDP(t)
	for i, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			c := dialVia(t, q.udpDialer(t, tr), "udp", echo)
			flow := c.(*wire.UDPFlow)
			reports := make(chan wire.UDPReport, 4)
			flow.OnReport(func(r wire.UDPReport) { reports <- r })
			if _, err := c.Write(make([]byte, 65508)); err != nil {
				t.Fatalf("write: %v", err)
			}
			select {
			case r := <-reports:
				if r.TooLarge != 1 || r.Largest != 65508 {
					t.Fatalf("report %+v; want 1 too large, largest 65508", r)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("no report of the dropped datagram")
			}
			if st := flow.Stats(); st.Peer.TooLarge != 1 {
				t.Fatalf("client's count of server drops: %+v", st.Peer)
			}
			if _, err := c.Write(make([]byte, wire.MaxDatagramSize+1)); !errors.Is(err, wire.ErrDatagramTooLarge) {
				t.Fatalf("write of 65536 bytes: %v; want ErrDatagramTooLarge", err)
			}
			if st := flow.Stats(); st.TooLarge != 1 {
				t.Fatalf("client's own drop count: %d", st.TooLarge)
			}
			udpEcho(t, c, []byte("still working"))
			c.Close()
			waitFor(t, func() bool { return q.srv.UDPStats().TooLarge == int64(i+1) })
		})
	}
	waitFor(t, func() bool { return strings.Count(logs.String(), `"dropped_too_large":1`) == 2 })
}

// TestUDPFlowLimits: flows beyond the bound per QUIC connection, and per identity
// over all transports, are refused with too_many_flows; the others keep working
// and a slot frees when a flow ends.
func TestUDPFlowLimits(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.UDP.MaxFlowsPerConn = 2
		c.UDP.MaxFlowsPerIdentity = 3
	}, proxy.QUICOptions{})
	echo := testnet.EchoUDP(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	dq := q.udpDialer(t, clients.TransportQUIC)
	a, b := dialVia(t, dq, "udp", echo), dialVia(t, dq, "udp", echo)
	_, err := dq.DialContext(ctx, "udp", echo)
	refused(t, err, wire.CodeTooManyFlows)

	dt := q.udpDialer(t, clients.TransportTLS)
	c := dialVia(t, dt, "udp", echo) // a second connection: 3 for this identity
	_, err = dt.DialContext(ctx, "udp", echo)
	if re := refused(t, err, wire.CodeTooManyFlows); !strings.Contains(re.Reason, "alice@laptop") {
		t.Fatalf("reason %q does not name the identity", re.Reason)
	}
	for _, f := range []net.Conn{a, b, c} {
		udpEcho(t, f, []byte("open flows still work"))
	}
	a.Close()
	waitFor(t, func() bool { return q.srv.UDPStats().Active == 2 })
	udpEcho(t, dialVia(t, dq, "udp", echo), []byte("slot freed"))
	if st := q.srv.UDPStats(); st.FlowsRefused != 2 {
		t.Fatalf("refused flows counted: %d; want 2", st.FlowsRefused)
	}
}

// TestUDPFlood: one client floods datagrams as fast as it can; memory stays
// bounded (queues drop and count), and another client is served beside it:
// its echoes come back while the flood passes through the server (the sink
// receives the flood before and during an echo), every one of them, none
// dropped. The flood lasts until that was seen and enough were sent to fill
// the queues.
func TestUDPFlood(t *testing.T) { // not parallel: it measures the process's heap
	least := int64(20000)
	if testing.Short() {
		least = 4000
	}
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	echo := testnet.EchoUDP(t)
	sink, received := startUDPSink(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			waitFor(t, func() bool { return q.srv.UDPStats().Active == 0 }) // the previous run's flows are counted
			before, sinkBefore := q.srv.UDPStats(), received.Load()
			flood := dialVia(t, q.udpDialer(t, tr), "udp", sink)
			other := dialVia(t, q.udpDialer(t, tr), "udp", echo)
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			heap0 := ms.HeapAlloc

			done, stop := make(chan error, 1), make(chan struct{})
			var sent atomic.Int64
			go func(stop <-chan struct{}) {
				buf := make([]byte, 1200)
				for i := 0; ; i++ {
					select {
					case <-stop:
						done <- nil
						return
					default:
					}
					buf[0] = byte(i)
					if _, err := flood.Write(buf); err != nil {
						done <- err
						return
					}
					sent.Add(1)
				}
			}(stop)
			during := false // an echo came back while the flood passed through the server
			deadline := time.Now().Add(30 * time.Second)
			for i := 0; ; i++ {
				atStart := received.Load()
				udpEcho(t, other, []byte(fmt.Sprintf("beside the flood %d", i)))
				during = during || atStart > sinkBefore && received.Load() > atStart
				if !during && time.Now().After(deadline) {
					t.Fatalf("in 30 s of flood no echo came back while the flood passed through the server (the sink received %d)", received.Load()-sinkBefore)
				}
				if during && sent.Load() >= least && stop != nil {
					close(stop)
					stop = nil
				}
				select {
				case err := <-done:
					if err != nil {
						t.Fatalf("flood: %v", err)
					}
					n := int(sent.Load())
					runtime.GC()
					runtime.ReadMemStats(&ms)
					if grown := int64(ms.HeapAlloc) - int64(heap0); grown > 16<<20 {
						t.Errorf("heap grew by %d MiB during a flood of %d MiB", grown>>20, n*1200>>20)
					}
					fst := flood.(*wire.UDPFlow).Stats()
					if fst.DatagramsOut != int64(n) || fst.QueueFull != 0 || fst.TooLarge != 0 {
						t.Fatalf("flooding client: %+v; want %d sent and none dropped", fst, n)
					}
					// The other client was served: every datagram of it echoed,
					// none dropped by the server or by itself.
					echoes := int64(i + 1)
					ost := other.(*wire.UDPFlow).Stats()
					if ost.QueueFull != 0 || ost.Peer.QueueFull != 0 || ost.Peer.TooLarge != 0 || ost.DatagramsIn < echoes {
						t.Fatalf("the other client: %+v after %d echoes; want every datagram echoed, none dropped", ost, echoes)
					}
					// Every datagram sent is forwarded or counted as dropped. The
					// server adds a flow's counts when the flow ends.
					flood.Close()
					waitFor(t, func() bool { return q.srv.UDPStats().Active == 1 })
					// The sender declares a packet lost only when later packets are
					// acknowledged or its probe timer fires, and a datagram its QUIC
					// had queued when the flow closed reaches the server after the
					// flow's end (counted as NoFlow), so the counts can trail the
					// flood under load; the connection lives on (the other client
					// uses it). Wait until every datagram is accounted for, or for
					// at most 10 s, and judge after that.
					var st proxy.UDPStats
					var up, dropped int64
					var lost uint64
					for deadline := time.Now().Add(10 * time.Second); ; {
						st = q.srv.UDPStats()
						up = st.DatagramsUp - before.DatagramsUp
						dropped = st.QueueFull + st.TooLarge + st.QUICQueueFull + st.NoFlow - before.QueueFull - before.TooLarge - before.QUICQueueFull - before.NoFlow
						if qc := flood.(*wire.UDPFlow).DatagramConn(); qc != nil {
							lost = qc.ConnectionStats().PacketsLost
						}
						if up+dropped+int64(lost) >= int64(n) || time.Now().After(deadline) {
							break
						}
						time.Sleep(20 * time.Millisecond)
					}
					t.Logf("%s: sent %d, server forwarded %d and dropped %d (of which QUIC's receive queue %d, after the flow's end %d), QUIC lost %d packets, sink received %d; %d echoes beside it",
						tr, n, up, dropped, st.QUICQueueFull-before.QUICQueueFull, st.NoFlow-before.NoFlow, lost, received.Load()-sinkBefore, echoes)
					switch {
					case up+dropped > int64(n):
						t.Fatalf("%d datagrams sent, but the server forwarded %d and counted %d dropped: more than were sent", n, up, dropped)
					case tr == clients.TransportTLS && up+dropped != int64(n):
						// Capsules on one TLS connection: nothing is lost on the way,
						// so the server's counts must add up exactly.
						t.Fatalf("%d datagrams sent, but the server forwarded %d and counted %d dropped: %d unaccounted for",
							n, up, dropped, int64(n)-up-dropped)
					case uint64(int64(n)-up-dropped) > lost:
						// Over QUIC a datagram may also be lost on the way (UDP; the
						// kernel's socket buffer under a flood). A 1200-byte datagram
						// fills its own packet, so each one missing must be in a packet
						// the sender's QUIC saw lost; the rest are counted, including
						// those quic-go's receive queue discarded (QUICQueueFull).
						t.Fatalf("%d datagrams sent; the server forwarded %d and counted %d dropped, and QUIC lost %d packets: %d vanished without a count",
							n, up, dropped, lost, uint64(int64(n)-up-dropped)-lost)
					}
					if up == 0 {
						t.Fatal("nothing of the flood was forwarded")
					}
					return
				default:
				}
			}
		})
	}
}

// TestUDPForwarder: `tp forward --udp`: each local source gets its own flow and
// its own replies; a flow idle on the client side ends and a new datagram from the
// same source opens a new one.
//
// On a loaded machine a flow can go idle (300 ms) between the test's
// datagrams, and its source's next one then opens another flow: so the test
// counts the flows the forwarder dialed and waits for as many to end, all of
// them idle, rather than for exactly three.
//
// Not parallel: a flow whose reply takes longer than its 300 ms idle time
// ends before the reply, and so does every retry's new flow. Beside the
// package's UDP floods (parallel tests) a round trip through the server and
// the echo can take that long: once, no echo came in 5 tries.
func TestUDPForwarder(t *testing.T) {
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	echo := testnet.EchoUDP(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			var logs testlog.Buffer
			var dialed atomic.Int64
			t.Cleanup(func() {
				if t.Failed() { // which flows were dialed and how each ended
					t.Logf("forwarder log (%d flows dialed):\n%s\nserver: %+v", dialed.Load(), logs.String(), q.srv.UDPStats())
				}
			})
			dl := q.udpDialer(t, tr)
			local := serveUDPForwarder(t, &clients.UDPForwarder{
				Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
					dialed.Add(1)
					return dl.DialContext(ctx, network, addr)
				},
				Target: echo, IdleTimeout: 300 * time.Millisecond,
				Logger: slog.New(slog.NewJSONHandler(&logs, nil)),
			})
			var srcs []net.Conn
			for i := range 3 {
				c, err := net.Dial("udp", local)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				srcs = append(srcs, c)
				udpEcho(t, c, []byte(fmt.Sprintf("source %d", i)))
			}
			for i, c := range srcs { // each source hears only its own replies
				udpEcho(t, c, []byte(fmt.Sprintf("again %d", i)))
			}
			// Every flow dialed so far ends (one log line each), and ends idle.
			ended := func() []map[string]any {
				var lines []map[string]any
				for _, l := range strings.Split(logs.String(), "\n") {
					var m map[string]any
					if json.Unmarshal([]byte(l), &m) == nil && (m["msg"] == "udp flow" || m["msg"] == "udp forward failed") {
						lines = append(lines, m)
					}
				}
				return lines
			}
			waitFor(t, func() bool { return int64(len(ended())) == dialed.Load() })
			idleFor := map[string]bool{}
			for _, m := range ended() {
				if m["end"] != "idle for 300ms" {
					t.Fatalf("a flow ended with %v; want every flow to end idle\n%s", m, logs.String())
				}
				idleFor[m["local"].(string)] = true
			}
			for _, c := range srcs {
				if !idleFor[c.LocalAddr().String()] {
					t.Fatalf("no flow of source %s ended idle; want one flow per source\n%s", c.LocalAddr(), logs.String())
				}
			}
			before := dialed.Load()
			udpEcho(t, srcs[0], []byte("after idle"))
			if dialed.Load() == before {
				t.Fatal("a datagram after its flow ended idle was answered without a new flow")
			}
		})
	}
}

// TestUDPWithoutQUICDatagrams: a QUIC client that did not enable datagrams gets
// no flow id and every datagram travels as a capsule on the stream.
func TestUDPWithoutQUICDatagrams(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	echo := testnet.EchoUDP(t)
	conn, err := q.quicConn(t, &q.cert) // quic.Config{}: EnableDatagrams false
	if err != nil {
		t.Fatal(err)
	}
	str, err := conn.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	_ = str.SetDeadline(time.Now().Add(20 * time.Second))
	qs := wire.NewQUICStream(conn, str)
	flow, err := wire.NewUDPFlow(qs, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, dg := flow.FlowID(); dg {
		t.Fatal("datagrams in use on a connection without them")
	}
	host, port, _ := net.SplitHostPort(echo)
	var p int
	fmt.Sscan(port, &p)
	if err := wire.WriteClientHello(qs, wire.ClientHello{V: 1, Op: "dial", Net: "udp", Host: host, Port: p}); err != nil {
		t.Fatal(err)
	}
	sh, err := wire.ReadServerHello(qs)
	if err != nil || !sh.OK || sh.Flow != nil {
		t.Fatalf("server hello %+v, %v; want ok without a flow id", sh, err)
	}
	_ = str.SetDeadline(time.Time{})
	flow.Start()
	defer flow.Close()
	udpEcho(t, flow, []byte("capsules on the stream"))
}

// TestUDPRecheckEndsFlow: a flow the policy no longer allows ends at the next
// re-check, over both transports.
func TestUDPRecheckEndsFlow(t *testing.T) {
	t.Parallel()
	var deny atomic.Bool
	var logs testlog.Buffer
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.Logger = slog.New(slog.NewJSONHandler(&logs, nil))
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			if deny.Load() {
				return authz.Decision{Reason: "UDP revoked"}, nil
			}
			return allowAll(ctx, req)
		})
	}, proxy.QUICOptions{})
	echo := testnet.EchoUDP(t)
	var flows []net.Conn
	for _, tr := range transports {
		c := dialVia(t, q.udpDialer(t, tr), "udp", echo)
		udpEcho(t, c, []byte("allowed"))
		flows = append(flows, c)
	}
	deny.Store(true)
	if checked, closed := q.srv.Recheck(context.Background()); checked != 2 || closed != 2 {
		t.Fatalf("re-check: checked %d, closed %d; want 2, 2", checked, closed)
	}
	// Ended by the server, not by either end: the flow is aborted, never closed
	// as if it had ended (over QUIC the reset says why).
	for i, c := range flows {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := c.Read(make([]byte, 10))
		code, reset := wire.StreamResetCode(err)
		switch {
		case transports[i] == "quic" && (!reset || code != wire.QUICPolicyChanged):
			t.Fatalf("QUIC read after revocation: %v; want a stream reset with code policy_changed", err)
		case transports[i] != "quic" && !errors.Is(err, syscall.ECONNRESET):
			t.Fatalf("TLS read after revocation: %v; want a connection reset", err)
		}
	}
	waitFor(t, func() bool {
		return strings.Count(logs.String(), "no longer authorised: the policy no longer allows it: UDP revoked") == 2
	})
}
