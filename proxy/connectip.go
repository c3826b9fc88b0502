package proxy

// CONNECT-IP (RFC 9484) on the proxy names: a device with a verified
// certificate gets an IP tunnel. Each tunnel has a tun device of its own
// ("tpip%d"), routes for the addresses assigned to the peer through it, and a
// hook program run with TUN_DEV_NAME and TUN_CLIENT_ID (the seed's jtunnel
// contract). The policy decides, per identity (input.action == "ip"), which
// prefixes and protocols the peer may reach and optionally its addresses; TP
// holds every packet to that decision: a packet from the peer must come from an
// address assigned to it and go to a granted prefix and protocol, a packet to
// the peer must come from a granted prefix. A revocation or a policy change
// (Recheck) ends the tunnel and removes its tun at once; a narrower grant is
// applied in place. docs/IP.md is the user's description.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/tun"
	"github.com/tp-proxy/tp/proxy/wire"
)

// IPTunnelOptions configures CONNECT-IP tunnels.
type IPTunnelOptions struct {
	// Pool4 and Pool6 are the prefixes peers' addresses come from (one /32 and
	// one /128 per tunnel) when the policy assigns none. At least one of them,
	// or addresses from the policy, is needed for a tunnel to start.
	Pool4, Pool6 netip.Prefix
	// Hook, when set, is run (program and arguments) for each new tunnel after
	// its tun is up and before the peer is answered, with TUN_DEV_NAME,
	// TUN_CLIENT_ID, TP_EVENT=up and TP's identity fields in its environment
	// (docs/IP.md); a failing hook refuses the tunnel. It runs again with
	// TP_EVENT=down before the tun is removed.
	Hook []string
	// HookTimeout bounds each run of the hook. Default 10 s.
	HookTimeout time.Duration
	// MTU of the tun devices. Default 1280, which any QUIC path TP accepts
	// carries in one datagram.
	MTU int
	// PacketsPerSecond and BytesPerSecond bound each direction of each tunnel
	// (a token bucket holding one second's worth); excess packets are dropped
	// and counted. Defaults 100,000 packets and 50 MB per second.
	PacketsPerSecond int
	BytesPerSecond   int64
	// TunName is the kernel's name template for the tun devices. Default "tpip%d".
	TunName string
}

// IPTunnels serves CONNECT-IP for a Server (Config.IPTunnel): the address
// pool, the live tunnels by device and the counters.
type IPTunnels struct {
	opts IPTunnelOptions

	mu     sync.Mutex
	used   map[netip.Addr]string // pool addresses in use, by device ID
	byDev  map[string]*ipTunnel  // the live tunnel of each device
	closed bool

	stats ipCounters
}

