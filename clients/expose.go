package clients

import (
	"context"
	"crypto/cipher"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients/direct"
	"github.com/tp-proxy/tp/clients/transport"
	"github.com/tp-proxy/tp/proxy/wire"
)

// CodeAgentDenied is the refusal an agent sends inside the end-to-end TLS session
// when its own allow list does not include the dialer.
const CodeAgentDenied = "agent_denied"

// agentHandshakeTimeout bounds the inner TLS handshake and hello with a dialer.
const agentHandshakeTimeout = 10 * time.Second

// Exposed is one service an Agent exposes: reverse name → local address.
type Exposed struct {
	Name  string // reverse name, one DNS label ("laptop-ssh")
	Local string // host:port of the local service; the only address the agent dials
	// Public mode (exposepublic.go): anyone reaches Local on TCP port PublicPort of
	// the TP server, or by TLS server name PublicSNI on its shared port. Sessions
	// then carry no TLS of TP's: with TLS set the agent terminates the public
	// client's TLS with it, else Local gets the raw bytes (and, for PublicSNI, must
	// speak TLS itself).
	PublicPort int
	PublicSNI  string
	TLS        *tls.Config
	// UDP: Local is a UDP service. Its sessions carry datagrams: from TP clients
	// that dial the name with net "udp" (tp forward --udp), inside the end-to-end
	// TLS session when protected, and with PublicPort from anyone on that UDP
	// port of the TP server (exposeudp.go).
	UDP bool
}

// Agent keeps reverse listeners registered with a TP server (`tp expose`) and
// serves their sessions in protected mode: every session is a TLS server inside
// the relay's stream, with a certificate for the reverse name from TP's CA; the
// dialer must present a device certificate from TP's root whose identity is in
// AllowUsers or whose groups meet AllowGroups. Only then is Local dialed.
type Agent struct {
	Dialer  *Dialer // server, client certificate, root (RootCAs) and Transport
	Exposed []Exposed
	// AllowUsers and AllowGroups say who may connect; both empty allows nobody.
	AllowUsers, AllowGroups []string
	// Owner is the user this agent's device belongs to: guests with whom
	// that user shared a name the agent exposes (tp share; the server
	// announces them, wire.SessionHeader.PeerGuestOf) are admitted, unless
	// RefuseGuests. Empty admits no guest.
	Owner        string
	RefuseGuests bool
	// NoDirect refuses end-to-end QUIC pairs (direct paths, docs/PROTOCOL.md
	// section 11.4.2): their dialers then open ordinary sessions.
	NoDirect bool
	// Certificate returns the server certificate for a full reverse name
	// ((*Client).ReverseCertificate). Required.
	Certificate func(ctx context.Context, name string) (*tls.Certificate, error)
	// Logger gets one line per session and per control-session change.
	Logger *slog.Logger
	// Registered is called with the full names after each successful registration.
	Registered func(names []string)
	// WrapData, when set, wraps every data stream from the relay before the agent
	// uses it (to observe what the relay forwards in tests).
	WrapData func(net.Conn) net.Conn
	// UDPIdle ends a UDP session that carried no datagram either way for this
	// long. Default 60s.
	UDPIdle time.Duration
	// IdleTimeout ends the QUIC connection to the server when nothing arrived from
	// it for this long; keepalives go out every third of it, so only a server that
	// is gone (restarted, crashed, unreachable) stays silent. A restarted server
	// cannot always tell the agent (its stateless reset answers only large
	// packets), so this is how fast an agent notices over QUIC; over TLS the
	// closed connection says so at once. Default 6s (the smaller of both sides'
	// values applies): quic-go counts it from the first keepalive that went
	// unanswered, so a silent server is noticed 6–8 s after it went away.
	IdleTimeout time.Duration
	// ExitOnRefusal ends Run when the server refuses the names (its policy denies
	// them, or another identity holds one) instead of retrying with backoff. By
	// default an agent keeps trying and logs why at every attempt, so that a fixed
	// policy or a freed name takes effect without restarting it; only a name that
	// another identity holds before this agent ever registered it ends Run.
	ExitOnRefusal bool
	// MaxSessions is how many sessions the server may have open to the agent at
	// once over QUIC (the agent's stream limit); zero means
	// DefaultAgentMaxSessions. The server holds a further session until one ends,
	// for at most its pickup timeout (tpd: 10s), and then refuses it: a TP dialer
	// reads reverse_busy, a public client's connection is reset. Over TLS each
	// session is a connection of its own and this does not apply. The streams
	// of end-to-end carriers (e2emux_agent.go) count against it on both
	// transports: beyond it a stream is refused with reverse_busy.
	MaxSessions int
	// Explain, when set, rewords a failed session (Client.WhyRejected asks the
	// server why it refused the certificate); a revocation ends Run.
	Explain func(context.Context, error) error

	mu         sync.Mutex
	full       map[string]string // label → full name
	issuers    map[string]issuer // full name → the CA that issued the agent's certificate for it
	roots      *x509.CertPool
	inner      *tls.Config // end-to-end TLS server config, one for all sessions so tickets resume
	attaches   agentAttaches
	carriers   map[*muxConn]struct{} // end-to-end carriers being served (e2emux_agent.go)
	muxStreams atomic.Int64          // their open streams, against MaxSessions
	pairs      directPairs           // direct-path pairs being served (direct_agent.go)
}

// issuer is the CA behind the agent's own certificate for a name: dialers'
// certificates must come from the same issuing intermediate.
type issuer struct {
	leaf *x509.Certificate // the agent's certificate it was learnt from
	is   authz.Issuer
}

