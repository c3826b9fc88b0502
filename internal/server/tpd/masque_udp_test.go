package tpd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go/http3"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	_ "github.com/tp-proxy/tp/internal/lib/xconnect" // h2 extended CONNECT in net/http (RFC 8441)
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/policy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// CONNECT-UDP (RFC 9298) on the proxy name, against a real tpd (real CA, real
// OPA, real QUIC over loopback UDP), with TP's own RFC 9298 client.

// connectUDP opens a CONNECT-UDP flow to target over httpVersion ("h3",
// "h3-capsules": h3 without HTTP Datagrams, "h2", "http/1.1").
func (r *connectRig) connectUDP(t testing.TB, httpVersion, target string) (*clients.ConnectUDPConn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	o := clients.ConnectUDPOptions{Proxy: r.addr, TLS: r.tlsConfig(), HTTP: httpVersion}
	if httpVersion == "h3-capsules" {
		o.HTTP, o.NoDatagrams = "h3", true
	}
	c, err := clients.DialConnectUDP(ctx, o, target)
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// udpRoundTrip sends msg and waits for the echo.
func udpRoundTrip(t testing.TB, c *clients.ConnectUDPConn, msg []byte) {
	t.Helper()
	if err := c.WriteDatagram(msg); err != nil {
		t.Fatalf("sending %d bytes: %v", len(msg), err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	got, err := c.ReadDatagram(ctx)
	if err != nil {
		t.Fatalf("waiting for the echo of %d bytes: %v (flow error %v)", len(msg), err, c.Err())
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo of %d bytes came back as %d bytes, different", len(msg), len(got))
	}
}

// A UDP echo on 127.0.0.1 is reached over h3 with HTTP Datagrams, over h3
// without them (capsules), over h2 extended CONNECT and over HTTP/1.1 Upgrade
// (capsules on the stream); every payload arrives whole, and the proxy sent
// the target no more bytes than the client did. Each flow's counters are
// checked once it ended: every datagram up is counted; down, the last echo's
// write may end with an error when the client closes the moment it has read
// it (a stream write can report the peer's close after its bytes left), so
// that one may be missing from the count, never more.
func TestConnectUDPEcho(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy)
	echo := testnet.EchoUDP(t)
	for _, v := range []string{"h3", "h3-capsules", "h2", "http/1.1"} {
		t.Run(v, func(t *testing.T) {
			before := r.d.proxy.ConnectUDPStats()
			c, err := r.connectUDP(t, v, echo)
			if err != nil {
				t.Fatal(err)
			}
			if want := v == "h3"; c.Datagrams != want {
				t.Fatalf("HTTP/3 datagrams in use: %v; want %v", c.Datagrams, want)
			}
			if cp := c.Response.Header.Get("Capsule-Protocol"); cp != "?1" {
				t.Fatalf("Capsule-Protocol in the answer: %q; want ?1", cp)
			}
			n := int64(0)
			for _, size := range []int{0, 1, 100, 1000} {
				udpRoundTrip(t, c, randomText(size))
				n++
			}
			if v != "h3" { // capsules carry what no QUIC datagram could
				udpRoundTrip(t, c, randomText(30000))
				n++
			}
			c.Close()
			waitFor(t, "the flow to end", func() bool { return r.d.proxy.ConnectUDPStats().Active == 0 })
			st := r.d.proxy.ConnectUDPStats()
			up, down := st.DatagramsUp-before.DatagramsUp, st.DatagramsDown-before.DatagramsDown
			if st.Flows-before.Flows != 1 || up != n || down < n-1 || down > n ||
				st.BytesToTarget-before.BytesToTarget > st.BytesFromClient-before.BytesFromClient {
				t.Fatalf("stats %+v after %+v: want 1 flow, %d datagrams up, %d (or %d) down, and no more bytes to the target than from the client", st, before, n, n, n-1)
			}
		})
	}
}

// The configured template (connect-udp-template) is accepted beside the
// default one, and discovery advertises it; the configured datagram bound
// (connect-udp-max-datagram 500) drops a 501-byte HTTP/3 datagram, counted,
// and relays a 500-byte one.
func TestConnectUDPConfiguredTemplate(t *testing.T) {
	t.Parallel()
	const tmpl = "/masque?h={target_host}&p={target_port}"
	r := newConnectRig(t, connectPolicy, func(c *config.Server) { c.ConnectUDPTemplate, c.ConnectUDPMaxDatagram = tmpl, 500 })
	echo := testnet.EchoUDP(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := clients.DialConnectUDP(ctx, clients.ConnectUDPOptions{Proxy: r.addr, TLS: r.tlsConfig(), Template: tmpl}, echo)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !c.Datagrams {
		t.Fatal("an h3 flow without HTTP/3 datagrams")
	}
	if err := c.WriteDatagram(randomText(501)); err != nil {
		t.Fatal(err)
	}
	udpRoundTrip(t, c, randomText(500)) // the first answer: the 501 bytes were not relayed
	c.Close()
	waitFor(t, "the flow to end", func() bool { return r.d.proxy.ConnectUDPStats().Active == 0 })
	if st := r.d.proxy.ConnectUDPStats(); st.Oversize != 1 || st.DatagramsUp != 1 {
		t.Fatalf("stats %+v; want 1 oversize drop and 1 datagram relayed", st)
	}
	doc := r.discovery(t)
	if want := "https://" + proxyName + ":" + r.port + tmpl; doc.ConnectUDP != want {
		t.Fatalf("discovery connect_udp %q; want %q", doc.ConnectUDP, want)
	}
}

// A target the policy denies is refused with 403 and a Proxy-Status that
// carries the policy's reason, on every HTTP version; a malformed target is a
// 400 that says what was wrong.
func TestConnectUDPDenied(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy)
	for _, v := range []string{"h3", "h2", "http/1.1"} {
		_, err := r.connectUDP(t, v, "127.0.0.1:9")
		var ce *clients.ConnectUDPError
		if !errors.As(err, &ce) || ce.Status != 403 || !strings.Contains(ce.ProxyStatus, "error=http_request_denied") ||
			!strings.Contains(ce.ProxyStatus, "port 9 is closed") || !strings.Contains(ce.Reason, "port 9 is closed") {
			t.Fatalf("%s: denied target: %v; want 403 with the policy's reason in Proxy-Status", v, err)
		}
	}
	// A reverse name is refused before its agent is involved: exposed UDP
	// services are reached with tp's own relay.
	_, err := r.connectUDP(t, "h3", "app."+r.d.cfg.ReverseZone+":53")
	var re *clients.ConnectUDPError
	if !errors.As(err, &re) || re.Status != 502 || !strings.Contains(re.Reason, "reverse name") {
		t.Fatalf("reverse name: %v; want 502 saying it is a reverse name", err)
	}
	// target_port 0 is no port.
	_, err = r.connectUDP(t, "h2", "127.0.0.1:0")
	var ce *clients.ConnectUDPError
	if !errors.As(err, &ce) || ce.Status != 400 || !strings.Contains(ce.Reason, "target_port") {
		t.Fatalf("port 0: %v; want 400 naming target_port", err)
	}
}

// With the default policy (internal addresses closed) and a rule that allows
// every UDP dial, CONNECT-UDP to loopback is refused exactly as a tp UDP dial
// is, until allowed_internal opens the address.
func TestConnectUDPInternalAddressLikeUDPDial(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, policy.DefaultPolicy+"\nallow if input.action == \"dial_udp\"\n")
	echo := testnet.EchoUDP(t)
	dl, err := r.alice.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	_, dialErr := dl.DialContext(context.Background(), "udp", echo)
	if !errors.Is(dialErr, authz.ErrPolicyDenied) || !strings.Contains(dialErr.Error(), "internal address") {
		t.Fatalf("tp UDP dial to loopback: %v; want the internal-address denial", dialErr)
	}
	_, err = r.connectUDP(t, "h3", echo)
	var ce *clients.ConnectUDPError
	if !errors.As(err, &ce) || ce.Status != 403 || !strings.Contains(ce.Reason, "internal address") {
		t.Fatalf("CONNECT-UDP to loopback: %v; want 403 with the internal-address reason", err)
	}
	if err := os.WriteFile(filepath.Join(r.d.cfg.PolicyDir(), "open.rego"), []byte("package tp.authz\n\nallowed_internal contains \"127.0.0.1/32\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.d.ReloadPolicy(context.Background()); err != nil {
		t.Fatal(err)
	}
	c, err := r.connectUDP(t, "h3", echo)
	if err != nil {
		t.Fatalf("after allowed_internal: %v", err)
	}
	udpRoundTrip(t, c, []byte("opened"))
	// The proxy name's own port is never a target, whatever the policy says.
	if _, err := r.connectUDP(t, "h2", r.addr); !errors.As(err, &ce) || ce.Status != 403 || !strings.Contains(ce.ProxyStatus, "destination_ip_prohibited") {
		t.Fatalf("CONNECT-UDP to tpd itself: %v; want 403 destination_ip_prohibited", err)
	}
}

// A payload larger than the bound (65507 bytes, what IPv4 carries) is dropped
// and counted, not truncated, and the flow goes on; so are payloads with a
// context ID other than 0 (RFC 9298 §4), in datagrams and in capsules; a
// capsule of an unknown type is skipped (RFC 9297 §3.2).
func TestConnectUDPDropsOversizeAndUnknownContext(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy)
	echo := testnet.EchoUDP(t)
	before := r.d.proxy.ConnectUDPStats()
	c, err := r.connectUDP(t, "h2", echo)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WriteDatagram(randomText(65508)); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteContextDatagram(7, []byte("context 7 is not registered")); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteCapsule(0x2a2a, []byte("a capsule type TP does not know")); err != nil {
		t.Fatal(err)
	}
	udpRoundTrip(t, c, []byte("after the drops")) // the first answer is this one: nothing else was relayed
	h3, err := r.connectUDP(t, "h3", echo)
	if err != nil {
		t.Fatal(err)
	}
	if err := h3.WriteContextDatagram(9, []byte("context 9 in an HTTP/3 datagram")); err != nil {
		t.Fatal(err)
	}
	udpRoundTrip(t, h3, []byte("still flowing"))
	c.Close()
	h3.Close()
	waitFor(t, "both flows to end", func() bool { return r.d.proxy.ConnectUDPStats().Active == 0 })
	st := r.d.proxy.ConnectUDPStats()
	if d := st.Oversize - before.Oversize; d != 1 {
		t.Fatalf("oversize drops: %d; want 1 (stats %+v)", d, st)
	}
	if d := st.UnknownContext - before.UnknownContext; d != 2 {
		t.Fatalf("unknown-context drops: %d; want 2 (stats %+v)", d, st)
	}
	if st.BytesToTarget > st.BytesFromClient {
		t.Fatalf("%d bytes to targets, %d from clients: amplification", st.BytesToTarget, st.BytesFromClient)
	}
}

// A malformed capsule makes the request stream malformed (RFC 9297 §3.3): the
// flow is reset (h3: H3_MESSAGE_ERROR), never ended cleanly, and counted.
// Malformed here: a DATAGRAM capsule without a context ID (h3), and a stream
// that ends inside a capsule (h2).
func TestConnectUDPMalformedCapsule(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy)
	echo := testnet.EchoUDP(t)
	before := r.d.proxy.ConnectUDPStats().MalformedCapsules

	c, err := r.connectUDP(t, "h3", echo)
	if err != nil {
		t.Fatal(err)
	}
	udpRoundTrip(t, c, []byte("before"))
	if err := c.WriteCapsule(0, nil); err != nil { // DATAGRAM capsule, empty: no context ID
		t.Fatal(err)
	}
	waitEnded(t, c)
	var he *http3.Error
	if !errors.As(c.Err(), &he) || he.ErrorCode != http3.ErrCodeMessageError {
		t.Fatalf("h3 flow after a capsule without context ID ended with %v; want a reset with H3_MESSAGE_ERROR", c.Err())
	}

	c2, err := r.connectUDP(t, "h2", echo)
	if err != nil {
		t.Fatal(err)
	}
	udpRoundTrip(t, c2, []byte("before"))
	// A DATAGRAM capsule that announces 100 bytes, 3 of them sent, then END_STREAM.
	if err := c2.WriteRaw([]byte{0x00, 0x40, 100, 0x00, 'a', 'b'}); err != nil {
		t.Fatal(err)
	}
	if err := c2.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	waitEnded(t, c2)
	if errors.Is(c2.Err(), io.EOF) {
		t.Fatal("the h2 flow ended cleanly after a truncated capsule; want RST_STREAM")
	}
	waitFor(t, "the malformed flows to be counted", func() bool { return r.d.proxy.ConnectUDPStats().MalformedCapsules-before == 2 })
}

