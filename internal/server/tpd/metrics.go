package tpd

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/tp-proxy/tp/acme"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/proxy"
)

// metrics is what /metrics shows (admin-listen). Most of it is read at scrape
// time from counters the parts keep anyway (proxy.Server.Stats, the policy's
// revision, the CA's certificates); what is counted here is off the data
// plane's hot path: one policy decision per new session, one certificate per
// login. Labels are bounded sets, never an identity, a device, a destination or
// a name. nil (admin-listen empty) counts nothing.
type metrics struct {
	reg             *prometheus.Registry
	decisions       *prometheus.CounterVec
	decisionCounter [5][3]prometheus.Counter // by decisionActions and decisionResults, looked up once
	decisionSeconds *prometheus.HistogramVec
	// decisionTimes are decisionSeconds's series: evaluated, and answered by
	// the decision cache.
	decisionTimes  [2]prometheus.Observer
	reloadFailures prometheus.Counter
	reloadOK       atomic.Bool
	issued         *prometheus.CounterVec
}

// Labels of the metrics kept here.
var (
	decisionActions = []string{authz.ActionDial, authz.ActionDialUDP, authz.ActionListen, authz.ActionExposePublic, "other"}
	decisionResults = []string{"allow", "deny", "error"}
	certKinds       = []string{"device", "reverse", "site", "server", "other"}
)

