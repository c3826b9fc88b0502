package e2e

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// carrierMatrixPolicy: alice reaches loopback (TCP and UDP), registers any
// name and exposes it publicly; bob reaches every reverse name.
const carrierMatrixPolicy = `package tp.authz

default allow := false

allow if {
	input.action in {"dial", "dial_udp"}
	input.identity.user == "alice"
	input.destination.host == "127.0.0.1"
}

allow if {
	input.action in {"listen", "expose_public"}
	input.identity.user == "alice"
}

allow if {
	input.action in {"dial", "dial_udp"}
	input.identity.user == "bob"
	input.destination.reverse != ""
}
`

// carrierEnv is the client environment that forces carrier (UDP forces the
// QUIC transport too, so that auto does not race TLS).
func carrierEnv(carrier string) []string {
	env := []string{"TP_CARRIER=" + carrier}
	if carrier == wire.CarrierUDP {
		env = append(env, "TP_TRANSPORT=quic")
	}
	return env
}

// carrierRow is one carrier's tpd and clients. The clients reach tpd only
// through a relay: for tls, ws and http it carries TCP alone, so a client that
// sent its QUIC packets over UDP would reach nothing. For udp it carries UDP
// and TCP: tp expose gets a protected name's end-to-end certificate from TP's
// HTTPS API (ACME, acme/reverse.go), which runs on TCP only.
type carrierRow struct {
	carrier            string
	srv                *server
	front              *carrierRelay
	alice, bob         []string // TP_HOME through the front relay, and the carrier
	tcpPublic, udpPubl int
}

func newCarrierRow(t testing.TB, carrier string) *carrierRow {
	t.Helper()
	r := &carrierRow{carrier: carrier, tcpPublic: testnet.FreePort(t, "tcp"), udpPubl: testnet.FreePort(t, "udp")}
	ports := fmt.Sprintf("TP_PUBLIC_PORTS=%d,%d/udp", r.tcpPublic, r.udpPubl)
	r.srv = startTPD(t, initTPD(t, carrierMatrixPolicy), "127.0.0.1:0", []string{ports})
	r.srv.mustStop = true
	r.front = startCarrierRelay(t, r.srv.Addr, true, carrier == wire.CarrierUDP)
	r.alice = r.through(t, r.srv.login(t, "alice", "laptop"), r.front)
	r.bob = r.through(t, r.srv.login(t, "bob", "phone"), r.front)
	return r
}

// through is a copy of env's TP_HOME that reaches tpd through relay, with the
// row's carrier.
func (r *carrierRow) through(t testing.TB, env []string, relay *carrierRelay) []string {
	t.Helper()
	return append(copyHome(t, env, withHost(t, r.srv.URL, relay.Addr)), carrierEnv(r.carrier)...)
}

// TestCarrierMatrix runs every TP feature with the real tp and tpd binaries on
// every carrier (udp, tls, ws, http), one tpd per carrier: tp forward TCP
// (checksummed both ways) and UDP; OpenSSH through ProxyCommand="tp %h %p",
// direct and to a reverse name; tp expose protected and public, TCP and UDP,
// reached by dialers on the same carrier (and public ports by plain sockets);
// a destination's reset and a killed agent reaching tp as aborts; roaming (the
// client's carrier socket is replaced mid-transfer, from another address,
// 127.0.0.2) with the checksum matching. The udp row also loses UDP
// mid-transfer with --carrier auto, and the transfer completes over tls.
func TestCarrierMatrix(t *testing.T) {
	parallelLong(t)
	for _, carrier := range clients.Carriers {
		t.Run(carrier, func(t *testing.T) {
			t.Parallel()
			testCarrierRow(t, newCarrierRow(t, carrier))
		})
	}
}

