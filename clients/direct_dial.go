package clients

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients/direct"
	"github.com/tp-proxy/tp/proxy/wire"
)

// The dialer's side of direct paths (docs/PROTOCOL.md, section 11.4.2): one
// end-to-end QUIC connection per protected name, opened over the relay
// through the server and moved to a direct path when ICE finds one; each
// session is a stream of it.

// directIdle is how long a pair without open sessions stays up.
const directIdle = time.Minute

// directPair is a pair the Dialer holds to a name.
type directPair struct {
	p       *direct.Pair
	key     string
	open    atomic.Int64 // sessions open on it
	lastEnd atomic.Int64 // unix nanoseconds when the last one ended
}

// directStates is a Dialer's pairs by destination (host:port as dialed, lower
// case), the names whose agents take none, and the dials opening one.
type directStates struct {
	mu      sync.Mutex
	pairs   map[string]*directPair
	pending map[string]bool
	none    map[string]time.Time
	opened  int
}

type directClaimKey struct{}

// directClaim is the one dial under way that may open a pair to its destination.
type directClaim struct{ key string }

func directClaimFrom(ctx context.Context) *directClaim {
	c, _ := ctx.Value(directClaimKey{}).(*directClaim)
	return c
}

type noDirectKey struct{}

// errNoDirect: the agent answered the opening of a pair without taking it;
// the dial goes again as an ordinary protected session.
var errNoDirect = errors.New("the agent takes no direct path")

// directDial carries a TCP dial of addr as a stream of a pair the Dialer holds
// to it (handled). Else, when this dial may open a pair, claim is set (it must
// be released with releaseDirect).
func (d *Dialer) directDial(ctx context.Context, addr string) (c net.Conn, handled bool, claim *directClaim, err error) {
	if !d.Direct || ctx.Value(noDirectKey{}) != nil {
		return nil, false, nil, nil
	}
	key := strings.ToLower(addr)
	st := &d.direct
	st.mu.Lock()
	dp := st.pairs[key]
	if dp == nil {
		if until, ok := st.none[key]; (ok && time.Now().Before(until)) || st.pending[key] {
			st.mu.Unlock()
			return nil, false, nil, nil
		}
		if st.pending == nil {
			st.pending = map[string]bool{}
		}
		st.pending[key] = true
		st.mu.Unlock()
		return nil, false, &directClaim{key: key}, nil
	}
	st.mu.Unlock()
	if dp.p.ICEErr() != nil {
		// ICE found no direct path: the pair's QUIC inside the relayed stream is
		// slower than a carrier, so later sessions go as ordinary ones, and this
		// name gets none for a while. The pair ends with its last session.
		st.mu.Lock()
		if st.pairs[key] == dp {
			delete(st.pairs, key)
		}
		if st.none == nil || len(st.none) >= maxMuxNames {
			st.none = map[string]time.Time{}
		}
		st.none[key] = time.Now().Add(muxNoneFor)
		st.mu.Unlock()
		go func() { // ends once idle
			for dp.open.Load() > 0 {
				select {
				case <-dp.p.Done():
					return
				case <-time.After(time.Second):
				}
			}
			dp.p.Close(wire.QUICNoError, "no direct path")
		}()
		return nil, false, nil, nil
	}
	c, err = d.directSession(ctx, dp, addr)
	if err != nil && (dp.p.Conn.Context().Err() != nil || errors.As(err, new(*quic.StreamLimitReachedError))) {
		return nil, false, nil, nil // the pair ended meanwhile, or is full: an ordinary dial
	}
	return c, true, nil, err
}

func (d *Dialer) releaseDirect(claim *directClaim) {
	if claim == nil {
		return
	}
	d.direct.mu.Lock()
	delete(d.direct.pending, claim.key)
	d.direct.mu.Unlock()
}

