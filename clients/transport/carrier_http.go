package transport

// The http carrier's client end (docs/PROTOCOL.md §9.8): QUIC packets go out
// in POST bodies and come back in the responses. One empty poll is kept
// outstanding so that the server has a request to answer when it has
// something to send; packets to send go out at once on a request of their own.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tp-proxy/tp/proxy/wire"
)

// httpCarrierLink is one http carrier session (a session ID).
type httpCarrierLink struct {
	client *http.Client
	tr     *http.Transport
	url    string
	id     string
	key    []byte        // the session key (wire.CarrierSessionKey)
	seq    atomic.Uint64 // the last request's sequence number

	in      chan []byte
	kick    chan struct{}
	done    chan struct{}
	once    sync.Once
	failed  atomic.Value // error: the session is broken
	polling atomic.Bool

	mu      sync.Mutex
	pending bytes.Buffer // frames queued by WritePacket, sent by a worker
	sending atomic.Int32 // requests with frames in flight
}

// flushed reports whether every frame written so far has been answered.
func (l *httpCarrierLink) flushed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.pending.Len() == 0 && l.sending.Load() == 0
}

const httpCarrierWorkers = 2

func (l *httpCarrierLink) ReadPacket(b []byte) (int, error) {
	select {
	case p := <-l.in:
		return copy(b, p), nil
	case <-l.done:
		if err, ok := l.failed.Load().(error); ok {
			return 0, err
		}
		return 0, errors.New("http carrier closed")
	}
}

func (l *httpCarrierLink) WritePacket(b []byte) error {
	select {
	case <-l.done:
		return errors.New("http carrier closed")
	default:
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.pending.Len()+2+len(b) > wire.MaxCarrierBody {
		return nil // a full body waits: the packet is lost, QUIC sends it again
	}
	return wire.WriteCarrierFrame(&l.pending, b, nil)
}

func (l *httpCarrierLink) Flush() error {
	select {
	case l.kick <- struct{}{}:
	default:
	}
	return nil
}

func (l *httpCarrierLink) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.tr.CloseIdleConnections()
	})
	return nil
}

func (l *httpCarrierLink) fail(err error) {
	l.failed.CompareAndSwap(nil, err)
	_ = l.Close()
}

func (l *httpCarrierLink) take() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.pending.Len() == 0 {
		return nil
	}
	b := bytes.Clone(l.pending.Bytes())
	l.pending.Reset()
	l.sending.Add(1) // under mu, so that flushed never sees neither
	return b
}

// worker sends what is pending, or polls when no other worker does.
func (l *httpCarrierLink) worker() {
	failures := 0
	for {
		select {
		case <-l.done:
			return
		default:
		}
		body := l.take()
		if body == nil {
			if !l.polling.CompareAndSwap(false, true) {
				select {
				case <-l.kick:
				case <-l.done:
					return
				}
				continue
			}
		}
		err := l.post(body)
		if body != nil {
			l.sending.Add(-1)
		}
		if body == nil {
			l.polling.Store(false)
			select { // another worker may be waiting for its turn to poll
			case l.kick <- struct{}{}:
			default:
			}
		}
		if err != nil {
			if failures++; failures >= 3 {
				l.fail(err)
				return
			}
			select {
			case <-time.After(100 * time.Millisecond):
			case <-l.done:
				return
			}
			continue
		}
		failures = 0
	}
}

func (l *httpCarrierLink) post(body []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	go func() {
		select {
		case <-l.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, l.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set(wire.CarrierSessionHeader, l.id)
	req.Header.Set(wire.CarrierAuthHeader, wire.CarrierAuth(l.key, l.id, l.seq.Add(1), body))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := l.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("the http carrier got %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	r := bufio.NewReader(io.LimitReader(resp.Body, wire.MaxCarrierBody))
	for {
		b := make([]byte, wire.MaxCarrierPacket)
		n, err := wire.ReadCarrierFrame(r, b)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		select {
		case l.in <- b[:n]:
		default: // the reader does not keep up: a loss
		}
	}
}

// carrierHTTPURL is the http carrier's endpoint: CarrierHTTPURL, or the
// server's own.
func (d CarrierDialer) carrierHTTPURL() string {
	if d.HTTPURL != "" {
		return d.HTTPURL
	}
	return "https://" + d.Server + wire.CarrierHTTPPath
}

// dialHTTPCarrier opens an http carrier session: a random session ID and a
// first poll that must succeed.
func (d CarrierDialer) dialHTTPCarrier(ctx context.Context) (CarrierLink, error) {
	cfg, err := d.carrierWebTLS()
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{
		Proxy:                  func(r *http.Request) (*url.URL, error) { return d.carrierProxy(r.URL) },
		TLSClientConfig:        cfg,
		ForceAttemptHTTP2:      true,
		MaxResponseHeaderBytes: 16 << 10,
		MaxConnsPerHost:        httpCarrierWorkers + 1,
		IdleConnTimeout:        30 * time.Second,
	}
	var id [16]byte
	_, _ = rand.Read(id[:])
	l := &httpCarrierLink{
		client: &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
		tr:     tr,
		url:    d.carrierHTTPURL(),
		id:     hex.EncodeToString(id[:]),
		in:     make(chan []byte, carrierQueue),
		kick:   make(chan struct{}, 1),
		done:   make(chan struct{}),
	}
	// A first request opens the session with this end's key, and tells a
	// wrong URL at once; the answer's key makes the session key.
	priv, pub, err := wire.NewCarrierKey()
	if err != nil {
		tr.CloseIdleConnections()
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(pctx, http.MethodPost, l.url, http.NoBody)
	if err == nil {
		req.Header.Set(wire.CarrierSessionHeader, l.id)
		req.Header.Set(wire.CarrierKeyHeader, pub)
		var resp *http.Response
		if resp, err = l.client.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, wire.MaxCarrierBody))
			_ = resp.Body.Close()
			switch {
			case resp.StatusCode != http.StatusOK:
				msg := ""
				if resp.StatusCode == http.StatusBadRequest {
					msg = "; an older TP server takes no " + wire.CarrierKeyHeader + ": update it, or"
				}
				err = fmt.Errorf("%s answered %s (does this TP server offer the http carrier?%s use --carrier udp, tls or ws)", l.url, resp.Status, msg)
			default:
				l.key, err = wire.CarrierSessionKey(priv, resp.Header.Get(wire.CarrierKeyHeader), l.id)
				if err != nil {
					err = fmt.Errorf("%s answered without the server's key: %w (a proxy on the way may drop the header)", l.url, err)
				}
			}
		}
	}
	if err != nil {
		tr.CloseIdleConnections()
		return nil, fmt.Errorf("opening the http carrier at %s: %w", l.url, err)
	}
	for range httpCarrierWorkers {
		go l.worker()
	}
	return l, nil
}
