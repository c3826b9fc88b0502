package tpd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/proxy"
)

// listenQUIC opens UDP on the address and port the TCP listener got (with
// --listen HOST:0 the port is known only from ln), for QUIC beside TLS. It returns
// a plain *net.UDPConn so quic-go keeps GSO, batched reads and ECN.
func listenQUIC(ln net.Listener) (*net.UDPConn, error) {
	if r, ok := ln.(*reservedUDP); ok {
		if u := r.takeUDP(); u != nil {
			return u, nil
		}
	}
	tcp, ok := ln.Addr().(*net.TCPAddr)
	if !ok {
		return nil, fmt.Errorf("QUIC needs a TCP listener to share its port, not %s; set quic: false", ln.Addr().Network())
	}
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: tcp.IP, Port: tcp.Port, Zone: tcp.Zone})
	switch {
	case err == nil:
		return udp, nil
	case errors.Is(err, syscall.EADDRINUSE):
		return nil, fmt.Errorf("cannot listen for QUIC on UDP %s: another program uses that UDP port; stop it, choose another --listen, or set quic: false in tpd.yaml (TP_QUIC=false)", tcp)
	default:
		return nil, fmt.Errorf("cannot listen for QUIC on UDP %s: %w; or set quic: false in tpd.yaml (TP_QUIC=false)", tcp, err)
	}
}

func (d *Daemon) quicOptions() (proxy.QUICOptions, error) {
	key, err := d.resetKey()
	if err != nil {
		return proxy.QUICOptions{}, err
	}
	opts := proxy.QUICOptions{
		MaxStreams:        int64(d.cfg.QUICMaxStreams),
		KeepAlive:         d.cfg.QUICKeepAlive,
		IdleTimeout:       d.cfg.QUICIdleTimeout,
		StatelessResetKey: key,
	}
	sid, err := d.cfg.QUICServerIDBytes()
	if err != nil {
		return proxy.QUICOptions{}, err
	}
	if sid != nil {
		opts.LB = &proxy.QUICLB{ConfigID: uint8(d.cfg.QUICConfigID), ServerID: sid}
		d.log.Info("QUIC connection IDs carry this instance's server ID (QUIC-LB plaintext)",
			"server_id", hex.EncodeToString(sid), "config_id", d.cfg.QUICConfigID, "cid_len", opts.LB.Len())
	}
	return opts, nil
}

// resetKey is the QUIC stateless reset key: with a database, the one every
// instance on it shares (a reset from any of them is valid for a connection of
// another, which a load balancer may send there); else the data dir's.
func (d *Daemon) resetKey() (*quic.StatelessResetKey, error) {
	if d.db == nil {
		return loadResetKey(filepath.Join(d.cfg.DataDir, resetKeyFile))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	k, err := pgstore.NewKeys(d.db).QUICResetKey(ctx)
	if err != nil {
		return nil, err
	}
	key := quic.StatelessResetKey(k)
	return &key, nil
}

// resetKeyFile keeps the QUIC stateless reset key across restarts: a restarted
// tpd can then tell clients at once that their connection is gone (a stateless
// reset), instead of leaving them to find out at the idle timeout.
const resetKeyFile = "quic-reset.key"

func loadResetKey(path string) (*quic.StatelessResetKey, error) {
	var key quic.StatelessResetKey
	b, err := os.ReadFile(path)
	switch {
	case err == nil && len(b) == len(key):
		copy(key[:], b)
		return &key, nil
	case err == nil:
		return nil, fmt.Errorf("%s has %d bytes, not %d; delete it and tpd makes a new one", path, len(b), len(key))
	case !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("read QUIC reset key: %w", err)
	}
	if _, err := rand.Read(key[:]); err != nil {
		return nil, err
	}
	if err := login.WriteFileAtomic(path, key[:], 0o600); err != nil {
		return nil, fmt.Errorf("save QUIC reset key: %w", err)
	}
	return &key, nil
}

func (d *Daemon) udpOptions() proxy.UDPOptions {
	return proxy.UDPOptions{
		IdleTimeout:         d.cfg.UDPIdleTimeout,
		MaxFlowsPerIdentity: d.cfg.UDPMaxFlows,
		MaxPublicFlows:      d.cfg.UDPMaxPublicFlows,
	}
}