// startDirect opens a pair over conn, the stream of a dial the server answered
// with "e2e", and the dial's session as its first stream.
func (d *Dialer) startDirect(ctx context.Context, conn net.Conn, addr string, claim *directClaim) (net.Conn, error) {
	host := hostOf(addr)
	cfg := d.TLSConfig.Clone()
	cfg.ServerName = host
	p, err := direct.Dial(ctx, conn, cfg, d.iceOptions())
	if errors.Is(err, direct.ErrRefused) {
		d.direct.mu.Lock()
		if d.direct.none == nil || len(d.direct.none) >= maxMuxNames {
			d.direct.none = map[string]time.Time{}
		}
		d.direct.none[claim.key] = time.Now().Add(muxNoneFor)
		d.direct.mu.Unlock()
		return nil, errNoDirect
	}
	if err != nil {
		return nil, fmt.Errorf("tp dial %s: %w", addr, err)
	}
	if d.Logger != nil {
		log := d.Logger.With("name", host)
		log.Debug("tp: a pair with the agent opened; the TP server relays its sessions until a direct path is found")
		p.Path.OnSwitch(func(on bool) {
			if on {
				log.Debug("tp: the sessions with the agent moved to a direct path")
			} else {
				log.Debug("tp: the sessions with the agent are relayed by the TP server again")
			}
		})
	}
	dp := &directPair{p: p, key: claim.key}
	dp.lastEnd.Store(time.Now().UnixNano())
	st := &d.direct
	st.mu.Lock()
	if st.pairs == nil || len(st.pairs) >= maxMuxNames {
		st.pairs = map[string]*directPair{} // bounded; the dropped ones end when idle
	}
	st.pairs[claim.key] = dp
	st.opened++
	st.mu.Unlock()
	go d.watchPair(dp)
	c, err := d.directSession(ctx, dp, addr)
	var re *RefusedError
	if errors.As(err, &re) && re.Code == wire.CodeUnauthenticated {
		dp.p.Close(wire.QUICNoError, "") // the agent refused this device's certificate: no pair
	}
	return c, err
}

// watchPair forgets a pair when it ends, and ends it when it has been idle for
// directIdle.
func (d *Dialer) watchPair(dp *directPair) {
	tick := time.NewTicker(directIdle / 4)
	defer tick.Stop()
	for {
		select {
		case <-dp.p.Done():
			if err := dp.p.ICEErr(); err != nil && d.Logger != nil {
				d.Logger.Debug("tp: no direct path to the agent; its sessions were relayed by the TP server", "name", dp.key, "why", err.Error())
			}
			d.direct.mu.Lock()
			if d.direct.pairs[dp.key] == dp {
				delete(d.direct.pairs, dp.key)
			}
			d.direct.mu.Unlock()
			return
		case <-tick.C:
			if dp.open.Load() == 0 && time.Since(time.Unix(0, dp.lastEnd.Load())) > directIdle {
				d.direct.mu.Lock()
				if d.direct.pairs[dp.key] == dp {
					delete(d.direct.pairs, dp.key)
				}
				d.direct.mu.Unlock()
				if d.Logger != nil {
					d.Logger.Debug("tp: the pair with the agent ended: idle", "name", dp.key, "after", directIdle)
				}
				dp.p.Close(wire.QUICNoError, "idle")
			}
		}
	}
}