func newMetrics(d *Daemon) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tp_policy_decisions_total",
			Help: "Policy decisions by action and result (allow, deny, or error: the evaluation failed or timed out, which denies).",
		}, []string{"action", "result"}),
		decisionSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "tp_policy_decision_duration_seconds",
			Help:    "Time one policy decision took, including the wait for an evaluation slot; cached=\"true\" when the decision cache answered (no evaluation ran).",
			Buckets: []float64{.00001, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1},
		}, []string{"cached"}),
		reloadFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tp_policy_reload_failures_total",
			Help: "Policy changes refused (each distinct error once); the previous policy stays active.",
		}),
		issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tp_ca_certificates_issued_total",
			Help: "Certificates issued by TP's CA by kind: device (login), reverse (reverse names), site (websites), server (tpd's own).",
		}, []string{"kind"}),
	}
	m.reloadOK.Store(true)
	for i, a := range decisionActions {
		for j, r := range decisionResults {
			m.decisionCounter[i][j] = m.decisions.WithLabelValues(a, r)
		}
	}
	m.decisionTimes = [2]prometheus.Observer{m.decisionSeconds.WithLabelValues("false"), m.decisionSeconds.WithLabelValues("true")}
	for _, k := range certKinds {
		m.issued.WithLabelValues(k)
	}
	m.reg.MustRegister(m.decisions, m.decisionSeconds, m.reloadFailures, m.issued,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tp_policy_last_reload_successful",
			Help: "1 when the last policy reload succeeded (or nothing changed), 0 while a change is refused.",
		}, func() float64 { return b2f(m.reloadOK.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "tp_build_info",
			Help:        "Always 1; the version label is tpd's.",
			ConstLabels: prometheus.Labels{"version": Version},
		}, func() float64 { return 1 }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tp_ready",
			Help: "1 when /readyz answers 200: listeners open, CA loaded, policy compiled, not draining.",
		}, func() float64 { return b2f(len(d.notReady()) == 0) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tp_database_up",
			Help: "With database: 1 while the PostgreSQL database answers, 0 while it is lost (tpd then serves degraded: /readyz still answers 200, saying so). Always 1 without a database.",
		}, func() float64 { return b2f(d.databaseHealth() == "") }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tp_ca_root_expiry_timestamp_seconds",
			Help: "When TP's root CA certificate expires, in seconds since the epoch.",
		}, func() float64 { return epoch(d.pki.Root.NotAfter) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tp_ca_intermediate_expiry_timestamp_seconds",
			Help: "When TP's issuing intermediate CA certificate expires, in seconds since the epoch.",
		}, func() float64 { return epoch(d.pki.Intermediate.NotAfter) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tp_server_certificate_expiry_timestamp_seconds",
			Help: "When tpd's own TLS certificate expires (renewed at two thirds of its lifetime), in seconds since the epoch.",
		}, func() float64 { return epoch(d.cert.Load().Leaf.NotAfter) }),
		&policyCollector{d: d},
		&proxyCollector{d: d},
	)
	return m
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func epoch(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

// certIssued counts one certificate of kind.
func (m *metrics) certIssued(kind string) {
	if m != nil {
		m.issued.WithLabelValues(kind).Inc()
	}
}

// policyReload records the outcome of a reload attempt; fresh says the error
// is new (each distinct error counts once, as it is logged once).
func (m *metrics) policyReload(err error, fresh bool) {
	if m == nil {
		return
	}
	m.reloadOK.Store(err == nil)
	if err != nil && fresh {
		m.reloadFailures.Inc()
	}
}

// authorizer counts and times the decisions of next.
func (m *metrics) authorizer(next authz.Authorizer) authz.Authorizer {
	if m == nil {
		return next
	}
	return &meteredAuthorizer{next: next, m: m}
}

type meteredAuthorizer struct {
	next authz.Authorizer
	m    *metrics
}

var _ authz.Authorizer = (*meteredAuthorizer)(nil)

func (a *meteredAuthorizer) Authorize(ctx context.Context, req authz.Request) (authz.Decision, error) {
	start := time.Now()
	dec, err := a.next.Authorize(ctx, req)
	cached := 0
	if dec.Cached {
		cached = 1
	}
	a.m.decisionTimes[cached].Observe(time.Since(start).Seconds())
	result := 1 // deny
	switch {
	case err != nil:
		result = 2
	case dec.Allow:
		result = 0
	}
	action := len(decisionActions) - 1 // other
	for i, x := range decisionActions {
		if req.Action == x {
			action = i
			break
		}
	}
	a.m.decisionCounter[action][result].Inc()
	return dec, err
}

// MayAllow is next's, when it has one; else every request may be allowed
// (the proxy then resolves first, as without a Prechecker).
func (a *meteredAuthorizer) MayAllow(ctx context.Context, req authz.Request) (bool, error) {
	if p, ok := a.next.(authz.Prechecker); ok {
		return p.MayAllow(ctx, req)
	}
	return true, nil
}

// countIssued wraps the CA's ACME handler: a finalize that succeeds is a
// certificate issued, of the kind its provisioner (in the path) gives.
func (m *metrics) countIssued(next http.Handler) http.Handler {
	if m == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !strings.HasSuffix(r.URL.Path, "/finalize") {
			next.ServeHTTP(w, r)
			return
		}
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(sw, r)
		if sw.status != http.StatusOK {
			return
		}
		// /acme/<provisioner>/order/<id>/finalize
		prov, _, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/acme/"), "/")
		switch prov {
		case acme.ProvisionerName:
			m.certIssued("device")
		case acme.ReverseProvisionerName:
			m.certIssued("reverse")
		case acme.SitesProvisionerName:
			m.certIssued("site")
		default:
			m.certIssued("other")
		}
	})
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// policyCollector shows the active policy's revision.
type policyCollector struct{ d *Daemon }

var revisionDesc = prometheus.NewDesc("tp_policy_revision_info",
	"Always 1; the revision label identifies the active policy (one live value: the series changes when the policy does).",
	[]string{"revision"}, nil)

func (c *policyCollector) Describe(ch chan<- *prometheus.Desc) { ch <- revisionDesc }

func (c *policyCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(revisionDesc, prometheus.GaugeValue, 1, c.d.policy.Revision())
}

// proxyCollector reads the data plane's counters (proxy.Server.Stats) once per
// scrape.
type proxyCollector struct{ d *Daemon }

