package policy

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
)

// BenchmarkEvalInputForms compares handing OPA the input map (rego.EvalInput)
// with converting it first (ast.InterfaceToValue + rego.EvalParsedInput).
func BenchmarkEvalInputForms(b *testing.B) {
	dir := b.TempDir()
	if err := os.WriteFile(filepath.Join(dir, DefaultFile), []byte(DefaultPolicy), 0o600); err != nil {
		b.Fatal(err)
	}
	e, err := Load(context.Background(), dir)
	if err != nil {
		b.Fatal(err)
	}
	in := map[string]any{
		"action": "dial",
		"identity": map[string]any{
			"user": "bob", "device": "pc", "device_id": "bob@pc",
			"groups": []any{"dev", "dba"}, "serial": "0a1b", "expiry": "2030-01-01T00:00:00Z",
		},
		"destination": map[string]any{"host": "db.internal", "port": 5432, "network": "tcp", "ips": []any{"10.0.0.5"}},
		"source":      map[string]any{"address": "192.0.2.1:40000", "transport": "tls"},
		"time":        "2030-01-01T00:00:00.123456789Z",
	}
	ctx := context.Background()
	b.Run("map", func(b *testing.B) {
		b.ReportAllocs()
		q := e.current.Load().query
		for b.Loop() {
			if _, err := q.Eval(ctx, rego.EvalInput(in)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parsed", func(b *testing.B) {
		b.ReportAllocs()
		q := e.current.Load().query
		for b.Loop() {
			v, err := ast.InterfaceToValue(in)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := q.Eval(ctx, rego.EvalParsedInput(v)); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// An evaluation that cannot start because every slot is taken waits at most the
// queue timeout, and then denies saying that tpd is overloaded; a caller that
// gives up while waiting is told so. The bad input is an engine whose slots are
// all held (as by long evaluations on a saturated machine).
func TestEvalQueueTimeout(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.rego"), []byte("package tp.authz\n\nallow := true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The queue timeout also bounds the free engine's evaluation below: long
	// enough that a loaded machine finishes a trivial one within it.
	e, err := Load(context.Background(), dir, WithQueueTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if cap(e.slots) != runtime.GOMAXPROCS(0) {
		t.Fatalf("%d evaluation slots; want GOMAXPROCS, %d", cap(e.slots), runtime.GOMAXPROCS(0))
	}
	for range cap(e.slots) {
		e.slots <- struct{}{}
	}
	in := map[string]any{"action": "dial"}
	_, err = e.Eval(context.Background(), in)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "did not start within 2s") || !strings.Contains(err.Error(), "overloaded") {
		t.Fatalf("full engine: %v; want a queue timeout that says tpd is overloaded", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.Eval(ctx, in); !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "abandoned before it started") {
		t.Fatalf("cancelled while waiting: %v", err)
	}
	for range cap(e.slots) {
		<-e.slots
	}
	if res, err := e.Eval(context.Background(), in); err != nil || !res.Allow {
		t.Fatalf("free engine: %+v, %v", res, err)
	}

	// The queue timeout bounds the whole call: an evaluation that has not finished
	// by then is stopped even if its own budget is far from used (as for one
	// starved of processors). Bad input: 25 million steps, a budget of a minute.
	slow := `package tp.authz

default allow := false

allow if {
	count([1 | some i in numbers.range(1, 5000); some j in numbers.range(1, 5000); i * j < 0]) > 0
}
`
	if err := os.WriteFile(filepath.Join(dir, "p.rego"), []byte(slow), 0o600); err != nil {
		t.Fatal(err)
	}
	e, err = Load(context.Background(), dir, WithTimeout(time.Minute), WithQueueTimeout(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Eval(context.Background(), in); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "did not finish within 50ms of the request") {
		t.Fatalf("evaluation past the queue timeout: %v", err)
	}
}
