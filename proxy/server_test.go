package proxy_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
	"github.com/tp-proxy/tp/proxy"
	"github.com/tp-proxy/tp/proxy/wire"
)

func TestDialEcho(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.mustEcho(t)
}

// TestTransfer64MiB pushes 64 MiB each way through Forwarder → Dialer → Server →
// echo destination and compares SHA-256 sums of what was sent and received.
func TestTransfer64MiB(t *testing.T) {
	t.Parallel()
	const size = 64 << 20
	e := newEnv(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	fwd := &clients.Forwarder{Dial: e.dialer().DialContext, Target: e.echo, Logger: discardLogger()}
	fwdDone := make(chan error, 1)
	go func() { fwdDone <- fwd.Serve(ctx, ln) }()
	defer func() {
		cancel()
		if err := <-fwdDone; !errors.Is(err, context.Canceled) {
			t.Errorf("Forwarder.Serve = %v; want context.Canceled", err)
		}
	}()

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(50 * time.Second))

	sent := sha256.New()
	var wg sync.WaitGroup
	var werr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		src := io.LimitReader(rand.NewChaCha8([32]byte{1, 2, 3}), size)
		_, werr = io.Copy(c, io.TeeReader(src, sent))
		if werr == nil {
			werr = c.(*net.TCPConn).CloseWrite()
		}
	}()
	got := sha256.New()
	n, err := io.Copy(got, c)
	wg.Wait()
	if werr != nil || err != nil {
		t.Fatalf("write: %v; read: %v", werr, err)
	}
	if n != size {
		t.Fatalf("received %d bytes; want %d", n, size)
	}
	if !bytes.Equal(sent.Sum(nil), got.Sum(nil)) {
		t.Fatal("checksum of received bytes differs from what was sent")
	}
}

// TestHalfClose: the client sends a request and half-closes; the destination reads
// to EOF and only then replies with 1 MiB, which the client must receive in full.
func TestHalfClose(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	const replySize = 1 << 20
	dst := testnet.Serve(t, func(c *net.TCPConn) {
		req, _ := io.ReadAll(c) // until the client's half-close arrives
		sum := sha256.Sum256(req)
		_, _ = c.Write(sum[:])
		_, _ = io.Copy(c, io.LimitReader(rand.NewChaCha8([32]byte{9}), replySize))
	})

	c, err := e.dialer().DialContext(context.Background(), "tcp", dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	req := bytes.Repeat([]byte("request "), 1000)
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	reply, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(req)
	if len(reply) != 32+replySize || !bytes.Equal(reply[:32], want[:]) {
		t.Fatalf("reply: %d bytes, sum match %v; want %d bytes and a matching sum", len(reply), len(reply) >= 32 && bytes.Equal(reply[:32], want[:]), 32+replySize)
	}
}

// TestClientCertificateRefused covers certificates the TLS layer must refuse; each
// case then shows the server still serves a good client.
func TestClientCertificateRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	other := testpki.New(t)
	now := time.Now()
	tests := []struct {
		name string
		cert *tls.Certificate // nil: no certificate at all
		want string           // in the error text
	}{
		{"no client certificate", nil, "certificate required"},
		{"expired client certificate",
			ptr(e.ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{NotBefore: now.Add(-5 * time.Hour), NotAfter: now.Add(-time.Hour)})),
			"expired certificate"},
		{"client certificate from another CA", ptr(other.ClientCert(t, "alice@laptop", testpki.LeafOptions{})), "unknown certificate authority"},
		// crypto/tls verifies client chains with ExtKeyUsageClientAuth.
		{"serverAuth-only client certificate",
			ptr(e.ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})),
			"bad certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The auto race a user's tp runs, whose message is what is tested.
			// Its Timeout bounds a hang only: it answers within a second
			// quietly, and a minute leaves its five handshakes time on a
			// machine loaded by other packages' tests (10 s did not).
			d := &clients.Dialer{Server: e.addr, TLSConfig: e.clientTLS(tt.cert), Timeout: time.Minute}
			c, err := d.DialContext(context.Background(), "tcp", e.echo)
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded; want the handshake refused")
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "dlogin") || !strings.Contains(err.Error(), "tp whoami") {
				t.Fatalf("error %q; want it to mention %q, dlogin and tp whoami (which asks the server why: a revoked device is not helped by dlogin)", err, tt.want)
			}
			e.mustEcho(t)
		})
	}
}

func ptr[T any](v T) *T { return &v }

