package clients_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy/wire"
)

// startServer runs a proxy.Server on loopback that allows every destination except
// port 9, and returns a Dialer for it.
func startServer(t *testing.T) *clients.Dialer {
	t.Helper()
	addr, tlsConfig := clients.StartTestServer(t, func(req authz.Request) authz.Decision {
		if req.Destination.Port == 9 {
			return authz.Decision{Reason: "port 9 is closed to " + req.Identity.String()}
		}
		return authz.Decision{Allow: true}
	})
	return &clients.Dialer{Server: addr, TLSConfig: tlsConfig}
}

// TestStdio: stdin EOF half-closes the connection; the reply still reaches stdout.
func TestStdio(t *testing.T) {
	t.Parallel()
	d := startServer(t)
	dst := testnet.Upper(t)
	conn, err := d.DialContext(context.Background(), "tcp", dst)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out bytes.Buffer
	if err := clients.Stdio(ctx, conn, strings.NewReader("ssh-2.0 hello"), &out); err != nil {
		t.Fatal(err)
	}
	if out.String() != "SSH-2.0 HELLO" {
		t.Fatalf("stdout = %q", out.String())
	}
}

// TestStdioContext: ending ctx ends a session that would otherwise wait forever.
func TestStdioContext(t *testing.T) {
	t.Parallel()
	d := startServer(t)
	dst := testnet.Upper(t)
	conn, err := d.DialContext(context.Background(), "tcp", dst)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe() // stdin that never ends
	defer pw.Close()
	done := make(chan error, 1)
	go func() { done <- clients.Stdio(ctx, conn, pr, io.Discard) }()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Stdio = %v; want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Stdio did not return after ctx ended")
	}
}

func TestRefusedError(t *testing.T) {
	t.Parallel()
	d := startServer(t)
	_, err := d.DialContext(context.Background(), "tcp", "127.0.0.1:9")
	var re *clients.RefusedError
	if !errors.As(err, &re) || re.Code != wire.CodePolicyDenied || !errors.Is(err, authz.ErrPolicyDenied) {
		t.Fatalf("err = %v; want a policy denial", err)
	}
	if err.Error() != "denied by policy: port 9 is closed to alice@laptop" {
		t.Fatalf("message %q", err)
	}
	other := &clients.RefusedError{Code: wire.CodeDialRefused, Reason: "cannot connect to db:5432"}
	if errors.Is(other, authz.ErrPolicyDenied) || !strings.Contains(other.Error(), "cannot connect to db:5432") {
		t.Fatalf("dial_refused error: %q", other)
	}
	// A policy that could not be evaluated is still a refusal, and says whom to tell.
	broken := &clients.RefusedError{Code: wire.CodePolicyError, Reason: "policy evaluation failed"}
	if !errors.Is(broken, authz.ErrPolicyDenied) || !strings.Contains(broken.Error(), "administrator") {
		t.Fatalf("policy_error: %q", broken)
	}
	self := &clients.RefusedError{Code: wire.CodeSelfDial, Reason: "127.0.0.1:443 is this TP server"}
	if !strings.Contains(self.Error(), "127.0.0.1:443 is this TP server") {
		t.Fatalf("self_dial: %q", self)
	}
	// An agent's refusals inside the end-to-end session were once worded as
	// the server's: "the TP server could not reach the destination: …" for
	// its local service down, "… did not accept the client certificate …;
	// run dlogin" for its own check of the dialer.
	const name = "laptop-ssh.rev.tp.internal"
	for _, tc := range []struct {
		re   clients.RefusedError
		want string
	}{
		{clients.RefusedError{Code: wire.CodeDialFailed, Agent: name,
			Reason: name + " is exposed by alice@laptop, whose agent could not connect to its local service (connection refused); ask alice to check it"},
			name + " is exposed by alice@laptop, whose agent could not connect to its local service (connection refused); ask alice to check it"},
		// An older agent's words name neither the device nor whose it is.
		{clients.RefusedError{Code: wire.CodeDialFailed, Agent: name, Reason: "connection refused"},
			"the device that exposes " + name + " could not connect to its local service: connection refused"},
		{clients.RefusedError{Code: wire.CodeUnauthenticated, Agent: name, Reason: "the certificate is for bob@phone but the TP server announced bob@tablet"},
			"the agent of " + name + " did not accept this device's certificate: the certificate is for bob@phone but the TP server announced bob@tablet"},
	} {
		if got := tc.re.Error(); got != tc.want {
			t.Errorf("the agent's %s reads\n%q; want\n%q", tc.re.Code, got, tc.want)
		}
		if got := tc.re.Error(); strings.Contains(got, "TP server could not") || strings.Contains(got, "run dlogin") {
			t.Errorf("the agent's %s blames the TP server or the certificate: %q", tc.re.Code, got)
		}
	}
}

