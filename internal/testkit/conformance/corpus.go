package conformance

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
)

// File is one corpus file: a group of server cases (Cases), client cases
// (ClientCases) or agent cases (AgentCases), one kind only.
type File struct {
	Name        string       `json:"-"`
	Group       string       `json:"group"`
	Summary     string       `json:"summary"`
	Cases       []Case       `json:"cases,omitempty"`
	ClientCases []ClientCase `json:"client_cases,omitempty"`
	AgentCases  []AgentCase  `json:"agent_cases,omitempty"`
}

// Case is one exchange with a server: steps run in order on named streams.
type Case struct {
	ID        string `json:"id"`
	Section   string `json:"section"`   // of docs/PROTOCOL.md, e.g. "12.2"
	Transport string `json:"transport"` // "tls", "quic" or "both"
	// Needs names the parts of the fixture the case relies on beyond a server
	// that speaks the protocol (Fixture parts): "resolver" when it sends a
	// name the fixture's resolver answers, "policy" when the answer it
	// expects is the fixture's policy refusing. A runner against a server set
	// up otherwise skips such cases by this list; it never has to read the
	// steps to know that a case would make the server resolve a name.
	Needs   []string `json:"needs,omitempty"`
	Summary string   `json:"summary"`
	Steps   []Step   `json:"steps"`
}

// Fixture parts a case may need (Case.Needs).
const (
	NeedsResolver = "resolver"
	NeedsPolicy   = "policy"
)

// Step is one action on one stream. Exactly one action field is set.
type Step struct {
	// On names the stream; "main" when empty. A stream opens at its first step:
	// over TLS a new connection, over QUIC a new client-initiated bidirectional
	// stream on the connection Conn (or a unidirectional one for SendUni).
	On string `json:"on,omitempty"`
	// As is the identity the stream's connection presents: "alice" when empty.
	As string `json:"as,omitempty"`
	// Conn names the QUIC connection of a new stream; As when empty.
	Conn string `json:"conn,omitempty"`
	// QUICDatagrams false (QUIC): the new connection does not enable DATAGRAM
	// frames (RFC 9221); nil or true enables them.
	QUICDatagrams *bool `json:"quic_datagrams,omitempty"`
	// AcceptStream (QUIC): the stream On is not opened but is the next stream
	// the server initiates on the connection of the stream named here.
	AcceptStream string `json:"accept_stream,omitempty"`
	// Transport limits the step to "tls" or "quic"; empty runs it on both.
	Transport string `json:"transport,omitempty"`

	Send         json.RawMessage `json:"send,omitempty"`          // a JSON object, framed (section 2)
	SendBody     *string         `json:"send_body,omitempty"`     // exact body text, framed
	SendRaw      *string         `json:"send_raw,omitempty"`      // hex, sent as is
	SendDatagram *string         `json:"send_datagram,omitempty"` // hex payload in a QUIC DATAGRAM frame of the stream's flow
	SendUni      *string         `json:"send_uni,omitempty"`      // hex, on a new unidirectional QUIC stream
	CloseWrite   bool            `json:"close_write,omitempty"`   // TLS close_notify, QUIC FIN

	Expect            *FrameExpect `json:"expect,omitempty"`              // one frame
	ExpectRaw         *string      `json:"expect_raw,omitempty"`          // exactly these bytes (hex)
	ExpectDatagram    *string      `json:"expect_datagram,omitempty"`     // one UDP payload (hex), capsule or DATAGRAM frame
	ExpectEnd         string       `json:"expect_end,omitempty"`          // "clean", "abort" or "closed"
	QUICCode          *uint64      `json:"quic_code,omitempty"`           // with expect_end "abort": the RESET_STREAM code over QUIC
	ExpectAlert       *Alert       `json:"expect_alert,omitempty"`        // the handshake is refused with this TLS alert
	ExpectStopSending *uint64      `json:"expect_stop_sending,omitempty"` // QUIC: STOP_SENDING with this code on stream On
}

// Alert is a TLS alert (RFC 8446 section 6): over QUIC it arrives as the
// CRYPTO_ERROR 0x100+Code.
type Alert struct {
	Name string `json:"name"`
	Code uint8  `json:"code"`
}

