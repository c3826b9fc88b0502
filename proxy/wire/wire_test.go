package wire_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/proxy/wire"
)

func TestClientHelloRoundTrip(t *testing.T) {
	want := wire.ClientHello{V: 1, Op: "dial", Net: "tcp", Host: "db.internal", Port: 5432}
	var buf bytes.Buffer
	if err := wire.WriteClientHello(&buf, want); err != nil {
		t.Fatal(err)
	}
	framed := buf.Bytes()
	body := `{"v":1,"op":"dial","net":"tcp","host":"db.internal","port":5432}`
	if int(binary.BigEndian.Uint16(framed)) != len(body) || string(framed[2:]) != body {
		t.Fatalf("wire form %q; want length %d and %s", framed, len(body), body)
	}
	got, err := wire.ReadClientHello(&buf)
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("ReadClientHello = %+v, %v; want %+v", got, err, want)
	}
}

func TestReadClientHello(t *testing.T) {
	ok := `{"v":1,"op":"dial","net":"tcp","host":"db.internal","port":5432}`
	tests := []struct {
		name string
		in   []byte
		code string // "" means accepted
	}{
		{"valid", frame(ok), ""},
		{"valid with whitespace and other field order", frame(` { "port" : 22 , "host":"10.0.0.1","net":"tcp","op":"dial","v":1}`), ""},
		{"valid IPv6 literal", frame(`{"v":1,"op":"dial","net":"tcp","host":"::1","port":22}`), ""},
		{"valid 253-byte host", frame(`{"v":1,"op":"dial","net":"tcp","host":"` + strings.Repeat("a", 253) + `","port":1}`), ""},
		{"valid port 65535", frame(`{"v":1,"op":"dial","net":"tcp","host":"h","port":65535}`), ""},
		{"zero length", []byte{0, 0}, wire.CodeBadRequest},
		{"length over max", binary.BigEndian.AppendUint16(nil, wire.MaxHelloSize+1), wire.CodeHelloTooLarge},
		{"length 0xffff", []byte{0xff, 0xff}, wire.CodeHelloTooLarge},
		{"not JSON", frame(`hello`), wire.CodeBadRequest},
		{"JSON string", frame(`"dial"`), wire.CodeBadRequest},
		{"null", frame(`null`), wire.CodeBadRequest},
		{"empty object", frame(`{}`), wire.CodeUnsupportedVersion},
		{"missing port", frame(`{"v":1,"op":"dial","net":"tcp","host":"h"}`), wire.CodeBadRequest},
		{"null host", frame(`{"v":1,"op":"dial","net":"tcp","host":null,"port":1}`), wire.CodeBadRequest},
		{"unknown field", frame(`{"v":1,"op":"dial","net":"tcp","host":"h","port":1,"extra":true}`), wire.CodeBadRequest},
		{"wrong-case field", frame(`{"V":1,"op":"dial","net":"tcp","host":"h","port":1}`), wire.CodeBadRequest},
		{"duplicate field", frame(`{"v":1,"op":"dial","net":"tcp","host":"h","port":1,"port":2}`), wire.CodeBadRequest},
		{"trailing object", frame(ok + `{}`), wire.CodeBadRequest},
		{"trailing newline", frame(ok + "\n"), wire.CodeBadRequest},
		{"version as float", frame(`{"v":1.0,"op":"dial","net":"tcp","host":"h","port":1}`), wire.CodeBadRequest},
		{"port as float", frame(`{"v":1,"op":"dial","net":"tcp","host":"h","port":22.5}`), wire.CodeBadRequest},
		{"port huge", frame(`{"v":1,"op":"dial","net":"tcp","host":"h","port":99999999999999999999}`), wire.CodeBadRequest},
		{"port negative", frame(`{"v":1,"op":"dial","net":"tcp","host":"h","port":-1}`), wire.CodeBadRequest},
		{"port 0", frame(`{"v":1,"op":"dial","net":"tcp","host":"h","port":0}`), wire.CodeBadRequest},
		{"port 65536", frame(`{"v":1,"op":"dial","net":"tcp","host":"h","port":65536}`), wire.CodeBadRequest},
		{"version 0", frame(`{"v":0,"op":"dial","net":"tcp","host":"h","port":1}`), wire.CodeUnsupportedVersion},
		{"version 2", frame(`{"v":2,"op":"dial","net":"tcp","host":"h","port":1}`), wire.CodeUnsupportedVersion},
		{"op listen", frame(`{"v":1,"op":"frobnicate","net":"tcp","host":"h","port":1}`), wire.CodeUnknownOp},
		{"op DIAL", frame(`{"v":1,"op":"DIAL","net":"tcp","host":"h","port":1}`), wire.CodeUnknownOp},
		{"net sctp", frame(`{"v":1,"op":"dial","net":"sctp","host":"h","port":1}`), wire.CodeUnsupportedNetwork},
		{"net tcp4", frame(`{"v":1,"op":"dial","net":"tcp4","host":"h","port":1}`), wire.CodeUnsupportedNetwork},
		{"empty host", frame(`{"v":1,"op":"dial","net":"tcp","host":"","port":1}`), wire.CodeBadRequest},
		{"254-byte host", frame(`{"v":1,"op":"dial","net":"tcp","host":"` + strings.Repeat("a", 254) + `","port":1}`), wire.CodeBadRequest},
		{"host with tab", frame(`{"v":1,"op":"dial","net":"tcp","host":"a\tb","port":1}`), wire.CodeBadRequest},
		{"host with DEL", frame(`{"v":1,"op":"dial","net":"tcp","host":"a\u007fb","port":1}`), wire.CodeBadRequest},
		{"host non-ASCII", frame(`{"v":1,"op":"dial","net":"tcp","host":"bücher.example","port":1}`), wire.CodeBadRequest},
		{"host invalid UTF-8", frame("{\"v\":1,\"op\":\"dial\",\"net\":\"tcp\",\"host\":\"a\xffb\",\"port\":1}"), wire.CodeBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := wire.ReadClientHello(bytes.NewReader(tt.in))
			if tt.code == "" {
				if err != nil {
					t.Fatalf("rejected a valid hello: %v", err)
				}
				return
			}
			var he *wire.HelloError
			if !errors.As(err, &he) || he.Code != tt.code || he.Reason == "" {
				t.Fatalf("ReadClientHello = %+v, %v; want HelloError %s with a reason", h, err, tt.code)
			}
		})
	}
}

