package clients

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// relayTap records what the relay's streams carried to and from the agent.
type relayTap struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

type relayTapConn struct {
	net.Conn
	t *relayTap
}

func (c *relayTapConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.t.mu.Lock()
	c.t.buf.Write(p[:n])
	c.t.mu.Unlock()
	return n, err
}

func (c *relayTapConn) Write(p []byte) (int, error) {
	c.t.mu.Lock()
	c.t.buf.Write(p)
	c.t.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *relayTapConn) CloseWrite() error { return c.Conn.(wire.Stream).CloseWrite() }

func (t *relayTap) saw(b []byte) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return bytes.Contains(t.buf.Bytes(), b)
}

// firstSession opens an attached session that carries first with its attach, as
// a dial with first bytes (DialFirst) does, and returns it with the dial's state.
func (e *attachEnv) firstSession(t *testing.T, hdr wire.SessionHeader, first string) (net.Conn, *earlyDial, error) {
	t.Helper()
	st := e.d.e2e.get("svc.rev.test")
	if st == nil {
		t.Fatal("the dialer holds no attach state")
	}
	ed := &earlyDial{first: []byte(first)}
	p := st.prepare(time.Now(), ed)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := e.d.e2eSession(ctx, e.stream(t, hdr), "svc.rev.test:22", p)
	return c, ed, err
}

// readEcho reads len(want) bytes from c and checks them.
func readEcho(t *testing.T, c net.Conn, want string) {
	t.Helper()
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
		t.Fatalf("read %q, %v; want %q", got, err, want)
	}
}

// A session after a tp-e2e/3 handshake carries the dialer's first bytes sealed
// in its attach: the agent passes them to the service after its checks, so the
// answer comes without the dialer writing them again, and the relay never sees
// them in the clear. When the agent no longer knows the state (it restarted),
// it asks for a handshake and the first bytes are the dialer's to send after
// it: they reach the service once, not twice.
func TestE2EAttachCarriesFirstBytes(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	tap := &relayTap{}
	e.a.WrapData = func(c net.Conn) net.Conn { return &relayTapConn{Conn: c, t: tap} }
	c, err := e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "first")
	if st := e.d.e2e.get("svc.rev.test"); st == nil || !st.first {
		t.Fatal("a tp-e2e/3 session left no state that carries first bytes")
	}

	secret := "GET /sealed-first-bytes HTTP/1.1\r\n\r\n"
	c, ed, err := e.firstSession(t, header("bob@phone", "dev"), secret)
	if err != nil {
		t.Fatal(err)
	}
	if !ed.sent {
		t.Fatal("the agent took the attach but the dial does not count its first bytes as sent")
	}
	readEcho(t, c, secret) // written only inside the attach
	echoes(t, c, " and more")
	if tap.saw([]byte("sealed-first-bytes")) {
		t.Fatal("the relay saw first bytes in the clear")
	}

	e.a.attaches = agentAttaches{} // a restarted agent
	c, ed, err = e.firstSession(t, header("bob@phone", "dev"), "again")
	if err != nil {
		t.Fatal(err)
	}
	if ed.sent {
		t.Fatal("first bytes counted as sent though the agent fell back to a handshake")
	}
	if _, err := c.Write([]byte("again")); err != nil {
		t.Fatal(err)
	}
	readEcho(t, c, "again") // once: the agent dropped the copy in the attach
	echoes(t, c, "!")
	if full, attached := e.d.E2EStats(); full != 2 || attached != 1 {
		t.Fatalf("%d full handshakes and %d attaches; want 2 and 1", full, attached)
	}
}

