package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// TestForwardTLSMux: `tp forward --transport tls` (tunnels as streams of one
// tp-mux/1 connection) and `--no-tls-mux` (a TLS connection each) against a
// real tpd: 8 local connections at once, each 4 MiB of random bytes up, a
// half-close, and the same bytes back from an echo, then a clean end.
func TestForwardTLSMux(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)
	env := srv.login(t, "alice", "laptop")
	echo := testnet.Echo(t)
	for _, mode := range []struct {
		name  string
		flags []string
	}{{"mux", []string{"--transport", "tls"}}, {"no-tls-mux", []string{"--transport", "tls", "--no-tls-mux"}}} {
		t.Run(mode.name, func(t *testing.T) {
			fwd, log := startForward(t, env, echo, mode.flags...)
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					errs <- echoThrough(fwd, 4<<20)
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatalf("%v\ntp forward:\n%s", err, log.String())
				}
			}
		})
	}
}

// echoThrough sends size random bytes through the forwarder at fwd to an
// echo, half-closes, and checks the echo and its clean end.
func echoThrough(fwd string, size int) error {
	c, err := net.Dial("tcp", fwd)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	data := make([]byte, size)
	_, _ = rand.Read(data)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		return err
	}
	if err := <-werr; err != nil {
		return err
	}
	want := sha256.Sum256(data)
	if n != int64(size) || !bytes.Equal(h.Sum(nil), want[:]) {
		return errors.New("the echo through tp forward differs from what was sent")
	}
	return nil
}

// TestForwardTLSMuxAbortIsAbort: bad input, a destination that sends 256 KiB
// and resets. Through `tp forward --transport tls` (a tp-mux stream) the local
// client reads at most those bytes and then a reset, never a clean end; the
// forwarder's connection serves the next tunnel the same way.
func TestForwardTLSMuxAbortIsAbort(t *testing.T) {
	parallel(t)
	srv := startServer(t, testPolicy)
	env := srv.login(t, "alice", "laptop")
	dest := testnet.Serve(t, func(c *net.TCPConn) {
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err != nil { // a reset only once the session is up
			return
		}
		_, _ = c.Write(bytes.Repeat([]byte("d"), 256<<10))
		_ = c.SetLinger(0)
	})
	fwd, log := startForward(t, env, dest, "--transport", "tls")
	for i := range 2 {
		c, err := net.Dial("tcp", fwd)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, c)
		c.Close()
		if err == nil {
			t.Fatalf("tunnel %d: read %d bytes and a clean end: the destination's reset passed for completion\ntp forward:\n%s", i, n, log.String())
		}
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("tunnel %d: read %d bytes, then %v; want a reset\ntp forward:\n%s", i, n, err, log.String())
		}
		if n > 256<<10 {
			t.Fatalf("tunnel %d: read %d bytes; the destination sent %d", i, n, 256<<10)
		}
	}
}
