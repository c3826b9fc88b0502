package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// MaxResolvedIPs bounds the addresses one name may resolve to. Further addresses are
// dropped before the policy sees them, so they are never dialed either.
const MaxResolvedIPs = 32

// CanonicalHost returns the form of host that the policy sees and the server uses:
//
//   - an IP literal in any spelling the system resolver would accept is replaced by
//     the address it means, in standard notation: "127.1", "0x7f.0.0.1",
//     "2130706433" and "017700000001" (inet_aton forms) become "127.0.0.1";
//     "[::1]" loses its brackets; an IPv4-mapped IPv6 address ("::ffff:127.0.0.1")
//     becomes the IPv4 address, which is what the kernel connects to;
//   - a name is lower-cased and loses one trailing dot.
//
// It refuses hosts that would otherwise be ambiguous: IPv6 zones ("fe80::1%eth0"),
// names whose last label is numeric but which are not a valid address
// ("1.2.3.4.5", "0x1g"), and names with characters DNS names do not have.
func CanonicalHost(host string) (string, error) {
	if strings.HasPrefix(host, "[") || strings.HasSuffix(host, "]") {
		inner := strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
		ip, err := netip.ParseAddr(inner)
		if len(inner) != len(host)-2 || err != nil || !ip.Is6() {
			return "", fmt.Errorf("host %q has brackets but is not an IPv6 address; write IPv6 addresses as [2001:db8::1] or without brackets", host)
		}
		host = inner
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return "", fmt.Errorf("host %q carries an IPv6 zone; TP does not dial link-local addresses by interface", host)
		}
		return ip.Unmap().String(), nil
	}
	name := strings.TrimSuffix(strings.ToLower(host), ".")
	if name == "" {
		return "", fmt.Errorf("host %q is empty", host)
	}
	if ip, ok := parseInetAton(name); ok {
		return ip.String(), nil
	}
	labels := strings.Split(name, ".")
	if numericLabel(labels[len(labels)-1]) {
		return "", fmt.Errorf("host %q looks like an IPv4 address but is not a valid one", host)
	}
	for _, l := range labels {
		if l == "" || len(l) > 63 {
			return "", fmt.Errorf("host %q is not a valid host name: labels must be 1 to 63 characters", host)
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return "", fmt.Errorf("host %q is not a valid host name or IP address: character %q is not allowed", host, c)
			}
		}
	}
	return name, nil
}

// parseInetAton parses the IPv4 forms of glibc's inet_aton, which getaddrinfo and
// so most resolvers accept: one to four parts separated by dots, each decimal,
// octal (leading 0) or hexadecimal (leading 0x); the last part fills the remaining
// bytes ("127.1" is 127.0.0.1, "2130706433" is 127.0.0.1).
func parseInetAton(s string) (netip.Addr, bool) {
	parts := strings.Split(s, ".")
	if len(parts) > 4 {
		return netip.Addr{}, false
	}
	vals := make([]uint64, len(parts))
	for i, p := range parts {
		base := 10
		switch {
		case strings.HasPrefix(p, "0x"):
			base, p = 16, p[2:]
		case len(p) > 1 && p[0] == '0':
			base, p = 8, p[1:]
		}
		if p == "" || p[0] == '+' || p[0] == '-' {
			return netip.Addr{}, false
		}
		v, err := strconv.ParseUint(p, base, 32)
		if err != nil {
			return netip.Addr{}, false
		}
		vals[i] = v
	}
	// Every part but the last is one byte; the last fills what remains.
	var ip uint64
	for _, v := range vals[:len(vals)-1] {
		if v > 0xff {
			return netip.Addr{}, false
		}
		ip = ip<<8 | v
	}
	rest := 8 * uint(4-len(vals)+1)
	last := vals[len(vals)-1]
	if rest < 32 && last >= 1<<rest {
		return netip.Addr{}, false
	}
	ip = ip<<rest | last
	return netip.AddrFrom4([4]byte{byte(ip >> 24), byte(ip >> 16), byte(ip >> 8), byte(ip)}), true
}

// numericLabel reports whether a label reads as a number (decimal digits, or 0x
// and anything), so a name ending in it is an attempt at an IPv4 address.
func numericLabel(l string) bool {
	if strings.HasPrefix(l, "0x") {
		return true
	}
	for i := 0; i < len(l); i++ {
		if l[i] < '0' || l[i] > '9' {
			return false
		}
	}
	return l != ""
}

