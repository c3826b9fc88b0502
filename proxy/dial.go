package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"syscall"
)

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