// NewIPTunnels validates opts and fills defaults.
func NewIPTunnels(opts IPTunnelOptions) (*IPTunnels, error) {
	var errs []error
	if opts.Pool4.IsValid() && (!opts.Pool4.Addr().Is4() || opts.Pool4.Bits() > 30) {
		errs = append(errs, fmt.Errorf("IPv4 pool %s must be an IPv4 prefix of /30 or wider", opts.Pool4))
	}
	if opts.Pool6.IsValid() && (!opts.Pool6.Addr().Is6() || opts.Pool6.Bits() > 126) {
		errs = append(errs, fmt.Errorf("IPv6 pool %s must be an IPv6 prefix of /126 or wider", opts.Pool6))
	}
	if opts.MTU == 0 {
		opts.MTU = 1280
	}
	if opts.MTU < 1280 || opts.MTU > 9000 {
		errs = append(errs, fmt.Errorf("tun MTU %d must be between 1280 and 9000", opts.MTU))
	}
	if opts.HookTimeout <= 0 {
		opts.HookTimeout = 10 * time.Second
	}
	if opts.PacketsPerSecond <= 0 {
		opts.PacketsPerSecond = 100000
	}
	if opts.BytesPerSecond <= 0 {
		opts.BytesPerSecond = 50 << 20
	}
	if opts.TunName == "" {
		opts.TunName = "tpip%d"
	}
	if len(opts.Hook) > 0 && opts.Hook[0] == "" {
		errs = append(errs, errors.New("the IP tunnel hook names no program"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	opts.Pool4, opts.Pool6 = opts.Pool4.Masked(), opts.Pool6.Masked()
	return &IPTunnels{opts: opts, used: map[netip.Addr]string{}, byDev: map[string]*ipTunnel{}}, nil
}

// IPStats are the CONNECT-IP counters since start.
type IPStats struct {
	Opened, Refused, Active int64
	PacketsUp, PacketsDown  int64 // up: peer → network
	BytesUp, BytesDown      int64
	DroppedSource           int64 // from the peer with a source not assigned to it
	DroppedDestination      int64 // from the peer to a prefix or protocol the policy does not grant
	DroppedInbound          int64 // to the peer from a source outside its grant
	DroppedRate             int64 // beyond PacketsPerSecond or BytesPerSecond
	DroppedMalformed        int64 // not one whole IPv4 or IPv6 packet
	DroppedTooBig           int64 // larger than the path's datagrams (answered with ICMP)
}

type ipCounters struct {
	opened, refused, active                              atomic.Int64
	pktUp, pktDown, bytesUp, bytesDown                   atomic.Int64
	dropSrc, dropDst, dropIn, dropRate, dropBad, dropBig atomic.Int64
}

// Stats returns the counters.
func (t *IPTunnels) Stats() IPStats {
	c := &t.stats
	return IPStats{
		Opened: c.opened.Load(), Refused: c.refused.Load(), Active: c.active.Load(),
		PacketsUp: c.pktUp.Load(), PacketsDown: c.pktDown.Load(), BytesUp: c.bytesUp.Load(), BytesDown: c.bytesDown.Load(),
		DroppedSource: c.dropSrc.Load(), DroppedDestination: c.dropDst.Load(), DroppedInbound: c.dropIn.Load(),
		DroppedRate: c.dropRate.Load(), DroppedMalformed: c.dropBad.Load(), DroppedTooBig: c.dropBig.Load(),
	}
}

// IPTunnels is the server's CONNECT-IP state (Config.IPTunnel); nil when off.
func (s *Server) IPTunnels() *IPTunnels { return s.cfg.IPTunnel }

// Tunnels lists the live tunnels: device identity → tun device name.
func (t *IPTunnels) Tunnels() map[string]string {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]string, len(t.byDev))
	for d, tn := range t.byDev {
		out[d] = tn.dev.Name()
	}
	return out
}

// allocate returns a free pool address of the family of pool, held for device.
func (t *IPTunnels) allocate(pool netip.Prefix, device string) (netip.Prefix, bool) {
	if !pool.IsValid() {
		return netip.Prefix{}, false
	}
	// The first address is the network's; start after it. Bounded: at most
	// 65,536 tries, enough for any pool a server can hold tunnels for.
	a := pool.Addr().Next()
	for i := 0; i < 1<<16 && pool.Contains(a); i++ {
		if _, taken := t.used[a]; !taken && a.Next().IsValid() && pool.Contains(a.Next()) {
			t.used[a] = device
			return netip.PrefixFrom(a, a.BitLen()), true
		}
		a = a.Next()
	}
	return netip.Prefix{}, false
}

// ipTunnel is one live CONNECT-IP tunnel.
type ipTunnel struct {
	t      *IPTunnels
	dev    *tun.Device
	id     authz.Identity
	addrs  []netip.Prefix // assigned to the peer
	pooled []netip.Addr   // which of them came from the pool
	routes atomic.Pointer[[]wire.IPRoute]
	end    context.CancelCauseFunc

	wmu      sync.Mutex // one capsule write at a time
	writeCap func([]byte) error
	sendDg   func([]byte) error // one HTTP Datagram payload
	dgStream int64              // the HTTP/3 request stream whose datagrams sendDg sends

	up, down rateBucket
	pkts     [2]atomic.Int64 // up, down
	bytes    [2]atomic.Int64
	drops    atomic.Int64
}

// rateBucket is a token bucket of packets and bytes per second, holding one
// second's worth. It starts full at its first packet.
type rateBucket struct {
	mu          sync.Mutex
	last        time.Time
	pkts, bytes float64
}

// allow takes one packet of n bytes at now, or reports that the bucket holds
// less than that.
func (b *rateBucket) allow(now time.Time, n int, pps int, bps int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.last.IsZero() {
		b.pkts, b.bytes = float64(pps), float64(bps)
	} else {
		dt := now.Sub(b.last).Seconds()
		b.pkts = min(float64(pps), b.pkts+dt*float64(pps))
		b.bytes = min(float64(bps), b.bytes+dt*float64(bps))
	}
	b.last = now
	if b.pkts < 1 || b.bytes < float64(n) {
		return false
	}
	b.pkts--
	b.bytes -= float64(n)
	return true
}

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

// routesOf turns a grant into ROUTE_ADVERTISEMENT order (RFC 9484 §4.7.3),
// narrowed to the request's scope. Overlapping prefixes of one protocol are
// merged by keeping the wider one.
func routesOf(g *authz.IPGrant, target netip.Prefix, proto int) []wire.IPRoute {
	var out []wire.IPRoute
	for _, r := range g.Routes {
		p := r.Prefix.Masked()
		if target.IsValid() {
			switch {
			case !p.Overlaps(target):
				continue
			case target.Bits() > p.Bits():
				p = target
			}
		}
		pr := r.Protocol
		if proto >= 0 {
			if pr != 0 && int(pr) != proto {
				continue
			}
			pr = uint8(proto)
		}
		out = append(out, wire.RouteOf(p, pr))
	}
	slices.SortFunc(out, func(a, b wire.IPRoute) int {
		if c := a.Start.BitLen() - b.Start.BitLen(); c != 0 {
			return c
		}
		if c := int(a.Protocol) - int(b.Protocol); c != 0 {
			return c
		}
		if c := a.Start.Compare(b.Start); c != 0 {
			return c
		}
		return b.End.Compare(a.End) // wider first
	})
	merged := out[:0]
	for _, r := range out {
		if n := len(merged); n > 0 {
			last := &merged[n-1]
			if last.Start.BitLen() == r.Start.BitLen() && last.Protocol == r.Protocol && r.Start.Compare(last.End) <= 0 {
				if r.End.Compare(last.End) > 0 {
					last.End = r.End
				}
				continue
			}
		}
		merged = append(merged, r)
	}
	return merged
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
		t.stats.refused.Add(1)
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
	routes := routesOf(grant, target, proto)
	if len(routes) == 0 {
		refuse(wire.Errorf(wire.CodePolicyDenied, "the policy allows %s an IP tunnel but grants it no prefixes in this scope (data.tp.authz.ip.routes); ask the TP administrator", ss.id))
		return
	}

	tn, herr, detail := t.open(ctx, ss.id, grant)
	if herr != nil {
		ss.end = herr.Error() + detail // the server's log has the details, the client a sentence
		refuse(herr)
		return
	}
	tn.routes.Store(&routes)
	defer t.close(tn)
	t.stats.opened.Add(1)

	// The tunnel ends with a revocation, a policy that no longer allows it,
	// the certificate's expiry, the server's force, or the peer.
	tctx, end := context.WithCancelCause(ctx)
	defer end(nil)
	tn.end = end
	expire := time.AfterFunc(time.Until(ss.id.NotAfter), func() { end(wire.ErrCertExpired) })
	defer expire.Stop()
	defer s.sessions.add(&liveSession{cs: *r.TLS, req: req, revoke: end, onAllow: func(d authz.Decision) {
		tn.regrant(d, target, proto)
	}})()

	ss.sid = newSessionID()
	w.Header().Set("Capsule-Protocol", "?1")
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
		tn.writeCap = func(b []byte) error { _, err := str.Write(b); return err }
		tn.sendDg, tn.dgStream = str.SendDatagram, int64(str.StreamID())
		recvDg = str.ReceiveDatagram
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
		tn.writeCap = func(b []byte) error {
			_ = rc.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if _, err := w.Write(b); err != nil {
				return err
			}
			return rc.Flush()
		}
		tn.sendDg = func(p []byte) error { return tn.capsule(wire.AppendIPCapsule(nil, wire.IPCapsuleDatagram, p)) }
		context.AfterFunc(tctx, func() { _ = r.Body.Close() })
	}

	var first []byte
	first = wire.AppendAddresses(first, wire.IPCapsuleAddressAssign, assigned(tn.addrs))
	first = wire.AppendRoutes(first, routes)
	if err := tn.capsule(first); err != nil {
		ss.end = "sending the address assignment: " + err.Error()
		return
	}

	done := make(chan error, 3)
	go func() { done <- tn.fromTun(tctx) }()
	go func() { done <- tn.readCapsules(tctx, bufio.NewReaderSize(capsules, 64<<10)) }()
	if recvDg != nil {
		go func() { done <- tn.readDatagrams(tctx, recvDg) }()
	}
	select {
	case err = <-done:
	case <-tctx.Done():
		err = context.Cause(tctx)
	}
	end(err)
	_ = tn.dev.Close() // unblocks fromTun
	ss.up, ss.down = tn.bytes[0].Load(), tn.bytes[1].Load()
	ss.attrs = append(ss.attrs, slog.String("tun", tn.dev.Name()),
		slog.Int64("packets_up", tn.pkts[0].Load()), slog.Int64("packets_down", tn.pkts[1].Load()),
		slog.Int64("dropped", tn.drops.Load()))
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

func assigned(addrs []netip.Prefix) []wire.AssignedAddress {
	out := make([]wire.AssignedAddress, len(addrs))
	for i, a := range addrs {
		out[i] = wire.AssignedAddress{Prefix: a}
	}
	return out
}

// open picks the peer's addresses, creates its tun, routes the addresses
// through it and runs the hook. A device that has a tunnel already loses it:
// one tunnel per device, so a client that reconnects gets its addresses back.
func (t *IPTunnels) open(ctx context.Context, id authz.Identity, g *authz.IPGrant) (_ *ipTunnel, _ *wire.HelloError, detail string) {
	t.mu.Lock()
	if old := t.byDev[id.DeviceID]; old != nil {
		delete(t.byDev, id.DeviceID)
		t.mu.Unlock()
		old.end(&wire.EndError{Code: wire.QUICPeerReset, By: "server", Reason: "the same device opened a new IP tunnel"})
		t.mu.Lock()
	}
	tn := &ipTunnel{t: t, id: id}
	if len(g.Addresses) > 0 {
		tn.addrs = slices.Clone(g.Addresses)
	} else {
		for _, pool := range []netip.Prefix{t.opts.Pool4, t.opts.Pool6} {
			if a, ok := t.allocate(pool, id.DeviceID); ok {
				tn.addrs = append(tn.addrs, a)
				tn.pooled = append(tn.pooled, a.Addr())
			}
		}
	}
	t.mu.Unlock()
	if len(tn.addrs) == 0 {
		return nil, wire.Errorf(wire.CodeInternal, "the TP server has no free address for %s (its IP tunnel pool is exhausted or not configured, and the policy assigns none); tell the TP administrator", id), ""
	}
	fail := func(reason string, err error) (*ipTunnel, *wire.HelloError, string) {
		t.release(tn)
		return nil, wire.Errorf(wire.CodeInternal, "%s; tell the TP administrator (tpd's log has the cause)", reason), ": " + err.Error()
	}
	dev, err := tun.Open(t.opts.TunName)
	if err != nil {
		return fail("the TP server could not create a tun device for the tunnel", err)
	}
	tn.dev = dev
	if err := tun.Up(ctx, dev.Name(), t.opts.MTU); err != nil {
		_ = dev.Close()
		return fail("the TP server could not bring up its tun device", err)
	}
	for _, a := range tn.addrs {
		if err := tun.AddRoute(ctx, dev.Name(), a); err != nil {
			_ = dev.Close()
			return fail("the TP server could not route the tunnel's addresses", err)
		}
	}
	if err := t.hook(ctx, tn, "up"); err != nil {
		_ = dev.Close()
		return fail("the TP server's IP tunnel hook refused the tunnel", err)
	}
	t.mu.Lock()
	if t.byDev[id.DeviceID] != nil { // another tunnel of the device won the race
		t.mu.Unlock()
		_ = dev.Close()
		return fail(id.String()+" opened another IP tunnel at the same moment; try again", errors.New("concurrent tunnels of one device"))
	}
	t.byDev[id.DeviceID] = tn
	t.mu.Unlock()
	t.stats.active.Add(1)
	return tn, nil, ""
}

func (t *IPTunnels) release(tn *ipTunnel) {
	t.mu.Lock()
	for _, a := range tn.pooled {
		if t.used[a] == tn.id.DeviceID {
			delete(t.used, a)
		}
	}
	t.mu.Unlock()
}

// close forgets the tunnel: the hook's down event, the tun (and with it its
// routes), the pool addresses.
func (t *IPTunnels) close(tn *ipTunnel) {
	_ = tn.dev.Close()
	ctx, cancel := context.WithTimeout(context.Background(), t.opts.HookTimeout)
	_ = t.hook(ctx, tn, "down")
	cancel()
	t.mu.Lock()
	if t.byDev[tn.id.DeviceID] == tn {
		delete(t.byDev, tn.id.DeviceID)
	}
	t.mu.Unlock()
	t.release(tn)
	t.stats.active.Add(-1)
}

// maxHookOutput bounds what of a failing hook's output is quoted.
const maxHookOutput = 512

// hook runs the configured program for event ("up" or "down").
func (t *IPTunnels) hook(ctx context.Context, tn *ipTunnel, event string) error {
	if len(t.opts.Hook) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, t.opts.HookTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, t.opts.Hook[0], t.opts.Hook[1:]...)
	cmd.WaitDelay = time.Second
	addrs := make([]string, len(tn.addrs))
	for i, a := range tn.addrs {
		addrs[i] = a.String()
	}
	var routes []string
	if rp := tn.routes.Load(); rp != nil {
		for _, r := range *rp {
			routes = append(routes, fmt.Sprintf("%s-%s/%d", r.Start, r.End, r.Protocol))
		}
	}
	// Not tpd's whole environment, which may hold secrets (a database
	// password): PATH, and what the hook is for.
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")},
		"TUN_DEV_NAME="+tn.dev.Name(),
		"TUN_CLIENT_ID="+tn.id.DeviceID,
		"TP_EVENT="+event,
		"TP_USER="+tn.id.User,
		"TP_DEVICE="+tn.id.Device,
		"TP_DEVICE_ID="+tn.id.DeviceID,
		"TP_GROUPS="+strings.Join(tn.id.Groups, ","),
		"TP_SERIAL="+tn.id.Serial,
		"TP_CERT_EXPIRY="+tn.id.NotAfter.UTC().Format(time.RFC3339),
		"TP_ADDRESSES="+strings.Join(addrs, " "),
		"TP_ROUTES="+strings.Join(routes, " "),
		"TP_MTU="+strconv.Itoa(t.opts.MTU),
	)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return fmt.Errorf("%s did not finish within %s", t.opts.Hook[0], t.opts.HookTimeout)
	}
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if len(msg) > maxHookOutput {
			msg = msg[:maxHookOutput] + "…"
		}
		return fmt.Errorf("%s: %v: %s", t.opts.Hook[0], err, msg)
	}
	return nil
}