// Revoking the device ends its live CONNECT-UDP flow with a reset, and the
// device cannot open another.
func TestConnectUDPRevokeEndsFlow(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy)
	echo := testnet.EchoUDP(t)
	c, err := r.connectUDP(t, "h3", echo)
	if err != nil {
		t.Fatal(err)
	}
	udpRoundTrip(t, c, []byte("before the revocation"))
	res, err := r.d.Revoke(context.Background(), "device", "alice@laptop", false)
	if err != nil || res.Closed < 1 {
		t.Fatalf("revoke: %+v, %v; want the flow closed", res, err)
	}
	waitEnded(t, c)
	if errors.Is(c.Err(), io.EOF) {
		t.Fatal("the revoked flow ended cleanly; want a reset")
	}
	if _, err := r.connectUDP(t, "h3", echo); err == nil {
		t.Fatal("a revoked device opened a new CONNECT-UDP flow")
	}
}

func waitEnded(t *testing.T, c *clients.ConnectUDPConn) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the flow did not end within 20s")
	}
}

// discovery fetches the discovery document on tpd's own name.
func (r *connectRig) discovery(t *testing.T) wire.Discovery {
	t.Helper()
	_, b := getDiscovery(t, discoveryClient(t, r.d), http.MethodGet, strings.TrimSuffix(r.d.cfg.PublicURL(), "/")+wire.DiscoveryPath, "")
	doc, err := wire.ParseDiscovery(b)
	if err != nil {
		t.Fatalf("discovery: %v: %s", err, b)
	}
	return doc
}

