package proxy

// WebTransport on the website's HTTP/3 (docs/PROTOCOL.md, section 14): TP's
// requests from a browser. A browser cannot present a device certificate to
// a WebTransport server, so the session's request carries the certificate
// and a proof that the browser holds its key (wire.WebTransportProofMessage);
// the server verifies both as its TLS handshake verifies a device's, and
// then serves each bidirectional stream of the session as a request of a
// "tp/1" QUIC connection: the same hellos, authorisation, limits, re-checks
// and audit, with input.source.transport "webtransport".

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/quicvarint"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/proxy/wire"
)

const (
	// maxWTProofs bounds the proofs remembered against replay (each until
	// its time leaves wire.WebTransportProofWindow), and maxWTProofsPerLeaf
	// those of one certificate: beyond, new sessions are refused until old
	// proofs leave the window. One credential cannot fill the table.
	maxWTProofs        = 1 << 16
	maxWTProofsPerLeaf = 512
	// wtWait bounds how long a stream whose session is not open yet waits
	// for it (its CONNECT may arrive after it), and wtMaxWaiting how many
	// streams of a connection wait at once; the rest are reset
	// (WT_BUFFERED_STREAM_REJECTED).
	wtWait       = 5 * time.Second
	wtMaxWaiting = 16
	// wtQueue bounds the streams handed to a session and not yet taken.
	wtQueue = 64
	// wtCloseWait bounds how long a closed session waits for the browser
	// to end its side of the CONNECT stream, and wtCloseRead how long its
	// streams' resets wait for that.
	wtCloseWait = 5 * time.Second
	wtCloseRead = 500 * time.Millisecond
)

// wtServer is the server's WebTransport state: the website's HTTP/3
// connections it serves, and the proofs seen.
type wtServer struct {
	h3  *h3Server
	own *h3Own // the website's HTTP/3 connections (for the drain)

	mu      sync.Mutex
	conns   map[*quic.Conn]*wtConn
	proofs  map[[32]byte]wtProof // proofs seen (fresh), until they leave the window
	perLeaf map[[32]byte]int     // … of each certificate (SHA-256 of its DER)
}

// wtProof is a proof remembered against replay.
type wtProof struct {
	until time.Time
	leaf  [32]byte
}

type wtConnKey struct{}

func newWTServer(h3 *h3Server) *wtServer {
	w := &wtServer{h3: h3, own: newH3Own(), conns: map[*quic.Conn]*wtConn{}, proofs: map[[32]byte]wtProof{}, perLeaf: map[[32]byte]int{}}
	h3.own = w.own
	if h3.AdditionalSettings == nil {
		h3.AdditionalSettings = map[uint64]uint64{}
	}
	h3.AdditionalSettings[wire.WTSettingEnableDraft06] = 1
	h3.AdditionalSettings[wire.WTSettingEnabled] = 1
	h3.AdditionalSettings[wire.WTSettingMaxSessions] = 1
	h3.EnableDatagrams = true
	prev := h3.ConnContext
	h3.ConnContext = func(ctx context.Context, c *quic.Conn) context.Context {
		if prev != nil {
			ctx = prev(ctx, c)
		}
		w.mu.Lock()
		wc := w.conns[c]
		w.mu.Unlock()
		return context.WithValue(ctx, wtConnKey{}, wc)
	}
	return w
}

// wtConn is one HTTP/3 connection's sessions (at most one: no WebTransport
// flow control) and the streams waiting for theirs.
type wtConn struct {
	conn    *quic.Conn
	mu      sync.Mutex
	session *wtSession
	waiting int
	changed chan struct{} // closed, and replaced, when session changes
}