// TestIdentifyFails: a valid certificate that Identify rejects (no device id in CN)
// gets code unauthenticated.
func TestIdentifyFails(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	d := &clients.Dialer{Server: e.addr, TLSConfig: e.clientTLS(ptr(e.ca.ClientCert(t, "", testpki.LeafOptions{})))}
	_, err := d.DialContext(context.Background(), "tcp", e.echo)
	var re *clients.RefusedError
	if !errors.As(err, &re) || re.Code != wire.CodeUnauthenticated {
		t.Fatalf("err = %v; want RefusedError %s", err, wire.CodeUnauthenticated)
	}
	e.mustEcho(t)
}

func frame(body string) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(body)))
	return append(b, body...)
}

// TestBadHello sends malformed client hellos by hand; each must get the right code
// and leave the server serving.
func TestBadHello(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	_, port, _ := net.SplitHostPort(e.echo)
	tooLarge := binary.BigEndian.AppendUint16(nil, wire.MaxHelloSize+1)
	tooLarge = append(tooLarge, bytes.Repeat([]byte{' '}, wire.MaxHelloSize+1)...)
	tests := []struct {
		name  string
		bytes []byte
		code  string
	}{
		{"hello larger than MaxHelloSize", tooLarge, wire.CodeHelloTooLarge},
		{"zero-length hello", []byte{0, 0}, wire.CodeBadRequest},
		{"malformed JSON", frame(`{"v":1,"op":"dial",`), wire.CodeBadRequest},
		{"JSON array instead of object", frame(`[1]`), wire.CodeBadRequest},
		{"unknown op", frame(`{"v":1,"op":"frobnicate","net":"tcp","host":"127.0.0.1","port":` + port + `}`), wire.CodeUnknownOp},
		{"unknown field", frame(`{"v":1,"op":"dial","net":"tcp","host":"127.0.0.1","port":` + port + `,"x":1}`), wire.CodeBadRequest},
		{"field name in wrong case", frame(`{"v":1,"op":"dial","net":"tcp","HOST":"127.0.0.1","port":` + port + `}`), wire.CodeBadRequest},
		{"duplicate field", frame(`{"v":1,"op":"dial","net":"tcp","host":"127.0.0.1","host":"127.0.0.1","port":` + port + `}`), wire.CodeBadRequest},
		{"trailing bytes after object", frame(`{"v":1,"op":"dial","net":"tcp","host":"127.0.0.1","port":` + port + `}{}`), wire.CodeBadRequest},
		{"port 0", frame(`{"v":1,"op":"dial","net":"tcp","host":"127.0.0.1","port":0}`), wire.CodeBadRequest},
		{"port 65536", frame(`{"v":1,"op":"dial","net":"tcp","host":"127.0.0.1","port":65536}`), wire.CodeBadRequest},
		{"port as string", frame(`{"v":1,"op":"dial","net":"tcp","host":"127.0.0.1","port":"22"}`), wire.CodeBadRequest},
		{"version 2", frame(`{"v":2,"op":"dial","net":"tcp","host":"127.0.0.1","port":` + port + `}`), wire.CodeUnsupportedVersion},
		{"network sctp", frame(`{"v":1,"op":"dial","net":"sctp","host":"127.0.0.1","port":` + port + `}`), wire.CodeUnsupportedNetwork},
		{"empty host", frame(`{"v":1,"op":"dial","net":"tcp","host":"","port":` + port + `}`), wire.CodeBadRequest},
		{"host with NUL", frame(`{"v":1,"op":"dial","net":"tcp","host":"a\u0000b","port":` + port + `}`), wire.CodeBadRequest},
		{"host with space", frame(`{"v":1,"op":"dial","net":"tcp","host":"a b","port":` + port + `}`), wire.CodeBadRequest},
		{"host of 254 bytes", frame(`{"v":1,"op":"dial","net":"tcp","host":"` + strings.Repeat("a", 254) + `","port":` + port + `}`), wire.CodeBadRequest},
		{"truncated body then half-close", frame(`{"v":1}`)[:5], wire.CodeBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := e.rawConn(t)
			if _, err := c.Write(tt.bytes); err != nil {
				t.Fatal(err)
			}
			if tt.name == "truncated body then half-close" {
				_ = c.CloseWrite()
			}
			sh, err := wire.ReadServerHello(c)
			if err != nil {
				t.Fatalf("reading server hello: %v", err)
			}
			if sh.OK || sh.Code != tt.code || sh.Reason == "" {
				t.Fatalf("server hello %+v; want code %s with a reason", sh, tt.code)
			}
			if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
				t.Fatalf("after refusal: read %d, %v; want EOF", n, err)
			}
			e.mustEcho(t)
		})
	}
}