// learnIssuer records which intermediate issued cert (the agent's certificate
// for name), verified against the TP root. TP's CA issues device and reverse
// certificates from the same intermediate, so dialers are held to it.
func (a *Agent) learnIssuer(name string, cert *tls.Certificate) error {
	leaf := cert.Leaf
	if leaf == nil && len(cert.Certificate) > 0 {
		var err error
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return fmt.Errorf("the agent's certificate for %s is unreadable: %w", name, err)
		}
	}
	if leaf == nil {
		return fmt.Errorf("the agent has no certificate for %s", name)
	}
	a.mu.Lock()
	known := a.issuers[name].leaf == leaf
	a.mu.Unlock()
	if known {
		return nil
	}
	inters := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inters.AddCert(c)
		}
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: a.roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	if err != nil {
		return fmt.Errorf("the agent's certificate for %s does not verify against the TP root: %w", name, err)
	}
	for _, ch := range chains {
		if len(ch) == 3 {
			a.mu.Lock()
			if a.issuers == nil {
				a.issuers = map[string]issuer{}
			}
			a.issuers[name] = issuer{leaf: leaf, is: authz.Issuer{Root: ch[2], Intermediate: ch[1]}}
			a.mu.Unlock()
			return nil
		}
	}
	return fmt.Errorf("the agent's certificate for %s was not issued through TP's intermediate", name)
}

// fatalError ends Run instead of a reconnect.
type fatalError struct{ error }

func (e fatalError) Unwrap() error { return e.error }

// DefaultAgentIdleTimeout is Agent.IdleTimeout when not set.
const DefaultAgentIdleTimeout = 6 * time.Second

// DefaultAgentMaxSessions is Agent.MaxSessions when not set: as many sessions as
// tpd serves at once by default (max-conns), so that at tpd's defaults the
// server's bounds, not the agent's, decide. Each session costs the agent a
// connection to its local service (a file descriptor) and a few goroutines.
const DefaultAgentMaxSessions = 10_000

// DefaultAgentSpares is how many handshaken accept connections an agent over TLS
// keeps ready while sessions come close together (Dialer.Spares): two, so that
// the one made after a session is through the server's side of its handshake
// by the time a session takes it.
const DefaultAgentSpares = 2

// Agent reconnect backoff: the first wait, and the cap of a wait before jitter
// (waits are jittered from half to one and a half times the backoff).
const (
	agentBackoffMin = 500 * time.Millisecond
	agentBackoffMax = 30 * time.Second
)

// Run registers the names and serves sessions until ctx ends, re-establishing the
// control session with capped, jittered backoff (0.5s doubling to 30s, back to
// 0.5s after each successful registration) after any break. A policy denial and,
// once this agent has held its names, a name taken by another identity are
// retried too (see ExitOnRefusal). Run returns nil when ctx ends (having
// unregistered the names), or an error the server gave as final: a name another
// identity held before this agent ever registered it, a newer agent of the same
// device that took the names over, a request the server can never grant, a
// protocol version the server does not speak.
func (a *Agent) Run(ctx context.Context) error {
	if len(a.Exposed) == 0 || a.Dialer == nil || a.Dialer.TLSConfig == nil || a.Dialer.TLSConfig.RootCAs == nil {
		return errors.New("agent needs names to expose and a Dialer with a root and client certificate")
	}
	if a.Certificate == nil && slices.ContainsFunc(a.Exposed, func(e Exposed) bool { return !e.public() }) {
		return errors.New("agent needs Certificate to expose a name in protected mode")
	}
	if slices.ContainsFunc(a.Exposed, func(e Exposed) bool { return e.UDP }) {
		a.Dialer.CountDatagramDrops = true // public UDP sessions take DATAGRAM frames
	}
	for _, e := range a.Exposed {
		if err := wire.ValidReverseName(e.Name); err != nil {
			return err
		}
		if _, _, err := net.SplitHostPort(e.Local); err != nil {
			return fmt.Errorf("local address %q for %s must be HOST:PORT", e.Local, e.Name)
		}
		if e.UDP && e.PublicSNI != "" {
			return fmt.Errorf("%s: a UDP service is exposed on a public port (--public), not by TLS server name", e.Name)
		}
	}
	a.setupInner()
	if a.Dialer.Spares == 0 {
		a.Dialer.Spares = DefaultAgentSpares
	}
	if a.Dialer.TLSConfig.ClientSessionCache == nil {
		// Over TLS every session is a new connection to the relay: resume them.
		a.Dialer.TLSConfig.ClientSessionCache = tls.NewLRUClientSessionCache(16)
	}
	log := a.log()
	backoff := agentBackoffMin
	held := false // this agent registered its names at least once
	for {
		registered, err := a.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		var fe fatalError
		if errors.As(err, &fe) {
			return fe.error
		}
		if a.Explain != nil && err != nil && !errors.As(err, new(serverShutdown)) { // a stop needs no asking
			if err = a.Explain(ctx, err); errors.Is(err, authz.ErrRevoked) {
				return err // retrying cannot lift a revocation
			}
		}
		if registered {
			// The server worked: a later break is a new incident (a crash of
			// tpd, a network change), not one to slow down for.
			held, backoff = true, agentBackoffMin
		}
		wait := backoff/2 + rand.N(backoff)
		if errors.As(err, new(serverShutdown)) {
			// The server drains: end-to-end carriers through it take no new
			// stream and end with their last one, so they do not hold its
			// drain up (e2emux_agent.go).
			a.drainCarriers()
		}
		if errors.As(err, new(serverShutdown)) && registered {
			// The server stops: another one behind the same name may take the
			// names now (docs/PROTOCOL.md, section 6.3). If none answers, the next
			// attempt fails and waits as usual.
			wait = 0
		}
		var re *RefusedError
		refused := errors.As(err, &re) && (re.Code == wire.CodePolicyDenied || re.Code == wire.CodeNameTaken)
		var unreachable *UnreachableError
		switch {
		case errors.As(err, &unreachable):
			// One sentence with the most telling cause; every attempt's own
			// error (a carrier each, in auto) goes to the debug log.
			log.Debug("tp expose: connecting failed", "server", unreachable.Server, "err", unreachable.Err.Error())
			log.Warn("tp expose: " + retryLine(unreachable, wait.Round(10*time.Millisecond)))
		case !refused:
			log.Warn("tp expose: control session ended; reconnecting", "err", err.Error(), "in", wait.Round(10*time.Millisecond))
		case a.ExitOnRefusal, re.Code == wire.CodeNameTaken && !held:
			return err
		case re.Code == wire.CodeNameTaken:
			log.Warn("tp expose: another identity holds a name this agent held; retrying in case it is freed (tell the TP administrator if it is yours)",
				"err", err.Error(), "in", wait.Round(10*time.Millisecond))
		default:
			log.Warn("tp expose: the TP server refused the names; retrying, so a fixed policy takes effect without a restart (--exit-on-refusal exits instead)",
				"err", err.Error(), "in", wait.Round(10*time.Millisecond))
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil
		}
		backoff = min(2*backoff, agentBackoffMax)
	}
}

