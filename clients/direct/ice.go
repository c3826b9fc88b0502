package direct

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/ice/v4"
	"github.com/pion/logging"
	"github.com/pion/stun/v4"
	"github.com/pion/transport/v5"
	"github.com/pion/transport/v5/stdnet"
	"github.com/quic-go/quic-go"
)

// Signalling runs on one unidirectional QUIC stream each way, opened by each
// end as the pair's connection is up: JSON lines, each at most maxSignal
// bytes. The first gives the sender's ICE credentials ({"ufrag","pwd"}); then
// one line per local candidate ({"candidate": RFC 8839 candidate-attribute
// value}), as they are gathered; then {"done":true}.
const (
	maxSignal     = 2048
	maxCandidates = 32
	// signalWait bounds waiting for the other end's credentials.
	signalWait = 10 * time.Second
)

// ICE timing: a consent check a second; a pair that answers none for
// iceDisconnected is taken as gone (the Path sends on the relay), and ICE
// gives up after iceFailed.
const (
	iceKeepalive    = time.Second
	iceDisconnected = 3 * time.Second
	iceFailed       = 15 * time.Second
	srflxWait       = 100 * time.Millisecond
)

// socketBuffer is the size asked for the UDP socket's buffers each way.
const socketBuffer = 7 << 20

type signal struct {
	Ufrag     string `json:"ufrag,omitempty"`
	Pwd       string `json:"pwd,omitempty"`
	Restart   int    `json:"restart,omitempty"` // with new credentials: an ICE restart's round
	Candidate string `json:"candidate,omitempty"`
	Done      bool   `json:"done,omitempty"`
}

// ICE restarts: once a direct path was found and ICE then gave up on it (a
// device moved to another network), the dialer restarts ICE with new
// credentials and candidates, at most maxRestarts times a pair and not within
// restartGap of the last; the agent follows.
const (
	maxRestarts = 20
	restartGap  = 10 * time.Second
)

// ICEOptions is how an end looks for a direct path.
type ICEOptions struct {
	// STUN are host:port addresses that answer STUN binding requests (the TP
	// server's UDP port): the end learns there the address a NAT gives it.
	STUN []string
	// Loopback also offers loopback addresses as candidates (tests on one host).
	Loopback bool
	// Interface says which network interfaces give candidates; nil means all
	// but TP's own tun devices (tp*): a path through TP is no direct path.
	Interface func(name string) bool
	Logger    *slog.Logger
}

