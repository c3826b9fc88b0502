package conformance

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/quicvarint"
)

// TestServerCorpus runs every server case of docs/conformance against a real
// tpd, once per transport the case names. A failure names the case id, the
// transport, the step and what differed.
func TestServerCorpus(t *testing.T) {
	files := loadCorpus(t)
	f := startFixture(t)
	var uniq atomic.Int64
	for _, file := range files {
		for _, c := range file.Cases {
			for _, tr := range Transports(c.Transport) {
				t.Run(c.ID+"/"+tr, func(t *testing.T) {
					t.Parallel()
					vars := maps.Clone(f.vars)
					vars["uniq"] = fmt.Sprintf("%c%d", tr[0], uniq.Add(1))
					r := &run{t: t, f: f, c: c, transport: tr, vars: vars,
						streams: map[string]*stream{}, conns: map[string]*quicConn{}}
					defer r.close()
					r.steps()
				})
			}
		}
	}
}

// run is one case on one transport.
type run struct {
	t         *testing.T
	f         *fixture
	c         Case
	transport string
	vars      Vars
	streams   map[string]*stream
	conns     map[string]*quicConn
	step      int
}

// stream is a named stream of a case: a TLS connection or a QUIC stream.
type stream struct {
	tls *tls.Conn
	raw *endConn  // under tls: tells a clean close_notify from a cut
	qc  *quicConn // QUIC
	qs  *quic.Stream
	uni *quic.SendStream
	br  *bufio.Reader
	err error // the connection failed before the stream was usable
	// caps receives the stream's datagrams once a step expects one (capsulePump).
	caps chan capsuleEvent
	// resend repeats the stream's last send while a datagram is awaited: UDP
	// and DATAGRAM frames may lose one, as the corpus README allows.
	resend func() error
}

type capsuleEvent struct {
	payload []byte
	err     error
}

// quicConn is a QUIC connection of a case, shared by the streams named with it.
type quicConn struct {
	conn *quic.Conn
	err  error // dial failed
	mu   sync.Mutex
	dgs  map[uint64]chan []byte // received DATAGRAM frames by flow id
}

func (r *run) failf(format string, args ...any) {
	r.t.Helper()
	s := r.c.Steps[r.step]
	on := s.On
	if on == "" {
		on = "main"
	}
	r.t.Fatalf("case %s [%s] step %d (stream %s): %s", r.c.ID, r.transport, r.step+1, on, fmt.Sprintf(format, args...))
}

func (r *run) steps() {
	for i, s := range r.c.Steps {
		r.step = i
		if s.Transport != "" && s.Transport != r.transport {
			continue
		}
		r.do(s)
	}
}

func (r *run) do(s Step) {
	r.t.Helper()
	st := r.stream(s)
	if st.qs != nil {
		r.vars["quarter_id"] = uint64(st.qs.StreamID()) / 4
	}
	switch {
	case s.Send != nil:
		body, err := r.vars.FrameBody(s.Send)
		if err != nil {
			r.failf("send: %v", err)
		}
		r.write(st, Frame(body))
	case s.SendBody != nil:
		body, err := r.vars.Subst(*s.SendBody)
		if err != nil {
			r.failf("send_body: %v", err)
		}
		r.write(st, Frame([]byte(body)))
	case s.SendRaw != nil:
		b, _ := Hex(*s.SendRaw)
		r.write(st, b)
		st.resend = func() error { _, err := st.writer().Write(b); return err }
	case s.SendUni != nil:
		b, _ := Hex(*s.SendUni)
		r.write(st, b)
	case s.SendDatagram != nil:
		b, _ := Hex(*s.SendDatagram)
		if st.qs == nil {
			r.failf("send_datagram needs a QUIC stream")
		}
		frame := append(quicvarint.Append(nil, uint64(st.qs.StreamID())/4), b...)
		if err := st.qc.conn.SendDatagram(frame); err != nil {
			r.failf("send_datagram: %v", err)
		}
		st.resend = func() error { return st.qc.conn.SendDatagram(frame) }
	case s.CloseWrite:
		r.usable(st, "close_write")
		var err error
		switch {
		case st.tls != nil:
			err = st.tls.CloseWrite()
		case st.uni != nil:
			err = st.uni.Close()
		default:
			err = st.qs.Close()
		}
		if err != nil {
			r.failf("close_write: %v", err)
		}
	case s.Expect != nil:
		body := r.readFrame(st)
		if err := s.Expect.Check(body, r.vars); err != nil {
			r.failf("server frame differs:\n  %v", err)
		}
	case s.ExpectRaw != nil:
		want, _ := Hex(*s.ExpectRaw)
		r.usable(st, "expect_raw")
		got := make([]byte, len(want))
		r.deadline(st)
		if n, err := io.ReadFull(st.br, got); err != nil {
			r.failf("expected bytes %x, got %x and then %v", want, got[:n], err)
		}
		if !bytes.Equal(got, want) {
			r.failf("expected bytes %x, got %x", want, got)
		}
	case s.ExpectDatagram != nil:
		want, _ := Hex(*s.ExpectDatagram)
		got := r.datagram(st)
		if !bytes.Equal(got, want) {
			r.failf("expected datagram %x, got %x", want, got)
		}
	case s.ExpectEnd != "":
		r.expectEnd(st, s)
	case s.ExpectAlert != nil:
		r.expectAlert(st, *s.ExpectAlert)
	case s.ExpectStopSending != nil:
		r.expectStopSending(st, *s.ExpectStopSending)
	}
}

