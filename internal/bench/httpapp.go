package bench

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Scenario 11: a small page served over HTTP. An app in tpbench's
// process serves a 1 KiB HTML page on a plain HTTP port and, with a certificate of
// its own for httpAppSNI, on a TLS port. httpClients keep-alive clients, each
// with a connection of its own (a Go net/http Transport per client, as separate
// browsers would have), request the page back to back for a fixed time per run
// through the paths below; then one client alone sends a fixed number of
// requests one at a time (latency without queueing). The paths:
//
//   - the app's plain port (the baseline) and its TLS port (h2), directly;
//   - TP's website serving NAME.rev.tp.internal, which the agent device holds
//     with `tp expose --http NAME http://APP` (h2 inside the reverse tunnels) and
//     with `--http1` (HTTP/1.1 inside, one tunnel per connection: --tunnels
//     httpClients);
//   - `tp expose APP-TLS --public-sni httpAppSNI`: tpd passes the TLS connection
//     to the agent, which relays it to the app's TLS port (TLS ends in the app).
//
// The clients resolve every name to loopback with their own DialContext (tpd's
// port for the names TP serves) and trust TP's root, or the app's certificate for
// the direct and pass-through paths. Each run gives requests per second and the
// p50 and p99 latency of single requests, loaded and alone; the variants run
// interleaved, and the ratios to the direct plain path are taken per run.

const (
	httpPageSize = 1 << 10
	httpClients  = 16
	httpAppSNI   = "app.tpbench.test" // the app's own name, for --public-sni
	// httpMaxSamples bounds the latencies kept per client per run.
	httpMaxSamples = 1 << 20
)

// httpPage is the app's page: 1 KiB of HTML.
var httpPage = func() []byte {
	head := "<!doctype html><html><head><title>tpbench</title></head><body><p>"
	tail := "</p></body></html>\n"
	return []byte(head + strings.Repeat("x", httpPageSize-len(head)-len(tail)) + tail)
}()

// httpApp serves httpPage on a plain and a TLS listener until the returned stop.
type httpApp struct {
	plain, tls string // loopback addresses
	roots      *x509.CertPool
}

func startHTTPApp(e *Env) (*httpApp, error) {
	cert, roots, err := selfSigned(httpAppSNI)
	if err != nil {
		return nil, err
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Length", strconv.Itoa(len(httpPage)))
		w.Write(httpPage)
	})
	plain, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		plain.Close()
		return nil, err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
	tsrv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}}
	go srv.Serve(plain)
	go tsrv.ServeTLS(tl, "", "") // enables h2
	e.onClose(func() {
		srv.Close()
		tsrv.Close()
	})
	return &httpApp{plain: plain.Addr().String(), tls: tl.Addr().String(), roots: roots}, nil
}

// selfSigned makes a P-256 server certificate for name, and a pool holding it.
func selfSigned(name string) (tls.Certificate, *x509.CertPool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{name},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool, nil
}

// httpPath is one way to the app.
type httpPath struct {
	label, transport string
	url              string      // what the clients request
	dial             string      // where every connection of the clients goes
	tls              *tls.Config // nil: plain HTTP
	note             string
	err              error
	clients          []*http.Client
}

// newClients gives p httpClients clients, each with a transport (so a
// connection) of its own.
func (p *httpPath) newClients() {
	for range httpClients {
		dial := p.dial
		var cfg *tls.Config
		if p.tls != nil {
			cfg = p.tls.Clone() // each transport adds its ALPN protocols to its own
		}
		tr := &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", dial)
			},
			TLSClientConfig:     cfg,
			ForceAttemptHTTP2:   p.tls != nil,
			MaxIdleConnsPerHost: 1,
			DisableCompression:  true,
			TLSHandshakeTimeout: 10 * time.Second,
		}
		p.clients = append(p.clients, &http.Client{Transport: tr, Timeout: 10 * time.Second})
	}
}

func (p *httpPath) closeClients() {
	for _, c := range p.clients {
		c.CloseIdleConnections()
	}
}

// get fetches the page once with c and checks it.
func (p *httpPath) get(ctx context.Context, c *http.Client) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 2*httpPageSize))
	if err != nil {
		return fmt.Errorf("reading the page: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", p.url, resp.Status, firstLine(string(body)))
	}
	if !bytes.Equal(body, httpPage) {
		return fmt.Errorf("GET %s: a page of %d bytes that is not the app's (%d bytes)", p.url, len(body), len(httpPage))
	}
	return nil
}

