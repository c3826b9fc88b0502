package policy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/topdown"
)

// Package is the Rego package every policy file must declare.
const Package = "tp.authz"

// DefaultTimeout bounds one evaluation unless [WithTimeout] says otherwise.
const DefaultTimeout = 100 * time.Millisecond

// DefaultQueueTimeout bounds, unless [WithQueueTimeout] says otherwise, how long an
// Eval may take from call to answer, waiting for its turn included.
const DefaultQueueTimeout = 5 * time.Second

// query asks for the four documents of the decision in one evaluation, and only
// for them: asking for the whole package would also evaluate every helper rule
// (about 2x slower for the default policy, BenchmarkDecisionRealistic). Keys whose
// rule is undefined are absent from the result.
const query = `{k: v | some k in ["allow", "reason", "deny", "ip"]; v := data.` + Package + `[k]}`

// mayAllowQuery asks whether allow can be true; the destination's addresses are
// left unknown (see [Engine.MayAllow]). Deny rules only refuse, so allow alone
// says whether some addresses could make a request allowed.
const mayAllowQuery = `data.` + Package + `.allow == true`

// unknownAddresses are the parts of the input that come from resolving the
// destination's name.
var unknownAddresses = []string{"input.destination.ips", "input.destination.embedded_ipv4"}

var packagePath = ast.MustParseRef("data." + Package)

// Result is the policy's answer to one input.
type Result struct {
	Allow bool
	// Reason is the policy's reason, written for a person; empty when the policy
	// does not define one.
	Reason string
	// Revision names the policy that answered (see [Engine.Revision]).
	Revision string
	// Deny holds the messages of the policy's deny rules, sorted. Any message
	// denies the request, whatever allow says.
	Deny []string
	// IP is the policy's document ip as evaluated (undefined: nil), which an
	// allowed "ip" request is held to (see Authorizer).
	IP any
	// Cached is true when the answer came from the decision cache (see Eval).
	Cached bool
}

// Option adjusts an Engine.
type Option func(*Engine)

// WithTimeout bounds each evaluation: the processor time it may use (on Linux;
// elsewhere the time from its start), not counting time spent waiting for its turn
// or for a processor. Zero or less keeps [DefaultTimeout].
func WithTimeout(d time.Duration) Option {
	return func(e *Engine) {
		if d > 0 {
			e.timeout = d
		}
	}
}

// WithQueueTimeout bounds how long an Eval may take from call to answer, waiting
// included: a machine so overloaded that an evaluation cannot start, or cannot get
// a processor, within it denies. It should be much longer than the evaluation
// timeout. Zero or less keeps [DefaultQueueTimeout].
func WithQueueTimeout(d time.Duration) Option {
	return func(e *Engine) {
		if d > 0 {
			e.queueTimeout = d
		}
	}
}

// WithoutCache turns the decision cache off: every Eval evaluates the policy.
func WithoutCache() Option {
	return func(e *Engine) { e.noCache = true }
}

// Engine evaluates the Rego policy loaded from one directory. It is safe for
// concurrent use; Eval never waits for a Reload.
//
// At most GOMAXPROCS evaluations run at once; the others wait their turn, in
// order. An evaluation is CPU-bound, so running more at once only makes each take
// longer, and a wall-clock bound that started before the evaluation got a
// processor denied legitimate requests on a busy machine. The evaluation timeout
// is therefore measured on the evaluation itself; waiting has its own, much
// longer bound.
type Engine struct {
	dir          string
	timeout      time.Duration
	queueTimeout time.Duration
	noCache      bool
	slots        chan struct{} // one per evaluation allowed to run

	reloadMu sync.Mutex // serialises Reload; Eval does not take it
	current  atomic.Pointer[compiled]
}