// usable fails the step when the stream's connection failed before it could
// carry what the step does.
func (r *run) usable(st *stream, what string) {
	r.t.Helper()
	if st.err != nil {
		r.failf("%s: the connection failed: %v", what, st.err)
	}
	if st.br == nil && st.uni == nil {
		r.failf("%s: the stream is not readable", what)
	}
}

// stream returns the step's stream, opening it at its first use.
func (r *run) stream(s Step) *stream {
	r.t.Helper()
	name := s.On
	if name == "" {
		name = "main"
	}
	if st := r.streams[name]; st != nil {
		return st
	}
	as := s.As
	if as == "" {
		as = "alice"
	}
	cert, ok := r.f.certs[as]
	if !ok {
		r.failf("unknown identity %q", as)
	}
	cfg := &tls.Config{
		RootCAs:    r.f.roots,
		ServerName: "localhost",
		NextProtos: []string{"tp/1"},
		MinVersion: tls.VersionTLS13,
	}
	if cert != nil {
		// Sent whatever CAs the server asks for: "otherca" must reach the server.
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	st := &stream{}
	r.streams[name] = st
	ctx, cancel := context.WithTimeout(context.Background(), readTimeout)
	defer cancel()
	if r.transport == "tls" {
		if s.AcceptStream != "" || s.SendUni != nil {
			r.failf("accept_stream and send_uni are QUIC only")
		}
		var d net.Dialer
		raw, err := d.DialContext(ctx, "tcp", r.f.addr)
		if err != nil {
			r.failf("connect: %v", err)
		}
		st.raw = &endConn{Conn: raw}
		st.tls = tls.Client(st.raw, cfg)
		st.br = bufio.NewReader(st.tls)
		if err := st.tls.HandshakeContext(ctx); err != nil {
			st.err = err
		}
		return st
	}

	if s.AcceptStream != "" {
		from := r.streams[s.AcceptStream]
		if from == nil || from.qc == nil || from.qc.conn == nil {
			r.failf("accept_stream: no QUIC stream %q", s.AcceptStream)
		}
		qs, err := from.qc.conn.AcceptStream(ctx)
		if err != nil {
			r.failf("accept_stream on the connection of %q: %v", s.AcceptStream, err)
		}
		st.qc, st.qs, st.br = from.qc, qs, bufio.NewReader(qs)
		return st
	}
	connName := s.Conn
	if connName == "" {
		connName = as
	}
	qc := r.conns[connName]
	if qc == nil {
		qc = &quicConn{dgs: map[uint64]chan []byte{}}
		r.conns[connName] = qc
		qc.conn, qc.err = quic.DialAddr(ctx, r.f.addr, cfg, &quic.Config{
			EnableDatagrams:      s.QUICDatagrams == nil || *s.QUICDatagrams,
			HandshakeIdleTimeout: readTimeout,
			MaxIdleTimeout:       30 * time.Second,
		})
		if qc.err == nil {
			go qc.pump()
		}
	}
	st.qc = qc
	if qc.err != nil {
		st.err = qc.err
		return st
	}
	var err error
	if s.SendUni != nil {
		st.uni, err = qc.conn.OpenUniStreamSync(ctx)
	} else {
		st.qs, err = qc.conn.OpenStreamSync(ctx)
		if err == nil {
			st.br = bufio.NewReader(st.qs)
		}
	}
	if err != nil {
		st.err = err
	}
	return st
}

// pump delivers the connection's DATAGRAM frames by flow id.
func (qc *quicConn) pump() {
	for {
		b, err := qc.conn.ReceiveDatagram(context.Background())
		if err != nil {
			return
		}
		id, n, err := quicvarint.Parse(b)
		if err != nil {
			continue
		}
		select {
		case qc.flow(id) <- b[n:]:
		default: // nobody reads this flow: dropped, as a full queue would
		}
	}
}

func (qc *quicConn) flow(id uint64) chan []byte {
	qc.mu.Lock()
	defer qc.mu.Unlock()
	ch := qc.dgs[id]
	if ch == nil {
		ch = make(chan []byte, 64)
		qc.dgs[id] = ch
	}
	return ch
}

func (r *run) deadline(st *stream) {
	d := time.Now().Add(readTimeout)
	switch {
	case st.tls != nil:
		_ = st.tls.SetDeadline(d)
	case st.qs != nil:
		_ = st.qs.SetDeadline(d)
	case st.uni != nil:
		_ = st.uni.SetWriteDeadline(d)
	}
}

// write sends b. A connection refused at its handshake takes no data; the
// step that expects the refusal says so.
func (r *run) write(st *stream, b []byte) {
	r.t.Helper()
	if st.err != nil {
		return
	}
	r.deadline(st)
	_, err := st.writer().Write(b)
	if err != nil && !isAlert(err) {
		r.failf("write: %v", err)
	}
}

func (r *run) readFrame(st *stream) []byte {
	r.t.Helper()
	r.usable(st, "expect")
	r.deadline(st)
	var hdr [2]byte
	if _, err := io.ReadFull(st.br, hdr[:]); err != nil {
		r.failf("expected a frame, reading its length: %v", err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[:]))
	if _, err := io.ReadFull(st.br, body); err != nil {
		r.failf("expected a frame of %d bytes: %v", len(body), err)
	}
	return body
}

// datagram returns the stream's next UDP payload: from a DATAGRAM capsule on
// the stream (other capsule types are skipped), or over QUIC from a DATAGRAM
// frame of the stream's flow, whichever comes first.
func (r *run) datagram(st *stream) []byte {
	r.t.Helper()
	if st.err != nil {
		r.failf("expected a datagram; the connection failed: %v", st.err)
	}
	if st.caps == nil {
		st.caps = make(chan capsuleEvent, 64)
		r.deadline(st)
		go capsulePump(st.br, st.caps)
	}
	var frames chan []byte
	if st.qs != nil {
		frames = st.qc.flow(uint64(st.qs.StreamID()) / 4)
	}
	timeout := time.After(readTimeout)
	again := time.NewTicker(resendInterval)
	defer again.Stop()
	for {
		select {
		case ev := <-st.caps:
			if ev.err != nil {
				r.failf("expected a datagram, the stream ended: %v", ev.err)
			}
			return ev.payload
		case b := <-frames:
			return b
		case <-again.C:
			if st.resend != nil {
				if err := st.resend(); err != nil {
					r.failf("sending again while waiting for a datagram: %v", err)
				}
			}
		case <-timeout:
			r.failf("expected a datagram; none came within %s", readTimeout)
		}
	}
}

// resendInterval is how long a runner waits for a datagram before it repeats
// the stream's last send (a UDP datagram or DATAGRAM frame may be lost).
const resendInterval = 2 * time.Second

// writer is where the stream's bytes go.
func (st *stream) writer() io.Writer {
	switch {
	case st.tls != nil:
		return st.tls
	case st.uni != nil:
		return st.uni
	}
	return st.qs
}

// capsulePump reads capsules (section 12.2) until the stream ends, sending the
// payloads of DATAGRAM capsules and finally the error that ended it.
func capsulePump(br *bufio.Reader, out chan<- capsuleEvent) {
	for {
		var hdr [3]byte
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			out <- capsuleEvent{err: err}
			return
		}
		p := make([]byte, binary.BigEndian.Uint16(hdr[1:]))
		if _, err := io.ReadFull(br, p); err != nil {
			out <- capsuleEvent{err: fmt.Errorf("inside a capsule: %w", err)}
			return
		}
		if hdr[0] == 0x00 {
			out <- capsuleEvent{payload: p}
		}
	}
}

