package conformance

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// TestClientCorpus plays the server of every client case against TP's real
// client (clients.Dialer), once per transport the case names: it checks the
// client's hello against the corpus, answers with the case's frame, and checks
// how the dial ends. A failure names the case id, the transport and what differed.
func TestClientCorpus(t *testing.T) {
	files := loadCorpus(t)
	ca := testpki.New(t)
	srv := ca.ServerCert(t, "127.0.0.1")
	dev := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	n := 0
	for _, file := range files {
		for _, c := range file.ClientCases {
			for _, tr := range Transports(c.Transport) {
				n++
				t.Run(c.ID+"/"+tr, func(t *testing.T) {
					t.Parallel()
					p := &playedServer{t: t, c: c, transport: tr, ca: ca, cert: srv, hellos: make(chan []byte, 1)}
					p.start()
					d := &clients.Dialer{
						Server:    p.addr,
						Transport: tr,
						Timeout:   readTimeout,
						TLSConfig: &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{dev}},
					}
					defer d.Close()
					p.check(d)
				})
			}
		}
	}
	if n == 0 {
		t.Fatal("the corpus has no client cases")
	}
}

// playedServer is the server side of one client case: a loopback TLS or QUIC
// listener that answers the first hello it reads with the case's reply.
type playedServer struct {
	t         *testing.T
	c         ClientCase
	transport string
	ca        *testpki.CA
	cert      tls.Certificate
	addr      string
	hellos    chan []byte // the client's hello body, or nil when none could be read
	once      sync.Once
	wg        sync.WaitGroup
}

func (p *playedServer) failf(format string, args ...any) {
	p.t.Helper()
	p.t.Fatalf("case %s [%s]: %s", p.c.ID, p.transport, fmt.Sprintf(format, args...))
}

func (p *playedServer) tlsConfig() *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{p.cert},
		ClientCAs:    p.ca.Pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		NextProtos:   []string{"tp/1"},
		MinVersion:   tls.VersionTLS13,
	}
}

func (p *playedServer) start() {
	t := p.t
	if p.transport == "tls" {
		ln, err := tls.Listen("tcp", "127.0.0.1:0", p.tlsConfig())
		if err != nil {
			t.Fatal(err)
		}
		p.addr = ln.Addr().String()
		var mu sync.Mutex
		var conns []net.Conn
		t.Cleanup(func() {
			ln.Close()
			mu.Lock()
			for _, c := range conns {
				c.Close()
			}
			mu.Unlock()
			p.wg.Wait()
		})
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
				p.wg.Add(1)
				go func() {
					defer p.wg.Done()
					defer c.Close()
					tc := c.(*tls.Conn)
					p.serve(c, ends{
						clean: func() { _ = tc.CloseWrite() },
						abort: func() { // a TCP reset, no close_notify
							_ = tc.NetConn().(*net.TCPConn).SetLinger(0)
							_ = tc.NetConn().Close()
						},
						truncate: func() { _ = tc.NetConn().Close() }, // a TCP FIN, no close_notify
					})
				}()
			}
		}()
		return
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", p.tlsConfig(), &quic.Config{EnableDatagrams: true})
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		ln.Close()
		p.wg.Wait()
	})
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			conn, err := ln.Accept(ctx)
			if err != nil {
				return
			}
			p.wg.Add(1)
			if p.c.After == "echo" { // DATAGRAM frames too, flow id and all
				p.wg.Add(1)
				go func() {
					defer p.wg.Done()
					for {
						b, err := conn.ReceiveDatagram(ctx)
						if err != nil {
							return
						}
						_ = conn.SendDatagram(b)
					}
				}()
			}
			go func() {
				defer p.wg.Done()
				defer conn.CloseWithError(0, "")
				str, err := conn.AcceptStream(ctx)
				if err != nil {
					return
				}
				p.serve(str, ends{
					clean: func() { _ = str.Close() },
					abort: func() { str.CancelWrite(7); str.CancelRead(7) }, // peer_reset
				})
				<-ctx.Done() // the connection lives until the case ends
			}()
		}
	}()
}

