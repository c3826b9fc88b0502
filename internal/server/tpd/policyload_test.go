//go:build linux

package tpd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/policy"
	"github.com/tp-proxy/tp/proxy/wire"
)

// workRule allows dials to 127.0.0.1 after scanning a long string constant with a
// regular expression: a legitimate rule with a known, bounded amount of work.
func workRule(n int) string {
	return fmt.Sprintf(`package tp.authz

payload := %q

allow if {
	input.action == "dial"
	not regex.match("^[a-z]*[0-9]$", payload)
}

allowed_internal contains "127.0.0.1/32"
`, strings.Repeat("abcdefgh", n/8))
}

// evalCPU returns the processor time one evaluation of the policy in dir needs.
func evalCPU(t *testing.T, dir string) time.Duration {
	t.Helper()
	e, err := policy.Load(context.Background(), dir, policy.WithTimeout(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	in := map[string]any{"action": "dial", "destination": map[string]any{"host": "127.0.0.1", "ips": []any{"127.0.0.1"}, "embedded_ipv4": []any{}}}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var ru unix.Rusage
	cpu := func() time.Duration {
		if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
			t.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	before := cpu()
	if res, err := e.Eval(context.Background(), in); err != nil || !res.Allow {
		t.Fatalf("calibration: %+v, %v", res, err)
	}
	return cpu() - before
}

// A burst of tunnels opening at once through the real tpd is not turned into
// policy denials. The bad input is load: 25 tunnels per processor opening at
// once, TLS handshakes and all, each decided by a policy that needs more than the
// scheduler's time slice, under a policy-timeout ten times what one decision
// needs. Before, the timeout ran while the decision waited for a processor, and
// most of the burst was refused with policy_error.
func TestTunnelBurstNotDeniedByPolicyTimeout(t *testing.T) { // not parallel: it sizes its policy by the processor time one decision takes
	cfg := newDataDir(t, nil)
	// Size the rule so that one decision needs 12 to 24 ms of processor time on
	// this machine and build: a measurement that sizes the test, not an assertion.
	n := 1 << 12
	var need time.Duration
	for {
		if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "work.rego"), []byte(workRule(n)), 0o600); err != nil {
			t.Fatal(err)
		}
		if need = evalCPU(t, cfg.PolicyDir()); need >= 12*time.Millisecond || n >= 1<<26 {
			break
		}
		n *= 2
	}
	cfg.PolicyTimeout = 10 * need
	r := runDaemon(t, cfg)
	echo := testnet.Echo(t)
	alice, _, _ := enrollClient(t, r.d, r.url, "alice", "laptop")
	if err := dialEcho(t, alice, echo); err != nil { // the policy allows it at all
		t.Fatal(err)
	}

	burst := 25 * runtime.GOMAXPROCS(0)
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, burst)
	for range burst {
		d, err := alice.Dialer()
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			c, err := d.DialContext(ctx, "tcp", echo)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(time.Minute))
			if _, err := c.Write([]byte("x")); err != nil {
				errs <- err
				return
			}
			if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
				errs <- err
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	failed, policyErrors := 0, 0
	for err := range errs {
		var re *clients.RefusedError
		if errors.As(err, &re) && re.Code == wire.CodePolicyError {
			policyErrors++
		}
		if failed++; failed <= 3 {
			t.Error(err)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d tunnels failed, %d of them with policy_error (a decision needs %s of processor time, policy-timeout is %s)",
			failed, burst, policyErrors, need, cfg.PolicyTimeout)
	}
}