// wtSession is an open session: its streams, as they arrive.
type wtSession struct {
	id      quic.StreamID
	ctx     context.Context
	streams chan *quic.Stream
	// close sends the session's close (once), then closes closed. A
	// session cut as a whole (revoked, expired) is closed before its streams
	// are reset, so that the browser learns why before it sees the resets:
	// the streams' own aborts with such a code wait for closed
	// (wire.NewWTStream).
	close     func(code uint32, msg string)
	closeOnce sync.Once
	closed    chan struct{}
	dg        *wire.SessionDatagrams // nil when the browser takes no HTTP Datagrams
}

func (wc *wtConn) hasSession() bool {
	wc.mu.Lock()
	defer wc.mu.Unlock()
	return wc.session != nil
}

// reject resets the streams handed to the session and not taken.
func (ss *wtSession) reject() {
	for {
		select {
		case str := <-ss.streams:
			str.ReleaseStreamCredit()
			str.CancelRead(wire.WTSessionGone)
			str.CancelWrite(wire.WTSessionGone)
		default:
			return
		}
	}
}

func (wc *wtConn) open(ss *wtSession) bool {
	wc.mu.Lock()
	defer wc.mu.Unlock()
	if wc.session != nil {
		return false
	}
	wc.session = ss
	close(wc.changed)
	wc.changed = make(chan struct{})
	return true
}

func (wc *wtConn) close(ss *wtSession) {
	wc.mu.Lock()
	defer wc.mu.Unlock()
	if wc.session == ss {
		wc.session = nil
		close(wc.changed)
		wc.changed = make(chan struct{})
	}
}

// route hands str, a stream of session id, to its session, waiting up to
// wtWait for a session not open yet; false when it was not taken.
func (wc *wtConn) route(id quic.StreamID, str *quic.Stream) bool {
	timer := time.NewTimer(wtWait)
	defer timer.Stop()
	wc.mu.Lock()
	waited := false
	defer func() {
		if waited {
			wc.waiting--
		}
		wc.mu.Unlock()
	}()
	for {
		if ss := wc.session; ss != nil && ss.id == id {
			if ss.ctx.Err() != nil {
				return false // ending: its last drain may have passed
			}
			select {
			case ss.streams <- str:
				return true
			case <-ss.ctx.Done():
				return false
			default:
				return false // the browser opens streams faster than they are served
			}
		}
		if !waited {
			if wc.waiting >= wtMaxWaiting {
				return false
			}
			wc.waiting++
			waited = true
		}
		ch := wc.changed
		wc.mu.Unlock()
		select {
		case <-ch:
			wc.mu.Lock()
		case <-timer.C:
			wc.mu.Lock()
			return false
		case <-wc.conn.Context().Done():
			wc.mu.Lock()
			return false
		}
	}
}

// fresh records a proof (its leaf, time and signature's r: the same
// signature in any encoding) and says whether it is new; busy when the
// table, or the leaf's share of it, is full of proofs still in their window.
func (w *wtServer) fresh(leaf []byte, unix string, r *big.Int, at, now time.Time) (ok, busy bool) {
	lh := sha256.Sum256(leaf)
	h := sha256.New()
	h.Write(lh[:])
	h.Write([]byte(unix))
	h.Write(r.Bytes())
	var key [32]byte
	h.Sum(key[:0])
	w.mu.Lock()
	defer w.mu.Unlock()
	if p, seen := w.proofs[key]; seen && now.Before(p.until) {
		return false, false
	}
	if len(w.proofs) >= maxWTProofs || w.perLeaf[lh] >= maxWTProofsPerLeaf {
		for k, p := range w.proofs {
			if !now.Before(p.until) {
				delete(w.proofs, k)
				if w.perLeaf[p.leaf]--; w.perLeaf[p.leaf] <= 0 {
					delete(w.perLeaf, p.leaf)
				}
			}
		}
		if len(w.proofs) >= maxWTProofs || w.perLeaf[lh] >= maxWTProofsPerLeaf {
			return false, true
		}
	}
	// A proof is taken while its time lies within the window of the
	// server's clock: it needs remembering that long.
	w.proofs[key] = wtProof{until: at.Add(wire.WebTransportProofWindow), leaf: lh}
	w.perLeaf[lh]++
	return true, false
}