// regrant applies a re-check's decision: the same addresses and a new set of
// routes, advertised at once; a decision that moves the addresses ends the
// tunnel (the client reconnects and gets the new ones).
func (tn *ipTunnel) regrant(d authz.Decision, target netip.Prefix, proto int) {
	g := d.IP
	if g == nil {
		g = &authz.IPGrant{}
	}
	if len(g.Addresses) > 0 && !slices.Equal(g.Addresses, tn.addrs) {
		tn.end(&wire.RevokedError{Reason: "the policy assigns this device other addresses; reconnect"})
		return
	}
	routes := routesOf(g, target, proto)
	if old := tn.routes.Load(); old != nil && slices.Equal(*old, routes) {
		return
	}
	if len(routes) == 0 {
		tn.end(&wire.RevokedError{Reason: "the policy no longer grants this device any prefix"})
		return
	}
	tn.routes.Store(&routes)
	if err := tn.capsule(wire.AppendRoutes(nil, routes)); err != nil {
		tn.end(err)
	}
}

func (tn *ipTunnel) capsule(b []byte) error {
	tn.wmu.Lock()
	defer tn.wmu.Unlock()
	return tn.writeCap(b)
}

// allowedOut reports whether a packet from the peer may enter the network: its
// source is assigned to the peer, its destination and protocol granted.
func (tn *ipTunnel) allowedOut(h wire.IPHeader) *atomic.Int64 {
	c := &tn.t.stats
	if !slices.ContainsFunc(tn.addrs, func(p netip.Prefix) bool { return p.Contains(h.Src) }) {
		return &c.dropSrc
	}
	if !h.Dst.IsGlobalUnicast() && !h.Dst.IsPrivate() || h.Dst.IsLoopback() || h.Dst.IsMulticast() {
		return &c.dropDst
	}
	for _, r := range *tn.routes.Load() {
		if r.Contains(h.Dst, h.Proto) {
			return nil
		}
	}
	return &c.dropDst
}

