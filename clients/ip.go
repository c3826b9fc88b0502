package clients

// `tp ip`: a CONNECT-IP (RFC 9484) tunnel from a local tun device to the TP
// server's proxy name over HTTP/3. The tunnel installs the addresses and
// routes the server assigns, follows the host's address changes by migrating
// the QUIC connection to a new socket, and reconnects with backoff when the
// connection is lost. docs/IP.md describes it.

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/net/http2"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/internal/lib/tun"
	"github.com/tp-proxy/tp/internal/lib/udpgro"
	"github.com/tp-proxy/tp/proxy/wire"
)

// IPTunnel runs `tp ip`.
type IPTunnel struct {
	// Server is the TP server's UDP host:port.
	Server string
	// ProxyName is the server's proxy name (SNI and :authority).
	ProxyName string
	// TLSConfig carries RootCAs and the client certificate.
	TLSConfig *tls.Config
	// Transport is "quic" (HTTP/3), "tls" (HTTP/2 over TLS, for networks that
	// pass no UDP) or "auto" (the default: HTTP/3, then HTTP/2).
	Transport string
	// DialTimeout bounds connecting and the request. Default 15 s.
	DialTimeout time.Duration
	// TunName is the kernel's name template for the tun device. Default "tp%d".
	TunName string
	// MTU of the tun device. Default 1280.
	MTU int
	// TCPInDatagrams keeps TCP segments in QUIC DATAGRAM frames over HTTP/3,
	// as every other packet. By default the tunnel asks the server to carry
	// TCP segments other than pure acknowledgements on the request stream
	// (wire.StreamTCPHeader; docs/IP.md "TCP on the stream").
	TCPInDatagrams bool
	// NoSegments carries TCP segments cut into packets of the MTU, as RFC
	// 9484 does. By default the tunnel asks the server to carry them whole,
	// up to 64 KiB each, where they ride the stream (wire.TCPSegmentsHeader;
	// docs/IP.md "Segments whole").
	NoSegments bool
	// Logger receives one line per tunnel state change; nil discards.
	Logger *slog.Logger
	// CheckAddress is how often the tunnel checks whether the host's address
	// towards the server changed (and migrates when it did). Default 1 s.
	CheckAddress time.Duration
	// Explain, when set, turns a failed connection's error into one a person
	// can act on (Client.WhyRejected); a revoked device then stops retrying.
	Explain func(context.Context, error) error

	tunDrops atomic.Int64 // reads of the tun device dropped: segments that did not split into packets
	// OnUp, when set, is called each time the tunnel is up, with the tun
	// device's name and the addresses and routes installed.
	OnUp func(dev string, addrs, routes []netip.Prefix)
}

// ErrIPRefused wraps a refusal that reconnecting does not cure (the policy,
// an unknown or revoked device).
var ErrIPRefused = errors.New("the TP server refused the IP tunnel")

