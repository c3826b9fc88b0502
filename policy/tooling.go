package policy

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/tester"
	"github.com/open-policy-agent/opa/v1/topdown"
)

// TestResult is the outcome of one Rego unit test (a rule named test_…).
type TestResult struct {
	Name     string // package and rule, e.g. "data.tp.authz_test.test_dba_reaches_db"
	Location string // file:line
	Pass     bool
	Skipped  bool
	Error    string // evaluation error, if any
	Duration time.Duration
	Output   string // print() output of the test
}

// RunTests compiles every .rego file in dir, including the *_test.rego files the
// engine skips, and runs their tests with OPA's tester under the same rules as the
// engine (Rego v1, no network builtins, strict builtin errors). Policy files must
// declare package tp.authz; test files may declare any package. Each test is
// bounded by timeout. An error means the files do not parse or compile.
func RunTests(ctx context.Context, dir string, timeout time.Duration) ([]TestResult, error) {
	modules, err := parseAll(dir, true)
	if err != nil {
		return nil, err
	}
	compiler := ast.NewCompiler().WithDefaultRegoVersion(ast.RegoV1).WithCapabilities(capabilities).WithEnablePrintStatements(true)
	ch, err := tester.NewRunner().
		SetCompiler(compiler).
		SetDefaultRegoVersion(ast.RegoV1).
		RaiseBuiltinErrors(true).
		CapturePrintOutput(true).
		SetTimeout(timeout).
		Run(ctx, modules)
	if err != nil {
		return nil, fmt.Errorf("policy tests in %s do not compile: %w", dir, err)
	}
	var out []TestResult
	for r := range ch {
		tr := TestResult{
			Name:     r.Package + "." + r.Name,
			Pass:     r.Pass(),
			Skipped:  r.Skip,
			Duration: r.Duration,
			Output:   string(r.Output),
		}
		if r.Location != nil {
			tr.Location = fmt.Sprintf("%s:%d", filepath.Base(r.Location.File), r.Location.Row)
		}
		if r.Error != nil {
			tr.Error = r.Error.Error()
		}
		out = append(out, tr)
	}
	return out, nil
}

// parseAll parses the .rego files of dir; tests says whether *_test.rego files are
// included (they may declare any package).
func parseAll(dir string, tests bool) (map[string]*ast.Module, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read policy directory: %w", err)
	}
	modules := map[string]*ast.Module{}
	for _, de := range entries {
		name := de.Name()
		isTest := strings.HasSuffix(name, "_test.rego")
		if de.IsDir() || !strings.HasSuffix(name, ".rego") || isTest && !tests {
			continue
		}
		path := filepath.Join(dir, name)
		src, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read policy file: %w", err)
		}
		m, err := ast.ParseModuleWithOpts(path, string(src), ast.ParserOptions{RegoVersion: ast.RegoV1})
		if err != nil {
			return nil, fmt.Errorf("policy file %s does not parse: %w", path, err)
		}
		if !isTest && !m.Package.Path.Equal(packagePath) {
			return nil, fmt.Errorf("policy file %s declares package %s; TP policy files must declare package %s",
				path, strings.TrimPrefix(m.Package.Path.String(), "data."), Package)
		}
		modules[path] = m
	}
	return modules, nil
}

// Match is a rule that held while deciding one input.
type Match struct {
	Rule     string // the rule's head, e.g. "allow", "deny contains msg", "is_internal(ip)"
	Location string // file:line
	Default  bool   // the rule is a default (it holds when no other rule does)
}

// Explain evaluates input like Eval and also reports which rules of the policy held,
// in the order the evaluation first reached them: the readable core of OPA's trace.
// full, when not nil, receives OPA's complete pretty-printed trace.
func (e *Engine) Explain(ctx context.Context, input map[string]any, full io.Writer) (Result, []Match, error) {
	tracer := topdown.NewBufferTracer()
	res, err := e.evalWith(ctx, e.current.Load(), input, rego.EvalQueryTracer(tracer))
	if full != nil {
		topdown.PrettyTraceWithLocation(full, *tracer)
	}
	var matches []Match
	seen := map[string]bool{}
	for _, ev := range *tracer {
		rule, ok := ev.Node.(*ast.Rule)
		if ev.Op != topdown.ExitOp || !ok || rule.Location == nil {
			continue
		}
		loc := fmt.Sprintf("%s:%d", filepath.Base(rule.Location.File), rule.Location.Row)
		if seen[loc] {
			continue
		}
		seen[loc] = true
		matches = append(matches, Match{Rule: ruleHead(rule), Location: loc, Default: rule.Default})
	}
	return res, matches, err
}

// ruleHead renders a rule's head as written, without its body: "allow",
// "deny contains msg", "is_internal(ip)", "reason", "default allow := false".
func ruleHead(r *ast.Rule) string {
	line, _, _ := strings.Cut(string(r.Location.Text), "\n")
	line = strings.TrimSpace(line)
	if r.Default && r.Head.Value != nil {
		return "default " + r.Head.Ref().String() + " := " + r.Head.Value.String()
	}
	if strings.HasPrefix(line, "else") {
		return r.Head.Ref().String() + " (else branch)"
	}
	for _, sep := range []string{" if ", " if{", " := ", " = ", " {"} {
		line, _, _ = strings.Cut(line, sep)
	}
	return strings.TrimSuffix(strings.TrimSpace(line), " if")
}

// FilesWithTests lists the *_test.rego files in dir, sorted.
func FilesWithTests(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read policy directory: %w", err)
	}
	var out []string
	for _, de := range entries {
		if !de.IsDir() && strings.HasSuffix(de.Name(), "_test.rego") {
			out = append(out, de.Name())
		}
	}
	slices.Sort(out)
	return out, nil
}
