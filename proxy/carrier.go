package proxy

// The server's side of the stream carriers (package proxy/carrier): the mux
// under the first QUIC server, and the routes that hand carrier connections
// and requests to it.

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"

	"github.com/tp-proxy/tp/internal/lib/udpgro"
	"github.com/tp-proxy/tp/proxy/carrier"
	"github.com/tp-proxy/tp/proxy/wire"
)

// CarrierOptions bounds the stream carriers (carrier.Options).
type CarrierOptions = carrier.Options

// CarrierStats are the carrier sessions (carrier.Stats).
type CarrierStats = carrier.Stats

// CarrierEndReasons name the reasons of CarrierStats.Ended, in order.
var CarrierEndReasons = carrier.EndReasons

// carrierMux returns the mux of the QUIC server, nil while QUIC is not served
// on a UDP socket.
func (s *Server) carrierMux() *carrier.Mux { return s.carriers.Load() }

// carrierRemote maps a carrier session's virtual address to the address its
// carrier connection came from (carrier.Mux.Remote).
func (s *Server) carrierRemote(a net.Addr) (string, bool) {
	return s.carrierMux().Remote(a)
}

// CarrierStats reports the carrier sessions; zero while QUIC is not served.
func (s *Server) CarrierStats() CarrierStats { return s.carrierMux().Stats() }

// QUICSocketStats counts the reads of the QUIC server's UDP socket (the one
// under the carrier mux): system calls and the packets they brought. Zero
// while QUIC is not served on a UDP socket.
func (s *Server) QUICSocketStats() udpgro.Stats {
	if r := s.socket.Load(); r != nil {
		return r.Stats()
	}
	return udpgro.Stats{}
}

// CarrierSessions reports the carrier sessions open now (for tests and monitoring).
func (s *Server) CarrierSessions() int { return s.carrierMux().Sessions() }

// carrierDevice is the device a tp-carrier/1 connection's handshake proved.
func (s *Server) carrierDevice(conn *tls.Conn) string {
	cs := conn.ConnectionState()
	id, _ := s.connIdentity(&cs)
	if id == "" {
		id = "?" // verified by the handshake, whatever its name says
	}
	return id
}

// serveCarrierTLS serves one TLS connection that negotiated "tp-carrier/1"; its
// handshake verified the device certificate like "tp/1".
func (s *Server) serveCarrierTLS(ctx context.Context, conn *tls.Conn) {
	m := s.carrierMux()
	if m == nil {
		s.log.Warn("carrier connection refused: QUIC is not served", "remote", conn.RemoteAddr().String())
		_ = conn.Close()
		return
	}
	if err := m.ServeTLS(ctx, conn, s.carrierDevice(conn)); err != nil {
		s.log.Warn("carrier connection refused", "carrier", wire.CarrierTLS, "remote", conn.RemoteAddr().String(), "err", err)
		_ = conn.Close()
	}
}

// carrierRoutes puts the carriers' HTTP endpoints in front of the website's
// handler web.
func (s *Server) carrierRoutes(web http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case wire.CarrierWSPath:
			s.serveCarrierWS(w, r)
			return
		case wire.CarrierHTTPPath:
			s.serveCarrierHTTP(w, r)
			return
		case wire.WebSocketPath: // a browser's request without WebTransport (webtransport.go)
			if s.cfg.WebTransport {
				s.serveWebSocket(w, r)
				return
			}
		}
		web.ServeHTTP(w, r)
	})
}

// serveCarrierWS upgrades a request at wire.CarrierWSPath to the ws carrier
// (carrier.Mux.ServeWS).
func (s *Server) serveCarrierWS(w http.ResponseWriter, r *http.Request) {
	m := s.carrierMux()
	if m == nil {
		http.Error(w, "the ws carrier needs QUIC, which this TP server does not serve", http.StatusServiceUnavailable)
		return
	}
	// The session ends with its link, with the QUIC server (which closes the
	// mux after its connections drained), or when a shutdown gives up draining.
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	defer cancel()
	stop := context.AfterFunc(s.force, cancel)
	defer stop()
	m.ServeWS(ctx, w, r)
}

// serveCarrierHTTP serves one request of the http carrier.
func (s *Server) serveCarrierHTTP(w http.ResponseWriter, r *http.Request) {
	m := s.carrierMux()
	if m == nil {
		http.Error(w, "the http carrier needs QUIC, which this TP server does not serve", http.StatusServiceUnavailable)
		return
	}
	s.httpCarriers.Serve(m, w, r)
}
