package proxy

// Reverse HTTP names across instances (docs/SCALE.md, "Peering"): a request
// for LABEL.<zone>, exposed with `tp expose --http` on instance A, that reaches
// instance B's website is proxied by B (its website, with its bounds and
// access log) through PeerHTTP's round-tripper: one peer connection per
// request, opened with net "http" and the route's epoch. A checks the epoch
// and that its tunnels still hold the name, then reads one HTTP/1.1 request
// from the peer connection, sends it down the name's tunnels as a request to
// its own website would go, and writes the response back; the connection then
// closes, unless the request is an Upgrade (WebSocket) that the app answers
// with 101: then the peer connection becomes the upgraded byte stream, both
// ways, until either end closes it. A devices-only name is enforced on A from
// the dialer's device as B verified it (PeerOpen.Header.PeerID); B knows the
// name is devices-only from its route (the claim recorded it in the shared
// store: reverse.AccessHoldStore), so its own handshake asks for the device
// certificate.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/tp-proxy/tp/proxy/wire"
)

// peerHTTPHeaderMax bounds the request head A reads from a peer connection.
const peerHTTPHeaderMax = 1 << 20

// PeerHTTP returns the round-tripper for a reverse HTTP name that another
// instance serves now (host as in ReverseHTTP), and whether its exposer opened
// it to enrolled devices only; ok is false when no other instance serves it.
// device tells the device ID ("user@device") of a request's verified device
// certificate, "" when it has none; the serving instance enforces a
// devices-only name with it.
func (s *Server) PeerHTTP(ctx context.Context, host string, device func(*http.Request) string) (rt http.RoundTripper, devicesOnly, ok bool) {
	if s.peers == nil || s.rev == nil {
		return nil, false, false
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	label, ok := s.rev.Name(host)
	if !ok {
		return nil, false, false
	}
	route, ok, herr := s.peerRoute(ctx, host)
	if herr != nil || !ok {
		return nil, false, false
	}
	return &peerRoundTripper{s: s, host: host, label: label, route: route, device: device}, route.DevicesOnly, true
}

type peerRoundTripper struct {
	s           *Server
	host, label string
	route       PeerRoute
	device      func(*http.Request) string
}

func (rt *peerRoundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	closeBody := func() {
		if req.Body != nil {
			_ = req.Body.Close()
		}
	}
	hdr := wire.SessionHeader{V: wire.Version, Session: newSessionID(), Name: rt.label, Net: wire.NetHTTP}
	if rt.device != nil {
		hdr.PeerID = rt.device(req)
	}
	conn, _, herr := rt.s.forwardTo(req.Context(), rt.route, rt.host, hdr)
	if herr != nil {
		closeBody()
		return nil, fmt.Errorf("the TP server instance %s that serves %s: %s", rt.route.Instance, rt.host, herr.Reason)
	}
	return peerExchange(req, conn, fmt.Sprintf("the TP server instance %s that serves %s", rt.route.Instance, rt.host))
}

// peerExchange sends req on conn, a peer connection opened for it, and reads
// the response (where names the peer in errors). Until the response's head has
// arrived, the request's context ending aborts conn; then a body's life is its
// reader's: an ordinary body aborts conn if the context ends first, and its
// Close closes conn. A 101's upgraded stream ends cleanly (Close: a
// half-close) when it is closed or when the request's context ends: the
// context ends as soon as the handler that relays it returns, which may be
// just before it closes the stream, and a clean end must not turn into a
// reset there; and a relay that gives up on the stream without closing it
// (httputil.ReverseProxy, for a 101 it refuses) must not leave it open. A 101
// whose Upgrade is not the one asked for is refused here, with an abort.
func peerExchange(req *http.Request, conn net.Conn, where string) (*http.Response, error) {
	stop := context.AfterFunc(req.Context(), func() { wire.Abort(conn, wire.QUICPeerReset) })
	out := req.Clone(req.Context())
	upgrade := isUpgrade(req.Header)
	out.Close = !upgrade // one request per peer connection; an Upgrade keeps its Connection: upgrade
	if err := out.Write(conn); err != nil {
		stop()
		wire.Abort(conn, wire.QUICPeerReset)
		return nil, fmt.Errorf("sending the request to %s: %w", where, err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err == nil && resp.StatusCode == http.StatusSwitchingProtocols {
		switch got, asked := resp.Header.Get("Upgrade"), req.Header.Get("Upgrade"); {
		case !upgrade:
			err = errors.New("101 Switching Protocols to a request that asked for no upgrade")
		case !strings.EqualFold(got, asked) || !isPrintableASCII(got):
			// The relay would answer 502 and never close the stream.
			err = fmt.Errorf("101 Switching Protocols to %q for a request that asked for %q", got, asked)
		}
	}
	if err != nil {
		stop()
		wire.Abort(conn, wire.QUICPeerReset)
		return nil, fmt.Errorf("reading the response of %s: %w", where, err)
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		if !stop() {
			wire.Abort(conn, wire.QUICPeerReset) // the context ended as the head arrived
			return nil, fmt.Errorf("reading the response of %s: %w", where, context.Cause(req.Context()))
		}
		// The peer connection is the upgraded stream now: what A sent after
		// the 101 is in br; a Write goes to A (httputil.ReverseProxy copies
		// both ways and closes it when either ends). The request's context
		// ending closes it too, cleanly, in case the relay gave up on it
		// without closing it.
		u := &peerUpgraded{peerBody: peerBody{ReadCloser: io.NopCloser(br), conn: conn}}
		set := make(chan struct{})
		u.stop = context.AfterFunc(req.Context(), func() {
			<-set // u.stop is assigned
			_ = u.Close()
		})
		close(set)
		resp.Body = u
		return resp, nil
	}
	resp.Body = &peerBody{ReadCloser: resp.Body, conn: conn, stop: stop}
	return resp, nil
}

// isUpgrade reports whether a request asks to switch protocols (Connection:
// upgrade and an Upgrade header, as a WebSocket handshake does).
func isUpgrade(h http.Header) bool {
	return h.Get("Upgrade") != "" && httpguts.HeaderValuesContainsToken(h["Connection"], "upgrade")
}

// peerUpgraded is a 101's body on B: the peer connection, both ways.
type peerUpgraded struct {
	peerBody
	once sync.Once
	err  error
}

func (u *peerUpgraded) Write(p []byte) (int, error) { return u.conn.Write(p) }

// peerCloseLinger is how long B keeps an upgraded stream's connection open
// after its half-close.
const peerCloseLinger = 2 * time.Second

// Close ends B's side of the upgraded stream with a half-close, so that A
// reads its end, and closes the connection peerCloseLinger later. Closed at
// once with bytes from A still unread, the connection would be reset, and A
// could read the reset before the end: a stream both sides closed cleanly
// would be taken for a cut.
func (u *peerUpgraded) Close() error {
	u.once.Do(func() {
		u.stop()
		cw, ok := u.conn.(interface{ CloseWrite() error })
		if !ok {
			u.err = u.conn.Close()
			return
		}
		u.err = cw.CloseWrite()
		time.AfterFunc(peerCloseLinger, func() { _ = u.conn.Close() })
	})
	return u.err
}

// isPrintableASCII reports whether s is printable ASCII, as
// httputil.ReverseProxy requires of a 101's Upgrade.
func isPrintableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

var _ io.ReadWriteCloser = (*peerUpgraded)(nil)

// peerBody closes the peer connection with the response's body.
type peerBody struct {
	io.ReadCloser
	conn net.Conn
	stop func() bool
}

func (b *peerBody) Close() error {
	b.stop()
	err := b.ReadCloser.Close()
	_ = b.conn.Close()
	return err
}

// servePeerHTTP serves one request for a reverse HTTP name on a peer
// connection (see the file comment), or refuses the open.
func (s *Server) servePeerHTTP(ctx context.Context, conn wire.Stream, op wire.PeerOpen, peer string) {
	start := time.Now()
	r := s.rev
	herr := func() *wire.HelloError {
		if r == nil {
			return wire.Errorf(wire.CodeReverseUnknown, "this TP server instance serves no reverse names")
		}
		if label, ok := r.Name(op.Key); !ok || label != op.Header.Name {
			return wire.Errorf(wire.CodeBadRequest, "peer open for %s names label %q", op.Key, op.Header.Name)
		}
		if a, _ := r.LookupEpoch(op.Key, op.Epoch); a == nil || r.tunnels.holder(op.Key) == nil {
			return wire.Errorf(wire.CodeReverseOffline, "the TP server instance that served %s no longer serves it at epoch %d (its tunnels moved or reconnect, or its lease ran out); try again in a few seconds", op.Key, op.Epoch)
		}
		return nil
	}()
	if herr != nil {
		s.stats.peerIn(false)
		s.refuse(conn, herr)
		s.log.Info("peer session refused", "peer", peer, "name", op.Key, "epoch", op.Epoch, "code", herr.Code, "reason", herr.Reason)
		return
	}
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := wire.WriteServerHello(conn, wire.ServerHello{V: wire.Version, OK: true}); err != nil {
		_ = conn.Close()
		return
	}
	s.stats.peerIn(true)
	s.stats.peerActive[peerDirIn].Add(1)
	defer s.stats.peerActive[peerDirIn].Add(-1)
	status, end := 0, "closed"
	defer func() {
		s.log.Info("peer session", "peer", peer, "name", op.Key, "epoch", op.Epoch, "dialer", op.Header.PeerID,
			"http_status", status, "duration", time.Since(start), "end", end)
	}()
	// The request head within the dial timeout; its body and the response as
	// long as they flow (the forwarding instance bounds them).
	_ = conn.SetDeadline(time.Now().Add(s.lim().DialTimeout))
	head := &headLimit{r: conn, n: peerHTTPHeaderMax}
	br := bufio.NewReaderSize(head, 64<<10)
	req, err := http.ReadRequest(br)
	if err != nil {
		end = "reading the request: " + err.Error()
		wire.Abort(conn, wire.QUICPeerReset)
		return
	}
	head.n = -1 // the body: as long as it flows
	_ = conn.SetDeadline(time.Time{})
	var resp *http.Response
	rt, ok := s.ReverseHTTP(op.Key)
	if !ok {
		end = "no reverse tunnel serves it any more"
		wire.Abort(conn, wire.QUICPeerReset)
		return
	}
	// The access checked is the one rt sends requests to tunnels with.
	if rt.(*reverseRoundTripper).DevicesOnly() && op.Header.PeerID == "" {
		msg := fmt.Sprintf("403 Forbidden: %s is open to enrolled devices only; connect with a device certificate (tp).\n", op.Key)
		resp = &http.Response{StatusCode: http.StatusForbidden, ProtoMajor: 1, ProtoMinor: 1, ContentLength: int64(len(msg)),
			Header: http.Header{"Content-Type": {"text/plain; charset=utf-8"}}, Body: io.NopCloser(strings.NewReader(msg))}
	} else {
		rctx, cancel := context.WithCancel(ctx)
		defer cancel()
		if resp, err = rt.RoundTrip(req.WithContext(rctx)); err != nil {
			end = "the tunnel: " + err.Error()
			wire.Abort(conn, wire.QUICPeerReset)
			return
		}
	}
	defer resp.Body.Close()
	status = resp.StatusCode
	if status == http.StatusSwitchingProtocols {
		end = s.peerUpgrade(ctx, conn, br, req, resp)
		return
	}
	resp.Close = true
	if err := resp.Write(conn); err != nil {
		end = "writing the response: " + err.Error()
		wire.Abort(conn, wire.QUICPeerReset) // cut short: B's reader sees a failure, never a short body
		return
	}
	_ = conn.CloseWrite()
	_ = conn.Close()
}

// peerUpgradeLinger bounds how long B's side of an upgraded stream may go on
// after the app's side ended cleanly; then the stream is closed.
const peerUpgradeLinger = 30 * time.Second

// peerUpgrade relays a 101's upgraded stream (WebSocket) between the peer
// connection (br holds what B sent after the request) and the tunnel's, and
// says how it ended. A reverse tunnel cannot be half-closed, so either side's
// clean end closes the stream: B's (it closed the peer connection) closes the
// tunnel at once; the app's is passed on as a half-close (close_notify), and
// B's side then gets peerUpgradeLinger to finish. An end in error on either
// side first aborts the peer connection (a TCP reset), so B's side sees a
// failure, never a clean end; so does this instance's forced shutdown (ctx).
func (s *Server) peerUpgrade(ctx context.Context, conn wire.Stream, br *bufio.Reader, req *http.Request, resp *http.Response) string {
	rw, ok := resp.Body.(io.ReadWriter)
	if !isUpgrade(req.Header) || !ok {
		wire.Abort(conn, wire.QUICPeerReset)
		return "the app answered 101 Switching Protocols without an upgraded stream, or to a request that asked for none"
	}
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	bw := bufio.NewWriter(conn)
	fmt.Fprintf(bw, "HTTP/1.1 %s\r\n", resp.Status)
	err := resp.Header.Write(bw)
	if err == nil {
		_, err = bw.WriteString("\r\n")
	}
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		wire.Abort(conn, wire.QUICPeerReset)
		return "writing the 101 response: " + err.Error()
	}
	_ = conn.SetWriteDeadline(time.Time{})
	stop := context.AfterFunc(ctx, func() {
		_ = resp.Body.Close()
		wire.Abort(conn, wire.QUICShutdown)
	})
	defer stop()
	var up, down int64
	upc, downc := make(chan error, 1), make(chan error, 1)
	go func() { // B → app
		n, err := io.Copy(rw, br)
		up = n
		upc <- err
	}()
	go func() { // app → B, then its half-close
		n, err := io.Copy(conn, rw)
		down = n
		if err == nil {
			err = conn.CloseWrite()
		}
		downc <- err
	}()
	ended := func(how string, err error) string {
		if err != nil {
			return fmt.Sprintf("upgraded stream aborted after %d bytes up, %d down (%s): %v", up, down, how, err)
		}
		return fmt.Sprintf("upgraded stream closed after %d bytes up, %d down (%s)", up, down, how)
	}
	select {
	case err := <-upc:
		_ = resp.Body.Close()
		if err != nil {
			wire.Abort(conn, wire.QUICPeerReset)
		}
		<-downc
		_ = conn.Close()
		return ended("by the forwarding instance", err)
	case err := <-downc:
		if err != nil {
			_ = resp.Body.Close()
			wire.Abort(conn, wire.QUICPeerReset)
			<-upc
			return ended("by the app", err)
		}
		t := time.AfterFunc(peerUpgradeLinger, func() { _ = conn.SetReadDeadline(time.Now()) })
		<-upc // whatever B sends now has no app to go to
		t.Stop()
		_ = resp.Body.Close()
		_ = conn.Close()
		return ended("by the app", nil)
	}
}

// headLimit bounds what is read through it to n bytes, until n is set
// negative (no bound); past the bound a read fails.
type headLimit struct {
	r io.Reader
	n int64
}

var errHeadTooLarge = errors.New("the request head exceeds 1 MiB")

func (h *headLimit) Read(p []byte) (int, error) {
	if h.n < 0 {
		return h.r.Read(p)
	}
	if h.n == 0 {
		return 0, errHeadTooLarge
	}
	if int64(len(p)) > h.n {
		p = p[:h.n]
	}
	n, err := h.r.Read(p)
	h.n -= int64(n)
	return n, err
}