// fromPeer handles one HTTP Datagram payload from the peer.
func (tn *ipTunnel) fromPeer(p []byte) error {
	c := &tn.t.stats
	pkt, ok := wire.ParseIPDatagram(p)
	if !ok {
		return nil // another context ID: dropped (RFC 9484 §6)
	}
	h, err := wire.ParseIPHeader(pkt)
	if err != nil {
		c.dropBad.Add(1)
		tn.drops.Add(1)
		return nil
	}
	if drop := tn.allowedOut(h); drop != nil {
		drop.Add(1)
		tn.drops.Add(1)
		return nil
	}
	if !tn.up.allow(time.Now(), len(pkt), tn.t.opts.PacketsPerSecond, tn.t.opts.BytesPerSecond) {
		c.dropRate.Add(1)
		tn.drops.Add(1)
		return nil
	}
	if _, err := tn.dev.Write(pkt); err != nil {
		// The kernel refuses some packets (no route, bad header): dropped, as a
		// router would, without ending the tunnel.
		c.dropBad.Add(1)
		tn.drops.Add(1)
		return nil
	}
	c.pktUp.Add(1)
	c.bytesUp.Add(int64(len(pkt)))
	tn.pkts[0].Add(1)
	tn.bytes[0].Add(int64(len(pkt)))
	return nil
}

