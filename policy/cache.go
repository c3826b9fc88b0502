package policy

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
)

// Bounds of a policy generation's decision cache (see decisionCache).
const (
	// CacheEntries bounds the decisions one policy generation keeps.
	CacheEntries = 4096
	// CacheTTL bounds how long a decision is reused. A cached decision is a pure
	// function of its key and the policy generation (see inputUse), so the TTL
	// is not what keeps it right: the deny list, the certificate's expiry and the
	// user's groups are checked or keyed on every request, and a new policy is a
	// new, empty cache. It only bounds how long a decision outlives the
	// requests that asked for it, should something the analysis cannot see ever
	// matter, and lets an idle cache's entries go.
	CacheTTL = 2 * time.Second
)

// timeDependentBuiltins read the clock although OPA does not mark them
// non-deterministic: they verify certificates or tokens against the current time.
var timeDependentBuiltins = []string{
	"crypto.x509.parse_and_verify_certificates",
	"crypto.x509.parse_and_verify_certificates_with_options",
	"io.jwt.decode_verify",
}

// inputUse is what a compiled policy reads of its input: the constant paths of
// every reference to input, as a trie. A policy whose decision may depend on
// anything else (a non-deterministic or clock-reading builtin, the request's time,
// the input as a whole or through a computed key) is not cacheable; why says so.
type inputUse struct {
	root *pathNode // nil: not cacheable
	why  string
}

// pathNode is one step of the input paths a policy reads. whole: the policy
// reads everything below it.
type pathNode struct {
	whole    bool
	children map[string]*pathNode
}

// analyzeInput inspects the compiled modules once, at prepare time.
func analyzeInput(modules map[string]*ast.Module) inputUse {
	root := &pathNode{}
	why := ""
	names := slices.Sorted(func(yield func(string) bool) {
		for name := range modules {
			if !yield(name) {
				return
			}
		}
	})
	for _, name := range names {
		ast.WalkRefs(modules[name], func(ref ast.Ref) bool {
			if why != "" {
				return true
			}
			if b, ok := ast.BuiltinMap[ref.String()]; ok && (b.Nondeterministic || slices.Contains(timeDependentBuiltins, b.Name)) {
				why = fmt.Sprintf("it calls %s, whose answer can change between two identical requests", b.Name)
				return true
			}
			if !ref.HasPrefix(ast.InputRootRef) {
				return false
			}
			n := root
			for _, t := range ref[1:] {
				s, ok := t.Value.(ast.String)
				if !ok {
					break // a computed key: everything below is read
				}
				if n == root && string(s) == "time" {
					why = "it reads input.time"
					return true
				}
				if n.children == nil {
					n.children = map[string]*pathNode{}
				}
				c := n.children[string(s)]
				if c == nil {
					c = &pathNode{}
					n.children[string(s)] = c
				}
				n = c
			}
			if n == root {
				why = "it reads the input as a whole or through a computed key"
				return true
			}
			n.whole = true
			return false
		})
	}
	if why != "" {
		return inputUse{why: why}
	}
	return inputUse{root: root}
}

// key renders the parts of input the policy reads, canonically (sorted keys,
// length-prefixed strings, absent keys left out, so present-but-empty differs
// from absent). ok is false for a value it cannot render; such inputs are
// evaluated uncached.
func (u inputUse) key(input map[string]any) (string, bool) {
	var b strings.Builder
	b.Grow(256)
	ok := writeKey(&b, input, u.root)
	return b.String(), ok
}

func writeKey(b *strings.Builder, v any, n *pathNode) bool {
	m, isMap := v.(map[string]any)
	if n.whole || !isMap {
		return writeValue(b, v)
	}
	b.WriteByte('{')
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range n.children {
			if !yield(k) {
				return
			}
		}
	}) {
		val, found := m[k]
		if !found {
			continue
		}
		writeString(b, k)
		if !writeKey(b, val, n.children[k]) {
			return false
		}
	}
	b.WriteByte('}')
	return true
}

func writeValue(b *strings.Builder, v any) bool {
	switch v := v.(type) {
	case nil:
		b.WriteByte('n')
	case bool:
		if v {
			b.WriteByte('t')
		} else {
			b.WriteByte('f')
		}
	case string:
		writeString(b, v)
	case int:
		b.WriteByte('i')
		b.WriteString(strconv.Itoa(v))
		b.WriteByte(';')
	case int64:
		b.WriteByte('i')
		b.WriteString(strconv.FormatInt(v, 10))
		b.WriteByte(';')
	case float64:
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return false
		}
		b.WriteByte('d')
		b.WriteString(strconv.FormatFloat(v, 'g', -1, 64))
		b.WriteByte(';')
	case []any:
		b.WriteByte('[')
		for _, e := range v {
			if !writeValue(b, e) {
				return false
			}
		}
		b.WriteByte(']')
	case []string:
		b.WriteByte('[')
		for _, e := range v {
			writeString(b, e)
		}
		b.WriteByte(']')
	case map[string]any:
		b.WriteByte('{')
		for _, k := range slices.Sorted(func(yield func(string) bool) {
			for k := range v {
				if !yield(k) {
					return
				}
			}
		}) {
			writeString(b, k)
			if !writeValue(b, v[k]) {
				return false
			}
		}
		b.WriteByte('}')
	default:
		return false
	}
	return true
}

func writeString(b *strings.Builder, s string) {
	b.WriteByte('s')
	b.WriteString(strconv.Itoa(len(s)))
	b.WriteByte(':')
	b.WriteString(s)
}

// decisionCache keeps one policy generation's answers, keyed by what the policy
// reads of the input. It holds at most CacheEntries in two halves: when the newer
// half is full it becomes the older one and the older is dropped, so a flood of
// distinct requests costs a bounded amount of memory and never a scan. Only
// successful evaluations are stored; an error is never cached.
type decisionCache struct {
	mu       sync.Mutex
	cur, old map[string]cacheEntry
	now      func() time.Time
}

type cacheEntry struct {
	res     Result
	expires time.Time
}

func newDecisionCache() *decisionCache {
	return &decisionCache{cur: make(map[string]cacheEntry), now: time.Now}
}

func (c *decisionCache) get(key string) (Result, bool) {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.cur[key]
	if !ok {
		e, ok = c.old[key]
	}
	if !ok || !now.Before(e.expires) {
		return Result{}, false
	}
	res := e.res
	res.Deny = slices.Clone(res.Deny) // callers own what they get
	return res, true
}

func (c *decisionCache) put(key string, res Result) {
	res.Deny = slices.Clone(res.Deny)
	expires := c.now().Add(CacheTTL)
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.cur) >= CacheEntries/2 {
		c.old, c.cur = c.cur, make(map[string]cacheEntry, CacheEntries/2)
	}
	c.cur[key] = cacheEntry{res: res, expires: expires}
}

// len is the number of entries held, expired ones included (tests).
func (c *decisionCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.cur) + len(c.old)
}
