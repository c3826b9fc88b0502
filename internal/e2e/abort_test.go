package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
)

// tpProc is `tp HOST PORT` (the ProxyCommand) run as a process: its standard
// output is counted, its standard input stays open until the test ends.
type tpProc struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
	read   atomic.Int64
	done   chan error
}

func startTP(t *testing.T, env []string, host string, port int) *tpProc {
	t.Helper()
	p := &tpProc{stderr: &syncBuffer{}, done: make(chan error, 1)}
	p.cmd = exec.Command(binary("tp"), host, strconv.Itoa(port))
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stderr = p.stderr
	stdinR, stdinW, err := os.Pipe() // kept open: like ssh, which never closes its side first here
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdinW.Close() })
	p.cmd.Stdin = stdinR
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stdinR.Close()
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := stdout.Read(buf)
			p.read.Add(int64(n))
			if err != nil {
				break
			}
		}
		p.done <- p.cmd.Wait()
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		if t.Failed() {
			t.Logf("tp stderr:\n%s", p.stderr.String())
		}
	})
	return p
}

// waitRead waits until tp has written at least n bytes to its standard output.
func (p *tpProc) waitRead(t *testing.T, n int64) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for p.read.Load() < n {
		select {
		case err := <-p.done:
			t.Fatalf("tp exited (%v) after %d bytes, before %d:\n%s", err, p.read.Load(), n, p.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("tp wrote %d bytes in 60s; want %d", p.read.Load(), n)
		}
		time.Sleep(5 * time.Millisecond) // polling a counter
	}
}

// wantCutExit waits for tp to exit and checks that it failed and that its last
// words name who cut the session.
func (p *tpProc) wantCutExit(t *testing.T, who string) {
	t.Helper()
	start := time.Now()
	defer func() { t.Logf("tp exited %s after the cut", time.Since(start).Round(time.Millisecond)) }()
	select {
	case err := <-p.done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() == 0 {
			t.Fatalf("tp exited with %v after %d bytes: a cut session passed for a complete one\n%s", err, p.read.Load(), p.stderr.String())
		}
	case <-time.After(100 * time.Second): // a dead QUIC peer is noticed at the idle timeout
		t.Fatalf("tp did not exit within 100s of the cut:\n%s", p.stderr.String())
	}
	if !bytes.Contains([]byte(p.stderr.String()), []byte(who)) {
		t.Fatalf("tp's error does not say %q:\n%s", who, p.stderr.String())
	}
}

// TestProxyCommandReportsDestinationReset: the destination sends 256 KiB and
// resets. Bad input: the destination's RST. `tp HOST PORT` prints what came,
// then exits non-zero naming the destination, over TLS and QUIC.
func TestProxyCommandReportsDestinationReset(t *testing.T) {
	srv := startServer(t, testPolicy)
	env := srv.login(t, "alice", "laptop")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write(bytes.Repeat([]byte("d"), 256<<10))
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	for _, tr := range []string{clients.TransportTLS, clients.TransportQUIC} {
		t.Run(tr, func(t *testing.T) {
			p := startTP(t, append(env, "TP_TRANSPORT="+tr), "127.0.0.1", port)
			p.wantCutExit(t, "cut off by the destination")
			if got := p.read.Load(); got > 256<<10 {
				t.Fatalf("tp wrote %d bytes; the destination sent %d", got, 256<<10)
			}
		})
	}
}