// readDatagrams takes the peer's datagrams off the HTTP/3 stream's queue
// (quic-go keeps 32 per stream and drops beyond) onto a longer one of its own,
// so that the tun writes do not hold that queue. It does not stop the drops:
// http3's reader fills the 32 in a burst before this goroutine runs. `tp ip`
// reads below http3 (wire.H3Datagrams); here quic-go's http3.Server starts its
// reader whenever a client announces HTTP Datagrams (docs/IP.md, Measured).
func (tn *ipTunnel) readDatagrams(ctx context.Context, recv func(context.Context) ([]byte, error)) error {
	q := make(chan []byte, datagramBacklog)
	done := make(chan struct{})
	defer func() { <-done }()
	defer close(q)
	go func() {
		defer close(done)
		for p := range q {
			_ = tn.fromPeer(p)
		}
	}()
	for {
		p, err := recv(ctx)
		if err != nil {
			return err
		}
		select {
		case q <- p:
		default:
			tn.t.stats.dropRate.Add(1) // the tun device does not keep up
			tn.drops.Add(1)
		}
	}
}

// datagramBacklog bounds the datagrams waiting for the tun device, per tunnel.
const datagramBacklog = 1024

// readCapsules reads the peer's capsules: DATAGRAM (packets, over HTTP/2),
// ADDRESS_REQUEST (answered with the addresses the tunnel has), and others,
// which are ignored (RFC 9297 §3.2). A malformed capsule ends the tunnel.
func (tn *ipTunnel) readCapsules(ctx context.Context, r *bufio.Reader) error {
	for {
		c, err := wire.ReadIPCapsule(r)
		if err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("reading the client's capsules: %w", err)
		}
		switch c.Type {
		case wire.IPCapsuleDatagram:
			if err := tn.fromPeer(c.Payload); err != nil {
				return err
			}
		case wire.IPCapsuleAddressRequest:
			reqs, err := wire.ParseAddresses(c.Payload)
			if err != nil {
				return fmt.Errorf("the client's ADDRESS_REQUEST is malformed: %w", err)
			}
			if err := tn.capsule(wire.AppendAddresses(nil, wire.IPCapsuleAddressAssign, tn.answer(reqs))); err != nil {
				return err
			}
		case wire.IPCapsuleAddressAssign, wire.IPCapsuleRouteAdvertisement:
			// The client's own addresses and routes: TP routes nothing to a
			// client's networks, so they are read and not used.
			if c.Type == wire.IPCapsuleRouteAdvertisement {
				if _, err := wire.ParseRoutes(c.Payload); err != nil {
					return fmt.Errorf("the client's ROUTE_ADVERTISEMENT is malformed: %w", err)
				}
			} else if _, err := wire.ParseAddresses(c.Payload); err != nil {
				return fmt.Errorf("the client's ADDRESS_ASSIGN is malformed: %w", err)
			}
		}
	}
}