// load runs every client back to back for d and returns requests per second and
// the p50 and p99 latency (ms) of single requests. The first error, or the end
// of ctx, ends the run.
func (p *httpPath) load(ctx context.Context, d time.Duration) ([]float64, error) {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		all   []float64
		first error
	)
	start := time.Now()
	end := start.Add(d)
	for _, c := range p.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var ms []float64
			for time.Now().Before(end) && len(ms) < httpMaxSamples {
				t0 := time.Now()
				if err := p.get(ctx, c); err != nil {
					mu.Lock()
					first = cmpOr(first, err)
					mu.Unlock()
					return
				}
				ms = append(ms, float64(time.Since(t0))/float64(time.Millisecond))
			}
			mu.Lock()
			all = append(all, ms...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if first != nil {
		return nil, first
	}
	if len(all) == 0 {
		return nil, errors.New("no request completed")
	}
	slices.Sort(all)
	return []float64{float64(len(all)) / elapsed.Seconds(), percentile(all, 50), percentile(all, 99)}, nil
}

// sequential fetches the page n times, one request at a time, with the first
// client and returns the p50 and p99 latency (ms): the cost of the path without
// the queueing of the loaded runs.
func (p *httpPath) sequential(ctx context.Context, n int) ([]float64, error) {
	ms := make([]float64, 0, n)
	for range n {
		t0 := time.Now()
		if err := p.get(ctx, p.clients[0]); err != nil {
			return nil, err
		}
		ms = append(ms, float64(time.Since(t0))/float64(time.Millisecond))
	}
	slices.Sort(ms)
	return []float64{percentile(ms, 50), percentile(ms, 99)}, nil
}

func cmpOr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// startExposeHTTP runs `tp expose --http NAME URL args…` as the agent device and
// waits until its first tunnel is up.
func (e *Env) startExposeHTTP(ctx context.Context, name, url string, args ...string) (*proc, error) {
	all := append([]string{"expose", "--http", name, url}, args...)
	return e.startProc(ctx, "tp expose --http "+name, command(e.binary("tp"), all, []string{"TP_HOME=" + e.agentHome}), true, time.Minute,
		func(line string) bool { return strings.HasPrefix(line, "Serving ") })
}