// setupInner makes the end-to-end TLS server configuration, one for all
// sessions so that tickets resume.
func (a *Agent) setupInner() {
	a.roots = a.Dialer.TLSConfig.RootCAs
	a.inner = &tls.Config{
		MinVersion: tls.VersionTLS13,
		// In the server's order of preference: a carrier of many sessions
		// (e2emux_agent.go), then attachable sessions, then a single one.
		NextProtos: []string{E2EMuxALPN, E2EALPN3, E2EALPN2, E2EALPN},
		ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs:  a.roots,
		// The agent's clock for certificates: it also ends carriers (e2emux_agent.go).
		Time: a.Dialer.TLSConfig.Time,
		GetCertificate: func(chi *tls.ClientHelloInfo) (*tls.Certificate, error) {
			name := strings.ToLower(chi.ServerName)
			a.mu.Lock()
			ours := slices.Contains(slices.Collect(maps.Values(a.full)), name)
			a.mu.Unlock()
			if !ours {
				return nil, fmt.Errorf("this agent does not expose %q", chi.ServerName)
			}
			cert, err := a.Certificate(chi.Context(), name)
			if err != nil {
				return nil, err
			}
			if err := a.learnIssuer(name, cert); err != nil {
				return nil, err
			}
			return cert, nil
		},
	}
}

func (a *Agent) log() *slog.Logger {
	if a.Logger != nil {
		return a.Logger
	}
	return slog.New(slog.DiscardHandler)
}

func (a *Agent) hello() wire.ClientHello {
	h := wire.ClientHello{V: wire.Version, Op: wire.OpListen, Net: "tcp"}
	for _, e := range a.Exposed {
		h.Names = append(h.Names, e.Name)
		network := "tcp"
		if e.UDP {
			network = "udp"
			h.UDP = append(h.UDP, e.Name)
		}
		if e.PublicPort != 0 || e.PublicSNI != "" {
			h.Public = append(h.Public, wire.PublicSpec{Name: e.Name, Net: network, Port: e.PublicPort, SNI: e.PublicSNI})
		}
	}
	return h
}