func testCarrierRow(t *testing.T, r *carrierRow) {
	const size = 1 << 20
	sum := checksumServer(t, size)
	echo := testnet.EchoUDP(t)

	t.Run("forward-tcp", func(t *testing.T) {
		fwd, _ := startForward(t, r.alice, sum)
		checksumRoundTrip(t, fwd, size, "tp forward over "+r.carrier)
	})
	t.Run("forward-udp", func(t *testing.T) {
		fwd, _ := startForward(t, r.alice, echo, "--udp")
		for i := range 3 {
			udpEchoE2E(t, fwd, fmt.Sprintf("datagram %d over %s", i, r.carrier))
		}
	})
	t.Run("ssh", func(t *testing.T) {
		sd := startSSHD(t)
		stdout, stderr, err := sd.ssh(t, r.alice, "127.0.0.1", "echo direct-$((6*7))")
		if err != nil || strings.TrimSpace(stdout) != "direct-42" {
			t.Fatalf("ssh to 127.0.0.1 over %s: %v, stdout %q\nstderr:\n%s", r.carrier, err, stdout, stderr)
		}
		startExpose(t, r.alice, "laptop-ssh", "127.0.0.1:"+strconv.Itoa(sd.Port), "--allow-user", "bob")
		stdout, stderr, err = sd.ssh(t, r.bob, "laptop-ssh.rev.tp.internal", "echo reverse-$((6*7))")
		if err != nil || strings.TrimSpace(stdout) != "reverse-42" {
			t.Fatalf("ssh to the reverse name over %s: %v, stdout %q\nstderr:\n%s", r.carrier, err, stdout, stderr)
		}
		// bob's tp has exited: its QUIC connection's close reached tpd over
		// the carrier (else tpd keeps it, and the session to the agent, until
		// its 60 s idle timeout), and quic-go did not warn about buffers.
		closed := regexp.MustCompile(`msg="quic connection" remote=\S+ identity=bob@phone .* end="[^"]*\(remote\)"`)
		waitFor(t, 30*time.Second, "tpd to log bob's QUIC connection closed by the client", func() bool {
			return closed.MatchString(r.srv.log.String())
		})
		if strings.Contains(stderr, "buffer size") {
			t.Errorf("tp printed quic-go's buffer warning over the %s carrier:\n%s", r.carrier, stderr)
		}
	})
	t.Run("reverse", func(t *testing.T) {
		startExpose(t, r.alice, "files", sum, "--allow-user", "bob")
		startExpose(t, r.alice, "dns", echo, "--udp", "--allow-user", "bob")
		web := startExpose(t, r.alice, "web", sum, "--public", strconv.Itoa(r.tcpPublic))
		game := startExpose(t, r.alice, "game", echo, "--udp", "--public", strconv.Itoa(r.udpPubl))
		waitLog(t, web, "Public: anyone reaches", 10*time.Second)
		waitLog(t, game, "Public: anyone reaches UDP", 10*time.Second)

		fwd, _ := startForward(t, r.bob, "files.rev.tp.internal:22")
		checksumRoundTrip(t, fwd, size, "protected TCP, agent and dialer over "+r.carrier)
		fwd, _ = startForward(t, r.bob, "dns.rev.tp.internal:53", "--udp")
		udpEchoE2E(t, fwd, "protected UDP, agent and dialer over "+r.carrier)
		fwd, _ = startForward(t, r.bob, "web.rev.tp.internal:80")
		checksumRoundTrip(t, fwd, size, "public TCP name, agent and dialer over "+r.carrier)
		checksumRoundTrip(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(r.tcpPublic)), size, "public TCP port, agent over "+r.carrier)
		fwd, _ = startForward(t, r.bob, "game.rev.tp.internal:27015", "--udp")
		udpEchoE2E(t, fwd, "public UDP name, agent and dialer over "+r.carrier)
		udpEchoE2E(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(r.udpPubl)), "public UDP port, agent over "+r.carrier)
	})
	t.Run("abort", func(t *testing.T) {
		// Bad input: the destination resets after 256 KiB.
		reset := testnet.Serve(t, func(c *net.TCPConn) {
			c.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Read(make([]byte, 1)); err != nil {
				return
			}
			c.Write(bytes.Repeat([]byte("d"), 256<<10))
			c.SetLinger(0)
		})
		_, ps, _ := net.SplitHostPort(reset)
		port, _ := strconv.Atoi(ps)
		p := startTP(t, r.alice, "127.0.0.1", port)
		if _, err := p.stdin.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		p.wantCutExit(t, "cut off by the destination")
		if got := p.read.Load(); got > 256<<10 {
			t.Fatalf("tp wrote %d bytes; the destination sent %d", got, 256<<10)
		}

		// Bad input: the agent is killed (SIGKILL) mid-transfer.
		agent := startAgentProc(t, r.alice, "stream", testnet.Stream(t), "--allow-user", "bob")
		agent.waitRegistered(t)
		p = startTP(t, r.bob, "stream.rev.tp.internal", 22)
		p.waitRead(t, 1<<20)
		if err := agent.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		p.wantCutExit(t, "cut off by the exposed service's side")

		// Bad input: the application on the client's side resets its
		// connection to tp forward mid-upload. The destination must see a
		// reset, not an end of stream (which would pass a cut upload for a
		// complete one).
		started, ended := make(chan struct{}, 1), make(chan error, 1)
		dst := testnet.Serve(t, func(c *net.TCPConn) {
			c.SetDeadline(time.Now().Add(60 * time.Second))
			if _, err := c.Read(make([]byte, 1)); err != nil {
				ended <- err
				return
			}
			started <- struct{}{}
			_, err := io.Copy(io.Discard, c)
			ended <- err
		})
		fwd, _ := startForward(t, r.alice, dst)
		c, err := net.Dial("tcp", fwd)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(bytes.Repeat([]byte("u"), 256<<10)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-started:
		case err := <-ended:
			t.Fatalf("the destination saw %v before any byte", err)
		case <-time.After(60 * time.Second):
			t.Fatal("no byte reached the destination within 60s")
		}
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		select {
		case err := <-ended:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("the destination, after the client's application reset its connection, saw %v; want a connection reset", err)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("the destination saw no end within 60s of the client's reset")
		}
	})
	t.Run("roam", func(t *testing.T) {
		// The client reaches tpd through a relay of its own, which mid-transfer
		// replaces the client's carrier socket as tpd sees it: for udp a new
		// socket on 127.0.0.2 (a NAT rebinding); for the stream carriers every
		// connection is reset, and the client's new ones come from 127.0.0.2.
		relay := startCarrierRelay(t, r.srv.Addr, r.carrier != wire.CarrierUDP, r.carrier == wire.CarrierUDP)
		env := r.through(t, r.alice, relay)
		fwd, fwdLog := startForward(t, env, checksumServer(t, 4<<20))
		// The relay roams once it carried 1 MiB to the client (the upload's
		// acknowledgements and the first part of the download): at least the
		// download's last 3 MiB cross the new path, else the roam could pass
		// unnoticed with the whole download buffered in tp forward.
		relay.after(toClient, 1<<20, relay.roam)
		checksumTransferDuring(t, fwd, 256<<10, 4<<20, 0, func() {}, "roaming over "+r.carrier)
		if n := relay.carried(toClient); n < 3<<20 {
			t.Fatalf("the relay carried %d bytes to the client after the roam; want the rest of the download, 3 MiB or more", n)
		}
		if r.carrier != wire.CarrierUDP && relay.conns() == 0 {
			t.Fatalf("after the reset, the client opened no new %s connection through the relay:\n%s", r.carrier, fwdLog.String())
		}

		// The agent roams: tp expose reaches tpd through a relay of its own,
		// which moves it mid-transfer while bob downloads from its service.
		// (It carries TCP on the udp row too: the agent gets its end-to-end
		// certificate from TP's HTTPS API, see carrierRow.)
		agentRelay := startCarrierRelay(t, r.srv.Addr, true, r.carrier == wire.CarrierUDP)
		startExpose(t, r.through(t, r.alice, agentRelay), "roamer", checksumServer(t, 4<<20), "--allow-user", "bob")
		fwd, _ = startForward(t, r.bob, "roamer.rev.tp.internal:22")
		// The download goes from the agent to tpd: the agent roams once 1 MiB
		// went that way, so at least the last 3 MiB cross its new path.
		agentRelay.after(toTPD, 1<<20, agentRelay.roam)
		checksumTransferDuring(t, fwd, 256<<10, 4<<20, 0, func() {}, "the agent roaming over "+r.carrier)
		if n := agentRelay.carried(toTPD); n < 3<<20 {
			t.Fatalf("the agent's relay carried %d bytes to tpd after the roam; want the rest of the download, 3 MiB or more", n)
		}
	})
	if r.carrier == wire.CarrierUDP {
		t.Run("udp-dies", func(t *testing.T) {
			// Bad input: UDP stops being delivered mid-transfer (both ways);
			// --carrier auto moves the live connection to tls.
			relay := startCarrierRelay(t, r.srv.Addr, true, true)
			env := append(r.through(t, r.alice, relay), "TP_CARRIER=auto")
			fwd, fwdLog := startForward(t, env, checksumServer(t, 8<<20))
			// UDP stops once 2 MiB went to the client: the rest of the
			// download can only come over tls (the relay's TCP).
			relay.after(toClient, 2<<20, func() { relay.dropUDP(true) })
			checksumTransferDuring(t, fwd, 1<<20, 8<<20, 0, func() {}, "UDP lost mid-transfer")
			if n := relay.carried(toClient); n < 6<<20 {
				t.Fatalf("the relay carried %d bytes to the client over tls after UDP stopped; want the rest of the download, 6 MiB or more", n)
			}
			if !strings.Contains(fwdLog.String(), "the connection moved to tls") {
				t.Fatalf("tp did not say it moved to tls:\n%s", fwdLog.String())
			}
		})
		t.Run("agent-udp-dies", func(t *testing.T) {
			// Bad input: UDP stops being delivered (both ways) under the
			// agent mid-transfer; tp expose --carrier auto moves its QUIC
			// connection, the one its control stream and sessions run on,
			// to tls, and bob's download from its service completes.
			relay := startCarrierRelay(t, r.srv.Addr, true, true)
			env := append(r.through(t, r.alice, relay), "TP_CARRIER=auto")
			const size = 4 << 20 // each download from the service
			agentLog := startExpose(t, env, "mover", checksumServer(t, size), "--allow-user", "bob")
			fwd, _ := startForward(t, r.bob, "mover.rev.tp.internal:22")
			relay.after(toTPD, 1<<20, func() { relay.dropUDP(true) })
			checksumTransferDuring(t, fwd, 1<<20, size, 0, func() {}, "the agent's UDP lost mid-transfer")
			if n := relay.carried(toTPD); n < 3<<20 {
				t.Fatalf("the agent's relay carried %d bytes to tpd over tls after UDP stopped; want the rest of the download, 3 MiB or more", n)
			}
			if !strings.Contains(agentLog.String(), "the connection moved to tls") {
				t.Fatalf("tp expose did not say it moved to tls:\n%s", agentLog.String())
			}
			if strings.Contains(agentLog.String(), "reconnecting") {
				t.Fatalf("tp expose lost its control session instead of moving it:\n%s", agentLog.String())
			}
			// The moved control session still takes new sessions.
			fwd2, _ := startForward(t, r.bob, "mover.rev.tp.internal:22")
			checksumTransferDuring(t, fwd2, 1<<10, size, size, func() {}, "a new session after the agent moved")
		})
	}
	if r.carrier == wire.CarrierTLS || r.carrier == wire.CarrierWS {
		// The ssh client's tp has exited: tpd ended its carrier session.
		waitLog(t, r.srv.log, "carrier="+r.carrier, 30*time.Second)
	}
}