// serve answers one request: it reads the client's hello, sends the reply and
// then echoes or ends the stream cleanly.
func (p *playedServer) serve(c interface {
	io.ReadWriter
	SetDeadline(time.Time) error
}, end ends) {
	_ = c.SetDeadline(time.Now().Add(readTimeout))
	var hdr [2]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return // a spare connection that never carried a request
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[:]))
	_, err := io.ReadFull(c, body)
	first := false
	p.once.Do(func() { first = true })
	if !first {
		return
	}
	if err != nil {
		p.hellos <- nil
		return
	}
	p.hellos <- body
	reply, rerr := p.reply()
	if rerr != nil {
		return
	}
	if _, err := c.Write(reply); err != nil {
		return
	}
	switch p.c.After {
	case "echo":
		_, _ = io.Copy(c, c)
		end.clean()
	case "close":
		end.clean()
	case "abort", "truncate":
		// Wait for the client's first byte, sent after it read the answer: a
		// QUIC reset may discard data written before it.
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			return
		}
	}
	switch p.c.After {
	case "abort":
		end.abort()
	case "truncate":
		if end.truncate == nil {
			p.t.Errorf("case %s [%s]: after \"truncate\" is TLS only", p.c.ID, p.transport)
			return
		}
		end.truncate()
	}
}

// ends are the ways a played server ends a stream (ClientCase.After).
type ends struct {
	clean, abort, truncate func()
}

// reply is the case's answer on the wire.
func (p *playedServer) reply() ([]byte, error) {
	switch {
	case p.c.Reply != nil:
		body, err := Vars{}.FrameBody(p.c.Reply)
		return Frame(body), err
	case p.c.ReplyBody != nil:
		return Frame([]byte(*p.c.ReplyBody)), nil
	default:
		return Hex(*p.c.ReplyRaw)
	}
}

// check dials through d and compares what happens with the case.
func (p *playedServer) check(d *clients.Dialer) {
	p.t.Helper()
	req := p.c.Request
	ctx, cancel := context.WithTimeout(context.Background(), readTimeout)
	defer cancel()
	conn, err := d.DialContext(ctx, req.Net, net.JoinHostPort(req.Host, strconv.Itoa(req.Port)))
	if conn != nil {
		defer conn.Close()
	}
	select {
	case body := <-p.hellos:
		if body == nil {
			p.failf("the client's hello was cut short")
		}
		if err := p.c.ExpectRequest.Check(body, Vars{}); err != nil {
			p.failf("the client's hello differs:\n  %v", err)
		}
	case <-time.After(readTimeout):
		p.failf("the client sent no hello within %s (dial: %v)", readTimeout, err)
	}
	switch p.c.Outcome {
	case "ok":
		if err != nil {
			p.failf("expected the dial to succeed, it failed: %v", err)
		}
		_ = conn.SetDeadline(time.Now().Add(readTimeout))
		if _, err := conn.Write([]byte("ping")); err != nil {
			p.failf("writing after ok: %v", err)
		}
		got := make([]byte, 4)
		if _, err := io.ReadFull(conn, got); err != nil || !bytes.Equal(got, []byte("ping")) {
			p.failf("expected the bytes echoed after ok, got %q (%v)", got, err)
		}
	case "cut":
		if err != nil {
			p.failf("expected the dial to succeed and the session to be cut; the dial failed: %v", err)
		}
		_ = conn.SetDeadline(time.Now().Add(readTimeout))
		if _, err := conn.Write([]byte("x")); err != nil {
			p.failf("writing after ok: %v", err)
		}
		n, rerr := conn.Read(make([]byte, 16))
		if rerr == nil || rerr == io.EOF {
			p.failf("expected the cut to be reported as an error; the read returned %d bytes and %v", n, rerr)
		}
		if ne, ok := rerr.(net.Error); ok && ne.Timeout() {
			p.failf("expected the cut to be reported as an error; the read timed out: %v", rerr)
		}
		for _, m := range p.c.Mentions {
			if !strings.Contains(rerr.Error(), m) {
				p.failf("the client's error does not mention %q:\n  %v", m, rerr)
			}
		}
	case "error":
		if err == nil {
			p.failf("expected the dial to fail; it succeeded")
		}
		for _, m := range p.c.Mentions {
			if !strings.Contains(err.Error(), m) {
				p.failf("the client's error does not mention %q:\n  %v", m, err)
			}
		}
	}
}