// TestReadClientHelloShort: truncated frames are I/O errors, not hellos.
func TestReadClientHelloShort(t *testing.T) {
	for _, in := range [][]byte{nil, {0}, frame(`{"v":1}`)[:4]} {
		_, err := wire.ReadClientHello(bytes.NewReader(in))
		if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("ReadClientHello(%q) = %v; want EOF", in, err)
		}
	}
}

func TestServerHelloRoundTrip(t *testing.T) {
	for _, want := range []wire.ServerHello{
		{V: 1, OK: true},
		{V: 1, Code: wire.CodePolicyDenied, Reason: "alice may not reach db"},
	} {
		var buf bytes.Buffer
		if err := wire.WriteServerHello(&buf, want); err != nil {
			t.Fatal(err)
		}
		got, err := wire.ReadServerHello(&buf)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("ReadServerHello = %+v, %v; want %+v", got, err, want)
		}
	}
	for _, bad := range []string{`{"v":1,"ok":true,"x":1}`, `{"v":2,"ok":true}`, `{"v":1,"ok":false}`, `{"v":1,"ok":true} `} {
		if _, err := wire.ReadServerHello(bytes.NewReader(frame(bad))); err == nil {
			t.Errorf("ReadServerHello accepted %s", bad)
		}
	}
}

