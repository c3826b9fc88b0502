package masque

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
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

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/lib/tun"
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

// IPTunnels serves CONNECT-IP for a proxy server: the address pool, the live
// tunnels by device and the counters.
type IPTunnels struct {
	opts IPTunnelOptions

	mu     sync.Mutex
	used   map[netip.Addr]string // pool addresses in use, by device ID
	byDev  map[string]*IPTunnel  // the live tunnel of each device
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
	return &IPTunnels{opts: opts, used: map[netip.Addr]string{}, byDev: map[string]*IPTunnel{}}, nil
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
	DroppedQueue            int64 // from the peer, finding the tunnel's receive queue full (the tun device does not keep up)
	// Packets that crossed the request stream in DATAGRAM capsules rather
	// than QUIC DATAGRAM frames: all of them over HTTP/2, TCP segments over
	// HTTP/3 when the client asked for TCP on the stream. Up: received.
	// A segment carried whole counts as the packets it makes.
	StreamUp, StreamDown int64
	// TCP segments carried whole (TCP_SEGMENT capsules), when the client
	// asked for them (wire.TCPSegmentsHeader).
	SegmentsUp, SegmentsDown int64
}

type ipCounters struct {
	opened, refused, active                              atomic.Int64
	pktUp, pktDown, bytesUp, bytesDown                   atomic.Int64
	dropSrc, dropDst, dropIn, dropRate, dropBad, dropBig atomic.Int64
	dropQueue                                            atomic.Int64
	streamUp, streamDown                                 atomic.Int64
	segUp, segDown                                       atomic.Int64
}

// Stats returns the counters.
func (t *IPTunnels) Stats() IPStats {
	c := &t.stats
	return IPStats{
		Opened: c.opened.Load(), Refused: c.refused.Load(), Active: c.active.Load(),
		PacketsUp: c.pktUp.Load(), PacketsDown: c.pktDown.Load(), BytesUp: c.bytesUp.Load(), BytesDown: c.bytesDown.Load(),
		DroppedSource: c.dropSrc.Load(), DroppedDestination: c.dropDst.Load(), DroppedInbound: c.dropIn.Load(),
		DroppedRate: c.dropRate.Load(), DroppedMalformed: c.dropBad.Load(), DroppedTooBig: c.dropBig.Load(),
		DroppedQueue: c.dropQueue.Load(), StreamUp: c.streamUp.Load(), StreamDown: c.streamDown.Load(),
		SegmentsUp: c.segUp.Load(), SegmentsDown: c.segDown.Load(),
	}
}

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

// IPTunnel is one live CONNECT-IP tunnel (IPTunnels.Open).
type IPTunnel struct {
	t      *IPTunnels
	dev    *tun.Device
	id     authz.Identity
	addrs  []netip.Prefix // assigned to the peer
	pooled []netip.Addr   // which of them came from the pool
	routes atomic.Pointer[[]wire.IPRoute]
	end    context.CancelCauseFunc

	wmu      sync.Mutex // one capsule write at a time
	writeCap func([]byte) error
	sendDg   func([]byte) error    // one HTTP Datagram payload
	dgStream int64                 // the HTTP/3 request stream whose datagrams sendDg sends
	tryDg    func() ([]byte, bool) // the next queued datagram without waiting (ReceiveQueued)
	dgPrefix []byte                // what sendDg's datagrams start with before the context ID (SendBelowHTTP3)
	capOut   []byte                // DATAGRAM capsules gathered for one write (HTTP/2, TCP on the stream; fromTun's)
	tcpOnStr bool                  // TCP segments go as capsules on the stream (TCPOnStream)
	segments bool                  // TCP segments cross whole (TCPSegments)

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
	return b.allowN(now, 1, n, pps, bps)
}

// allowN takes pkts packets of n bytes in all (a segment's) at now, or
// reports that the bucket holds less than that. A segment larger than the
// bucket (bounds below 64 packets or 64 KiB a second) needs only a full
// bucket and leaves it in debt, which later packets wait out: the rate
// holds on average, and a segment is never refused for good.
func (b *rateBucket) allowN(now time.Time, pkts, n int, pps int, bps int64) bool {
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
	if b.pkts < min(float64(pkts), float64(pps)) || b.bytes < min(float64(n), float64(bps)) {
		return false
	}
	b.pkts -= float64(pkts)
	b.bytes -= float64(n)
	return true
}