// RunICE looks for a direct path for path's pair, over qc (the pair's QUIC
// connection, whose packets path carries): it exchanges candidates with the
// other end on a unidirectional stream each way, runs ICE (the dialer
// controlling) and gives path the direct path once a candidate pair works,
// then tells it when ICE loses and regains it. It returns when ctx ends or the
// search failed; the error says why no direct path was found.
func RunICE(ctx context.Context, qc *quic.Conn, path *Path, controlling bool, opts ICEOptions) error {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var urls []*stun.URI
	for _, s := range opts.STUN {
		host, port, err := net.SplitHostPort(s)
		if err != nil {
			continue
		}
		pn, err := strconv.Atoi(port)
		if err != nil {
			continue
		}
		urls = append(urls, &stun.URI{Scheme: stun.SchemeTypeSTUN, Host: host, Port: pn, Proto: stun.ProtoTypeUDP})
	}
	quiet := logging.NewDefaultLoggerFactory()
	quiet.DefaultLogLevel = logging.LogLevelDisabled
	// One UDP socket for ICE and QUIC alike: pion reads its STUN through the
	// Path, which takes the rest as QUIC packets and sends them itself. It
	// takes both IPv4 and IPv6 where the host has IPv6 (two devices with
	// global IPv6 addresses need no NAT traversal at all).
	udp, err := net.ListenUDP("udp", &net.UDPAddr{})
	if err != nil {
		return fmt.Errorf("opening a UDP socket for ICE: %w", err)
	}
	defer udp.Close()
	// Buffers as quic-go asks for its own sockets (the kernel caps them at
	// net.core.rmem_max and wmem_max): a burst of a fast sender must not
	// overflow the default ones, which QUIC would take for congestion.
	_ = udp.SetReadBuffer(socketBuffer)
	_ = udp.SetWriteBuffer(socketBuffer)
	sc := newSTUNConn(udp)
	defer sc.Close()
	path.AttachUDP(udp, sc.deliver)
	std, err := stdnet.NewNet()
	if err != nil {
		return fmt.Errorf("listing network interfaces: %w", err)
	}
	keep := opts.Interface
	if keep == nil {
		keep = func(name string) bool { return !strings.HasPrefix(name, "tp") }
	}
	fnet := &filteredNet{Net: std, keep: keep, loopback: opts.Loopback}
	// The server-reflexive address is asked anew at each gathering: after a
	// device moved, a cached one would be the old network's mapping.
	mux := ice.NewUniversalUDPMuxDefault(ice.UniversalUDPMuxParams{UDPConn: sc, Net: fnet, Logger: quiet.NewLogger("ice"),
		XORMappedAddrCacheTTL: time.Second})
	defer mux.Close()
	opt := []ice.AgentOption{
		ice.WithNet(fnet),
		ice.WithUDPMux(mux),
		ice.WithUDPMuxSrflx(mux),
		ice.WithNetworkTypes([]ice.NetworkType{ice.NetworkTypeUDP4, ice.NetworkTypeUDP6}),
		ice.WithCandidateTypes([]ice.CandidateType{ice.CandidateTypeHost, ice.CandidateTypeServerReflexive}),
		ice.WithMulticastDNSMode(ice.MulticastDNSModeDisabled),
		ice.WithKeepaliveInterval(iceKeepalive),
		ice.WithDisconnectedTimeout(iceDisconnected),
		ice.WithFailedTimeout(iceFailed),
		// The session already runs on the relay: a working server-reflexive
		// pair need not wait long for a better one.
		ice.WithSrflxAcceptanceMinWait(srflxWait),
		ice.WithLoggerFactory(quiet),
	}
	opt = append(opt, ice.WithInterfaceFilter(keep), ice.WithRemoteIPFilter(func(ip net.IP) bool {
		// The other end's candidates are its word: no checks to this host's
		// loopback (unless asked), nor to link-local (cloud metadata),
		// unspecified or multicast addresses.
		return (opts.Loopback || !ip.IsLoopback()) && !ip.IsLinkLocalUnicast() && !ip.IsUnspecified() &&
			!ip.IsMulticast() && !ip.IsLinkLocalMulticast()
	}))
	if len(urls) > 0 {
		opt = append(opt, ice.WithUrls(urls))
	}
	if opts.Loopback {
		opt = append(opt, ice.WithIncludeLoopback())
	}
	agent, err := ice.NewAgentWithOptions(opt...)
	if err != nil {
		return fmt.Errorf("starting ICE: %w", err)
	}
	defer agent.Close()

	send, err := qc.OpenUniStream()
	if err != nil {
		return fmt.Errorf("opening the signalling stream: %w", err)
	}
	defer send.CancelWrite(0)
	var smu sync.Mutex
	write := func(s signal) {
		b, _ := json.Marshal(s)
		smu.Lock()
		defer smu.Unlock()
		_ = send.SetWriteDeadline(time.Now().Add(signalWait))
		_, _ = send.Write(append(b, '\n'))
	}
	ufrag, pwd, err := agent.GetLocalUserCredentials()
	if err != nil {
		return err
	}
	write(signal{Ufrag: ufrag, Pwd: pwd})
	var local atomic.Int64
	var noLocalOnce sync.Once
	noLocal := make(chan struct{})
	if err := agent.OnCandidate(func(c ice.Candidate) {
		if c == nil {
			write(signal{Done: true})
			if local.Load() == 0 {
				noLocalOnce.Do(func() { close(noLocal) })
			}
			return
		}
		local.Add(1)
		log.Debug("tp direct: local candidate", "candidate", c.Marshal())
		write(signal{Candidate: c.Marshal()})
	}); err != nil {
		return err
	}
	var once, failOnce sync.Once
	connected, failed := make(chan struct{}), make(chan struct{})
	lost := make(chan struct{}, 1) // ICE gave up on a path it had found
	if err := agent.OnSelectedCandidatePairChange(func(_, remote ice.Candidate) {
		if ap, ok := addrPort(remote); ok {
			path.SetDirect(ap)
		}
	}); err != nil {
		return err
	}
	if err := agent.OnConnectionStateChange(func(s ice.ConnectionState) {
		log.Debug("tp direct: ICE", "state", s.String())
		switch s {
		case ice.ConnectionStateConnected, ice.ConnectionStateCompleted:
			once.Do(func() { close(connected) })
			path.SetICEUp(true)
		case ice.ConnectionStateFailed:
			failOnce.Do(func() { close(failed) })
			path.SetICEUp(false)
			select {
			case <-connected:
				select {
				case lost <- struct{}{}:
				default:
				}
			default:
			}
		case ice.ConnectionStateDisconnected, ice.ConnectionStateClosed:
			path.SetICEUp(false)
		}
	}); err != nil {
		return err
	}
	if err := agent.GatherCandidates(); err != nil {
		return fmt.Errorf("gathering ICE candidates: %w", err)
	}

	actx, cancel := context.WithTimeout(ctx, signalWait)
	recv, err := qc.AcceptUniStream(actx)
	cancel()
	if err != nil {
		return fmt.Errorf("the other end opened no signalling stream: %w", err)
	}
	defer recv.CancelRead(0)
	stop := context.AfterFunc(ctx, func() { recv.CancelRead(0) })
	defer stop()
	r := bufio.NewReaderSize(recv, maxSignal)
	_ = recv.SetReadDeadline(time.Now().Add(signalWait))
	first, err := readSignal(r)
	if err != nil {
		return err
	}
	if first.Ufrag == "" || first.Pwd == "" {
		return errors.New("tp direct: the first signalling line carries no ICE credentials")
	}
	_ = recv.SetReadDeadline(time.Time{})
	if controlling {
		_, err = agent.StartDial(first.Ufrag, first.Pwd)
	} else {
		_, err = agent.StartAccept(first.Ufrag, first.Pwd)
	}
	if err != nil {
		return fmt.Errorf("starting ICE checks: %w", err)
	}
	// Restarts: round is this end's ICE round (0 the first), remoteRound the
	// other end's; candidates count only when both are in the same round.
	var (
		rmu                sync.Mutex
		round, remoteRound int
	)
	restart := func(to int) error {
		// The device may have moved: its addresses now, not those ICE
		// listed when it started.
		if err := std.UpdateInterfaces(); err != nil {
			log.Debug("tp direct: listing network interfaces again", "err", err.Error())
		}
		if err := agent.Restart("", ""); err != nil {
			return err
		}
		u, p, err := agent.GetLocalUserCredentials()
		if err != nil {
			return err
		}
		round = to
		log.Debug("tp direct: ICE restarts", "round", to)
		write(signal{Ufrag: u, Pwd: p, Restart: to})
		return agent.GatherCandidates()
	}
	go func() { // the other end's signalling, as it comes
		n := 0 // candidates taken in this round
		for lines := 0; lines < (maxRestarts+1)*(maxCandidates+2); lines++ {
			s, err := readSignal(r)
			if err != nil {
				return
			}
			switch {
			case s.Restart > 0:
				rmu.Lock()
				ok := s.Restart > remoteRound && s.Restart <= maxRestarts && s.Ufrag != "" && s.Pwd != ""
				if ok && !controlling && s.Restart > round {
					// The dialer restarted: this end follows, with new
					// credentials and candidates of its own.
					if err := restart(s.Restart); err != nil {
						log.Debug("tp direct: an ICE restart failed", "err", err.Error())
						ok = false
					}
				}
				if ok && s.Restart == round {
					remoteRound, n = s.Restart, 0
					if err := agent.SetRemoteCredentials(s.Ufrag, s.Pwd); err != nil {
						log.Debug("tp direct: the other end's new ICE credentials not taken", "err", err.Error())
					}
				}
				rmu.Unlock()
				if !ok {
					return // a restart out of turn: no more signalling taken
				}
			case s.Done, s.Candidate == "":
			default:
				rmu.Lock()
				same := remoteRound == round
				rmu.Unlock()
				if !same {
					continue // a candidate of a round this end left
				}
				if n++; n > maxCandidates {
					log.Debug("tp direct: more candidates than taken", "max", maxCandidates)
					continue
				}
				log.Debug("tp direct: remote candidate", "candidate", s.Candidate)
				c, err := ice.UnmarshalCandidate(s.Candidate)
				if err != nil {
					log.Debug("tp direct: a candidate that does not parse", "err", err.Error())
					continue
				}
				if err := agent.AddRemoteCandidate(c); err != nil {
					log.Debug("tp direct: a candidate not taken", "err", err.Error())
				}
			}
		}
	}()
	select {
	case <-connected:
		if pair, err := agent.GetSelectedCandidatePair(); err == nil && pair != nil {
			if ap, ok := addrPort(pair.Remote); ok {
				path.SetDirect(ap)
			}
			log.Debug("tp direct: direct path found", "local", pair.Local.String(), "remote", pair.Remote.String())
		}
	case <-noLocal:
		return errors.New("this device has no address to offer for a direct path (all its interfaces are filtered out: --direct-interfaces)")
	case <-failed:
		return errors.New("no candidate pair answered: the devices' networks let no direct path through (symmetric NATs, or UDP blocked); the relay carries the session")
	case <-ctx.Done():
		return ctx.Err()
	}
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-lost:
		}
		if !controlling {
			continue // the dialer restarts; this end follows (above)
		}
		if wait := time.Until(last.Add(restartGap)); wait > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
		}
		rmu.Lock()
		if round >= maxRestarts {
			rmu.Unlock()
			log.Debug("tp direct: no more ICE restarts on this pair; the relay carries it", "restarts", round)
			<-ctx.Done()
			return nil
		}
		err := restart(round + 1)
		rmu.Unlock()
		if err != nil {
			return fmt.Errorf("restarting ICE: %w", err)
		}
		last = time.Now()
	}
}