// answer is the ADDRESS_ASSIGN for an ADDRESS_REQUEST: the tunnel's addresses
// (TP assigns once per tunnel), each request answered with the address of its
// family, or rejected (an unspecified address) when there is none.
func (tn *ipTunnel) answer(reqs []wire.AssignedAddress) []wire.AssignedAddress {
	var out []wire.AssignedAddress
	used := map[netip.Prefix]bool{}
	for _, q := range reqs {
		i := slices.IndexFunc(tn.addrs, func(p netip.Prefix) bool { return p.Addr().Is4() == q.Prefix.Addr().Is4() })
		if i < 0 {
			z := netip.IPv6Unspecified()
			if q.Prefix.Addr().Is4() {
				z = netip.IPv4Unspecified()
			}
			out = append(out, wire.AssignedAddress{RequestID: q.RequestID, Prefix: netip.PrefixFrom(z, z.BitLen())})
			continue
		}
		out = append(out, wire.AssignedAddress{RequestID: q.RequestID, Prefix: tn.addrs[i]})
		used[tn.addrs[i]] = true
	}
	for _, a := range tn.addrs {
		if !used[a] {
			out = append(out, wire.AssignedAddress{Prefix: a})
		}
	}
	return out
}

// fromTun sends what the kernel routes to the peer's addresses, if it comes
// from a granted prefix (or is an ICMP error about a packet the peer sent).
func (tn *ipTunnel) fromTun(ctx context.Context) error {
	c := &tn.t.stats
	buf := make([]byte, 1+wire.MaxIPPacket)
	for {
		n, err := tn.dev.Read(buf[1:])
		if err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			return fmt.Errorf("reading the tunnel's tun device: %w", err)
		}
		pkt := buf[1 : 1+n]
		h, err := wire.ParseIPHeader(pkt)
		if err != nil {
			c.dropBad.Add(1)
			continue
		}
		if !tn.allowedIn(h, pkt) {
			c.dropIn.Add(1)
			tn.drops.Add(1)
			continue
		}
		if !tn.down.allow(time.Now(), n, tn.t.opts.PacketsPerSecond, tn.t.opts.BytesPerSecond) {
			c.dropRate.Add(1)
			tn.drops.Add(1)
			continue
		}
		buf[0] = 0 // context ID 0
		err = tn.sendDg(buf[:1+n])
		var tooLarge *quic.DatagramTooLargeError
		switch {
		case errors.As(err, &tooLarge):
			c.dropBig.Add(1)
			tn.drops.Add(1)
			// Tell the sender on the network side (PMTU discovery); never
			// below the minimum MTU of its family.
			if mtu := wire.IPPacketMTU(tooLarge.MaxDatagramPayloadSize, tn.dgStream); mtu >= wire.PacketTooBigFloor(h.Src) {
				if icmp := wire.PacketTooBig(pkt, mtu); icmp != nil {
					_, _ = tn.dev.Write(icmp)
				}
			}
		case err != nil:
			return fmt.Errorf("sending to the client: %w", err)
		default:
			c.pktDown.Add(1)
			c.bytesDown.Add(int64(n))
			tn.pkts[1].Add(1)
			tn.bytes[1].Add(int64(n))
		}
	}
}