// RoutesOf turns a grant into ROUTE_ADVERTISEMENT order (RFC 9484 §4.7.3),
// narrowed to the request's scope. Overlapping prefixes of one protocol are
// merged by keeping the wider one.
func RoutesOf(g *authz.IPGrant, target netip.Prefix, proto int) []wire.IPRoute {
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

// CountRefused counts a CONNECT-IP request refused (IPStats.Refused).
func (t *IPTunnels) CountRefused() { t.stats.refused.Add(1) }

// Attach sets how the tunnel reaches its peer: writeCap writes capsules on
// the request stream; sendDg sends one HTTP Datagram payload on HTTP/3
// request stream dgStream, and nil sends DATAGRAM capsules on the stream
// instead (HTTP/2, RFC 9297 §3.5).
func (tn *IPTunnel) Attach(writeCap, sendDg func([]byte) error, dgStream int64) {
	tn.wmu.Lock()
	tn.writeCap = writeCap
	tn.wmu.Unlock()
	if sendDg == nil {
		// One write (a TLS record, a flush) for each batch from the tun
		// device, not for each packet: toPeer gathers, fromTun writes.
		sendDg = func(p []byte) error {
			tn.capOut = wire.AppendIPCapsule(tn.capOut, wire.IPCapsuleDatagram, p)
			tn.t.stats.streamDown.Add(1)
			return nil
		}
	}
	tn.sendDg, tn.dgStream = sendDg, dgStream
}

// TCPOnStream makes the tunnel send TCP segments, all but pure
// acknowledgements (wire.OnStream), as DATAGRAM capsules on the request
// stream, the rest as datagrams: what a client over HTTP/3 asks for with
// wire.StreamTCPHeader. Call it after Attach, before Run.
func (tn *IPTunnel) TCPOnStream() { tn.tcpOnStr = true }

// TCPSegments makes the tunnel take and send TCP segments whole
// (TCP_SEGMENT capsules on the request stream): what a client asks for with
// wire.TCPSegmentsHeader, over HTTP/2, or over HTTP/3 with TCP on the
// stream. Call it after Attach (and TCPOnStream), before Run.
func (tn *IPTunnel) TCPSegments() { tn.segments = true }

// Announce sends the peer its addresses and routes, the tunnel's first
// capsules: the routes as they are now, after any re-check since Open.
func (tn *IPTunnel) Announce() error {
	tn.wmu.Lock()
	defer tn.wmu.Unlock()
	var first []byte
	first = wire.AppendAddresses(first, wire.IPCapsuleAddressAssign, assigned(tn.addrs))
	first = wire.AppendRoutes(first, *tn.routes.Load())
	return tn.writeCap(first)
}

// Run moves packets between the tun device and the peer (capsules, and
// recvDg's datagrams when it is not nil) until one direction ends or ctx
// does, and returns why. The caller ends ctx and closes the device
// (CloseDevice) after it, which stops the rest.
func (tn *IPTunnel) Run(ctx context.Context, capsules io.Reader, recvDg func(context.Context) ([]byte, error)) error {
	done := make(chan error, 3)
	go func() { done <- tn.fromTun(ctx) }()
	size := 64 << 10
	if tn.segments {
		size = segmentReadBuffer // a segment's capsule is read in place too
	}
	go func() { done <- tn.readCapsules(ctx, bufio.NewReaderSize(capsules, size)) }()
	if recvDg != nil {
		go func() { done <- tn.readDatagrams(ctx, recvDg) }()
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// segmentReadBuffer is the capsule reader's buffer where TCP segments
// cross whole: room for the longest capsule (wire.MaxIPCapsule) and what
// follows it.
const segmentReadBuffer = 128 << 10

// CloseDevice closes the tun device, which unblocks Run's reader of it.
func (tn *IPTunnel) CloseDevice() { _ = tn.dev.Close() }

// Name is the tun device's name.
func (tn *IPTunnel) Name() string { return tn.dev.Name() }

// IPTunnelCounts are one tunnel's packets and bytes each way (up: peer →
// network) and its dropped packets.
type IPTunnelCounts struct {
	PacketsUp, PacketsDown int64
	BytesUp, BytesDown     int64
	Dropped                int64
}

// Counts returns the tunnel's counters.
func (tn *IPTunnel) Counts() IPTunnelCounts {
	return IPTunnelCounts{
		PacketsUp: tn.pkts[0].Load(), PacketsDown: tn.pkts[1].Load(),
		BytesUp: tn.bytes[0].Load(), BytesDown: tn.bytes[1].Load(),
		Dropped: tn.drops.Load(),
	}
}

func assigned(addrs []netip.Prefix) []wire.AssignedAddress {
	out := make([]wire.AssignedAddress, len(addrs))
	for i, a := range addrs {
		out[i] = wire.AssignedAddress{Prefix: a}
	}
	return out
}

// Open picks the peer's addresses, creates its tun, routes the addresses
// through it and runs the hook. routes are what the peer may reach (the hook
// sees them); end ends the tunnel, and is set before the tunnel is in the
// table where a newer tunnel of the device finds it. A device that has a tunnel already loses it:
// one tunnel per device, so a client that reconnects gets its addresses back.
func (t *IPTunnels) Open(ctx context.Context, id authz.Identity, g *authz.IPGrant, routes []wire.IPRoute, end context.CancelCauseFunc) (_ *IPTunnel, _ *wire.HelloError, detail string) {
	t.mu.Lock()
	if old := t.byDev[id.DeviceID]; old != nil {
		delete(t.byDev, id.DeviceID)
		t.mu.Unlock()
		old.end(&wire.EndError{Code: wire.QUICPeerReset, By: "server", Reason: "the same device opened a new IP tunnel"})
		t.mu.Lock()
	}
	tn := &IPTunnel{t: t, id: id, end: end}
	tn.routes.Store(&routes)
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
	fail := func(reason string, err error) (*IPTunnel, *wire.HelloError, string) {
		t.release(tn)
		return nil, wire.Errorf(wire.CodeInternal, "%s; tell the TP administrator (tpd's log has the cause)", reason), ": " + err.Error()
	}
	dev, err := tun.Open(t.opts.TunName)
	if err != nil {
		return fail("the TP server could not create a tun device for the tunnel", err)
	}
	tn.dev = dev
	if err := dev.Up(ctx, t.opts.MTU); err != nil {
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
	t.stats.opened.Add(1)
	return tn, nil, ""
}

func (t *IPTunnels) release(tn *IPTunnel) {
	t.mu.Lock()
	for _, a := range tn.pooled {
		if t.used[a] == tn.id.DeviceID {
			delete(t.used, a)
		}
	}
	t.mu.Unlock()
}

// Close forgets the tunnel: the hook's down event, the tun (and with it its
// routes), the pool addresses.
func (t *IPTunnels) Close(tn *IPTunnel) {
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
func (t *IPTunnels) hook(ctx context.Context, tn *IPTunnel, event string) error {
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

// Regrant applies a re-check's decision: the same addresses and a new set of
// routes, advertised at once; a decision that moves the addresses ends the
// tunnel (the client reconnects and gets the new ones).
func (tn *IPTunnel) Regrant(d authz.Decision, target netip.Prefix, proto int) {
	g := d.IP
	if g == nil {
		g = &authz.IPGrant{}
	}
	if len(g.Addresses) > 0 && !slices.Equal(g.Addresses, tn.addrs) {
		tn.end(&wire.RevokedError{Reason: "the policy assigns this device other addresses; reconnect"})
		return
	}
	routes := RoutesOf(g, target, proto)
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

// capsule writes b to the peer; before Attach there is no peer to write to
// yet, and Announce sends the routes a re-check set meanwhile.
func (tn *IPTunnel) capsule(b []byte) error {
	tn.wmu.Lock()
	defer tn.wmu.Unlock()
	if tn.writeCap == nil {
		return nil
	}
	return tn.writeCap(b)
}

// allowedOut reports whether a packet from the peer may enter the network: its
// source is assigned to the peer, its destination and protocol granted.
func (tn *IPTunnel) allowedOut(h wire.IPHeader) *atomic.Int64 {
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

// fromPeer handles one HTTP Datagram payload from the peer: checked, then
// added to w's batch for the tun device (flushTun writes it, and counts it
// sent once the kernel took it).
func (tn *IPTunnel) fromPeer(p []byte, w *tun.Writer) {
	c := &tn.t.stats
	pkt, ok := wire.ParseIPDatagram(p)
	if !ok {
		return // another context ID: dropped (RFC 9484 §6)
	}
	h, err := wire.ParseIPHeader(pkt)
	if err != nil {
		c.dropBad.Add(1)
		tn.drops.Add(1)
		return
	}
	if drop := tn.allowedOut(h); drop != nil {
		drop.Add(1)
		tn.drops.Add(1)
		return
	}
	if !tn.up.allow(time.Now(), len(pkt), tn.t.opts.PacketsPerSecond, tn.t.opts.BytesPerSecond) {
		c.dropRate.Add(1)
		tn.drops.Add(1)
		return
	}
	if full, err := w.Add(pkt); err == nil && full {
		tn.flushTun(w)
	} else if err != nil {
		tn.countTun(w) // a packet too long for the batch, written alone
	}
}

// segmentFromPeer handles a TCP_SEGMENT capsule's payload from the peer:
// checked as a packet is (its headers are every packet's), counted as the
// packets it makes, and written whole for the kernel to cut.
func (tn *IPTunnel) segmentFromPeer(p []byte, w *tun.Writer) {
	c := &tn.t.stats
	seg, size, ok := wire.ParseIPSegment(p)
	if !ok {
		return // another context ID: dropped, as a datagram's
	}
	n, err := tun.CheckSegment(seg, size)
	if err != nil {
		c.streamUp.Add(1)
		c.dropBad.Add(1) // how many packets it meant to be is not known: one
		tn.drops.Add(1)
		return
	}
	c.streamUp.Add(int64(n))
	c.segUp.Add(1)
	bytes := tun.SegmentWireBytes(seg, n) // as its packets cross the network
	h, err := wire.ParseIPHeader(seg)
	if err != nil {
		c.dropBad.Add(int64(n))
		tn.drops.Add(int64(n))
		return
	}
	if drop := tn.allowedOut(h); drop != nil {
		drop.Add(int64(n))
		tn.drops.Add(int64(n))
		return
	}
	if !tn.up.allowN(time.Now(), n, bytes, tn.t.opts.PacketsPerSecond, tn.t.opts.BytesPerSecond) {
		c.dropRate.Add(int64(n))
		tn.drops.Add(int64(n))
		return
	}
	_ = w.WriteSegment(seg, size) // counted: refused as dropped, taken as sent
	tn.countTun(w)
}

// flushTun writes w's batch to the tun device. The kernel refuses some
// packets (no route, bad header): dropped, as a router would, and counted,
// without ending the tunnel.
func (tn *IPTunnel) flushTun(w *tun.Writer) {
	_, _ = w.Flush()
	tn.countTun(w)
}

// countTun counts what w wrote since the last count: the packets the kernel
// took as sent, each one it refused as dropped (a refused segment of several
// joined packets counts every one of them).
func (tn *IPTunnel) countTun(w *tun.Writer) {
	wc := w.TakeCounts()
	if wc.Packets > 0 {
		c := &tn.t.stats
		c.pktUp.Add(wc.Packets)
		c.bytesUp.Add(wc.Bytes)
		tn.pkts[0].Add(wc.Packets)
		tn.bytes[0].Add(wc.Bytes)
	}
	if wc.Refused > 0 {
		tn.refused(int(wc.Refused))
	}
}

func (tn *IPTunnel) refused(n int) {
	tn.t.stats.dropBad.Add(int64(n))
	tn.drops.Add(int64(n))
}

// readDatagrams writes the peer's datagrams to the tun device, as many at a
// time as have arrived (up to a batch: one system call for a TCP flow's
// packets). tpd reads them below http3 (wire.H3ServerConn) on a queue of
// their own (ReceiveQueued). Otherwise they come off http3's queue of 32 per
// stream, which drops beyond, and readDatagrams moves them onto a longer one
// of its own so that the tun writes do not hold that queue; that does not
// stop the drops, as http3's reader fills the 32 in a burst before this
// goroutine runs (docs/IP.md).
func (tn *IPTunnel) readDatagrams(ctx context.Context, recv func(context.Context) ([]byte, error)) error {
	w := tn.dev.NewWriter(tn.t.opts.MTU)
	if tn.tryDg != nil {
		for {
			p, err := recv(ctx)
			if err != nil {
				return err
			}
			tn.fromPeer(p, w)
			for range tun.WriteBatchSize - 1 {
				p, ok := tn.tryDg()
				if !ok {
					break
				}
				tn.fromPeer(p, w)
			}
			tn.flushTun(w)
		}
	}
	q := make(chan []byte, datagramBacklog)
	done := make(chan struct{})
	defer func() { <-done }()
	defer close(q)
	go func() {
		defer close(done)
		for p := range q {
			tn.fromPeer(p, w)
		more:
			for range tun.WriteBatchSize - 1 {
				select {
				case p, ok := <-q:
					if !ok {
						break more
					}
					tn.fromPeer(p, w)
				default:
					break more
				}
			}
			tn.flushTun(w)
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
			tn.t.stats.dropQueue.Add(1) // the tun device does not keep up
			tn.drops.Add(1)
		}
	}
}

// SendBelowHTTP3 makes the tunnel send its packets with send, each
// datagram starting with prefix (the request's quarter stream ID), which the
// tunnel keeps in its buffer: no allocation or copy of each packet of its own
// (wire.H3DatagramFlow.SendQUIC). Call it after Attach, before Run.
func (tn *IPTunnel) SendBelowHTTP3(prefix []byte, send func([]byte) error) {
	tn.dgPrefix, tn.sendDg = prefix, send
}

// ReceiveQueued says that Run's recvDg takes the datagrams off a queue of
// their own (wire.H3DatagramFlow), and try takes the next one there without
// waiting: Run then writes them to the tun device as they come, without a
// second queue.
func (tn *IPTunnel) ReceiveQueued(try func() ([]byte, bool)) { tn.tryDg = try }

// CountQueueDrop counts one datagram from the peer that found the tunnel's
// receive queue full.
func (tn *IPTunnel) CountQueueDrop() {
	tn.t.stats.dropQueue.Add(1)
	tn.drops.Add(1)
}

// datagramBacklog bounds the datagrams waiting for the tun device, per tunnel.
const datagramBacklog = 1024

// readCapsules reads the peer's capsules: DATAGRAM (packets, over HTTP/2),
// ADDRESS_REQUEST (answered with the addresses the tunnel has), and others,
// which are ignored (RFC 9297 §3.2). A malformed capsule ends the tunnel.
func (tn *IPTunnel) readCapsules(ctx context.Context, r *bufio.Reader) error {
	w := tn.dev.NewWriter(tn.t.opts.MTU)
	for {
		if w.Len() > 0 && !wire.CapsuleBuffered(r) {
			tn.flushTun(w) // before a read that may wait
		}
		c, err := wire.NextIPCapsule(r) // its payload is used before the next read
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
			tn.t.stats.streamUp.Add(1)
			tn.fromPeer(c.Payload, w)
		case wire.IPCapsuleTCPSegment:
			if tn.segments { // otherwise a capsule type this tunnel does not know: skipped
				tn.segmentFromPeer(c.Payload, w)
			}
		case wire.IPCapsuleAddressRequest:
			tn.flushTun(w) // the answer may wait on the client: nothing waits behind it
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
func (tn *IPTunnel) answer(reqs []wire.AssignedAddress) []wire.AssignedAddress {
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
func (tn *IPTunnel) fromTun(ctx context.Context) error {
	c := &tn.t.stats
	// Buffers for the tunnel's life: [dgPrefix][context ID][packet].
	hl := len(tn.dgPrefix)
	r := tn.dev.NewReader(tn.t.opts.MTU, hl+1)
	for {
		before := r.Dropped()
		var batch [][]byte
		var size int
		var err error
		if tn.segments {
			batch, size, err = r.ReadSegment()
		} else {
			batch, err = r.Read()
		}
		if d := r.Dropped() - before; d > 0 { // reads that did not split into packets
			c.dropBad.Add(d)
			tn.drops.Add(d)
		}
		if err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			return fmt.Errorf("reading the tunnel's tun device: %w", err)
		}
		if size > 0 {
			tn.segmentToPeer(batch[0][hl+1:], size)
		} else {
			for _, b := range batch {
				if err := tn.toPeer(b, hl); err != nil {
					return err
				}
			}
		}
		if len(tn.capOut) > 0 {
			err := tn.capsule(tn.capOut)
			tn.capOut = tn.capOut[:0]
			if err != nil {
				return fmt.Errorf("sending to the client: %w", err)
			}
		}
	}
}

// toPeer sends b, one packet from the tun device behind room for the
// datagram's prefix of hl bytes and the context ID, to the peer if the
// packet may go there.
func (tn *IPTunnel) toPeer(b []byte, hl int) error {
	c := &tn.t.stats
	pkt := b[hl+1:]
	n := len(pkt)
	h, err := wire.ParseIPHeader(pkt)
	if err != nil {
		c.dropBad.Add(1)
		return nil
	}
	if !tn.allowedIn(h, pkt) {
		c.dropIn.Add(1)
		tn.drops.Add(1)
		return nil
	}
	if !tn.down.allow(time.Now(), n, tn.t.opts.PacketsPerSecond, tn.t.opts.BytesPerSecond) {
		c.dropRate.Add(1)
		tn.drops.Add(1)
		return nil
	}
	copy(b, tn.dgPrefix)
	b[hl] = 0 // context ID 0
	if tn.tcpOnStr && wire.OnStream(pkt) {
		// Sent by fromTun with the rest of the batch, in one write.
		tn.capOut = wire.AppendIPCapsule(tn.capOut, wire.IPCapsuleDatagram, b[hl:])
		c.streamDown.Add(1)
	} else {
		err = tn.sendDg(b)
	}
	var tooLarge *quic.DatagramTooLargeError
	switch {
	case errors.As(err, &tooLarge):
		c.dropBig.Add(1)
		tn.drops.Add(1)
		// Tell the sender on the network side (PMTU discovery); never
		// below the minimum MTU of its family.
		if icmp := wire.PacketTooBigReply(pkt, tooLarge.MaxDatagramPayloadSize, tn.dgStream); icmp != nil {
			_, _ = tn.dev.Write(icmp)
		}
	case err != nil:
		return fmt.Errorf("sending to the client: %w", err)
	default:
		c.pktDown.Add(1)
		c.bytesDown.Add(int64(n))
		tn.pkts[1].Add(1)
		tn.bytes[1].Add(int64(n))
	}
	return nil
}

// segmentToPeer adds a TCP segment from the tun device, which
// ReadSegment kept whole, to the capsules for the peer if it may go there:
// checked as a packet is, counted as the packets it makes.
func (tn *IPTunnel) segmentToPeer(seg []byte, size int) {
	c := &tn.t.stats
	n := tun.SegmentPackets(seg, size) // ReadSegment kept it: CheckSegment passed it
	h, err := wire.ParseIPHeader(seg)
	if err != nil {
		c.dropBad.Add(int64(n))
		return
	}
	if !tn.allowedIn(h, seg) {
		c.dropIn.Add(int64(n))
		tn.drops.Add(int64(n))
		return
	}
	bytes := int64(tun.SegmentWireBytes(seg, n)) // as its packets crossed the network
	if !tn.down.allowN(time.Now(), n, int(bytes), tn.t.opts.PacketsPerSecond, tn.t.opts.BytesPerSecond) {
		c.dropRate.Add(int64(n))
		tn.drops.Add(int64(n))
		return
	}
	tn.capOut = wire.AppendIPSegment(tn.capOut, seg, size)
	c.streamDown.Add(int64(n))
	c.segDown.Add(1)
	c.pktDown.Add(int64(n))
	c.bytesDown.Add(bytes)
	tn.pkts[1].Add(int64(n))
	tn.bytes[1].Add(bytes)
}

// allowedIn reports whether a packet from the network may reach the peer: to
// one of its addresses, from a granted prefix and protocol, or an ICMP error
// about a packet the peer could have sent.
func (tn *IPTunnel) allowedIn(h wire.IPHeader, pkt []byte) bool {
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
