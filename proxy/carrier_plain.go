package proxy

import (
	"net/http"

	"github.com/tp-proxy/tp/proxy/wire"
)

// CarrierHTTPHandler serves the http carrier (POST wire.CarrierHTTPPath) for
// a listener other than the shared port: tpd's plain-HTTP listener, which a
// plain forwarding HTTP proxy (one that forwards http:// requests and refuses
// CONNECT) can reach. The carrier adds no authority there either: it moves
// QUIC packets, whose handshake needs the device certificate and whose
// packets are encrypted and authenticated end to end, as over UDP. Any other
// path answers 404.
func (s *Server) CarrierHTTPHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != wire.CarrierHTTPPath {
			http.NotFound(w, r)
			return
		}
		s.serveCarrierHTTP(w, r)
	})
}