var (
	sessionsDesc = prometheus.NewDesc("tp_sessions_total",
		"Proxy sessions that ended, by transport (tls, quic; tcp and udp for public ports), action and outcome (ok or the protocol's refusal code).",
		[]string{"transport", "action", "outcome"}, nil)
	handshakeFailDesc = prometheus.NewDesc("tp_handshake_failures_total",
		"Connections to the public port that failed their TLS handshake or were closed before it (per_ip_cap, max_conns), by reason.",
		[]string{"reason"}, nil)
	connsDesc = prometheus.NewDesc("tp_connections_total",
		"Proxy connections whose handshake succeeded, by transport.",
		[]string{"transport"}, nil)
	resumedDesc = prometheus.NewDesc("tp_connections_resumed_total",
		"Proxy connections whose handshake resumed a TLS session from a ticket, by transport.",
		[]string{"transport"}, nil)
	quicStreamsDesc = prometheus.NewDesc("tp_quic_streams_total",
		"Proxy requests (streams) opened on QUIC connections.", nil, nil)
	quicMigrationsDesc = prometheus.NewDesc("tp_quic_migrations_total",
		"QUIC connections moved to a client's new address (a NAT rebinding, or the client's new network).", nil, nil)
	bytesDesc = prometheus.NewDesc("tp_relayed_bytes_total",
		"Bytes relayed by sessions that ended, by direction: up is client to destination, down is destination to client.",
		[]string{"direction"}, nil)
	liveDesc = prometheus.NewDesc("tp_sessions_active",
		"Sessions established now (relays, UDP flows, agents' control sessions).", nil, nil)
	agentsDesc = prometheus.NewDesc("tp_agents_connected",
		"Agents (tp expose) connected now.", nil, nil)
	namesDesc = prometheus.NewDesc("tp_reverse_names",
		"Reverse names held now, including those held for an agent that is reconnecting.", nil, nil)
	portsDesc = prometheus.NewDesc("tp_public_ports_open",
		"Public ports (tp expose --public) open now, TCP and UDP.", nil, nil)
	peerSessionsDesc = prometheus.NewDesc("tp_peer_sessions_total",
		"Sessions carried between instances over tp-peer/1, by direction (out: forwarded to the instance serving the name; in: served here for another instance) and outcome (opened, refused).",
		[]string{"direction", "outcome"}, nil)
	peerActiveDesc = prometheus.NewDesc("tp_peer_sessions_active",
		"Sessions carried between instances open now, by direction (out, in).", []string{"direction"}, nil)
	udpActiveDesc = prometheus.NewDesc("tp_udp_flows_active",
		"UDP flows open now (tp forward --udp, and public UDP clients).", nil, nil)
	udpFlowsDesc = prometheus.NewDesc("tp_udp_flows_total",
		"UDP flows served.", nil, nil)
	udpRefusedDesc = prometheus.NewDesc("tp_udp_flows_refused_total",
		"UDP flows refused by the per-identity or per-connection bound.", nil, nil)
	datagramsDesc = prometheus.NewDesc("tp_udp_datagrams_total",
		"UDP datagrams relayed by flows that ended, by direction.", []string{"direction"}, nil)
	droppedDesc = prometheus.NewDesc("tp_udp_datagrams_dropped_total",
		"UDP datagrams dropped, by reason: queue_full (a flood), too_large (for the destination's path), dest_refused (ICMP port unreachable), quic_queue_full (QUIC's receive queue, before any flow saw them), quic_packet_queue_full (QUIC packets discarded unread, their datagrams with them).",
		[]string{"reason"}, nil)
	oversizeDesc = prometheus.NewDesc("tp_udp_datagrams_oversize_total",
		"UDP datagrams that fit no QUIC DATAGRAM frame and took the stream instead.", nil, nil)
	leaseRenewDesc = prometheus.NewDesc("tp_reverse_lease_renewals_total",
		"With database: rounds that renewed this instance's leases of reverse names in the database (result ok), and those that could not (failed: the database was unreachable).",
		[]string{"result"}, nil)
	stunDesc = prometheus.NewDesc("tp_stun_requests_total",
		"Datagrams on the QUIC port that are no QUIC, by result: answered (a STUN Binding request, answered with the address it came from), rate_limited (its source or the server over the STUN rate), malformed (anything else).",
		[]string{"result"}, nil)
	namesFencedDesc = prometheus.NewDesc("tp_reverse_names_fenced_total",
		"With database: reverse names this instance stopped serving because their lease ran out before it could renew it.", nil, nil)
	namesTakenOverDesc = prometheus.NewDesc("tp_reverse_names_taken_over_total",
		"With database: reverse names another instance took over from this one.", nil, nil)
	carrierOpenDesc = prometheus.NewDesc("tp_carrier_sessions_active",
		"Carrier sessions (QUIC over tls, ws or http) open now, by carrier and state: proven (a device's QUIC connection runs over it) or unproven (opened without a certificate, not yet used by a device).",
		[]string{"carrier", "state"}, nil)
	carrierEndedDesc = prometheus.NewDesc("tp_carrier_sessions_ended_total",
		"Carrier sessions tpd ended by its bounds, by reason: source_cap (a source's unproven sessions), full (the oldest unproven one made room), unproven (no device's connection within the proof time), device_cap (a device's sessions).",
		[]string{"reason"}, nil)
	udpReadsDesc = prometheus.NewDesc("tp_quic_socket_reads_total",
		"System calls that read datagrams from the QUIC port's UDP socket. tp_quic_socket_packets_total over this is the packets a call brings: up to 8 datagrams, and more where the kernel joins a burst (UDP GRO).", nil, nil)
	udpPacketsDesc = prometheus.NewDesc("tp_quic_socket_packets_total",
		"Packets read from the QUIC port's UDP socket.", nil, nil)
	cudpFlowsDesc = prometheus.NewDesc("tp_connect_udp_flows_total",
		"CONNECT-UDP (RFC 9298) flows served on the proxy names; they count in tp_udp_flows_* too.", nil, nil)
	cudpDatagramsDesc = prometheus.NewDesc("tp_connect_udp_datagrams_total",
		"UDP payloads relayed by CONNECT-UDP flows that ended, by direction.", []string{"direction"}, nil)
	cudpDroppedDesc = prometheus.NewDesc("tp_connect_udp_datagrams_dropped_total",
		"CONNECT-UDP datagrams dropped, by reason: oversize (over connect-udp-max-datagram), rate (over connect-udp-packets-per-second), unknown_context, malformed, too_large (for the target's path).",
		[]string{"reason"}, nil)
)

