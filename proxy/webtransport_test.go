package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/quicvarint"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// wtSession is a WebTransport session as a browser opens one, spoken by
// hand: the CONNECT stream and the QUIC connection its streams go on.
type wtSession struct {
	conn    *quic.Conn
	connect *http3.RequestStream
	capsule *bufio.Reader
}

// wtProof is the query of a session for cert: the chain, the time and the
// proof, signed for authority at t.
func wtProof(t testing.TB, cert tls.Certificate, authority string, at time.Time) url.Values {
	t.Helper()
	unix := strconv.FormatInt(at.Unix(), 10)
	msg := wire.WebTransportProofMessage(authority, unix, cert.Certificate[0])
	sum := sha256.Sum256(msg)
	r, s, err := ecdsa.Sign(rand.Reader, cert.PrivateKey.(*ecdsa.PrivateKey), sum[:])
	if err != nil {
		t.Fatal(err)
	}
	proof := make([]byte, 64) // r||s, as WebCrypto signs
	r.FillBytes(proof[:32])
	s.FillBytes(proof[32:])
	q := url.Values{}
	for _, der := range cert.Certificate {
		q.Add(wire.WebTransportCert, base64.RawURLEncoding.EncodeToString(der))
	}
	q.Set(wire.WebTransportTime, unix)
	q.Set(wire.WebTransportProof, base64.RawURLEncoding.EncodeToString(proof))
	return q
}

// openWT opens a session on q's website with query; the session is closed
// when the test ends.
func openWT(t testing.TB, q *quicEnv, query url.Values) *wtSession {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tlsCfg := q.clientTLS(nil)
	tlsCfg.NextProtos = []string{http3.NextProtoH3}
	conn, err := quic.DialAddr(ctx, q.udpAddr, tlsCfg, &quic.Config{EnableDatagrams: true})
	if err != nil {
		t.Fatalf("QUIC to the website: %v", err)
	}
	t.Cleanup(func() { _ = conn.CloseWithError(0, "") })
	cc := (&http3.Transport{EnableDatagrams: true}).NewClientConn(conn)
	select {
	case <-cc.ReceivedSettings():
	case <-ctx.Done():
		t.Fatal("no SETTINGS from the server")
	}
	if st := cc.Settings(); !st.EnableExtendedConnect || st.Other[wire.WTSettingEnabled] != 1 {
		t.Fatalf("the server's SETTINGS do not announce WebTransport: %+v", st)
	}
	str, err := cc.OpenRequestStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	u := &url.URL{Scheme: "https", Host: "localhost", Path: wire.WebTransportPath, RawQuery: query.Encode()}
	if err := str.SendRequestHeader(&http.Request{Method: http.MethodConnect, Proto: "webtransport", URL: u, Host: "localhost",
		Header: http.Header{"Origin": {"https://elsewhere.example"}}}); err != nil {
		t.Fatal(err)
	}
	resp, err := str.ReadResponse()
	if err != nil {
		t.Fatalf("the session's CONNECT: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("the session's CONNECT: %s", resp.Status)
	}
	return &wtSession{conn: conn, connect: str, capsule: bufio.NewReader(str)}
}

// stream opens a stream of the session and sends hello on it.
func (s *wtSession) stream(t testing.TB, hello wire.ClientHello) *quic.Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	str, err := s.conn.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = str.SetDeadline(time.Now().Add(20 * time.Second))
	b := quicvarint.Append(nil, wire.WTStreamType)
	b = quicvarint.Append(b, uint64(s.connect.StreamID()))
	if _, err := str.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := wire.WriteClientHello(str, hello); err != nil {
		t.Fatal(err)
	}
	return str
}

// closed reads the session's CLOSE_WEBTRANSPORT_SESSION.
func (s *wtSession) closed(t testing.TB) (uint32, string) {
	t.Helper()
	_ = s.connect.SetReadDeadline(time.Now().Add(20 * time.Second))
	for {
		c, err := wire.ReadIPCapsule(s.capsule)
		if err != nil {
			t.Fatalf("the session ended without CLOSE_WEBTRANSPORT_SESSION: %v", err)
		}
		if c.Type == wire.WTCloseSessionCapsule {
			code, msg, err := wire.WTClose(c.Payload)
			if err != nil {
				t.Fatal(err)
			}
			return code, msg
		}
	}
}

