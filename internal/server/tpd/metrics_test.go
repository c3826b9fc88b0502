package tpd

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// metricsPolicy: alice may do anything; bob may reach alice's reverse name
// "svc" and nothing else.
const metricsPolicy = `package tp.authz

default allow := false

allow if input.identity.user == "alice"

allow if {
	input.action == "dial"
	input.destination.reverse == "svc"
	input.identity.user == "bob"
}
`

// metricsDaemon runs a real tpd (QUIC on) with admin-listen on a loopback
// port; stop ends Serve and waits for it.
func metricsDaemon(t testing.TB, policy string) (r *daemonRun, admin string) {
	return adminDaemon(t, policy, "127.0.0.1:0")
}

// adminDaemon runs a real tpd (QUIC on) with admin-listen set to admin ("" is
// off) and returns once it serves.
func adminDaemon(t testing.TB, policy, adminListen string, mods ...func(*config.Server)) (r *daemonRun, admin string) {
	t.Helper()
	cfg := config.DefaultServer()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.PolicyTimeout = 5 * time.Second // -race is slow; the bound is not what is tested here
	cfg.AdminListen = adminListen
	for _, mod := range mods {
		mod(&cfg)
	}
	if _, err := Init(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := Listen("127.0.0.1:0", true)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = ln.Addr().String()
	logs := &testlog.Buffer{}
	d, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	d.Ready = func() { close(ready) }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, ln) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			err, ended := waitEnd(t, "the daemon's Serve", done, daemonStopBound(cfg.ShutdownTimeout))
			if !ended {
				return // Serve still runs: closing under it would only add noise
			}
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
			d.Close()
		})
	}
	t.Cleanup(stop)
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("Serve ended before it was ready: %v", err)
	}
	return &daemonRun{d: d, addr: cfg.Listen, url: cfg.PublicURL(), logs: logs, stop: stop}, d.AdminAddr()
}

// adminGet fetches path from the admin listener.
func adminGet(t testing.TB, admin, path string) (int, string) {
	t.Helper()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	resp, err := hc.Get("http://" + admin + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return resp.StatusCode, string(b)
}

// scrape is one parsed /metrics: series ("name{l="v",…}" with labels sorted)
// → value, histograms as name_count and name_sum.
type scrape map[string]float64

func scrapeMetrics(t *testing.T, admin string) scrape {
	t.Helper()
	code, body := adminGet(t, admin, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics answered %d: %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics is not the Prometheus text format: %v", err)
	}
	s := scrape{}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			key := series(name, m.GetLabel())
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				s[key] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				s[key] = m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				s[series(name+"_count", m.GetLabel())] = float64(m.GetHistogram().GetSampleCount())
				s[series(name+"_sum", m.GetLabel())] = m.GetHistogram().GetSampleSum()
			default:
				s[key] = m.GetUntyped().GetValue()
			}
		}
	}
	return s
}

