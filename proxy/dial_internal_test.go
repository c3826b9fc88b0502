package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"testing"
)

// The dialer's Control hook is the last check: it refuses any address outside the
// authorised set, even one handed to it directly.
func TestGuardedDialerRefusesUnauthorised(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	target := ln.Addr().(*net.TCPAddr).AddrPort()
	s := &Server{}
	d := s.guardedDialer([]netip.AddrPort{target})
	c, err := d.DialContext(context.Background(), "tcp", target.String())
	if err != nil {
		t.Fatalf("authorised address: %v", err)
	}
	c.Close()
	other := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), target.Port())
	for _, addr := range []string{other.String(), "[::1]:" + strconv.Itoa(int(target.Port()))} {
		if _, err := d.DialContext(context.Background(), "tcp", addr); !errors.Is(err, errNotAuthorised) {
			t.Errorf("%s: %v; want errNotAuthorised", addr, err)
		}
	}
	// The server's own listener is refused even when it is in the authorised set.
	s2 := &Server{listeners: map[net.Listener]struct{}{ln: {}}}
	if _, err := s2.guardedDialer([]netip.AddrPort{target}).DialContext(context.Background(), "tcp", target.String()); !errors.Is(err, errNotAuthorised) {
		t.Errorf("own listener: %v; want errNotAuthorised", err)
	}
}

func FuzzCanonicalHost(f *testing.F) {
	for _, s := range []string{"127.1", "0x7f.0.0.1", "[::ffff:127.0.0.1]", "DB.internal.", "2130706433", "1.2.3.4.5"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, host string) {
		c, err := CanonicalHost(host)
		if err != nil {
			return
		}
		// Canonical forms are fixed points, and an address stays an address.
		c2, err := CanonicalHost(c)
		if err != nil || c2 != c {
			t.Fatalf("CanonicalHost(%q) = %q, but CanonicalHost(%q) = %q, %v", host, c, c, c2, err)
		}
		if ip, err := netip.ParseAddr(c); err == nil && (ip.Is4In6() || ip.Zone() != "") {
			t.Fatalf("CanonicalHost(%q) = %q, not unmapped and zone-free", host, c)
		}
	})
}
