package tpd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/lib/config"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

const allowAlice = `package tp.authz

default allow := false

allow if input.identity.user == "alice"
`

// startDaemon runs a real tpd in-process on a loopback port.
func startDaemon(t testing.TB, policy string) (*Daemon, string) {
	t.Helper()
	return startDaemonCfg(t, policy, nil)
}

// startDaemonCfg is startDaemon with a change to the configuration.
func startDaemonCfg(t testing.TB, policy string, mod func(*config.Server)) (*Daemon, string) {
	t.Helper()
	d := serveDaemon(t, policy, mod, nil)
	return d, d.cfg.PublicURL()
}

// serveDaemon initialises a fresh data dir for the default configuration as mod
// (when not nil) changes it, installs policy as its only policy, and serves it
// in-process on a loopback port free on TCP and UDP (for QUIC) until the test
// ends. log nil discards the daemon's log.
func serveDaemon(t testing.TB, policy string, mod func(*config.Server), log *slog.Logger) *Daemon {
	t.Helper()
	cfg := config.DefaultServer()
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cfg.PolicyTimeout = 5 * time.Second // -race is slow; the bound is not what is tested here
	if mod != nil {
		mod(&cfg)
	}
	if _, err := Init(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cfg.PolicyDir(), "tp.rego"), []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := Listen("127.0.0.1:0", true) // a port free on UDP too, for QUIC
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = ln.Addr().String()
	d, err := New(context.Background(), cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, ln) }()
	t.Cleanup(func() {
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
	return d
}

// clock is a settable clock for the client.
type clock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return time.Now().Add(c.off) }
func (c *clock) set(d time.Duration) {
	c.mu.Lock()
	c.off = d
	c.mu.Unlock()
}

// enrollClient enrolls user@device and logs in, as dlogin does.
func enrollClient(t testing.TB, d *Daemon, url, user, device string) (*clients.Client, *clock, *[]string) {
	t.Helper()
	ctx := context.Background()
	enr, err := d.Users().Enroll(user, device, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	root, err := login.FetchRoot(ctx, url, d.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	home := clients.Home{Dir: filepath.Join(t.TempDir(), "home")}
	if err := home.Init(); err != nil {
		t.Fatal(err)
	}
	key, err := clients.NewDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	hc := login.HTTPClient(root)
	defer hc.CloseIdleConnections()
	res, err := login.EnrollDevice(ctx, hc, url, enr.Token, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(home.SaveDeviceKey(key), home.SaveRoot(root),
		home.SaveProfile(clients.Profile{Server: url, Fingerprint: d.Fingerprint(), DeviceID: res.DeviceID})); err != nil {
		t.Fatal(err)
	}
	c, err := clients.Open(home)
	if err != nil {
		t.Fatal(err)
	}
	clk := &clock{}
	c.Now = clk.now
	var mu sync.Mutex
	var logs []string
	c.Logf = func(f string, a ...any) {
		mu.Lock()
		defer mu.Unlock()
		logs = append(logs, fmt.Sprintf(f, a...))
	}
	if _, err := c.Login(ctx, nil); err != nil {
		t.Fatal(err)
	}
	return c, clk, &logs
}

func dialEcho(t *testing.T, c *clients.Client, addr string) error {
	t.Helper()
	d, err := c.Dialer()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("x")); err != nil {
		return err
	}
	b := make([]byte, 1)
	_, err = io.ReadFull(conn, b)
	return err
}

// In the last third of its life the certificate is renewed by tp itself, with
// the device key and without any prompt, before the connection is made.
func TestRenewalInLastThird(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, allowAlice)
	echo := testnet.Echo(t)
	c, clk, logs := enrollClient(t, d, url, "alice", "laptop")
	first, err := c.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	clk.set(2*time.Hour + 50*time.Minute) // past two thirds of 4 h
	second, err := c.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if first.Leaf.SerialNumber.Cmp(second.Leaf.SerialNumber) == 0 {
		t.Fatal("certificate was not renewed in its last third")
	}
	if len(*logs) == 0 || !strings.Contains((*logs)[0], "renewed certificate") {
		t.Errorf("renewal was not reported: %q", *logs)
	}
	clk.set(0)
	if err := dialEcho(t, c, echo); err != nil {
		t.Fatalf("dial with the renewed certificate: %v", err)
	}
}

// An expired certificate without the device key to renew it gives the sentence
// the person needs, not a handshake error.
func TestExpiredWithoutDeviceKey(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, allowAlice)
	c, clk, _ := enrollClient(t, d, url, "alice", "laptop")
	if err := os.Remove(filepath.Join(c.Home.Dir, "device.key")); err != nil {
		t.Fatal(err)
	}
	clk.set(5 * time.Hour)
	_, err := c.Certificate(context.Background())
	// Neither tp's renewal nor dlogin works without the device key: the
	// sentence sends the person to an administrator, never to dlogin alone.
	if err == nil || !strings.Contains(err.Error(), "expired at") || !strings.Contains(err.Error(), "tpd enroll alice --device laptop") ||
		strings.Contains(err.Error(), "run dlogin") {
		t.Fatalf("expired certificate without device key: %v", err)
	}
}