// compiled is one generation of the policy. It is immutable once stored.
type compiled struct {
	query    rego.PreparedEvalQuery
	partial  *rego.PreparedPartialQuery // mayAllowQuery; nil when it does not type-check
	revision string
	files    []string // base names, sorted
	tests    string   // testsRevision of the *_test.rego files it was checked with
	// use is what the policy reads of its input; cache, nil when the policy is
	// not cacheable (use.why) or caching is off, holds this generation's answers,
	// so a new generation starts with none.
	use   inputUse
	cache *decisionCache
}

// Load reads every *.rego file in dir (files ending in _test.rego are not part of
// the policy), compiles them and prepares the query. If dir holds *_test.rego files,
// their tests must pass (see RunTests), at Load and at every Reload. Errors name
// the file and carry the compiler's message.
func Load(ctx context.Context, dir string, opts ...Option) (*Engine, error) {
	e := &Engine{dir: dir, timeout: DefaultTimeout, queueTimeout: DefaultQueueTimeout,
		slots: make(chan struct{}, runtime.GOMAXPROCS(0))}
	for _, o := range opts {
		o(e)
	}
	tests, err := testsRevision(dir)
	if err != nil {
		return nil, err
	}
	c, err := e.compileDir(ctx, dir)
	if err != nil {
		return nil, err
	}
	c.tests = tests
	e.current.Store(c)
	return e, nil
}

// Dir returns the directory the engine loads from.
func (e *Engine) Dir() string { return e.dir }

// Revision identifies the active policy: a short hex SHA-256 over the sorted file
// names and contents. It changes exactly when a Reload activates different files.
func (e *Engine) Revision() string { return e.current.Load().revision }

// Files returns the base names of the active policy's files, sorted.
func (e *Engine) Files() []string { return slices.Clone(e.current.Load().files) }

// Reload reads and compiles the directory again. On success the new policy answers
// every Eval that starts afterwards; on failure the previous policy stays active and
// the error says what is wrong with which file. Reloading an unchanged directory is
// cheap: nothing is recompiled.
func (e *Engine) Reload(ctx context.Context) error {
	e.reloadMu.Lock()
	defer e.reloadMu.Unlock()
	files, revision, err := readDir(e.dir)
	if err != nil {
		return err
	}
	tests, err := testsRevision(e.dir)
	if err != nil {
		return err
	}
	cur := e.current.Load()
	switch {
	case revision == cur.revision && tests == cur.tests:
		return nil
	case revision == cur.revision:
		// Only the tests changed: the policy stays, and must pass them.
		if err := checkTests(ctx, e.dir); err != nil {
			return err
		}
		next := *cur
		next.tests = tests
		e.current.Store(&next)
		return nil
	}
	c, err := e.compileFiles(ctx, e.dir, files, revision)
	if err != nil {
		return err
	}
	c.tests = tests
	e.current.Store(c)
	return nil
}

// testsRevision hashes dir's *_test.rego files, so that a reload notices a
// change to the tests alone (they are not part of the policy's Revision).
func testsRevision(dir string) (string, error) {
	names, err := FilesWithTests(dir)
	if err != nil {
		return "", err
	}
	files := make([]file, 0, len(names))
	for _, name := range names {
		src, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return "", fmt.Errorf("read policy test file: %w", err)
		}
		files = append(files, file{name: name, src: src})
	}
	return revisionOf(files), nil
}

// Eval evaluates the policy for input. It returns an error — and callers must deny —
// when evaluation fails, exceeds the engine's timeout (see [WithTimeout]) or queue
// timeout, leaves allow undefined, or sets allow to anything but a boolean. A reason that is not a string is an error too,
// because it is a policy bug that would otherwise hide the explanation.
//
// The request is allowed when allow is true and the optional set deny is empty: a
// deny rule overrides every allow rule, in whichever file. When deny has messages
// and the policy gives no reason, the messages are the reason.
//
// A policy that decides on the input and its own rules alone (see [Engine.Cached])
// answers a request whose input, in every part the policy reads, equals one
// answered within [CacheTTL] with that answer again, without evaluating
// (Result.Cached). The cache belongs to the policy generation: a Reload that
// activates a new policy starts with none. Errors are never cached.
func (e *Engine) Eval(ctx context.Context, input map[string]any) (Result, error) {
	c := e.current.Load()
	if c.cache == nil {
		return e.evalWith(ctx, c, input)
	}
	key, ok := c.use.key(input)
	if ok {
		if res, hit := c.cache.get(key); hit {
			res.Cached = true
			return res, nil
		}
	}
	res, err := e.evalWith(ctx, c, input)
	if err == nil && ok {
		c.cache.put(key, res)
	}
	return res, err
}

