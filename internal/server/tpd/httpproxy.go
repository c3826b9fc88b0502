package tpd

import (
	"io"
	"net"
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
// nor a reverse tunnel, with a hint for a person: most come from a client that
// was meant to open a CONNECT tunnel.
func proxyNotFound(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusNotFound)
	_, _ = io.WriteString(w, proxyHint(r))
}

// proxyFiles are the curl flags for the device certificate that dlogin keeps
// in TP_HOME, and what they are: key.pem is the certificate's key; device.key,
// the device key, only ever signs logins.
const proxyFiles = "--proxy-cert $TP_HOME/cert.pem --proxy-key $TP_HOME/key.pem --proxy-cacert $TP_HOME/root.pem"

const proxyFilesNote = "$TP_HOME is the directory dlogin keeps these files in (dlogin --help shows its default); " +
	"key.pem holds the certificate's key (device.key is the device key, never used for TLS). See docs/HTTP.md.\n"

// proxyHint is proxyNotFound's text. A request in absolute form (GET
// http://host/…) is what curl sends a proxy for an http:// URL without -p: its
// Host names the destination, so the proxy is named by the TLS handshake's
// server name and the port the connection came to.
func proxyHint(r *http.Request) string {
	if !r.URL.IsAbs() {
		return "This is TP's HTTPS proxy name: it serves CONNECT (e.g. curl --proxy https://" + r.Host + " " + proxyFiles +
			" https://destination/), not web pages.\n" + proxyFilesNote
	}
	proxy := "PROXYNAME:PORT"
	if r.TLS != nil && r.TLS.ServerName != "" {
		proxy = r.TLS.ServerName
		if la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			if _, port, err := net.SplitHostPort(la.String()); err == nil && port != "443" {
				proxy = net.JoinHostPort(proxy, port)
			}
		}
	}
	target := shellWord(r.URL.String())
	return "TP's HTTPS proxy https://" + proxy + " does not forward plain requests like " + r.Method + " " + target +
		": it serves only CONNECT tunnels. curl sends an http:// URL to a proxy as a plain request unless told to tunnel:" +
		" add -p (--proxytunnel), or use an https:// URL:\n" +
		"  curl -p --proxy https://" + proxy + " " + proxyFiles + " " + target + "\n" + proxyFilesNote
}

// shellWord is s quoted for a POSIX shell when it holds more than letters,
// digits and the URL characters a shell leaves alone.
func shellWord(s string) string {
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-._~:/@%+,=", c)) {
			return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
		}
	}
	return s
}
