package wire

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
)

// ALPN is the TLS application protocol that selects the proxy on the shared port.
const ALPN = "tp/1"

// Version is the wire protocol version this package speaks.
const Version = 1

// MaxHelloSize bounds the JSON body of a hello in either direction, in bytes.
const MaxHelloSize = 16384

// MaxEarlyData bounds the bytes a client may send after a TCP dial's hello
// before it has read the server's answer (docs/PROTOCOL.md, section 6.5). A
// server that refuses discards at least a hello and this much before it closes.
const MaxEarlyData = 16384

// MaxHostLen is the longest host a client may ask for (a full DNS name).
const MaxHostLen = 253

// Error codes carried by a server hello with ok=false. They are part of the protocol:
// clients may switch on them, people read the accompanying reason.
const (
	CodeBadRequest         = "bad_request"
	CodeHelloTooLarge      = "hello_too_large"
	CodeHelloTimeout       = "hello_timeout"
	CodeUnsupportedVersion = "unsupported_version"
	CodeUnknownOp          = "unknown_op"
	CodeUnsupportedNetwork = "unsupported_network"
	CodeUnauthenticated    = "unauthenticated"
	CodePolicyDenied       = "policy_denied"
	CodeResolveFailed      = "resolve_failed"
	CodeDialRefused        = "dial_refused"
	CodeDialTimeout        = "dial_timeout"
	CodeDialFailed         = "dial_failed"
	CodeInternal           = "internal"
)

// Codes for refusals of a dial decided by the server's own rules and its policy
// engine.
const (
	// CodeSelfDial refuses a destination that is one of this server's own listeners
	// (its public port, its CA and enrollment endpoints live there too).
	CodeSelfDial = "self_dial"
	// CodePolicyError refuses a request whose policy evaluation failed, timed out or
	// left the decision undefined: the server fails closed.
	CodePolicyError = "policy_error"
)

// OpDial asks the server to open a connection to host:port.
const OpDial = "dial"

// OpWhy asks how a session of the same identity was cut off (its id came with the
// dial's ok): the answer's End says who ended it and why.
const OpWhy = "why"

// OpBye says that the client is done with its QUIC connection: the server
// answers once it has served every other stream of the connection to its end,
// so that the client's CONNECTION_CLOSE, which discards what the server has
// not read yet, comes after the last byte and FIN of each session. It takes
// no fields.
const OpBye = "bye"

// ClientHello is the first message on a proxy connection, sent by the client.
type ClientHello struct {
	V  int    `json:"v"`
	Op string `json:"op"`
	// Net, Host and Port are left out when empty: ops "listen", "accept" and
	// "why" must not carry the fields they do not take (docs/PROTOCOL.md 3.4–3.6),
	// and a server may refuse them even when empty.
	Net  string `json:"net,omitempty"`
	Host string `json:"host,omitempty"`
	Port int    `json:"port,omitempty"`
	// Names (op "listen") are the reverse names an agent registers; Session (op
	// "accept") pairs a data connection with an announced session. See reverse_wire.go.
	Names   []string `json:"names,omitempty"`
	Session string   `json:"session,omitempty"`
	// Public (op "listen") also exposes some of Names publicly (see PublicSpec).
	Public []PublicSpec `json:"public,omitempty"`
	// UDP (op "listen") lists the Names whose local service is UDP; the others
	// are TCP (reverse_udp.go).
	UDP []string `json:"udp,omitempty"`
}

// ServerHello answers a ClientHello. After OK, the connection carries raw bytes.
type ServerHello struct {
	V      int    `json:"v"`
	OK     bool   `json:"ok"`
	Code   string `json:"code,omitempty"`
	Reason string `json:"reason,omitempty"`
	// Names answers op "listen": the full reverse names now registered.
	Names []string `json:"names,omitempty"`
	// E2E answers a dial of a protected reverse name: the client runs TLS with the
	// agent inside this stream (docs/PROTOCOL.md, reverse listeners).
	E2E bool `json:"e2e,omitempty"`
	// Flow answers a UDP dial over QUIC when datagrams travel in DATAGRAM frames:
	// the flow id they carry (udpwire.go). Absent: capsules on the stream only.
	Flow *uint64 `json:"flow,omitempty"`
	// Session answers a dial: the session's id, for a later op "why".
	Session string `json:"session,omitempty"`
	// End answers op "why": how the session was cut off.
	End *SessionEnd `json:"end,omitempty"`
}

