package wire

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

// Fuzz targets for the frames a peer sends before any authorisation decision:
// client hellos of every op, server hellos and session headers. The seeds are the
// hellos the tests and the clients send, plus the malformed ones the table tests
// refuse.

func fuzzFrame(body string) []byte {
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(body))), body...)
}

// helloSeeds are client hello bodies of every op, valid and not.
var helloSeeds = []string{
	`{"v":1,"op":"dial","net":"tcp","host":"db.internal","port":5432}`,
	`{"v":1,"op":"dial","net":"udp","host":"127.0.0.1","port":53}`,
	`{"v":1,"op":"dial","net":"tcp","host":"laptop-ssh.rev.tp.internal","port":22}`,
	`{"v":1,"op":"dial","net":"tcp","host":"::1","port":22}`,
	`{"v":1,"op":"dial","net":"tcp","host":"h","port":1,"names":["a"]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["laptop-ssh"]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["a","b","dns"],"udp":["dns"]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["game","blog","dns"],"udp":["dns"],"public":[{"name":"game","net":"tcp","port":27015},{"name":"blog","net":"tcp","sni":"blog.example.org"},{"name":"dns","net":"udp","port":5353}]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["a","a"]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["-a"]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["a"],"public":[{"name":"a","net":"tcp","port":1,"sni":"x.y"}]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["a"],"public":[{"name":"a","net":"tcp","port":1,"x":1}]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["a"],"udp":["b"]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["a"],"public":[{"Name":"a","net":"tcp","port":1}]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["a"],"public":[{"name":"a","net":"tcp","port":1,"port":2}]}`,
	`{"v":1,"op":"listen","net":"tcp","names":["a"],"public":[{"name":"a","net":"tcp","port":1,"sni":null}]}`,
	`{"v":1,"op":"listen","net":"udp","names":["a"],"session":"00"}`,
	`{"v":1,"op":"accept","session":"0123456789abcdef0123456789abcdef"}`,
	`{"v":1,"op":"accept","session":"ABC"}`,
	`{"v":1,"op":"accept","session":"` + strings.Repeat("a", 65) + `"}`,
	`{"v":1,"op":"accept","net":"tcp","session":"00"}`,
	`{"v":1,"op":"why","session":"0123456789abcdef"}`,
	`{"v":1,"op":"why","session":"00","host":"h"}`,
	`{"v":1,"op":"why"}`,
	`{"v":1,"op":"bye"}`,
	`{"v":1,"op":"bye","session":"00"}`,
	`{"v":1,"op":"dial","net":"tcp","host":"h","port":1,"port":2}`,
	`{"v":1,"op":"dial","net":"tcp","host":null,"port":1}`,
	`{"v":1.0,"op":"dial","net":"tcp","host":"h","port":1}`,
	`{"V":1,"op":"dial","net":"tcp","host":"h","port":1}`,
	`{"v":2,"op":"frobnicate"}`,
	`{}`, `[]`, `null`, `"dial"`, `{"v":1}{}`,
}

// knownCodes are the codes a refusal of untrusted input may carry.
var knownCodes = map[string]bool{
	CodeBadRequest: true, CodeHelloTooLarge: true, CodeUnsupportedVersion: true,
	CodeUnknownOp: true, CodeUnsupportedNetwork: true,
}

// checkRefusal fails unless err is what a parser of untrusted bytes may return:
// a *HelloError with a known code and a reason for a person, or a short read.
func checkRefusal(t *testing.T, in []byte, err error) {
	t.Helper()
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return
	}
	var he *HelloError
	if !errors.As(err, &he) {
		t.Fatalf("input %q: error %T %v is no *HelloError", in, err, err)
	}
	if !knownCodes[he.Code] || he.Reason == "" {
		t.Fatalf("input %q: refusal %q (%q) has an unexpected code or no reason", in, he.Code, he.Reason)
	}
	if !utf8.ValidString(he.Reason) {
		t.Fatalf("input %q: reason %q is not valid UTF-8", in, he.Reason)
	}
}