// canonicalHost is CanonicalHost for logging: an invalid host is returned lower-cased.
// resolve refuses it.
func canonicalHost(host string) string {
	if c, err := CanonicalHost(host); err == nil {
		return c
	}
	return strings.ToLower(host)
}

// resolve looks host up once; the policy sees, and the dialer uses, exactly these
// IPs. IP literals (in any spelling, see CanonicalHost) are not looked up. A host
// that is not a valid name or address is refused at once (herr, bad_request); a
// lookup that fails returns lookupErr, whose text (the resolver's address, the DNS
// answer) is for tpd's log only: the session asks the policy before it tells the
// client anything about the name (see establish).
func (s *Server) resolve(ctx context.Context, host string) (ips []netip.Addr, lookupErr error, herr *wire.HelloError) {
	host, err := CanonicalHost(host)
	if err != nil {
		return nil, nil, wire.Errorf(wire.CodeBadRequest, "%v", err)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{ip.Unmap()}, nil, nil
	}
	rctx, cancel := context.WithTimeout(ctx, s.lim().DialTimeout)
	defer cancel()
	found, err := s.cfg.Resolver.LookupNetIP(rctx, "ip", host)
	if err != nil {
		return nil, fmt.Errorf("resolving %s: %w", host, err), nil
	}
	out := make([]netip.Addr, 0, min(len(found), MaxResolvedIPs))
	for _, ip := range found {
		// A zone would let the kernel pick an interface the policy never saw.
		ip = ip.Unmap().WithZone("")
		if ip.IsValid() && !containsAddr(out, ip) && len(out) < MaxResolvedIPs {
			out = append(out, ip)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("resolving %s: the answer has no addresses", host), nil
	}
	return out, nil, nil
}

// resolveFailed is the refusal for a name that did not resolve, sent only to a
// client the policy allows to reach it. It says no more than that: the resolver's
// address and its answer describe the network, and are in tpd's log instead.
func resolveFailed(host string) *wire.HelloError {
	return wire.Errorf(wire.CodeResolveFailed, "cannot resolve %s", host)
}

func containsAddr(list []netip.Addr, ip netip.Addr) bool {
	for _, a := range list {
		if a == ip {
			return true
		}
	}
	return false
}

// errNotAuthorised is returned by the dialer's Control hook for an address the
// policy did not see.
var errNotAuthorised = errors.New("address was not authorised by the policy")

// guardedDialer returns a net.Dialer whose Control hook, run just before connect(2)
// on the socket, refuses any address outside authorised and any of the server's own
// listeners. It is the last line of defence: even a bug that passed a name or
// another address to the dialer cannot reach an address the policy did not see.
func (s *Server) guardedDialer(authorised []netip.AddrPort) *net.Dialer {
	return &net.Dialer{
		Control: func(network, address string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(address)
			if err != nil {
				return fmt.Errorf("%s: %w", address, errNotAuthorised)
			}
			ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
			for _, a := range authorised {
				if a == ap {
					if s.isSelf(ap) && !s.cfg.AllowSelfDial {
						return fmt.Errorf("%s is this TP server's own listener: %w", address, errNotAuthorised)
					}
					return nil
				}
			}
			return fmt.Errorf("%s: %w", address, errNotAuthorised)
		},
	}
}

// dial tries the authorised addresses in order and returns the first connection
// (network "tcp", or "udp": a connected UDP socket, which fails only for an
// unusable address). Only these addresses are ever passed to the dialer, and the
// default dialer checks them again in its Control hook.
func (s *Server) dial(ctx context.Context, ss *session, network string, ips []netip.Addr, port int) (net.Conn, *wire.HelloError) {
	authorised := make([]netip.AddrPort, len(ips))
	for i, ip := range ips {
		authorised[i] = netip.AddrPortFrom(ip.Unmap(), uint16(port))
	}
	dialContext := s.cfg.DialContext
	if dialContext == nil {
		dialContext = s.guardedDialer(authorised).DialContext
	}
	var herr *wire.HelloError
	var tried []string // for the log: each address and why it failed
	for _, ap := range authorised {
		addr := ap.String()
		dctx, cancel := context.WithTimeout(ctx, s.lim().DialTimeout)
		c, err := dialContext(dctx, network, addr)
		cancel()
		if err == nil {
			ss.upstream = addr
			return c, nil
		}
		tried = append(tried, addr+": "+wire.UnwrapOpError(err).Error())
		herr = dialFailed(ss.dest, err, s.lim().DialTimeout)
		if ctx.Err() != nil {
			break
		}
	}
	ss.end = "cannot connect to " + ss.dest + ": " + strings.Join(tried, "; ")
	return nil, herr
}

// dialFailed is the refusal for a failed connection attempt: host:port as the
// client asked and a cause in general terms. The address tried and the system's
// error (which may name internal addresses and interfaces) go to tpd's log.
func dialFailed(dest string, err error, timeout time.Duration) *wire.HelloError {
	var ne net.Error
	switch {
	case errors.Is(err, errNotAuthorised):
		return wire.Errorf(wire.CodeInternal, "cannot connect to %s: the TP server stopped a connection the policy had not checked; the TP administrator can find the details in tpd's log", dest)
	case errors.Is(err, syscall.ECONNREFUSED):
		return wire.Errorf(wire.CodeDialRefused, "cannot connect to %s: the connection was refused", dest)
	case errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		return wire.Errorf(wire.CodeDialTimeout, "cannot connect to %s: it did not answer within %s", dest, timeout)
	case errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EHOSTUNREACH):
		return wire.Errorf(wire.CodeDialFailed, "cannot connect to %s: the destination is unreachable from the TP server", dest)
	case errors.Is(err, syscall.ECONNRESET):
		return wire.Errorf(wire.CodeDialFailed, "cannot connect to %s: the destination reset the connection while it was being set up", dest)
	case errors.Is(err, context.Canceled):
		return wire.Errorf(wire.CodeDialFailed, "cannot connect to %s: the request was abandoned", dest)
	}
	return wire.Errorf(wire.CodeDialFailed, "cannot connect to %s: the connection failed", dest)
}

