package wire_test

import (
	"strings"
	"testing"

	"github.com/tp-proxy/tp/proxy/wire"
)

// Both ends of an http carrier session derive one key from their X25519
// keys; a request's MAC checks only with its session ID, sequence number and
// body. Bad input: another body, sequence number or session ID under the
// same MAC, a sequence number of 0, a malformed header, a key that is not 64
// lower-case hex digits, and the all-zero (low-order) public key.
func TestCarrierAuth(t *testing.T) {
	const id = "0123456789abcdef0123456789abcdef"
	cpriv, cpub, err := wire.NewCarrierKey()
	if err != nil {
		t.Fatal(err)
	}
	spriv, spub, err := wire.NewCarrierKey()
	if err != nil {
		t.Fatal(err)
	}
	ck, err := wire.CarrierSessionKey(cpriv, spub, id)
	if err != nil {
		t.Fatal(err)
	}
	sk, err := wire.CarrierSessionKey(spriv, cpub, id)
	if err != nil {
		t.Fatal(err)
	}
	body := []byte{0, 3, 'a', 'b', 'c'}
	auth := wire.CarrierAuth(ck, id, 7, body)
	if seq, err := wire.CheckCarrierAuth(sk, id, auth, body); err != nil || seq != 7 {
		t.Fatalf("the client's MAC at the server: %d, %v", seq, err)
	}
	for _, bad := range []struct {
		what, id, auth string
		body           []byte
	}{
		{"another body", id, auth, []byte{0, 1, 'x'}},
		{"an empty body", id, auth, nil},
		{"another sequence number", id, strings.Replace(auth, "7.", "8.", 1), body},
		{"another session ID", strings.Repeat("f", 32), auth, body},
		{"sequence number 0", id, wire.CarrierAuth(ck, id, 0, body), body},
		{"no MAC", id, "7", body},
		{"a short MAC", id, auth[:len(auth)-2], body},
		{"a sign", id, "+" + auth, body},
		{"nothing", id, "", body},
	} {
		if _, err := wire.CheckCarrierAuth(sk, bad.id, bad.auth, bad.body); err == nil {
			t.Errorf("%s: %q accepted", bad.what, bad.auth)
		}
	}
	for _, peer := range []string{"", "zz", strings.ToUpper(cpub), cpub[:62], strings.Repeat("0", 64)} {
		if _, err := wire.CarrierSessionKey(spriv, peer, id); err == nil {
			t.Errorf("the public key %q was taken", peer)
		}
	}
}

// A sequence number is taken once; numbers may come out of order within the
// window, and one further below the highest taken is refused.
func TestCarrierReplay(t *testing.T) {
	var r wire.CarrierReplay
	for _, step := range []struct {
		seq  uint64
		want bool
	}{
		{1, true}, {1, false}, {3, true}, {2, true}, {2, false}, {3, false},
		{100, true}, {37, true}, {36, false}, {37, false}, {99, true}, {99, false},
		{1000, true}, {100, false}, {937, true}, {1000, false},
	} {
		if got := r.Take(step.seq); got != step.want {
			t.Fatalf("Take(%d) = %v, want %v", step.seq, got, step.want)
		}
	}
}
