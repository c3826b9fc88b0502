package policy

import (
	"context"
	"os"
	"path/filepath"
	"testing"

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
