package conformance

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/clients"
	"github.com/tp-proxy/tp/internal/testkit/testpki"
)

// TestAgentCorpus plays the server of every agent case against TP's real agent
// (clients.Agent, `tp expose`), once per transport the case names: it checks
// the agent's listen hello, answers it, then sends control frames and opens
// sessions, and checks what the agent does. A failure names the case id, the
// transport, the step and what differed.
func TestAgentCorpus(t *testing.T) {
	files := loadCorpus(t)
	ca := testpki.New(t)
	srv := ca.ServerCert(t, "127.0.0.1")
	dev := ca.ClientCert(t, "alice@laptop", testpki.LeafOptions{})
	n := 0
	for _, file := range files {
		for _, c := range file.AgentCases {
			for _, tr := range Transports(c.Transport) {
				n++
				t.Run(c.ID+"/"+tr, func(t *testing.T) {
					t.Parallel()
					r := &agentRun{t: t, c: c, transport: tr, requests: make(chan *request, 16), sessions: map[string]*request{}}
					r.listen(ca, srv)
					agent := &clients.Agent{
						Dialer: &clients.Dialer{Server: r.addr, Transport: tr, Timeout: readTimeout,
							TLSConfig: &tls.Config{RootCAs: ca.Pool, Certificates: []tls.Certificate{dev}}},
						Exposed: []clients.Exposed{{Name: "conf-game", Local: tcpEcho(t).String(), PublicPort: 27015}},
						Logger:  slog.New(slog.DiscardHandler),
					}
					ctx, cancel := context.WithCancel(context.Background())
					r.exited = make(chan error, 1)
					go func() { r.exited <- agent.Run(ctx) }()
					defer func() {
						cancel()
						r.closeAll() // the agent need not wait for an answer to its unregister
						select {
						case <-r.exited:
						case <-time.After(readTimeout):
							t.Errorf("case %s [%s]: the agent did not stop within %s of its context's end", c.ID, tr, readTimeout)
						}
					}()
					r.steps()
				})
			}
		}
	}
	if n == 0 {
		t.Fatal("the corpus has no agent cases")
	}
}

// agentRun is one agent case on one transport: the played server's side.
type agentRun struct {
	t         *testing.T
	c         AgentCase
	transport string
	addr      string
	requests  chan *request // every stream or connection that sent a hello
	ctl       *request      // the current control stream
	sessions  map[string]*request
	exited    chan error
	step      int
	wg        sync.WaitGroup
	mu        sync.Mutex
	closers   []io.Closer // every connection the played server accepted
}

func (r *agentRun) track(c io.Closer) {
	r.mu.Lock()
	r.closers = append(r.closers, c)
	r.mu.Unlock()
}

func (r *agentRun) closeAll() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.closers {
		_ = c.Close()
	}
}

// request is a stream (QUIC) or connection (TLS) the agent opened, with its hello.
type request struct {
	hello []byte
	rw    interface {
		io.ReadWriter
		SetDeadline(time.Time) error
	}
	br    *bufio.Reader
	conn  *quic.Conn // QUIC: the connection, where sessions are opened
	raw   *endConn   // TLS: the TCP connection under it
	close func()     // TLS close_notify, QUIC FIN
}

func (r *agentRun) failf(format string, args ...any) {
	r.t.Helper()
	r.t.Fatalf("case %s [%s] step %d: %s", r.c.ID, r.transport, r.step, fmt.Sprintf(format, args...))
}

