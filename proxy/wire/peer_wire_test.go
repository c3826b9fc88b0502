package wire

import (
	"bytes"
	"errors"
	"testing"
)

const goodPeerOpen = `{"v":1,"key":"svc.rev.tp.internal","epoch":3,"header":{"v":1,"session":"0a1b","name":"svc","peer_id":"bob@phone","peer_user":"bob"}}`

// A peer open is refused, with a code and a sentence, for each bad input
// named here; a good one round-trips.
func TestReadPeerOpen(t *testing.T) {
	o, err := ReadPeerOpen(bytes.NewReader(fuzzFrame(goodPeerOpen)))
	if err != nil || o.Key != "svc.rev.tp.internal" || o.Epoch != 3 || o.Header.PeerID != "bob@phone" {
		t.Fatalf("good peer open: %+v %v", o, err)
	}
	for _, good := range []string{
		`{"v":1,"key":"tcp/8443","epoch":2,"header":{"v":1,"session":"0a","public":"tcp/8443","peer_addr":"192.0.2.1:5"}}`,
		`{"v":1,"key":"udp/27015","epoch":2,"header":{"v":1,"session":"0a","public":"udp/27015","peer_addr":"[2001:db8::1]:5","net":"udp"}}`,
		`{"v":1,"key":"sni/blog.example.org","epoch":2,"header":{"v":1,"session":"0a","public":"sni/blog.example.org","peer_addr":"192.0.2.1:5"}}`,
		`{"v":1,"key":"app.rev.tp.internal","epoch":2,"header":{"v":1,"session":"0a","name":"app","net":"http"}}`,
		`{"v":1,"key":"svc.rev.tp.internal","epoch":2,"header":{"v":1,"session":"0a","name":"svc","net":"accept","peer_id":"alice@laptop"}}`,
		`{"v":1,"key":"svc.rev.tp.internal","epoch":2,"header":{"v":1,"session":"0a","name":"svc","net":"end","end":"shutdown"}}`,
	} {
		if _, err := ReadPeerOpen(bytes.NewReader(fuzzFrame(good))); err != nil {
			t.Errorf("good peer open %s: %v", good, err)
		}
	}
	var buf bytes.Buffer
	if err := WritePeerOpen(&buf, o); err != nil {
		t.Fatal(err)
	}
	if back, err := ReadPeerOpen(&buf); err != nil || back.Key != o.Key || back.Epoch != o.Epoch {
		t.Fatalf("round trip: %+v %v", back, err)
	}
	for _, tc := range []struct{ what, body, code string }{
		{"no epoch", `{"v":1,"key":"svc.rev.tp.internal","epoch":0,"header":{"v":1,"session":"0a","name":"svc"}}`, CodeBadRequest},
		{"negative epoch", `{"v":1,"key":"svc.rev.tp.internal","epoch":-1,"header":{"v":1,"session":"0a","name":"svc"}}`, CodeBadRequest},
		{"version 2", `{"v":2,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"0a","name":"svc"}}`, CodeUnsupportedVersion},
		{"header version 0", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":0,"session":"0a","name":"svc"}}`, CodeUnsupportedVersion},
		{"empty key", `{"v":1,"key":"","epoch":1,"header":{"v":1,"session":"0a","name":"svc"}}`, CodeBadRequest},
		{"key with a space", `{"v":1,"key":"s vc","epoch":1,"header":{"v":1,"session":"0a","name":"svc"}}`, CodeBadRequest},
		{"bad label", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"0a","name":"-svc"}}`, CodeBadRequest},
		{"no session", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"name":"svc"}}`, CodeBadRequest},
		{"session not hex", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"xyz","name":"svc"}}`, CodeBadRequest},
		{"network tcp6", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"0a","name":"svc","net":"tcp6"}}`, CodeBadRequest},
		{"a public session", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"0a","name":"svc","public":"tcp/80"}}`, CodeBadRequest},
		{"a ping", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"0a","name":"svc","ping":true}}`, CodeBadRequest},
		{"unknown field", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"extra":1,"header":{"v":1,"session":"0a","name":"svc"}}`, CodeBadRequest},
		{"not JSON", `hello`, CodeBadRequest},
		{"a dial with a public client address", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"0a","name":"svc","peer_addr":"192.0.2.1:5"}}`, CodeBadRequest},
		{"public: label set", `{"v":1,"key":"tcp/80","epoch":1,"header":{"v":1,"session":"0a","name":"web","public":"tcp/80","peer_addr":"192.0.2.1:5"}}`, CodeBadRequest},
		{"public: header names another exposure", `{"v":1,"key":"tcp/80","epoch":1,"header":{"v":1,"session":"0a","public":"tcp/81","peer_addr":"192.0.2.1:5"}}`, CodeBadRequest},
		{"public: a dialer", `{"v":1,"key":"tcp/80","epoch":1,"header":{"v":1,"session":"0a","public":"tcp/80","peer_addr":"192.0.2.1:5","peer_id":"bob@phone"}}`, CodeBadRequest},
		{"public: no client address", `{"v":1,"key":"tcp/80","epoch":1,"header":{"v":1,"session":"0a","public":"tcp/80"}}`, CodeBadRequest},
		{"public: UDP port without net udp", `{"v":1,"key":"udp/53","epoch":1,"header":{"v":1,"session":"0a","public":"udp/53","peer_addr":"192.0.2.1:5"}}`, CodeBadRequest},
		{"public: port 0", `{"v":1,"key":"tcp/0","epoch":1,"header":{"v":1,"session":"0a","public":"tcp/0","peer_addr":"192.0.2.1:5"}}`, CodeBadRequest},
		{"public: port with a leading zero", `{"v":1,"key":"tcp/080","epoch":1,"header":{"v":1,"session":"0a","public":"tcp/080","peer_addr":"192.0.2.1:5"}}`, CodeBadRequest},
		{"accept without the agent's device", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"0a","name":"svc","net":"accept"}}`, CodeBadRequest},
		{"an end on a dial", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"0a","name":"svc","end":"shutdown"}}`, CodeBadRequest},
		{"an end notice without its reason", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"0a","name":"svc","net":"end"}}`, CodeBadRequest},
		{"an end notice for another reason", `{"v":1,"key":"svc.rev.tp.internal","epoch":1,"header":{"v":1,"session":"0a","name":"svc","net":"end","end":"revoked"}}`, CodeBadRequest},
	} {
		_, err := ReadPeerOpen(bytes.NewReader(fuzzFrame(tc.body)))
		var he *HelloError
		if !errors.As(err, &he) || he.Code != tc.code || he.Reason == "" {
			t.Errorf("%s: %v; want %s with a reason", tc.what, err, tc.code)
		}
	}
}

// FuzzPeerOpen: any frame is either refused or a PeerOpen that writes back
// to one that reads the same.
func FuzzPeerOpen(f *testing.F) {
	f.Add(fuzzFrame(goodPeerOpen))
	f.Add(fuzzFrame(`{"v":1,"key":"x","epoch":1,"header":{"v":1,"session":"0a","name":"x","net":"udp"}}`))
	f.Add(fuzzFrame(`{"v":1,"key":"udp/53","epoch":1,"header":{"v":1,"session":"0a","public":"udp/53","peer_addr":"192.0.2.1:5","net":"udp"}}`))
	f.Add(fuzzFrame(`{"v":1,"key":"x","epoch":1,"header":{"v":1,"session":"0a","name":"x","net":"end","end":"shutdown"}}`))
	f.Add([]byte{0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		o, err := ReadPeerOpen(bytes.NewReader(b))
		if err != nil {
			return
		}
		var buf bytes.Buffer
		if err := WritePeerOpen(&buf, o); err != nil {
			t.Fatalf("writing back %+v: %v", o, err)
		}
		back, err := ReadPeerOpen(&buf)
		if err != nil || back.Key != o.Key || back.Epoch != o.Epoch || back.Header.Session != o.Header.Session {
			t.Fatalf("%+v read back as %+v %v", o, back, err)
		}
	})
}
