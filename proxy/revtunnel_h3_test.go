package proxy_test

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// rtH3Stream is an extended CONNECT request stream as a net.Conn.
type rtH3Stream struct {
	*http3.RequestStream
	local, remote net.Addr
}

func (s *rtH3Stream) LocalAddr() net.Addr  { return s.local }
func (s *rtH3Stream) RemoteAddr() net.Addr { return s.remote }

// The draft's tunnel over HTTP/3 (RFC 9220 extended CONNECT), served by the same
// ServeReverseTunnel behind quic-go's http3.Server.
func TestReverseTunnelExtendedConnectH3(t *testing.T) {
	t.Parallel()
	e := newRTEnv(t)
	serverCert := e.ca.ServerCert(t, "proxy.localhost")
	ln, err := quic.ListenAddr("127.0.0.1:0", http3.ConfigureTLSConfig(&tls.Config{
		Certificates: []tls.Certificate{serverCert}, ClientCAs: e.ca.Pool, ClientAuth: tls.RequireAndVerifyClientCert,
		MinVersion: tls.VersionTLS13,
	}), &quic.Config{EnableDatagrams: true})
	if err != nil {
		t.Fatal(err)
	}
	h3 := &http3.Server{Handler: http.HandlerFunc(e.srv.ServeReverseTunnel)}
	go func() { _ = h3.ServeListener(ln) }()
	t.Cleanup(func() { _ = h3.Close(); _ = ln.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, ln.Addr().String(), &tls.Config{RootCAs: e.ca.Pool, ServerName: "proxy.localhost",
		Certificates: []tls.Certificate{e.alice}, NextProtos: []string{http3.NextProtoH3}}, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = qc.CloseWithError(0, "") })
	cc := (&http3.Transport{}).NewClientConn(qc)
	select {
	case <-cc.ReceivedSettings():
	case <-ctx.Done():
		t.Fatal("no SETTINGS from the h3 server")
	}
	if !cc.Settings().EnableExtendedConnect {
		t.Fatal("the h3 server did not send SETTINGS_ENABLE_CONNECT_PROTOCOL")
	}
	rs, err := cc.OpenRequestStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("https://proxy.localhost/.well-known/tp/reverse-http/blog")
	req := &http.Request{Method: http.MethodConnect, Proto: "reverse", URL: u, Host: "proxy.localhost",
		Header: http.Header{"Alpn": {"http%2F1.1"}}}
	if err := rs.SendRequestHeader(req); err != nil {
		t.Fatal(err)
	}
	resp, err := rs.ReadResponse()
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Selected-ALPN") != "http%2F1.1" {
		t.Fatalf("h3 extended CONNECT :protocol reverse: %s, Selected-ALPN %q; want 200, http%%2F1.1", resp.Status, resp.Header.Get("Selected-ALPN"))
	}
	rtServeApp(t, &rtH3Stream{RequestStream: rs, local: qc.LocalAddr(), remote: qc.RemoteAddr()}, "http/1.1", rtApp(t, nil))
	got, err := e.get(t, "/hello")
	if err != nil || got != "hello blog.rev.test over HTTP/1.1" {
		t.Fatalf("GET through the h3 tunnel: %q, %v", got, err)
	}
}
