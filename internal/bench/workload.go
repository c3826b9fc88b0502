package bench

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/clients"
)

// The workload of scenarios 8–10: idle tunnels, checksummed transfers and a
// canary request, all through the stress tpd with the real client library.
//
// Checksum protocol (ckHandler, at the far end of a tunnel): the client sends a
// header of three big-endian uint64s — seed, size, rate in bytes per second —
// then size bytes of the deterministic stream of seed, paced at rate. The far
// end hashes (SHA-256) what arrived and the stream it expects, regenerated from
// seed, and answers one byte: ckMatch or ckMismatch. Then it sends size bytes of
// the stream of seed^ckDown, paced alike, which the client checks the same way.
// A truncated or cut stream is an error, never a match.
const (
	ckMatch, ckMismatch = 'M', 'X'
	ckDown              = 0x9e3779b97f4a7c15
	ckChunk             = 32 << 10
)

// ckStream is the deterministic byte stream of seed.
func ckStream(seed uint64) io.Reader {
	var key [32]byte
	binary.BigEndian.PutUint64(key[:], seed)
	return rand.NewChaCha8(key)
}

// sendStream writes size bytes of the stream of seed to w at rate bytes per
// second (0: as fast as w takes them).
func sendStream(w io.Writer, seed uint64, size, rate int64) error {
	src := ckStream(seed)
	buf := make([]byte, ckChunk)
	start := time.Now()
	for sent := int64(0); sent < size; {
		n := min(int64(len(buf)), size-sent)
		if _, err := io.ReadFull(src, buf[:n]); err != nil {
			return err
		}
		if _, err := w.Write(buf[:n]); err != nil {
			return fmt.Errorf("after %d of %d bytes: %w", sent, size, err)
		}
		sent += n
		if rate > 0 {
			if ahead := time.Until(start.Add(time.Duration(float64(sent) / float64(rate) * float64(time.Second)))); ahead > 0 {
				time.Sleep(ahead) // pacing, not waiting for readiness
			}
		}
	}
	return nil
}

// checkStream reads size bytes from r and reports whether their SHA-256 is that
// of the stream of seed. Fewer bytes is an error.
func checkStream(r io.Reader, seed uint64, size int64) (bool, error) {
	got, want := sha256.New(), sha256.New()
	if n, err := io.CopyN(got, r, size); err != nil {
		return false, fmt.Errorf("stream cut after %d of %d bytes: %w", n, size, err)
	}
	if _, err := io.CopyN(want, ckStream(seed), size); err != nil {
		return false, err
	}
	return bytes.Equal(got.Sum(nil), want.Sum(nil)), nil
}

func ckHandler(c net.Conn) {
	c.SetDeadline(time.Now().Add(10 * time.Minute)) // bound; a transfer takes seconds
	var hdr [24]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return
	}
	seed, size, rate := binary.BigEndian.Uint64(hdr[0:]), int64(binary.BigEndian.Uint64(hdr[8:])), int64(binary.BigEndian.Uint64(hdr[16:]))
	if size < 0 || size > 1<<34 || rate < 0 {
		return
	}
	ok, err := checkStream(c, seed, size)
	if err != nil {
		return // the client sees the cut as an error, not a match
	}
	verdict := byte(ckMismatch)
	if ok {
		verdict = ckMatch
	}
	if _, err := c.Write([]byte{verdict}); err != nil {
		return
	}
	if sendStream(c, seed^ckDown, size, rate) != nil {
		return
	}
	// Wait for the client to close, so its last bytes are not cut by our close.
	io.Copy(io.Discard, c)
}

// tally counts what a workload did. Every transfer ends in exactly one of:
// matched both ways, a mismatch (up or down), or an error; refusals with
// policy_error are errors and are also counted on their own.
type tally struct {
	transfers, upMismatch, downMismatch, errs, policyErrs, bytes atomic.Int64
	stopped                                                      atomic.Int64 // cut by the workload's end

	mu       sync.Mutex
	firstErr []string // the first few, for the log
}

// fail counts a transfer that ended in err, unless ctx had ended: the
// workload's own stop cut it (by a deadline, see transfer), not TP.
func (t *tally) fail(ctx context.Context, err error) {
	if ctx.Err() != nil {
		t.stopped.Add(1)
		return
	}
	t.errs.Add(1)
	if isPolicyError(err) {
		t.policyErrs.Add(1)
	}
	t.mu.Lock()
	if len(t.firstErr) < 5 {
		t.firstErr = append(t.firstErr, firstLine(err.Error()))
	}
	t.mu.Unlock()
}

func (t *tally) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return fmt.Sprintf("%d transfers matched both ways (%.0f MB each way), %d up / %d down mismatches, %d errors (%d policy_error) %q, %d cut by the workload's end",
		t.transfers.Load(), float64(t.bytes.Load())/1e6, t.upMismatch.Load(), t.downMismatch.Load(), t.errs.Load(), t.policyErrs.Load(), t.firstErr, t.stopped.Load())
}

