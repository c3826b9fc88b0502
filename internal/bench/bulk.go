package bench

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// stream is one tunnelled byte stream, whatever carries it.
type stream struct {
	pid        int // of the process behind a procStream; 0 otherwise
	r          io.Reader
	w          io.Writer
	closeWrite func() error
	close      func() error
}

func tcpStream(addr string) (*stream, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	return &stream{r: c, w: c, closeWrite: c.(*net.TCPConn).CloseWrite, close: c.Close}, nil
}

// procStream runs a ProxyCommand-style process (ssh -W, tp HOST PORT) and uses
// its stdin and stdout as the stream.
func procStream(e *Env, name string, args []string, env []string) (*stream, error) {
	cmd := command(name, args, env)
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	errTail := &tail{}
	cmd.Stderr = errTail
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	return &stream{pid: cmd.Process.Pid, r: out, w: in, closeWrite: in.Close, close: func() error {
		in.Close()
		select {
		case err := <-done:
			if err != nil {
				return fmt.Errorf("%s: %w: %s", name, err, firstLine(errTail.String()))
			}
			return nil
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
			return fmt.Errorf("%s did not exit within 10s of its stdin closing", name)
		}
	}}, nil
}

const bulkChunk = 1 << 20

// Names of the peers' bulk variants.
const (
	peerGhostName   = "ghostunnel (TLS per tunnel)"
	peerChiselName  = "chisel (SSH channel over WebSocket)"
	peerFrpTCPName  = "frp tcp (via frps's public port)"
	peerFrpSTCPName = "frp stcp (secret mode, via visitor)"
)

// bulkOnce sends size bytes through a fresh stream to the sink and returns MB/s
// from the first byte sent to the sink's acknowledgement of the full count. Setting
// up the tunnel is not timed: the clock starts when the sink's ready byte arrives.
// With counted the stream leads to the counted sink: the count goes first, and
// the stream is not half-closed.
func bulkOnce(open func() (*stream, error), size int64, counted bool) ([]float64, error) {
	s, err := open()
	if err != nil {
		return nil, err
	}
	watchdog := time.AfterFunc(5*time.Minute, func() { s.close() })
	defer watchdog.Stop()
	var one [1]byte
	if _, err := io.ReadFull(s.r, one[:]); err != nil || one[0] != sinkReady {
		s.close()
		return nil, fmt.Errorf("tunnel did not come up: %v", err)
	}
	buf := make([]byte, bulkChunk)
	start := time.Now()
	if counted {
		var hdr [8]byte
		binary.BigEndian.PutUint64(hdr[:], uint64(size))
		if _, err := s.w.Write(hdr[:]); err != nil {
			s.close()
			return nil, err
		}
	}
	for sent := int64(0); sent < size; {
		n := min(int64(len(buf)), size-sent)
		if _, err := s.w.Write(buf[:n]); err != nil {
			s.close()
			return nil, fmt.Errorf("after %d bytes: %w", sent, err)
		}
		sent += n
	}
	if !counted {
		if err := s.closeWrite(); err != nil {
			s.close()
			return nil, err
		}
	}
	var ack [8]byte
	if _, err := io.ReadFull(s.r, ack[:]); err != nil {
		s.close()
		return nil, fmt.Errorf("no acknowledgement from the sink: %w", err)
	}
	elapsed := time.Since(start)
	if err := s.close(); err != nil {
		return nil, err
	}
	if got := int64(binary.BigEndian.Uint64(ack[:])); got != size {
		return nil, fmt.Errorf("sink received %d bytes, sent %d", got, size)
	}
	return []float64{float64(size) / 1e6 / elapsed.Seconds()}, nil
}