// FrameExpect says what a frame must hold.
type FrameExpect struct {
	// Match is a JSON object the frame must match: every field in it must be in
	// the frame with an equal value; objects nested in it match partially too,
	// arrays and other values exactly. ${var} is substituted first.
	Match json.RawMessage `json:"match"`
	// Exact: the frame has no top-level field besides those in Match.
	Exact bool `json:"exact,omitempty"`
	// Present and Absent list fields (dotted paths, "end.code") that must be, or
	// must not be, in the frame.
	Present []string `json:"present,omitempty"`
	Absent  []string `json:"absent,omitempty"`
	// Pattern maps a field (dotted path) to a regular expression (RE2, anchored
	// by the author) its string value must match.
	Pattern map[string]string `json:"pattern,omitempty"`
	// Capture stores a field's value (dotted path) as a variable for later steps.
	Capture map[string]string `json:"capture,omitempty"`
}

// ClientCase is one exchange a client must handle: the runner plays the server.
type ClientCase struct {
	ID        string `json:"id"`
	Section   string `json:"section"`
	Transport string `json:"transport"`
	Summary   string `json:"summary"`
	// Request is what the client's user asks for: a dial of Net Host:Port.
	Request struct {
		Net  string `json:"net"`
		Host string `json:"host"`
		Port int    `json:"port"`
	} `json:"request"`
	// ExpectRequest is what the client's hello must hold.
	ExpectRequest FrameExpect `json:"expect_request"`
	// The server's answer: exactly one of Reply (a JSON object, framed),
	// ReplyBody (exact body text, framed) and ReplyRaw (hex, as is).
	Reply     json.RawMessage `json:"reply,omitempty"`
	ReplyBody *string         `json:"reply_body,omitempty"`
	ReplyRaw  *string         `json:"reply_raw,omitempty"`
	// After is what the server does after its answer: "echo" (relays every byte
	// back until the client half-closes, then ends cleanly; over QUIC it also
	// returns every DATAGRAM frame as it came), "close" (a clean
	// end: close_notify, FIN), "abort" (TLS: a TCP reset without close_notify;
	// QUIC: RESET_STREAM and STOP_SENDING 0x7) or "truncate" (TLS only: a TCP
	// FIN without close_notify), these two once the client's first byte after
	// the answer arrived (a QUIC reset may discard data written before it).
	After string `json:"after"`
	// Outcome is "ok" (the dial returns a connection that carries bytes both
	// ways), "error" (the dial fails) or "cut" (the dial succeeds, the client
	// writes one byte, and its next read fails with an error, not a clean end
	// of stream); Mentions are texts the error must contain.
	Outcome  string   `json:"outcome"`
	Mentions []string `json:"mentions,omitempty"`
}

// AgentCase is one exchange an agent must handle: the runner plays the server
// to an agent that exposes one name (README: the agent fixture).
type AgentCase struct {
	ID        string `json:"id"`
	Section   string `json:"section"`
	Transport string `json:"transport"`
	Summary   string `json:"summary"`
	// ExpectListen is what the agent's listen hello must hold, at the start and
	// at every reconnect.
	ExpectListen FrameExpect `json:"expect_listen"`
	// Reply answers the first listen (a JSON object, framed).
	Reply json.RawMessage `json:"reply"`
	Steps []AgentStep     `json:"steps"`
}

// AgentStep is one action of the played server. Exactly one action field is set.
type AgentStep struct {
	// On names a session stream; "session" when empty.
	On string `json:"on,omitempty"`
	// Transport limits the step to "tls" or "quic"; empty runs it on both.
	Transport string `json:"transport,omitempty"`

	Control     json.RawMessage `json:"control,omitempty"`      // a frame on the control stream
	OpenSession json.RawMessage `json:"open_session,omitempty"` // a session with this header (README)
	SendRaw     *string         `json:"send_raw,omitempty"`     // hex, on the session stream
	CloseWrite  bool            `json:"close_write,omitempty"`  // on the session stream

	ExpectRaw       *string `json:"expect_raw,omitempty"`       // on the session stream
	ExpectEnd       string  `json:"expect_end,omitempty"`       // of the session stream: "clean", "abort" or "closed"
	QUICCode        *uint64 `json:"quic_code,omitempty"`        // with expect_end "abort"
	ExpectReconnect bool    `json:"expect_reconnect,omitempty"` // a new listen arrives
	ExpectExit      bool    `json:"expect_exit,omitempty"`      // the agent stops for good
}

