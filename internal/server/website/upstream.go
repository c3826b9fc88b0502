package website

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"
)

// newUpstream forwards requests to u with the original Host and X-Forwarded-*
// headers, bounding the request body and the wait for the upstream's answer.
func newUpstream(name string, u *url.URL, maxBody int64, timeout time.Duration, log *slog.Logger) http.Handler {
	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	tr := &http.Transport{
		Proxy:                 nil, // the upstream is local to tpd; no environment proxy
		DialContext:           dialer.DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: timeout,
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   64,
		ForceAttemptHTTP2:     true,
	}
	return proxyTo(name, u, u.Redacted(), tr, maxBody, timeout, log)
}

// proxyTo forwards requests for site name through rt to target, keeping the
// client's Host and adding X-Forwarded-*, with the request body bounded by
// maxBody and the answer's errors mapped to 413, 502 and 504 for a person.
// upstream names target in log lines.
func proxyTo(name string, target *url.URL, upstream string, rt http.RoundTripper, maxBody int64, timeout time.Duration, log *slog.Logger) http.Handler {
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.SetXForwarded()
			pr.Out.Host = pr.In.Host
		},
		Transport: rt,
		ErrorLog:  slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			status, msg := http.StatusBadGateway, fmt.Sprintf("502 Bad Gateway: the server behind %s did not answer.", name)
			var tooBig *http.MaxBytesError
			switch {
			case errors.As(err, &tooBig):
				status, msg = http.StatusRequestEntityTooLarge, fmt.Sprintf("413 Request Entity Too Large: %s accepts request bodies up to %d bytes.", name, maxBody)
			case errors.Is(err, context.DeadlineExceeded) || isTimeout(err):
				status, msg = http.StatusGatewayTimeout, fmt.Sprintf("504 Gateway Timeout: the server behind %s did not answer within %s.", name, timeout)
			case errors.Is(err, context.Canceled):
				status = 499 // the client went away; nobody reads this
			}
			log.LogAttrs(r.Context(), slog.LevelWarn, "upstream request failed",
				slog.String("site", name), slog.String("upstream", upstream), slog.String("err", err.Error()))
			http.Error(w, msg, status)
		},
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > maxBody {
			http.Error(w, fmt.Sprintf("413 Request Entity Too Large: %s accepts request bodies up to %d bytes.", name, maxBody), http.StatusRequestEntityTooLarge)
			return
		}
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		}
		rp.ServeHTTP(w, r)
	})
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// headerTimeout bounds how long rt may take to answer with response headers,
// as http.Transport.ResponseHeaderTimeout does for a transport tpd does not
// own (a reverse tunnel's): the request's context ends when the bound passes
// first. The body then reads on without it, and its Close ends the context.
type headerTimeout struct {
	rt      http.RoundTripper
	timeout time.Duration
}

var _ http.RoundTripper = headerTimeout{}

func (h headerTimeout) RoundTrip(r *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithCancelCause(r.Context())
	timer := time.AfterFunc(h.timeout, func() { cancel(context.DeadlineExceeded) })
	resp, err := h.rt.RoundTrip(r.WithContext(ctx))
	if !timer.Stop() {
		if err == nil {
			_ = resp.Body.Close()
		}
		cancel(nil)
		return nil, fmt.Errorf("no response headers within %s: %w", h.timeout, context.DeadlineExceeded)
	}
	if err != nil {
		cancel(nil)
		return nil, err
	}
	body := &cancelOnClose{ReadCloser: resp.Body, cancel: func() { cancel(nil) }}
	resp.Body = body
	if rw, ok := body.ReadCloser.(io.ReadWriteCloser); ok { // a 101's upgraded stream (WebSocket) stays writable
		resp.Body = &cancelOnCloseRW{cancelOnClose: body, w: rw}
	}
	return resp, nil
}

type cancelOnCloseRW struct {
	*cancelOnClose
	w io.Writer
}

func (c *cancelOnCloseRW) Write(p []byte) (int, error) { return c.w.Write(p) }

type cancelOnClose struct {
	io.ReadCloser
	cancel func()
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}