// FuzzClientHello: any bytes as the first frame of a proxy connection. Refusals
// are *HelloErrors with a code; what is accepted respects every bound of the
// protocol and survives a write/read round trip unchanged.
func FuzzClientHello(f *testing.F) {
	for _, s := range helloSeeds {
		f.Add(fuzzFrame(s))
	}
	f.Add([]byte{0, 0})
	f.Add([]byte{0xff, 0xff, '{'})
	f.Add([]byte{0, 10, '{'})
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := ReadClientHello(bytes.NewReader(in))
		if err != nil {
			checkRefusal(t, in, err)
			return
		}
		if h.V != Version {
			t.Fatalf("accepted version %d", h.V)
		}
		switch h.Op {
		case OpDial:
			if h.Port < 1 || h.Port > 65535 || h.Host == "" || len(h.Host) > MaxHostLen || h.Net != "tcp" && h.Net != "udp" {
				t.Fatalf("accepted a dial beyond the bounds: %+v", h)
			}
			if h.Names != nil || h.Session != "" || h.Public != nil || h.UDP != nil {
				t.Fatalf("accepted a dial with reverse fields: %+v", h)
			}
		case OpListen:
			if len(h.Names) == 0 || len(h.Names) > MaxListenNames || len(h.Public) > MaxListenNames || len(h.UDP) > len(h.Names) {
				t.Fatalf("accepted a listen beyond the bounds: %+v", h)
			}
			for _, n := range h.Names {
				if err := ValidReverseName(n); err != nil {
					t.Fatalf("accepted reverse name %q: %v", n, err)
				}
			}
		case OpAccept, OpWhy:
			if h.Session == "" || len(h.Session) > MaxSessionIDLen || strings.Trim(h.Session, "0123456789abcdef") != "" {
				t.Fatalf("accepted session id %q", h.Session)
			}
			if h.Op == OpWhy && (h.Net != "" || h.Host != "" || h.Port != 0 || h.Names != nil || h.Public != nil || h.UDP != nil) {
				t.Fatalf("accepted a why with other fields: %+v", h)
			}
		case OpBye:
			if h.Net != "" || h.Host != "" || h.Port != 0 || h.Names != nil || h.Public != nil || h.UDP != nil || h.Session != "" {
				t.Fatalf("accepted a bye with fields: %+v", h)
			}
		default:
			t.Fatalf("accepted op %q", h.Op)
		}
		var buf bytes.Buffer
		if err := WriteClientHello(&buf, h); err != nil {
			t.Fatal(err)
		}
		again, err := ReadClientHello(&buf)
		if err != nil || !reflect.DeepEqual(again, h) {
			t.Fatalf("round trip of %+v = %+v, %v", h, again, err)
		}
	})
}

