package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// openTunnels opens k tunnels to addr (an echo behind it) with bounded
// concurrency; each is established end to end (one byte echoed) and then idle.
func openTunnels(addr string, k int) ([]net.Conn, error) {
	conns := make([]net.Conn, k)
	errs := make(chan error, k)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for i := range k {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", addr, 30*time.Second)
			if err != nil {
				errs <- err
				return
			}
			c.SetDeadline(time.Now().Add(30 * time.Second))
			var b [1]byte
			if _, err := c.Write([]byte{'x'}); err == nil {
				_, err = io.ReadFull(c, b[:])
			}
			if err != nil {
				c.Close()
				errs <- fmt.Errorf("tunnel %d: %w", i, err)
				return
			}
			c.SetDeadline(time.Time{})
			conns[i] = c
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		closeAll(conns)
		return nil, err
	}
	return conns, nil
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

// settle gives the processes a moment to finish their bookkeeping (goroutines
// parked, buffers returned) before RSS is read. It is a measurement pause, not a
// readiness wait: every tunnel has already echoed a byte.
const settle = 500 * time.Millisecond

func memory(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "4 idle tunnel memory"
	unit := "KiB/tunnel"
	type system struct {
		server, client         string
		transport              string
		addr                   string
		serverPid, clientPid   int
		serverBase, clientBase string
		target                 string
	}
	var systems []system
	relayServer, relayClient := "minimal relay server", "minimal relay client"
	if addr, srv, cli, err := e.relayChain(ctx, e.echo); err != nil {
		return nil, err
	} else {
		systems = append(systems, system{server: relayServer, client: relayClient, transport: "tls",
			addr: addr, serverPid: srv.pid(), clientPid: cli.pid()})
	}
	addr, fwd, err := e.startForward(ctx, e.echo, e.tlsArgs()...)
	if err != nil {
		return nil, err
	}
	systems = append(systems, system{server: "tpd (TP over TLS)", client: "tp forward", transport: "tls",
		addr: addr, serverPid: e.tpd.pid(), clientPid: fwd.pid(), serverBase: relayServer, clientBase: relayClient, target: "≤16 KB"})
	// QUIC is left out: scenario 4 asks for the TLS tunnels; see the README for why.

	var rows []Row
	for _, s := range systems {
		sr := Row{Scenario: scn, Variant: fmt.Sprintf("%s, RSS", s.server), Transport: s.transport, Unit: unit, Target: s.target}
		cr := Row{Scenario: scn, Variant: fmt.Sprintf("%s, RSS", s.client), Transport: s.transport, Unit: unit}
		if s.serverBase != "" {
			sr.Baseline, cr.Baseline = s.serverBase+", RSS", s.clientBase+", RSS"
		}
		var open []net.Conn
		err := func() error {
			defer closeAll(open)
			time.Sleep(settle)
			sBefore, err1 := rssKiB(s.serverPid)
			cBefore, err2 := rssKiB(s.clientPid)
			if err1 != nil || err2 != nil {
				return fmt.Errorf("reading RSS: %v %v", err1, err2)
			}
			for i := range runs {
				conns, err := openTunnels(s.addr, sz.tunnels)
				if err != nil {
					return err
				}
				open = append(open, conns...)
				time.Sleep(settle)
				sAfter, err1 := rssKiB(s.serverPid)
				cAfter, err2 := rssKiB(s.clientPid)
				if err1 != nil || err2 != nil {
					return fmt.Errorf("reading RSS: %v %v", err1, err2)
				}
				sr.Runs = append(sr.Runs, float64(sAfter-sBefore)/float64(sz.tunnels))
				cr.Runs = append(cr.Runs, float64(cAfter-cBefore)/float64(sz.tunnels))
				e.log("  batch %d %-28s %d tunnels open: server RSS %d MiB (+%.1f KiB/tunnel), client RSS %d MiB (+%.1f KiB/tunnel)",
					i+1, s.server, len(open), sAfter>>10, sr.Runs[i], cAfter>>10, cr.Runs[i])
				sBefore, cBefore = sAfter, cAfter
			}
			sr.Note = fmt.Sprintf("RSS growth per batch of %d tunnels, cumulative to %d open", sz.tunnels, len(open))
			cr.Note = sr.Note
			return nil
		}()
		if err != nil {
			e.log("%s: %v", s.server, err)
			sr.Err, sr.Runs, cr.Err, cr.Runs = firstLine(err.Error()), nil, firstLine(err.Error()), nil
		}
		rows = append(rows, sr, cr)
		// Let the processes see the closes before the next system is measured.
		time.Sleep(2 * settle)
	}
	return rows, nil
}