// Cached says whether the active policy's decisions are cached and, when they are
// not, why: the policy calls a builtin whose answer can change between identical
// requests (time.now_ns, rand.intn, http.send, …, and the certificate and token
// checks that read the clock), reads input.time, or reads the input as a whole.
func (e *Engine) Cached() (bool, string) {
	c := e.current.Load()
	return c.cache != nil, c.use.why
}

// MayAllow reports whether some addresses of the destination could make the
// policy allow input: it evaluates the policy with input.destination.ips and
// input.destination.embedded_ipv4 unknown (OPA's partial evaluation), whatever
// input holds there. false means that no answer of a resolver could change the
// decision, so tpd refuses without looking the name up: a device the policy
// does not let reach a name cannot make tpd send DNS queries for it. true may
// still end in a denial once the addresses are known (Eval). An error is a
// failed evaluation; the caller denies.
//
// Answers are cached as Eval's are, keyed by the rest of the input.
func (e *Engine) MayAllow(ctx context.Context, input map[string]any) (bool, error) {
	c := e.current.Load()
	if c.partial == nil {
		return true, nil
	}
	in := maps.Clone(input)
	if d, ok := in["destination"].(map[string]any); ok {
		d = maps.Clone(d)
		delete(d, "ips")
		delete(d, "embedded_ipv4")
		in["destination"] = d
	}
	var key string
	cacheable := false
	if c.cache != nil {
		if key, cacheable = c.use.key(in); cacheable {
			key = "may\x00" + key // beside Eval's keys, which never start so
			if res, hit := c.cache.get(key); hit {
				return res.Allow, nil
			}
		}
	}
	v, err := ast.InterfaceToValue(in)
	if err != nil {
		return false, fmt.Errorf("policy input: %w", err)
	}
	var pqs *rego.PartialQueries
	err = e.bounded(ctx, c, func(evalCtx context.Context, halt topdown.Cancel) error {
		var err error
		pqs, err = c.partial.Partial(evalCtx, rego.EvalParsedInput(v), rego.EvalExternalCancel(halt))
		return err
	})
	if err != nil {
		return false, err
	}
	may := len(pqs.Queries) > 0
	if cacheable {
		c.cache.put(key, Result{Allow: may, Revision: c.revision})
	}
	return may, nil
}