// allowedIn reports whether a packet from the network may reach the peer: to
// one of its addresses, from a granted prefix and protocol, or an ICMP error
// about a packet the peer could have sent.
func (tn *ipTunnel) allowedIn(h wire.IPHeader, pkt []byte) bool {
	if !slices.ContainsFunc(tn.addrs, func(p netip.Prefix) bool { return p.Contains(h.Dst) }) {
		return false
	}
	for _, r := range *tn.routes.Load() {
		if r.Contains(h.Src, h.Proto) {
			return true
		}
	}
	// ICMP errors come from routers on the way: allowed when the packet they
	// quote went from the peer to a granted destination.
	var quoted []byte
	switch {
	case h.Src.Is4() && h.Proto == wire.ProtoICMP:
		ihl := int(pkt[0]&0x0f) * 4
		if len(pkt) >= ihl+8+20 && (pkt[ihl] == 3 || pkt[ihl] == 11 || pkt[ihl] == 12) {
			quoted = pkt[ihl+8:]
		}
	case h.Src.Is6() && h.Proto == wire.ProtoICMPv6:
		if len(pkt) >= 40+8+40 && pkt[40] < 128 {
			quoted = pkt[48:]
		}
	}
	if len(quoted) < 20 {
		return false
	}
	var qsrc, qdst netip.Addr
	var qproto uint8
	if quoted[0]>>4 == 4 {
		qsrc, qdst, qproto = netip.AddrFrom4([4]byte(quoted[12:16])), netip.AddrFrom4([4]byte(quoted[16:20])), quoted[9]
	} else if len(quoted) >= 40 {
		qsrc, qdst, qproto = netip.AddrFrom16([16]byte(quoted[8:24])), netip.AddrFrom16([16]byte(quoted[24:40])), quoted[6]
	}
	return qsrc == h.Dst && tn.allowedOut(wire.IPHeader{Src: qsrc, Dst: qdst, Proto: qproto}) == nil
}