// HelloError is a protocol-level refusal. The server sends it to the client as a
// server hello with ok=false; Reason is written for a person.
type HelloError struct {
	Code   string
	Reason string
}

func (e *HelloError) Error() string {
	if e.Reason == "" {
		return e.Code
	}
	return e.Code + ": " + e.Reason
}

// Errorf is a HelloError with code and a reason formatted for people.
func Errorf(code, format string, args ...any) *HelloError {
	return &HelloError{Code: code, Reason: fmt.Sprintf(format, args...)}
}

// Validate reports whether h is a request this version of the protocol accepts.
// The returned error is a *HelloError.
func (h ClientHello) Validate() error {
	if h.V != Version {
		return Errorf(CodeUnsupportedVersion, "protocol version %d is not supported; this server speaks version %d", h.V, Version)
	}
	switch h.Op {
	case OpDial:
		if h.Names != nil || h.Session != "" || h.Public != nil || h.UDP != nil {
			return Errorf(CodeBadRequest, "fields \"names\", \"public\", \"udp\" and \"session\" belong to ops \"listen\" and \"accept\", not \"dial\"")
		}
	case OpListen, OpAccept:
		return h.validateReverse()
	case OpWhy:
		if h.Net != "" || h.Host != "" || h.Port != 0 || h.Names != nil || h.Public != nil || h.UDP != nil {
			return Errorf(CodeBadRequest, "op \"why\" takes only a session")
		}
		return validSessionID(h.Session)
	case OpBye:
		if h.Net != "" || h.Host != "" || h.Port != 0 || h.Names != nil || h.Public != nil || h.UDP != nil || h.Session != "" {
			return Errorf(CodeBadRequest, "op \"bye\" takes no fields")
		}
		return nil
	default:
		return Errorf(CodeUnknownOp, "operation %q is not known; expected %q, %q, %q, %q or %q", h.Op, OpDial, OpListen, OpAccept, OpWhy, OpBye)
	}
	if h.Net != "tcp" && h.Net != "udp" { // udp: a UDP flow (udp.go)
		return Errorf(CodeUnsupportedNetwork, "network %q is not supported; expected \"tcp\" or \"udp\"", h.Net)
	}
	if err := ValidHost(h.Host); err != nil {
		return err
	}
	if h.Port < 1 || h.Port > 65535 {
		return Errorf(CodeBadRequest, "port %d is out of range 1..65535", h.Port)
	}
	return nil
}

// ValidHost accepts printable ASCII without spaces: DNS names (IDNs as A-labels)
// and IP literals without brackets.
func ValidHost(host string) error {
	if host == "" {
		return Errorf(CodeBadRequest, "host is empty")
	}
	if len(host) > MaxHostLen {
		return Errorf(CodeBadRequest, "host is %d bytes long; the limit is %d", len(host), MaxHostLen)
	}
	for i := 0; i < len(host); i++ {
		if c := host[i]; c <= ' ' || c >= 0x7f {
			return Errorf(CodeBadRequest, "host contains byte 0x%02x at offset %d; only printable ASCII without spaces is allowed", c, i)
		}
	}
	return nil
}

// readFrame reads one length-prefixed frame body.
func readFrame(r io.Reader) ([]byte, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(hdr[:]))
	if n == 0 {
		return nil, Errorf(CodeBadRequest, "hello length is zero")
	}
	if n > MaxHelloSize {
		return nil, Errorf(CodeHelloTooLarge, "hello is %d bytes; the limit is %d", n, MaxHelloSize)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return body, nil
}

func writeFrame(w io.Writer, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(body) > MaxHelloSize {
		return Errorf(CodeHelloTooLarge, "hello is %d bytes; the limit is %d", len(body), MaxHelloSize)
	}
	buf := make([]byte, 2, 2+len(body))
	binary.BigEndian.PutUint16(buf, uint16(len(body)))
	_, err = w.Write(append(buf, body...))
	return err
}

// ReadClientHello reads and validates one client hello. Protocol violations are
// returned as *HelloError; I/O errors (including deadlines) are returned as they come.
//
// Decoding is strict (strictJSON), as for every frame: exact field names, no
// unknown, duplicate or null field, nothing after the object.
func ReadClientHello(r io.Reader) (ClientHello, error) {
	body, err := readFrame(r)
	if err != nil {
		return ClientHello{}, err
	}
	var h ClientHello
	if err := strictJSON(body, &h); err != nil {
		return ClientHello{}, Errorf(CodeBadRequest, "malformed hello: %v", err)
	}
	if err := h.Validate(); err != nil {
		return ClientHello{}, err
	}
	return h, nil
}