// Run creates the tun device and keeps the tunnel up until ctx ends or the
// server refuses it for good.
func (t *IPTunnel) Run(ctx context.Context) error {
	if t.TunName == "" {
		t.TunName = "tp%d"
	}
	if t.MTU == 0 {
		t.MTU = 1280
	}
	if t.CheckAddress <= 0 {
		t.CheckAddress = time.Second
	}
	log := t.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dev, err := tun.Open(t.TunName)
	if err != nil {
		return err
	}
	defer dev.Close()
	if err := dev.Up(ctx, t.MTU); err != nil {
		return fmt.Errorf("bringing up %s: %w", dev.Name(), err)
	}
	// One reader of the tun device for its whole life, whichever connection
	// carries the packets. It reads in batches (a segment of up to 64 KiB,
	// whole, or split into packets) into one of a few sets of buffers, which the
	// connection hands back once sent; while none is free (no connection is
	// up, or it does not keep up) the reader waits and the kernel's queue of
	// the tun device holds or drops packets, as on a link that is down.
	packets := make(chan tunBatch, tunReaders)
	free := make(chan *tun.Reader, tunReaders)
	for range tunReaders {
		free <- dev.NewReader(t.MTU, tunRoom)
	}
	readerDone := make(chan struct{})
	defer close(readerDone) // before dev.Close (deferred above): a reader waiting for buffers ends too
	go func() {
		defer close(packets)
		for {
			var r *tun.Reader
			select {
			case r = <-free:
			case <-readerDone:
				return
			}
			before := r.Dropped()
			pkts, size, err := r.ReadSegment()
			t.tunDrops.Add(r.Dropped() - before)
			if err != nil {
				return
			}
			select {
			case packets <- tunBatch{r: r, pkts: pkts, size: size, free: free}:
			case <-readerDone:
				return
			}
		}
	}()
	backoff := time.Second
	for {
		start := time.Now()
		err := t.session(ctx, dev, packets, log)
		if ctx.Err() != nil {
			return nil
		}
		if t.Explain != nil {
			err = t.Explain(ctx, err)
		}
		if errors.Is(err, ErrIPRefused) || errors.Is(err, authz.ErrRevoked) {
			return err
		}
		if time.Since(start) > 30*time.Second {
			backoff = time.Second
		}
		logRetry(log, err, backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// ipSession is one CONNECT-IP request's state: its carrier (HTTP/3 with
// datagrams, or HTTP/2 with DATAGRAM capsules) and the addresses installed.
type ipSession struct {
	dev       *tun.Device
	capsules  io.Reader
	wmu       sync.Mutex
	writeCap  func([]byte) error                    // one whole capsule
	sendDg    func([]byte) error                    // one HTTP Datagram payload
	dgStream  int64                                 // the HTTP/3 request stream of sendDg
	recvDg    func(context.Context) ([]byte, error) // nil: datagrams come as capsules
	dgDropped func() int64                          // datagrams the tunnel's receive queue had no room for
	quicDrops wire.DatagramDropCounter              // datagrams quic-go's queue (128) had no room for
	dgUnknown func() int64                          // datagrams for no stream of this tunnel
	tryDg     func() ([]byte, bool)                 // the next received datagram without waiting
	dgPrefix  []byte                                // what sendDg's datagrams start with before the context ID
	mtu       int
	capOut    []byte        // DATAGRAM capsules gathered for one write (HTTP/2, TCP on the stream; toServer's)
	tcpOnStr  bool          // TCP segments go as capsules on the stream: the server agreed
	segments  bool          // TCP segments cross whole: the server agreed
	segsSent  atomic.Int64  // segments sent whole
	tunDrops  *atomic.Int64 // the tunnel's count of what its tun reads lost (IPTunnel.tunDrops)
	onStream  atomic.Int64  // packets sent as capsules on the stream
	asDg      atomic.Int64  // packets sent as datagrams
	addrs     []netip.Prefix
	over      string // "HTTP/3" or "HTTP/2"
}

func (s *ipSession) capsule(b []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return s.writeCap(b)
}

// ipPath is the request path: RFC 9484's default template with target and
// ipproto "*" (whatever the policy grants).
const ipPath = "/.well-known/masque/ip/*/*/"

// session runs one connection and request until it fails.
func (t *IPTunnel) session(ctx context.Context, dev *tun.Device, packets <-chan tunBatch, log *slog.Logger) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	s := &ipSession{dev: dev, mtu: t.MTU, tunDrops: &t.tunDrops}
	var follow func(context.Context) error
	var err error
	switch t.Transport {
	case "tls":
		err = t.connectH2(ctx, s)
	case "quic":
		follow, err = t.connectH3(ctx, s)
	default: // auto: HTTP/3, and HTTP/2 over TLS where UDP does not get through
		follow, err = t.connectH3(ctx, s)
		// A refused certificate is no network's fault: no fallback.
		if err != nil && !errors.Is(err, ErrIPRefused) && !errors.Is(err, ErrCertificateRejected) && ctx.Err() == nil {
			log.Info("CONNECT-IP over HTTP/3 failed; trying HTTP/2 over TLS", "err", err)
			h3err := err
			if follow, err = nil, t.connectH2(ctx, s); err != nil {
				err = errors.Join(h3err, err)
			}
		}
	}
	if err != nil {
		if errors.Is(err, ErrIPRefused) || ctx.Err() != nil {
			return err
		}
		// One sentence with the most telling cause (reachCause); the attempts'
		// own errors stay below it for a debug log.
		return &UnreachableError{Server: t.Server, Cause: transport.ReachCause(err, t.dialTimeout(), t.Transport == "quic", (*Dialer)(nil).expiredAdvice()), Err: err}
	}
	errc := make(chan error, 4)
	go func() { errc <- t.capsules(ctx, s, log) }()
	go func() { errc <- s.toServer(ctx, packets) }()
	if s.recvDg != nil {
		go func() { errc <- s.fromServer(ctx) }()
	}
	if follow != nil {
		go func() { errc <- follow(ctx) }()
	}
	err = <-errc
	cancel(err)
	if s.dgDropped != nil {
		// Drops on arrival, counted (docs/IP.md "Throughput"); a router drops
		// packets too, but a count that grows under load says where.
		log.Info("IP tunnel connection ended", "over", s.over, "tcp_on_stream", s.tcpOnStr,
			"packets_sent_on_stream", s.onStream.Load(), "segments_sent", s.segsSent.Load(), "packets_sent_as_datagrams", s.asDg.Load(),
			"datagrams_dropped_quic", s.quicDrops.Dropped(), "datagrams_dropped_queue", s.dgDropped(),
			"datagrams_unknown_stream", s.dgUnknown(), "packets_dropped_tun_since_start", t.tunDrops.Load())
	}
	return err
}

// logRetry says why the tunnel is down and when the next attempt is: a
// tunnel that could not be set up in one sentence (retryLine), the attempts'
// errors at debug level; one that was up and ended with what ended it.
func logRetry(log *slog.Logger, err error, wait time.Duration) {
	if ue := (*UnreachableError)(nil); errors.As(err, &ue) {
		log.Warn("tp ip: " + retryLine(err, wait))
		log.Debug("tp ip: the attempts' errors", "err", ue.Err)
		return
	}
	log.Warn("IP tunnel lost; reconnecting", "err", err, "in", wait)
}

// refusal turns a non-200 answer into an error; ErrIPRefused for those that
// retrying does not cure.
func refusal(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 2048))
	reason := strings.TrimSpace(string(body))
	if reason == "" {
		reason = resp.Status
	}
	if resp.StatusCode == http.StatusForbidden || resp.StatusCode == http.StatusNotImplemented || resp.StatusCode == http.StatusBadRequest {
		return fmt.Errorf("%w: %s", ErrIPRefused, reason)
	}
	return fmt.Errorf("the TP server refused the IP tunnel (%s): %s", resp.Status, reason)
}