// expectEnd reads the end of the stream and classifies it: "clean" is
// close_notify (TLS) or FIN (QUIC); "abort" is a reset, a TLS session ending
// without close_notify, or RESET_STREAM (with s.QUICCode, when given).
func (r *run) expectEnd(st *stream, s Step) {
	r.t.Helper()
	if st.err != nil {
		r.failf("expected the stream's end; the connection failed: %v", st.err)
	}
	var err error
	if st.caps != nil { // a capsule pump owns the reads
		timeout := time.After(readTimeout)
		for err == nil {
			select {
			case ev := <-st.caps:
				err = ev.err // datagrams before the end (late or repeated replies) are skipped
			case <-timeout:
				r.failf("expected the end of the stream within %s", readTimeout)
			}
		}
	} else {
		r.deadline(st)
		var b [64]byte
		var n int
		n, err = st.br.Read(b[:])
		if n > 0 {
			r.failf("expected the end of the stream, got bytes %x", b[:n])
		}
	}
	kind, code := r.classify(st, err)
	if kind == "timeout" {
		r.failf("expected the end of the stream (%s), nothing came within %s", s.ExpectEnd, readTimeout)
	}
	switch s.ExpectEnd {
	case "closed":
		return
	case "clean", "abort":
		if kind != s.ExpectEnd {
			r.failf("expected the stream to end %s, it ended %s (%v)", s.ExpectEnd, kind, err)
		}
	}
	if s.QUICCode != nil && r.transport == "quic" && (code == nil || *code != *s.QUICCode) {
		r.failf("expected RESET_STREAM code %#x, got %v", *s.QUICCode, describeCode(code, err))
	}
}