// listen starts the played server and its accept loops.
func (r *agentRun) listen(ca *testpki.CA, cert tls.Certificate) {
	t := r.t
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    ca.Pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		NextProtos:   []string{"tp/1"},
		MinVersion:   tls.VersionTLS13,
	}
	ctx, cancel := context.WithCancel(context.Background())
	if r.transport == "tls" {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		r.addr = ln.Addr().String()
		t.Cleanup(func() {
			cancel()
			ln.Close()
			r.closeAll()
			r.wg.Wait()
		})
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				r.track(c)
				raw := &endConn{Conn: c}
				tc := tls.Server(raw, cfg)
				r.wg.Add(1)
				go func() {
					defer r.wg.Done()
					r.read(&request{rw: tc, raw: raw, close: func() { _ = tc.CloseWrite() }})
				}()
			}
		}()
		return
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", cfg, &quic.Config{EnableDatagrams: true})
	if err != nil {
		t.Fatal(err)
	}
	r.addr = ln.Addr().String()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		r.closeAll()
		r.wg.Wait()
	})
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			conn, err := ln.Accept(ctx)
			if err != nil {
				return
			}
			r.track(closeQUIC{conn})
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				defer conn.CloseWithError(0, "")
				for {
					str, err := conn.AcceptStream(ctx)
					if err != nil {
						return
					}
					r.wg.Add(1)
					go func() {
						defer r.wg.Done()
						r.read(&request{rw: str, conn: conn, close: func() { _ = str.Close() }})
					}()
				}
			}()
		}
	}()
}

// closeQUIC closes a QUIC connection without an error code.
type closeQUIC struct{ *quic.Conn }

func (c closeQUIC) Close() error { return c.CloseWithError(0, "") }

// read reads a request's hello and hands it to the case; a connection that
// sends none (a spare one) is dropped when the case ends.
func (r *agentRun) read(q *request) {
	q.br = bufio.NewReader(q.rw)
	_ = q.rw.SetDeadline(time.Now().Add(readTimeout))
	var hdr [2]byte
	if _, err := io.ReadFull(q.br, hdr[:]); err != nil {
		return
	}
	q.hello = make([]byte, binary.BigEndian.Uint16(hdr[:]))
	if _, err := io.ReadFull(q.br, q.hello); err != nil {
		return
	}
	_ = q.rw.SetDeadline(time.Time{})
	r.requests <- q
}

func (r *agentRun) next(what string) *request {
	r.t.Helper()
	select {
	case q := <-r.requests:
		return q
	case err := <-r.exited:
		r.exited <- err // for the deferred wait
		r.failf("expected %s; the agent stopped: %v", what, err)
	case <-time.After(readTimeout):
		r.failf("expected %s; none came within %s", what, readTimeout)
	}
	return nil
}

// expectListen waits for a listen hello and checks it against the case.
func (r *agentRun) expectListen() *request {
	r.t.Helper()
	q := r.next("the agent's listen hello")
	if err := r.c.ExpectListen.Check(q.hello, Vars{}); err != nil {
		r.failf("the agent's listen hello differs:\n  %v", err)
	}
	return q
}

func (r *agentRun) write(q *request, b []byte) {
	r.t.Helper()
	_ = q.rw.SetDeadline(time.Now().Add(readTimeout))
	if _, err := q.rw.Write(b); err != nil {
		r.failf("write: %v", err)
	}
}

func (r *agentRun) frame(obj json.RawMessage) []byte {
	r.t.Helper()
	body, err := Vars{}.FrameBody(obj)
	if err != nil {
		r.failf("%v", err)
	}
	return Frame(body)
}

func (r *agentRun) steps() {
	r.ctl = r.expectListen()
	r.write(r.ctl, r.frame(r.c.Reply))
	for i, s := range r.c.Steps {
		r.step = i + 1
		if s.Transport != "" && s.Transport != r.transport {
			continue
		}
		r.do(s)
	}
}