// connectH3 runs the request over HTTP/3 on a QUIC connection of its own,
// whose socket the returned follow function moves when the host's address
// changes.
func (t *IPTunnel) connectH3(ctx context.Context, s *ipSession) (follow func(context.Context) error, err error) {
	raddr, err := net.ResolveUDPAddr("udp", t.Server)
	if err != nil {
		return nil, fmt.Errorf("resolving %s: %w", t.Server, err)
	}
	tr, err := newIPTransport()
	if err != nil {
		return nil, err
	}
	var trMu sync.Mutex
	transports := []*quic.Transport{tr}
	closeAll := func() {
		trMu.Lock()
		for _, tr := range transports {
			_ = tr.Close()
		}
		trMu.Unlock()
	}
	tc := t.TLSConfig.Clone()
	tc.ServerName = t.ProxyName
	tc.NextProtos = []string{http3.NextProtoH3}
	dctx, dcancel := context.WithTimeout(ctx, t.dialTimeout())
	defer dcancel()
	qc, err := tr.Dial(dctx, raddr, tc, &quic.Config{
		EnableDatagrams:   true,
		KeepAlivePeriod:   15 * time.Second, // NAT bindings and stateful firewalls
		MaxIdleTimeout:    60 * time.Second,
		InitialPacketSize: 1350,               // a 1280-byte packet fits a datagram at once
		Tracer:            s.quicDrops.Tracer, // counts what quic-go's queue of 128 drops
		// The windows of TP's other QUIC connections: the stream carries
		// the tunnel's TCP segments (TCP on the stream).
		InitialStreamReceiveWindow:     wire.QUICInitialStreamWindow,
		MaxStreamReceiveWindow:         wire.QUICMaxStreamWindow,
		InitialConnectionReceiveWindow: wire.QUICInitialConnWindow,
		MaxConnectionReceiveWindow:     wire.QUICMaxConnWindow,
	})
	if err != nil {
		closeAll()
		return nil, fmt.Errorf("connecting to %s over QUIC: %w", t.Server, transport.ExplainQUIC(err, nil))
	}
	context.AfterFunc(ctx, func() { _ = qc.CloseWithError(0, ""); closeAll() })
	// The server's unidirectional streams are read here, not by http3, so
	// that http3 starts no datagram reader of its own (ip_h3.go).
	settings := serverStreams(qc)
	cc := (&http3.Transport{EnableDatagrams: true}).NewRawClientConn(qc)
	// No request before the server's SETTINGS say it takes HTTP Datagrams.
	select {
	case err := <-settings:
		if err != nil {
			_ = qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeSettingsError), "")
			return nil, err
		}
	case <-dctx.Done():
		return nil, fmt.Errorf("the TP server sent no HTTP/3 SETTINGS within %v", t.dialTimeout())
	}
	str, err := cc.OpenRequestStream(dctx)
	if err != nil {
		return nil, err
	}
	u := &url.URL{Scheme: "https", Host: t.ProxyName, Path: ipPath}
	hdr := http.Header{"Capsule-Protocol": {"?1"}}
	if !t.TCPInDatagrams {
		hdr.Set(wire.StreamTCPHeader, "?1")
		if !t.NoSegments {
			hdr.Set(wire.TCPSegmentsHeader, "?1")
		}
	}
	if err := str.SendRequestHeader(&http.Request{Method: http.MethodConnect, Proto: wire.ConnectIPProtocol, URL: u,
		Host: t.ProxyName, Header: hdr}); err != nil {
		return nil, err
	}
	resp, err := str.ReadResponse()
	if err != nil {
		// TLS 1.3 checks the client certificate after the client's side of
		// the handshake: a refused one surfaces here.
		return nil, fmt.Errorf("the TP server did not answer the IP tunnel request: %w", transport.ExplainQUIC(err, nil))
	}
	if resp.StatusCode != http.StatusOK {
		return nil, refusal(resp)
	}
	context.AfterFunc(ctx, func() { str.CancelRead(0); str.CancelWrite(0) })
	s.capsules, s.over = str, "HTTP/3"
	if !t.TCPInDatagrams && resp.Header.Get(wire.StreamTCPHeader) == "?1" {
		s.tcpOnStr = true
		s.segments = !t.NoSegments && resp.Header.Get(wire.TCPSegmentsHeader) == "?1"
	}
	s.writeCap = func(b []byte) error { _, err := str.Write(b); return err }
	// The server's packets are read below http3, whose queue of 32 per
	// stream drops most of a TCP burst (wire.H3Datagrams).
	dgs := wire.NewH3Datagrams(qc)
	flow := dgs.Flow(str, wire.IPDatagramQueue)
	s.dgUnknown = dgs.Unknown
	context.AfterFunc(ctx, flow.Close)
	// Sent below http3 too, the quarter stream ID in the packet's buffer:
	// http3 would allocate and copy each datagram to put it in front.
	s.sendDg, s.dgPrefix, s.dgStream = flow.SendQUIC, flow.AppendQuarterStreamID(nil), int64(str.StreamID())
	s.recvDg, s.tryDg, s.dgDropped = flow.ReceiveDatagram, flow.TryReceiveDatagram, flow.Dropped
	return func(ctx context.Context) error {
		return t.followAddress(ctx, qc, raddr, &trMu, &transports, t.logger())
	}, nil
}