func httpScenario(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "11 http 1 KiB page"
	if e.agentHome == "" {
		return nil, fmt.Errorf("internal: the http scenario needs the agent device")
	}
	app, err := startHTTPApp(e)
	if err != nil {
		return nil, err
	}
	_, tpRoots, err := e.deviceTLS()
	if err != nil {
		return nil, err
	}
	website := func(name string) *tls.Config {
		return &tls.Config{ServerName: name + ".rev.tp.internal", RootCAs: tpRoots, MinVersion: tls.VersionTLS12}
	}
	appTLS := func() *tls.Config {
		return &tls.Config{ServerName: httpAppSNI, RootCAs: app.roots, MinVersion: tls.VersionTLS12}
	}
	inner := fmt.Sprintf("%d clients, each its own keep-alive connection; h2 to TLS endpoints", httpClients)

	direct := &httpPath{label: "direct HTTP/1.1 (app's plain port)", transport: "tcp",
		url: "http://" + app.plain + "/", dial: app.plain}
	directTLS := &httpPath{label: "direct HTTPS (app's TLS port)", transport: "tls",
		url: "https://" + httpAppSNI + "/", dial: app.tls, tls: appTLS()}
	revH2 := &httpPath{label: "TP website ← tp expose --http (h2 inside)", transport: "tls",
		url: "https://bhttp2.rev.tp.internal/", dial: e.tpdAddr, tls: website("bhttp2"), note: "tp expose --http, 4 tunnels (default)"}
	revH1 := &httpPath{label: "TP website ← tp expose --http --http1", transport: "tls",
		url: "https://bhttp1.rev.tp.internal/", dial: e.tpdAddr, tls: website("bhttp1"),
		note: fmt.Sprintf("HTTP/1.1 inside, --tunnels %d (one per client connection)", httpClients)}
	sni := &httpPath{label: "tp expose --public-sni (TLS pass-through)", transport: "tls",
		url: "https://" + httpAppSNI + "/", dial: e.tpdAddr, tls: appTLS(), note: "TLS ends in the app; tp expose over TLS"}
	paths := []*httpPath{direct, directTLS, revH2, revH1, sni}

	if _, err := e.startExposeHTTP(ctx, "bhttp2", "http://"+app.plain); err != nil {
		revH2.err = err
	}
	if _, err := e.startExposeHTTP(ctx, "bhttp1", "http://"+app.plain, "--http1", "--tunnels", strconv.Itoa(httpClients)); err != nil {
		revH1.err = err
	}
	if _, err := e.startExpose(ctx, "tls", "bsni", app.tls, "--public-sni", httpAppSNI); err != nil {
		sni.err = err
	}
	for _, p := range paths {
		if p.err != nil {
			e.log("%s: %v", p.label, p.err)
			continue
		}
		p.newClients()
		defer p.closeClients()
		// Warm up: the first request waits for the name to be served; then every
		// client opens its connection and runs briefly, unmeasured.
		if p.err = warmCtx(ctx, func() error { return p.get(ctx, p.clients[0]) }); p.err == nil {
			_, p.err = p.load(ctx, sz.httpTime/4)
		}
		if p.err != nil {
			e.log("%s: %v", p.label, p.err)
		}
	}

	type trio struct{ rps, p50, p99 *Row }
	rowsOf := map[*httpPath]trio{}
	var vs []*variant
	for _, p := range paths {
		t := trio{
			&Row{Scenario: scn, Variant: p.label + ", req/s", Transport: p.transport, Unit: "req/s", Note: p.note},
			&Row{Scenario: scn, Variant: p.label + ", p50", Transport: p.transport, Unit: "ms"},
			&Row{Scenario: scn, Variant: p.label + ", p99", Transport: p.transport, Unit: "ms"},
		}
		if p == direct {
			t.rps.Note = inner
		} else {
			t.rps.Baseline, t.p50.Baseline, t.p99.Baseline = direct.label+", req/s", direct.label+", p50", direct.label+", p99"
		}
		if p.err != nil {
			t.rps.Err, t.p50.Err, t.p99.Err = firstLine(p.err.Error()), firstLine(p.err.Error()), firstLine(p.err.Error())
		}
		rowsOf[p] = t
		vs = append(vs, &variant{rows: []*Row{t.rps, t.p50, t.p99}, fn: func() ([]float64, error) { return p.load(ctx, sz.httpTime) }})
	}
	seqRows := map[*httpPath][2]*Row{}
	for _, p := range paths {
		name := fmt.Sprintf("%s, 1 client, %d requests", p.label, sz.httpSeq)
		dname := fmt.Sprintf("%s, 1 client, %d requests", direct.label, sz.httpSeq)
		r := [2]*Row{
			{Scenario: scn, Variant: name + ", p50", Transport: p.transport, Unit: "ms"},
			{Scenario: scn, Variant: name + ", p99", Transport: p.transport, Unit: "ms"},
		}
		if p != direct {
			r[0].Baseline, r[1].Baseline = dname+", p50", dname+", p99"
		}
		if p.err != nil {
			r[0].Err, r[1].Err = firstLine(p.err.Error()), firstLine(p.err.Error())
		}
		seqRows[p] = r
		vs = append(vs, &variant{rows: r[:], fn: func() ([]float64, error) { return p.sequential(ctx, sz.httpSeq) }})
	}
	e.log("http: %d clients for %s, then 1 client for %d requests, per variant and run", httpClients, sz.httpTime, sz.httpSeq)
	e.interleave(runs, vs)

	rows := collect(vs)
	for _, p := range []*httpPath{directTLS, revH2, revH1, sni} {
		rows = append(rows,
			ratioRow(scn, p.label+" ÷ direct HTTP, req/s (per run)", rowsOf[p].rps, rowsOf[direct].rps, ""),
			ratioRow(scn, p.label+" ÷ direct HTTP, p99 (per run)", rowsOf[p].p99, rowsOf[direct].p99, ""))
	}
	for _, p := range []*httpPath{directTLS, revH2, revH1, sni} {
		rows = append(rows, ratioRow(scn, p.label+" ÷ direct HTTP, 1 client, p50 (per run)", seqRows[p][0], seqRows[direct][0], ""))
	}
	for _, p := range []*httpPath{revH2, revH1} {
		rows = append(rows, ratioRow(scn, p.label+" ÷ --public-sni, req/s (per run)", rowsOf[p].rps, rowsOf[sni].rps, ""))
	}
	return rows, nil
}
