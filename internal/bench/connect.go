package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"golang.org/x/net/http2"

	"github.com/tp-proxy/tp/clients"
)

// Scenario 12: bulk throughput of one CONNECT tunnel through tpd's
// proxy name (proxy.localhost, tpd's default proxy-names) with the device
// certificate, over HTTP/1.1 and over h2, opened by tpbench's process, against
// `tp forward` over TLS, a tp/1 session opened by tp's dialer in tpbench's
// process, and direct TCP, to the same sink in the same runs. Each run sends the
// bulk size to the sink, which acknowledges the count (bulkOnce).
//
// The CONNECT variants and the in-process dialer have no local hop; `tp forward`
// adds a loopback connection and the tp process (what a user of tp forward
// has). `go test -bench ConnectBulk ./internal/server/tpd/` compares CONNECT with the
// in-process dialer only (1 MiB chunks, each acknowledged).

// proxyName is tpd's default proxy name (proxy-names).
const proxyName = "proxy.localhost"

// connectTLS dials tpd's proxy name with the device certificate, offering alpn.
func (e *Env) connectTLS(ctx context.Context, alpn string) (*tls.Conn, error) {
	cert, roots, err := e.deviceTLS()
	if err != nil {
		return nil, err
	}
	d := tls.Dialer{Config: &tls.Config{
		ServerName: proxyName, RootCAs: roots, Certificates: []tls.Certificate{cert},
		NextProtos: []string{alpn}, MinVersion: tls.VersionTLS13,
	}}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", e.tpdAddr)
	if err != nil {
		return nil, err
	}
	tc := c.(*tls.Conn)
	if got := tc.ConnectionState().NegotiatedProtocol; got != alpn {
		tc.Close()
		return nil, fmt.Errorf("the proxy name negotiated %q, not %s", got, alpn)
	}
	return tc, nil
}

// connectH1Stream opens an HTTP/1.1 CONNECT tunnel to target. Its half-close
// is the TLS close_notify, which tpd passes on as the destination's half-close.
func (e *Env) connectH1Stream(ctx context.Context, target string) (*stream, error) {
	c, err := e.connectTLS(ctx, "http/1.1")
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target); err != nil {
		c.Close()
		return nil, err
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("CONNECT %s: %w", target, err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		c.Close()
		return nil, fmt.Errorf("CONNECT %s: %s: %s", target, resp.Status, firstLine(string(body)))
	}
	c.SetDeadline(time.Time{}) // bulkOnce's watchdog bounds the tunnel
	return &stream{r: br, w: c, closeWrite: c.CloseWrite, close: c.Close}, nil
}

// connectH2Stream opens an HTTP/2 CONNECT tunnel (RFC 9113 §8.5) to target on
// a connection of its own. Its half-close is END_STREAM.
func (e *Env) connectH2Stream(ctx context.Context, target string) (*stream, error) {
	c, err := e.connectTLS(ctx, "h2")
	if err != nil {
		return nil, err
	}
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	pr, pw := io.Pipe()
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Host: target}, Host: target, Header: http.Header{}, Body: pr}
	// The request's context governs the tunnel's whole life, so the answer's
	// deadline closes the connection instead of cancelling a context.
	timer := time.AfterFunc(10*time.Second, func() { cc.Close() })
	resp, err := cc.RoundTrip(req.WithContext(ctx))
	timer.Stop()
	if err != nil {
		pw.Close()
		cc.Close()
		return nil, fmt.Errorf("CONNECT %s over h2: %w", target, err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		pw.Close()
		cc.Close()
		return nil, fmt.Errorf("CONNECT %s over h2: %s: %s", target, resp.Status, firstLine(string(body)))
	}
	return &stream{r: resp.Body, w: pw, closeWrite: pw.Close, close: func() error {
		pw.Close()
		resp.Body.Close()
		return cc.Close()
	}}, nil
}

