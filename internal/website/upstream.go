package website

import (
	"context"
	"errors"
	"fmt"
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
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(u)
			pr.SetXForwarded()
			pr.Out.Host = pr.In.Host
		},
		Transport: &http.Transport{
			Proxy:                 nil, // the upstream is local to tpd; no environment proxy
			DialContext:           dialer.DialContext,
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: timeout,
			ExpectContinueTimeout: time.Second,
			IdleConnTimeout:       90 * time.Second,
			MaxIdleConnsPerHost:   64,
			ForceAttemptHTTP2:     true,
		},
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
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
				slog.String("site", name), slog.String("upstream", u.Redacted()), slog.String("err", err.Error()))
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