func (c *proxyCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{sessionsDesc, handshakeFailDesc, connsDesc, resumedDesc, quicStreamsDesc, quicMigrationsDesc, bytesDesc, liveDesc,
		agentsDesc, namesDesc, portsDesc, udpActiveDesc, udpFlowsDesc, udpRefusedDesc, datagramsDesc, droppedDesc, oversizeDesc,
		cudpFlowsDesc, cudpDatagramsDesc, cudpDroppedDesc, peerSessionsDesc, peerActiveDesc, carrierOpenDesc, carrierEndedDesc, udpReadsDesc, udpPacketsDesc, leaseRenewDesc, namesFencedDesc, namesTakenOverDesc, stunDesc} {
		ch <- d
	}
}

func (c *proxyCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.d.proxy.Stats()
	counter := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v int64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v))
	}
	// The common series exist from the start, so that rate() and the dashboard
	// see a zero rather than nothing.
	seen := map[[3]string]bool{}
	for _, s := range st.Sessions {
		seen[[3]string{s.Transport, s.Action, s.Outcome}] = true
		counter(sessionsDesc, s.N, s.Transport, s.Action, s.Outcome)
	}
	for _, t := range []string{"tls", "quic"} {
		for _, a := range []string{authz.ActionDial, authz.ActionDialUDP, authz.ActionListen, "accept"} {
			if k := [3]string{t, a, "ok"}; !seen[k] {
				counter(sessionsDesc, 0, k[:]...)
			}
		}
	}
	for _, r := range proxy.StatHandshakeReasons {
		counter(handshakeFailDesc, st.HandshakeFailures[r], r)
	}
	for _, t := range []string{"tls", "quic"} {
		counter(connsDesc, st.ProxyConns[t], t)
		counter(resumedDesc, st.ResumedConns[t], t)
	}
	counter(quicStreamsDesc, st.QUICStreams)
	counter(quicMigrationsDesc, st.QUICMigrations)
	counter(bytesDesc, st.BytesUp, "up")
	counter(bytesDesc, st.BytesDown, "down")
	gauge(liveDesc, int64(st.Live))
	gauge(agentsDesc, int64(st.Agents))
	gauge(namesDesc, int64(st.ReverseNames))
	gauge(portsDesc, int64(st.PublicPorts))
	for _, dir := range []string{"out", "in"} {
		p := st.Peer[dir]
		counter(peerSessionsDesc, p.Opened, dir, "opened")
		counter(peerSessionsDesc, p.Refused, dir, "refused")
		ch <- prometheus.MustNewConstMetric(peerActiveDesc, prometheus.GaugeValue, float64(p.Active), dir)
	}
	u := st.UDP
	gauge(udpActiveDesc, u.Active)
	counter(udpFlowsDesc, u.Flows)
	counter(udpRefusedDesc, u.FlowsRefused)
	counter(datagramsDesc, u.DatagramsUp, "up")
	counter(datagramsDesc, u.DatagramsDown, "down")
	counter(droppedDesc, u.QueueFull, "queue_full")
	counter(droppedDesc, u.TooLarge, "too_large")
	counter(droppedDesc, u.DestRefused, "dest_refused")
	counter(droppedDesc, u.QUICQueueFull, "quic_queue_full")
	counter(droppedDesc, u.QUICPacketQueueFull, "quic_packet_queue_full")
	counter(droppedDesc, u.NoFlow, "no_flow")
	counter(oversizeDesc, u.Oversize)
	counter(leaseRenewDesc, st.Leases.Renewals, "ok")
	counter(leaseRenewDesc, st.Leases.RenewalFailures, "failed")
	counter(namesFencedDesc, st.Leases.Fenced)
	counter(stunDesc, st.STUN.Answered, "answered")
	counter(stunDesc, st.STUN.RateLimited, "rate_limited")
	counter(stunDesc, st.STUN.Malformed, "malformed")
	counter(namesTakenOverDesc, st.Leases.TakenOver)
	cs := c.d.proxy.CarrierStats()
	for kind, states := range cs.Open {
		for state, n := range states {
			ch <- prometheus.MustNewConstMetric(carrierOpenDesc, prometheus.GaugeValue, float64(n), kind, state)
		}
	}
	for reason, n := range cs.Ended {
		counter(carrierEndedDesc, n, reason)
	}
	qs := c.d.proxy.QUICSocketStats()
	counter(udpReadsDesc, qs.Reads)
	counter(udpPacketsDesc, qs.Packets)
	cu := c.d.proxy.ConnectUDPStats()
	counter(cudpFlowsDesc, cu.Flows)
	counter(cudpDatagramsDesc, cu.DatagramsUp, "up")
	counter(cudpDatagramsDesc, cu.DatagramsDown, "down")
	for _, r := range []struct {
		reason string
		n      int64
	}{{"oversize", cu.Oversize}, {"rate", cu.RateLimited}, {"unknown_context", cu.UnknownContext}, {"malformed", cu.Malformed}, {"too_large", cu.TooLarge}} {
		counter(cudpDroppedDesc, r.n, r.reason)
	}
}
