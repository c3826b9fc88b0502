package tpd

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
)

// lineLog hands each log line of an agent to the test.
type lineLog chan string

func (l lineLog) Write(p []byte) (int, error) {
	select {
	case l <- string(p):
	default: // the test stopped reading; never block the agent
	}
	return len(p), nil
}

// A policy that denies an agent's names is not the end of the agent: it keeps
// retrying with backoff and says why each time, and registers once the policy is
// fixed, without a restart (as a service under systemd needs). The bad input is
// a policy without a listen rule for alice: first before the agent ever
// registered, then again (the live session re-checked and ended) after it did.
func TestReverseAgentRetriesPolicyDenial(t *testing.T) {
	denyAlice := strings.Replace(reversePolicy, `input.identity.user in {"alice", "mallory"}`, `input.identity.user == "mallory"`, 1)
	for _, transport := range []string{clients.TransportQUIC, clients.TransportTLS} {
		t.Run(transport, func(t *testing.T) {
			d, url := startDaemon(t, denyAlice)
			alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
			setPolicy := func(p string) {
				t.Helper()
				if err := os.WriteFile(filepath.Join(d.cfg.PolicyDir(), "tp.rego"), []byte(p), 0o600); err != nil {
					t.Fatal(err)
				}
				if err := d.ReloadPolicy(context.Background()); err != nil {
					t.Fatal(err)
				}
			}
			dl, err := alice.Dialer()
			if err != nil {
				t.Fatal(err)
			}
			dl.Transport = transport
			lines := make(lineLog, 1000)
			registered := make(chan struct{}, 10)
			a := &clients.Agent{Dialer: dl, Exposed: []clients.Exposed{{Name: "svc", Local: upperServer(t)}},
				AllowUsers: []string{"bob"}, Certificate: alice.ReverseCertificate,
				Logger:     slog.New(slog.NewTextHandler(lines, nil)),
				Registered: func([]string) { registered <- struct{}{} }}
			ctx, cancel := context.WithCancel(context.Background())
			var runErr error
			done := make(chan struct{}) // closed when Run returned runErr
			go func() { runErr = a.Run(ctx); dl.Close(); close(done) }()
			t.Cleanup(func() { cancel(); <-done })

			// refusals waits for n log lines that say the policy refused the names
			// and that the agent retries, while the agent must not end.
			refusals := func(n int) {
				t.Helper()
				deadline := time.After(60 * time.Second)
				for n > 0 {
					select {
					case l := <-lines:
						if strings.Contains(l, "refused the names; retrying") && strings.Contains(l, "denied by policy") {
							n--
						}
					case <-done:
						t.Fatalf("the agent ended on a policy denial: %v; want it to keep retrying", runErr)
					case <-registered:
						t.Fatal("the agent registered names the policy denies")
					case <-deadline:
						t.Fatal("no refusal logged within 60s")
					}
				}
			}
			waitRegistered := func() {
				t.Helper()
				select {
				case <-registered:
				case <-done:
					t.Fatalf("the agent ended: %v; want it to register once the policy allows it", runErr)
				case <-time.After(60 * time.Second):
					t.Fatal("the agent did not register within 60s of the policy fix")
				}
			}

			refusals(2) // denied from the start: retried, and said so each time
			setPolicy(reversePolicy)
			waitRegistered()
			for len(lines) > 0 { // what came before the fix
				<-lines
			}
			setPolicy(denyAlice) // the re-check ends the live session
			refusals(1)
			setPolicy(reversePolicy)
			waitRegistered()
			got, err := dialReverseAs(t, d, url, []byte("after the fix"))
			if err != nil || string(got) != "AFTER THE FIX" {
				t.Fatalf("a session after the policy fix: %q, %v", got, err)
			}
		})
	}
}

// dialReverseAs enrolls bob and runs one session to svc.
func dialReverseAs(t *testing.T, d *Daemon, url string, msg []byte) ([]byte, error) {
	t.Helper()
	bob, _, _ := enrollClient(t, d, url, "bob", "phone")
	return dialReverse(bob, clients.TransportTLS, msg)
}

// The same refusal with ExitOnRefusal (tp expose --exit-on-refusal) ends Run with
// the server's reason instead. The bad input is the same policy without a listen
// rule for alice.
func TestReverseAgentExitOnRefusal(t *testing.T) {
	denyAlice := strings.Replace(reversePolicy, `input.identity.user in {"alice", "mallory"}`, `input.identity.user == "mallory"`, 1)
	d, url := startDaemon(t, denyAlice)
	alice, _, _ := enrollClient(t, d, url, "alice", "laptop")
	_, err := runAgent(t, alice, clients.TransportTLS, []clients.Exposed{{Name: "svc", Local: upperServer(t)}}, nil)
	if err == nil || !strings.Contains(err.Error(), "denied by policy") {
		t.Fatalf("with ExitOnRefusal: %v; want the policy denial", err)
	}
}