// An agent that offers tp-e2e/2 but not tp-e2e/3 (an older one) gets attaches
// without first bytes: the dialer sends them after the agent's ok.
func TestE2EAttachFirstBytesNeedE2E3(t *testing.T) {
	t.Parallel()
	e := newAttachEnv(t)
	e.a.inner.NextProtos = []string{E2EALPN2, E2EALPN}
	c, err := e.session(t, header("bob@phone", "dev"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, c, "first")
	c, ed, err := e.firstSession(t, header("bob@phone", "dev"), "later")
	if err != nil {
		t.Fatal(err)
	}
	if ed.sent {
		t.Fatal("first bytes went in an attach to a tp-e2e/2 agent")
	}
	echoes(t, c, "later")
}

// Bad input: attaches whose proof record is not what the version allows. Each
// is aborted before anything reaches the service.
func TestReadAttachBounds(t *testing.T) {
	t.Parallel()
	rec := func(version byte, l int) []byte {
		msg := append([]byte{version}, make([]byte, attachIDLen+8)...)
		msg = binary.BigEndian.AppendUint16(msg, uint16(l))
		return append(msg, make([]byte, max(l, 0))...)
	}
	for _, tc := range []struct {
		what string
		msg  []byte
		udp  bool
		want string
	}{
		{"unknown version 3", rec(3, sealedOverhead), false, "version 0x03"},
		{"proof shorter than its tag", rec(attachVersion2, 5), false, "a proof record of 5 bytes"},
		{"data in a version 1 attach", rec(attachVersion, sealedOverhead+4), false, "first bytes in a version 0x01 attach"},
		{"data for a UDP name", rec(attachVersion2, sealedOverhead+4), true, "UDP name"},
		{"more than the early data a server discards", rec(attachVersion2, maxAttachFirst+sealedOverhead+1), false, "at most"},
	} {
		a, b := net.Pipe()
		go func() { _, _ = b.Write(tc.msg); b.Close() }()
		_, err := readAttach(a, tc.udp)
		a.Close()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v; want an error saying %q", tc.what, err, tc.want)
		}
	}
	for _, v := range []byte{attachVersion, attachVersion2} {
		a, b := net.Pipe()
		go func() { _, _ = b.Write(rec(v, sealedOverhead)); b.Close() }()
		if msg, err := readAttach(a, true); err != nil || len(msg) != attachMsgLen-1 {
			t.Errorf("an empty proof, version %d: %d bytes, %v; want it read whole", v, len(msg), err)
		}
		a.Close()
	}
}

// FuzzReadAttach: whatever the relay sends after an attach's marker, readAttach
// reads a whole attach of an allowed shape, never more than the bound, or fails.
func FuzzReadAttach(f *testing.F) {
	c2s, _, err := attachKeys(bytes.Repeat([]byte{7}, 32), [attachIDLen]byte{1}, 1)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(attachMessage([attachIDLen]byte{1}, 1, c2s, attachVersion, nil)[1:], false)
	f.Add(attachMessage([attachIDLen]byte{1}, 1, c2s, attachVersion2, []byte("GET / HTTP/1.1\r\n\r\n"))[1:], false)
	f.Add(attachMessage([attachIDLen]byte{1}, 1, c2s, attachVersion2, []byte("x"))[1:], true)
	f.Fuzz(func(t *testing.T, b []byte, udp bool) {
		msg, err := readAttach(bytes.NewReader(b), udp)
		if err != nil {
			return
		}
		l := int(binary.BigEndian.Uint16(msg[attachHeadLen-1:]))
		switch {
		case !bytes.HasPrefix(b, msg):
			t.Fatal("readAttach returned bytes it was not sent")
		case len(msg) != attachHeadLen+1+l:
			t.Fatalf("%d bytes for a proof record of %d", len(msg), l)
		case len(msg) > attachMsgLen-1+maxAttachFirst:
			t.Fatalf("%d bytes: beyond the bound", len(msg))
		case msg[0] != attachVersion && msg[0] != attachVersion2:
			t.Fatalf("version 0x%02x accepted", msg[0])
		case l > sealedOverhead && (msg[0] != attachVersion2 || udp):
			t.Fatal("first bytes accepted where they are not allowed")
		}
	})
}
