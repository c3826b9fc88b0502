package proxy_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/tp-proxy/tp/proxy/wire"
)

// The public field of a listen hello is decoded as strictly as the rest.
func TestListenHelloPublic(t *testing.T) {
	t.Parallel()
	const pre = `{"v":1,"op":"listen","net":"tcp","names":["game","blog"],"public":`
	tests := []struct {
		name, public, code string // code "" means accepted
	}{
		{"port", `[{"name":"game","net":"tcp","port":27015}]`, ""},
		{"sni", `[{"name":"blog","net":"tcp","sni":"blog.example.org"}]`, ""},
		{"both kinds", `[{"name":"game","net":"tcp","port":27015},{"name":"blog","net":"tcp","sni":"blog.example.org"}]`, ""},
		{"name not registered", `[{"name":"other","net":"tcp","port":1}]`, wire.CodeBadRequest},
		{"port and sni", `[{"name":"game","net":"tcp","port":1,"sni":"a.example"}]`, wire.CodeBadRequest},
		{"neither", `[{"name":"game","net":"tcp"}]`, wire.CodeBadRequest},
		{"port out of range", `[{"name":"game","net":"tcp","port":65536}]`, wire.CodeBadRequest},
		{"udp port", `[{"name":"game","net":"udp","port":27015}],"udp":["game"]`, ""},
		{"udp for a name not listed as udp", `[{"name":"game","net":"udp","port":27015}]`, wire.CodeBadRequest},
		{"tcp for a name listed as udp", `[{"name":"game","net":"tcp","port":27015}],"udp":["game"]`, wire.CodeBadRequest},
		{"udp by sni", `[{"name":"game","net":"udp","sni":"game.example.org"}],"udp":["game"]`, wire.CodeUnsupportedNetwork},
		{"udp lists an unregistered name", `[],"udp":["other"]`, wire.CodeBadRequest},
		{"udp lists a name twice", `[],"udp":["game","game"]`, wire.CodeBadRequest},
		{"unknown field", `[{"name":"game","net":"tcp","port":1,"x":1}]`, wire.CodeBadRequest},
		{"duplicate", `[{"name":"game","net":"tcp","port":1},{"name":"blog","net":"tcp","port":1}]`, wire.CodeBadRequest},
		{"sni one label", `[{"name":"blog","net":"tcp","sni":"localhost"}]`, wire.CodeBadRequest},
		{"sni upper case", `[{"name":"blog","net":"tcp","sni":"Blog.example.org"}]`, wire.CodeBadRequest},
		{"sni IP", `[{"name":"blog","net":"tcp","sni":"10.0.0.1"}]`, wire.CodeBadRequest},
		{"sni trailing dot", `[{"name":"blog","net":"tcp","sni":"blog.example.org."}]`, wire.CodeBadRequest},
		{"null", `null`, wire.CodeBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := wire.ReadClientHello(bytes.NewReader(frame(pre + tt.public + `}`)))
			var he *wire.HelloError
			switch {
			case tt.code == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tt.code != "" && (!errors.As(err, &he) || he.Code != tt.code || he.Reason == ""):
				t.Fatalf("got %v; want %s with a reason", err, tt.code)
			}
		})
	}
	for _, h := range []string{
		`{"v":1,"op":"dial","net":"tcp","host":"h","port":1,"public":[]}`,
		`{"v":1,"op":"dial","net":"udp","host":"h","port":1,"udp":["h"]}`,
		`{"v":1,"op":"accept","session":"ab","udp":["game"]}`,
		`{"v":1,"op":"accept","session":"ab","public":[{"name":"game","net":"tcp","port":1}]}`,
	} {
		if _, err := wire.ReadClientHello(bytes.NewReader(frame(h))); err == nil {
			t.Errorf("%s accepted; public belongs to listen only", h)
		}
	}
}