// A browser's session carries TP's requests on its streams: a dial to the
// echo destination round-trips, the policy sees the transport
// "webtransport", and a denied destination's stream gets the policy's
// reason in its server hello, as a tp dial would.
func TestWebTransportDials(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.WebTransport = true
		allow := c.Authorizer
		c.Authorizer = authorizerFunc(func(ctx context.Context, req authz.Request) (authz.Decision, error) {
			if req.Destination.Port == 9 {
				return authz.Decision{Allow: false, Reason: "port 9 is for tests of refusals"}, nil
			}
			return allow.Authorize(ctx, req)
		})
	}, proxy.QUICOptions{})
	s := openWT(t, q, wtProof(t, q.cert, "localhost", time.Now()))

	str := s.stream(t, dialHello(t, q.echo))
	sh, err := wire.ReadServerHello(str)
	if err != nil || !sh.OK {
		t.Fatalf("dial over WebTransport: %+v, %v", sh, err)
	}
	if _, err := io.WriteString(str, "ping over webtransport"); err != nil {
		t.Fatal(err)
	}
	_ = str.Close()
	got, err := io.ReadAll(str)
	if err != nil || string(got) != "ping over webtransport" {
		t.Fatalf("echo over WebTransport: %q, %v", got, err)
	}
	select {
	case tr := <-q.transport:
		if tr != "webtransport" {
			t.Errorf("the policy saw transport %q, want webtransport", tr)
		}
	default:
		t.Error("the policy was not asked about the dial")
	}

	denied := s.stream(t, dialHello(t, "127.0.0.1:9"))
	sh, err = wire.ReadServerHello(denied)
	if err != nil || sh.OK || sh.Code != wire.CodePolicyDenied || !strings.Contains(sh.Reason, "port 9 is for tests of refusals") {
		t.Fatalf("a denied dial over WebTransport: %+v, %v; want policy_denied with the policy's reason", sh, err)
	}
}

// Bad input: a session whose credential is missing, forged, stale, from
// another CA or replayed is opened and closed at once with WTRefused and a
// server hello saying why; the server goes on serving.
func TestWebTransportRefusesBadCredentials(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) { c.WebTransport = true }, proxy.QUICOptions{})
	good := wtProof(t, q.cert, "localhost", time.Now())
	other := testpki.New(t).ClientCert(t, "mallory@laptop", testpki.LeafOptions{})
	forged := wtProof(t, q.cert, "localhost", time.Now())
	forged.Set(wire.WebTransportProof, wtProof(t, other, "localhost", time.Now()).Get(wire.WebTransportProof))
	noCert := wtProof(t, q.cert, "localhost", time.Now())
	noCert.Del(wire.WebTransportCert)
	for _, tc := range []struct {
		what  string
		query url.Values
		says  string
	}{
		{"no certificate", noCert, "carries no certificate"},
		{"a proof by another key", forged, "not the certificate key's signature"},
		{"a proof for another server", wtProof(t, q.cert, "tp.example.com", time.Now()), "not the certificate key's signature"},
		{"a proof ten minutes old", wtProof(t, q.cert, "localhost", time.Now().Add(-10*time.Minute)), "check the device's clock"},
		{"a certificate of another CA", wtProof(t, other, "localhost", time.Now()), "not one of this TP server's device certificates"},
		{"a good proof", good, ""},
		{"the same proof again", good, "used before"},
	} {
		s := openWT(t, q, tc.query)
		if tc.says == "" {
			sh, err := wire.ReadServerHello(s.stream(t, dialHello(t, q.echo)))
			if err != nil || !sh.OK {
				t.Fatalf("%s: dial: %+v, %v", tc.what, sh, err)
			}
			continue
		}
		code, msg := s.closed(t)
		var sh wire.ServerHello
		if code != wire.WTRefused {
			t.Fatalf("%s: session closed with code %#x, want WTRefused", tc.what, code)
		}
		if err := json.Unmarshal([]byte(msg), &sh); err != nil || sh.V != wire.Version || sh.OK {
			t.Errorf("%s: the close message %q is not a refusing server hello: %v", tc.what, msg, err)
		}
		if sh.Code != wire.CodeUnauthenticated || !strings.Contains(msg, tc.says) {
			t.Errorf("%s: closed with %q; want unauthenticated saying %q", tc.what, msg, tc.says)
		}
	}
	q.mustEcho(t)
}

