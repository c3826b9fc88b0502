package proxy

import "github.com/quic-go/quic-go"

// FlowQUICConn is the QUIC connection that carries f's DATAGRAM frames; nil when
// f sends capsules on its stream only.
func FlowQUICConn(f *UDPFlow) *quic.Conn {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.qconn
}
