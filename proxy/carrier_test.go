package proxy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// carrierTLS opens a tls carrier connection ("tp-carrier/1") with cert.
func (q *quicEnv) carrierTLS(t *testing.T, cert *tls.Certificate) (*tls.Conn, error) {
	cfg := q.clientTLS(cert)
	cfg.NextProtos = []string{wire.ALPNCarrier}
	c, err := tls.Dial("tcp", q.addr, cfg)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c, nil
}

func (q *quicEnv) carrierWS(t *testing.T) (*websocket.Conn, *http.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: q.clientTLS(nil)}}
	c, resp, err := websocket.Dial(ctx, "https://"+q.addr+wire.CarrierWSPath, &websocket.DialOptions{HTTPClient: hc})
	if err == nil {
		t.Cleanup(func() { _ = c.CloseNow() })
	}
	return c, resp, err
}

func waitCarrierSessions(t *testing.T, srv *proxy.Server, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for srv.CarrierSessions() != n {
		if time.Now().After(deadline) {
			t.Fatalf("carrier sessions: %d, want %d", srv.CarrierSessions(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCarrierTLSRequiresDeviceCert: the tls carrier's handshake asks for the
// device certificate like "tp/1"; without one there is no carrier.
func TestCarrierTLSRequiresDeviceCert(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	c, err := q.carrierTLS(t, nil)
	if err == nil {
		// TLS 1.3: the client learns of the refusal on its first read.
		_, err = c.Read(make([]byte, 1))
	}
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a tls carrier without a device certificate: err = %v, want a certificate alert", err)
	}
	if n := q.srv.CarrierSessions(); n != 0 {
		t.Fatalf("carrier sessions: %d", n)
	}
}

// TestCarrierBadFrames: frames that break the framing end the carrier
// connection, and the session with it: a length of 0, a length beyond
// wire.MaxCarrierPacket (tls); a text message, a message beyond the bound (ws).
// Garbage that is framed right is handed to QUIC, which drops it unanswered.
func TestCarrierBadFrames(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{})
	for name, frame := range map[string][]byte{
		"zero length": {0, 0},
		"oversize":    {0xff, 0xff, 1, 2, 3},
		"just over":   {(wire.MaxCarrierPacket + 1) >> 8, (wire.MaxCarrierPacket + 1) & 0xff},
	} {
		t.Run("tls/"+name, func(t *testing.T) {
			c, err := q.carrierTLS(t, &q.cert)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Write(frame); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Read(make([]byte, 64)); err == nil {
				t.Fatalf("the server answered a bad frame (%s) instead of closing", name)
			}
			waitCarrierSessions(t, q.srv, 0)
		})
	}
	t.Run("ws/text", func(t *testing.T) {
		c, _, err := q.carrierWS(t)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = c.Write(ctx, websocket.MessageText, []byte("not a packet"))
		if _, _, err := c.Read(ctx); err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("a text message: read err = %v, want the connection closed", err)
		}
		waitCarrierSessions(t, q.srv, 0)
	})
	t.Run("ws/oversize", func(t *testing.T) {
		c, _, err := q.carrierWS(t)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = c.Write(ctx, websocket.MessageBinary, make([]byte, wire.MaxCarrierPacket+1))
		if _, _, err := c.Read(ctx); err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("an oversize message: read err = %v, want the connection closed", err)
		}
		waitCarrierSessions(t, q.srv, 0)
	})
	t.Run("framed garbage", func(t *testing.T) {
		c, err := q.carrierTLS(t, &q.cert)
		if err != nil {
			t.Fatal(err)
		}
		garbage := []byte(strings.Repeat("\x40garbage that is no QUIC packet", 10))
		for range 100 {
			if err := wire.WriteCarrierFrame(c, garbage, nil); err != nil {
				t.Fatal(err)
			}
		}
		waitCarrierSessions(t, q.srv, 1)
		// A real client still gets through meanwhile.
		d := q.dialer()
		d.QUICServer, d.Carrier = q.udpAddr, wire.CarrierTLS
		defer d.Close()
		conn, err := d.DialContext(context.Background(), "tcp", q.echo)
		if err != nil {
			t.Fatal(err)
		}
		_ = conn.Close()
	})
}

// TestCarrierTooManySessions: with CarrierOptions.MaxSessions proven sessions
// open (tls carriers: their handshake proved the device), a further tls
// carrier is closed at once and a ws upgrade is answered 503; an unproven
// session (a ws carrier no device's QUIC connection runs over) makes room for a
// new one instead.
func TestCarrierTooManySessions(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{Carriers: proxy.CarrierOptions{MaxSessions: 2}})
	for range 2 {
		if _, err := q.carrierTLS(t, &q.cert); err != nil {
			t.Fatal(err)
		}
	}
	waitCarrierSessions(t, q.srv, 2)
	c, err := q.carrierTLS(t, &q.cert)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("a third tls carrier: read err = %v, want EOF (closed)", err)
	}
	_, resp, err := q.carrierWS(t)
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("a third ws carrier: err = %v, response %v; want 503", err, resp)
	}
	if n := q.srv.CarrierSessions(); n != 2 {
		t.Fatalf("carrier sessions: %d, want 2", n)
	}

	q2 := newQUICEnv(t, nil, proxy.QUICOptions{Carriers: proxy.CarrierOptions{MaxSessions: 2}})
	if _, err := q2.carrierTLS(t, &q2.cert); err != nil {
		t.Fatal(err)
	}
	if _, _, err := q2.carrierWS(t); err != nil {
		t.Fatal(err)
	}
	waitCarrierSessions(t, q2.srv, 2)
	c, err = q2.carrierTLS(t, &q2.cert)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the unproven ws session to make room for a proven tls one", func() bool {
		st := q2.srv.CarrierStats()
		return st.Open[wire.CarrierTLS]["proven"] == 2 && st.Open[wire.CarrierWS]["unproven"] == 0 && st.Ended["full"] == 1
	})
	_ = c.Close()
}

