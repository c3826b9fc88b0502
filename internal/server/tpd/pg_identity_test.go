package tpd

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpg"
)

// max-reverse-names-per-identity bounds a device over every instance on one
// database: alice's agent on A holds two names (the bound), so her second
// agent, on B, asking for one more is refused with too_many_names naming the
// bound, though B alone serves nothing of hers; once the first agent stops
// (and so frees its names), the same registration on B succeeds.
func TestPGMaxReverseNamesAcrossInstances(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	cfgA := leaseDataDir(t, dsn, nil)
	cfgA.MaxReverseNamesPerIdentity = 2
	a := runDaemon(t, cfgA)
	cfgB := leaseDataDir(t, dsn, &cfgA)
	cfgB.MaxReverseNamesPerIdentity = 2
	b := runDaemon(t, cfgB)
	local := testnet.Upper(t)
	alice, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")

	stopA, err := runAgent(t, alice, clients.TransportTLS, []clients.Exposed{{Name: "svc", Local: local}, {Name: "web", Local: local}}, nil)
	if err != nil {
		t.Fatalf("alice's agent with two names on A (the bound): %v", err)
	}
	// alice's second agent, on B, asks for a third name: refused, and it
	// retries with its backoff as agents do.
	d, err := clientOn(t, alice, b.url).Dialer()
	if err != nil {
		t.Fatal(err)
	}
	logs := &testlog.Buffer{}
	registered := make(chan struct{}, 10)
	agent := &clients.Agent{Dialer: d, Exposed: []clients.Exposed{{Name: "more", Local: local}}, AllowUsers: []string{"bob"},
		Certificate: alice.ReverseCertificate, Logger: slog.New(slog.NewTextHandler(logs, nil)),
		Registered: func([]string) { notify(registered) }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- agent.Run(ctx); d.Close() }()
	t.Cleanup(func() { cancel(); waitEnd(t, "the agent", done, stopBound) })
	waitFor(t, "B refuses alice's third name", func() bool { return strings.Contains(logs.String(), "max-reverse-names-per-identity") })
	if l := logs.String(); !strings.Contains(l, "already holds 2") || !strings.Contains(l, "on the TP server's instances") {
		t.Fatalf("B's refusal of alice's third name: %s; want too_many_names counting A's two", l)
	}
	select {
	case <-registered:
		t.Fatal("alice's agent on B registered a third name while A serves her two")
	default:
	}
	stopA() // unregisters: svc and web are freed at once
	select {
	case <-registered:
	case <-time.After(90 * time.Second):
		t.Fatalf("alice's agent on B did not register its name within 90s of her agent on A stopping:\n%s", logs.String())
	}
}

// A tp client's TLS session ticket from instance A resumes its tp/1 session on
// instance B (the proxy's ticket keys are shared in PostgreSQL), over TLS and
// over QUIC: what a client behind a load balancer does when its next
// connection lands on another instance.
func TestPGTicketResumesOnOtherInstance(t *testing.T) {
	t.Parallel()
	_, dsn := testpg.NewDatabase(t)
	cfgA := pgDataDir(t, dsn, nil)
	cfgA.QUIC = true
	a := runDaemon(t, cfgA)
	cfgB := pgDataDir(t, dsn, &cfgA)
	cfgB.QUIC = true
	b := runDaemon(t, cfgB)
	echo := testnet.Echo(t)
	c, _, _ := enrollClient(t, a.d, a.url, "alice", "laptop")
	onB := clientOn(t, c, b.url)

	for _, transport := range []string{clients.TransportTLS, clients.TransportQUIC} {
		t.Run(transport, func(t *testing.T) {
			if err := dialOver(c, transport, echo); err != nil { // a full handshake with A: a ticket in TP_HOME
				t.Fatalf("dial through A: %v", err)
			}
			key := map[string]string{clients.TransportTLS: "tls", clients.TransportQUIC: "quic"}[transport]
			before := b.d.proxy.Stats().ResumedConns[key]
			if err := dialOver(onB, transport, echo); err != nil {
				t.Fatalf("dial through B with A's ticket: %v", err)
			}
			if after := b.d.proxy.Stats().ResumedConns[key]; after != before+1 {
				t.Fatalf("B resumed %d %s sessions for the dial with A's ticket; want 1 (the ticket keys are not shared)", after-before, key)
			}
		})
	}
}

// dialOver dials addr through c's server over transport, one round trip.
func dialOver(c *clients.Client, transport, addr string) error {
	d, err := c.Dialer()
	if err != nil {
		return err
	}
	defer d.Close()
	d.Transport = transport
	conn, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("x")); err != nil {
		return err
	}
	_, err = io.ReadFull(conn, make([]byte, 1))
	return err
}