// transfer runs one checksummed transfer through d to the checksum server ck.
func transfer(ctx context.Context, d *clients.Dialer, ck string, seed uint64, size, rate int64, t *tally) {
	c, err := d.DialContext(ctx, "tcp", ck)
	if err != nil {
		t.fail(ctx, fmt.Errorf("dial: %w", err))
		return
	}
	defer c.Close()
	bound := 30 * time.Second
	if rate > 0 {
		bound += time.Duration(3 * float64(2*size) / float64(rate) * float64(time.Second))
	}
	c.SetDeadline(time.Now().Add(bound))
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	var hdr [24]byte
	binary.BigEndian.PutUint64(hdr[0:], seed)
	binary.BigEndian.PutUint64(hdr[8:], uint64(size))
	binary.BigEndian.PutUint64(hdr[16:], uint64(rate))
	if _, err := c.Write(hdr[:]); err != nil {
		t.fail(ctx, err)
		return
	}
	if err := sendStream(c, seed, size, rate); err != nil {
		t.fail(ctx, fmt.Errorf("upload: %w", err))
		return
	}
	var v [1]byte
	if _, err := io.ReadFull(c, v[:]); err != nil {
		t.fail(ctx, fmt.Errorf("no verdict from the far end: %w", err))
		return
	}
	ok, err := checkStream(c, seed^ckDown, size)
	if err != nil {
		t.fail(ctx, fmt.Errorf("download: %w", err))
		return
	}
	switch {
	case v[0] != ckMatch:
		t.upMismatch.Add(1)
	case !ok:
		t.downMismatch.Add(1)
	default:
		t.transfers.Add(1)
		t.bytes.Add(size)
	}
}

// activeWorkers runs n loops of transfers until ctx ends; wait returns when all
// have stopped. Worker w's transfers have seeds w<<32 | i.
func activeWorkers(ctx context.Context, n int, d func(w int) *clients.Dialer, ck string, size, rate int64, t *tally) (wait func()) {
	var wg sync.WaitGroup
	for w := range n {
		wg.Go(func() {
			for i := uint64(0); ctx.Err() == nil; i++ {
				transfer(ctx, d(w), ck, uint64(w)<<32|i, size, rate, t)
			}
		})
	}
	return wg.Wait
}

// roundTripVia opens a new tunnel to the echo server, sends a byte, waits for it
// and closes: the canary request.
func roundTripVia(ctx context.Context, d *clients.Dialer, echo string) (time.Duration, error) {
	start := time.Now()
	c, err := d.DialContext(ctx, "tcp", echo)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write([]byte{'c'}); err != nil {
		return 0, err
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return 0, fmt.Errorf("no echo: %w", err)
	}
	return time.Since(start), nil
}

// canaryResult is a canary's latencies (ms, in order) with when each was
// taken, and its failures.
type canaryResult struct {
	ms                 []float64
	at                 []span // at[i] is when ms[i] was measured
	failed, policyErrs int
	firstErr           error
	excluded           int // samples left out by without
}

// without leaves out the samples taken while the runtime printed a scheduler
// dump (see runtimeTrace.dumpWindows): the instrument's pause, not tpd's.
func (c canaryResult) without(windows []span) canaryResult {
	out := c
	out.ms, out.at = nil, nil
	for i, m := range c.ms {
		if slices.ContainsFunc(windows, c.at[i].overlaps) {
			out.excluded++
			continue
		}
		out.ms = append(out.ms, m)
		out.at = append(out.at, c.at[i])
	}
	return out
}

func (c canaryResult) p(q float64) float64 {
	s := slices.Clone(c.ms)
	slices.Sort(s)
	return percentile(s, q)
}

// canary makes a round trip every interval until it has n samples or ctx ends
// (n 0: until ctx ends). A round trip slower than interval delays the next.
func canary(ctx context.Context, d *clients.Dialer, echo string, n int, interval time.Duration) canaryResult {
	var r canaryResult
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for n == 0 || len(r.ms)+r.failed < n {
		began := time.Now()
		lat, err := roundTripVia(ctx, d, echo)
		if ctx.Err() != nil {
			break
		}
		if err != nil {
			r.failed++
			if isPolicyError(err) {
				r.policyErrs++
			}
			if r.firstErr == nil {
				r.firstErr = err
			}
		} else {
			r.ms = append(r.ms, float64(lat)/float64(time.Millisecond))
			r.at = append(r.at, span{began, began.Add(lat)})
		}
		select {
		case <-ctx.Done():
			return r
		case <-tick.C:
		}
	}
	return r
}

// idleResult is what openIdle opened, and what it could not.
type idleResult struct {
	conns              []net.Conn
	failed, policyErrs int
	firstErr           error
}

// openIdle opens k tunnels through d to the echo server, at most parallel at
// once, each proven end to end by one echoed byte, then left idle.
func openIdle(ctx context.Context, d *clients.Dialer, echo string, k, parallel int) idleResult {
	var r idleResult
	var mu sync.Mutex
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for range k {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := d.DialContext(ctx, "tcp", echo)
			if err == nil {
				c.SetDeadline(time.Now().Add(30 * time.Second))
				var b [1]byte
				if _, err = c.Write([]byte{'i'}); err == nil {
					_, err = io.ReadFull(c, b[:])
				}
				c.SetDeadline(time.Time{})
				if err != nil {
					c.Close()
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				r.failed++
				if isPolicyError(err) {
					r.policyErrs++
				}
				if r.firstErr == nil {
					r.firstErr = err
				}
				return
			}
			r.conns = append(r.conns, c)
		})
	}
	wg.Wait()
	return r
}