// session runs one control session to its end; registered says whether the
// server accepted the names. A refusal is a *RefusedError; fatalError wraps
// what retrying cannot change.
func (a *Agent) session(ctx context.Context) (registered bool, err error) {
	d := a.Dialer
	timeout := d.Timeout
	if timeout <= 0 {
		timeout = DefaultDialTimeout
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	tc := d.transport()
	mode := tc.Mode()
	auto := mode == TransportAuto || mode == ""
	var qconn *quic.Conn
	var ctl wire.Stream
	if mode != TransportTLS && !(auto && tc.AutoSkipsQUIC(cctx)) {
		qconn, err = a.connectQUIC(cctx)
		if err == nil {
			var str *quic.Stream
			if str, err = qconn.OpenStreamSync(cctx); err == nil {
				ctl = transport.NewStream(qconn, str)
			}
		}
		if err != nil && mode == TransportQUIC {
			cancel()
			return false, tc.Unreachable(err)
		}
		if err != nil { // auto: UDP blocked or QUIC refused; TLS carries the same protocol
			qconn = nil
		} else if auto {
			tc.RememberTransport(TransportQUIC)
		}
	}
	if ctl == nil {
		quicErr := err
		var tlsc *tls.Conn
		if tlsc, err = tc.ConnectTLS(cctx); err != nil {
			cancel()
			return false, tc.Unreachable(errors.Join(quicErr, err)) // auto: why QUIC failed too
		}
		ctl = tlsc
		if quicErr != nil {
			tc.RememberTransport(TransportTLS)
		}
	}
	handoff := false // the server stops: its sessions finish in the background (below)
	defer func() {
		if qconn != nil && !handoff {
			_ = qconn.CloseWithError(wire.QUICNoError, "")
		}
	}()
	stop := context.AfterFunc(cctx, func() { _ = ctl.SetDeadline(time.Unix(1, 0)) })
	sh, err := exchange(ctl, a.hello())
	stop()
	cancel()
	if err != nil {
		_ = ctl.Close()
		err = fmt.Errorf("registering with %s: %w", d.Server, explainHelloErr(err, d.expiredAdvice))
		if he := (*wire.HelloError)(nil); errors.As(err, &he) && he.Code == wire.CodeUnsupportedVersion {
			return false, fatalError{versionMismatch(err)} // the server speaks another version
		}
		return false, err
	}
	_ = ctl.SetDeadline(time.Time{})
	if !sh.OK {
		_ = ctl.Close()
		rerr := &RefusedError{Code: sh.Code, Reason: sh.Reason}
		switch sh.Code {
		case wire.CodeUnsupportedVersion:
			return false, fatalError{versionMismatch(rerr)}
		case wire.CodeReverseDisabled, wire.CodeBadRequest, wire.CodeUnknownOp, wire.CodeUnauthenticated,
			wire.CodePublicRefused, wire.CodeUnsupportedNetwork:
			return false, fatalError{rerr}
		}
		return false, rerr // Run decides about policy_denied and name_taken
	}
	a.mu.Lock()
	a.full = map[string]string{}
	for _, n := range sh.Names {
		label, _, _ := strings.Cut(n, ".")
		a.full[label] = n
	}
	a.mu.Unlock()
	kind := "tls"
	if qconn != nil {
		kind = "quic"
	}
	a.log().Info("tp expose: registered", "names", strings.Join(sh.Names, ","), "via", d.Server, "transport", kind)
	if a.Registered != nil {
		a.Registered(sh.Names)
	}

	sctx, scancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		if !handoff {
			wg.Wait()
			scancel()
			return
		}
		// A stopping server lets the sessions it relays drain: they finish here
		// while Run reconnects at once, possibly to another server.
		qc := qconn
		go func() {
			wg.Wait()
			scancel()
			if qc != nil {
				_ = qc.CloseWithError(wire.QUICNoError, "")
			}
		}()
	}()
	// Ctrl-C: tell the server to free the names now rather than hold them for the grace period.
	stopUnreg := context.AfterFunc(ctx, func() {
		_ = ctl.SetWriteDeadline(time.Now().Add(time.Second))
		_ = wire.WriteSessionHeader(ctl, wire.SessionHeader{V: wire.Version, End: "unregister"})
		_ = ctl.CloseWrite()
		_ = ctl.SetReadDeadline(time.Now().Add(time.Second))
	})
	defer stopUnreg()

	registered = true
	if qconn != nil {
		// Sessions arrive as streams the server opens; the control stream only
		// ends, with a frame that says why when the server ended it: that ends
		// the session too (the connection itself may stay up).
		ended := make(chan error, 1)
		actx, acancel := context.WithCancel(sctx)
		defer acancel()
		go func() {
			err := a.readControl(ctl, nil)
			if !errors.As(err, new(serverShutdown)) {
				scancel()
			}
			acancel()
			ended <- err
		}()
		for {
			str, err := qconn.AcceptStream(actx)
			if err != nil {
				var cerr error
				select {
				case cerr = <-ended: // the server ended the control stream
				default:
					select {
					case cerr = <-ended:
					case <-qconn.Context().Done():
					case <-time.After(time.Second): // stopping: let the unregister frame arrive first
					}
				}
				_ = ctl.Close()
				handoff = errors.As(cerr, new(serverShutdown)) && ctx.Err() == nil
				if cerr != nil && (errors.As(cerr, new(*RefusedError)) || errors.As(cerr, new(fatalError)) || errors.As(cerr, new(serverShutdown))) {
					return true, cerr
				}
				if qerr := context.Cause(qconn.Context()); qerr != nil {
					err := fmt.Errorf("QUIC connection: %w", transport.ExplainQUIC(qerr, a.Dialer.expiredAdvice))
					// The server closes a connection that carries only the control
					// stream with 0x3 right after the end frame, which may then be
					// lost: the code says the same.
					if ae := (*quic.ApplicationError)(nil); errors.As(qerr, &ae) && ae.Remote && ae.ErrorCode == wire.QUICShutdown {
						return true, serverShutdown{err}
					}
					return true, err
				}
				if cerr != nil {
					return true, cerr
				}
				return true, err
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				st := transport.NewStream(qconn, str)
				_ = st.SetReadDeadline(time.Now().Add(agentHandshakeTimeout))
				hdr, err := wire.ReadSessionHeader(st)
				if err != nil {
					st.Abort(wire.QUICInternal)
					return
				}
				_ = st.SetReadDeadline(time.Time{})
				a.serve(sctx, st, hdr, nil)
			}()
		}
	}
	// TLS: sessions are announced on the control connection; each is accepted on
	// a new TLS connection.
	defer ctl.Close()
	err = a.readControl(ctl, func(hdr wire.SessionHeader) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.acceptTLS(sctx, hdr)
		}()
	})
	handoff = errors.As(err, new(serverShutdown)) && ctx.Err() == nil
	return true, err
}

// serverShutdown is the end of a control session by a server that stops
// (`{"end":"shutdown"}`): the agent reconnects at once, and the sessions it
// serves are left to finish.
type serverShutdown struct{ error }

func (e serverShutdown) Unwrap() error { return e.error }

// versionMismatch is final: retrying cannot make this agent and the server speak
// the same protocol version (docs/PROTOCOL.md, section 2.3).
func versionMismatch(err error) error {
	return fmt.Errorf("%w; this tp speaks protocol version %d and the TP server does not: update tp, or ask the TP administrator to update the server", err, wire.Version)
}

