package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tp-proxy/tp/authz"
)

// errCertExpired ends a session when the client certificate's validity runs out.
var errCertExpired = errors.New("client certificate expired")

// helloWriteTimeout bounds writing a server hello to a client that does not read.
const helloWriteTimeout = 5 * time.Second

// session is the record of one proxy connection, logged once at close.
type session struct {
	start    time.Time
	remote   string
	id       authz.Identity
	dest     string // host:port as canonicalised
	upstream string // the IP:port actually dialed
	decision string // "allow", "deny" or "" if policy was not asked
	code     string // server hello code on refusal
	up, down int64  // bytes client→destination and destination→client
	end      string // why it ended
}

func (s *Server) serveProxy(ctx context.Context, conn *tls.Conn) {
	ss := &session{start: time.Now(), remote: conn.RemoteAddr().String()}
	defer func() { s.logSession(ctx, ss) }()

	upstream, herr := s.establish(ctx, conn, ss)
	if herr != nil {
		ss.code = herr.Code
		if ss.end == "" {
			ss.end = herr.Error()
		}
		s.refuse(conn, herr)
		return
	}
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := WriteServerHello(conn, ServerHello{V: Version, OK: true}); err != nil {
		_ = conn.Close()
		_ = upstream.Close()
		ss.end = "writing server hello: " + err.Error()
		return
	}
	_ = conn.SetWriteDeadline(time.Time{})

	// The session may not outlive the certificate that authorised it.
	bctx, cancel := context.WithDeadlineCause(ctx, ss.id.NotAfter, errCertExpired)
	defer cancel()
	up, down, err := Bridge(bctx, conn, upstream)
	ss.up, ss.down = up, down
	switch {
	case err != nil:
		ss.end = err.Error()
	default:
		ss.end = "closed"
	}
}

// establish runs the session up to a connected upstream, or returns the refusal to
// send. It fills ss as it learns things.
func (s *Server) establish(ctx context.Context, conn *tls.Conn, ss *session) (net.Conn, *HelloError) {
	cs := conn.ConnectionState()
	if len(cs.VerifiedChains) == 0 || len(cs.PeerCertificates) == 0 {
		return nil, helloErr(CodeUnauthenticated, "no verified client certificate")
	}
	id, err := s.cfg.Identify(cs)
	if err != nil {
		ss.end = "identify: " + err.Error()
		return nil, helloErr(CodeUnauthenticated, "client certificate not accepted: %v", err)
	}
	// Fail closed on an identity without expiry: use the leaf's.
	if leafNA := cs.PeerCertificates[0].NotAfter; id.NotAfter.IsZero() || leafNA.Before(id.NotAfter) {
		id.NotAfter = leafNA
	}
	ss.id = id
	if !time.Now().Before(id.NotAfter) {
		return nil, helloErr(CodeUnauthenticated, "client certificate expired at %s", id.NotAfter.UTC().Format(time.RFC3339))
	}

	_ = conn.SetReadDeadline(time.Now().Add(s.cfg.HelloTimeout))
	hello, err := ReadClientHello(conn)
	if err != nil {
		var he *HelloError
		var ne net.Error
		switch {
		case errors.As(err, &he):
			return nil, he
		case errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
			return nil, helloErr(CodeHelloTimeout, "no complete client hello within %s", s.cfg.HelloTimeout)
		default:
			ss.end = "reading client hello: " + err.Error()
			return nil, helloErr(CodeBadRequest, "reading client hello: %v", err)
		}
	}
	_ = conn.SetReadDeadline(time.Time{})

	host := canonicalHost(hello.Host)
	ss.dest = net.JoinHostPort(host, strconv.Itoa(hello.Port))

	ips, herr := s.resolve(ctx, host)
	if herr != nil {
		return nil, herr
	}

	req := authz.Request{
		Action:      authz.ActionDial,
		Identity:    id,
		Destination: authz.Destination{Host: host, Port: hello.Port, Network: hello.Net, IPs: ips},
		Source:      authz.Source{Address: ss.remote, Transport: "tls"},
		Time:        time.Now(),
	}
	actx, acancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	dec, err := s.cfg.Authorizer.Authorize(actx, req)
	acancel()
	if err != nil {
		ss.decision = "deny"
		ss.end = "policy evaluation failed: " + err.Error()
		return nil, helloErr(CodeInternal, "policy evaluation failed")
	}
	if !dec.Allow {
		ss.decision = "deny"
		reason := dec.Reason
		if reason == "" {
			reason = "no policy rule allows this destination"
		}
		return nil, &HelloError{Code: CodePolicyDenied, Reason: reason}
	}
	ss.decision = "allow"
	return s.dial(ctx, ss, ips, hello.Port)
}

