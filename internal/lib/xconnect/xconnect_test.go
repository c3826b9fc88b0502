package xconnect_test

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"golang.org/x/net/http2"

	_ "github.com/tp-proxy/tp/internal/lib/xconnect"
)

// TestServerAdvertisesExtendedConnect checks that the standard library's HTTP/2
// server sends SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 in this test binary, which
// imports xconnect blank. Without the import (see TestWithoutImport) net/http
// refuses every extended CONNECT.
func TestServerAdvertisesExtendedConnect(t *testing.T) {
	if got := enableConnectSetting(t); got != 1 {
		t.Fatalf("the net/http HTTP/2 server sent SETTINGS_ENABLE_CONNECT_PROTOCOL = %d; want 1 (GODEBUG=http2xconnect=1 was not in force when net/http initialised)", got)
	}
}

// enableConnectSetting starts a net/http HTTP/2 server on loopback and returns
// the value of SETTINGS_ENABLE_CONNECT_PROTOCOL in its first SETTINGS frame (0
// when absent).
func enableConnectSetting(t *testing.T) uint32 {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate()) // the test server's own certificate, for example.com
	conn, err := tls.Dial("tcp", srv.Listener.Addr().String(), &tls.Config{RootCAs: roots, ServerName: "example.com", NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if p := conn.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("negotiated %q; want h2", p)
	}
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
			v, _ := sf.Value(http2.SettingEnableConnectProtocol)
			return v
		}
	}
}