// readControl reads control frames until the control stream ends; pings bound the
// silence on TLS: twice the period the server's pings announce, plus a second
// (45s for a server that announces none).
func (a *Agent) readControl(ctl wire.Stream, announce func(wire.SessionHeader)) error {
	silence := 45 * time.Second
	for {
		if announce != nil {
			_ = ctl.SetReadDeadline(time.Now().Add(silence))
		}
		hdr, err := wire.ReadSessionHeader(ctl)
		if announce != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("control connection to %s lost: the TP server sent nothing for %s", a.Dialer.Server, silence)
		}
		if err != nil {
			return fmt.Errorf("control connection to %s ended: %w", a.Dialer.Server, err)
		}
		if hdr.Ping && hdr.PingMS > 0 {
			silence = 2*time.Duration(min(hdr.PingMS, 3_600_000))*time.Millisecond + time.Second
		}
		switch {
		case hdr.End == "replaced":
			return fatalError{fmt.Errorf("the TP server ended this agent: %s", hdr.Reason)}
		case hdr.End == wire.EndShutdown:
			return serverShutdown{fmt.Errorf("the TP server is stopping: %s", hdr.Reason)}
		case hdr.End == wire.EndRevoked: // final: retrying cannot lift a revocation
			return fatalError{fmt.Errorf("the TP server ended this agent: this device or its user is revoked on the TP server: %s%.0w",
				strings.TrimPrefix(hdr.Reason, "identity no longer accepted: "), authz.ErrRevoked)}
		case hdr.End == wire.CodePolicyDenied: // retried: the policy may be fixed
			return &RefusedError{Code: wire.CodePolicyDenied, Reason: "the TP server's policy no longer allows these names: " + hdr.Reason}
		case hdr.End != "":
			return fmt.Errorf("the TP server ended the control session: %s", hdr.Reason)
		case hdr.Session != "" && announce != nil:
			announce(hdr)
		}
	}
}

func (a *Agent) acceptTLS(ctx context.Context, hdr wire.SessionHeader) {
	cctx, cancel := context.WithTimeout(ctx, agentHandshakeTimeout)
	defer cancel()
	what, hello := "session "+hdr.Session, wire.ClientHello{V: wire.Version, Op: wire.OpAccept, Session: hdr.Session}
	c, err := a.Dialer.transport().RoundTrip(cctx, transport.Trip{Kind: transport.TripAccept, What: what,
		Retry: (*earlyDial)(nil),
		Run: func(ctx context.Context, s *transport.Stream) (net.Conn, error) {
			return a.Dialer.request(ctx, s, what, hello)
		}})
	if err != nil {
		a.log().Warn("tp expose: cannot pick up a session", "name", hdr.Name, "err", err.Error())
		return
	}
	a.serve(ctx, c.(wire.Stream), hdr, a.Dialer.transport().Answered)
}

// serve runs one session: inner TLS with the dialer, identity checks, then the
// local service. It never dials anything but the configured local address.
// answered, when set, is called once, when the session has its first answer
// (the agent's hello, a refusal, a failure; at once for a public name).
func (a *Agent) serve(ctx context.Context, st wire.Stream, hdr wire.SessionHeader, answered func()) {
	if answered != nil {
		var once sync.Once
		f := answered
		answered = func() { once.Do(f) }
		defer answered()
	} else {
		answered = func() {}
	}
	start := time.Now()
	log := a.log().With("name", hdr.Name, "peer", hdr.PeerID)
	var local string
	var udp bool
	for _, e := range a.Exposed {
		if e.Name == hdr.Name {
			if e.UDP != (hdr.Net == "udp") {
				refuseSession(st, wire.QUICInternal)
				log.Warn("tp expose: session's network does not match the service; refused", "net", hdr.Net, "udp", e.UDP)
				return
			}
			local, udp = e.Local, e.UDP
			switch { // the agent's own configuration decides, never the header
			case e.public() && e.UDP:
				answered()
				a.servePublicUDP(ctx, st, hdr, e, log)
				return
			case e.public():
				answered()
				a.servePublic(ctx, st, hdr, e, log)
				return
			}
		}
	}
	a.mu.Lock()
	full := a.full[hdr.Name]
	a.mu.Unlock()
	if local == "" || full == "" {
		refuseSession(st, wire.QUICInternal)
		log.Warn("tp expose: session for a name this agent does not expose; refused")
		return
	}
	var conn net.Conn = st
	if a.WrapData != nil {
		conn = a.WrapData(st)
	}
	var pre *localDial
	if !udp && a.allowed(hdr.PeerUser, hdr) {
		// The server vouches for a dialer this agent allows: connect to the
		// service while the end-to-end session is checked (admit decides).
		pre = startLocalDial(ctx, "tcp", local)
		defer pre.discard()
	}
	// The first byte tells an attach (tp-e2e/2, e2eattach.go) from a TLS
	// ClientHello (a handshake record, 0x16).
	_ = conn.SetReadDeadline(time.Now().Add(agentHandshakeTimeout))
	stopRead := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Unix(1, 0)) })
	var first [1]byte
	_, err := io.ReadFull(conn, first[:])
	stopRead()
	if err != nil {
		refuseSession(conn, wire.QUICInternal)
		log.Warn("tp expose: the dialer sent nothing", "err", err.Error())
		return
	}
	if first[0] == direct.Marker { // an end-to-end QUIC pair (direct_agent.go)
		a.serveDirect(ctx, conn, hdr, full, local, udp, pre, answered, log)
		return
	}
	var below net.Conn = &prefixConn{Conn: conn, prefix: first[:]}
	if first[0] == attachMarker {
		if a.serveAttach(ctx, conn, hdr, full, local, udp, pre, answered, start, log) {
			return
		}
		below = conn // the dialer starts a TLS handshake on the same stream
	}
	_ = conn.SetReadDeadline(time.Time{}) // hctx bounds the handshake
	// EOFConn lets a cut of the dialer's side (no close_notify) be told from its end.
	batch := &transport.BatchConn{Conn: wire.NewEOFConn(below)}
	tc := tls.Server(batch, a.inner)
	hctx, cancel := context.WithTimeout(ctx, agentHandshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		_ = conn.Close()
		log.Warn("tp expose: end-to-end TLS handshake failed", "err", err.Error())
		return
	}
	cs := tc.ConnectionState()
	id, code, reason, expires := a.checkDialer(cs, full, "the end-to-end TLS session")
	if cs.NegotiatedProtocol == E2EMuxALPN { // a carrier of many sessions (e2emux_agent.go)
		a.serveMux(ctx, tc, batch, cs, hdr, full, local, udp, pre, code, reason, id.DeviceID, id.User, expires, answered, log)
		return
	}
	sess := &e2eSession{Stream: tc, bridge: &transport.BatchedTLS{Conn: tc, Batch: batch}, capsules: tc, answered: answered}
	if code != "" {
		sess.refuse(code, reason, log)
		return
	}
	if cs.NegotiatedProtocol == E2EALPN2 || cs.NegotiatedProtocol == E2EALPN3 {
		sess.onOK = func() {
			// Kept only for a session the agent admitted: later sessions of this
			// dialer to this name attach to it (still checked one by one).
			secret, aid, err := exportAttach(cs)
			if err != nil {
				return
			}
			now := time.Now()
			a.attaches.put(aid, &agentAttach{secret: secret, full: full, device: id.DeviceID, user: id.User,
				expires: minTime(now.Add(AttachLife), cs.PeerCertificates[0].NotAfter), used: now}, now)
		}
	}
	a.admit(ctx, sess, hdr, full, local, udp, pre, nil, id.DeviceID, id.User, start, log.With("e2e", cs.NegotiatedProtocol))
}