// BenchmarkCarrierMove measures, per carrier, how long a download through
// `tp forward` (the real binaries, the client silent: it only receives)
// pauses when the client's carrier socket is replaced mid-transfer (the roam
// of TestCarrierMatrix: for udp a NAT rebinding to 127.0.0.2, for tls, ws and
// http every connection reset and reopened from 127.0.0.2), and, as
// "udp-dies", when UDP stops being delivered both ways under --carrier auto
// and the connection moves to tls (after the 3 s CarrierStall). pause-ms is
// the longest gap between two reads of the download after the event (mean
// over the runs; max-pause-ms the worst run), base-ms the longest gap of the
// same download before it. Run it with -benchtime=3x or more.
func BenchmarkCarrierMove(b *testing.B) {
	for _, name := range append(slices.Clone(clients.Carriers), "udp-dies") {
		b.Run(name, func(b *testing.B) {
			dies := name == "udp-dies"
			carrier := name
			if dies {
				carrier = wire.CarrierUDP
			}
			r := newCarrierRow(b, carrier)
			sum := checksumServer(b, 8<<20)
			var pause, base, worst time.Duration
			n := 0
			for b.Loop() {
				relay := startCarrierRelay(b, r.srv.Addr, carrier != wire.CarrierUDP || dies, carrier == wire.CarrierUDP)
				env := r.through(b, r.alice, relay)
				event := relay.roam
				if dies {
					env = append(env, "TP_CARRIER=auto")
					event = func() { relay.dropUDP(true) }
				}
				fwd, _ := startForward(b, env, sum)
				before, after := checksumTransferDuring(b, fwd, 1<<20, 8<<20, 2<<20, event, name)
				pause, base, n = pause+after, base+before, n+1
				worst = max(worst, after)
			}
			b.ReportMetric(float64(pause.Microseconds())/1e3/float64(n), "pause-ms")
			b.ReportMetric(float64(worst.Microseconds())/1e3, "max-pause-ms")
			b.ReportMetric(float64(base.Microseconds())/1e3/float64(n), "base-ms")
		})
	}
}

