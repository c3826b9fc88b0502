package tpd

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// Bad input: a plain request in absolute form whose URL a shell would split or
// expand (a query with "&", a "$"). The hint's curl line quotes it, and names
// the proxy by the handshake's server name and the port the request came to,
// not by the request's Host (the destination).
func TestProxyHintAbsoluteForm(t *testing.T) {
	t.Parallel()
	r := httptest.NewRequest(http.MethodGet, "http://wiki.internal/a?b=1&c=$HOME", nil)
	r.TLS = &tls.ConnectionState{ServerName: "proxy.tp.example.org"}
	r = r.WithContext(context.WithValue(r.Context(), http.LocalAddrContextKey, &net.TCPAddr{IP: net.IPv4(10, 0, 0, 5), Port: 8443}))
	hint := proxyHint(r)
	want := "curl -p --proxy https://proxy.tp.example.org:8443 --proxy-cert $TP_HOME/cert.pem --proxy-key $TP_HOME/key.pem" +
		" --proxy-cacert $TP_HOME/root.pem 'http://wiki.internal/a?b=1&c=$HOME'\n"
	if !strings.Contains(hint, want) {
		t.Errorf("hint for an absolute-form GET lacks\n\t%s\n%s", want, hint)
	}
	if strings.Contains(hint, "--proxy https://wiki.internal") {
		t.Errorf("hint names the destination as the proxy:\n%s", hint)
	}
}

// A GET for a page on the proxy name itself gives the curl flags of the files
// dlogin keeps: it once said --proxy-key device.key, the device key, not the
// certificate's, with which curl fails (58).
func TestProxyHintOriginForm(t *testing.T) {
	t.Parallel()
	r := httptest.NewRequest(http.MethodGet, "/", nil) // in origin form, as a server reads it
	r.Host = "proxy.tp.example.org:8443"
	hint := proxyHint(r)
	for _, want := range []string{"curl --proxy https://proxy.tp.example.org:8443 --proxy-cert $TP_HOME/cert.pem --proxy-key $TP_HOME/key.pem --proxy-cacert $TP_HOME/root.pem https://destination/",
		"key.pem holds the certificate's key"} {
		if !strings.Contains(hint, want) {
			t.Errorf("hint for a GET on the proxy name lacks %q:\n%s", want, hint)
		}
	}
	if strings.Contains(hint, "--proxy-key device.key") || strings.Contains(hint, "device.pem") {
		t.Errorf("hint for a GET on the proxy name gives the device key's file for TLS:\n%s", hint)
	}
}