// TestCarrierUnprovenCannotLockOut: nobody without a certificate can take
// the carrier slots from the devices. Bad input: a client with no
// certificate posts empty http-carrier requests, each with a new random
// session ID (before, 1,100 of them on one connection took all 1,024 slots in
// half a second, and one request per ID every minute kept them past the idle
// bound). Unproven sessions are bounded per source, the oldest unproven one
// makes room when the table is full, and one that no device's QUIC
// connection has used within ProveWithin ends; a device's own http carrier
// session, proven by its QUIC handshake, is never the one that goes.
func TestCarrierUnprovenCannotLockOut(t *testing.T) {
	const maxSessions, perSource = 8, 6
	q := newQUICEnv(t, nil, proxy.QUICOptions{Carriers: proxy.CarrierOptions{
		MaxSessions: maxSessions, MaxUnprovenPerSource: perSource, ProveWithin: 2 * time.Second}})
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: q.clientTLS(nil)}, Timeout: 20 * time.Second}
	flood := func(n int) {
		t.Helper()
		for range n {
			id := make([]byte, 16)
			_, _ = rand.Read(id)
			req, err := http.NewRequest(http.MethodPost, "https://"+q.addr+wire.CarrierHTTPPath, nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set(wire.CarrierSessionHeader, hex.EncodeToString(id))
			req.Header.Set(wire.CarrierKeyHeader, carrierKey(t))
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("an unproven http carrier request: status %d; want 200 (its source's oldest unproven session makes room)", resp.StatusCode)
			}
		}
	}
	flood(100)
	if st := q.srv.CarrierStats(); st.Open[wire.CarrierHTTP]["unproven"] > perSource {
		t.Fatalf("one source holds %d unproven http carrier sessions; the bound is %d", st.Open[wire.CarrierHTTP]["unproven"], perSource)
	}

	// A device over the http carrier, while the flood goes on around it.
	d := q.dialer()
	d.QUICServer, d.Carrier = q.udpAddr, wire.CarrierHTTP
	defer d.Close()
	echo := func(what string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		conn, err := d.DialContext(ctx, "tcp", q.echo)
		if err != nil {
			t.Fatalf("%s: a device's dial over the http carrier: %v", what, err)
		}
		defer conn.Close()
		quicEcho(t, conn, what)
	}
	echo("amid the flood")
	waitUntil(t, 10*time.Second, "the device's http carrier session to be proven", func() bool {
		return q.srv.CarrierStats().Open[wire.CarrierHTTP]["proven"] == 1
	})
	flood(100)
	echo("after 100 more unproven sessions")
	if st := q.srv.CarrierStats(); st.Open[wire.CarrierHTTP]["proven"] != 1 {
		t.Fatalf("after the flood: %+v; want the device's proven session still open", st.Open)
	}
	// A tls carrier (proven at its handshake) finds room too.
	tc, err := q.carrierTLS(t, &q.cert)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	waitUntil(t, 10*time.Second, "a tls carrier session to open beside the unproven ones", func() bool {
		return q.srv.CarrierStats().Open[wire.CarrierTLS]["proven"] == 1
	})
	// Unproven sessions end once ProveWithin has passed; the proven stay.
	waitUntil(t, 20*time.Second, "the unproven sessions to end after ProveWithin", func() bool {
		st := q.srv.CarrierStats()
		return st.Open[wire.CarrierHTTP]["unproven"] == 0 && st.Ended["unproven"] > 0
	})
	echo("after the unproven sessions ended")
	st := q.srv.CarrierStats()
	if st.Ended["source_cap"] == 0 || st.Open[wire.CarrierHTTP]["proven"] != 1 {
		t.Fatalf("carrier stats %+v; want sessions ended by the source bound and the device's still open", st)
	}
}