// directSession opens a session as a stream of dp and reads the agent's hello.
func (d *Dialer) directSession(ctx context.Context, dp *directPair, addr string) (net.Conn, error) {
	str, err := dp.p.Conn.OpenStream()
	if err != nil {
		// As many sessions as the agent takes on the pair (or it ended): the
		// caller dials this one as an ordinary session.
		return nil, fmt.Errorf("tp dial %s: a session on the direct path: %w", addr, err)
	}
	dp.open.Add(1)
	s := &directStream{QUICStream: wire.NewQUICStream(dp.p.Conn, str), dp: dp}
	stop := context.AfterFunc(ctx, func() { _ = s.SetDeadline(time.Unix(1, 0)) })
	// A QUIC stream reaches the other end with its first byte: the opener.
	_, err = s.Write([]byte{direct.StreamOpener})
	var sh wire.ServerHello
	if err == nil {
		sh, err = wire.ReadServerHello(s)
	}
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		wire.Abort(s, wire.QUICInternal)
		return nil, fmt.Errorf("tp dial %s: the agent's answer on the direct path: %w", addr, err)
	}
	_ = s.SetDeadline(time.Time{})
	if !sh.OK {
		_ = s.Close()
		return nil, &RefusedError{Code: sh.Code, Reason: sh.Reason, Agent: hostOf(addr)}
	}
	return s, nil
}

// directStream is a session on a pair: it counts as open until closed.
type directStream struct {
	*wire.QUICStream
	dp   *directPair
	once sync.Once
}

func (s *directStream) Close() error {
	s.once.Do(func() {
		s.dp.lastEnd.Store(time.Now().UnixNano())
		s.dp.open.Add(-1)
	})
	return s.QUICStream.Close()
}

func (s *directStream) Read(p []byte) (int, error) {
	n, err := s.QUICStream.Read(p)
	return n, explainPairEnd(err)
}

func (s *directStream) Write(p []byte) (int, error) {
	n, err := s.QUICStream.Write(p)
	return n, explainPairEnd(err)
}

// pairEnd is a session cut because an end closed its pair: the close's
// message is the sentence that says why (the TP server cut the relayed
// session, a certificate expired, the agent stops).
type pairEnd struct{ ae *quic.ApplicationError }

func (e *pairEnd) Error() string {
	if e.ae.Remote {
		return "the agent ended the end-to-end QUIC connection: " + e.ae.ErrorMessage
	}
	return e.ae.ErrorMessage
}

func (e *pairEnd) Unwrap() error { return e.ae }

func explainPairEnd(err error) error {
	var ae *quic.ApplicationError
	if errors.As(err, &ae) && ae.ErrorCode != 0 && ae.ErrorMessage != "" {
		return &pairEnd{ae}
	}
	return err
}

// Unwrap lets wire.Abort reset the stream.
func (s *directStream) Unwrap() net.Conn { return s.QUICStream }

// iceOptions is where this device looks for a direct path: the server's UDP
// port answers STUN (docs/PROTOCOL.md, section 9.10).
func (d *Dialer) iceOptions() direct.ICEOptions {
	srv := d.QUICServer
	if srv == "" {
		srv = d.Server
	}
	return direct.ICEOptions{STUN: []string{srv}, Loopback: d.DirectLoopback, Interface: d.DirectInterfaces, Logger: d.Logger}
}

// DirectStats says how many pairs this Dialer opened, and how many it holds
// now that send on a direct path.
func (d *Dialer) DirectStats() (opened, direct int) {
	d.direct.mu.Lock()
	defer d.direct.mu.Unlock()
	for _, dp := range d.direct.pairs {
		if dp.p.Path.Direct() {
			direct++
		}
	}
	return d.direct.opened, direct
}

// DirectPath is the pair this Dialer holds to addr, or nil (tests and the
// benchmark read its counts).
func (d *Dialer) DirectPath(addr string) *direct.Path {
	d.direct.mu.Lock()
	defer d.direct.mu.Unlock()
	if dp := d.direct.pairs[strings.ToLower(addr)]; dp != nil {
		return dp.p.Path
	}
	return nil
}

// closeDirect ends every pair (their sessions are cut).
func (d *Dialer) closeDirect() {
	d.direct.mu.Lock()
	all := make([]*directPair, 0, len(d.direct.pairs))
	for _, dp := range d.direct.pairs {
		all = append(all, dp)
	}
	d.direct.mu.Unlock()
	for _, dp := range all {
		dp.p.Close(wire.QUICShutdown, "the dialer stops")
	}
}