// A session whose identity a re-check refuses (its device revoked) is
// closed with QUICRevoked and a message saying why; the dial it carried is
// cut with it.
func TestWebTransportRevoked(t *testing.T) {
	t.Parallel()
	var revoked atomic.Bool
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.WebTransport = true
		c.Identify = revocable(&revoked)
	}, proxy.QUICOptions{})
	s := openWT(t, q, wtProof(t, q.cert, "localhost", time.Now()))
	str := s.stream(t, dialHello(t, q.echo))
	if sh, err := wire.ReadServerHello(str); err != nil || !sh.OK {
		t.Fatalf("dial: %+v, %v", sh, err)
	}
	// The dial's ok is written before its session is registered for
	// re-checks: wait for both the session and the dial.
	waitUntil(t, 10*time.Second, "the session and its dial to be live", func() bool { return q.srv.Live() == 2 })
	revoked.Store(true)
	if _, closed := q.srv.Recheck(context.Background()); closed < 2 {
		t.Fatalf("Recheck closed %d sessions, want the session and its dial", closed)
	}
	code, msg := s.closed(t)
	if code != uint32(wire.QUICRevoked) || !strings.Contains(msg, "revoked") {
		t.Errorf("a revoked session closed with %#x %q; want QUICRevoked saying revoked", code, msg)
	}
	_, err := io.ReadAll(str)
	var se *quic.StreamError
	if !errors.As(err, &se) {
		t.Errorf("the revoked session's dial ended with %v; want a reset", err)
	}
}

// A UDP flow on a session's stream carries its datagrams as the session's
// HTTP Datagrams, each with the flow id the ok names (PROTOCOL.md 14.2),
// never as bare QUIC DATAGRAM frames of the website's HTTP/3 connection,
// which a browser would read as another request's; a capsule on the stream
// is taken too, as on any flow.
func TestWebTransportUDPFlowOnDatagrams(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) { c.WebTransport = true }, proxy.QUICOptions{})
	s := openWT(t, q, wtProof(t, q.cert, "localhost", time.Now()))
	hello := dialHello(t, testnet.EchoUDP(t))
	hello.Net = "udp"
	str := s.stream(t, hello)
	sh, err := wire.ReadServerHello(str)
	if err != nil || !sh.OK || sh.Flow == nil || *sh.Flow != uint64(str.StreamID())/4 {
		t.Fatalf("a UDP flow over WebTransport: %+v, %v; want ok with the stream's flow id %d", sh, err, str.StreamID()/4)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	prefix := quicvarint.Append(nil, *sh.Flow)
	var got []byte
	for got == nil { // a datagram may be lost: UDP's rule, on loopback too under load
		if err := s.connect.SendDatagram(append(slices.Clone(prefix), "a datagram from a page"...)); err != nil {
			t.Fatal(err)
		}
		rctx, rcancel := context.WithTimeout(ctx, time.Second)
		d, err := s.connect.ReceiveDatagram(rctx)
		rcancel()
		if ctx.Err() != nil {
			t.Fatalf("no datagram back within 20s: %v", err)
		}
		if err == nil {
			got = d
		}
	}
	if !bytes.Equal(got, append(slices.Clone(prefix), "a datagram from a page"...)) {
		t.Fatalf("the echo's datagram: %q; want the flow id, then the payload", got)
	}
	if err := wire.WriteCapsule(str, wire.CapsuleDatagram, []byte("a capsule from a page")); err != nil {
		t.Fatal(err)
	}
	d, err := s.connect.ReceiveDatagram(ctx) // the echo's answer comes back as a datagram
	if err != nil || !bytes.Equal(d, append(slices.Clone(prefix), "a capsule from a page"...)) {
		t.Fatalf("the echo of a capsule: %q, %v", d, err)
	}
}

// wsAuthority is the website's authority as a browser names it, localhost:PORT.
func wsAuthority(q *quicEnv) string {
	_, port, _ := net.SplitHostPort(q.addr)
	return "localhost:" + port
}