func (s AgentStep) actions() int {
	n := 0
	for _, set := range []bool{s.Control != nil, s.OpenSession != nil, s.SendRaw != nil, s.CloseWrite,
		s.ExpectRaw != nil, s.ExpectEnd != "", s.ExpectReconnect, s.ExpectExit} {
		if set {
			n++
		}
	}
	return n
}

func (c AgentCase) check() error {
	var errs []error
	if c.Section == "" || c.Summary == "" || c.Reply == nil || len(c.Steps) == 0 {
		errs = append(errs, errors.New("section, summary, reply and steps are required"))
	}
	if err := checkTransport(c.Transport, false); err != nil {
		errs = append(errs, err)
	}
	for i, s := range c.Steps {
		if n := s.actions(); n != 1 {
			errs = append(errs, fmt.Errorf("step %d has %d actions, not 1", i+1, n))
		}
		if err := checkTransport(s.Transport, true); err != nil {
			errs = append(errs, fmt.Errorf("step %d: %w", i+1, err))
		}
		for _, h := range []*string{s.SendRaw, s.ExpectRaw} {
			if h != nil {
				if _, err := Hex(*h); err != nil {
					errs = append(errs, fmt.Errorf("step %d: %w", i+1, err))
				}
			}
		}
		if s.ExpectEnd != "" && !slices.Contains([]string{"clean", "abort", "closed"}, s.ExpectEnd) {
			errs = append(errs, fmt.Errorf("step %d: expect_end %q", i+1, s.ExpectEnd))
		}
	}
	return errors.Join(errs...)
}

// Load reads every *.json file of dir, sorted by name.
func Load(dir string) ([]File, error) {
	names, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	var files []File
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			return nil, err
		}
		var f File
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&f); err != nil {
			return nil, fmt.Errorf("%s: %w", n, err)
		}
		f.Name = filepath.Base(n)
		files = append(files, f)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no corpus files (*.json) in %s", dir)
	}
	return files, nil
}

// Check reports what is wrong with the corpus as a whole: duplicate ids, bad
// transports, steps without exactly one action, hex that does not decode.
func Check(files []File) error {
	var errs []error
	ids := map[string]string{}
	id := func(file, id string) {
		if id == "" {
			errs = append(errs, fmt.Errorf("%s: a case without id", file))
		} else if prev, dup := ids[id]; dup {
			errs = append(errs, fmt.Errorf("%s: case id %q is also in %s", file, id, prev))
		}
		ids[id] = file
	}
	for _, f := range files {
		kinds := 0
		for _, n := range []int{len(f.Cases), len(f.ClientCases), len(f.AgentCases)} {
			if n > 0 {
				kinds++
			}
		}
		if kinds != 1 {
			errs = append(errs, fmt.Errorf("%s: needs cases, client_cases or agent_cases, one kind only", f.Name))
		}
		for _, c := range f.AgentCases {
			id(f.Name, c.ID)
			if err := c.check(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %s: %w", f.Name, c.ID, err))
			}
		}
		for _, c := range f.Cases {
			id(f.Name, c.ID)
			if err := c.check(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %s: %w", f.Name, c.ID, err))
			}
		}
		for _, c := range f.ClientCases {
			id(f.Name, c.ID)
			if err := c.check(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %s: %w", f.Name, c.ID, err))
			}
		}
	}
	return errors.Join(errs...)
}

func checkTransport(t string, allowEmpty bool) error {
	if t == "tls" || t == "quic" || t == "both" && !allowEmpty || t == "" && allowEmpty {
		return nil
	}
	return fmt.Errorf("transport %q", t)
}

func (c Case) check() error {
	var errs []error
	if c.Section == "" || c.Summary == "" || len(c.Steps) == 0 {
		errs = append(errs, errors.New("section, summary and steps are required"))
	}
	if err := checkTransport(c.Transport, false); err != nil {
		errs = append(errs, err)
	}
	for _, n := range c.Needs {
		if n != NeedsResolver && n != NeedsPolicy {
			errs = append(errs, fmt.Errorf("needs %q: the fixture parts are %q and %q", n, NeedsResolver, NeedsPolicy))
		}
	}
	for i, s := range c.Steps {
		if n := s.actions(); n != 1 {
			errs = append(errs, fmt.Errorf("step %d has %d actions, not 1", i+1, n))
		}
		if err := checkTransport(s.Transport, true); err != nil {
			errs = append(errs, fmt.Errorf("step %d: %w", i+1, err))
		}
		for _, h := range []*string{s.SendRaw, s.SendDatagram, s.SendUni, s.ExpectRaw, s.ExpectDatagram} {
			if h != nil {
				if _, err := Hex(*h); err != nil {
					errs = append(errs, fmt.Errorf("step %d: %w", i+1, err))
				}
			}
		}
		if s.ExpectEnd != "" && !slices.Contains([]string{"clean", "abort", "closed"}, s.ExpectEnd) {
			errs = append(errs, fmt.Errorf("step %d: expect_end %q", i+1, s.ExpectEnd))
		}
		if s.QUICCode != nil && s.ExpectEnd != "abort" {
			errs = append(errs, fmt.Errorf("step %d: quic_code goes with expect_end \"abort\"", i+1))
		}
	}
	return errors.Join(errs...)
}