// TestCarrierHTTPBadInput: the http carrier refuses, without opening a
// session, a request without a well-formed session ID (400), a GET (405), a
// body beyond wire.MaxCarrierBody (413) and a body whose framing is broken
// (400); beyond CarrierOptions.MaxSessions a new session takes the place of
// the oldest unproven one.
func TestCarrierHTTPBadInput(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, nil, proxy.QUICOptions{Carriers: proxy.CarrierOptions{MaxSessions: 1}})
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: q.clientTLS(nil)}, Timeout: 20 * time.Second}
	post := func(method, id string, body []byte) int {
		t.Helper()
		req, err := http.NewRequest(method, "https://"+q.addr+wire.CarrierHTTPPath, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if id != "" {
			req.Header.Set(wire.CarrierSessionHeader, id)
			req.Header.Set(wire.CarrierKeyHeader, carrierKey(t)) // each opens a session
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	good := strings.Repeat("ab", 16)
	for _, c := range []struct {
		what   string
		method string
		id     string
		body   []byte
		want   int
	}{
		{"no session ID", http.MethodPost, "", nil, http.StatusBadRequest},
		{"a session ID that is not 32 hex digits", http.MethodPost, "../../etc", nil, http.StatusBadRequest},
		{"upper-case hex", http.MethodPost, strings.ToUpper(good), nil, http.StatusBadRequest},
		{"a GET", http.MethodGet, good, nil, http.StatusMethodNotAllowed},
		{"a body beyond the bound", http.MethodPost, good, make([]byte, wire.MaxCarrierBody+1), http.StatusRequestEntityTooLarge},
		{"a frame of length 0", http.MethodPost, good, []byte{0, 0}, http.StatusBadRequest},
		{"a frame longer than the bound", http.MethodPost, good, []byte{0xff, 0xff, 1}, http.StatusBadRequest},
		{"a truncated frame", http.MethodPost, good, []byte{0, 10, 1, 2}, http.StatusBadRequest},
	} {
		if got := post(c.method, c.id, c.body); got != c.want {
			t.Errorf("%s: status %d, want %d", c.what, got, c.want)
		}
	}
	if n := q.srv.CarrierSessions(); n != 0 {
		t.Fatalf("bad requests opened %d carrier sessions", n)
	}
	// Framed garbage opens a session (QUIC drops the packets); the bound holds.
	if got := post(http.MethodPost, good, []byte{0, 3, 'a', 'b', 'c'}); got != http.StatusOK {
		t.Fatalf("framed garbage: status %d, want 200", got)
	}
	// Another session with the table full: the first, unproven (no
	// device's QUIC connection ran over it), makes room.
	if got := post(http.MethodPost, strings.Repeat("cd", 16), nil); got != http.StatusOK {
		t.Fatalf("a session beyond MaxSessions with an unproven one open: status %d, want 200", got)
	}
	if n := q.srv.CarrierSessions(); n != 1 {
		t.Fatalf("carrier sessions: %d, want 1", n)
	}
}

// TestCarrierReverse: an agent whose QUIC connection rides each carrier
// serves a protected name (dialed by a client over the same carrier, end to
// end TLS through the relay) and a public port (plain TCP from anyone).
func TestCarrierReverse(t *testing.T) {
	t.Parallel()
	for _, carrier := range []string{wire.CarrierUDP, wire.CarrierTLS, wire.CarrierWS, wire.CarrierHTTP} {
		t.Run(carrier, func(t *testing.T) {
			q := newQUICEnv(t, func(c *proxy.Config) {
				c.Reverse = proxy.ReverseOptions{Zone: "rev.test", PublicHost: "127.0.0.1",
					PublicPorts: func(string, int) bool { return true }}
			}, proxy.QUICOptions{})
			port := testnet.FreePort(t, "tcp")
			upper := testnet.Upper(t)
			agentCert := q.ca.ServerCert(t, "svc.rev.test")
			ad := q.dialer()
			ad.Transport, ad.Carrier = clients.TransportQUIC, carrier
			registered := make(chan struct{}, 1)
			a := &clients.Agent{
				Dialer:      ad,
				Exposed:     []clients.Exposed{{Name: "svc", Local: upper}, {Name: "pub", Local: upper, PublicPort: port}},
				AllowUsers:  []string{"alice"},
				Certificate: func(context.Context, string) (*tls.Certificate, error) { return &agentCert, nil },
				Registered:  func([]string) { notify(registered) },
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- a.Run(ctx); ad.Close() }()
			t.Cleanup(func() {
				cancel()
				select {
				case <-done:
				case <-time.After(30 * time.Second):
					t.Errorf("the agent over %s did not end within 30s of being told to stop", carrier)
				}
			})
			select {
			case <-registered:
			case err := <-done:
				t.Fatalf("agent over %s: %v", carrier, err)
			case <-time.After(30 * time.Second):
				t.Fatalf("the agent over %s did not register", carrier)
			}
			if carrier != wire.CarrierUDP && q.srv.CarrierSessions() == 0 {
				t.Fatalf("the agent has no %s carrier session", carrier)
			}
			roundTrip := func(c net.Conn, msg string) {
				t.Helper()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(20 * time.Second))
				if _, err := io.WriteString(c, msg); err != nil {
					t.Fatal(err)
				}
				_ = c.(interface{ CloseWrite() error }).CloseWrite()
				got, err := io.ReadAll(c)
				if err != nil || string(got) != strings.ToUpper(msg) {
					t.Fatalf("reply %q (%v), want %q", got, err, strings.ToUpper(msg))
				}
			}
			d := q.dialer()
			d.Transport, d.Carrier = clients.TransportQUIC, carrier
			defer d.Close()
			c, err := d.DialContext(context.Background(), "tcp", "svc.rev.test:22")
			if err != nil {
				t.Fatal(err)
			}
			roundTrip(c, "protected over "+carrier)
			pc, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
			if err != nil {
				t.Fatal(err)
			}
			roundTrip(pc, "public over "+carrier)
		})
	}
}

// TestCarrierPolicySource: a request over a carrier reaches the policy with
// the address the carrier connection came from, not the session's virtual one.
func TestCarrierPolicySource(t *testing.T) {
	t.Parallel()
	sources := make(chan string, 8)
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			select {
			case sources <- req.Source.Address:
			default:
			}
			return allowAll(ctx, req)
		})
	}, proxy.QUICOptions{})
	d := q.dialer()
	d.Carrier = wire.CarrierWS
	defer d.Close()
	c, err := d.DialContext(context.Background(), "tcp", q.echo)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.Close()
	src := <-sources
	host, _, err := net.SplitHostPort(src)
	if err != nil || host != "127.0.0.1" {
		t.Fatalf("policy source %q, want 127.0.0.1:PORT (the WebSocket's peer)", src)
	}
}

// carrierKey is the Tp-Carrier-Key of a new http carrier session's opening request.
func carrierKey(t testing.TB) string {
	t.Helper()
	_, pub, err := wire.NewCarrierKey()
	if err != nil {
		t.Fatal(err)
	}
	return pub
}