// openWS opens a request's WebSocket on q's website with query.
func openWS(t testing.TB, q *quicEnv, query url.Values) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: q.clientTLS(nil)}}
	u := url.URL{Scheme: "wss", Host: wsAuthority(q), Path: wire.WebSocketPath, RawQuery: query.Encode()}
	c, _, err := websocket.Dial(ctx, u.String(), &websocket.DialOptions{HTTPClient: hc})
	if err != nil {
		t.Fatalf("WebSocket to the website: %v", err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c
}

// A browser without WebTransport sends each request on a WebSocket of its
// own (PROTOCOL.md 14.4): binary messages carry the bytes, an empty one
// ends a direction; a refused credential gets a refusing server hello; a
// re-check that revokes the device closes the request's WebSocket with
// 4000 + revoked.
func TestWebSocketRequests(t *testing.T) {
	t.Parallel()
	var revoked atomic.Bool
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.WebTransport = true
		c.Identify = revocable(&revoked)
	}, proxy.QUICOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var hello bytes.Buffer
	send := func(c *websocket.Conn, b []byte) {
		t.Helper()
		if err := c.Write(ctx, websocket.MessageBinary, b); err != nil {
			t.Fatal(err)
		}
	}
	read := func(c *websocket.Conn) []byte {
		t.Helper()
		_, b, err := c.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	serverHello := func(c *websocket.Conn) wire.ServerHello {
		t.Helper()
		sh, err := wire.ReadServerHello(bytes.NewReader(read(c)))
		if err != nil {
			t.Fatal(err)
		}
		return sh
	}

	c := openWS(t, q, wtProof(t, q.cert, wsAuthority(q), time.Now()))
	_ = wire.WriteClientHello(&hello, dialHello(t, q.echo))
	send(c, hello.Bytes())
	if sh := serverHello(c); !sh.OK {
		t.Fatalf("a dial over a WebSocket: %+v", sh)
	}
	send(c, []byte("ping over a websocket"))
	send(c, nil) // FIN: the echo then ends its side too
	if got := read(c); string(got) != "ping over a websocket" {
		t.Fatalf("the echo: %q", got)
	}
	if fin := read(c); len(fin) != 0 {
		t.Fatalf("after the echo's end: %q, want the empty message of a FIN", fin)
	}

	bad := openWS(t, q, wtProof(t, q.cert, "tp.example.com", time.Now())) // a proof for another server
	send(bad, hello.Bytes())
	if sh := serverHello(bad); sh.OK || sh.Code != wire.CodeUnauthenticated || !strings.Contains(sh.Reason, "not the certificate key's signature") {
		t.Fatalf("a request with a proof for another server: %+v", sh)
	}

	cut := openWS(t, q, wtProof(t, q.cert, wsAuthority(q), time.Now()))
	send(cut, hello.Bytes())
	if sh := serverHello(cut); !sh.OK {
		t.Fatalf("a dial over a WebSocket: %+v", sh)
	}
	// The dial's ok is written before its session is registered for
	// re-checks: wait for it.
	waitUntil(t, 10*time.Second, "the WebSocket's dial to be live", func() bool { return q.srv.Live() == 1 })
	revoked.Store(true)
	if _, closed := q.srv.Recheck(context.Background()); closed != 1 {
		t.Fatalf("Recheck closed %d sessions, want the WebSocket's", closed)
	}
	_, _, err := cut.Read(ctx)
	if st := websocket.CloseStatus(err); st != wire.WSAbortBase+websocket.StatusCode(wire.QUICRevoked) {
		t.Fatalf("the revoked request's WebSocket ended with %v (status %d), want %d", err, st, wire.WSAbortBase+int(wire.QUICRevoked))
	}
}

// Bad input: a proof replayed in another encoding (ASN.1 instead of r||s)
// or as (r, n−s), the other valid signature of the same r, is the proof
// used before: the replay check counts the signature's r, not its bytes.
func TestWebTransportRefusesAProofReencoded(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) { c.WebTransport = true }, proxy.QUICOptions{})
	good := wtProof(t, q.cert, "localhost", time.Now())
	if sh, err := wire.ReadServerHello(openWT(t, q, good).stream(t, dialHello(t, q.echo))); err != nil || !sh.OK {
		t.Fatalf("the first session: %+v, %v", sh, err)
	}
	raw, _ := base64.RawURLEncoding.DecodeString(good.Get(wire.WebTransportProof))
	r, s := new(big.Int).SetBytes(raw[:32]), new(big.Int).SetBytes(raw[32:])
	der, _ := asn1.Marshal(struct{ R, S *big.Int }{r, s})
	flipped := make([]byte, 64)
	r.FillBytes(flipped[:32])
	new(big.Int).Sub(elliptic.P256().Params().N, s).FillBytes(flipped[32:])
	for what, p := range map[string][]byte{"as ASN.1": der, "as (r, n-s)": flipped} {
		replay := url.Values{}
		for k, v := range good {
			replay[k] = slices.Clone(v)
		}
		replay.Set(wire.WebTransportProof, base64.RawURLEncoding.EncodeToString(p))
		if code, msg := openWT(t, q, replay).closed(t); code != wire.WTRefused || !strings.Contains(msg, "used before") {
			t.Errorf("the proof replayed %s: closed with %#x %q; want it refused as used before", what, code, msg)
		}
	}
}