// connectH2 runs the request over HTTP/2 (extended CONNECT, RFC 8441) on a
// TLS connection: packets travel in DATAGRAM capsules on the stream (RFC 9297
// §3.5), for networks that pass no UDP.
func (t *IPTunnel) connectH2(ctx context.Context, s *ipSession) error {
	tc := t.TLSConfig.Clone()
	tc.ServerName = t.ProxyName
	tc.NextProtos = []string{"h2"}
	dctx, dcancel := context.WithTimeout(ctx, t.dialTimeout())
	defer dcancel()
	c, err := (&tls.Dialer{Config: tc}).DialContext(dctx, "tcp", t.Server)
	if err != nil {
		return fmt.Errorf("connecting to %s over TLS: %w", t.Server, err)
	}
	context.AfterFunc(ctx, func() { _ = c.Close() })
	if p := c.(*tls.Conn).ConnectionState().NegotiatedProtocol; p != "h2" {
		return fmt.Errorf("%w: %s does not serve HTTP/2 on %s (negotiated %q); is it one of tpd's proxy-names?", ErrIPRefused, t.Server, t.ProxyName, p)
	}
	// TLS 1.3 checks the client certificate after the client's side of the
	// handshake: a refused one is an alert on the first read, which http2
	// reports only as "could not be established" or a broken pipe.
	ac := &alertConn{Conn: c}
	cc, err := (&http2.Transport{}).NewClientConn(ac)
	if err != nil {
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, _ = ac.Read(make([]byte, 1)) // no read loop runs yet: see whether an alert is waiting
		if a := ac.alert(); a != nil {
			return fmt.Errorf("the TP server ended the TLS session: %w", explainHelloErr(a, nil))
		}
		if !ac.answered() {
			// Closed before a single byte of HTTP/2 came back: the alert
			// was lost to a reset (the preface crossed it); ask the server.
			return fmt.Errorf("the TP server ended the TLS session: %w", &transport.RejectedError{Err: err})
		}
		return err
	}
	pr, pw := io.Pipe()
	context.AfterFunc(ctx, func() { _ = pw.CloseWithError(context.Cause(ctx)) })
	u := &url.URL{Scheme: "https", Host: t.ProxyName, Path: ipPath}
	hdr := http.Header{"Capsule-Protocol": {"?1"}, ":protocol": {wire.ConnectIPProtocol}}
	if !t.NoSegments {
		hdr.Set(wire.TCPSegmentsHeader, "?1")
	}
	req := (&http.Request{Method: http.MethodConnect, URL: u, Host: t.ProxyName, Body: pr, Header: hdr}).WithContext(ctx)
	resp, err := cc.RoundTrip(req)
	if err != nil {
		if a := ac.alert(); a != nil {
			err = a
		} else if !ac.answered() && ctx.Err() == nil {
			err = &transport.RejectedError{Err: err} // as above: not one byte of HTTP/2 came back
		}
		return fmt.Errorf("the TP server did not answer the IP tunnel request over HTTP/2: %w", explainHelloErr(err, nil))
	}
	if resp.StatusCode != http.StatusOK {
		return refusal(resp)
	}
	s.capsules, s.over = resp.Body, "HTTP/2"
	s.segments = !t.NoSegments && resp.Header.Get(wire.TCPSegmentsHeader) == "?1"
	s.writeCap = func(b []byte) error { _, err := pw.Write(b); return err }
	// One write (a TLS record) for each batch from the tun device, not for
	// each packet: sendPacket gathers, toServer writes.
	s.sendDg = func(p []byte) error {
		s.capOut = wire.AppendIPCapsule(s.capOut, wire.IPCapsuleDatagram, p)
		return nil
	}
	return nil
}