// TestHelloTimeout: the client handshakes and never sends a hello.
func TestHelloTimeout(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) { c.HelloTimeout = 200 * time.Millisecond })
	c := e.rawConn(t)
	sh, err := wire.ReadServerHello(c)
	if err != nil {
		t.Fatal(err)
	}
	if sh.OK || sh.Code != wire.CodeHelloTimeout {
		t.Fatalf("server hello %+v; want %s", sh, wire.CodeHelloTimeout)
	}
	e.mustEcho(t)
}

func refused(t *testing.T, err error, code string) *clients.RefusedError {
	t.Helper()
	var re *clients.RefusedError
	if !errors.As(err, &re) {
		t.Fatalf("err = %v; want *clients.RefusedError %s", err, code)
	}
	if re.Code != code {
		t.Fatalf("code %s (%s); want %s", re.Code, re.Reason, code)
	}
	return re
}

// TestDestinationRefuses: nothing listens at the destination.
func TestDestinationRefuses(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	addr := testnet.FreeAddr(t, "tcp").String()
	_, err := e.dialer().DialContext(context.Background(), "tcp", addr)
	re := refused(t, err, wire.CodeDialRefused)
	if !strings.Contains(re.Reason, addr) || !strings.Contains(re.Reason, "refused") {
		t.Fatalf("reason %q; want the address and 'refused'", re.Reason)
	}
	e.mustEcho(t)
}

// TestDestinationTimesOut: a DialContext seam that never connects to 192.0.2.1
// (TEST-NET-1), with a short DialTimeout.
func TestDestinationTimesOut(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) {
		c.DialTimeout = 200 * time.Millisecond
		var d net.Dialer
		c.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			if strings.HasPrefix(addr, "192.0.2.1:") {
				<-ctx.Done()
				return nil, &net.OpError{Op: "dial", Net: network, Err: ctx.Err()}
			}
			return d.DialContext(ctx, network, addr)
		}
	})
	_, err := e.dialer().DialContext(context.Background(), "tcp", "192.0.2.1:22")
	re := refused(t, err, wire.CodeDialTimeout)
	if !strings.Contains(re.Reason, "192.0.2.1:22") {
		t.Fatalf("reason %q; want the address", re.Reason)
	}
	e.mustEcho(t)
}

func TestPolicyDenyCarriesReason(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var seen []authz.Request
	e := newEnv(t, func(c *proxy.Config) {
		c.Resolver = mapResolver{"forbidden.test": {netip.MustParseAddr("127.0.0.1")}}
		c.Authorizer = authorizerFunc(func(_ context.Context, req authz.Request) (authz.Decision, error) {
			mu.Lock()
			seen = append(seen, req)
			mu.Unlock()
			if req.Destination.Host == "forbidden.test" {
				return authz.Decision{Reason: "alice@laptop may not reach forbidden.test"}, nil
			}
			return authz.Decision{Allow: true}, nil
		})
	})
	_, err := e.dialer().DialContext(context.Background(), "tcp", "Forbidden.Test.:22")
	re := refused(t, err, wire.CodePolicyDenied)
	if !errors.Is(err, authz.ErrPolicyDenied) {
		t.Fatal("errors.Is(err, authz.ErrPolicyDenied) = false")
	}
	if want := "denied by policy: alice@laptop may not reach forbidden.test"; err.Error() != want || re.Reason == "" {
		t.Fatalf("error %q; want %q", err, want)
	}
	mu.Lock()
	req := seen[0]
	mu.Unlock()
	if req.Action != authz.ActionDial || req.Identity.DeviceID != "alice@laptop" || req.Identity.NotAfter.IsZero() ||
		req.Destination.Host != "forbidden.test" || req.Destination.Port != 22 || req.Destination.Network != "tcp" ||
		len(req.Destination.IPs) != 1 || req.Destination.IPs[0] != netip.MustParseAddr("127.0.0.1") ||
		req.Source.Transport != "tls" || req.Source.Address == "" || req.Time.IsZero() {
		t.Fatalf("authorizer saw %+v", req)
	}
	e.mustEcho(t)
}

// TestAuthorizerErrorDenies: a failing policy engine must deny (fail closed) without
// leaking its error to the client.
func TestAuthorizerErrorDenies(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *proxy.Config) {
		c.Authorizer = authorizerFunc(func(_ context.Context, req authz.Request) (authz.Decision, error) {
			if req.Destination.Port == 1 {
				return authz.Decision{Allow: true}, errors.New("rego: secret internal detail")
			}
			return authz.Decision{Allow: true}, nil
		})
	})
	_, err := e.dialer().DialContext(context.Background(), "tcp", "127.0.0.1:1")
	re := refused(t, err, wire.CodePolicyError)
	if !strings.Contains(re.Reason, "policy evaluation failed") || strings.Contains(re.Reason, "secret") {
		t.Fatalf("reason %q", re.Reason)
	}
	e.mustEcho(t)
}

