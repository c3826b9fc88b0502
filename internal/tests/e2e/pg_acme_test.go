package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/clients"
)

// alpnDoor is a TCP balancer that reads each connection's TLS ClientHello
// (without answering it) and sends connections that offer tp/1 to proxy and
// every other one (the website side: enrollment, login, ACME) to web.
type alpnDoor struct {
	ln         net.Listener
	proxy, web string
	mu         sync.Mutex
	counts     map[string]int // backend → connections sent there
}

var errPeeked = errors.New("peeked")

func newALPNDoor(t *testing.T, proxy, web string) *alpnDoor {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &alpnDoor{ln: ln, proxy: proxy, web: web, counts: map[string]int{}}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go d.serve(c)
		}
	}()
	return d
}

func (d *alpnDoor) count(backend string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.counts[backend]
}

// peekConn records what the TLS server reads and discards what it writes, so
// the client sees nothing of the peek.
type peekConn struct {
	net.Conn
	r io.Reader
}

func (p peekConn) Read(b []byte) (int, error)  { return p.r.Read(b) }
func (p peekConn) Write(b []byte) (int, error) { return len(b), nil }

func (d *alpnDoor) serve(c net.Conn) {
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var hello bytes.Buffer
	var protos []string
	tls.Server(peekConn{Conn: c, r: io.TeeReader(c, &hello)}, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			protos = h.SupportedProtos
			return nil, errPeeked
		},
	}).Handshake()
	c.SetReadDeadline(time.Time{})
	backend := d.web
	if slices.Contains(protos, "tp/1") {
		backend = d.proxy
	}
	d.mu.Lock()
	d.counts[backend]++
	d.mu.Unlock()
	up, err := net.DialTimeout("tcp", backend, 5*time.Second)
	if err != nil {
		return
	}
	defer up.Close()
	if _, err := up.Write(hello.Bytes()); err != nil {
		return
	}
	go func() {
		io.Copy(up, c)
		up.(*net.TCPConn).CloseWrite()
	}()
	io.Copy(c, up)
}

// An agent's certificate request for its protected name on an instance other
// than the one holding its control session. Alice's `tp expose` reaches two
// real tpd on one PostgreSQL through a balancer that sends her proxy
// connection (ALPN tp/1) to A and her HTTPS requests (the reverse-name ACME
// of PROTOCOL.md section 11.10) to B. B checks in the database that alice
// holds the name, and the CA answers its dns-01 lookup from what the agent
// published: the order completes, and bob's protected dials through A and
// through B reach her service, 4 MiB each way checksummed. Then the same
// ACME flow is driven with every request on a new connection, alternately
// to A and B, so the challenge answer is published on one instance and
// checked on the other: before the answers were shared in the database, the
// authorization stayed pending.
func TestPGACMEOnOtherInstance(t *testing.T) {
	parallel(t)
	raceTPD(t)
	srvs := startPeers(t, 2, peerPolicy, nil)
	a, b := srvs[0], srvs[1]
	door := newALPNDoor(t, a.Addr, b.Addr)
	alice := a.login(t, "alice", "laptop")
	aliceHome := strings.TrimPrefix(alice[0], "TP_HOME=")
	setServer(t, aliceHome, "https://"+door.ln.Addr().String())
	bob := a.login(t, "bob", "phone")
	bobHome := strings.TrimPrefix(bob[0], "TP_HOME=")

	const size = 4 << 20
	sum := checksumServer(t, size)
	agent := startExpose(t, append(alice, "TP_TRANSPORT=tls"), "files", sum, "--allow-user", "bob")
	waitLog(t, a.log, "reverse listener registered", 30*time.Second)
	// The agent asks for its certificate as soon as it is registered.
	waitLog(t, b.log, "path=/acme/tp-reverse/certificate/", 60*time.Second)
	for _, via := range []*server{a, b} {
		setServer(t, bobHome, via.URL)
		fwd, _ := startForward(t, append(bob, "TP_TRANSPORT=tls"), "files.rev.tp.internal:22")
		checksumRoundTrip(t, fwd, size, "bob through "+via.Addr+" to alice's protected name, its certificate from B")
	}
	if strings.Contains(agent.String(), "getting a certificate") {
		t.Fatalf("the agent failed to get its certificate from B:\n%s", agent.String())
	}
	if n := door.count(a.Addr); n == 0 {
		t.Fatalf("the balancer sent none of the agent's proxy connections to A")
	}
	if strings.Contains(a.log.String(), "/acme/tp-reverse/") {
		t.Fatalf("the agent's ACME requests reached A; the balancer should have sent them to B")
	}

	t.Run("split-requests", func(t *testing.T) {
		c, err := clients.Open(clients.Home{Dir: aliceHome})
		if err != nil {
			t.Fatal(err)
		}
		key, err := c.Home.DeviceKey()
		if err != nil {
			t.Fatal(err)
		}
		hc := login.HTTPClient(c.Root)
		tr := hc.Transport.(*http.Transport)
		tr.DisableKeepAlives, tr.ForceAttemptHTTP2 = true, false
		var mu sync.Mutex
		next := 0
		tr.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
			mu.Lock()
			to := []string{a.Addr, b.Addr}[next%2]
			next++
			mu.Unlock()
			var d net.Dialer
			return d.DialContext(ctx, network, to)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		creds, err := login.ReverseCertificate(ctx, hc, a.URL, c.Profile.DeviceID, key, "files.rev.tp.internal")
		if err != nil {
			t.Fatalf("ACME with its requests spread over A and B: %v", err)
		}
		if got := creds.Chain[0].DNSNames; !slices.Equal(got, []string{"files.rev.tp.internal"}) {
			t.Fatalf("certificate for %v; want files.rev.tp.internal", got)
		}
		if next < 6 {
			t.Fatalf("the flow made %d connections; want one per request, alternating", next)
		}
	})
}