// canonicalHost lower-cases a name and strips one trailing dot; IP literals pass as is.
func canonicalHost(host string) string {
	if _, err := netip.ParseAddr(host); err == nil {
		return host
	}
	return strings.TrimSuffix(strings.ToLower(host), ".")
}

// resolve looks host up once; the policy sees, and the dialer uses, exactly these IPs.
func (s *Server) resolve(ctx context.Context, host string) ([]netip.Addr, *HelloError) {
	if ip, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{ip.Unmap()}, nil
	}
	rctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	defer cancel()
	ips, err := s.cfg.Resolver.LookupNetIP(rctx, "ip", host)
	if err != nil {
		return nil, helloErr(CodeResolveFailed, "cannot resolve %s: %v", host, err)
	}
	out := make([]netip.Addr, 0, len(ips))
	for _, ip := range ips {
		if ip.IsValid() {
			out = append(out, ip.Unmap())
		}
	}
	if len(out) == 0 {
		return nil, helloErr(CodeResolveFailed, "cannot resolve %s: no addresses", host)
	}
	return out, nil
}

// dial tries the authorised addresses in order and returns the first connection.
func (s *Server) dial(ctx context.Context, ss *session, ips []netip.Addr, port int) (net.Conn, *HelloError) {
	var herr *HelloError
	for _, ip := range ips {
		addr := netip.AddrPortFrom(ip, uint16(port)).String()
		dctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
		c, err := s.cfg.DialContext(dctx, "tcp", addr)
		cancel()
		if err == nil {
			ss.upstream = addr
			return c, nil
		}
		code := CodeDialFailed
		var ne net.Error
		switch {
		case errors.Is(err, syscall.ECONNREFUSED):
			code = CodeDialRefused
		case errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
			code = CodeDialTimeout
		}
		herr = helloErr(code, "cannot connect to %s (%s): %v", ss.dest, addr, unwrapOpError(err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, herr
}

// unwrapOpError drops net.OpError's repetition of the address for a shorter reason.
func unwrapOpError(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err
	}
	return err
}

// refuse sends a refusal and closes conn. It half-closes first and drains what the
// client already sent for a moment, so the kernel does not answer unread data with
// a reset that would destroy the hello before the client reads it.
func (s *Server) refuse(conn *tls.Conn, herr *HelloError) {
	_ = conn.SetWriteDeadline(time.Now().Add(helloWriteTimeout))
	if err := WriteServerHello(conn, ServerHello{V: Version, Code: herr.Code, Reason: herr.Reason}); err == nil {
		_ = conn.CloseWrite()
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.CopyN(io.Discard, conn, 2*(MaxHelloSize+2))
	}
	_ = conn.Close()
}

func (s *Server) logSession(ctx context.Context, ss *session) {
	attrs := []slog.Attr{
		slog.String("remote", ss.remote),
		slog.String("identity", ss.id.String()),
		slog.String("serial", ss.id.Serial),
		slog.String("dest", ss.dest),
		slog.String("upstream", ss.upstream),
		slog.String("decision", ss.decision),
		slog.Int64("bytes_up", ss.up),
		slog.Int64("bytes_down", ss.down),
		slog.Duration("duration", time.Since(ss.start)),
		slog.String("end", ss.end),
	}
	if ss.code != "" {
		attrs = append(attrs, slog.String("code", ss.code))
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, "proxy session", attrs...)
}