func bulk(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "1 bulk forward"
	unit := "MB/s"
	direct := "direct TCP"
	mkCounted := func(name, transport string, open func() (*stream, error), target string, counted bool) *variant {
		r := &Row{Scenario: scn, Variant: name, Transport: transport, Unit: unit, Target: target}
		if name != direct {
			r.Baseline = direct
		}
		return &variant{rows: []*Row{r}, fn: func() ([]float64, error) { return bulkOnce(open, sz.bulkBytes, counted) }}
	}
	mk := func(name, transport string, open func() (*stream, error), target string) *variant {
		return mkCounted(name, transport, open, target, false)
	}
	failed := func(name, transport string, err error) *variant {
		e.log("%s: %v", name, err)
		return &variant{rows: []*Row{{Scenario: scn, Variant: name, Transport: transport, Unit: unit, Err: firstLine(err.Error())}}}
	}
	vs := []*variant{mk(direct, "tcp", func() (*stream, error) { return tcpStream(e.sink) }, "")}

	tpName := "TP over TLS (tp forward)"
	if addr, _, err := e.startForward(ctx, e.sink, e.tlsArgs()...); err != nil {
		vs = append(vs, failed(tpName, "tls", err))
	} else {
		vs = append(vs, mk(tpName, "tls", func() (*stream, error) { return tcpStream(addr) }, ""))
	}
	// The same over a TLS connection of its own (tp-mux/1 off): what the
	// multiplexer costs a tunnel's bulk, in the same runs.
	connName := "TP over TLS, a connection per tunnel (tp forward --no-tls-mux)"
	if addr, _, err := e.startForward(ctx, e.sink, "--transport", "tls", "--no-tls-mux"); err != nil {
		vs = append(vs, failed(connName, "tls", err))
	} else {
		vs = append(vs, mk(connName, "tls", func() (*stream, error) { return tcpStream(addr) }, ""))
	}
	if e.quic {
		name := "TP over QUIC, 1 stream (tp forward)"
		if addr, _, err := e.startForward(ctx, e.sink, "--transport", "quic"); err != nil {
			vs = append(vs, failed(name, "quic", err))
		} else {
			vs = append(vs, mk(name, "quic", func() (*stream, error) { return tcpStream(addr) }, ""))
		}
		rawName := "raw quic-go relay, 1 stream (no TP)"
		if addr, err := e.quicRelayChain(ctx, e.sink); err != nil {
			vs = append(vs, failed(rawName, "quic", err))
		} else {
			vs = append(vs, mk(rawName, "quic", func() (*stream, error) { return tcpStream(addr) }, ""))
		}
	}
	relayName := "minimal Go mTLS relay"
	if addr, _, _, err := e.relayChain(ctx, e.sink); err != nil {
		vs = append(vs, failed(relayName, "tls", err))
	} else {
		vs = append(vs, mk(relayName, "tls", func() (*stream, error) { return tcpStream(addr) }, ""))
	}
	sshLName := "OpenSSH ssh -L"
	if addr, err := e.startLocalForward(ctx, e.sink); err != nil {
		vs = append(vs, failed(sshLName, "ssh", err))
	} else {
		vs = append(vs, mk(sshLName, "ssh", func() (*stream, error) { return tcpStream(addr) }, ""))
	}
	sshWName := "OpenSSH ssh -W (jump host)"
	if s, err := e.startSSHD(ctx); err != nil {
		vs = append(vs, failed(sshWName, "ssh", err))
	} else {
		args := s.sshArgs("-W", e.sink)
		vs = append(vs, mk(sshWName, "ssh", func() (*stream, error) { return procStream(e, "ssh", args, nil) }, ""))
	}

	// The peers, each started once and measured in the same runs.
	peer := func(name, transport string, bins []string, start func() (string, error), counted bool) *variant {
		if why := e.peers.why(bins...); why != "" {
			return notGiven(&Row{Scenario: scn, Variant: name, Transport: transport, Unit: unit}, why)
		}
		addr, err := start()
		if err != nil {
			return failed(name, transport, err)
		}
		v := mkCounted(name, transport, func() (*stream, error) { return tcpStream(addr) }, "", counted)
		v.rows[0].Note = e.peerNote(bins...)
		if counted {
			v.rows[0].Note += "; to the counted sink (it ends both directions at a half-close)"
		}
		return v
	}
	chain := func(f func(context.Context, string) (peerChain, error), sink string) func() (string, error) {
		return func() (string, error) { c, err := f(ctx, sink); return c.addr, err }
	}
	frp := func(stcp bool) func() (string, error) {
		return func() (string, error) {
			addrs, _, err := e.frpChain(ctx, nil, stcp, e.csink)
			if err != nil {
				return "", err
			}
			return addrs[0], nil
		}
	}
	vs = append(vs,
		peer(peerGhostName, "tls", []string{peerGhostunnel}, chain(e.ghostunnelChain, e.sink), false),
		peer(peerChiselName, "ssh", []string{peerChisel}, chain(e.chiselChain, e.csink), true),
		peer(peerFrpTCPName, "tls", []string{peerFrps, peerFrpc}, frp(false), true),
		peer(peerFrpSTCPName, "tls", []string{peerFrps, peerFrpc}, frp(true), true))

	e.interleave(runs, vs)
	rows := collect(vs)
	for _, p := range []struct{ name, target string }{{peerGhostName, "≥1.0×"}, {peerChiselName, ""}, {peerFrpTCPName, ""}} {
		if tp, pr := find(vs, tpName), find(vs, p.name); tp != nil && pr != nil && !strings.HasPrefix(pr.Err, "not given") {
			rows = append(rows, ratioRow(scn, "TP/TLS ÷ "+p.name+" (per run)", tp, pr, p.target))
		}
	}
	if tp, conn := find(vs, tpName), find(vs, connName); tp != nil && conn != nil {
		rows = append(rows, ratioRow(scn, "TP/TLS ÷ TP/TLS with a connection per tunnel (per run)", tp, conn, ""))
	}
	tp, relay, sshL := find(vs, tpName), find(vs, relayName), find(vs, sshLName)
	if tp != nil && relay != nil {
		rows = append(rows, ratioRow(scn, "TP/TLS ÷ minimal relay (per run)", tp, relay, "≥1.0×"))
	}
	if tp != nil && sshL != nil {
		rows = append(rows, ratioRow(scn, "TP/TLS ÷ ssh -L (per run)", tp, sshL, "≥1.5×"))
	}
	if tpq, raw := find(vs, "TP over QUIC, 1 stream (tp forward)"), find(vs, "raw quic-go relay, 1 stream (no TP)"); tpq != nil && raw != nil {
		rows = append(rows, ratioRow(scn, "TP/QUIC ÷ raw quic-go (per run)", tpq, raw, "≥0.95×"))
	}
	return rows, nil
}

func find(vs []*variant, name string) *Row {
	for _, v := range vs {
		for _, r := range v.rows {
			if r.Variant == name {
				return r
			}
		}
	}
	return nil
}