// checkDialer holds the dialer's certificate of an end-to-end session (what
// names it in a refusal) to the rules of section 11.4: the session names
// full, the certificate is a leaf of the issuing intermediate of the agent's
// own certificate for it (like tpd: never CA:TRUE, clientAuth named), and it
// carries a TP identity. code is empty when it passes; expires is the end of
// the earlier of both certificates.
func (a *Agent) checkDialer(cs tls.ConnectionState, full, what string) (id authz.Identity, code, reason string, expires time.Time) {
	leaf := cs.PeerCertificates[0] // the handshake required one
	expires = leaf.NotAfter
	a.mu.Lock()
	iss, known := a.issuers[full]
	a.mu.Unlock()
	chainErr := errors.New("the agent does not know the CA of its own certificate yet")
	if known {
		chainErr = iss.is.CheckChains(leaf, cs.VerifiedChains)
		expires = minTime(expires, iss.leaf.NotAfter)
	}
	id, idErr := authz.IdentityFromCert(leaf)
	switch {
	case !strings.EqualFold(cs.ServerName, full):
		code, reason = wire.CodeUnauthenticated, fmt.Sprintf("%s names %q, not %s", what, cs.ServerName, full)
	case chainErr != nil:
		code, reason = wire.CodeUnauthenticated, "the agent refused the device certificate: "+chainErr.Error()
	case idErr != nil:
		code, reason = wire.CodeUnauthenticated, "the device certificate carries no TP identity: "+idErr.Error()
	}
	return id, code, reason, expires
}

// e2eSession is an authenticated end-to-end session, before the agent's hello:
// an inner TLS session or an attached one.
type e2eSession struct {
	wire.Stream             // hellos are written here
	bridge      net.Conn    // what the service's bytes are relayed through
	capsules    wire.Stream // what a UDP name's capsules run on
	onOK        func()      // after the ok hello is sent
	answered    func()      // after the ok hello is sent, or nil
}

func (s *e2eSession) refuse(code, reason string, log *slog.Logger) {
	_ = s.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_ = wire.WriteServerHello(s, wire.ServerHello{V: wire.Version, Code: code, Reason: reason})
	_ = s.CloseWrite()
	_ = s.Close()
	log.Warn("tp expose: session refused", "code", code, "reason", reason)
}

