package tpd

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	"github.com/tp-proxy/tp/proxy"
)

// listenQUIC opens UDP on the address and port the TCP listener got (with
// --listen HOST:0 the port is known only from ln), for QUIC beside TLS. It returns
// a plain *net.UDPConn so quic-go keeps GSO, batched reads and ECN.
func listenQUIC(ln net.Listener) (*net.UDPConn, error) {
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

func (d *Daemon) quicOptions() proxy.QUICOptions {
	return proxy.QUICOptions{
		MaxStreams:  int64(d.cfg.QUICMaxStreams),
		KeepAlive:   d.cfg.QUICKeepAlive,
		IdleTimeout: d.cfg.QUICIdleTimeout,
	}
}

func (d *Daemon) udpOptions() proxy.UDPOptions {
	return proxy.UDPOptions{
		IdleTimeout:         d.cfg.UDPIdleTimeout,
		MaxFlowsPerIdentity: d.cfg.UDPMaxFlows,
	}
}