func connectBulk(ctx context.Context, e *Env, sz sizes, runs int) ([]Row, error) {
	const scn = "12 CONNECT bulk"
	direct := "direct TCP"
	mk := func(name, transport, note string, open func() (*stream, error)) *variant {
		r := &Row{Scenario: scn, Variant: name, Transport: transport, Unit: "MB/s", Note: note}
		if name != direct {
			r.Baseline = direct
		}
		return &variant{rows: []*Row{r}, fn: func() ([]float64, error) { return bulkOnce(open, sz.bulkBytes, false) }}
	}
	failed := func(name, transport string, err error) *variant {
		e.log("%s: %v", name, err)
		return &variant{rows: []*Row{{Scenario: scn, Variant: name, Transport: transport, Unit: "MB/s", Err: firstLine(err.Error())}}}
	}
	fwdName := "tp forward over TLS"
	h1Name := "CONNECT over HTTP/1.1 (proxy name)"
	h2Name := "CONNECT over h2 (proxy name)"
	vs := []*variant{mk(direct, "tcp", "", func() (*stream, error) { return tcpStream(e.sink) })}
	if addr, _, err := e.startForward(ctx, e.sink, e.tlsArgs()...); err != nil {
		vs = append(vs, failed(fwdName, "tls", err))
	} else {
		vs = append(vs, mk(fwdName, "tls", "client → loopback → tp → tpd", func() (*stream, error) { return tcpStream(addr) }))
	}
	dialName := "tp/1 dial over TLS in tpbench (clients.Dialer)"
	if dl, err := e.inProcessDialer(); err != nil {
		vs = append(vs, failed(dialName, "tls", err))
	} else {
		defer dl.Close()
		vs = append(vs, mk(dialName, "tls", "what tp forward does, without its local hop", func() (*stream, error) { return dialStream(ctx, dl, e.sink) }))
	}
	for _, c := range []struct {
		name, note string
		open       func() (*stream, error)
	}{
		{h1Name, "tpbench is the proxy's client (no local hop)", func() (*stream, error) { return e.connectH1Stream(ctx, e.sink) }},
		{h2Name, "one tunnel per h2 connection", func() (*stream, error) { return e.connectH2Stream(ctx, e.sink) }},
	} {
		if err := warmCtx(ctx, func() error { _, err := bulkOnce(c.open, 1<<20, false); return err }); err != nil {
			vs = append(vs, failed(c.name, "tls", err))
		} else {
			vs = append(vs, mk(c.name, "tls", c.note, c.open))
		}
	}
	e.interleave(runs, vs)
	rows := collect(vs)
	for _, base := range []string{fwdName, dialName} {
		for _, n := range []string{h1Name, h2Name} {
			if r, b := find(vs, n), find(vs, base); r != nil && b != nil {
				rows = append(rows, ratioRow(scn, n+" ÷ "+base+" (per run)", r, b, ""))
			}
		}
	}
	return rows, nil
}

// inProcessDialer is tp's dialer for the bench device, over TLS: the baseline
// of `go test -bench ConnectBulk`, where CONNECT's client is also in process.
func (e *Env) inProcessDialer() (*clients.Dialer, error) {
	c, err := clients.Open(clients.Home{Dir: e.home})
	if err != nil {
		return nil, err
	}
	dl, err := c.Dialer()
	if err != nil {
		return nil, err
	}
	dl.Transport = clients.TransportTLS
	dl.Timeout = 10 * time.Second
	return dl, nil
}

// dialStream opens a tp/1 session to target with dl. Its half-close is the
// session's (the tunnel's CloseWrite).
func dialStream(ctx context.Context, dl *clients.Dialer, target string) (*stream, error) {
	c, err := dl.DialContext(ctx, "tcp", target)
	if err != nil {
		return nil, err
	}
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		c.Close()
		return nil, fmt.Errorf("internal: tp's tunnel %T has no CloseWrite", c)
	}
	return &stream{r: c, w: c, closeWrite: cw.CloseWrite, close: c.Close}, nil
}