// admit makes the agent's per-session checks of an authenticated dialer (device,
// user: from its certificate, now or when the attach state was made), connects
// to the local service (or takes pre, the connection started before the checks)
// and relays the session, starting with first, the dialer's bytes that came
// with its attach.
func (a *Agent) admit(ctx context.Context, sess *e2eSession, hdr wire.SessionHeader, full, local string, udp bool, pre *localDial, first []byte, device, user string, start time.Time, log *slog.Logger) {
	switch {
	case device != hdr.PeerID:
		sess.refuse(wire.CodeUnauthenticated, fmt.Sprintf("the certificate is for %s but the TP server announced %s", device, hdr.PeerID), log)
		return
	case !a.allowed(user, hdr):
		a.mu.Lock()
		users, groups := listOrNone(a.AllowUsers), listOrNone(a.AllowGroups)
		a.mu.Unlock()
		guests := ""
		switch {
		case hdr.PeerGuestOf != "" && a.RefuseGuests:
			guests = "; it is a guest, and this agent refuses guests"
		case hdr.PeerGuestOf != "":
			guests = "; it is a guest of " + hdr.PeerGuestOf + "'s share, and this agent is not " + hdr.PeerGuestOf + "'s"
		}
		sess.refuse(CodeAgentDenied, fmt.Sprintf("%s is not allowed by the agent of %s (allowed users: %s; groups: %s%s)",
			device, full, users, groups, guests), log)
		return
	}
	network := "tcp"
	if udp {
		network = "udp"
	}
	if pre == nil {
		pre = startLocalDial(ctx, network, local)
	}
	upstream, err := pre.take()
	if err != nil && errors.Is(context.Cause(ctx), errDialerCancelled) {
		return // the dialer aborted the stream: nobody to answer (serveMux)
	}
	if err != nil {
		sess.refuse(wire.CodeDialFailed, a.localDownReason(full, err), log.With("local", local, "err", err.Error()))
		return
	}
	_ = sess.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if err := wire.WriteServerHello(sess, wire.ServerHello{V: wire.Version, OK: true}); err != nil {
		_ = sess.Close()
		_ = upstream.Close()
		return
	}
	_ = sess.SetWriteDeadline(time.Time{})
	if sess.answered != nil {
		sess.answered()
	}
	if sess.onOK != nil {
		sess.onOK()
	}
	if len(first) > 0 {
		_ = upstream.SetWriteDeadline(time.Now().Add(localDialTimeout))
		if _, err := upstream.Write(first); err != nil {
			// The dialer counts these bytes as sent: its session must fail, not
			// go on without them.
			wire.Abort(sess, wire.QUICPeerReset)
			_ = upstream.Close()
			log.Warn("tp expose: the local service did not take the dialer's first bytes", "local", local, "err", err.Error())
			return
		}
		_ = upstream.SetWriteDeadline(time.Time{})
	}
	if udp { // datagrams as capsules inside the end-to-end session
		a.relayUDP(ctx, wire.NewCapsuleFlow(sess.capsules, 0), upstream, local, start, log)
		return
	}
	up, down, err := wire.Bridge(ctx, sess.bridge, upstream)
	end := "closed"
	if err != nil {
		end = err.Error()
	}
	log.Info("tp expose: session", "local", local, "bytes_in", up, "bytes_out", down, "duration", time.Since(start), "end", end)
}

// serveAttach runs an attach (its marker byte already read from conn): it
// reports false, having answered attachFallback, when the state is unknown,
// expired or the session number was used before, so that a TLS handshake
// follows; else it serves the session to its end.
func (a *Agent) serveAttach(ctx context.Context, conn net.Conn, hdr wire.SessionHeader, full, local string, udp bool, pre *localDial, answered func(), start time.Time, log *slog.Logger) bool {
	msg, err := readAttach(conn, udp)
	if err != nil {
		refuseSession(conn, wire.QUICInternal)
		log.Warn("tp expose: malformed attach; refused", "err", err.Error())
		return true
	}
	var id [attachIDLen]byte
	copy(id[:], msg[1:])
	n := binary.BigEndian.Uint64(msg[1+attachIDLen:])
	proofHdr, proof := msg[attachHeadLen-1:attachHeadLen+1], msg[attachHeadLen+1:]
	st := a.attaches.get(id)
	var c2s, s2c cipher.AEAD
	if st != nil {
		c2s, s2c, err = attachKeys(st.secret, id, n)
	}
	if st == nil || err != nil || st.full != full {
		return a.attachFallback(conn, log)
	}
	typ, first, err := openRecord(c2s, 0, proofHdr, proof)
	if err != nil || typ != recProof {
		refuseSession(conn, wire.QUICInternal)
		log.Warn("tp expose: an attach that does not prove the end-to-end secret; refused")
		return true
	}
	if !st.claim(n, time.Now()) { // replayed, too old, or the state expired
		return a.attachFallback(conn, log)
	}
	_ = conn.SetReadDeadline(time.Time{})
	// The answer byte goes out with the agent's first record (its hello, after
	// the checks): one write, one packet and one hand-off through the relay
	// instead of two.
	sc := newSealedConn(&leadConn{Conn: conn, lead: []byte{attachAccepted}}, c2s, s2c, 1, 0)
	a.admit(ctx, &e2eSession{Stream: sc, bridge: sc, capsules: sc, answered: answered}, hdr, full, local, udp, pre, first, st.device, st.user, start, log.With("e2e", "attach"))
	return true
}

// readAttach reads the rest of an attach whose marker byte was read: version,
// id, session number and the proof record, which only version 2 (tp-e2e/3, not
// for a UDP name) may make longer than an empty one, and never longer than an
// attach that fits the early data a server discards.
func readAttach(conn io.Reader, udp bool) ([]byte, error) {
	msg := make([]byte, attachMsgLen-1, attachMsgLen-1+maxAttachFirst)
	if _, err := io.ReadFull(conn, msg[:attachHeadLen+1]); err != nil {
		return nil, err
	}
	version, l := msg[0], int(binary.BigEndian.Uint16(msg[attachHeadLen-1:attachHeadLen+1]))
	switch {
	case version != attachVersion && version != attachVersion2:
		return nil, fmt.Errorf("attach version 0x%02x", version)
	case l < sealedOverhead:
		return nil, fmt.Errorf("a proof record of %d bytes", l)
	case l > sealedOverhead && version != attachVersion2:
		return nil, fmt.Errorf("first bytes in a version 0x%02x attach", version)
	case l > sealedOverhead && udp:
		return nil, errors.New("first bytes in an attach for a UDP name")
	case l > maxAttachFirst+sealedOverhead:
		return nil, fmt.Errorf("%d first bytes in an attach; at most %d", l-sealedOverhead, maxAttachFirst)
	}
	msg = msg[:attachHeadLen+1+l]
	if _, err := io.ReadFull(conn, msg[attachHeadLen+1:]); err != nil {
		return nil, err
	}
	return msg, nil
}