// isWebTransport reports whether r opens a WebTransport session at TP's path.
func isWebTransport(r *http.Request) bool {
	return r.Method == http.MethodConnect && r.ProtoMajor == 3 &&
		(r.Proto == "webtransport" || r.Proto == "webtransport-h3") && r.URL.Path == wire.WebTransportPath
}

const h3NoError = quic.ApplicationErrorCode(http3.ErrCodeNoError)

// serveWebH3 serves a website HTTP/3 connection with WebTransport: requests
// as http3 serves them (RawServerConn), and the streams of a session to it.
// As the proxy names' connections (serveH3Proxy), it is not http3.Server's:
// its drain is h3Own's.
func (s *Server) serveWebH3(ctx context.Context, conn *quic.Conn) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopForce := context.AfterFunc(s.force, cancel)
	defer stopForce()
	stopClosing := context.AfterFunc(s.wt.own.closing, cancel)
	defer stopClosing()
	stop := context.AfterFunc(ctx, func() { _ = conn.CloseWithError(h3NoError, "server shutting down") })
	defer stop()
	defer func() { _ = conn.CloseWithError(h3NoError, "") }()
	if _, ok := s.wt.own.add(conn); !ok {
		return
	}
	defer s.wt.own.remove(conn)
	wc := &wtConn{conn: conn, changed: make(chan struct{})}
	s.wt.mu.Lock()
	s.wt.conns[conn] = wc
	s.wt.mu.Unlock()
	defer func() {
		s.wt.mu.Lock()
		delete(s.wt.conns, conn)
		s.wt.mu.Unlock()
	}()
	rc, err := s.wt.h3.NewRawServerConn(conn) // sends the SETTINGS
	if err != nil {
		return
	}
	go func() {
		for {
			str, err := conn.AcceptUniStream(conn.Context())
			if err != nil {
				return
			}
			go rc.HandleUnidirectionalStream(str)
		}
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	actx, acancel := context.WithCancel(conn.Context())
	defer acancel()
	stopGrace := context.AfterFunc(s.wt.own.grace, acancel)
	defer stopGrace()
	for {
		str, err := conn.AcceptStream(actx)
		if err != nil {
			if conn.Context().Err() != nil || ctx.Err() != nil {
				return
			}
			break // the grace: refuse new requests until the connection ends
		}
		wg.Go(func() { s.serveWebStream(wc, rc, str) })
	}
	for {
		str, err := conn.AcceptStream(ctx)
		if err != nil {
			return
		}
		go func() { // a session's stream is refused in its own terms
			str.ReleaseStreamCredit()
			code := quic.StreamErrorCode(http3.ErrCodeRequestRejected)
			_ = str.SetReadDeadline(time.Now().Add(time.Second))
			if typ, err := quicvarint.Peek(str); err == nil && typ == wire.WTStreamType {
				code = wire.WTCode(wire.QUICRefused)
			}
			str.CancelRead(code)
			str.CancelWrite(code)
		}()
	}
}

// serveWebStream serves one bidirectional stream of a website connection: a
// request, or a stream of a WebTransport session.
func (s *Server) serveWebStream(wc *wtConn, rc *http3.RawServerConn, str *quic.Stream) {
	_ = str.SetReadDeadline(time.Now().Add(s.lim().HelloTimeout))
	typ, err := quicvarint.Peek(str)
	if err != nil {
		str.ReleaseStreamCredit()
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestIncomplete))
		str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestIncomplete))
		return
	}
	if typ != wire.WTStreamType {
		_ = str.SetReadDeadline(time.Time{})
		rc.HandleRequestStream(str)
		return
	}
	r := quicvarint.NewReader(str)
	_, _ = quicvarint.Read(r) // the type, peeked
	id, err := quicvarint.Read(r)
	_ = str.SetReadDeadline(time.Time{})
	if err != nil || id%4 != 0 || !wc.route(quic.StreamID(id), str) {
		str.ReleaseStreamCredit()
		str.CancelRead(wire.WTBufferedStreamRejected)
		str.CancelWrite(wire.WTBufferedStreamRejected)
	}
}