// actions counts the action fields set.
func (s Step) actions() int {
	n := 0
	for _, set := range []bool{s.Send != nil, s.SendBody != nil, s.SendRaw != nil, s.SendDatagram != nil, s.SendUni != nil,
		s.CloseWrite, s.Expect != nil, s.ExpectRaw != nil, s.ExpectDatagram != nil, s.ExpectEnd != "",
		s.ExpectAlert != nil, s.ExpectStopSending != nil} {
		if set {
			n++
		}
	}
	return n
}

func (c ClientCase) check() error {
	var errs []error
	if c.Section == "" || c.Summary == "" {
		errs = append(errs, errors.New("section and summary are required"))
	}
	if err := checkTransport(c.Transport, false); err != nil {
		errs = append(errs, err)
	}
	n := 0
	for _, set := range []bool{c.Reply != nil, c.ReplyBody != nil, c.ReplyRaw != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		errs = append(errs, fmt.Errorf("%d of reply, reply_body and reply_raw are set, not 1", n))
	}
	if c.ReplyRaw != nil {
		if _, err := Hex(*c.ReplyRaw); err != nil {
			errs = append(errs, err)
		}
	}
	if !slices.Contains([]string{"echo", "close", "abort", "truncate"}, c.After) {
		errs = append(errs, fmt.Errorf("after %q", c.After))
	}
	if c.After == "truncate" && c.Transport != "tls" {
		errs = append(errs, errors.New("after \"truncate\" is TLS only"))
	}
	if !slices.Contains([]string{"ok", "error", "cut"}, c.Outcome) {
		errs = append(errs, fmt.Errorf("outcome %q", c.Outcome))
	}
	return errors.Join(errs...)
}

// Transports lists the transports a case runs on.
func Transports(t string) []string {
	if t == "both" {
		return []string{"tls", "quic"}
	}
	return []string{t}
}

// Hex decodes h, ignoring white space.
func Hex(h string) ([]byte, error) {
	b, err := hex.DecodeString(strings.Join(strings.Fields(h), ""))
	if err != nil {
		return nil, fmt.Errorf("hex %q: %w", h, err)
	}
	return b, nil
}

// Vars are a case's variables: fixture values (numbers or strings) and captures.
type Vars map[string]any

var (
	quotedVar = regexp.MustCompile(`"\$\{([a-z0-9_]+)\}"`)
	inlineVar = regexp.MustCompile(`\$\{([a-z0-9_]+)\}`)
)

// SubstJSON substitutes variables in JSON text: a string that is exactly
// "${name}" becomes the variable's JSON value (a number stays a number); any
// other ${name} inside a string becomes the variable's text.
func (v Vars) SubstJSON(text []byte) ([]byte, error) {
	var errs []error
	out := quotedVar.ReplaceAllFunc(text, func(m []byte) []byte {
		name := string(quotedVar.FindSubmatch(m)[1])
		val, ok := v[name]
		if !ok {
			errs = append(errs, fmt.Errorf("unknown variable %q", name))
			return m
		}
		b, _ := json.Marshal(val)
		return b
	})
	s, err := v.Subst(string(out))
	return []byte(s), errors.Join(append(errs, err)...)
}

// Subst substitutes ${name} in text with the variables' text.
func (v Vars) Subst(text string) (string, error) {
	var errs []error
	out := inlineVar.ReplaceAllStringFunc(text, func(m string) string {
		name := inlineVar.FindStringSubmatch(m)[1]
		val, ok := v[name]
		if !ok {
			errs = append(errs, fmt.Errorf("unknown variable %q", name))
			return m
		}
		return fmt.Sprint(val)
	})
	return out, errors.Join(errs...)
}