// evalWith evaluates input against the policy generation c; extra options add
// tracers (see Explain).
func (e *Engine) evalWith(ctx context.Context, c *compiled, input map[string]any, extra ...rego.EvalOption) (Result, error) {
	res := Result{Revision: c.revision}
	// Converting the input here separates bad input from policy errors. It costs
	// the same as rego.EvalInput and allocates a little less (BenchmarkEvalInputForms).
	v, err := ast.InterfaceToValue(input)
	if err != nil {
		return res, fmt.Errorf("policy input: %w", err)
	}
	rs, err := e.run(ctx, c, v, extra)
	if err != nil {
		return res, err
	}
	if len(rs) != 1 || len(rs[0].Expressions) != 1 {
		return res, fmt.Errorf("policy (revision %s) defines nothing in package %s; allow is undefined", c.revision, Package)
	}
	doc, ok := rs[0].Expressions[0].Value.(map[string]any)
	if !ok {
		return res, fmt.Errorf("policy (revision %s): package %s is not an object", c.revision, Package)
	}
	allow, found := doc["allow"]
	if !found {
		return res, fmt.Errorf("policy (revision %s) leaves allow undefined; add `default allow := false`", c.revision)
	}
	b, ok := allow.(bool)
	if !ok {
		return res, fmt.Errorf("policy (revision %s) sets allow to %s, want a boolean", c.revision, describe(allow))
	}
	if reason, found := doc["reason"]; found {
		s, ok := reason.(string)
		if !ok {
			return res, fmt.Errorf("policy (revision %s) sets reason to %s, want a string", c.revision, describe(reason))
		}
		res.Reason = s
	}
	if deny, found := doc["deny"]; found {
		msgs, ok := deny.([]any)
		if !ok {
			return res, fmt.Errorf("policy (revision %s) sets deny to %s, want a set of strings", c.revision, describe(deny))
		}
		for _, m := range msgs {
			s, ok := m.(string)
			if !ok {
				return res, fmt.Errorf("policy (revision %s) adds %s to deny, want strings", c.revision, describe(m))
			}
			res.Deny = append(res.Deny, s)
		}
		slices.Sort(res.Deny)
	}
	res.IP = doc["ip"]
	res.Allow = b && len(res.Deny) == 0
	if len(res.Deny) > 0 && res.Reason == "" {
		res.Reason = strings.Join(res.Deny, "; ")
	}
	return res, nil
}

// Causes with which a budgetWatch cancels an evaluation.
var (
	errOverBudget = errors.New("evaluation time used up")
	errOverloaded = errors.New("no answer within the queue timeout")
)

// run waits for a free slot, then evaluates v with the time the evaluation itself
// uses bounded by e.timeout and the whole call, waiting included, by e.queueTimeout.
func (e *Engine) run(ctx context.Context, c *compiled, v ast.Value, extra []rego.EvalOption) (rs rego.ResultSet, err error) {
	err = e.bounded(ctx, c, func(evalCtx context.Context, halt topdown.Cancel) error {
		var err error
		rs, err = c.query.Eval(evalCtx, append([]rego.EvalOption{rego.EvalParsedInput(v), rego.EvalExternalCancel(halt)}, extra...)...)
		return err
	})
	return rs, err
}

// bounded runs eval, an evaluation of policy generation c, once a slot is
// free, with the time it uses bounded by e.timeout and the whole call, waiting
// included, by e.queueTimeout; eval must stop when halt is cancelled.
func (e *Engine) bounded(ctx context.Context, c *compiled, eval func(evalCtx context.Context, halt topdown.Cancel) error) error {
	deadline := time.Now().Add(e.queueTimeout)
	select {
	case e.slots <- struct{}{}: // a free slot: no timer needed
	default:
		wait := time.NewTimer(e.queueTimeout)
		select {
		case e.slots <- struct{}{}:
			wait.Stop()
		case <-ctx.Done():
			wait.Stop()
			return fmt.Errorf("policy evaluation (revision %s) abandoned before it started: %w", c.revision, ctx.Err())
		case <-wait.C:
			return fmt.Errorf("policy evaluation (revision %s) did not start within %s: %d evaluations were running and more were waiting, so tpd is overloaded: %w",
				c.revision, e.queueTimeout, cap(e.slots), context.DeadlineExceeded)
		}
	}
	defer func() { <-e.slots }()

	evalCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	w := &budgetWatch{budget: e.timeout, deadline: deadline, over: cancel}
	w.m.start()
	defer w.m.stop()
	defer w.stop()
	w.mu.Lock() // check may not run before w.t is set
	w.t = time.AfterFunc(min(e.timeout, time.Until(deadline)), w.check)
	w.mu.Unlock()
	// Without an external cancel, OPA starts a goroutine per evaluation to watch
	// the context; AfterFunc costs nothing until the context actually ends.
	halt := topdown.NewCancel()
	defer context.AfterFunc(evalCtx, halt.Cancel)()
	err := eval(evalCtx, halt)
	// OPA checks for cancellation only now and then, so an evaluation can finish
	// over its budget or after the deadline: late answers deny too. It cannot
	// have used more processor time than time has passed, so the clock is read
	// only when that much has.
	cause := context.Cause(evalCtx)
	overBudget := errors.Is(cause, errOverBudget) ||
		time.Since(w.m.wallStart) >= e.timeout && w.m.used() >= e.timeout
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("policy evaluation (revision %s) abandoned: %w", c.revision, errors.Join(ctx.Err(), err))
	case overBudget:
		return fmt.Errorf("policy evaluation (revision %s) did not finish within %s: %w", c.revision, e.timeout, errors.Join(context.DeadlineExceeded, err))
	case errors.Is(cause, errOverloaded) || !time.Now().Before(deadline):
		return fmt.Errorf("policy evaluation (revision %s) did not finish within %s of the request, waiting included, so tpd is overloaded: %w",
			c.revision, e.queueTimeout, errors.Join(context.DeadlineExceeded, err))
	case err != nil:
		return fmt.Errorf("policy evaluation (revision %s): %w", c.revision, err)
	}
	return nil
}