// serveWebTransport opens a session and serves its streams until it ends.
// A session whose credential the server refuses is opened and closed at once
// with wire.WTRefused and a server hello that says why, which a browser can
// read (a refused request's status it cannot).
func (s *Server) serveWebTransport(w http.ResponseWriter, r *http.Request) {
	wc, _ := r.Context().Value(wtConnKey{}).(*wtConn)
	sg, ok := w.(http3.Settingser)
	if wc == nil || !ok {
		http.Error(w, "WebTransport is served over HTTP/3 only", http.StatusBadRequest)
		return
	}
	select { // the client's SETTINGS say whether it speaks WebTransport
	case <-sg.ReceivedSettings():
	case <-time.After(s.lim().HelloTimeout):
		http.Error(w, "no HTTP/3 SETTINGS from the client", http.StatusBadRequest)
		return
	case <-r.Context().Done():
		return
	}
	var cs tls.ConnectionState
	var id authz.Identity
	var herr *wire.HelloError
	if wc.hasSession() { // before any verification: a second session costs nothing
		herr = wire.Errorf(CodeTooManySessions, "this connection has a WebTransport session already; open one per connection")
	} else {
		cs, id, herr = s.webTransportCredential(r)
	}
	hs, ok := w.(http3.HTTPStreamer)
	if !ok {
		http.Error(w, "WebTransport is served over HTTP/3 only", http.StatusBadRequest)
		return
	}
	sctx, end := context.WithCancelCause(r.Context())
	defer end(nil)
	ss := &wtSession{ctx: sctx, streams: make(chan *quic.Stream, wtQueue), closed: make(chan struct{})}
	w.Header().Set("Sec-Webtransport-Http3-Draft", "draft02")
	w.WriteHeader(http.StatusOK)
	str, err := hs.HTTPStream()
	if err != nil {
		return
	}
	ss.id = str.StreamID()
	if st := sg.Settings(); herr == nil && st != nil && st.EnableDatagrams {
		ss.dg = wire.NewSessionDatagrams(sctx, str.SendDatagram, str.ReceiveDatagram)
	}
	// The browser closes the session with a capsule, or by ending the stream.
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		br := bufio.NewReader(str)
		for {
			c, err := wire.ReadIPCapsule(br)
			if err != nil {
				if errors.Is(err, io.EOF) {
					end(errWTClosed)
				} else {
					end(err)
				}
				return
			}
			if c.Type == wire.WTCloseSessionCapsule {
				_, msg, _ := wire.WTClose(c.Payload)
				end(&wtClosedError{msg: msg})
				return
			}
		}
	}()
	// However the session ends, the browser's direction is read until the
	// browser ends it, which it does once it has read the close, for at most
	// wtCloseWait: a STOP_SENDING sooner could reach the browser before the
	// close and lose its reason. A page that never ends its side holds
	// nothing longer.
	defer func() {
		select {
		case <-readDone:
		case <-time.After(wtCloseWait):
		}
		str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
	}()
	if herr == nil && !wc.open(ss) {
		herr = wire.Errorf(CodeTooManySessions, "this connection has a WebTransport session already; open one per connection")
	}
	if herr != nil {
		s.log.Info("webtransport session refused", "remote", r.RemoteAddr, "code", herr.Code, "reason", herr.Reason)
		writeWTClose(str, wire.WTRefused, refusalMessage(herr))
		return
	}
	defer func() {
		wc.close(ss)
		ss.reject() // streams routed to it as it ended
	}()
	ss.close = func(code uint32, msg string) {
		ss.closeOnce.Do(func() {
			if errors.Is(context.Cause(sctx), errWTClosed) || errors.As(context.Cause(sctx), new(*wtClosedError)) {
				_ = str.Close() // the browser closed it: only the FIN
			} else {
				writeWTClose(str, code, msg)
				// The streams are reset once the browser has read the close:
				// it ends its side then. quic-go sends a reset queued beside
				// the close's bytes ahead of them, and a browser that sees
				// its streams reset first loses the close's reason
				// ("Connection lost.").
				t := time.NewTimer(wtCloseRead)
				select {
				case <-readDone:
				case <-t.C:
				}
				t.Stop()
			}
			close(ss.closed)
		})
	}
	s.serveWTSession(sctx, end, wc.conn, ss, cs, id)
}

