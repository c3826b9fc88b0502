package e2e

import (
	"encoding/json"
	"io"
	"net"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/tp-proxy/tp/internal/testkit/testnet"
)

// benchBytes is what the bulk half of BenchmarkBrowser downloads.
const benchBytes = 64 << 20

// BenchmarkBrowser measures a page of headless Chromium dialing through
// TP.js over WebTransport (wt) and over WebSockets (ws) against `tp forward`
// over QUIC to the same tpd, in one run: a new connection (dial, then one byte to an echo and back; the
// median of 50) and a 64 MiB download. The figures are the ratios
// (browser ÷ tp) and both sides' own.
//
//	go test -run '^$' -bench BenchmarkBrowser -benchtime 1x ./internal/tests/e2e/
func BenchmarkBrowser(b *testing.B) {
	srv := startServer(b, testPolicy, "TP_WEBTRANSPORT=true")
	alice := srv.login(b, "alice", "laptop")
	home := alice[0][len("TP_HOME="):]
	echo := testnet.Echo(b)
	source := testnet.Serve(b, func(c *net.TCPConn) {
		buf := make([]byte, 256<<10)
		for n := 0; n < benchBytes; n += len(buf) {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	chrome := startChromeQUIC(b, filepath.Join(srv.DataDir, "ca", "root.crt"), srv.Addr)
	chrome.open(srv.URL + "/tp/web/tp.js")
	waitEval(b, chrome, "document.readyState === 'complete' ? 'yes' : ''")
	fwdEcho, _ := startForward(b, alice, echo, "--transport", "quic")
	fwdSource, _ := startForward(b, alice, source, "--transport", "quic")

	page := func(transport string) (dialMs, mbps float64) {
		got := chrome.evalAsync(`(async () => {
			const TP = await import("/tp/web/tp.js");
			const s = await TP.connect(location.origin, ` + credentialJS(b, home) + `, {transport: "` + transport + `"});
			const one = new Uint8Array([42]);
			const dials = [];
			for (let i = 0; i < 51; i++) {
				const t0 = performance.now();
				const c = await s.dial("` + echo + `");
				const w = c.writable.getWriter();
				await w.write(one);
				const r = c.readable.getReader();
				await r.read();
				if (i > 0) dials.push(performance.now() - t0);
				await w.close();
				r.releaseLock();
			}
			dials.sort((a, b) => a - b);
			const t0 = performance.now();
			const c = await s.dial("` + source + `");
			let n = 0;
			for await (const chunk of c.readable) n += chunk.length;
			const bulk = performance.now() - t0;
			s.close();
			return {dialMs: dials[25], bulkMs: bulk, bytes: n};
		})()`)
		var page struct {
			DialMs, BulkMs float64
			Bytes          int
		}
		if err := json.Unmarshal([]byte(got), &page); err != nil || page.Bytes != benchBytes {
			b.Fatalf("the page's figures over %s: %s (%v)", transport, got, err)
		}
		return page.DialMs, float64(benchBytes) / 1e6 / (page.BulkMs / 1e3)
	}
	for b.Loop() {
		wtDial, wtMBps := page("webtransport")
		wsDial, wsMBps := page("websocket")
		tpDial := medianDial(b, fwdEcho, 51)
		t0 := time.Now()
		c, err := net.Dial("tcp", fwdSource)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, c)
		c.Close()
		tpBulk := time.Since(t0)
		if err != nil || n != benchBytes {
			b.Fatalf("the download through tp forward: %d bytes, %v", n, err)
		}
		tpMBps := float64(benchBytes) / 1e6 / tpBulk.Seconds()
		tpMs := float64(tpDial.Microseconds()) / 1e3
		b.ReportMetric(tpMs, "tp-dial-ms")
		b.ReportMetric(tpMBps, "tp-MB/s")
		b.ReportMetric(wtDial, "wt-dial-ms")
		b.ReportMetric(wtDial/tpMs, "wt-dial/tp")
		b.ReportMetric(wtMBps, "wt-MB/s")
		b.ReportMetric(wtMBps/tpMBps, "wt-bulk/tp")
		b.ReportMetric(wsDial, "ws-dial-ms")
		b.ReportMetric(wsDial/tpMs, "ws-dial/tp")
		b.ReportMetric(wsMBps, "ws-MB/s")
		b.ReportMetric(wsMBps/tpMBps, "ws-bulk/tp")
	}
}

// medianDial is the median of n-1 new connections through a tp forward at
// addr (the first warms up): connect, one byte to the echo and back.
func medianDial(b *testing.B, addr string, n int) time.Duration {
	b.Helper()
	var ds []time.Duration
	buf := make([]byte, 1)
	for i := range n {
		t0 := time.Now()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write([]byte{42}); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		if i > 0 {
			ds = append(ds, time.Since(t0))
		}
		c.Close()
	}
	slices.Sort(ds)
	return ds[len(ds)/2]
}
