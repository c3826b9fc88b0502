package clients

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/pion/stun/v4"
)

// ErrNoSTUNAnswer: the server did not answer STUN on its UDP port.
var ErrNoSTUNAnswer = errors.New("no STUN answer")

// ReflexiveAddr asks the TP server at server (its UDP port, the QUIC port)
// with a STUN Binding request (RFC 8489) sent from pc which address and port
// it sees the request come from: pc's address after any NAT on the way. It
// sends the request up to three times (again after 250 ms and after 500 ms
// more) and takes only the answer to it (its transaction ID, 96 random bits;
// from whichever of the server's addresses it comes). pc's read deadline is
// cleared when it returns.
func ReflexiveAddr(ctx context.Context, pc net.PacketConn, server netip.AddrPort) (netip.AddrPort, error) {
	req, err := stun.Build(stun.TransactionID, stun.BindingRequest, stun.Fingerprint)
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer pc.SetReadDeadline(time.Time{})
	stop := context.AfterFunc(ctx, func() { _ = pc.SetReadDeadline(time.Now()) })
	defer stop()
	to := net.UDPAddrFromAddrPort(server)
	buf := make([]byte, 1500)
	for try := range 3 {
		if _, err := pc.WriteTo(req.Raw, to); err != nil {
			return netip.AddrPort{}, fmt.Errorf("sending a STUN request to %s: %w", server, err)
		}
		_ = pc.SetReadDeadline(time.Now().Add(250 * time.Millisecond << try))
		for {
			n, _, err := pc.ReadFrom(buf)
			if ctx.Err() != nil {
				return netip.AddrPort{}, ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				break // send again, or give up
			}
			if err != nil {
				return netip.AddrPort{}, fmt.Errorf("waiting for a STUN answer from %s: %w", server, err)
			}
			if addr, ok := bindingAnswer(buf[:n], req.TransactionID); ok {
				return addr, nil
			}
		}
	}
	return netip.AddrPort{}, fmt.Errorf("%w from %s within 1.75 s", ErrNoSTUNAnswer, server)
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