func (t *IPTunnel) dialTimeout() time.Duration {
	if t.DialTimeout > 0 {
		return t.DialTimeout
	}
	return 15 * time.Second
}

func (t *IPTunnel) logger() *slog.Logger {
	if t.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return t.Logger
}

func newIPTransport() (*quic.Transport, error) {
	// A socket bound to no address: the kernel picks the source per packet,
	// so a changed address is used at once and QUIC's migration follows.
	uc, err := net.ListenUDP("udp", nil)
	if err != nil {
		return nil, fmt.Errorf("opening a UDP socket: %w", err)
	}
	return &quic.Transport{Conn: udpgro.Wrap(uc)}, nil
}

// capsules reads the server's capsules and installs what they assign.
func (t *IPTunnel) capsules(ctx context.Context, s *ipSession, log *slog.Logger) error {
	// Room for the longest capsule (a whole segment's) and what follows it.
	r := bufio.NewReaderSize(s.capsules, 128<<10)
	w := s.dev.NewWriter(s.mtu)
	var routes []netip.Prefix
	up := false
	for {
		if w.Len() > 0 && !wire.CapsuleBuffered(r) {
			_, _ = w.Flush() // before a read that may wait
		}
		c, err := wire.NextIPCapsule(r) // its payload is used before the next read
		if err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			return fmt.Errorf("the TP server ended the tunnel: %w", err)
		}
		switch c.Type {
		case wire.IPCapsuleDatagram:
			s.deliver(c.Payload, w)
		case wire.IPCapsuleTCPSegment:
			if !s.segments {
				break // not agreed: a capsule type this end does not know, skipped
			}
			if seg, size, ok := wire.ParseIPSegment(c.Payload); ok {
				_ = w.WriteSegment(seg, size) // one the kernel refuses is dropped, as a packet is
			}
		case wire.IPCapsuleAddressAssign:
			as, err := wire.ParseAddresses(c.Payload)
			if err != nil {
				return fmt.Errorf("the server's ADDRESS_ASSIGN is malformed: %w", err)
			}
			var addrs []netip.Prefix
			for _, a := range as {
				if !a.Prefix.Addr().IsUnspecified() {
					addrs = append(addrs, a.Prefix)
				}
			}
			if err := t.setAddresses(ctx, s, addrs); err != nil {
				return err
			}
		case wire.IPCapsuleRouteAdvertisement:
			rs, err := wire.ParseRoutes(c.Payload)
			if err != nil {
				return fmt.Errorf("the server's ROUTE_ADVERTISEMENT is malformed: %w", err)
			}
			routes = routes[:0]
			for _, r := range rs {
				routes = append(routes, rangePrefixes(r.Start, r.End)...)
			}
			for _, p := range routes {
				if err := tun.AddRoute(ctx, s.dev.Name(), p); err != nil {
					return fmt.Errorf("installing the route to %s: %w", p, err)
				}
			}
			if !up {
				up = true
				log.Info("IP tunnel up", "dev", s.dev.Name(), "addresses", fmt.Sprint(s.addrs), "routes", fmt.Sprint(routes), "server", t.Server, "over", s.over, "tcp_on_stream", s.tcpOnStr, "tcp_segments", s.segments)
			} else {
				log.Info("IP tunnel routes changed", "routes", fmt.Sprint(routes))
			}
			if t.OnUp != nil {
				t.OnUp(s.dev.Name(), s.addrs, routes)
			}
		}
	}
}

