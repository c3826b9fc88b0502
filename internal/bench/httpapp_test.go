package bench

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// The http scenario's load counts only whole, correct pages: through the app's
// plain and TLS ports it reports a rate and ordered percentiles, and a server
// that answers something else fails the run instead of counting.
func TestHTTPLoadChecksThePage(t *testing.T) {
	if len(httpPage) != httpPageSize {
		t.Fatalf("the page is %d bytes, want %d", len(httpPage), httpPageSize)
	}
	e := &Env{log: t.Logf}
	defer e.Close()
	app, err := startHTTPApp(e)
	if err != nil {
		t.Fatal(err)
	}
	plain := &httpPath{label: "plain", url: "http://" + app.plain + "/", dial: app.plain}
	secure := &httpPath{label: "tls", url: "https://" + httpAppSNI + "/", dial: app.tls,
		tls: &tls.Config{ServerName: httpAppSNI, RootCAs: app.roots}}
	for _, p := range []*httpPath{plain, secure} {
		p.newClients()
		defer p.closeClients()
		v, err := p.load(context.Background(), 200*time.Millisecond)
		if err != nil {
			t.Fatalf("%s: %v", p.label, err)
		}
		if v[0] <= 0 || v[1] <= 0 || v[1] > v[2] {
			t.Errorf("%s: req/s %v, p50 %v ms, p99 %v ms: want a positive rate and p50 ≤ p99", p.label, v[0], v[1], v[2])
		}
		s, err := p.sequential(context.Background(), 10)
		if err != nil || s[0] > s[1] {
			t.Errorf("%s: sequential p50, p99 = %v, %v", p.label, s, err)
		}
	}

	// A server that answers a shorter page, and one that answers 404.
	for _, tc := range []struct {
		why  string
		h    http.HandlerFunc
		want string
	}{
		{"a 1023-byte page", func(w http.ResponseWriter, _ *http.Request) { w.Write(httpPage[1:]) }, "not the app's"},
		{"404", func(w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) }, "404"},
	} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: tc.h, ReadHeaderTimeout: 10 * time.Second}
		go srv.Serve(ln)
		p := &httpPath{label: tc.why, url: "http://" + ln.Addr().String() + "/", dial: ln.Addr().String()}
		p.newClients()
		_, err = p.load(context.Background(), 100*time.Millisecond)
		p.closeClients()
		srv.Close()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("a server answering %s: load gave %v, want an error mentioning %q", tc.why, err, tc.want)
		}
	}
}
