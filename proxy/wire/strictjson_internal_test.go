package wire

import (
	"reflect"
	"testing"
)

// FuzzStrictJSONFastPath: strictJSON's fast path (a body that re-encodes to
// itself) accepts exactly what the token-by-token check accepts, with the same
// result, for client and server hellos: bad input is any body at all.
func FuzzStrictJSONFastPath(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"op":"dial","net":"tcp","host":"127.0.0.1","port":22}`,
		`{"v":1,"op":"dial","net":"tcp","host":"h","port":1,"port":2}`,
		`{"v":1,"OP":"dial","net":"tcp","host":"h","port":1}`,
		`{"v":1,"op":"dial","net":"tcp","host":null,"port":1}`,
		`{"v":1,"op":"dial","net":"tcp","host":"h","port":1} `,
		`{"v":1,"op":"listen","net":"tcp","names":["a"],"public":[{"name":"a","net":"tcp","port":80}]}`,
		`{"v":1,"ok":true,"session":"0123456789abcdef0123456789abcdef"}`,
		`{"v":1,"ok":false,"code":"policy_denied","reason":"<no>"}`,
		`{"v":1,"ok":true,"end":{"code":"revoked","by":"server","reason":"r"}}`,
		`{"v":1,"ok":true,"x":1}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var fastC, slowC ClientHello
		errFast, errSlow := strictJSON(body, &fastC), strictDecode(body, &slowC)
		if (errFast == nil) != (errSlow == nil) || errFast == nil && !reflect.DeepEqual(fastC, slowC) {
			t.Fatalf("client hello %q: fast path %+v, %v; strict %+v, %v", body, fastC, errFast, slowC, errSlow)
		}
		var fastS, slowS ServerHello
		errFast, errSlow = strictJSON(body, &fastS), strictDecode(body, &slowS)
		if (errFast == nil) != (errSlow == nil) || errFast == nil && !reflect.DeepEqual(fastS, slowS) {
			t.Fatalf("server hello %q: fast path %+v, %v; strict %+v, %v", body, fastS, errFast, slowS, errSlow)
		}
	})
}
