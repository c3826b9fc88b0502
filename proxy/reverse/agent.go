package reverse

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/proxy/wire"
)

// Agent is one live control session of an agent, or the holder of a name or
// public port that reverse tunnels serve. The server that serves its listen
// fills in the exported fields before it claims the agent's names.
type Agent struct {
	ID        authz.Identity
	Transport string
	Names     []string        // full names
	UDP       map[string]bool // full names whose service is UDP
	Public    []PublicClaim
	Ctx       context.Context // the control session's: ends its public sessions too
	Ctl       wire.Stream     // the control stream (WriteFrame)
	End       context.CancelCauseFunc
	// Open starts a session: a stream opened to the agent (QUIC) or an
	// announcement the agent answers with an accept connection (TLS). OpenFlow
	// starts a public UDP session: a UDPFlow on such a stream.
	Open     func(ctx context.Context, hdr wire.SessionHeader) (wire.Stream, *wire.HelloError)
	OpenFlow func(ctx context.Context, hdr wire.SessionHeader, queueLen int) (*wire.UDPFlow, *wire.HelloError)
	// DevicesOnly: a reverse HTTP name's holder whose exposer lets only
	// enrolled devices reach it (the claim records it: AccessHoldStore).
	DevicesOnly bool

	// epochs are the keys' epochs the store gave this agent's claim, and
	// leaseUntil the end of the lease it got (Options.Store).
	epochs     map[string]int64
	leaseUntil time.Time

	wmu     sync.Mutex // serialises frames on Ctl
	pmu     sync.Mutex
	pending []*Pending // oldest first (TLS)
}

// PublicClaim is one public exposure of an agent, as the registry holds it.
type PublicClaim struct {
	wire.PublicSpec
	Full string // the reverse name it belongs to
}

// Keys are every registry key a holds: its full names and its public exposures.
func (a *Agent) Keys() []string {
	keys := append([]string(nil), a.Names...)
	for _, p := range a.Public {
		keys = append(keys, p.Key())
	}
	return keys
}

// IsPublic reports whether the full name is exposed publicly: its sessions,
// also those of TP dialers, are then plain streams without inner TLS.
func (a *Agent) IsPublic(full string) bool {
	for _, p := range a.Public {
		if p.Full == full {
			return true
		}
	}
	return false
}

// Network is the network of the service behind the full name host.
func (a *Agent) Network(host string) string {
	if a.UDP[host] {
		return "udp"
	}
	return "tcp"
}

// WriteFrame writes h on the agent's control stream.
func (a *Agent) WriteFrame(h wire.SessionHeader) error {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	_ = a.Ctl.SetWriteDeadline(time.Now().Add(wire.HelloWriteTimeout))
	err := wire.WriteSessionHeader(a.Ctl, h)
	_ = a.Ctl.SetWriteDeadline(time.Time{})
	return err
}

// QUICOpener opens a stream to the agent per session and writes the header at
// once: a QUIC stream is invisible to the peer until it carries data. Its flow
// opener also registers a UDPFlow on the stream before the header goes out, and
// names the flow id in the header when the connection has QUIC datagrams.
func (r *Registry) QUICOpener(ctl *wire.QUICStream) (
	func(context.Context, wire.SessionHeader) (wire.Stream, *wire.HelloError),
	func(context.Context, wire.SessionHeader, int) (*wire.UDPFlow, *wire.HelloError),
) {
	conn := ctl.Conn()
	open := func(ctx context.Context, hdr wire.SessionHeader, queueLen int, udp bool) (*wire.QUICStream, *wire.UDPFlow, *wire.HelloError) {
		ctx, cancel := context.WithTimeout(ctx, r.opts.PickupTimeout)
		defer cancel()
		str, err := conn.OpenStreamSync(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil, nil, wire.Errorf(wire.CodeReverseBusy, "the agent for %s.%s has no room for another session; try again", hdr.Name, r.opts.Zone)
			}
			return nil, nil, wire.Errorf(wire.CodeReverseOffline, "the agent for %s.%s went away: %v", hdr.Name, r.opts.Zone, err)
		}
		qs := wire.NewQUICStream(conn, str)
		var flow *wire.UDPFlow
		if udp {
			if flow, err = wire.NewUDPFlow(qs, queueLen, nil); err != nil {
				// The quarter stream ID is in use on this connection (a flow the
				// agent opened itself): this one travels as capsules only.
				flow = wire.NewCapsuleFlow(qs, queueLen)
			}
			if id, ok := flow.FlowID(); ok {
				hdr.Flow = &id
				flow.AwaitPeer()
			}
		}
		_ = qs.SetWriteDeadline(time.Now().Add(wire.HelloWriteTimeout))
		if err := wire.WriteSessionHeader(qs, hdr); err != nil {
			if flow != nil {
				_ = flow.Close()
			}
			qs.Abort(wire.QUICInternal)
			return nil, nil, wire.Errorf(wire.CodeReverseOffline, "the agent for %s.%s went away: %v", hdr.Name, r.opts.Zone, err)
		}
		_ = qs.SetWriteDeadline(time.Time{})
		return qs, flow, nil
	}
	return func(ctx context.Context, hdr wire.SessionHeader) (wire.Stream, *wire.HelloError) {
			qs, _, herr := open(ctx, hdr, 0, false)
			if herr != nil {
				return nil, herr
			}
			return qs, nil
		}, func(ctx context.Context, hdr wire.SessionHeader, queueLen int) (*wire.UDPFlow, *wire.HelloError) {
			_, flow, herr := open(ctx, hdr, queueLen, true)
			return flow, herr
		}
}