// TestResolve: names are canonicalised, resolved once, and only resolved IPs are
// dialed, in order (the first refuses, the second is the echo server).
func TestResolve(t *testing.T) {
	t.Parallel()
	var e *env
	e = newEnv(t, func(c *proxy.Config) {
		c.Resolver = resolverFunc(func(host string) ([]netip.Addr, error) {
			if host != "echo.test" {
				return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
			}
			return []netip.Addr{netip.MustParseAddr("127.0.0.2"), netip.MustParseAddrPort(e.echo).Addr()}, nil
		})
	})
	_, port, _ := net.SplitHostPort(e.echo)
	// 127.0.0.2 refuses on the echo port (the echo listens on 127.0.0.1 only).
	c, err := e.dialer().DialContext(context.Background(), "tcp", "ECHO.test.:"+port)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	_, err = e.dialer().DialContext(context.Background(), "tcp", "nowhere.test:"+port)
	refused(t, err, wire.CodeResolveFailed)
	e.mustEcho(t)
}

type resolverFunc func(host string) ([]netip.Addr, error)

func (f resolverFunc) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	return f(host)
}

// TestSessionEndsAtCertificateExpiry: a certificate valid for about two more seconds;
// the server closes the session when it expires.
func TestSessionEndsAtCertificateExpiry(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	// The session must start, and carry its first byte, before the
	// certificate expires: a dial or a write that a loaded machine made too
	// slow for it is tried again with a certificate that lives twice as long
	// (2 s, 4 s, 8 s).
	var cert tls.Certificate
	var c net.Conn
	for life := 2 * time.Second; c == nil; life *= 2 {
		cert = e.ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{NotAfter: time.Now().Add(life)})
		d := e.dialer()
		d.TLSConfig = e.clientTLS(&cert)
		var err error
		if c, err = d.DialContext(context.Background(), "tcp", e.echo); err == nil {
			_ = c.SetDeadline(time.Now().Add(15 * time.Second))
			if _, err = c.Write([]byte("x")); err != nil {
				_ = c.Close()
				c = nil
			}
		}
		if err != nil {
			if time.Now().Before(cert.Leaf.NotAfter) || life >= 8*time.Second {
				t.Fatal(err)
			}
			t.Logf("the dial and first write took longer than the certificate's %s (%v): again", life, err)
		}
	}
	defer c.Close()
	// The echo keeps the session open; it must end by itself at expiry.
	_, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("session outlived the client certificate")
	}
	if !time.Now().After(cert.Leaf.NotAfter) {
		t.Fatalf("session ended before the certificate expired: %v", err)
	}
	// Ended by the server, not by the echo: a cut that says why, never a clean end.
	var ce *clients.CutError
	if !errors.As(err, &ce) {
		t.Fatalf("at expiry the client read %v (%T); want a *clients.CutError", err, err)
	}
	clients.ExplainCut(context.Background(), err)
	if ce.End == nil || ce.End.Code != wire.EndCertExpired {
		t.Fatalf("explained as %q; want cert_expired", err)
	}
}

// TestSessionLog: one line per session at close, with identity, destination,
// decision, byte counts and why it ended, and no certificate material.
func TestSessionLog(t *testing.T) {
	t.Parallel()
	var logs testlog.Buffer
	e := newEnv(t, func(c *proxy.Config) { c.Logger = slog.New(slog.NewJSONHandler(&logs, nil)) })
	e.mustEcho(t)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), `"msg":"proxy session"`) {
		if time.Now().After(deadline) {
			t.Fatalf("no session log line; logs: %s", logs.String())
		}
		runtime.Gosched()
	}
	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatal(err)
		}
		if m["msg"] == "proxy session" {
			lines = append(lines, m)
		}
	}
	if len(lines) != 1 {
		t.Fatalf("%d session lines; want 1", len(lines))
	}
	l := lines[0]
	if l["identity"] != "alice@laptop" || l["dest"] != e.echo || l["decision"] != "allow" ||
		l["bytes_up"] != float64(4) || l["bytes_down"] != float64(4) || l["end"] != "closed" {
		t.Fatalf("session line %v", l)
	}
	if strings.Contains(logs.String(), "BEGIN") {
		t.Fatal("logs contain PEM material")
	}
}