// setAddresses replaces the tun device's addresses with addrs.
func (t *IPTunnel) setAddresses(ctx context.Context, s *ipSession, addrs []netip.Prefix) error {
	for _, old := range s.addrs {
		_ = tun.DelAddress(ctx, s.dev.Name(), old)
	}
	s.addrs = nil
	for _, a := range addrs {
		// An address of a /32 or /128: the peer is reached through the routes.
		if err := tun.AddAddress(ctx, s.dev.Name(), a); err != nil && !strings.Contains(err.Error(), "File exists") {
			return fmt.Errorf("installing the address %s: %w", a, err)
		}
		s.addrs = append(s.addrs, a)
	}
	return nil
}

// tunReaders is how many batches read from the tun device may wait for the
// connection; tunRoom is the room in front of each packet for the datagram's
// prefix (a quarter stream ID of up to 8 bytes, and the context ID).
const (
	tunReaders = 4
	tunRoom    = 9
)

// tunBatch is one read of the tun device: its packets, each behind tunRoom
// bytes, in r's buffers, which go back to free once sent; or, when size is
// not 0, one TCP segment whole whose packets carry size bytes of data each.
type tunBatch struct {
	r    *tun.Reader
	pkts [][]byte
	size int
	free chan<- *tun.Reader
}