func (a *Agent) attachFallback(conn net.Conn, log *slog.Logger) bool {
	_ = conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte{attachFallback}); err != nil {
		_ = conn.Close()
		return true
	}
	_ = conn.SetWriteDeadline(time.Time{})
	log.Debug("tp expose: unknown or used attach; a TLS handshake follows")
	return false
}

// leadConn writes lead in front of the first Write to conn, in the same write.
type leadConn struct {
	net.Conn
	mu   sync.Mutex
	lead []byte
}

func (l *leadConn) Write(p []byte) (int, error) {
	l.mu.Lock()
	lead := l.lead
	l.lead = nil
	l.mu.Unlock()
	if len(lead) == 0 {
		return l.Conn.Write(p)
	}
	n, err := l.Conn.Write(append(lead, p...))
	return max(n-len(lead), 0), err
}

// CloseWrite half-closes conn.
func (l *leadConn) CloseWrite() error {
	if cw, ok := l.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("this connection cannot half-close")
}

// Unwrap is conn.
func (l *leadConn) Unwrap() net.Conn { return l.Conn }

// prefixConn reads prefix before conn.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.prefix) > 0 {
		n := copy(b, p.prefix)
		p.prefix = p.prefix[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

// CloseWrite half-closes conn.
func (p *prefixConn) CloseWrite() error {
	if cw, ok := p.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("this connection cannot half-close")
}

// Unwrap is conn.
func (p *prefixConn) Unwrap() net.Conn { return p.Conn }

// refuseSession ends a session the agent will not serve, before anything of it
// was relayed (docs/PROTOCOL.md, section 11.8): an abort with code, never a clean
// close, which the dialer would take for an empty, complete session. QUICInternal
// says the server sent what the agent cannot serve (a protocol error, section
// 9.5); QUICPeerReset that the local service cannot be reached.
func refuseSession(st net.Conn, code quic.ApplicationErrorCode) { wire.Abort(st, code) }

// allowed says whether the agent admits the dialer that hdr announces, whose
// certificate names user: a user or group of its allow list, or a guest of
// the name (unless it refuses guests).
func (a *Agent) allowed(user string, hdr wire.SessionHeader) bool {
	a.mu.Lock() // SetAllow may replace the lists
	defer a.mu.Unlock()
	if slices.Contains(a.AllowUsers, user) || a.admitsGuest(hdr) {
		return true
	}
	for _, g := range hdr.PeerGroups {
		if slices.Contains(a.AllowGroups, g) {
			return true
		}
	}
	return false
}

// admitsGuest says whether hdr announces a guest with whom the agent's own
// user shared the name, and the agent admits guests.
func (a *Agent) admitsGuest(hdr wire.SessionHeader) bool {
	return hdr.PeerGuestOf != "" && hdr.PeerGuestOf == a.Owner && !a.RefuseGuests
}

func listOrNone(l []string) string {
	if len(l) == 0 {
		return "none"
	}
	return strings.Join(l, ", ")
}

func (a *Agent) maxSessions() int64 {
	if a.MaxSessions > 0 {
		return int64(a.MaxSessions)
	}
	return DefaultAgentMaxSessions
}

// connectQUIC opens the agent's own QUIC connection: unlike a dialer's, it accepts
// streams, one per session the server opens (transport.Client.ConnectAgent).
func (a *Agent) connectQUIC(ctx context.Context) (*quic.Conn, error) {
	idle := a.IdleTimeout
	if idle <= 0 {
		idle = DefaultAgentIdleTimeout
	}
	return a.Dialer.transport().ConnectAgent(ctx, &quic.Config{
		KeepAlivePeriod:                idle / 3,
		MaxIdleTimeout:                 idle,
		MaxIncomingStreams:             a.maxSessions(), // concurrent sessions
		MaxIncomingUniStreams:          -1,
		InitialStreamReceiveWindow:     wire.QUICInitialStreamWindow,
		MaxStreamReceiveWindow:         wire.QUICMaxStreamWindow,
		InitialConnectionReceiveWindow: wire.QUICInitialConnWindow,
		MaxConnectionReceiveWindow:     wire.QUICMaxConnWindow,
		EnableDatagrams:                true, // public UDP sessions (exposeudp.go)
	})
}

// localDownReason is what a dialer reads when the agent cannot connect to its
// local service: whose service it is (the dialer cannot tell otherwise: the
// agent's certificate for the name carries no identity, docs/PROTOCOL.md
// section 11.10) and the cause in general terms, not the local address.
func (a *Agent) localDownReason(full string, err error) string {
	cause := wire.UnwrapOpError(err).Error()
	var errno syscall.Errno
	switch {
	case errors.As(err, &errno):
		cause = errno.Error()
	case errors.Is(err, context.DeadlineExceeded) || os.IsTimeout(err):
		cause = fmt.Sprintf("no answer within %s", localDialTimeout)
	}
	device := ""
	if a.Dialer != nil {
		device = a.Dialer.device
	}
	user, _, _ := strings.Cut(device, "@")
	if device == "" {
		return fmt.Sprintf("%s is exposed by a device whose agent could not connect to its local service (%s); ask its owner to check it", full, cause)
	}
	return fmt.Sprintf("%s is exposed by %s, whose agent could not connect to its local service (%s); ask %s to check it", full, device, cause, user)
}
