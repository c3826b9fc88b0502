package proxy

import (
	"net/netip"
	"testing"
	"time"
)

// The STUN rate: stunPerSource answers per source (an IPv4 address, an IPv6
// /64) and second, stunPerSecond in all, at most stunMaxSources sources
// counted in a second; the next second starts afresh.
func TestSTUNLimiter(t *testing.T) {
	var l stunLimiter
	now := time.Unix(1_000_000, 0)
	a := netip.MustParseAddr("192.0.2.1")
	for i := range stunPerSource {
		if !l.allow(a, now) {
			t.Fatalf("request %d of one source within a second refused; want %d answered", i+1, stunPerSource)
		}
	}
	if l.allow(a, now.Add(900*time.Millisecond)) {
		t.Fatalf("request %d of one source within a second answered", stunPerSource+1)
	}
	if !l.allow(a, now.Add(time.Second)) {
		t.Fatal("the next second refused the source")
	}

	// IPv6: a /64 is one source.
	l = stunLimiter{}
	for i := range stunPerSource {
		if !l.allow(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i)}), now) {
			t.Fatalf("request %d from one /64 refused", i+1)
		}
	}
	if l.allow(netip.MustParseAddr("2001:db8::ffff"), now) {
		t.Fatalf("request %d from one /64 (another address in it) answered", stunPerSource+1)
	}
	if !l.allow(netip.MustParseAddr("2001:db8:0:1::1"), now) {
		t.Fatal("another /64 refused")
	}

	// Many sources: the table is bounded, and so is the total.
	l = stunLimiter{}
	var refused int
	for i := range stunMaxSources + 100 {
		src := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		if !l.allow(src, now) {
			refused++
		}
	}
	if refused != 100 || len(l.per) != stunMaxSources {
		t.Fatalf("%d sources in a second: %d refused and %d counted; want 100 refused, %d counted", stunMaxSources+100, refused, len(l.per), stunMaxSources)
	}
	l = stunLimiter{}
	answered := 0
	for i := range stunPerSecond / stunPerSource * 2 {
		src := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		for range stunPerSource {
			if l.allow(src, now) {
				answered++
			}
		}
	}
	if answered != stunPerSecond {
		t.Fatalf("%d answered within one second; want the server's bound, %d", answered, stunPerSecond)
	}
}