// Bad input: streams sent ahead of a CONNECT that is refused are reset
// once their wait ends; they hold nothing (not the connection's stream
// credit) after.
func TestWebTransportStreamsOfARefusedSessionAreReset(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) { c.WebTransport = true }, proxy.QUICOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tlsCfg := q.clientTLS(nil)
	tlsCfg.NextProtos = []string{http3.NextProtoH3}
	conn, err := quic.DialAddr(ctx, q.udpAddr, tlsCfg, &quic.Config{EnableDatagrams: true})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	cc := (&http3.Transport{EnableDatagrams: true}).NewClientConn(conn)
	<-cc.ReceivedSettings()
	early, err := conn.OpenStreamSync(ctx) // stream 0, for the session of stream 4
	if err != nil {
		t.Fatal(err)
	}
	if _, err := early.Write(quicvarint.Append(quicvarint.Append(nil, wire.WTStreamType), 4)); err != nil {
		t.Fatal(err)
	}
	str, err := cc.OpenRequestStream(ctx) // stream 4: a CONNECT without a credential
	if err != nil || str.StreamID() != 4 {
		t.Fatalf("the CONNECT's stream: %v, %d", err, str.StreamID())
	}
	u := &url.URL{Scheme: "https", Host: "localhost", Path: wire.WebTransportPath, RawQuery: "cert=AA"}
	if err := str.SendRequestHeader(&http.Request{Method: http.MethodConnect, Proto: "webtransport", URL: u, Host: "localhost", Header: http.Header{}}); err != nil {
		t.Fatal(err)
	}
	if resp, err := str.ReadResponse(); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("the CONNECT: %v, %v", resp, err)
	}
	_ = early.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err = early.Read(make([]byte, 1))
	var se *quic.StreamError
	if !errors.As(err, &se) || se.ErrorCode != wire.WTBufferedStreamRejected {
		t.Fatalf("the stream of a refused session: %v; want it reset with WT_BUFFERED_STREAM_REJECTED", err)
	}
}

// A request over a WebSocket is a session as any: a shutdown waits for it
// to end, and one cut short (its context ending) cuts it.
func TestWebSocketRequestsAreDrainedAndCut(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) { c.WebTransport = true }, proxy.QUICOptions{})
	c := openWS(t, q, wtProof(t, q.cert, wsAuthority(q), time.Now()))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var hello bytes.Buffer
	_ = wire.WriteClientHello(&hello, dialHello(t, q.echo))
	if err := c.Write(ctx, websocket.MessageBinary, hello.Bytes()); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Read(ctx); err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer scancel()
	if err := q.srv.Shutdown(sctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown with a WebSocket request open: %v; want it to wait for the request until its context ended", err)
	}
	_, _, err := c.Read(ctx)
	if st := websocket.CloseStatus(err); st != wire.WSAbortBase+websocket.StatusCode(wire.QUICShutdown) {
		t.Errorf("the request cut by the shutdown: %v (status %d); want %d", err, st, wire.WSAbortBase+int(wire.QUICShutdown))
	}
}

