package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// chrome is headless Chromium (Debian's chromium) driven over the DevTools
// protocol, for pages a person clicks through: it trusts TP's root from an
// NSS database, as a person's browser does once they import it, and keeps
// its cookies for the test's life.
type chrome struct {
	t    testing.TB
	conn *websocket.Conn
	ctx  context.Context
	next int
}

// startChrome runs Chromium trusting the root certificate in rootPEM.
func startChrome(t testing.TB, rootPEM string) *chrome {
	t.Helper()
	return startChromeWith(t, rootPEM, "--disable-quic")
}

// startChromeQUIC is startChrome with QUIC, which WebTransport runs over,
// for origin (host:port): Chromium speaks QUIC only to servers whose
// certificate chains to a public root, unless the origin is one it is told
// to force QUIC on, as here (TP's root is a local one).
func startChromeQUIC(t testing.TB, rootPEM, origin string) *chrome {
	t.Helper()
	flags := []string{"--origin-to-force-quic-on=" + origin}
	if os.Getenv("TP_TEST_CHROME_LOG") != "" {
		flags = append(flags, "--enable-logging=stderr", "--v=1")
	}
	if dir := os.Getenv("TP_TEST_CHROME_NETLOG"); dir != "" { // Chromium's network log, for a failure to read
		flags = append(flags, "--log-net-log="+filepath.Join(dir, strings.ReplaceAll(t.Name(), "/", "_")+".json"), "--net-log-capture-mode=Everything")
	}
	return startChromeWith(t, rootPEM, flags...)
}

func startChromeWith(t testing.TB, rootPEM string, flags ...string) *chrome {
	t.Helper()
	nb := newBrowser(t, rootPEM) // http_test.go: Chromium, and TP's root in its NSS database
	chromium, home := nb.chromium, nb.home
	profile := filepath.Join(home, "profile")
	ctx, cancel := context.WithCancel(context.Background())
	args := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
		"--user-data-dir=" + profile, "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"}, flags...)
	cmd := commandContext(ctx, chromium, append(args, "about:blank")...)
	cmd.Env = append(os.Environ(), "HOME="+home)
	cmd.SysProcAttr.Setpgid = true // its helpers with it: endBrowser
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if os.Getenv("TP_TEST_CHROME_LOG") != "" {
		cmd.Stderr = os.Stderr
	}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { // before the removal of its profile (t.TempDir's, made earlier)
		endBrowser(t, cmd.Process.Pid)
		cancel()
		_ = cmd.Wait()
	})
	// Chromium names its DevTools port in the profile once it listens.
	var port string
	deadline := time.Now().Add(60 * time.Second)
	for port == "" {
		if b, err := os.ReadFile(filepath.Join(profile, "DevToolsActivePort")); err == nil {
			port, _, _ = strings.Cut(string(b), "\n")
		}
		if port == "" && time.Now().After(deadline) {
			t.Fatalf("chromium opened no DevTools port within 60s:\n%s", stderr.String())
		}
		if port == "" {
			time.Sleep(50 * time.Millisecond) // waiting for Chromium's start, bounded by the deadline above
		}
	}
	resp, err := http.Get("http://127.0.0.1:" + strings.TrimSpace(port) + "/json/list")
	if err != nil {
		t.Fatal(err)
	}
	var targets []struct{ Type, WebSocketDebuggerURL string }
	err = json.NewDecoder(resp.Body).Decode(&targets)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	var ws string
	for _, tg := range targets {
		if tg.Type == "page" {
			ws = tg.WebSocketDebuggerURL
		}
	}
	if ws == "" {
		t.Fatalf("chromium shows no page: %+v", targets)
	}
	conn, _, err := websocket.Dial(ctx, ws, nil)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadLimit(64 << 20)
	t.Cleanup(func() { conn.CloseNow() })
	return &chrome{t: t, conn: conn, ctx: ctx}
}

