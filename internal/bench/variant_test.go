package bench

import (
	"errors"
	"strings"
	"testing"
)

// Once the bench's tpd has exited, interleave marks every variant left as
// failed, saying so, and runs none of them: each would wait out tp's
// timeout against a server that is gone. Bad input: a tpd that exited
// between the first run and the second.
func TestInterleaveStopsWhenTPDExits(t *testing.T) {
	tpd := &proc{name: "tpd", out: &tail{}, done: make(chan struct{})}
	e := &Env{log: func(string, ...any) {}, tpd: tpd}
	calls := 0
	first := &variant{rows: []*Row{{Variant: "through tpd"}}, fn: func() ([]float64, error) {
		calls++
		if calls == 1 {
			tpd.out.Write([]byte("tpd: killed\n"))
			tpd.err = errors.New("signal: killed")
			close(tpd.done) // it dies during the first run
		}
		return []float64{1}, nil
	}}
	second := &variant{rows: []*Row{{Variant: "also through tpd"}}, fn: func() ([]float64, error) {
		t.Fatal("a variant ran after the bench's tpd exited")
		return nil, nil
	}}
	e.interleave(3, []*variant{first, second})
	if calls != 1 {
		t.Errorf("the first variant ran %d times; want once, before tpd exited", calls)
	}
	for _, v := range []*variant{first, second} {
		if r := v.rows[0]; !strings.Contains(r.Err, "the bench's tpd exited (signal: killed)") || r.Runs != nil {
			t.Errorf("%s: Err %q, runs %v; want it marked failed, naming tpd's exit, with no runs", r.Variant, r.Err, r.Runs)
		}
	}
	if err := e.tpdExited(); err == nil || !strings.Contains(err.Error(), "tpd: killed") {
		t.Errorf("tpdExited: %v; want the end of tpd's log", err)
	}
}
