package clients

import (
	"context"
	"net"
	"time"
)

// localDialTimeout bounds the agent's connection to its local service.
const localDialTimeout = 10 * time.Second

// localDial is an agent's connection to its local service for one session,
// started before the session's end-to-end checks so that the connect overlaps
// the inner handshake or attach instead of following it. The checks still decide:
// until admit takes it, nothing of the session reaches the service, and a
// session that is refused closes it unused.
type localDial struct {
	cancel context.CancelFunc
	done   chan struct{}
	conn   net.Conn
	err    error
	taken  bool // by the session's goroutine, which alone calls take and discard
}

// startLocalDial connects to local in the background.
func startLocalDial(ctx context.Context, network, local string) *localDial {
	dctx, cancel := context.WithTimeout(ctx, localDialTimeout)
	l := &localDial{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		// Keepalive probes only to a service on another host: for one on
		// this host's loopback they would cost each session four system
		// calls and tell the agent nothing (probeUnlessLoopback).
		nd := net.Dialer{KeepAlive: -1}
		if l.conn, l.err = nd.DialContext(dctx, network, local); l.err == nil {
			probeUnlessLoopback(l.conn)
		}
	}()
	return l
}

// take waits for the connection and hands it over.
func (l *localDial) take() (net.Conn, error) {
	<-l.done
	l.cancel()
	l.taken = true
	return l.conn, l.err
}

// discard stops the connect and closes the connection, unless it was taken.
func (l *localDial) discard() {
	if l == nil || l.taken {
		return
	}
	l.cancel()
	<-l.done
	if l.conn != nil {
		_ = l.conn.Close()
	}
}