// strictJSON decodes body, exactly one JSON object, into v, a pointer to a
// struct, as strictly as docs/PROTOCOL.md (section 2.2) lets a receiver be: field
// names exactly as v's json tags (encoding/json alone would accept "HOST" for
// "host"), no unknown or duplicate field, no null, nothing after the object.
// Objects inside it (fields that are structs or pointers to structs) are decoded
// the same way; a type with its own UnmarshalJSON decodes itself.
func strictJSON(body []byte, v any) error {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.Elem().Kind() != reflect.Struct {
		return fmt.Errorf("strictJSON needs a pointer to a struct, not %T", v)
	}
	// Fast path: a body that is exactly what encoding v again gives (what TP's
	// own peers send) has field names exactly as the tags, no unknown, duplicate
	// or null field, and nothing after the object. The token-by-token check
	// below costs several times a plain decode, on every new tunnel's hellos.
	if json.Unmarshal(body, v) == nil {
		if again, err := json.Marshal(v); err == nil && bytes.Equal(again, body) {
			return nil
		}
	}
	rv.Elem().SetZero()
	return strictDecode(body, v)
}

// strictDecode is strictJSON without its fast path: every body goes through
// the token-by-token check.
func strictDecode(body []byte, v any) error {
	st := reflect.ValueOf(v).Elem()
	fields := make(map[string]reflect.Value, st.NumField())
	for i := range st.NumField() {
		f := st.Type().Field(i)
		if name, _, _ := strings.Cut(f.Tag.Get("json"), ","); f.IsExported() && name != "" && name != "-" {
			fields[name] = st.Field(i)
		}
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return errors.New("not a JSON object")
	}
	seen := make(map[string]bool, len(fields))
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		name, _ := tok.(string)
		dst, ok := fields[name]
		if !ok {
			return fmt.Errorf("unknown field %q", name)
		}
		if seen[name] {
			return fmt.Errorf("duplicate field %q", name)
		}
		seen[name] = true
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return err
		}
		if string(raw) == "null" {
			return fmt.Errorf("field %q is null", name)
		}
		if err := decodeField(raw, dst); err != nil {
			return fmt.Errorf("field %q: %w", name, err)
		}
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return err
	}
	if dec.InputOffset() != int64(len(body)) {
		return errors.New("trailing bytes after the JSON object")
	}
	return nil
}

var unmarshalerType = reflect.TypeFor[json.Unmarshaler]()

// decodeField decodes raw into dst, a field of a struct strictJSON decodes.
func decodeField(raw json.RawMessage, dst reflect.Value) error {
	t := dst.Type()
	switch {
	case t.Kind() == reflect.Struct && !reflect.PointerTo(t).Implements(unmarshalerType):
		return strictJSON(raw, dst.Addr().Interface())
	case t.Kind() == reflect.Pointer && t.Elem().Kind() == reflect.Struct && !t.Implements(unmarshalerType):
		p := reflect.New(t.Elem())
		if err := strictJSON(raw, p.Interface()); err != nil {
			return err
		}
		dst.Set(p)
		return nil
	}
	return json.Unmarshal(raw, dst.Addr().Interface())
}

// WriteClientHello writes h as one frame. It does not validate h.
func WriteClientHello(w io.Writer, h ClientHello) error { return writeFrame(w, h) }

// WriteServerHello writes h as one frame.
func WriteServerHello(w io.Writer, h ServerHello) error { return writeFrame(w, h) }

// ReadServerHello reads one server hello. A malformed hello or an unknown version is
// a *HelloError; an ok=false hello is returned without error for the caller to act on.
func ReadServerHello(r io.Reader) (ServerHello, error) {
	body, err := readFrame(r)
	if err != nil {
		return ServerHello{}, err
	}
	var h ServerHello
	if err := strictJSON(body, &h); err != nil {
		return ServerHello{}, Errorf(CodeBadRequest, "malformed server hello: %v", err)
	}
	if h.V != Version {
		return ServerHello{}, Errorf(CodeUnsupportedVersion, "server speaks protocol version %d; this client speaks %d", h.V, Version)
	}
	if !h.OK && h.Code == "" {
		return ServerHello{}, Errorf(CodeBadRequest, "malformed server hello: ok=false without a code")
	}
	return h, nil
}
