package tpd

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
)

// The admin HTTP listener (admin-listen): /metrics for Prometheus, /healthz
// (the process answers) and /readyz (it should get traffic). It serves no
// secrets and takes no actions; the admin socket does those.

// adminMaxConns bounds the connections the admin listener serves at once: a
// scraper and a couple of probes need a few. More wait in the kernel's backlog.
const adminMaxConns = 16

// listenAdminHTTP opens admin-listen, with an error message that says what to do.
func listenAdminHTTP(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	switch {
	case err == nil:
		return netutil.LimitListener(ln, adminMaxConns), nil
	case errors.Is(err, syscall.EACCES):
		return nil, fmt.Errorf("cannot listen on admin-listen %s: permission denied; choose a port above 1023, or set admin-listen to \"\"", addr)
	case errors.Is(err, syscall.EADDRINUSE):
		return nil, fmt.Errorf("cannot listen on admin-listen %s: something else is already listening there; stop it, or set admin-listen to another port or to \"\"", addr)
	default:
		return nil, fmt.Errorf("cannot listen on admin-listen %s: %w", addr, err)
	}
}

// adminHTTPServer serves the admin endpoints, bounded in time and size.
func (d *Daemon) adminHTTPServer() *http.Server {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if reasons := d.notReady(); len(reasons) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, strings.Join(reasons, "\n")+"\n")
			return
		}
		// A lost database degrades tpd without making it unready: it serves the
		// devices and deny list it last loaded and refuses changes, and every
		// instance on that database losing it at once must not empty the pool.
		if why := d.databaseHealth(); why != "" {
			io.WriteString(w, "ready (degraded)\n"+why+"\n")
			return
		}
		io.WriteString(w, "ready\n")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/metrics", "/healthz", "/readyz":
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "405 method not allowed: use GET", http.StatusMethodNotAllowed)
			return
		}
		http.Error(w, "404 not found: this is tpd's admin listener; it serves GET /metrics, /healthz and /readyz", http.StatusNotFound)
	})
	return &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    8 << 10,
	}
}

// notReady says, one line per failed check, why tpd should not get traffic:
// its listeners are not open, its CA or certificate is not usable, it has no
// compiled policy, or it is draining. Empty when ready.
//
// A policy change that does not compile does not make tpd unready: the previous
// policy keeps answering (tp_policy_last_reload_successful shows the refusal),
// and every instance fed the same broken file would otherwise leave service at once.
func (d *Daemon) notReady() []string {
	var reasons []string
	if d.Draining() {
		reasons = append(reasons, "draining: tpd is shutting down and accepts no new connections")
	}
	want := 1
	if d.cfg.QUIC {
		want = 2
	}
	if n := d.proxy.Listeners(); n < want {
		reasons = append(reasons, fmt.Sprintf("listeners: %d of %d public listeners (TCP%s) are accepting", n, want, map[bool]string{true: ", QUIC"}[d.cfg.QUIC]))
	}
	now := time.Now()
	switch {
	case d.ca == nil || d.pki == nil:
		reasons = append(reasons, "ca: the embedded CA is not loaded")
	case !now.Before(d.pki.Root.NotAfter):
		reasons = append(reasons, fmt.Sprintf("ca: the root CA certificate expired at %s", d.pki.Root.NotAfter.UTC().Format(time.RFC3339)))
	case !now.Before(d.pki.Intermediate.NotAfter):
		reasons = append(reasons, fmt.Sprintf("ca: the intermediate CA certificate expired at %s", d.pki.Intermediate.NotAfter.UTC().Format(time.RFC3339)))
	}
	if c := d.cert.Load(); c == nil || !now.Before(c.Leaf.NotAfter) {
		reasons = append(reasons, "certificate: tpd's own TLS certificate is missing or expired (renewal failed; see the log)")
	}
	if d.policy == nil || d.policy.Revision() == "" {
		reasons = append(reasons, "policy: no compiled policy is active")
	}
	return reasons
}
