package proxy

import "net/http"

// ServeReverseTunnel answers a request for a reverse tunnel (HTTP/1.1 Upgrade:
// reverse, or extended CONNECT with :protocol reverse) on a proxy name. Reverse
// tunnels are not served yet.
func (s *Server) ServeReverseTunnel(w http.ResponseWriter, _ *http.Request) {
	http.Error(w, "reverse tunnels are not served by this TP server yet", http.StatusNotImplemented)
}