// FuzzReadClientHello: the parser must never panic, and whatever it accepts must be
// a valid hello that survives a write/read round trip unchanged.
func FuzzReadClientHello(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"op":"dial","net":"tcp","host":"db.internal","port":5432}`,
		`{"v":1,"op":"dial","net":"tcp","host":"::1","port":22}`,
		`{"v":1,"op":"dial","net":"tcp","host":"h","port":1,"x":1}`,
		`{"v":1,"op":"dial","net":"tcp","HOST":"h","port":1}`,
		`{"v":1,"op":"dial","net":"tcp","host":"h","port":0}`,
		`{"v":2,"op":"dial","net":"udp","host":"","port":65536}`,
		`{"v":1,"op":"dial","net":"tcp","host":"a\u0000b","port":1}{}`,
		`[`, `null`, `{}`, ``,
	} {
		f.Add(frame(s))
	}
	f.Add([]byte{0, 0})
	f.Add([]byte{0xff, 0xff, '{'})
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := wire.ReadClientHello(bytes.NewReader(in))
		if err != nil {
			return
		}
		if verr := h.Validate(); verr != nil {
			t.Fatalf("accepted an invalid hello %+v: %v", h, verr)
		}
		var buf bytes.Buffer
		if err := wire.WriteClientHello(&buf, h); err != nil {
			t.Fatal(err)
		}
		again, err := wire.ReadClientHello(&buf)
		if err != nil || !reflect.DeepEqual(again, h) {
			t.Fatalf("round trip of %+v = %+v, %v", h, again, err)
		}
	})
}

// frame puts body behind its 2-byte length, as a hello travels.
func frame(body string) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(body)))
	return append(b, body...)
}

// Every frame a peer reads is decoded as strictly as the client hello
// (docs/PROTOCOL.md, section 2.2): a field name in another case, a duplicate
// field and a null are refused in server hellos (and the end object inside
// them), session headers and control frames, and the public objects of a listen
// hello, with bad_request. Bad input: each of those three in each frame.
func TestStrictFrames(t *testing.T) {
	readServer := func(in []byte) error { _, err := wire.ReadServerHello(bytes.NewReader(in)); return err }
	readHeader := func(in []byte) error { _, err := wire.ReadSessionHeader(bytes.NewReader(in)); return err }
	readClient := func(in []byte) error { _, err := wire.ReadClientHello(bytes.NewReader(in)); return err }
	listen := func(public string) string {
		return `{"v":1,"op":"listen","net":"tcp","names":["game"],"public":[` + public + `]}`
	}
	for _, tc := range []struct {
		what string
		read func([]byte) error
		good string
		bad  []string
	}{
		{"server hello", readServer, `{"v":1,"ok":false,"code":"policy_denied","reason":"no"}`, []string{
			`{"v":1,"OK":true}`, `{"v":1,"ok":true,"Session":"00"}`,
			`{"v":1,"ok":true,"ok":false}`, `{"v":1,"ok":false,"code":"a","code":"b"}`,
			`{"v":1,"ok":true,"session":null}`, `{"v":1,"ok":null}`,
		}},
		{"end object of a why answer", readServer, `{"v":1,"ok":true,"end":{"code":"revoked","by":"server","reason":"r"}}`, []string{
			`{"v":1,"ok":true,"end":{"CODE":"revoked","by":"server","reason":"r"}}`,
			`{"v":1,"ok":true,"end":{"code":"revoked","code":"internal","by":"server","reason":"r"}}`,
			`{"v":1,"ok":true,"end":{"code":"revoked","by":null,"reason":"r"}}`,
			`{"v":1,"ok":true,"end":null}`,
		}},
		{"session header", readHeader, `{"v":1,"session":"00","name":"svc","peer_id":"bob@phone"}`, []string{
			`{"v":1,"Session":"00","name":"svc"}`, `{"v":1,"session":"00","name":"svc","name":"other"}`,
			`{"v":1,"session":"00","name":null}`, `{"v":1,"flow":null}`,
		}},
		{"control frame", readHeader, `{"v":1,"end":"replaced","reason":"newer agent"}`, []string{
			`{"v":1,"End":"replaced"}`, `{"v":1,"end":"replaced","end":"shutdown"}`, `{"v":1,"ping":null}`,
		}},
		{"public object", readClient, listen(`{"name":"game","net":"tcp","port":27015}`), []string{
			listen(`{"Name":"game","net":"tcp","port":27015}`), listen(`{"name":"game","net":"tcp","port":27015,"port":27016}`),
			listen(`{"name":"game","net":"tcp","port":27015,"sni":null}`),
		}},
	} {
		if err := tc.read(frame(tc.good)); err != nil {
			t.Errorf("%s: refused a valid frame %s: %v", tc.what, tc.good, err)
		}
		for _, bad := range tc.bad {
			err := tc.read(frame(bad))
			var he *wire.HelloError
			if !errors.As(err, &he) || he.Code != wire.CodeBadRequest || he.Reason == "" {
				t.Errorf("%s: %s read as %v; want bad_request with a reason", tc.what, bad, err)
			}
		}
	}
}

// A reverse name that is not one DNS label says what is wrong with it. Bad
// input: the full name with its zone, as dialers write it (tp expose
// web.rev.tp.internal …), which once read only "may only contain a-z, 0-9
// and '-'"; capitals and an underscore; a hyphen at the end.
func TestReverseNameMistakes(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct{ name, want string }{
		{"web.rev.tp.internal", `reverse name "web.rev.tp.internal" must be one label, without the reverse zone: e.g. "web" for web.rev.tp.internal`},
		{"Web_1", `reverse name "Web_1" may only contain a-z, 0-9 and '-'`},
		{"web-", `reverse name "web-" must not start or end with '-'`},
	} {
		if err := wire.ValidReverseName(tt.name); err == nil || err.Error() != tt.want {
			t.Errorf("ValidReverseName(%q) = %v; want %s", tt.name, err, tt.want)
		}
	}
	if err := wire.ValidReverseName("laptop-ssh"); err != nil {
		t.Errorf("ValidReverseName(laptop-ssh) = %v", err)
	}
}
