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
