package proxy_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testlog"
	"github.com/tp-proxy/tp/internal/testkit/testnet"
	"github.com/tp-proxy/tp/proxy"
)

// Sessions over QUIC that end cleanly are logged by the server as closed,
// every time: the client uploads and ends its direction, reads the reply to
// its end, then closes its Dialer and exits, as `tp HOST PORT` under ssh does.
// Two orders: the destination answers after the upload's end; or it answers
// and ends first, and the client's end follows at once (ssh closes tp's input
// when it sees the end). Before, the server logged about 1 in 30 such sessions
// as cut by the client, and passed a reset on to the destination: the
// Dialer's close (CONNECTION_CLOSE) overtook the client's FIN that quic-go
// had queued but not sent, or the server took the client's close, coming
// after both directions had ended, for a client gone mid-session.
func TestQUICCleanEndLoggedClean(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		destFirst bool
	}{
		{"the destination answers the upload's end", false},
		{"the destination ends first", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var logs testlog.Buffer
			q := newQUICEnv(t, func(c *proxy.Config) { c.Logger = slog.New(slog.NewTextHandler(&logs, nil)) }, proxy.QUICOptions{})
			dest := testnet.Serve(t, func(c *net.TCPConn) {
				if tc.destFirst {
					_, _ = c.Write([]byte("bye"))
					_ = c.CloseWrite()
				}
				_, _ = io.Copy(io.Discard, c)
				if !tc.destFirst {
					_, _ = c.Write([]byte("bye"))
				}
			})
			const sessions = 50
			for i := range sessions {
				d := q.dialer()
				d.Transport = clients.TransportQUIC
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				c, err := d.DialContext(ctx, "tcp", dest)
				if err != nil {
					cancel()
					t.Fatal(err)
				}
				// The upload ends after its bytes, or (the destination first)
				// once the reply is in, as ssh's does.
				in, feed := io.Pipe()
				go func() {
					_, _ = feed.Write(make([]byte, 16<<10))
					if !tc.destFirst {
						_ = feed.Close()
					}
				}()
				out := &endOnReply{want: "bye", end: func() { _ = feed.Close() }}
				err = clients.Stdio(ctx, c, in, out)
				cancel()
				if err != nil || out.got.String() != "bye" {
					t.Fatalf("session %d: %q, %v; want the reply and a clean end", i, out.got.String(), err)
				}
				d.Close()
			}
			line := regexp.MustCompile(`msg="proxy session".* end=("[^"]*"|\S+)`)
			deadline := time.Now().Add(20 * time.Second)
			for len(line.FindAllString(logs.String(), -1)) < sessions {
				if time.Now().After(deadline) {
					t.Fatalf("the server logged %d of the %d sessions within 20s", len(line.FindAllString(logs.String(), -1)), sessions)
				}
				time.Sleep(10 * time.Millisecond) // polling, bounded by the deadline
			}
			for _, m := range line.FindAllStringSubmatch(logs.String(), -1) {
				if m[1] != "closed" {
					t.Errorf("a session that ended cleanly was logged with end=%s", m[1])
				}
			}
		})
	}
}

// A Dialer closed after its session ended at the client, while the server has
// yet to pass the upload's last bytes and FIN on (its writes to the
// destination wait until the Dialer is closing): Close says "bye" and waits
// for the server's answer, which comes once the session has ended at the
// server, so the destination reads every byte and a clean end. Before, Close
// sent CONNECTION_CLOSE once the upload was acknowledged, quic-go at the
// server discarded what it had not read, and the destination saw a cut after
// part of the upload. The bad input is the order: the server can pass the
// upload on only once the Dialer is closing.
func TestQUICCloseWaitsForTheServerToRead(t *testing.T) {
	t.Parallel()
	const size = 64 << 10 // within a stream's first window: the client's write completes
	release := make(chan struct{})
	var releaseOnce sync.Once
	q := newQUICEnv(t, func(c *proxy.Config) {
		c.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			conn, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &heldWrites{Conn: conn, release: release}, nil
		}
	}, proxy.QUICOptions{})
	proxy.OnBye(q.srv, func() { releaseOnce.Do(func() { close(release) }) })
	got := make(chan error, 1)
	dest := testnet.Serve(t, func(c *net.TCPConn) {
		_, _ = c.Write([]byte("bye"))
		_ = c.CloseWrite()
		_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
		n, err := io.Copy(io.Discard, c)
		if err == nil && n != size {
			err = fmt.Errorf("read %d bytes and a clean end; want %d", n, size)
		}
		got <- err
	})
	d := q.dialer()
	d.Transport = clients.TransportQUIC
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", dest)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := io.ReadAll(c); err != nil || string(b) != "bye" {
		t.Fatalf("the destination's answer: %q, %v", b, err)
	}
	if _, err := c.Write(make([]byte, size)); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil { // both directions ended: the session is over here
		t.Fatal(err)
	}
	d.Close()
	releaseOnce.Do(func() { close(release) }) // no bye came: let the server go on with what is left
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("the destination, once the Dialer had closed: %v; want all %d bytes and a clean end", err, size)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the destination did not see the upload end within 30s")
	}
}

// heldWrites is a destination connection whose writes wait for release.
type heldWrites struct {
	net.Conn
	release chan struct{}
}

func (h *heldWrites) Write(p []byte) (int, error) {
	<-h.release
	return h.Conn.Write(p)
}

// Unwrap lets an abort (wire.Abort) reset the socket, as for any destination.
func (h *heldWrites) Unwrap() net.Conn { return h.Conn }

// CloseWrite passes the half-close on (the relay ends the destination's
// direction with it).
func (h *heldWrites) CloseWrite() error {
	<-h.release
	return h.Conn.(*net.TCPConn).CloseWrite()
}

// endOnReply collects what it is given and calls end once it holds want.
type endOnReply struct {
	got  strings.Builder
	want string
	end  func()
	once sync.Once
}

func (w *endOnReply) Write(p []byte) (int, error) {
	w.got.Write(p)
	if w.got.String() == w.want {
		w.once.Do(w.end)
	}
	return len(p), nil
}