// A policy change that no longer allows a live CONNECT-UDP flow ends it with
// a reset; a flow over TCP (h2 capsules) is re-checked the same way.
func TestConnectUDPPolicyChangeEndsFlow(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy)
	echo := testnet.EchoUDP(t)
	h3, err := r.connectUDP(t, "h3", echo)
	if err != nil {
		t.Fatal(err)
	}
	h2, err := r.connectUDP(t, "h2", echo)
	if err != nil {
		t.Fatal(err)
	}
	udpRoundTrip(t, h3, []byte("before the change"))
	udpRoundTrip(t, h2, []byte("before the change"))
	tcpOnly := "package tp.authz\n\ndefault allow := false\n\nallow if input.destination.network == \"tcp\"\n\nreason := \"UDP is closed now\" if not allow\n"
	if err := os.WriteFile(filepath.Join(r.d.cfg.PolicyDir(), "tp.rego"), []byte(tcpOnly), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.d.ReloadPolicy(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*clients.ConnectUDPConn{h3, h2} {
		waitEnded(t, c)
		if errors.Is(c.Err(), io.EOF) {
			t.Fatal("a flow the new policy refuses ended cleanly; want a reset")
		}
	}
	_, err = r.connectUDP(t, "h3", echo)
	var ce *clients.ConnectUDPError
	if !errors.As(err, &ce) || ce.Status != 403 || !strings.Contains(ce.Reason, "UDP is closed now") {
		t.Fatalf("after the change: %v; want 403 with the new policy's reason", err)
	}
}

// CONNECT-UDP flows count against the identity's UDP flow bound
// (udp-max-flows) together with tp UDP dials: with a bound of 1, an open
// CONNECT-UDP flow makes a second one a 429 and a tp UDP dial a refusal, and
// closing it frees the slot.
func TestConnectUDPSharesUDPFlowBound(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy, func(c *config.Server) { c.UDPMaxFlows = 1 })
	echo := testnet.EchoUDP(t)
	c, err := r.connectUDP(t, "h3", echo)
	if err != nil {
		t.Fatal(err)
	}
	udpRoundTrip(t, c, []byte("holding the only slot"))
	_, err = r.connectUDP(t, "h2", echo)
	var ce *clients.ConnectUDPError
	if !errors.As(err, &ce) || ce.Status != 429 || !strings.Contains(ce.ProxyStatus, "connection_limit_reached") {
		t.Fatalf("second CONNECT-UDP flow: %v; want 429 connection_limit_reached", err)
	}
	dl, err := r.alice.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	var re *clients.RefusedError
	if _, err := dl.DialContext(context.Background(), "udp", echo); !errors.As(err, &re) || re.Code != "too_many_flows" {
		t.Fatalf("tp UDP dial beside the CONNECT-UDP flow: %v; want too_many_flows", err)
	}
	c.Close()
	waitFor(t, "the slot to be free", func() bool { return r.d.proxy.UDPStats().Active == 0 })
	c2, err := r.connectUDP(t, "h2", echo)
	if err != nil {
		t.Fatalf("after closing the first flow: %v", err)
	}
	udpRoundTrip(t, c2, []byte("the slot is free again"))
}

// A flow without a datagram either way for udp-idle-timeout (1 s here) ends
// cleanly: the client sees the end of the stream, not a reset.
func TestConnectUDPIdleTimeout(t *testing.T) {
	t.Parallel()
	r := newConnectRig(t, connectPolicy, func(c *config.Server) { c.UDPIdleTimeout = time.Second })
	echo := testnet.EchoUDP(t)
	for _, v := range []string{"h3", "h2", "http/1.1"} {
		c, err := r.connectUDP(t, v, echo)
		if err != nil {
			t.Fatal(err)
		}
		udpRoundTrip(t, c, []byte("then silence"))
		waitEnded(t, c)
		if !errors.Is(c.Err(), io.EOF) {
			t.Fatalf("%s: an idle flow ended with %v; want a clean end", v, c.Err())
		}
	}
}