// call sends one DevTools command and returns its result.
func (b *chrome) call(method string, params any) json.RawMessage {
	b.t.Helper()
	res, err := b.try(method, params)
	if err != nil {
		b.t.Fatalf("%s: %v", method, err)
	}
	return res
}

// errNavigating is a command's answer while the page it ran in goes away
// under it (a click's form post or a redirect under way): not a failure of
// the page, only "ask again".
var errNavigating = errors.New("the page is navigating")

// try sends one DevTools command and returns its result, or the command's
// error (errNavigating while the page navigates); a broken connection to
// the browser fails the test.
func (b *chrome) try(method string, params any) (json.RawMessage, error) {
	b.t.Helper()
	b.next++
	id := b.next
	msg, _ := json.Marshal(map[string]any{"id": id, "method": method, "params": params})
	ctx, cancel := context.WithTimeout(b.ctx, 60*time.Second)
	defer cancel()
	if err := b.conn.Write(ctx, websocket.MessageText, msg); err != nil {
		b.t.Fatalf("%s: %v", method, err)
	}
	for {
		_, data, err := b.conn.Read(ctx)
		if err != nil {
			b.t.Fatalf("%s: %v", method, err)
		}
		var m struct {
			ID     int             `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *struct{ Message string }
		}
		if json.Unmarshal(data, &m) != nil || m.ID != id {
			continue // an event, or another command's answer
		}
		if m.Error != nil {
			for _, nav := range []string{"navigated or closed", "Cannot find context", "Execution context was destroyed"} {
				if strings.Contains(m.Error.Message, nav) {
					return nil, fmt.Errorf("%w: %s", errNavigating, m.Error.Message)
				}
			}
			return nil, errors.New(m.Error.Message)
		}
		return m.Result, nil
	}
}

// open loads url in the page.
func (b *chrome) open(url string) {
	b.t.Helper()
	b.call("Page.navigate", map[string]any{"url": url})
}

// eval runs a JavaScript expression in the page and returns its value as a string.
func (b *chrome) eval(expr string) string {
	b.t.Helper()
	res := b.call("Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true})
	var r struct {
		Result struct {
			Value any `json:"value"`
		} `json:"result"`
	}
	_ = json.Unmarshal(res, &r)
	if r.Result.Value == nil {
		return ""
	}
	return fmt.Sprint(r.Result.Value)
}

// text is the page's visible text.
func (b *chrome) text() string {
	return b.eval(`document.body ? document.body.innerText : ""`)
}

// settled is the page's visible text once it has loaded whole, and false
// while it is loading or navigating.
func (b *chrome) settled() (string, bool) {
	b.t.Helper()
	res, err := b.try("Runtime.evaluate", map[string]any{"returnByValue": true,
		"expression": `document.readyState === "complete" && document.body ? document.body.innerText : null`})
	if errors.Is(err, errNavigating) {
		return "", false
	} else if err != nil {
		b.t.Fatalf("Runtime.evaluate: %v", err)
	}
	var r struct {
		Result struct {
			Value *string `json:"value"`
		} `json:"result"`
	}
	if json.Unmarshal(res, &r) != nil || r.Result.Value == nil {
		return "", false
	}
	return *r.Result.Value, true
}

// waitText waits (up to 60 s) until the page has loaded whole and its text
// holds want, and returns the text.
func (b *chrome) waitText(want string) string {
	b.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	text := ""
	for {
		if now, ok := b.settled(); ok {
			if text = now; strings.Contains(text, want) {
				return text
			}
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("the page does not say %q within 60s:\n%s", want, text)
		}
		time.Sleep(50 * time.Millisecond) // waiting for the page to load, bounded by the deadline above
	}
}

// click clicks the element that selector names.
func (b *chrome) click(selector string) {
	b.t.Helper()
	sel, _ := json.Marshal(selector)
	if b.eval("(function(e){ if (!e) return 'none'; e.click(); return 'ok' })(document.querySelector("+string(sel)+"))") != "ok" {
		b.t.Fatalf("the page at %s has no %s:\n%s", b.eval("location.href"), selector, b.text())
	}
}