// budgetWatch cancels an evaluation once it has used its budget of processor time
// (see meter), checking when the budget would be used up had the evaluation had a
// processor all along, or once the call's deadline passes, whatever it used.
type budgetWatch struct {
	budget   time.Duration
	deadline time.Time
	over     context.CancelCauseFunc
	m        meter
	mu       sync.Mutex // guards done and the timer's re-arming
	done     bool
	t        *time.Timer
}

func (w *budgetWatch) check() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done {
		return
	}
	untilDeadline := time.Until(w.deadline)
	if untilDeadline <= 0 {
		w.over(errOverloaded)
		return
	}
	left := w.budget - w.m.used()
	if left <= 0 {
		w.over(errOverBudget)
		return
	}
	w.t.Reset(max(min(left, untilDeadline), time.Millisecond))
}

// stop ends the watch; over is not called after it returns.
func (w *budgetWatch) stop() {
	w.mu.Lock()
	w.done = true
	w.t.Stop()
	w.mu.Unlock()
}

func describe(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case string:
		return fmt.Sprintf("the string %q", v)
	case []any:
		return "an array"
	case map[string]any:
		return "an object"
	default:
		return fmt.Sprintf("%v (%T)", v, v)
	}
}

// forbiddenBuiltins reach the network. A policy decides on the input alone: TP has
// already resolved the destination, and a decision on the request path must not wait
// for other servers. Using one is a compile error ("undefined function").
var forbiddenBuiltins = []string{"http.send", "net.lookup_ip_addr"}

var capabilities = func() *ast.Capabilities {
	caps := ast.CapabilitiesForThisVersion()
	caps.Builtins = slices.DeleteFunc(slices.Clone(caps.Builtins), func(b *ast.Builtin) bool {
		return slices.Contains(forbiddenBuiltins, b.Name)
	})
	return caps
}()

type file struct {
	name string // base name
	src  []byte
}

// readDir reads the policy files of dir, sorted by name, and their revision.
func readDir(dir string) ([]file, string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, "", fmt.Errorf("read policy directory: %w", err)
	}
	var files []file
	for _, de := range entries { // os.ReadDir sorts by name
		name := de.Name()
		if !strings.HasSuffix(name, ".rego") || strings.HasSuffix(name, "_test.rego") || de.IsDir() {
			continue
		}
		src, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, "", fmt.Errorf("read policy file: %w", err)
		}
		files = append(files, file{name: name, src: src})
	}
	if len(files) == 0 {
		return nil, "", fmt.Errorf("policy directory %s holds no .rego files; every request would be denied", dir)
	}
	return files, revisionOf(files), nil
}

// revisionOf hashes names and contents with length prefixes, so no two different
// sets of files can produce the same byte stream.
func revisionOf(files []file) string {
	h := sha256.New()
	for _, f := range files {
		fmt.Fprintf(h, "%d:%s%d:", len(f.name), f.name, len(f.src))
		h.Write(f.src)
	}
	return hex.EncodeToString(h.Sum(nil))[:12]
}