// A revoked device, or a deny-listed certificate, is refused on its next connection.
func TestRevocationRefusesConnections(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, allowAlice)
	echo := testnet.Echo(t)
	c, _, _ := enrollClient(t, d, url, "alice", "laptop")
	if err := dialEcho(t, c, echo); err != nil {
		t.Fatalf("dial before revocation: %v", err)
	}
	// Each dial is a new Dialer, as each `tp` is a new process: the ticket the
	// first kept in TP_HOME resumes the second's session.
	tickets := filepath.Join(c.Home.Dir, "tickets.json")
	resumed := func() int64 { st := d.proxy.Stats(); return st.ResumedConns["tls"] + st.ResumedConns["quic"] }
	before := resumed()
	if err := dialEcho(t, c, echo); err != nil {
		t.Fatalf("second dial: %v", err)
	}
	if resumed() == before {
		t.Fatal("the second dial did not resume a session from the ticket kept in TP_HOME")
	}
	if fi, err := os.Stat(tickets); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("tickets.json: %v, %v; want a 0600 file", fi, err)
	}
	cert, err := c.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// A resumed handshake is checked as a full one is: the deny list refuses it,
	// and the refused ticket is gone from TP_HOME (the next dial is a full handshake).
	d.DenyList().Add(authz.DenySerial, cert.Leaf.SerialNumber.Text(16))
	if err := dialEcho(t, c, echo); err == nil {
		t.Fatal("deny-listed certificate still connects on a resumed session")
	}
	if b, err := os.ReadFile(tickets); err != nil || bytes.Contains(b, []byte(`"ticket"`)) {
		t.Fatalf("after a refused resumption tickets.json still holds a ticket (%v, %d bytes)", err, len(b))
	}
	d.DenyList().Remove(authz.DenySerial, cert.Leaf.SerialNumber.Text(16))
	if err := dialEcho(t, c, echo); err != nil {
		t.Fatalf("dial after removal from the deny list: %v", err)
	}
	if err := d.Users().RevokeDevice("alice@laptop"); err != nil {
		t.Fatal(err)
	}
	err = dialEcho(t, c, echo)
	if err == nil {
		t.Fatal("revoked device still connects")
	}
	if !strings.Contains(err.Error(), "rejected") {
		t.Errorf("revoked device: error %q does not say the server rejected it", err)
	}
	if b, err := os.ReadFile(tickets); err != nil || bytes.Contains(b, []byte(`"ticket"`)) {
		t.Fatalf("after the revoked device's refusal tickets.json still holds a ticket (%v, %d bytes)", err, len(b))
	}
}

// A policy edit takes effect without a restart; a broken edit is refused and the
// previous policy keeps deciding.
func TestPolicyReload(t *testing.T) {
	t.Parallel()
	d, url := startDaemon(t, allowAlice)
	echo := testnet.Echo(t)
	c, _, _ := enrollClient(t, d, url, "alice", "laptop")
	file := filepath.Join(d.cfg.PolicyDir(), "tp.rego")
	if err := os.WriteFile(file, []byte("package tp.authz\n\ndefault allow := false\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := d.ReloadPolicy(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := dialEcho(t, c, echo); !errors.Is(err, authz.ErrPolicyDenied) {
		t.Fatalf("after a deny-all reload: %v", err)
	}
	if err := os.WriteFile(file, []byte("package tp.authz\n\nallow if {"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := d.ReloadPolicy(context.Background()); err == nil {
		t.Fatal("a policy with a syntax error was accepted")
	}
	if err := dialEcho(t, c, echo); !errors.Is(err, authz.ErrPolicyDenied) {
		t.Fatalf("the previous (deny-all) policy should still decide: %v", err)
	}
}