// Bad input: a WebSocket that drops without a close frame, or closes
// before its end of stream, is an abort for the destination, never a
// clean end: an upload cut short must not look complete.
func TestWebSocketDropIsAnAbort(t *testing.T) {
	t.Parallel()
	q := newQUICEnv(t, func(c *proxy.Config) { c.WebTransport = true }, proxy.QUICOptions{})
	for _, how := range []string{"dropped", "closed normally before its end"} {
		got := make(chan error, 1)
		dest := testnet.Serve(t, func(c *net.TCPConn) {
			_, err := io.ReadAll(c)
			got <- err
		})
		c := openWS(t, q, wtProof(t, q.cert, wsAuthority(q), time.Now()))
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		var hello bytes.Buffer
		_ = wire.WriteClientHello(&hello, dialHello(t, dest))
		_ = c.Write(ctx, websocket.MessageBinary, hello.Bytes())
		if _, _, err := c.Read(ctx); err != nil {
			t.Fatal(err)
		}
		_ = c.Write(ctx, websocket.MessageBinary, []byte("half an upload"))
		if how == "dropped" {
			_ = c.CloseNow()
		} else {
			_ = c.Close(websocket.StatusNormalClosure, "")
		}
		select {
		case err := <-got:
			if err == nil {
				t.Errorf("a WebSocket %s: the destination saw a clean end", how)
			}
		case <-ctx.Done():
			t.Errorf("a WebSocket %s: the destination saw nothing", how)
		}
		cancel()
	}
}

// revocable is identifyCN until revoked is set, then a revoked identity.
func revocable(revoked *atomic.Bool) func(tls.ConnectionState) (authz.Identity, error) {
	return func(cs tls.ConnectionState) (authz.Identity, error) {
		if revoked.Load() {
			return authz.Identity{}, authz.ErrRevoked
		}
		return identifyCN(cs)
	}
}

// A browser's requests are TP requests in everything but their transport:
// the server's own listener is refused (self_dial, the SSRF rule), a device
// past max-sessions-per-identity is refused (too_many_sessions), and each
// request leaves its audit record with transport "webtransport".
func TestWebTransportRequestsKeepTPsRules(t *testing.T) {
	t.Parallel()
	records := make(chan proxy.SessionRecord, 16)
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.WebTransport = true
		c.MaxSessionsPerIdentity = 1
		c.OnSessionEnd = func(r proxy.SessionRecord) { records <- r }
	}, proxy.QUICOptions{})
	s := openWT(t, q, wtProof(t, q.cert, "localhost", time.Now()))

	held := s.stream(t, dialHello(t, q.echo))
	if sh, err := wire.ReadServerHello(held); err != nil || !sh.OK {
		t.Fatalf("the one session the device may hold: %+v, %v", sh, err)
	}
	if sh, err := wire.ReadServerHello(s.stream(t, dialHello(t, q.echo))); err != nil || sh.OK || sh.Code != proxy.CodeTooManySessions {
		t.Fatalf("a second session past max-sessions-per-identity 1: %+v, %v; want too_many_sessions", sh, err)
	}
	_ = held.Close()
	held.CancelRead(0)
	// Once both have ended (their records), the slot is free again: the
	// server's own listener is refused for what it is.
	var got []proxy.SessionRecord
	for len(got) < 2 {
		select {
		case r := <-records:
			got = append(got, r)
		case <-time.After(20 * time.Second):
			t.Fatal("no audit records of the two requests within 20s")
		}
	}
	self, err := wire.ReadServerHello(s.stream(t, dialHello(t, q.addr)))
	if err != nil || self.OK || self.Code != wire.CodeSelfDial {
		t.Fatalf("a dial of the server's own listener over WebTransport: %+v, %v; want self_dial", self, err)
	}
	select {
	case r := <-records:
		got = append(got, r)
	case <-time.After(20 * time.Second):
		t.Fatal("no audit record of the self dial within 20s")
	}
	for _, r := range got {
		if r.Transport != "webtransport" || r.Identity != "alice@laptop" {
			t.Errorf("an audit record of a browser's request: transport %q, identity %q", r.Transport, r.Identity)
		}
	}
}
