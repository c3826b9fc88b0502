package proxy

// CONNECT-IP (RFC 9484) on the proxy names: a device with a verified
// certificate gets an IP tunnel. This file is the request's side: the
// request's checks, the device's identity, the policy's decision (per
// identity, input.action == "ip": which prefixes and protocols the peer may
// reach and optionally its addresses), the session's record, and the link to
// the peer on HTTP/3 or HTTP/2. The tunnel itself, its tun device and the
// packets held to the decision, is package proxy/masque. A revocation or a
// policy change (Recheck) ends the tunnel and removes its tun at once; a
// narrower grant is applied in place. docs/IP.md is the user's description.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/proxy/masque"
	"github.com/tp-proxy/tp/proxy/wire"
)

// IPTunnelOptions configures CONNECT-IP tunnels (masque.IPTunnelOptions).
type IPTunnelOptions = masque.IPTunnelOptions

// IPTunnels serves CONNECT-IP for a Server (Config.IPTunnel): the address
// pool, the live tunnels by device and the counters (masque.IPTunnels).
type IPTunnels = masque.IPTunnels

// IPStats are the CONNECT-IP counters since start (masque.IPStats).
type IPStats = masque.IPStats

// NewIPTunnels validates opts and fills defaults.
func NewIPTunnels(opts IPTunnelOptions) (*IPTunnels, error) { return masque.NewIPTunnels(opts) }

// IPTunnels is the server's CONNECT-IP state (Config.IPTunnel); nil when off.
func (s *Server) IPTunnels() *IPTunnels { return s.cfg.IPTunnel }

// ipTemplatePath is where TP serves CONNECT-IP (RFC 9484 §3's default URI
// template, /.well-known/masque/ip/{target}/{ipproto}/).
const ipTemplatePath = "/.well-known/masque/ip/"

// isConnectIP reports whether r asks for a CONNECT-IP tunnel.
func isConnectIP(r *http.Request) bool {
	return r.Method == http.MethodConnect && connectProtocol(r) == wire.ConnectIPProtocol
}

// ipScope parses the template variables of the request's path: target "*" or
// a prefix (or address), ipproto "*" or a protocol number.
func ipScope(path string) (target netip.Prefix, proto int, err error) {
	rest, ok := strings.CutPrefix(path, ipTemplatePath)
	if !ok {
		return target, -1, fmt.Errorf("CONNECT-IP is served at %s{target}/{ipproto}/ (e.g. %s*/*/), not at %q", ipTemplatePath, ipTemplatePath, truncateForReason(path))
	}
	parts := strings.Split(strings.TrimSuffix(rest, "/"), "/")
	if len(parts) != 2 {
		return target, -1, fmt.Errorf("the CONNECT-IP path needs a target and an ipproto (%s*/*/), not %q", ipTemplatePath, truncateForReason(path))
	}
	proto = -1
	if t := strings.ReplaceAll(parts[0], "%2F", "/"); t != "*" {
		t = strings.ReplaceAll(t, "%2f", "/")
		if target, err = netip.ParsePrefix(t); err != nil {
			a, aerr := netip.ParseAddr(t)
			if aerr != nil {
				return target, -1, fmt.Errorf("the CONNECT-IP target %q is neither * nor an IP prefix", truncateForReason(parts[0]))
			}
			target, err = netip.PrefixFrom(a, a.BitLen()), nil
		}
		target = target.Masked()
	}
	if parts[1] != "*" {
		n, perr := strconv.Atoi(parts[1])
		if perr != nil || n < 0 || n > 255 {
			return target, -1, fmt.Errorf("the CONNECT-IP ipproto %q is neither * nor a number from 0 to 255", truncateForReason(parts[1]))
		}
		proto = n
	}
	return target, proto, nil
}

