package bench

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"
)

// Source protocol (the download scenario): on accept the source writes one
// byte ('R', the tunnel is up), reads the size wanted as 8 bytes big endian,
// writes that many bytes and half-closes. The reader stops its clock when the
// last byte arrived, so only complete transfers are measured.
func sourceHandler(c net.Conn) {
	if _, err := c.Write([]byte{sinkReady}); err != nil {
		return
	}
	var hdr [8]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return
	}
	left := int64(binary.BigEndian.Uint64(hdr[:]))
	buf := make([]byte, 256<<10)
	for left > 0 {
		n, err := c.Write(buf[:min(int64(len(buf)), left)])
		left -= int64(n)
		if err != nil {
			return
		}
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	_, _ = io.Copy(io.Discard, c) // until the reader closes
}

// downloadOnce asks the source, through a fresh stream, for size bytes and
// returns MB/s from the request to the last byte. Fewer bytes than asked, or
// more, is an error: a transfer cut short is never measured.
func downloadOnce(open func() (*stream, error), size int64) ([]float64, error) {
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
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(size))
	start := time.Now()
	if _, err := s.w.Write(hdr[:]); err != nil {
		s.close()
		return nil, err
	}
	n, err := io.CopyBuffer(io.Discard, io.LimitReader(s.r, size), make([]byte, bulkChunk))
	elapsed := time.Since(start)
	if err != nil || n != size {
		s.close()
		return nil, fmt.Errorf("read %d of %d bytes: %v", n, size, err)
	}
	if err := s.close(); err != nil {
		return nil, err
	}
	return []float64{float64(size) / 1e6 / elapsed.Seconds()}, nil
}

// download is bulk's other direction: the destination sends, through one
// tunnel, and the client reads (what scp from a host, or git clone over ssh,
// does). TP over TLS writes the tunnel's bytes at tpd as a tp-mux/1 stream.
func download(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "1b bulk download"
	unit := "MB/s"
	direct := "direct TCP"
	src := e.source
	mk := func(name, transport string, open func() (*stream, error)) *variant {
		r := &Row{Scenario: scn, Variant: name, Transport: transport, Unit: unit}
		if name != direct {
			r.Baseline = direct
		}
		return &variant{rows: []*Row{r}, fn: func() ([]float64, error) { return downloadOnce(open, sz.bulkBytes) }}
	}
	failed := func(name, transport string, err error) *variant {
		e.log("%s: %v", name, err)
		return &variant{rows: []*Row{{Scenario: scn, Variant: name, Transport: transport, Unit: unit, Err: firstLine(err.Error())}}}
	}
	tcpTo := func(addr string) func() (*stream, error) { return func() (*stream, error) { return tcpStream(addr) } }
	vs := []*variant{mk(direct, "tcp", tcpTo(src))}

	tpName := "TP over TLS (tp forward)"
	if addr, _, err := e.startForward(ctx, src, e.tlsArgs()...); err != nil {
		vs = append(vs, failed(tpName, "tls", err))
	} else {
		vs = append(vs, mk(tpName, "tls", tcpTo(addr)))
	}
	connName := "TP over TLS, a connection per tunnel (tp forward --no-tls-mux)"
	if addr, _, err := e.startForward(ctx, src, "--transport", "tls", "--no-tls-mux"); err != nil {
		vs = append(vs, failed(connName, "tls", err))
	} else {
		vs = append(vs, mk(connName, "tls", tcpTo(addr)))
	}
	if e.quic {
		name := "TP over QUIC, 1 stream (tp forward)"
		if addr, _, err := e.startForward(ctx, src, "--transport", "quic"); err != nil {
			vs = append(vs, failed(name, "quic", err))
		} else {
			vs = append(vs, mk(name, "quic", tcpTo(addr)))
		}
	}
	relayName := "minimal Go mTLS relay"
	if addr, _, _, err := e.relayChain(ctx, src); err != nil {
		vs = append(vs, failed(relayName, "tls", err))
	} else {
		vs = append(vs, mk(relayName, "tls", tcpTo(addr)))
	}
	sshLName := "OpenSSH ssh -L"
	if addr, err := e.startLocalForward(ctx, src); err != nil {
		vs = append(vs, failed(sshLName, "ssh", err))
	} else {
		vs = append(vs, mk(sshLName, "ssh", tcpTo(addr)))
	}
	if why := e.peers.why(peerGhostunnel); why != "" {
		vs = append(vs, notGiven(&Row{Scenario: scn, Variant: peerGhostName, Transport: "tls", Unit: unit}, why))
	} else if c, err := e.ghostunnelChain(ctx, src); err != nil {
		vs = append(vs, failed(peerGhostName, "tls", err))
	} else {
		v := mk(peerGhostName, "tls", tcpTo(c.addr))
		v.rows[0].Note = e.peerNote(peerGhostunnel)
		vs = append(vs, v)
	}

	e.interleave(runs, vs)
	rows := collect(vs)
	tp := find(vs, tpName)
	for _, p := range []struct{ name, target string }{
		{peerGhostName, "≥1.0×"}, {connName, ""}, {relayName, "≥1.0×"}, {sshLName, "≥1.5×"},
	} {
		if pr := find(vs, p.name); tp != nil && pr != nil && pr.Err == "" {
			rows = append(rows, ratioRow(scn, "TP/TLS ÷ "+p.name+" (per run)", tp, pr, p.target))
		}
	}
	return rows, nil
}
