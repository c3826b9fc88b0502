package wire_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/proxy/wire"
)

func sampleDiscovery() wire.Discovery {
	return wire.Discovery{Schema: wire.DiscoverySchema, Software: "tpd", Version: "v0", ALPN: wire.ALPN, ProtocolVersions: []int{1},
		Transports: []wire.DiscoveredTransport{
			{Name: wire.DiscoverQUIC, Network: "udp", Host: "tp.example", Port: 443, ALPN: []string{"tp/1"}, Auth: wire.AuthDeviceCertificate},
			{Name: wire.DiscoverTLS, Network: "tcp", Host: "::1", Port: 8443, ALPN: []string{"tp/1"}, Auth: wire.AuthDeviceCertificate},
		}}
}

// A document round-trips; a reader ignores fields and transport names it does
// not know; the first of the client's names the server offers is chosen.
func TestParseDiscovery(t *testing.T) {
	b, err := json.Marshal(sampleDiscovery())
	if err != nil {
		t.Fatal(err)
	}
	doc, err := wire.ParseDiscovery(b)
	if err != nil {
		t.Fatal(err)
	}
	if tr, ok := doc.Choose([]string{"ssh", "tls", "quic"}); !ok || tr.Addr() != "[::1]:8443" {
		t.Errorf("Choose(ssh,tls,quic) = %+v, %v", tr, ok)
	}
	grown := bytes.Replace(b, []byte(`"transports":[`), []byte(`"carriers":["ws"],"transports":[{"name":"quic+ws","network":"tcp","host":"h","port":1,"path":"/x"},`), 1)
	doc, err = wire.ParseDiscovery(grown)
	if err != nil {
		t.Fatalf("a document with a field and a transport this reader does not know: %v", err)
	}
	if len(doc.Transports) != 3 {
		t.Errorf("transports %+v", doc.Transports)
	}
}

// Each bad document is refused whole: what was wrong is in the case's name.
func TestParseDiscoveryRefuses(t *testing.T) {
	good, _ := json.Marshal(sampleDiscovery())
	swap := func(old, repl string) []byte { return bytes.Replace(good, []byte(old), []byte(repl), 1) }
	for name, body := range map[string][]byte{
		"empty":                 nil,
		"not JSON":              []byte("<html>"),
		"an array":              []byte("[]"),
		"trailing object":       append(append([]byte{}, good...), []byte("{}")...),
		"trailing garbage":      append(append([]byte{}, good...), 'x'),
		"schema 0":              swap(`"schema":1`, `"schema":0`),
		"schema 2":              swap(`"schema":1`, `"schema":2`),
		"schema as a string":    swap(`"schema":1`, `"schema":"1"`),
		"network sctp":          swap(`"network":"udp"`, `"network":"sctp"`),
		"empty name":            swap(`"name":"quic"`, `"name":""`),
		"long name":             swap(`"name":"quic"`, `"name":"`+strings.Repeat("q", wire.MaxDiscoveryNameLen+1)+`"`),
		"host with a slash":     swap(`"host":"tp.example"`, `"host":"tp.example/x"`),
		"host with a port":      swap(`"host":"tp.example"`, `"host":"[tp.example]"`),
		"port 0":                swap(`"port":443`, `"port":0`),
		"port 65536":            swap(`"port":443`, `"port":65536`),
		"bad chosen":            swap(`"transports":`, `"chosen":{"name":"x","network":"tcp","host":"","port":1},"transports":`),
		"over MaxDiscoverySize": append(bytes.Repeat([]byte(" "), wire.MaxDiscoverySize), good...),
	} {
		if _, err := wire.ParseDiscovery(body); err == nil {
			t.Errorf("%s: accepted %.80q", name, body)
		}
	}
}

// FuzzParseDiscovery: any bytes either fail or give a document whose every
// transport has a usable address; nothing panics.
func FuzzParseDiscovery(f *testing.F) {
	good, _ := json.Marshal(sampleDiscovery())
	f.Add(good)
	f.Add([]byte(`{"schema":1,"transports":[{"name":"tls","network":"tcp","host":"h","port":1}]}`))
	f.Add([]byte(`{"schema":1}{}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		doc, err := wire.ParseDiscovery(body)
		if err != nil {
			return
		}
		for _, tr := range doc.Transports {
			if tr.Port < 1 || tr.Port > 65535 || tr.Host == "" || (tr.Network != "tcp" && tr.Network != "udp") {
				t.Fatalf("accepted transport %+v from %q", tr, body)
			}
		}
	})
}