// FuzzServerHello: any bytes as the server's answer, as a client reads them. A
// refusal without a code and an unknown version are errors; what is accepted
// round-trips.
func FuzzServerHello(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"ok":true}`,
		`{"v":1,"ok":true,"flow":4}`,
		`{"v":1,"ok":true,"e2e":true}`,
		`{"v":1,"ok":true,"names":["laptop-ssh.rev.tp.internal"]}`,
		`{"v":1,"ok":false,"code":"policy_denied","reason":"denied by policy"}`,
		`{"v":1,"ok":true,"session":"0123456789abcdef"}`,
		`{"v":1,"ok":true,"end":{"code":"revoked","by":"server","reason":"this device was revoked"}}`,
		`{"v":1,"ok":true,"end":{"code":"revoked","by":"server","reason":"x","extra":1}}`,
		`{"v":1,"ok":false}`,
		`{"v":2,"ok":true}`,
		`{"v":1,"ok":true,"flow":-1}`,
		`{"v":1,"ok":true,"extra":1}`,
		`{"v":1,"ok":true} `,
		`{"v":1,"OK":true}`,
		`{"v":1,"ok":true,"ok":false}`,
		`{"v":1,"ok":true,"session":null}`,
		`{"v":1,"ok":true,"end":{"code":"revoked","code":"internal","by":"server","reason":"r"}}`,
	} {
		f.Add(fuzzFrame(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := ReadServerHello(bytes.NewReader(in))
		if err != nil {
			checkRefusal(t, in, err)
			return
		}
		if h.V != Version || !h.OK && h.Code == "" {
			t.Fatalf("accepted %+v", h)
		}
		var buf bytes.Buffer
		if err := WriteServerHello(&buf, h); err != nil {
			t.Fatal(err)
		}
		again, err := ReadServerHello(&buf)
		if err != nil || !reflect.DeepEqual(again, h) {
			t.Fatalf("round trip of %+v = %+v, %v", h, again, err)
		}
	})
}

// FuzzSessionHeader: any bytes as a session header, as an agent reads them from
// the server. Refusals are *HelloErrors; what is accepted round-trips.
func FuzzSessionHeader(f *testing.F) {
	flow := uint64(12)
	for _, h := range []SessionHeader{
		{V: 1, Session: "0123456789abcdef", Name: "laptop-ssh", PeerID: "bob@phone", PeerUser: "bob", PeerGroups: []string{"dev"}},
		{V: 1, Session: "00", Name: "game", Public: "tcp/27015", PeerAddr: "198.51.100.7:40000"},
		{V: 1, Name: "dns", Public: "udp/5353", Net: "udp", Flow: &flow},
		{V: 1, Ping: true},
		{V: 1, End: "revoked", Reason: "the device was revoked"},
	} {
		var buf bytes.Buffer
		if err := WriteSessionHeader(&buf, h); err != nil {
			f.Fatal(err)
		}
		f.Add(buf.Bytes())
	}
	f.Add(fuzzFrame(`{"v":1,"ping":true,"x":1}`))
	f.Add(fuzzFrame(`{"v":0}`))
	f.Add(fuzzFrame(`{"v":1,"Ping":true}`))
	f.Add(fuzzFrame(`{"v":1,"end":"replaced","end":"shutdown"}`))
	f.Add(fuzzFrame(`{"v":1,"session":"00","name":null}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := ReadSessionHeader(bytes.NewReader(in))
		if err != nil {
			checkRefusal(t, in, err)
			return
		}
		if h.V != Version {
			t.Fatalf("accepted version %d", h.V)
		}
		var buf bytes.Buffer
		if err := WriteSessionHeader(&buf, h); err != nil {
			t.Fatal(err)
		}
		again, err := ReadSessionHeader(&buf)
		if err != nil || !reflect.DeepEqual(again, h) {
			t.Fatalf("round trip of %+v = %+v, %v", h, again, err)
		}
	})
}

// FuzzCapsules: a UDP flow's stream as a sequence of capsules. Each capsule read
// is exactly its header and its stated length; writing the capsules back yields
// the bytes read, so nothing is lost, added or split differently; reports never
// panic the decoder and their counts round-trip.
func FuzzCapsules(f *testing.F) {
	var seed bytes.Buffer
	_ = WriteCapsule(&seed, CapsuleDatagram, []byte("dns-ish query"))
	_ = WriteCapsule(&seed, CapsuleReport, []byte(`{"v":1,"too_large":2,"queue_full":3,"largest":70000}`))
	_ = WriteCapsule(&seed, CapsuleDatagram, nil)
	_ = WriteCapsule(&seed, 0x7f, []byte("a later type"))
	f.Add(seed.Bytes())
	f.Add([]byte{0, 0xff, 0xff, 1})
	f.Add([]byte{1, 0, 2, '{', '}'})
	f.Add([]byte{1, 0, 4, 'n', 'u', 'l', 'l'})
	f.Add([]byte{0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bufio.NewReader(bytes.NewReader(in))
		var out bytes.Buffer
		for {
			typ, p, err := ReadCapsule(r)
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("readCapsule: %v", err)
				}
				if errors.Is(err, io.EOF) && out.Len() != len(in) {
					t.Fatalf("clean end after %d of %d bytes", out.Len(), len(in))
				}
				if errors.Is(err, io.ErrUnexpectedEOF) && len(in)-out.Len() == 0 {
					t.Fatal("a truncated capsule was reported at a capsule boundary")
				}
				break
			}
			if len(p) > MaxDatagramSize {
				t.Fatalf("capsule of %d bytes", len(p))
			}
			if err := WriteCapsule(&out, typ, p); err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(in, out.Bytes()) {
				t.Fatalf("capsules written back differ from the input after %d bytes", out.Len())
			}
			if typ == CapsuleReport {
				rep, err := DecodeReport(p)
				if err != nil {
					continue
				}
				b, err := json.Marshal(rep)
				if err != nil {
					t.Fatal(err)
				}
				again, err := DecodeReport(b)
				if err != nil || again != rep {
					t.Fatalf("report %+v round trip = %+v, %v", rep, again, err)
				}
			}
		}
	})
}