// writeWTClose ends a session: CLOSE_WEBTRANSPORT_SESSION, then FIN.
func writeWTClose(str *http3.Stream, code uint32, msg string) {
	_ = str.SetWriteDeadline(time.Now().Add(wire.HelloWriteTimeout))
	_, _ = str.Write(wire.AppendWTClose(nil, code, msg))
	_ = str.Close()
}

var errWTClosed = errors.New("the browser closed the session")

type wtClosedError struct{ msg string }

func (e *wtClosedError) Error() string { return "the browser closed the session: " + e.msg }

// refusalMessage is herr as a server hello, within the 1024 bytes a
// session's close message may hold.
func refusalMessage(herr *wire.HelloError) string {
	reason := herr.Reason
	for {
		b, _ := json.Marshal(wire.ServerHello{V: wire.Version, OK: false, Code: herr.Code, Reason: reason})
		if len(b) <= 1024 || reason == "" {
			return string(b)
		}
		reason = reason[:len(reason)*3/4] + "…"
	}
}

// webTransportCredential verifies the certificate and proof of r's query as
// the proxy's TLS handshake verifies a device certificate (ProxyTLS's
// ClientCAs and VerifyConnection), and returns the connection state the
// session's requests are authenticated by.
func (s *Server) webTransportCredential(r *http.Request) (tls.ConnectionState, authz.Identity, *wire.HelloError) {
	q := r.URL.Query()
	refuse := func(format string, args ...any) (tls.ConnectionState, authz.Identity, *wire.HelloError) {
		return tls.ConnectionState{}, authz.Identity{}, wire.Errorf(wire.CodeUnauthenticated, format, args...)
	}
	raw := q[wire.WebTransportCert]
	switch {
	case len(raw) == 0:
		return refuse("the session's request carries no certificate (%q); a browser gets one from TP with its credential", wire.WebTransportCert)
	case len(raw) > wire.WebTransportMaxCerts:
		return refuse("the session's request carries %d certificates, more than the %d TP takes", len(raw), wire.WebTransportMaxCerts)
	}
	var certs []*x509.Certificate
	for i, c := range raw {
		der, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(c, "="))
		if err != nil || len(der) > wire.WebTransportMaxCertBytes {
			return refuse("certificate %d of the session's request is not base64url DER of at most %d bytes", i+1, wire.WebTransportMaxCertBytes)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return refuse("certificate %d of the session's request cannot be read: %v", i+1, err)
		}
		certs = append(certs, cert)
	}
	unix := q.Get(wire.WebTransportTime)
	now := time.Now()
	at, ok := wire.WebTransportTimeOK(unix, now)
	if !ok {
		return refuse("the proof's time %q is not Unix seconds within %s of the server's clock (%d); check the device's clock", unix, wire.WebTransportProofWindow, now.Unix())
	}
	proof, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(q.Get(wire.WebTransportProof), "="))
	if err != nil || len(proof) == 0 || len(proof) > 160 {
		return refuse("the session's request carries no proof (%q, base64url)", wire.WebTransportProof)
	}
	authority := strings.ToLower(r.Host)
	if r.TLS != nil && r.TLS.ServerName != "" {
		host := authority
		if h, _, err := net.SplitHostPort(authority); err == nil {
			host = h
		}
		if host != strings.ToLower(r.TLS.ServerName) {
			return refuse("the request names %s, but its connection is to %s", host, r.TLS.ServerName)
		}
	}
	msg := wire.WebTransportProofMessage(authority, unix, certs[0].Raw)
	r0, err := wire.CheckWebTransportProof(certs[0], msg, proof)
	if err != nil {
		return refuse("%v", err)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	chains, err := certs[0].Verify(x509.VerifyOptions{Roots: s.proxyTLS.ClientCAs, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, CurrentTime: now})
	if err != nil {
		return refuse("the certificate is not one of this TP server's device certificates: %v", err)
	}
	cs := tls.ConnectionState{Version: tls.VersionTLS13, HandshakeComplete: true, PeerCertificates: certs, VerifiedChains: chains}
	if r.TLS != nil {
		cs.ServerName = r.TLS.ServerName
	}
	// The checks the handshake runs after the chain's (ProxyTLS), as it
	// runs them.
	if v := s.proxyTLS.VerifyPeerCertificate; v != nil {
		raw := make([][]byte, len(certs))
		for i, c := range certs {
			raw[i] = c.Raw
		}
		if err := v(raw, chains); err != nil {
			return refuse("%v", err)
		}
	}
	if v := s.proxyTLS.VerifyConnection; v != nil {
		if err := v(cs); err != nil {
			return refuse("%v", err)
		}
	}
	id, err := s.cfg.Identify(cs)
	if err != nil {
		return refuse("client certificate not accepted: %v", err)
	}
	if leafNA := certs[0].NotAfter; id.NotAfter.IsZero() || leafNA.Before(id.NotAfter) {
		id.NotAfter = leafNA
	}
	if ok, busy := s.wt.fresh(certs[0].Raw, unix, r0, at, now); !ok {
		if busy {
			return tls.ConnectionState{}, authz.Identity{}, wire.Errorf(CodeTooManySessions, "too many browser sessions were opened with this certificate, or through this TP server, in the last minutes; try again in a minute")
		}
		return refuse("this proof was used before; each session needs a fresh one")
	}
	return cs, id, nil
}

