package masque

import (
	"testing"
	"time"
)

// The CONNECT-IP bucket at its edges, on a clock the test moves: a fresh
// bucket passes exactly one second's packets and refuses the next; 1/rate
// later it passes exactly one more; a long idle fills it to one second's
// worth and never beyond; a packet of exactly the bytes left passes and one
// byte more is refused. Bad input: packets beyond what the bucket holds.
func TestIPRateBucketEdges(t *testing.T) {
	const pps, bps = 20, 1 << 20
	t0 := time.Unix(1_000_000, 0)
	taken := func(b *rateBucket, now time.Time, n int) int {
		got := 0
		for range 10 * pps {
			if b.allow(now, n, pps, bps) {
				got++
			}
		}
		return got
	}
	var b rateBucket
	if got := taken(&b, t0, 100); got != pps {
		t.Fatalf("a fresh bucket of %d packets per second passed %d packets at one instant; want exactly %d", pps, got, pps)
	}
	t1 := t0.Add(time.Second / pps)
	if got := taken(&b, t1, 100); got != 1 {
		t.Fatalf("1/%d s after the bucket ran dry it passed %d packets; want exactly 1", pps, got)
	}
	if got := taken(&b, t1.Add(time.Hour), 100); got != pps {
		t.Fatalf("after an hour's idle the bucket passed %d packets at one instant; want exactly %d (one second's worth)", got, pps)
	}

	// Bytes: 1,000 per second, packets far below their own limit.
	const small = 1000
	var bb rateBucket
	if !bb.allow(t0, small, pps, small) {
		t.Fatalf("a fresh bucket of %d bytes per second refused a packet of exactly %d bytes", small, small)
	}
	if bb.allow(t0, 1, pps, small) {
		t.Fatal("a bucket that passed its whole second of bytes passed one byte more")
	}
	t2 := t0.Add(10 * time.Millisecond) // 10 bytes' worth
	if !bb.allow(t2, 10, pps, small) {
		t.Fatal("10 ms after the bytes ran out, a packet of exactly the 10 bytes refilled was refused")
	}
	if bb.allow(t2, 1, pps, small) {
		t.Fatal("the bucket passed a byte more than it had refilled")
	}
}

// The CONNECT-UDP flow bucket at its edges, on a clock the test moves: a new
// bucket passes exactly one second's datagrams and refuses the next; 1/rate
// later exactly one more; a long idle fills it to one second's worth and
// never beyond. Bad input: datagrams beyond what the bucket holds.
func TestDgramBucketEdges(t *testing.T) {
	const rate = 20
	t0 := time.Unix(1_000_000, 0)
	b := newDgramBucket(rate, t0)
	taken := func(now time.Time) int {
		got := 0
		for range 10 * rate {
			if b.take(now) {
				got++
			}
		}
		return got
	}
	if got := taken(t0); got != rate {
		t.Fatalf("a new bucket of %d datagrams per second passed %d at one instant; want exactly %d", rate, got, rate)
	}
	t1 := t0.Add(time.Second / rate)
	if got := taken(t1); got != 1 {
		t.Fatalf("1/%d s after the bucket ran dry it passed %d datagrams; want exactly 1", rate, got)
	}
	if got := taken(t1.Add(time.Hour)); got != rate {
		t.Fatalf("after an hour's idle the bucket passed %d datagrams at one instant; want exactly %d (one second's worth)", got, rate)
	}
}

// A TCP segment is charged as the packets it makes. One larger than the
// whole bucket (64 packets at 20 a second) passes a full bucket, never
// refused for good, and leaves it in debt: nothing passes until the debt is
// repaid (44 packets' worth, 2.2 s), and then one packet per 1/rate again.
// Bad input: a segment of more packets and bytes than a second allows.
func TestIPRateBucketSegmentLargerThanTheBucket(t *testing.T) {
	const pps, bps = 20, 1 << 20
	t0 := time.Unix(1_000_000, 0)
	var b rateBucket
	if !b.allowN(t0, 64, 64*1300, pps, bps) {
		t.Fatal("a full bucket refused a segment larger than the bucket: it would be refused for good")
	}
	if b.allow(t0.Add(2*time.Second), 100, pps, bps) {
		t.Fatal("2 s after a segment of 64 packets at 20 a second, the bucket (44 packets in debt, 40 repaid) passed a packet")
	}
	if !b.allow(t0.Add(2250*time.Millisecond), 100, pps, bps) {
		t.Fatal("2.25 s after the segment (its debt repaid, one packet's worth more) the bucket refused a packet")
	}
	// Bytes: a bound of 10,000 a second and a segment of 64 KiB.
	var bb rateBucket
	if !bb.allowN(t0, 50, 65000, 1000, 10000) {
		t.Fatal("a full byte bucket refused a segment larger than a second's bytes")
	}
	if bb.allowN(t0.Add(5*time.Second), 2, 2000, 1000, 10000) {
		t.Fatal("5 s after a segment of 65,000 bytes at 10,000 a second (still 5,000 in debt) the bucket passed more")
	}
}
