package tpd

import (
	"io"
	"net/http"
	"strings"

	"github.com/tp-proxy/tp/proxy/wire"
)

// proxyNameSet is proxy.Config.ProxyNames for the names of proxy-names; nil
// (no proxy names) when there are none.
func proxyNameSet(names []string) func(string) bool {
	if len(names) == 0 {
		return nil
	}
	set := make(map[string]bool, len(names))
	for _, n := range names {
		set[strings.ToLower(strings.TrimSuffix(n, "."))] = true
	}
	return func(name string) bool { return set[name] }
}

// proxyHTTPHandler is proxy.Config.ProxyHTTP: the discovery document, and
// 404 with a hint for anything else.
func proxyHTTPHandler(discovery http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle(wire.DiscoveryPath, discovery)
	mux.HandleFunc("/", proxyNotFound)
	return mux
}

// proxyNotFound answers the requests on a proxy name that are neither CONNECT
// nor a reverse tunnel.
func proxyNotFound(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusNotFound)
	_, _ = io.WriteString(w, "This is TP's HTTPS proxy name: it serves CONNECT (e.g. curl --proxy https://"+r.Host+
		" --proxy-cert device.pem --proxy-key device.key --proxy-cacert root.pem https://destination/), not web pages; see docs/HTTP.md.\n")
}