func (r *agentRun) do(s AgentStep) {
	r.t.Helper()
	on := s.On
	if on == "" {
		on = "session"
	}
	sess := r.sessions[on]
	needSession := s.SendRaw != nil || s.CloseWrite || s.ExpectRaw != nil || s.ExpectEnd != ""
	if needSession && sess == nil {
		r.failf("no session %q was opened", on)
	}
	switch {
	case s.Control != nil:
		r.write(r.ctl, r.frame(s.Control))
	case s.OpenSession != nil:
		r.sessions[on] = r.openSession(s.OpenSession)
	case s.SendRaw != nil:
		b, _ := Hex(*s.SendRaw)
		r.write(sess, b)
	case s.CloseWrite:
		sess.close()
	case s.ExpectRaw != nil:
		want, _ := Hex(*s.ExpectRaw)
		got := make([]byte, len(want))
		_ = sess.rw.SetDeadline(time.Now().Add(readTimeout))
		if n, err := io.ReadFull(sess.br, got); err != nil {
			r.failf("expected bytes %x on %s, got %x and then %v", want, on, got[:n], err)
		}
		if !bytes.Equal(got, want) {
			r.failf("expected bytes %x on %s, got %x", want, on, got)
		}
	case s.ExpectEnd != "":
		_ = sess.rw.SetDeadline(time.Now().Add(readTimeout))
		var b [64]byte
		n, err := sess.br.Read(b[:])
		if n > 0 {
			r.failf("expected the end of %s, got bytes %x", on, b[:n])
		}
		kind, code := classifyEnd(sess.raw, err)
		switch {
		case kind == "timeout":
			r.failf("expected the end of %s (%s); nothing came within %s", on, s.ExpectEnd, readTimeout)
		case s.ExpectEnd != "closed" && kind != s.ExpectEnd:
			r.failf("expected %s to end %s, it ended %s (%v)", on, s.ExpectEnd, kind, err)
		case s.QUICCode != nil && r.transport == "quic" && (code == nil || *code != *s.QUICCode):
			r.failf("expected RESET_STREAM code %#x on %s, got %s", *s.QUICCode, on, describeCode(code, err))
		}
	case s.ExpectReconnect:
		r.ctl = r.expectListen()
	case s.ExpectExit:
		select {
		case err := <-r.exited:
			r.exited <- err // for the deferred wait
		case q := <-r.requests:
			r.failf("expected the agent to stop; it sent another hello: %s", q.hello)
		case <-time.After(readTimeout):
			r.failf("expected the agent to stop; it still runs after %s", readTimeout)
		}
	}
}

// openSession opens a session to the agent with header hdr: over QUIC a
// server-initiated stream that starts with the header; over TLS an
// announcement on the control connection, then the agent's accept connection,
// whose hello must name the session and which is answered ok.
func (r *agentRun) openSession(hdr json.RawMessage) *request {
	r.t.Helper()
	frame := r.frame(hdr)
	if r.transport == "quic" {
		ctx, cancel := context.WithTimeout(context.Background(), readTimeout)
		defer cancel()
		str, err := r.ctl.conn.OpenStreamSync(ctx)
		if err != nil {
			r.failf("opening a session stream: %v", err)
		}
		q := &request{rw: str, br: bufio.NewReader(str), conn: r.ctl.conn, close: func() { _ = str.Close() }}
		r.write(q, frame)
		return q
	}
	r.write(r.ctl, frame)
	var h struct {
		Session string `json:"session"`
	}
	_ = json.Unmarshal(frame[2:], &h)
	q := r.next("the agent's accept")
	want := FrameExpect{Match: json.RawMessage(fmt.Sprintf(`{"v":1,"op":"accept","session":%q}`, h.Session)), Exact: true}
	if err := want.Check(q.hello, Vars{}); err != nil {
		r.failf("the agent's accept hello differs:\n  %v", err)
	}
	r.write(q, Frame([]byte(`{"v":1,"ok":true}`)))
	return q
}

// classifyEnd says how a stream ended: "clean" (close_notify, FIN), "abort"
// (with the QUIC stream code when there is one) or "timeout". raw is the TCP
// connection under a TLS stream, nil for QUIC.
func classifyEnd(raw *endConn, err error) (kind string, code *uint64) {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout", nil
	}
	if raw != nil {
		if errors.Is(err, io.EOF) && !raw.ended.Load() {
			return "clean", nil
		}
		return "abort", nil
	}
	if errors.Is(err, io.EOF) {
		return "clean", nil
	}
	var se *quic.StreamError
	if errors.As(err, &se) {
		c := uint64(se.ErrorCode)
		return "abort", &c
	}
	return "abort", nil
}