func TestDialerRejectsBadAddress(t *testing.T) {
	t.Parallel()
	d := &clients.Dialer{Server: "127.0.0.1:1"}
	for _, tt := range []struct{ network, addr string }{{"udp", "h:1"}, {"tcp", "no-port"}, {"tcp", "h:0"}, {"tcp", "h:70000"}} {
		if _, err := d.DialContext(context.Background(), tt.network, tt.addr); err == nil {
			t.Errorf("DialContext(%s, %s) succeeded", tt.network, tt.addr)
		}
	}
}

// TestForwarder: a refused dial fails only that local connection; the listener
// keeps serving and the next connection goes through.
func TestForwarder(t *testing.T) {
	t.Parallel()
	d := startServer(t)
	dst := testnet.Upper(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	fwd := &clients.Forwarder{
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if calls.Add(1) == 1 { // the first connection asks for a denied port
				addr = "127.0.0.1:9"
			}
			return d.DialContext(ctx, network, addr)
		},
		Target: dst,
		Logger: slog.New(slog.DiscardHandler),
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- fwd.Serve(ctx, ln) }()

	roundTrip := func() (string, error) {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		_, _ = io.WriteString(c, "abc")
		_ = c.(*net.TCPConn).CloseWrite()
		b, err := io.ReadAll(c)
		return string(b), err
	}
	if got, _ := roundTrip(); got != "" {
		t.Fatalf("denied forward returned %q", got)
	}
	for range 2 {
		if got, err := roundTrip(); got != "ABC" || err != nil {
			t.Fatalf("forward = %q, %v; want ABC", got, err)
		}
	}
	cancel()
	if err := <-served; !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve = %v", err)
	}
}

// TestStdioUploadOutlastsReply: the far side sends its reply and half-closes
// while standard input is still being uploaded. Bad input: a destination that
// ends its direction first. The upload must arrive whole (when its input ends
// soon after), or the far side must see a reset (when it never ends), never a
// clean end after part of the upload.
func TestStdioUploadOutlastsReply(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		chunks int // of 64 KiB, sent after the reply arrived; 0: input that never ends
	}{{"input ends", 4}, {"input never ends", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			got := make(chan error, 1)
			n := make(chan int64, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					got <- err
					return
				}
				defer c.Close()
				c.Write([]byte("bye"))
				c.(*net.TCPConn).CloseWrite() // the reply is complete; still reading
				c.SetReadDeadline(time.Now().Add(20 * time.Second))
				m, err := io.Copy(io.Discard, c)
				n <- m
				got <- err
			}()
			conn, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			pr, pw := io.Pipe()
			defer pw.Close()
			replied := make(chan struct{})
			var sent atomic.Int64
			go func() {
				// The upload outlasts the reply: it goes on until the reply
				// has reached standard output, then sends chunks more (an
				// event, not a pace, so that a slow machine does not stretch
				// the end of the input beyond Stdio's grace).
				chunk := make([]byte, 64<<10)
				for i := 0; tc.chunks == 0 || i < tc.chunks; {
					if _, err := pw.Write(chunk); err != nil {
						return
					}
					sent.Add(int64(len(chunk)))
					select {
					case <-replied:
						i++
					default:
						time.Sleep(5 * time.Millisecond) // until the reply arrives: the upload is still under way then
					}
				}
				pw.Close()
			}()
			out := &signalWriter{signal: replied}
			if err := clients.Stdio(context.Background(), conn, pr, out); err != nil {
				t.Fatal(err)
			}
			if out.String() != "bye" {
				t.Fatalf("stdout %q", out.String())
			}
			err = <-got
			m := <-n
			switch {
			case tc.chunks > 0 && (err != nil || m != sent.Load()):
				t.Fatalf("the far side read %d of %d bytes, then %v; want the whole upload", m, sent.Load(), err)
			case tc.chunks == 0 && !errors.Is(err, syscall.ECONNRESET):
				t.Fatalf("the far side read %d bytes, then %v; want a reset, not a clean end of a cut upload", m, err)
			}
		})
	}
}

// signalWriter is a bytes.Buffer that closes signal at its first write.
type signalWriter struct {
	bytes.Buffer
	signal chan struct{}
	once   sync.Once
}

func (w *signalWriter) Write(p []byte) (int, error) {
	n, err := w.Buffer.Write(p)
	w.once.Do(func() { close(w.signal) })
	return n, err
}