// toServer sends what the kernel routes into the tun device, each packet
// behind the flow's prefix and context ID 0.
func (s *ipSession) toServer(ctx context.Context, packets <-chan tunBatch) error {
	hl := len(s.dgPrefix)
	for {
		var batch tunBatch
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case b, ok := <-packets:
			if !ok {
				return errors.New("the tun device was closed")
			}
			batch = b
		}
		var err error
		for {
			pkts := batch.pkts
			if batch.size > 0 {
				if s.segments {
					s.sendSegment(pkts[0][tunRoom:], batch.size)
					pkts = nil
				} else {
					var serr error
					if pkts, serr = batch.r.Split(); serr != nil { // a server that takes packets only
						s.tunDrops.Add(1) // as a read that did not split
					}
				}
			}
			for _, b := range pkts {
				if err = s.sendPacket(b[tunRoom-1-hl:], hl); err != nil {
					break
				}
			}
			batch.free <- batch.r
			// The batches already read join this write, up to maxStreamWrite:
			// fewer, larger writes on the stream (each costs http3 a DATA
			// frame, and quic-go a short packet for its header).
			if err != nil || len(s.capOut) == 0 || len(s.capOut) >= maxStreamWrite {
				break
			}
			next, ok := tryBatch(packets)
			if !ok {
				break
			}
			batch = next
		}
		if len(s.capOut) > 0 && err == nil {
			if err = s.capsule(s.capOut); err != nil {
				err = fmt.Errorf("sending to the TP server: %w", err)
			}
		}
		s.capOut = s.capOut[:0]
		if err != nil {
			return err
		}
	}
}

// maxStreamWrite bounds the capsules toServer gathers from several batches
// for one write on the request stream.
const maxStreamWrite = 256 << 10

// tryBatch takes a batch the tun reader has ready, without waiting.
func tryBatch(packets <-chan tunBatch) (tunBatch, bool) {
	select {
	case b, ok := <-packets:
		return b, ok
	default:
		return tunBatch{}, false
	}
}

// sendSegment adds a TCP segment, whole, to the capsules toServer writes.
func (s *ipSession) sendSegment(seg []byte, size int) {
	s.capOut = wire.AppendIPSegment(s.capOut, seg, size)
	n := tun.SegmentPackets(seg, size) // ReadSegment kept it: CheckSegment passed it
	s.onStream.Add(int64(n))
	s.segsSent.Add(1)
}

// sendPacket sends b, hl bytes of room for the flow's prefix, the context
// ID's byte and the packet.
func (s *ipSession) sendPacket(b []byte, hl int) error {
	copy(b, s.dgPrefix)
	b[hl] = 0
	if s.tcpOnStr && wire.OnStream(b[hl+1:]) {
		// Sent by toServer with the rest of the batch, in one write.
		s.capOut = wire.AppendIPCapsule(s.capOut, wire.IPCapsuleDatagram, b[hl:])
		s.onStream.Add(1)
		return nil
	}
	s.asDg.Add(1)
	err := s.sendDg(b)
	var tooLarge *quic.DatagramTooLargeError
	switch {
	case errors.As(err, &tooLarge):
		// Tell the local sender the size that fits (PMTU discovery).
		if icmp := wire.PacketTooBigReply(b[hl+1:], tooLarge.MaxDatagramPayloadSize, s.dgStream); icmp != nil {
			_, _ = s.dev.Write(icmp)
		}
	case err != nil:
		return fmt.Errorf("sending to the TP server: %w", err)
	}
	return nil
}