// TLSOpener announces a session on a's control connection and waits for the
// agent's accept connection (Pair).
func (r *Registry) TLSOpener(a *Agent) func(context.Context, wire.SessionHeader) (wire.Stream, *wire.HelloError) {
	return func(ctx context.Context, hdr wire.SessionHeader) (wire.Stream, *wire.HelloError) {
		p := &Pending{id: hdr.Session, agent: a, ch: make(chan wire.Stream, 1)}
		r.pend(a, p)
		if err := a.WriteFrame(hdr); err != nil {
			r.unpend(p, nil)
			a.End(fmt.Errorf("control connection: %w", err))
			return nil, wire.Errorf(wire.CodeReverseOffline, "the agent for %s.%s went away: %v", hdr.Name, r.opts.Zone, err)
		}
		t := time.NewTimer(r.opts.PickupTimeout)
		defer t.Stop()
		select {
		case st := <-p.ch:
			return pickedUp(st, hdr, r.opts.Zone)
		case <-t.C:
		case <-ctx.Done():
		}
		if r.unpend(p, nil) {
			<-p.ch
			return nil, wire.Errorf(wire.CodeReverseTimeout, "the agent for %s.%s did not pick up the session within %s", hdr.Name, r.opts.Zone, r.opts.PickupTimeout)
		}
		return pickedUp(<-p.ch, hdr, r.opts.Zone) // accepted just now
	}
}

func pickedUp(st wire.Stream, hdr wire.SessionHeader, zone string) (wire.Stream, *wire.HelloError) {
	if st == nil {
		return nil, wire.Errorf(wire.CodeReverseBusy, "the agent for %s.%s has too many sessions waiting or went away; try again", hdr.Name, zone)
	}
	return st, nil
}

// Pending is a session announced to an agent over TLS and not yet picked up.
type Pending struct {
	id    string
	agent *Agent
	ch    chan wire.Stream // receives the accept connection, or nil when refused
}

// Agent is the agent the session was announced to.
func (p *Pending) Agent() *Agent { return p.agent }

// Paired is an accept connection handed to a dialer's session; Close tells
// the accept request that the session is over (Done).
type Paired struct {
	wire.Stream
	once sync.Once
	done chan struct{}
}

// Unwrap is the accept connection.
func (p *Paired) Unwrap() net.Conn { return p.Stream }

func (p *Paired) Close() error {
	err := p.Stream.Close()
	p.once.Do(func() { close(p.done) })
	return err
}

// Done is closed when the dialer's session closed the connection.
func (p *Paired) Done() <-chan struct{} { return p.done }

// Pair hands conn, the agent's accept connection, to p's dialer. It reports
// false when p is no longer pending (it expired).
func (r *Registry) Pair(p *Pending, conn wire.Stream) (*Paired, bool) {
	ps := &Paired{Stream: conn, done: make(chan struct{})}
	return ps, r.unpend(p, ps)
}

var (
	// ErrReplaced ends an agent whose names a newer session of the same
	// device took over (the agents Claim returns).
	ErrReplaced = errors.New("replaced by a newer session of the same device")
	// ErrUnregistered ends an agent that unregistered its names: they are
	// freed at once (GraceAfter).
	ErrUnregistered = errors.New("the agent unregistered its names")
)
