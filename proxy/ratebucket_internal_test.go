package proxy

import (
	"testing"
	"time"
)

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