// serveConnectIP serves one CONNECT-IP request until its tunnel ends.
func (s *Server) serveConnectIP(w http.ResponseWriter, r *http.Request) {
	t := s.cfg.IPTunnel
	if t == nil {
		proxyRefusal(w, r, http.StatusNotImplemented, "http_request_error", "this TP server does not serve IP tunnels (CONNECT-IP); its administrator can enable them with ip-tunnel in tpd's configuration")
		return
	}
	if r.TLS == nil || r.ProtoMajor < 2 {
		proxyRefusal(w, r, http.StatusBadRequest, "http_request_error", "CONNECT-IP needs HTTP/3 or HTTP/2 (extended CONNECT)")
		return
	}
	if v := r.Header.Get("Capsule-Protocol"); v != "?1" {
		proxyRefusal(w, r, http.StatusBadRequest, "http_request_error", "a CONNECT-IP request must carry Capsule-Protocol: ?1 (RFC 9484 §4)")
		return
	}
	target, proto, err := ipScope(r.URL.Path)
	if err != nil {
		proxyRefusal(w, r, http.StatusBadRequest, "http_request_error", err.Error())
		return
	}
	admitted, ok := s.admitProxyRequest(w, r, "CONNECT-IP")
	if !ok {
		return
	}
	defer admitted()

	transport := "quic"
	if r.ProtoMajor == 2 {
		transport = "tls"
	}
	ss := &session{start: time.Now(), remote: r.RemoteAddr}
	ss.audit.transport = transport
	ss.audit.action = authz.ActionIP
	ss.dest = "ip " + strings.TrimPrefix(r.URL.Path, ipTemplatePath)
	ss.attrs = append(ss.attrs, slog.String("via", "CONNECT-IP "+r.Proto))
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(r.Context()))
	defer cancel(nil)
	stopForce := context.AfterFunc(s.force, func() { cancel(wire.ErrShutdown) })
	defer stopForce()
	defer func() { s.logSession(ctx, ss) }()
	defer s.releaseSession(ss)

	refuse := func(herr *wire.HelloError) {
		t.CountRefused()
		ss.code = herr.Code
		if ss.end == "" {
			ss.end = herr.Error()
		}
		status, perr := statusOf(herr.Code)
		proxyRefusal(w, r, status, perr, herr.Reason)
	}
	if herr := s.authenticate(*r.TLS, ss); herr != nil {
		refuse(herr)
		return
	}
	if herr := s.countSession(ss); herr != nil {
		refuse(herr)
		return
	}
	req := authz.Request{
		Action:      authz.ActionIP,
		Identity:    ss.id,
		Destination: authz.Destination{Host: target.String(), Network: "ip"},
		Source:      authz.Source{Address: ss.remote, Transport: transport},
		Time:        time.Now(),
	}
	if !target.IsValid() {
		req.Destination.Host = "*"
	}
	if proto >= 0 {
		req.Destination.Port = proto
	}
	actx, acancel := context.WithTimeout(ctx, s.lim().DialTimeout)
	dec, err := s.cfg.Authorizer.Authorize(actx, req)
	acancel()
	ss.audit.revision = dec.Revision
	switch {
	case err != nil:
		ss.decision = "deny"
		ss.end = "policy evaluation failed: " + err.Error()
		refuse(policyError(err))
		return
	case !dec.Allow:
		ss.decision = "deny"
		reason := dec.Reason
		if reason == "" {
			reason = "no policy rule allows this device an IP tunnel"
		}
		refuse(&wire.HelloError{Code: wire.CodePolicyDenied, Reason: reason})
		return
	}
	ss.decision = "allow"
	ss.req = req
	grant := dec.IP
	if grant == nil {
		grant = &authz.IPGrant{}
	}
	routes := masque.RoutesOf(grant, target, proto)
	if len(routes) == 0 {
		refuse(wire.Errorf(wire.CodePolicyDenied, "the policy allows %s an IP tunnel but grants it no prefixes in this scope (data.tp.authz.ip.routes); ask the TP administrator", ss.id))
		return
	}

	// The tunnel ends with a revocation, a policy that no longer allows it,
	// the certificate's expiry, the server's force, the peer, or a newer
	// tunnel of the same device, which can come as soon as Open returns.
	tctx, end := context.WithCancelCause(ctx)
	tn, herr, detail := t.Open(ctx, ss.id, grant, routes, end)
	if herr != nil {
		end(nil)
		ss.end = herr.Error() + detail // the server's log has the details, the client a sentence
		refuse(herr)
		return
	}
	defer t.Close(tn)
	defer end(nil)
	expire := time.AfterFunc(time.Until(ss.id.NotAfter), func() { end(wire.ErrCertExpired) })
	defer expire.Stop()
	defer s.sessions.add(&liveSession{cs: *r.TLS, req: req, revoke: end, onAllow: func(d authz.Decision) {
		tn.Regrant(d, target, proto)
	}})()

	ss.sid = newSessionID()
	w.Header().Set("Capsule-Protocol", "?1")
	// TCP on the stream, when an HTTP/3 client asks (docs/IP.md): its
	// segments then ride the stream's full packets, the rest stays datagrams.
	tcpOnStream := r.ProtoMajor == 3 && r.Header.Get(wire.StreamTCPHeader) == "?1"
	if tcpOnStream {
		w.Header().Set(wire.StreamTCPHeader, "?1")
	}
	// TCP segments whole, when the client asks, on a stream that carries
	// them: HTTP/2's, or HTTP/3's with TCP on the stream.
	segments := (tcpOnStream || r.ProtoMajor == 2) && r.Header.Get(wire.TCPSegmentsHeader) == "?1"
	if segments {
		w.Header().Set(wire.TCPSegmentsHeader, "?1")
	}
	w.Header().Set("TP-Session", ss.sid)
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	var capsules io.Reader
	var recvDg func(context.Context) ([]byte, error)
	switch r.ProtoMajor {
	case 3:
		hs, ok := w.(http3.HTTPStreamer)
		if !ok {
			ss.end = "the HTTP/3 response cannot be taken over"
			return
		}
		str, err := hs.HTTPStream()
		if err != nil {
			ss.end = "taking over the stream: " + err.Error()
			return
		}
		defer str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
		defer str.Close()
		capsules = str
		hc := wire.H3ServerConnFrom(r.Context())
		var out io.Writer = str
		if raw := hc.RequestStream(str.StreamID()); raw != nil {
			// Each write one DATA frame in one stream write (DataWriter).
			out = &wire.DataWriter{Stream: raw}
		}
		tn.Attach(func(b []byte) error { _, err := out.Write(b); return err }, str.SendDatagram, int64(str.StreamID()))
		recvDg = str.ReceiveDatagram
		if hc != nil {
			// The datagrams below http3, on a queue long enough for a burst
			// (wire.H3ServerConn says why); its drops are counted.
			flow := hc.Datagrams.FlowFunc(str, wire.IPDatagramQueue, tn.CountQueueDrop)
			defer flow.Close()
			recvDg = flow.ReceiveDatagram
			tn.ReceiveQueued(flow.TryReceiveDatagram)
			tn.SendBelowHTTP3(flow.AppendQuarterStreamID(nil), flow.SendQUIC)
		}
		if tcpOnStream {
			tn.TCPOnStream()
		}
		if segments {
			tn.TCPSegments()
		}
		context.AfterFunc(tctx, func() {
			if abortive(context.Cause(tctx)) { // never a clean end: both directions reset
				str.CancelRead(h3ConnectError)
				str.CancelWrite(h3ConnectError)
				return
			}
			str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
		})
	default: // h2: packets in DATAGRAM capsules on the stream (RFC 9297 §3.5)
		if err := rc.Flush(); err != nil {
			ss.end = "answering: " + err.Error()
			return
		}
		capsules = r.Body
		tn.Attach(func(b []byte) error {
			_ = rc.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if _, err := w.Write(b); err != nil {
				return err
			}
			return rc.Flush()
		}, nil, 0)
		if segments {
			tn.TCPSegments()
		}
		context.AfterFunc(tctx, func() { _ = r.Body.Close() })
	}

	if err := tn.Announce(); err != nil {
		ss.end = "sending the address assignment: " + err.Error()
		return
	}

	err = tn.Run(tctx, capsules, recvDg)
	end(err)
	tn.CloseDevice() // unblocks the tunnel's reader of its tun
	c := tn.Counts()
	ss.up, ss.down = c.BytesUp, c.BytesDown
	ss.attrs = append(ss.attrs, slog.String("tun", tn.Name()),
		slog.Int64("packets_up", c.PacketsUp), slog.Int64("packets_down", c.PacketsDown),
		slog.Int64("dropped", c.Dropped))
	switch {
	case err == nil || errors.Is(err, io.EOF):
		ss.end = "closed"
	default:
		ss.end = err.Error()
	}
	if abortive(err) {
		if str, ok := capsules.(*http3.Stream); ok {
			str.CancelWrite(h3ConnectError)
		} else {
			panic(http.ErrAbortHandler) // h2: RST_STREAM, never a clean end
		}
	}
}

// abortive reports whether a tunnel ended by err ends with a reset the client
// sees as one: a revocation, the certificate's expiry, the server's force, a
// newer tunnel of the same device.
func abortive(err error) bool {
	var re *wire.RevokedError
	var ee *wire.EndError
	return errors.As(err, &re) || errors.As(err, &ee) || errors.Is(err, wire.ErrCertExpired) || errors.Is(err, wire.ErrShutdown)
}