// serveWTSession serves the streams of an authenticated session until it
// ends: the browser closes it, its certificate expires, a re-check refuses
// its identity (revoked: Recheck), or the server shuts down; then it closes
// the session (ss.close) and waits for its requests to end.
func (s *Server) serveWTSession(sctx context.Context, end context.CancelCauseFunc, conn *quic.Conn, ss *wtSession, cs tls.ConnectionState, id authz.Identity) {
	remote := conn.RemoteAddr().String()
	s.log.Info("webtransport session opened", "identity", id.DeviceID, "remote", remote)
	expire := time.AfterFunc(time.Until(id.NotAfter), func() { end(wire.ErrCertExpired) })
	defer expire.Stop()
	stopForce := context.AfterFunc(s.force, func() { end(errWTShutdown) })
	defer stopForce()
	defer s.sessions.add(&liveSession{cs: cs, req: authz.Request{Identity: id, Action: "webtransport"}, identityOnly: true, revoke: end})()
	// A drain takes no new requests but lets the open ones finish, as on a
	// "tp/1" connection: new streams are refused, then the session closes.
	draining := make(chan struct{})
	stopDrain := context.AfterFunc(s.draining, func() { close(draining) })
	defer stopDrain()

	flood := newCancelFlood(func() { end(errWTFlood) })
	var wg sync.WaitGroup
	serve := func(str *quic.Stream) {
		ws := wire.NewWTStream(conn, str, ss.closed, ss.dg)
		if !s.acquire() {
			ws.Abort(wire.QUICRefused)
			str.ReleaseStreamCredit()
			s.log.Warn("webtransport stream refused: too many connections", "remote", remote, "max_conns", s.lim().MaxConns)
			return
		}
		wg.Go(func() {
			defer str.ReleaseStreamCredit()
			defer s.release()
			s.serveStreamOf(sctx, ws, &cs, "webtransport", flood)
		})
	}
	done := make(chan struct{})
loop:
	for {
		select {
		case str := <-ss.streams:
			serve(str)
		case <-draining:
			go func() { wg.Wait(); close(done) }()
			break loop
		case <-sctx.Done():
			break loop
		}
	}
	if sctx.Err() == nil { // draining: refuse new streams until the open ones end
		for sctx.Err() == nil {
			select {
			case str := <-ss.streams:
				wire.NewWTStream(conn, str, nil, nil).Abort(wire.QUICRefused)
				str.ReleaseStreamCredit()
			case <-done:
				end(errWTShutdown)
			case <-sctx.Done():
			}
		}
	}
	ss.reject() // streams handed over but not taken
	code, msg := wtEnd(context.Cause(sctx))
	ss.close(code, msg)
	wg.Wait()
	s.log.Info("webtransport session ended", "identity", id.DeviceID, "remote", remote, "why", msg)
}

