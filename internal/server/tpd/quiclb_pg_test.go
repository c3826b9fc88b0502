package tpd

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// Two tpd on one database behind one name share their TLS session-ticket keys
// and their QUIC stateless reset key: a ticket A issued resumes on B, and when
// a client's QUIC packets for a connection of A reach B (a load balancer that
// lost track, or A gone), B's stateless reset is accepted by the client at
// once, where a reset with another key would be ignored until the idle timeout.
func TestPGSharedTicketAndResetKeys(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	cfgA := pgDataDir(t, dsn, nil)
	cfgA.QUIC, cfgA.QUICServerID, cfgA.QUICConfigID = true, "0a", 1
	a := runDaemon(t, cfgA)
	cfgB := pgDataDir(t, dsn, &cfgA)
	cfgB.QUIC, cfgB.QUICServerID, cfgB.QUICConfigID = true, "0b", 1
	b := runDaemon(t, cfgB)
	waitLog(t, a, "QUIC connection IDs carry this instance's server ID")

	roots := x509.NewCertPool()
	roots.AddCert(a.d.pki.Root)
	u, err := url.Parse(a.url)
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg := &tls.Config{RootCAs: roots, ServerName: u.Hostname(), ClientSessionCache: tls.NewLRUClientSessionCache(8), NextProtos: []string{"http/1.1"}}
	if resumed := webGet(t, a.addr, tlsCfg); resumed {
		t.Fatal("the first handshake with A resumed a session: the cache was not empty")
	}
	if resumed := webGet(t, b.addr, tlsCfg); !resumed {
		t.Fatal("a session ticket A issued did not resume on B: the instances do not share ticket keys")
	}

	ka, err := a.d.resetKey()
	if err != nil {
		t.Fatal(err)
	}
	kb, err := b.d.resetKey()
	if err != nil || *ka != *kb {
		t.Fatalf("A and B have different QUIC reset keys (%v)", err)
	}

	relay := startSwitchRelay(t, a.addr)
	qcfg := tlsCfg.Clone()
	qcfg.NextProtos = []string{http3.NextProtoH3}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := quic.DialAddr(ctx, relay.addr(), qcfg, &quic.Config{MaxIdleTimeout: time.Minute})
	if err != nil {
		t.Fatalf("QUIC to A through the relay: %v", err)
	}
	defer conn.CloseWithError(0, "")
	// A request over it first: the handshake is then complete on A too (the
	// client's Finished reached A), and the connection is A's.
	cc := (&http3.Transport{}).NewClientConn(conn)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+u.Host+"/readyz", nil)
	resp, err := cc.RoundTrip(req)
	if err != nil {
		t.Fatalf("HTTP/3 request to A: %v", err)
	}
	resp.Body.Close()
	relay.switchTo(t, b.addr) // A's client now reaches B, which does not know its connection
	str, err := conn.OpenUniStream()
	if err == nil {
		_, err = str.Write(bytes.Repeat([]byte{0}, 200)) // a packet big enough to be answered by a reset
	}
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-conn.Context().Done():
	case <-ctx.Done():
		t.Fatal("the client's connection was not reset within 20s of its packets reaching B")
	}
	var sr *quic.StatelessResetError
	if cause := context.Cause(conn.Context()); !errors.As(cause, &sr) {
		t.Fatalf("the client's connection ended with %v, want a stateless reset from B", cause)
	}
}

// webGet fetches /readyz from the website at addr with cfg and says whether
// the handshake resumed a session. Reading the response means the session
// ticket, sent after the handshake, has arrived.
func webGet(t *testing.T, addr string, cfg *tls.Config) bool {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		t.Fatalf("TLS to %s: %v", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := fmt.Fprintf(c, "GET /readyz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", cfg.ServerName); err != nil {
		t.Fatal(err)
	}
	resp, err := io.ReadAll(c)
	if err != nil || !bytes.HasPrefix(resp, []byte("HTTP/1.1 ")) {
		t.Fatalf("GET /readyz on %s: %q, %v", addr, resp, err)
	}
	return c.ConnectionState().DidResume
}

// switchRelay forwards one QUIC client's datagrams to a backend it can switch,
// as a load balancer that sends a connection's packets to another instance.
type switchRelay struct {
	in, out *net.UDPConn
	target  atomic.Pointer[net.UDPAddr]
	mu      sync.Mutex
	client  *net.UDPAddr
}

func startSwitchRelay(t *testing.T, target string) *switchRelay {
	t.Helper()
	r := &switchRelay{}
	var err error
	if r.in, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
		t.Fatal(err)
	}
	if r.out, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.in.Close(); _ = r.out.Close() })
	r.switchTo(t, target)
	go func() {
		buf := make([]byte, 1<<16)
		for {
			n, src, err := r.in.ReadFromUDP(buf)
			if err != nil {
				return
			}
			r.mu.Lock()
			r.client = src
			r.mu.Unlock()
			_, _ = r.out.WriteToUDP(buf[:n], r.target.Load())
		}
	}()
	go func() {
		buf := make([]byte, 1<<16)
		for {
			n, err := r.out.Read(buf)
			if err != nil {
				return
			}
			r.mu.Lock()
			c := r.client
			r.mu.Unlock()
			if c != nil {
				_, _ = r.in.WriteToUDP(buf[:n], c)
			}
		}
	}()
	return r
}

func (r *switchRelay) addr() string { return r.in.LocalAddr().String() }

func (r *switchRelay) switchTo(t *testing.T, target string) {
	a, err := net.ResolveUDPAddr("udp", target)
	if err != nil {
		t.Fatal(err)
	}
	r.target.Store(a)
}

// Without database: the reset key is the data dir's file, as before: the same
// across restarts (a restarted tpd resets its old clients at once), and tickets
// keys are the proxy's own (no key source).
func TestResetKeyFromDataDirWithoutDatabase(t *testing.T) {
	t.Parallel()
	cfg := newDataDir(t, map[string]string{"tp.rego": allowAlice})
	r := runDaemon(t, cfg)
	k1, err := r.d.resetKey()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(cfg.DataDir, resetKeyFile))
	if err != nil || !bytes.Equal(b, k1[:]) {
		t.Fatalf("the reset key is not the data dir's %s (%v)", resetKeyFile, err)
	}
	r.stop()
	r2 := runDaemon(t, cfg)
	k2, err := r2.d.resetKey()
	if err != nil || *k2 != *k1 {
		t.Fatalf("the reset key changed across a restart without a database (%v)", err)
	}
	if r2.d.db != nil {
		t.Fatal("a database is open though database: is not set")
	}
}