func (e *Engine) compileDir(ctx context.Context, dir string) (*compiled, error) {
	files, revision, err := readDir(dir)
	if err != nil {
		return nil, err
	}
	return e.compileFiles(ctx, dir, files, revision)
}

func (e *Engine) compileFiles(ctx context.Context, dir string, files []file, revision string) (*compiled, error) {
	modules := make(map[string]*ast.Module, len(files))
	names := make([]string, 0, len(files))
	for _, f := range files {
		path := filepath.Join(dir, f.name)
		m, err := ast.ParseModuleWithOpts(path, string(f.src), ast.ParserOptions{RegoVersion: ast.RegoV1})
		if err != nil {
			return nil, fmt.Errorf("policy file %s does not parse: %w", path, err)
		}
		if !m.Package.Path.Equal(packagePath) {
			return nil, fmt.Errorf("policy file %s declares package %s; TP policy files must declare package %s",
				path, strings.TrimPrefix(m.Package.Path.String(), "data."), Package)
		}
		modules[path] = m
		names = append(names, f.name)
	}
	// Compiling here rather than inside rego.PrepareForEval keeps the compiler's
	// messages (file:line: message) free of OPA's bundle wording.
	compiler := ast.NewCompiler().WithDefaultRegoVersion(ast.RegoV1).WithCapabilities(capabilities)
	if compiler.Compile(modules); compiler.Failed() {
		return nil, fmt.Errorf("policy in %s does not compile: %w", dir, compiler.Errors)
	}
	pq, err := rego.New(
		rego.Query(query),
		rego.Compiler(compiler),
		rego.SetRegoVersion(ast.RegoV1),
		// A builtin that fails (a bad CIDR, a type error at run time) fails the
		// evaluation, and so denies, rather than quietly making a rule undefined.
		rego.StrictBuiltinErrors(true),
	).PrepareForEval(ctx)
	if err != nil {
		return nil, fmt.Errorf("prepare policy query: %w", err)
	}
	// A policy whose allow is no boolean fails this query's type check; it
	// fails every evaluation too (evalWith), so there is nothing to tell
	// before a lookup: partial stays nil and MayAllow says true.
	var partial *rego.PreparedPartialQuery
	if ppq, err := rego.New(
		rego.Query(mayAllowQuery),
		rego.Compiler(compiler),
		rego.SetRegoVersion(ast.RegoV1),
		rego.StrictBuiltinErrors(true),
		rego.Unknowns(unknownAddresses),
	).PrepareForPartial(ctx); err == nil {
		partial = &ppq
	}
	if err := checkTests(ctx, dir); err != nil {
		return nil, err
	}
	c := &compiled{query: pq, partial: partial, revision: revision, files: names, use: analyzeInput(compiler.Modules)}
	switch {
	case e.noCache:
		c.use.root, c.use.why = nil, "the decision cache is turned off"
	case c.use.root != nil:
		c.cache = newDecisionCache()
	}
	return c, nil
}

// testTimeout bounds each policy unit test run at load and reload.
const testTimeout = 10 * time.Second

// checkTests runs the *_test.rego files of dir, if there are any: a policy whose
// own tests fail is refused like one that does not compile.
func checkTests(ctx context.Context, dir string) error {
	if tests, err := FilesWithTests(dir); err != nil || len(tests) == 0 {
		return err
	}
	results, err := RunTests(ctx, dir, testTimeout)
	if err != nil {
		return err
	}
	var failed []string
	for _, r := range results {
		if !r.Pass && !r.Skipped {
			msg := r.Name + " (" + r.Location + ")"
			if r.Error != "" {
				msg += ": " + r.Error
			}
			failed = append(failed, msg)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("policy in %s fails %d of its %d tests: %s; run `tpd policy test` for details",
			dir, len(failed), len(results), strings.Join(failed, "; "))
	}
	return nil
}