// checksumTransferDuring sends up random bytes through addr to a
// checksumServer (which answers with down bytes), checks both checksums, and
// runs event once at bytes of the download have arrived. It returns the
// longest pause between two reads of the download before and after event.
func checksumTransferDuring(t testing.TB, addr string, up, down, at int64, event func(), what string) (before, after time.Duration) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(c, h), rand.Reader, up); err != nil {
		t.Fatalf("%s: upload: %v", what, err)
	}
	c.(*net.TCPConn).CloseWrite()
	r := bufio.NewReaderSize(c, 64<<10)
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("%s: reading the upload checksum: %v", what, err)
	}
	if got, want := strings.TrimSpace(line), hex.EncodeToString(h.Sum(nil)); got != want {
		t.Fatalf("%s: upload checksum: the service saw %s, sent %s", what, got, want)
	}
	h.Reset()
	buf := make([]byte, 16<<10)
	var got int64
	last, fired := time.Now(), false
	for got < down {
		n, err := r.Read(buf[:min(int64(len(buf)), down-got)])
		now := time.Now()
		if n > 0 {
			if gap := now.Sub(last); fired {
				after = max(after, gap)
			} else {
				before = max(before, gap)
			}
			last = now
			h.Write(buf[:n])
			got += int64(n)
		}
		if err != nil {
			t.Fatalf("%s: download: %v after %d of %d bytes", what, err, got, down)
		}
		if !fired && got >= at {
			fired = true
			event()
			last = time.Now()
		}
	}
	rest, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("%s: download trailer: %v", what, err)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != string(rest) {
		t.Fatalf("%s: download checksum: got %s, the service sent %s", what, sum, rest)
	}
	return before, after
}

