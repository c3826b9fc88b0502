package proxy

import (
	"crypto/tls"
	"time"
)

// DecryptsTicket reports whether the proxy's (proxy true) or the website's session
// ticket keys open ticket, a ticket as a client received it.
func DecryptsTicket(s *Server, proxy bool, ticket []byte) bool {
	cfg := s.webTLS
	if proxy {
		cfg = s.proxyTLS
	}
	ss, err := cfg.DecryptTicket(ticket, tls.ConnectionState{})
	return err == nil && ss != nil
}

// SetWebBodyIdle shortens how long a request body may stall; it returns the restore.
func SetWebBodyIdle(d time.Duration) func() {
	old := webBodyIdle.Swap(int64(d))
	return func() { webBodyIdle.Store(old) }
}

// EndRecordTTL is how long op "why" answers about a cut session.
const EndRecordTTL = endRecordTTL

// SetEndRecordClock makes s read the time of its "why" records from now.
func SetEndRecordClock(s *Server, now func() time.Time) {
	s.ends.mu.Lock()
	defer s.ends.mu.Unlock()
	s.ends.clock = now
}

// H3IdleGrace is how long a shutdown waits for HTTP/3 clients with no request in flight.
const H3IdleGrace = h3IdleGrace

// OnBye makes s call f when an op "bye" begins to wait for its connection's
// other streams.
func OnBye(s *Server, f func()) { s.onBye.Store(&f) }

// H2TunnelsOf is how many h2 reverse HTTP tunnels the server holds for host.
func (s *Server) H2TunnelsOf(host string) int {
	h := s.rev.tunnels.holder(host)
	if h == nil {
		return 0
	}
	return len(h.h2.Snapshot())
}

// ReverseHeld reports whether tunnels hold the reverse name host now (not
// counting a holder whose last tunnel just closed).
func (s *Server) ReverseHeld(host string) bool { return s.rev.tunnels.holder(host) != nil }

// ServingQUIC reports whether ServeQUIC has started on its socket (its
// carrier mux is in place): a test's first request may go out then.
func (s *Server) ServingQUIC() bool { return s.carriers.Load() != nil }