// TestProxyCommandReportsAgentKilled: an exposed service's agent is killed
// (SIGKILL) mid-transfer. Bad input: the agent process dies. `tp HOST PORT` to
// the protected name exits non-zero and says the exposed service's side was cut,
// over TLS and QUIC.
func TestProxyCommandReportsAgentKilled(t *testing.T) {
	dataDir := initTPD(t, fmt.Sprintf(faultPolicy, 1))
	p := startTPD(t, dataDir, "127.0.0.1:0", nil)
	srv := &server{DataDir: dataDir, Addr: p.addr, log: p.log}
	alice := srv.login(t, "alice", "laptop")
	bob := srv.login(t, "bob", "phone")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() { // a service that streams forever
		buf := make([]byte, 32<<10)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				for {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	for _, tr := range []string{clients.TransportTLS, clients.TransportQUIC} {
		t.Run(tr, func(t *testing.T) {
			agent := startAgentProc(t, append(alice, "TP_TRANSPORT="+tr), "stream-"+tr, ln.Addr().String(), "--allow-user", "bob")
			agent.waitRegistered(t)
			tp := startTP(t, append(bob, "TP_TRANSPORT="+tr), "stream-"+tr+".rev.tp.internal", 22)
			tp.waitRead(t, 1<<20)
			if err := agent.cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			tp.wantCutExit(t, "cut off by the exposed service's side")
		})
	}
}

// TestSIGTERMNeverTruncates is the failure-mode test of a stop: 100 checksummed
// transfers through the real tpd, half over TLS and half over QUIC, when tpd gets
// SIGTERM. Those that can finish within the grace period do, with the right
// checksum; the rest end with an error at their client. None ends silently short.
func TestSIGTERMNeverTruncates(t *testing.T) {
	srv := startServer(t, testPolicy)
	env := srv.login(t, "alice", "laptop")
	const chunk = 16 << 10
	payload := func(i int) []byte { // chunk i of a transfer: deterministic content
		return bytes.Repeat([]byte{byte(i)}, chunk)
	}
	want := func(chunks int) [32]byte {
		h := sha256.New()
		for i := range chunks {
			h.Write(payload(i))
		}
		return [32]byte(h.Sum(nil))
	}
	// The destination reads how many 16 KiB chunks to send, then sends them at 40
	// a second: 1 s for a short transfer, 50 s for a long one (more than tpd's
	// 10 s grace).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var n [2]byte
				if _, err := io.ReadFull(c, n[:]); err != nil {
					return
				}
				for i := range int(n[0])<<8 | int(n[1]) {
					if _, err := c.Write(payload(i)); err != nil {
						return
					}
					time.Sleep(25 * time.Millisecond) // pacing: the transfer is in flight at SIGTERM
				}
			}()
		}
	}()

	const short, long = 40, 2000
	type result struct {
		chunks   int
		complete bool
		err      error
	}
	results := make(chan result, 100)
	started := make(chan struct{}, 100)
	var wg sync.WaitGroup
	for i := range 100 {
		chunks := short
		if i%2 == 1 {
			chunks = long
		}
		tr := clients.TransportTLS
		if i%4 >= 2 {
			tr = clients.TransportQUIC
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			d, err := clientFor(t, env).Dialer()
			if err != nil {
				results <- result{chunks: chunks, err: err}
				started <- struct{}{}
				return
			}
			d.Transport = tr
			defer d.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
			cancel()
			if err != nil {
				results <- result{chunks: chunks, err: err}
				started <- struct{}{}
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(90 * time.Second))
			c.Write([]byte{byte(chunks >> 8), byte(chunks)})
			h := sha256.New()
			first := make([]byte, chunk)
			_, err = io.ReadFull(c, first)
			h.Write(first)
			started <- struct{}{}
			if err == nil {
				_, err = io.Copy(h, c)
			}
			results <- result{chunks: chunks, complete: err == nil && [32]byte(h.Sum(nil)) == want(chunks), err: err}
		}()
	}
	for range 100 {
		select {
		case <-started:
		case <-time.After(60 * time.Second):
			t.Fatal("the transfers did not all start within 60s")
		}
	}
	stopTPD(t, srv)
	wg.Wait()
	close(results)
	var shortOK, longCut int
	for r := range results {
		switch {
		case r.err == nil && !r.complete:
			t.Errorf("a transfer of %d chunks ended cleanly with the wrong checksum: silently truncated", r.chunks)
		case r.chunks == short && !r.complete:
			t.Errorf("a short transfer failed although it fits the grace period: %v", r.err)
		case r.chunks == short:
			shortOK++
		case r.err != nil:
			var ce *clients.CutError
			if !errors.As(r.err, &ce) {
				t.Errorf("a long transfer failed with %v (%T); want a *clients.CutError", r.err, r.err)
			}
			longCut++
		default:
			t.Errorf("a long transfer completed although it outlasts the grace period")
		}
	}
	t.Logf("SIGTERM during 100 transfers: %d short ones completed with the right checksum, %d long ones cut with an error, 0 silent truncations", shortOK, longCut)
}