// FrameBody is the body a Send step sends: the object's JSON text after
// substitution, compacted (keys in the order written).
func (v Vars) FrameBody(obj json.RawMessage) ([]byte, error) {
	text, err := v.SubstJSON(obj)
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	if err := json.Compact(&out, text); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// Frame prefixes body with its length (section 2).
func Frame(body []byte) []byte {
	return append([]byte{byte(len(body) >> 8), byte(len(body))}, body...)
}

// Check reports how the frame body differs from what e expects (nil: it
// matches) and returns the captures, stored into vars as well.
func (e *FrameExpect) Check(body []byte, vars Vars) error {
	got, err := decodeObject(body)
	if err != nil {
		return fmt.Errorf("frame body %q is not one JSON object: %w", body, err)
	}
	var errs []error
	if e.Match != nil {
		text, err := vars.SubstJSON(e.Match)
		if err != nil {
			return err
		}
		want, err := decodeObject(text)
		if err != nil {
			return fmt.Errorf("match %s: %w", e.Match, err)
		}
		if err := match(want, got, ""); err != nil {
			errs = append(errs, err)
		}
		if e.Exact {
			for k := range got {
				if _, ok := want[k]; !ok {
					errs = append(errs, fmt.Errorf("field %q is not expected", k))
				}
			}
		}
	}
	for _, p := range e.Present {
		if _, ok := lookup(got, p); !ok {
			errs = append(errs, fmt.Errorf("field %q is missing", p))
		}
	}
	for _, p := range e.Absent {
		if val, ok := lookup(got, p); ok {
			errs = append(errs, fmt.Errorf("field %q is present (%v), expected absent", p, val))
		}
	}
	for p, re := range e.Pattern {
		val, ok := lookup(got, p)
		s, isStr := val.(string)
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("field %q is missing (pattern %s)", p, re))
		case !isStr:
			errs = append(errs, fmt.Errorf("field %q is %v, not a string (pattern %s)", p, val, re))
		case !regexp.MustCompile(re).MatchString(s):
			errs = append(errs, fmt.Errorf("field %q is %q, which does not match %s", p, s, re))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w\n  frame: %s", err, body)
	}
	for p, name := range e.Capture {
		val, ok := lookup(got, p)
		if !ok {
			return fmt.Errorf("field %q to capture is missing\n  frame: %s", p, body)
		}
		vars[name] = val
	}
	return nil
}

func decodeObject(b []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	if m == nil {
		return nil, errors.New("not an object")
	}
	if dec.InputOffset() != int64(len(b)) {
		return nil, errors.New("bytes after the object")
	}
	return m, nil
}

func lookup(m map[string]any, path string) (any, bool) {
	var cur any = m
	for _, k := range strings.Split(path, ".") {
		obj, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = obj[k]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// match compares want with got: objects partially, everything else exactly.
func match(want, got any, path string) error {
	name := path
	if name == "" {
		name = "frame"
	}
	switch w := want.(type) {
	case map[string]any:
		g, ok := got.(map[string]any)
		if !ok {
			return fmt.Errorf("%s is %s, expected an object", name, show(got))
		}
		var errs []error
		for _, k := range sortedKeys(w) {
			p := k
			if path != "" {
				p = path + "." + k
			}
			gv, ok := g[k]
			if !ok {
				errs = append(errs, fmt.Errorf("field %q is missing, expected %s", p, show(w[k])))
				continue
			}
			if err := match(w[k], gv, p); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	case []any:
		g, ok := got.([]any)
		if !ok || len(g) != len(w) {
			return fmt.Errorf("field %q is %s, expected %s", name, show(got), show(want))
		}
		for i := range w {
			if err := match(w[i], g[i], fmt.Sprintf("%s[%d]", name, i)); err != nil {
				return err
			}
		}
		return nil
	case json.Number:
		if g, ok := got.(json.Number); ok && numEqual(w, g) {
			return nil
		}
	default:
		if want == got {
			return nil
		}
	}
	return fmt.Errorf("field %q is %s, expected %s", name, show(got), show(want))
}

// numEqual compares numbers as written: the protocol's integers are written as
// integers, so 22.0 is not 22.
func numEqual(a, b json.Number) bool { return a == b }

func show(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}

func sortedKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