// fromServer writes the server's packets to the tun device, as many at a
// time as have arrived (up to a batch: one system call for a TCP flow's
// packets); the flow's queue (wire.IPDatagramQueue) absorbs bursts.
func (s *ipSession) fromServer(ctx context.Context) error {
	w := s.dev.NewWriter(s.mtu)
	for {
		p, err := s.recvDg(ctx)
		if err != nil {
			return fmt.Errorf("receiving from the TP server: %w", err)
		}
		s.deliver(p, w)
		for range tun.WriteBatchSize - 1 {
			p, ok := s.tryDg()
			if !ok {
				break
			}
			s.deliver(p, w)
		}
		_, _ = w.Flush() // a packet the kernel refuses is dropped
	}
}

// deliver adds the packet of one HTTP Datagram payload to w's batch for the
// tun device.
func (s *ipSession) deliver(p []byte, w *tun.Writer) {
	pkt, ok := wire.ParseIPDatagram(p)
	if !ok {
		return
	}
	if _, err := wire.ParseIPHeader(pkt); err != nil {
		return
	}
	if full, _ := w.Add(pkt); full {
		_, _ = w.Flush()
	}
}

// followAddress watches the source address the host would use towards the
// server; when it changes, the connection migrates to a new socket (a new
// path probed first), so the tunnel survives a new address or network.
func (t *IPTunnel) followAddress(ctx context.Context, qc *quic.Conn, raddr *net.UDPAddr, mu *sync.Mutex, transports *[]*quic.Transport, log *slog.Logger) error {
	last := localAddrTowards(raddr)
	tick := time.NewTicker(t.CheckAddress)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-qc.Context().Done():
			return fmt.Errorf("the QUIC connection to the TP server ended: %w", context.Cause(qc.Context()))
		case <-tick.C:
		}
		cur := localAddrTowards(raddr)
		if !cur.IsValid() || cur == last {
			continue
		}
		tr, err := newIPTransport()
		if err != nil {
			continue
		}
		mu.Lock()
		*transports = append(*transports, tr)
		mu.Unlock()
		path, err := qc.AddPath(tr)
		if err == nil {
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = path.Probe(pctx)
			cancel()
			if err == nil {
				err = path.Switch()
			}
		}
		if err != nil {
			log.Warn("the host's address changed and moving the tunnel to it failed; the connection may follow by itself", "from", last, "to", cur, "err", err)
		} else {
			log.Info("the host's address changed; the tunnel moved to it", "from", last, "to", cur)
		}
		last = cur
	}
}

// localAddrTowards is the source address the kernel picks for raddr now.
func localAddrTowards(raddr *net.UDPAddr) netip.Addr {
	c, err := net.DialUDP("udp", nil, raddr) // sends nothing
	if err != nil {
		return netip.Addr{}
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap()
}

// rangePrefixes is the smallest list of prefixes that covers start to end.
func rangePrefixes(start, end netip.Addr) []netip.Prefix {
	var out []netip.Prefix
	for cur := start; cur.IsValid() && cur.Compare(end) <= 0 && len(out) < 256; {
		bits := cur.BitLen()
		for bits > 0 {
			p := netip.PrefixFrom(cur, bits-1)
			if p.Masked().Addr() != cur || wire.RouteOf(p, 0).End.Compare(end) > 0 {
				break
			}
			bits--
		}
		p := netip.PrefixFrom(cur, bits)
		out = append(out, p)
		last := wire.RouteOf(p, 0).End
		if last.Compare(end) >= 0 {
			break
		}
		cur = last.Next()
	}
	return out
}

// alertConn remembers a TLS alert from the server among its read errors.
type alertConn struct {
	net.Conn
	mu  sync.Mutex
	err error
	got atomic.Bool // the server sent something
}

func (c *alertConn) answered() bool { return c.got.Load() }

func (c *alertConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.got.Store(true)
	}
	if err != nil && strings.Contains(err.Error(), "remote error: tls:") {
		c.mu.Lock()
		c.err = err
		c.mu.Unlock()
	}
	return n, err
}

func (c *alertConn) alert() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}