func readSignal(r *bufio.Reader) (signal, error) {
	line, err := r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		return signal{}, fmt.Errorf("tp direct: a signalling line longer than %d bytes", maxSignal)
	}
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return signal{}, fmt.Errorf("tp direct: reading the other end's signalling: %w", err)
	}
	var s signal
	if err := json.Unmarshal(line, &s); err != nil {
		return signal{}, fmt.Errorf("tp direct: a signalling line that is not JSON: %w", err)
	}
	return s, nil
}

func addrPort(c ice.Candidate) (netip.AddrPort, bool) {
	a, err := netip.ParseAddr(c.Address())
	if err != nil || c.Port() <= 0 || c.Port() > 65535 {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a.Unmap(), uint16(c.Port())), true
}

// stunConn is the UDP socket as pion's mux sees it: it reads the STUN
// messages the Path hands over, and writes to the socket.
type stunConn struct {
	udp    *net.UDPConn
	in     chan stunPacket
	closed chan struct{}
	once   sync.Once
}

type stunPacket struct {
	b    []byte
	from *net.UDPAddr
}

func newSTUNConn(udp *net.UDPConn) *stunConn {
	return &stunConn{udp: udp, in: make(chan stunPacket, 64), closed: make(chan struct{})}
}

// deliver takes a STUN message read from the socket (b is reused after it
// returns); beyond 64 waiting, messages are dropped, as a busy socket drops.
func (c *stunConn) deliver(b []byte, from netip.AddrPort) {
	select {
	case c.in <- stunPacket{b: append([]byte(nil), b...), from: net.UDPAddrFromAddrPort(from)}:
	default:
	}
}

func (c *stunConn) ReadFrom(b []byte) (int, net.Addr, error) {
	select {
	case p := <-c.in:
		return copy(b, p.b), p.from, nil
	case <-c.closed:
		return 0, nil, net.ErrClosed
	}
}

func (c *stunConn) WriteTo(b []byte, to net.Addr) (int, error) { return c.udp.WriteTo(b, to) }
func (c *stunConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return nil
}
func (c *stunConn) LocalAddr() net.Addr              { return c.udp.LocalAddr() }
func (c *stunConn) SetDeadline(time.Time) error      { return nil }
func (c *stunConn) SetReadDeadline(time.Time) error  { return nil }
func (c *stunConn) SetWriteDeadline(time.Time) error { return nil }

// filteredNet is the host's network as ICE may use it: the interfaces keep
// allows, loopback only when asked.
type filteredNet struct {
	*stdnet.Net
	keep     func(string) bool
	loopback bool
}

func (n *filteredNet) Interfaces() ([]*transport.Interface, error) {
	all, err := n.Net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []*transport.Interface
	for _, i := range all {
		if (i.Flags&net.FlagLoopback != 0 && !n.loopback) || !n.keep(i.Name) {
			continue
		}
		out = append(out, i)
	}
	return out, nil
}
