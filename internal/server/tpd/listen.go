package tpd

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
)

// Listen opens the public port with an error message that says what to do.
// With port 0 and QUIC on, it picks a port whose UDP side is free too, trying a
// few before it gives up, and keeps that UDP socket open for Serve's QUIC, so
// that no other program takes the port in between (one did, while tpd loaded
// its CA: tpd then stopped with "another program uses that UDP port").
func Listen(addr string, quic bool) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if _, port, _ := net.SplitHostPort(addr); err == nil && quic && port == "0" {
		for range 20 {
			tcp := ln.Addr().(*net.TCPAddr)
			u, uerr := net.ListenUDP("udp", &net.UDPAddr{IP: tcp.IP, Port: tcp.Port, Zone: tcp.Zone})
			if uerr == nil {
				return &reservedUDP{Listener: ln, udp: u}, nil
			}
			_ = ln.Close()
			if ln, err = net.Listen("tcp", addr); err != nil {
				break
			}
		}
	}
	switch {
	case err == nil:
		return ln, nil
	case errors.Is(err, syscall.EACCES):
		return nil, fmt.Errorf("cannot listen on %s: permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE (setcap cap_net_bind_service=+ep $(which tpd)), or use --listen 127.0.0.1:8443", addr)
	case errors.Is(err, syscall.EADDRINUSE):
		return nil, fmt.Errorf("cannot listen on %s: something else is already listening there; stop it or choose another --listen", addr)
	default:
		return nil, fmt.Errorf("cannot listen on %s: %w", addr, err)
	}
}

// reservedUDP is the public port's TCP listener holding the UDP socket on the
// same port until Serve takes it for QUIC (listenQUIC). Closing the listener
// closes a socket nobody took.
type reservedUDP struct {
	net.Listener
	mu  sync.Mutex
	udp *net.UDPConn
}

// takeUDP returns the reserved socket, once; later calls return nil.
func (r *reservedUDP) takeUDP() *net.UDPConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	u := r.udp
	r.udp = nil
	return u
}

func (r *reservedUDP) Close() error {
	if u := r.takeUDP(); u != nil {
		_ = u.Close()
	}
	return r.Listener.Close()
}