// carrierRelay relays TCP connections and/or UDP datagrams from one loopback
// port to target, as a NAT between a client and tpd would. roam moves the
// client, as tpd sees it, to another address: UDP flows get new upstream
// sockets on 127.0.0.2, TCP connections are reset (RST) and new ones are
// made from 127.0.0.2. dropUDP loses every datagram, both ways. after runs
// such an event once a number of bytes went one way, and carried says how
// many went each way since.
type carrierRelay struct {
	t      testing.TB
	Addr   string
	target string

	mu     sync.Mutex
	from   net.IP
	tcp    []*net.TCPConn
	opened int // TCP connections relayed since the last roam
	flows  map[string]*relayFlow
	drop   bool
	stall  bool // TCP connections are accepted and held, never relayed
	held   int  // TCP connections held since stall
	udp    *net.UDPConn

	carriedTo [2]int64 // bytes relayed since the last event, to tpd and to the client
	event     func()   // run once, when carriedTo[eventDir] reaches eventAt
	eventDir  int
	eventAt   int64
}

// The ways a relay carries bytes (carrierRelay.carriedTo's index).
const (
	toTPD    = 0
	toClient = 1
)

// count records n bytes relayed in direction dir, and runs the pending
// event when they reach its mark.
func (r *carrierRelay) count(dir int, n int) {
	r.mu.Lock()
	r.carriedTo[dir] += int64(n)
	var event func()
	if r.event != nil && dir == r.eventDir && r.carriedTo[dir] >= r.eventAt {
		event, r.event = r.event, nil
		r.carriedTo = [2]int64{}
	}
	r.mu.Unlock()
	if event != nil {
		event()
	}
}

// after runs event once n bytes went in direction dir (from now), in the
// relay's path: what follows them is carried only after it.
func (r *carrierRelay) after(dir int, n int64, event func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.carriedTo = [2]int64{}
	r.event, r.eventDir, r.eventAt = event, dir, n
}

// carried is how many bytes went in direction dir since the last event.
func (r *carrierRelay) carried(dir int) int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.carriedTo[dir]
}

// pipe copies src to dst (one way of a relayed TCP connection), counting.
func (r *carrierRelay) pipe(dst, src *net.TCPConn, dir int) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
			r.count(dir, n)
		}
		if err != nil {
			_ = dst.CloseWrite()
			return
		}
	}
}

type relayFlow struct {
	client *net.UDPAddr
	mu     sync.Mutex
	up     *net.UDPConn
}

