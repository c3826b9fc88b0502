package clients

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/pion/stun/v3"
)

// ReflexiveAddr asks the TP server at server (its UDP port, the QUIC port)
// with a STUN Binding request (RFC 8489) sent from pc which address and port
// it sees the request come from: pc's address after any NAT on the way. It
// sends the request up to three times (after 250 ms, then 500 ms more) and
// ignores anything but the answer to it.
func ReflexiveAddr(ctx context.Context, pc net.PacketConn, server netip.AddrPort) (netip.AddrPort, error) {
	req, err := stun.Build(stun.TransactionID, stun.BindingRequest, stun.Fingerprint)
	if err != nil {
		return netip.AddrPort{}, err
	}
	to := net.UDPAddrFromAddrPort(server)
	buf := make([]byte, 1500)
	wait := 250 * time.Millisecond
	for try := range 3 {
		if _, err := pc.WriteTo(req.Raw, to); err != nil {
			return netip.AddrPort{}, fmt.Errorf("sending a STUN request to %s: %w", server, err)
		}
		deadline := time.Now().Add(wait << try)
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		_ = pc.SetReadDeadline(deadline)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() && ctx.Err() == nil && try < 2 {
					break // send again
				}
				if ctx.Err() != nil {
					return netip.AddrPort{}, ctx.Err()
				}
				return netip.AddrPort{}, fmt.Errorf("%w (the server at %s did not answer STUN over UDP: UDP may be blocked on the way, or the server is older than STUN support)", err, server)
			}
			if ua, ok := from.(*net.UDPAddr); !ok || ua.AddrPort().Addr().Unmap() != server.Addr().Unmap() || ua.AddrPort().Port() != server.Port() {
				continue
			}
			if addr, ok := bindingAnswer(buf[:n], req.TransactionID); ok {
				_ = pc.SetReadDeadline(time.Time{})
				return addr, nil
			}
		}
	}
	return netip.AddrPort{}, fmt.Errorf("the server at %s did not answer STUN over UDP", server)
}

// bindingAnswer reads a Binding success response to transaction id.
func bindingAnswer(b []byte, id [stun.TransactionIDSize]byte) (netip.AddrPort, bool) {
	if !stun.IsMessage(b) {
		return netip.AddrPort{}, false
	}
	m := &stun.Message{Raw: append([]byte(nil), b...)}
	if err := m.Decode(); err != nil || m.Type != stun.BindingSuccess || m.TransactionID != id {
		return netip.AddrPort{}, false
	}
	var xa stun.XORMappedAddress
	if err := xa.GetFrom(m); err != nil {
		return netip.AddrPort{}, false
	}
	ip, ok := netip.AddrFromSlice(xa.IP)
	if !ok || xa.Port <= 0 || xa.Port > 65535 {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(xa.Port)), true
}