func series(name string, labels []*dto.LabelPair) string {
	if len(labels) == 0 {
		return name
	}
	parts := make([]string, 0, len(labels))
	for _, l := range labels {
		parts = append(parts, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
	}
	sort.Strings(parts)
	return name + "{" + strings.Join(parts, ",") + "}"
}

// get is a series' value; a missing series is a test failure, not a zero, so a
// renamed metric cannot pass as "did not move".
func (s scrape) get(t *testing.T, key string) float64 {
	t.Helper()
	v, ok := s[key]
	if !ok {
		t.Fatalf("/metrics has no series %s", key)
	}
	return v
}

// pollMetric scrapes until key has value want (counters of sessions move when
// a session ends, a moment after the client saw its end).
func pollMetric(t *testing.T, admin, key string, want float64) scrape {
	t.Helper()
	var s scrape
	poll(t, fmt.Sprintf("%s to reach %g", key, want), func() bool {
		s = scrapeMetrics(t, admin)
		return s[key] == want
	})
	return s
}

// dialerFor is a fresh dialer of c on transport: one connection per dial, no
// spare TLS connection (a spare appears only for a second dial within 3s on
// one dialer), so the connection counts are exact.
func dialerFor(t *testing.T, c *clients.Client, transport string) *clients.Dialer {
	t.Helper()
	d, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	d.Transport = transport
	t.Cleanup(func() { d.Close() })
	return d
}

// A Prometheus scrape of a running tpd, parsed with expfmt, after a real
// forward, a policy denial, a handshake without a certificate, a reverse
// session (QUIC agent, TLS dial) and a UDP flow over QUIC: each counter moved
// by exactly what happened, and the gauges show the agent, its name and the
// flow while they live.
func TestMetricsCountWhatHappened(t *testing.T) {
	t.Parallel()
	r, admin := metricsDaemon(t, metricsPolicy)
	d := r.d
	if admin == "" {
		t.Fatal("admin-listen is set but AdminAddr is empty")
	}
	echo := testnet.Echo(t)
	alice, _, _ := enrollClient(t, d, r.url, "alice", "laptop")

	// Settle the re-check that enrollments cause (the user store changed), so
	// that no re-check decision lands among the counted ones: hold a session
	// while bob enrolls, and wait until tpd re-checked live sessions against
	// the store as bob's enrollment left it. (Waiting for the first "re-checked"
	// line was not enough: an enrollment saves the store several times, and a
	// re-check between two saves was followed by another one, which, on a
	// loaded machine, came while the counted sessions were live.)
	hold, err := dialerFor(t, alice, clients.TransportTLS).DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	bob, _, _ := enrollClient(t, d, r.url, "bob", "phone")
	waitFor(t, "tpd re-checked live sessions against the user store after bob's enrollment", func() bool {
		d.recheckMu.Lock()
		defer d.recheckMu.Unlock()
		return d.checked.users == d.users.Generation()
	})
	hold.Close()
	s0 := pollMetric(t, admin, `tp_sessions_total{action="dial",outcome="ok",transport="tls"}`, 1)
	s0 = pollMetric(t, admin, "tp_sessions_active", 0)

	if code, body := adminGet(t, admin, "/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	if code, body := adminGet(t, admin, "/readyz"); code != http.StatusOK || body != "ready\n" {
		t.Fatalf("/readyz of a serving tpd: %d %q", code, body)
	}
	if s0.get(t, "tp_database_up") != 1 {
		t.Fatal("tp_database_up is not 1 without a database (nothing to lose)")
	}
	if s0.get(t, "tp_ready") != 1 {
		t.Fatal("tp_ready is not 1 while serving")
	}
	for key, want := range map[string]float64{
		`tp_ca_certificates_issued_total{kind="device"}`:                  2, // alice's and bob's logins
		`tp_ca_certificates_issued_total{kind="server"}`:                  1, // tpd's own, at start
		"tp_ca_root_expiry_timestamp_seconds":                             float64(d.pki.Root.NotAfter.Unix()),
		"tp_ca_intermediate_expiry_timestamp_seconds":                     float64(d.pki.Intermediate.NotAfter.Unix()),
		"tp_policy_last_reload_successful":                                1,
		`tp_policy_revision_info{revision="` + d.policy.Revision() + `"}`: 1,
	} {
		if got := s0.get(t, key); got != want {
			t.Errorf("%s = %g, want %g", key, got, want)
		}
	}

	// Bad input: a handshake for the proxy without a client certificate.
	tc, err := tls.Dial("tcp", r.addr, &tls.Config{RootCAs: rootPool(r.d), NextProtos: []string{wire.ALPN}})
	if err == nil {
		_, err = tc.Read(make([]byte, 1))
		tc.Close()
	}
	if err == nil {
		t.Fatal("a handshake without a client certificate was accepted")
	}
	pollMetric(t, admin, `tp_handshake_failures_total{reason="no_cert"}`, s0[`tp_handshake_failures_total{reason="no_cert"}`]+1)

	// A forward over TLS: N bytes echoed.
	const n = 100_000
	payload := bytes.Repeat([]byte("0123456789"), n/10)
	conn, err := dialerFor(t, alice, clients.TransportTLS).DialContext(context.Background(), "tcp", echo)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	go conn.Write(payload)
	got := make([]byte, n)
	if _, err := io.ReadFull(conn, got); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("echo: %v (equal %t)", err, bytes.Equal(got, payload))
	}
	conn.Close()
	s1 := pollMetric(t, admin, `tp_sessions_total{action="dial",outcome="ok",transport="tls"}`, 2)
	if up, down := s1.get(t, `tp_relayed_bytes_total{direction="up"}`)-s0.get(t, `tp_relayed_bytes_total{direction="up"}`),
		s1.get(t, `tp_relayed_bytes_total{direction="down"}`)-s0.get(t, `tp_relayed_bytes_total{direction="down"}`); up != n || down != n {
		t.Errorf("bytes relayed by the forward: up %g down %g, want %d each", up, down, n)
	}

	// A denial: bob may not reach the echo server.
	_, err = dialerFor(t, bob, clients.TransportTLS).DialContext(context.Background(), "tcp", echo)
	var re *clients.RefusedError
	if !errors.As(err, &re) || re.Code != wire.CodePolicyDenied {
		t.Fatalf("bob's dial: %v; want %s", err, wire.CodePolicyDenied)
	}
	pollMetric(t, admin, `tp_sessions_total{action="dial",outcome="policy_denied",transport="tls"}`, 1)

	// A reverse session: alice's agent over QUIC, bob's dial over TLS.
	stopAgent, _ := startAgent(t, alice, clients.TransportQUIC, testnet.Upper(t), []string{"bob"}, nil)
	s2 := scrapeMetrics(t, admin)
	for key, want := range map[string]float64{"tp_agents_connected": 1, "tp_reverse_names": 1, "tp_sessions_active": 1} {
		if got := s2.get(t, key); got != want {
			t.Errorf("with an agent registered: %s = %g, want %g", key, got, want)
		}
	}
	type answer struct {
		b   []byte
		err error
	}
	ans := make(chan answer, 1)
	go func() { b, err := dialReverse(bob, clients.TransportTLS, []byte("hello")); ans <- answer{b, err} }()
	select {
	case a := <-ans:
		if a.err != nil || string(a.b) != "HELLO" {
			t.Fatalf("bob through the agent: %q, %v", a.b, a.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("bob's session through the agent did not end within 30s")
	}
	pollMetric(t, admin, `tp_sessions_total{action="dial",outcome="ok",transport="tls"}`, 3)
	stopAgent()
	pollMetric(t, admin, `tp_sessions_total{action="listen",outcome="ok",transport="quic"}`, 1)
	if got := scrapeMetrics(t, admin).get(t, "tp_agents_connected"); got != 0 {
		t.Errorf("after the agent stopped: tp_agents_connected = %g", got)
	}

	// A UDP flow over QUIC: one datagram each way.
	local := testnet.UpperUDP(t)
	uc, err := dialerFor(t, alice, clients.TransportQUIC).DialContext(context.Background(), "udp", local)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := uc.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	_ = uc.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 64)
	if k, err := uc.Read(buf); err != nil || string(buf[:k]) != "PING" {
		t.Fatalf("UDP answer: %q, %v", buf[:k], err)
	}
	if got := scrapeMetrics(t, admin).get(t, "tp_udp_flows_active"); got != 1 {
		t.Errorf("with a flow open: tp_udp_flows_active = %g, want 1", got)
	}
	uc.Close()
	s3 := pollMetric(t, admin, `tp_sessions_total{action="dial_udp",outcome="ok",transport="quic"}`, 1)

	// Everything since s0, exactly.
	for key, want := range map[string]float64{
		`tp_sessions_total{action="dial",outcome="ok",transport="tls"}`:            2, // the forward, bob's reverse dial
		`tp_sessions_total{action="dial",outcome="policy_denied",transport="tls"}`: 1,
		`tp_sessions_total{action="listen",outcome="ok",transport="quic"}`:         1,
		`tp_sessions_total{action="dial_udp",outcome="ok",transport="quic"}`:       1,
		`tp_connections_total{transport="tls"}`:                                    3, // forward, denial, reverse dial
		`tp_connections_total{transport="quic"}`:                                   2, // agent, UDP flow
		// Tickets kept in each TP_HOME: alice's forward resumes the session her
		// held dial made, bob's reverse dial the one his denial made.
		`tp_connections_resumed_total{transport="tls"}`:               2,
		`tp_connections_resumed_total{transport="quic"}`:              2, // alice's agent and UDP flow: one cache serves both transports
		"tp_quic_streams_total":                                       2, // agent's control stream, the flow
		`tp_handshake_failures_total{reason="no_cert"}`:               1,
		`tp_policy_decisions_total{action="dial",result="allow"}`:     2,
		`tp_policy_decisions_total{action="dial",result="deny"}`:      1,
		`tp_policy_decisions_total{action="listen",result="allow"}`:   1,
		`tp_policy_decisions_total{action="dial_udp",result="allow"}`: 1,
		`tp_ca_certificates_issued_total{kind="reverse"}`:             1, // the agent's, for protected mode
		`tp_ca_certificates_issued_total{kind="device"}`:              0,
		"tp_udp_flows_total":                                          1,
		`tp_udp_datagrams_total{direction="up"}`:                      1,
		`tp_udp_datagrams_total{direction="down"}`:                    1,
		`tp_udp_datagrams_dropped_total{reason="queue_full"}`:         0,
		"tp_sessions_active":                                          0,
		"tp_udp_flows_active":                                         0,
		// Carrier sessions are exported from the start, by carrier and state.
		`tp_carrier_sessions_active{carrier="http",state="unproven"}`: 0,
		`tp_carrier_sessions_active{carrier="tls",state="proven"}`:    0,
		`tp_carrier_sessions_ended_total{reason="source_cap"}`:        0,
		// Without a database, it is never lost and no lease is renewed.
		"tp_database_up": 0, // 1 before and after
		`tp_reverse_lease_renewals_total{result="failed"}`: 0,
		"tp_reverse_names_fenced_total":                    0,
		// No STUN request came; the series is there from the start.
		`tp_stun_requests_total{result="answered"}`: 0,
	} {
		if got := s3.get(t, key) - s0[key]; got != want { // a series appears with its first count
			t.Errorf("%s moved by %g, want %g", key, got, want)
		}
	}
	// The QUIC connections' packets were read from the UDP socket, each call
	// bringing at least one.
	reads := s3.get(t, "tp_quic_socket_reads_total") - s0["tp_quic_socket_reads_total"]
	packets := s3.get(t, "tp_quic_socket_packets_total") - s0["tp_quic_socket_packets_total"]
	if reads < 1 || packets < reads {
		t.Errorf("QUIC socket: %g packets in %g reads; want some, at least one a read", packets, reads)
	}
	// Every decision is timed once, as evaluated or as answered by the cache.
	evaluated := s3.get(t, `tp_policy_decision_duration_seconds_count{cached="false"}`) - s0[`tp_policy_decision_duration_seconds_count{cached="false"}`]
	cached := s3.get(t, `tp_policy_decision_duration_seconds_count{cached="true"}`) - s0[`tp_policy_decision_duration_seconds_count{cached="true"}`]
	if evaluated+cached != 5 || evaluated < 1 {
		t.Errorf("decisions timed: %g evaluated, %g cached; want 5 in all, the first evaluated", evaluated, cached)
	}
	// Labels stay bounded: no identity, device, destination or name anywhere.
	for key := range s3 {
		for _, leak := range []string{"alice", "bob", "laptop", "svc", "127.0.0.1", echo} {
			if strings.Contains(key, leak) {
				t.Errorf("series %s carries %q", key, leak)
			}
		}
	}
}

// /readyz says 503 and why while tpd drains (its Serve was asked to stop and a
// session is still live), while /healthz still answers; the admin listener
// stops only after the drain.
func TestReadyzWhileDraining(t *testing.T) {
	t.Parallel()
	r, admin := metricsDaemon(t, allowAlice)
	alice, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	conn := openSession(t, alice, testnet.Echo(t))
	stopped := make(chan struct{})
	go func() { r.stop(); close(stopped) }()
	// Draining is said first; the listeners close a moment later.
	poll(t, "/readyz to say draining, with the listeners closed", func() bool {
		code, body := adminGet(t, admin, "/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "draining: tpd is shutting down") && strings.Contains(body, "listeners: 0 of 2")
	})
	if code, _ := adminGet(t, admin, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz while draining: %d", code)
	}
	if got := scrapeMetrics(t, admin).get(t, "tp_ready"); got != 0 {
		t.Errorf("tp_ready while draining = %g", got)
	}
	conn.Close() // the drain ends, and with it Serve and the admin listener
	<-stopped
	if c, err := net.DialTimeout("tcp", admin, time.Second); err == nil {
		c.Close()
		t.Error("the admin listener still accepts after Serve returned")
	}
}

// Bad input: admin-listen on a port that is taken. Serve refuses with a
// sentence naming the setting, before it serves anything.
func TestAdminListenBusy(t *testing.T) {
	t.Parallel()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg := newDataDir(t, map[string]string{"tp.rego": allowAlice})
	cfg.AdminListen = busy.Addr().String()
	ln, err := Listen("127.0.0.1:0", true) // a port free on UDP too, for QUIC
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = ln.Addr().String()
	d, err := New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	err = d.Serve(context.Background(), ln)
	if err == nil || !strings.Contains(err.Error(), "admin-listen "+cfg.AdminListen) || !strings.Contains(err.Error(), "already listening") {
		t.Fatalf("Serve with a busy admin-listen: %v", err)
	}
	ln.Close()
}

// Unknown paths and methods on the admin listener get a 404 or 405, not the
// metrics; the server's bounds are set.
func TestAdminHTTPBounds(t *testing.T) {
	t.Parallel()
	r, admin := metricsDaemon(t, allowAlice)
	if code, body := adminGet(t, admin, "/debug/pprof/"); code != http.StatusNotFound || !strings.Contains(body, "GET /metrics, /healthz and /readyz") {
		t.Errorf("unknown path: %d %q", code, body)
	}
	resp, err := http.Post("http://"+admin+"/metrics", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics: %d", resp.StatusCode)
	}
	srv := r.d.adminHTTPServer()
	if srv.ReadHeaderTimeout == 0 || srv.ReadTimeout == 0 || srv.WriteTimeout == 0 || srv.IdleTimeout == 0 || srv.MaxHeaderBytes == 0 {
		t.Errorf("admin HTTP server without bounds: %+v", srv)
	}
}

// Bad input: a policy edit that does not compile. The refusal is counted,
// tp_policy_last_reload_successful drops to 0
// while tpd stays ready on the previous policy, and a good edit brings it back
// with the new revision.
func TestPolicyReloadMetrics(t *testing.T) {
	t.Parallel()
	r, admin := metricsDaemon(t, allowAlice)
	d := r.d
	rev0 := d.policy.Revision()
	file := filepath.Join(d.cfg.PolicyDir(), "tp.rego")
	if err := os.WriteFile(file, []byte("package tp.authz\n\nallow if {"), 0o600); err != nil {
		t.Fatal(err)
	}
	_ = d.ReloadPolicy(context.Background())
	s := pollMetric(t, admin, "tp_policy_last_reload_successful", 0)
	if got := s.get(t, "tp_policy_reload_failures_total"); got != 1 {
		t.Errorf("tp_policy_reload_failures_total = %g after one broken edit", got)
	}
	if code, body := adminGet(t, admin, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz with a refused policy edit: %d %q; the previous policy still decides", code, body)
	}
	if s.get(t, `tp_policy_revision_info{revision="`+rev0+`"}`) != 1 {
		t.Error("the revision changed although the edit was refused")
	}
	if err := os.WriteFile(file, []byte("package tp.authz\n\ndefault allow := false\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := d.ReloadPolicy(context.Background()); err != nil {
		t.Fatal(err)
	}
	s = pollMetric(t, admin, "tp_policy_last_reload_successful", 1)
	if _, ok := s[`tp_policy_revision_info{revision="`+d.policy.Revision()+`"}`]; !ok || d.policy.Revision() == rev0 {
		t.Errorf("the new revision %s is not shown", d.policy.Revision())
	}
	if got := s.get(t, "tp_policy_reload_failures_total"); got != 1 {
		t.Errorf("tp_policy_reload_failures_total = %g, want still 1", got)
	}
}