func startCarrierRelay(t testing.TB, target string, tcp, udp bool) *carrierRelay {
	t.Helper()
	r := &carrierRelay{t: t, target: target, from: net.IPv4(127, 0, 0, 1), flows: map[string]*relayFlow{}}
	var ln *net.TCPListener
	for i := 0; ; i++ {
		var err error
		port := 0
		if tcp {
			if ln, err = net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
				t.Fatal(err)
			}
			port = ln.Addr().(*net.TCPAddr).Port
		}
		if udp {
			r.udp, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
			if err != nil && ln != nil && i < 20 {
				ln.Close() // the same port is taken for UDP: another one
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			port = r.udp.LocalAddr().(*net.UDPAddr).Port
		}
		r.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		break
	}
	t.Cleanup(func() {
		if ln != nil {
			ln.Close()
		}
		if r.udp != nil {
			r.udp.Close()
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, c := range r.tcp {
			c.Close()
		}
		for _, f := range r.flows {
			f.up.Close()
		}
	})
	if ln != nil {
		go r.serveTCP(ln)
	}
	if r.udp != nil {
		go r.serveUDP()
	}
	return r
}

func (r *carrierRelay) serveTCP(ln *net.TCPListener) {
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			return
		}
		r.mu.Lock()
		if r.stall {
			r.tcp = append(r.tcp, c) // closed at the test's end
			r.held++
			r.mu.Unlock()
			continue
		}
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: r.from}, Timeout: 10 * time.Second}
		r.mu.Unlock()
		u, err := d.Dial("tcp", r.target)
		if err != nil {
			c.Close()
			continue
		}
		up := u.(*net.TCPConn)
		r.mu.Lock()
		r.tcp = append(r.tcp, c, up)
		r.opened++
		r.mu.Unlock()
		go r.pipe(up, c, toTPD)
		go r.pipe(c, up, toClient)
	}
}

func (r *carrierRelay) serveUDP() {
	target, err := net.ResolveUDPAddr("udp", r.target)
	if err != nil {
		return
	}
	buf := make([]byte, 64<<10)
	for {
		n, from, err := r.udp.ReadFromUDP(buf)
		if err != nil {
			return
		}
		r.mu.Lock()
		f, drop := r.flows[from.String()], r.drop
		if f == nil {
			f = &relayFlow{client: from}
			if f.up, err = net.ListenUDP("udp", &net.UDPAddr{IP: r.from}); err != nil {
				r.mu.Unlock()
				continue
			}
			r.flows[from.String()] = f
			go r.back(f, f.up)
		}
		r.mu.Unlock()
		if drop {
			continue
		}
		f.mu.Lock()
		up := f.up
		f.mu.Unlock()
		if _, err := up.WriteToUDP(buf[:n], target); err == nil {
			r.count(toTPD, n)
		}
	}
}

// back relays what tpd sends to up back to the flow's client.
func (r *carrierRelay) back(f *relayFlow, up *net.UDPConn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := up.Read(buf)
		if err != nil {
			return
		}
		r.mu.Lock()
		drop := r.drop
		r.mu.Unlock()
		if !drop {
			if _, err := r.udp.WriteToUDP(buf[:n], f.client); err == nil {
				r.count(toClient, n)
			}
		}
	}
}

// roam moves every relayed client to 127.0.0.2, as tpd sees it.
func (r *carrierRelay) roam() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.from = net.IPv4(127, 0, 0, 2)
	for _, c := range r.tcp {
		c.SetLinger(0) // a reset, as a middlebox that kills connections sends
		c.Close()
	}
	r.tcp, r.opened = nil, 0
	for _, f := range r.flows {
		up, err := net.ListenUDP("udp", &net.UDPAddr{IP: r.from})
		if err != nil {
			r.t.Errorf("roaming: a UDP socket on 127.0.0.2: %v", err)
			continue
		}
		f.mu.Lock()
		old := f.up
		f.up = up
		f.mu.Unlock()
		old.Close()
		go r.back(f, up)
	}
}

func (r *carrierRelay) dropUDP(drop bool) {
	r.mu.Lock()
	r.drop = drop
	r.mu.Unlock()
}

// stallTCP makes the relay accept TCP connections and hold them, relaying
// nothing and never closing them: a server whose TCP port answers nothing.
func (r *carrierRelay) stallTCP() {
	r.mu.Lock()
	r.stall = true
	r.mu.Unlock()
}

// stalled is the number of TCP connections held since stallTCP.
func (r *carrierRelay) stalled() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.held
}

// conns is the number of TCP connections relayed since the last roam.
func (r *carrierRelay) conns() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.opened
}