func describeCode(code *uint64, err error) string {
	if code == nil {
		return fmt.Sprintf("no stream code (%v)", err)
	}
	return fmt.Sprintf("code %#x", *code)
}

func (r *run) classify(st *stream, err error) (kind string, code *uint64) {
	return classifyEnd(st.raw, err)
}

// expectAlert checks that the server refused the handshake with alert a: over
// TLS 1.3 the client's handshake completes first, so the alert shows at the
// first read; over QUIC it closes the connection with CRYPTO_ERROR 0x100+code.
func (r *run) expectAlert(st *stream, a Alert) {
	r.t.Helper()
	err := st.err
	if err == nil && st.tls != nil {
		r.deadline(st)
		var b [1]byte
		_, err = st.br.Read(b[:])
	}
	if err == nil && st.qc != nil {
		select {
		case <-st.qc.conn.Context().Done():
			err = context.Cause(st.qc.conn.Context())
		case <-time.After(readTimeout):
		}
	}
	if err == nil {
		r.failf("expected TLS alert %s (%d); the connection stayed up", a.Name, a.Code)
	}
	if got, ok := alertCode(err); !ok || got != a.Code {
		r.failf("expected TLS alert %s (%d), got %v", a.Name, a.Code, err)
	}
}

// alertCode extracts the TLS alert from a crypto/tls or quic-go error.
func alertCode(err error) (uint8, bool) {
	var te *quic.TransportError
	if errors.As(err, &te) && te.ErrorCode.IsCryptoError() {
		return uint8(te.ErrorCode - 0x100), true
	}
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "remote error" {
		// crypto/tls reports a received alert as an unexported uint8 type.
		if v := reflect.ValueOf(oe.Err); v.Kind() == reflect.Uint8 {
			return uint8(v.Uint()), true
		}
	}
	return 0, false
}

func isAlert(err error) bool { _, ok := alertCode(err); return ok }

// expectStopSending waits until the peer stopped the stream with code.
func (r *run) expectStopSending(st *stream, code uint64) {
	r.t.Helper()
	if st.uni == nil && st.qs == nil {
		r.failf("expect_stop_sending needs a QUIC stream")
	}
	var ctx context.Context
	if st.uni != nil {
		ctx = st.uni.Context()
	} else {
		ctx = st.qs.Context()
	}
	select {
	case <-ctx.Done():
	case <-time.After(readTimeout):
		r.failf("expected STOP_SENDING %#x; the stream stayed open for %s", code, readTimeout)
	}
	var se *quic.StreamError
	if err := context.Cause(ctx); !errors.As(err, &se) || uint64(se.ErrorCode) != code {
		r.failf("expected STOP_SENDING %#x, the stream ended with %v", code, err)
	}
}

func (r *run) close() {
	for _, st := range r.streams {
		if st.tls != nil {
			_ = st.raw.Close()
		}
	}
	for _, qc := range r.conns {
		if qc.conn != nil {
			_ = qc.conn.CloseWithError(0, "")
		}
	}
}

// endConn records whether the TCP connection under a TLS client ended (EOF or
// an error): crypto/tls reads a TCP end at a record boundary as io.EOF, as it
// does close_notify, and the protocol tells the two apart (section 6.1).
type endConn struct {
	net.Conn
	ended atomic.Bool
}

func (c *endConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	var ne net.Error
	if err != nil && (!errors.As(err, &ne) || !ne.Timeout()) {
		c.ended.Store(true)
	}
	return n, err
}