// checkSelf refuses a destination whose addresses include one of the server's own
// listeners, unless Config.AllowSelfDial says otherwise. The address goes to the
// session's log line, not into the reason: for a name it would tell where the name
// points (and for an address the client knows it already).
func (s *Server) checkSelf(ss *session, ips []netip.Addr, port int) *wire.HelloError {
	if s.cfg.AllowSelfDial {
		return nil
	}
	for _, ip := range ips {
		ap := netip.AddrPortFrom(ip.Unmap(), uint16(port))
		if s.isSelf(ap) {
			herr := wire.Errorf(wire.CodeSelfDial, "%s is this TP server itself; TP does not connect to its own listeners", ss.dest)
			ss.end = herr.Error() + " (" + ap.String() + ")"
			return herr
		}
	}
	return nil
}

// isSelf reports whether connecting to ap would reach one of the server's own
// listeners: the ones it serves on and Config.SelfAddrs. Connecting to an
// unspecified address (0.0.0.0, ::) reaches the local host, and a listener on an
// unspecified address is reachable at every loopback and local interface address.
func (s *Server) isSelf(ap netip.AddrPort) bool {
	a := ap.Addr().Unmap()
	var local []netip.Addr
	for _, own := range s.selfAddrs() {
		if own.Port() != ap.Port() {
			continue
		}
		oa := own.Addr().Unmap()
		switch {
		case a == oa, a.IsUnspecified():
			return true
		case oa.IsUnspecified():
			if a.IsLoopback() {
				return true
			}
			if local == nil {
				local = localAddrs()
			}
			if containsAddr(local, a) {
				return true
			}
		}
	}
	return false
}

// selfAddrs lists the addresses of the listeners Serve runs on and Config.SelfAddrs.
func (s *Server) selfAddrs() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := append([]netip.AddrPort(nil), s.cfg.SelfAddrs...)
	for ln := range s.listeners {
		switch a := ln.Addr().(type) {
		case *net.TCPAddr:
			out = append(out, a.AddrPort())
		case *net.UDPAddr: // QUIC
			out = append(out, a.AddrPort())
		}
	}
	return out
}

// localAddrs returns the addresses of the host's interfaces; on error, none.
func localAddrs() []netip.Addr {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return []netip.Addr{}
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr().Unmap().WithZone(""))
		}
	}
	return out
}
