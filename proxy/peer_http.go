package proxy

// Reverse HTTP names across instances (docs/SCALE.md, "Peering"): a request
// for LABEL.<zone>, exposed with `tp expose --http` on instance A, that reaches
// instance B's website is proxied by B (its website, with its bounds and
// access log) through PeerHTTP's round-tripper: one peer connection per
// request, opened with net "http" and the route's epoch. A checks the epoch
// and that its tunnels still hold the name, then reads one HTTP/1.1 request
// from the peer connection, sends it down the name's tunnels as a request to
// its own website would go, and writes the response back; the connection then
// closes. A devices-only name is enforced on A from the dialer's device as B
// verified it (PeerOpen.Header.PeerID).

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// peerHTTPHeaderMax bounds the request head A reads from a peer connection.
const peerHTTPHeaderMax = 1 << 20

// PeerHTTP returns the round-tripper for a reverse HTTP name that another
// instance serves now (host as in ReverseHTTP), or false when none does.
// device tells the device ID ("user@device") of a request's verified device
// certificate, "" when it has none; the serving instance enforces a
// devices-only name with it.
func (s *Server) PeerHTTP(ctx context.Context, host string, device func(*http.Request) string) (http.RoundTripper, bool) {
	if s.peers == nil || s.rev == nil {
		return nil, false
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	label, ok := s.rev.name(host)
	if !ok {
		return nil, false
	}
	route, ok, herr := s.peerRoute(ctx, host)
	if herr != nil || !ok {
		return nil, false
	}
	return &peerRoundTripper{s: s, host: host, label: label, route: route, device: device}, true
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
	stop := context.AfterFunc(req.Context(), func() { wire.Abort(conn, wire.QUICPeerReset) })
	out := req.Clone(req.Context())
	out.Close = true // one request per peer connection
	if err := out.Write(conn); err != nil {
		stop()
		wire.Abort(conn, wire.QUICPeerReset)
		return nil, fmt.Errorf("sending the request to the TP server instance %s that serves %s: %w", rt.route.Instance, rt.host, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		stop()
		wire.Abort(conn, wire.QUICPeerReset)
		return nil, fmt.Errorf("reading the response of the TP server instance %s that serves %s: %w", rt.route.Instance, rt.host, err)
	}
	resp.Body = &peerBody{ReadCloser: resp.Body, conn: conn, stop: stop}
	return resp, nil
}

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
		if label, ok := r.name(op.Key); !ok || label != op.Header.Name {
			return wire.Errorf(wire.CodeBadRequest, "peer open for %s names label %q", op.Key, op.Header.Name)
		}
		r.mu.Lock()
		e := r.names[op.Key]
		ok := e != nil && e.agent != nil && e.epoch == op.Epoch && r.currentLocked(op.Key, e, time.Now())
		r.mu.Unlock()
		if !ok || r.tunnels.holder(op.Key) == nil {
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
	req, err := http.ReadRequest(bufio.NewReaderSize(head, 64<<10))
	if err != nil {
		end = "reading the request: " + err.Error()
		wire.Abort(conn, wire.QUICPeerReset)
		return
	}
	head.n = -1 // the body: as long as it flows
	_ = conn.SetDeadline(time.Time{})
	var resp *http.Response
	if s.ReverseHTTPDevicesOnly(op.Key) && op.Header.PeerID == "" {
		msg := fmt.Sprintf("403 Forbidden: %s is open to enrolled devices only; connect with a device certificate (tp).\n", op.Key)
		resp = &http.Response{StatusCode: http.StatusForbidden, ProtoMajor: 1, ProtoMinor: 1, ContentLength: int64(len(msg)),
			Header: http.Header{"Content-Type": {"text/plain; charset=utf-8"}}, Body: io.NopCloser(strings.NewReader(msg))}
	} else {
		rt, ok := s.ReverseHTTP(op.Key)
		if !ok {
			end = "no reverse tunnel serves it any more"
			wire.Abort(conn, wire.QUICPeerReset)
			return
		}
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
	resp.Close = true
	if err := resp.Write(conn); err != nil {
		end = "writing the response: " + err.Error()
		wire.Abort(conn, wire.QUICPeerReset) // cut short: B's reader sees a failure, never a short body
		return
	}
	_ = conn.CloseWrite()
	_ = conn.Close()
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
