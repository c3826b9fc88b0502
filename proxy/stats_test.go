package proxy

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/authz"
)

// TestStatLabelSets: the fixed tables are as large as the label sets, and the
// last value of each set is where unknown values go.
func TestStatLabelSets(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		set  []string
		n    int
	}{{"transports", StatTransports, nTransports}, {"actions", StatActions, nActions}, {"outcomes", StatOutcomes, nOutcomes}, {"reasons", StatHandshakeReasons, nReasons}} {
		if len(c.set) != c.n {
			t.Errorf("%s: %d values, table size %d", c.name, len(c.set), c.n)
		}
		if len(indexOf(c.set)) != len(c.set) {
			t.Errorf("%s: duplicate values in %v", c.name, c.set)
		}
		if c.set[len(c.set)-1] != "other" {
			t.Errorf("%s: the last value is %q, not other", c.name, c.set[len(c.set)-1])
		}
	}
	// Bad input: an outcome and an action no table knows land in "other".
	var c counters
	c.session("tls", "frobnicate", "no_such_code", 0, 0)
	if c.sessions[0][nActions-1][nOutcomes-1].Load() != 1 {
		t.Error("an unknown action and outcome were not counted as other")
	}
}

func TestHandshakeReason(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		err      error
		timedOut bool
		want     string
	}{
		{errors.New("context deadline exceeded"), true, "timeout"},
		{fmt.Errorf("device: %w", authz.ErrRevoked), false, "revoked"},
		{fmt.Errorf("device: %w", authz.ErrUnknownDevice), false, "unknown_device"},
		{errors.New("tls: client didn't provide a certificate"), false, "no_cert"},
		{errors.New("tls: no certificates configured"), false, "unknown_name"},
		{errors.New("client certificate expired at 2026-01-01T00:00:00Z; run dlogin for a new one"), false, "expired"},
		{errors.New("EOF"), false, "other"},
	} {
		if got := handshakeReason(c.err, c.timedOut); got != c.want {
			t.Errorf("handshakeReason(%v, %t) = %q, want %q", c.err, c.timedOut, got, c.want)
		}
	}
}

// BenchmarkSessionCounter is what the counters add to each session's end.
func BenchmarkSessionCounter(b *testing.B) {
	var c counters
	for b.Loop() {
		c.session("tls", authz.ActionDial, "", 1000, 1000)
	}
}

// Every refusal code the protocol defines (a Code… string constant in proxy
// or proxy/wire) has its own outcome, so none is counted as "other".
func TestStatOutcomesCoverCodes(t *testing.T) {
	t.Parallel()
	fset := token.NewFileSet()
	var codes []string
	for _, dir := range []string{".", "wire"} {
		files, err := filepath.Glob(filepath.Join(dir, "*.go"))
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range files {
			if strings.HasSuffix(name, "_test.go") {
				continue
			}
			f, err := parser.ParseFile(fset, name, nil, 0)
			if err != nil {
				t.Fatal(err)
			}
			for _, decl := range f.Decls {
				gd, ok := decl.(*ast.GenDecl)
				if !ok || gd.Tok != token.CONST {
					continue
				}
				for _, spec := range gd.Specs {
					vs := spec.(*ast.ValueSpec)
					for i, n := range vs.Names {
						if !strings.HasPrefix(n.Name, "Code") || i >= len(vs.Values) {
							continue
						}
						if lit, ok := vs.Values[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
							v, _ := strconv.Unquote(lit.Value)
							codes = append(codes, v)
						}
					}
				}
			}
		}
	}
	if len(codes) < 20 {
		t.Fatalf("found only %d codes: %q", len(codes), codes)
	}
	for _, c := range codes {
		if !slices.Contains(StatOutcomes, c) {
			t.Errorf("code %q is not among StatOutcomes: it would be counted as other", c)
		}
	}
}