var (
	errWTShutdown = errors.New("the TP server is shutting down; open a new session")
	errWTFlood    = errors.New("the browser cancelled more requests before their answer than it let be answered")
)

// wtEnd is the close code and message of a session ended by cause.
func wtEnd(cause error) (uint32, string) {
	var re *wire.RevokedError
	switch {
	case errors.As(cause, &re):
		return uint32(wire.QUICRevoked), "the TP server ended the session: " + re.Reason
	case errors.Is(cause, wire.ErrCertExpired):
		return uint32(wire.QUICCertExpired), "the browser's certificate expired; get a new one and open a new session"
	case errors.Is(cause, errWTShutdown):
		return uint32(wire.QUICShutdown), errWTShutdown.Error()
	case errors.Is(cause, errWTFlood):
		return uint32(wire.QUICInternal), errWTFlood.Error()
	case cause == nil:
		return uint32(wire.QUICNoError), ""
	}
	return uint32(wire.QUICNoError), fmt.Sprint(cause)
}

// serveWebSocket serves one request of a browser without WebTransport
// (docs/PROTOCOL.md 14.4): a WebSocket at wire.WebSocketPath whose query
// carries the credential as a session's does, and then the request as on a
// stream of a session. A refused credential is answered as a refused
// request: a server hello, then the close.
func (s *Server) serveWebSocket(w http.ResponseWriter, r *http.Request) {
	// A slot of MaxConns before anything is verified or accepted: a
	// hijacked connection leaves the website's count, and refused requests
	// hold theirs for a few seconds too.
	if !s.acquire() {
		http.Error(w, "the TP server is busy; try again later", http.StatusServiceUnavailable)
		return
	}
	defer s.release()
	if !s.addWorker() { // a shutdown waits for the request, and a forced one cuts it
		http.Error(w, "the TP server is shutting down", http.StatusServiceUnavailable)
		return
	}
	defer s.wg.Done()
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(r.Context()))
	defer cancel(nil)
	stop := context.AfterFunc(s.force, func() { cancel(wire.ErrShutdown) })
	defer stop()
	cs, _, herr := s.webTransportCredential(r)
	// Any page may open one: the proof authorises, not a cookie.
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{OriginPatterns: []string{"*"}})
	if err != nil {
		return // Accept answered the request
	}
	ws := wire.NewWSStream(c, r.RemoteAddr)
	if herr != nil {
		s.log.Info("websocket request refused", "remote", r.RemoteAddr, "code", herr.Code, "reason", herr.Reason)
		s.refuse(ws, herr)
		return
	}
	s.serveStreamOf(ctx, ws, &cs, "websocket", nil)
}
