package clients

import (
	"context"
	"crypto/tls"
	"fmt"
	"sync"
	"time"

	"github.com/tp-proxy/tp/acme/login"
)

// reverseCerts caches a Client's reverse-name server certificates.
type reverseCerts struct {
	mu    sync.Mutex
	certs map[string]*tls.Certificate
	lock  map[string]*sync.Mutex // one ACME order per name at a time
}

func (c *Client) reverse() *reverseCerts {
	rc := &c.rev
	rc.mu.Lock()
	if rc.certs == nil {
		rc.certs, rc.lock = map[string]*tls.Certificate{}, map[string]*sync.Mutex{}
	}
	rc.mu.Unlock()
	return rc
}

// ReverseCertificate returns a server certificate for name, a full reverse name
// this device holds, from TP's CA, getting a new one when there is none or the
// current one is in the last third of its life (so it is renewed well before it
// expires, at the next session or RenewReverse tick). If renewal fails while the
// current certificate is valid, the current one is used.
func (c *Client) ReverseCertificate(ctx context.Context, name string) (*tls.Certificate, error) {
	rc := c.reverse()
	rc.mu.Lock()
	cur := rc.certs[name]
	l := rc.lock[name]
	if l == nil {
		l = &sync.Mutex{}
		rc.lock[name] = l
	}
	rc.mu.Unlock()
	now := c.now()
	if cur != nil && !NeedsRenewal(cur.Leaf, now) {
		return cur, nil
	}
	l.Lock()
	defer l.Unlock()
	rc.mu.Lock()
	cur = rc.certs[name]
	rc.mu.Unlock()
	if cur != nil && !NeedsRenewal(cur.Leaf, now) {
		return cur, nil
	}
	key, err := c.Home.DeviceKey()
	if err != nil {
		return nil, err
	}
	octx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	hc := login.HTTPClient(c.Root)
	defer hc.CloseIdleConnections()
	creds, err := login.ReverseCertificate(octx, hc, c.Profile.Server, c.Profile.DeviceID, key, name)
	if err != nil {
		if cur != nil && now.Before(cur.Leaf.NotAfter) {
			c.logf("tp expose: could not renew the certificate for %s (%v); using the current one until %s", name, err, cur.Leaf.NotAfter.Local().Format(time.DateTime))
			return cur, nil
		}
		return nil, fmt.Errorf("getting a certificate for %s: %w", name, err)
	}
	cert := &tls.Certificate{PrivateKey: creds.Key, Leaf: creds.Chain[0]}
	for _, x := range creds.Chain {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}
	rc.mu.Lock()
	rc.certs[name] = cert
	rc.mu.Unlock()
	return cert, nil
}

// RenewReverse keeps the certificates of names fresh until ctx ends: it checks
// every interval and renews those in the last third of their life.
func (c *Client) RenewReverse(ctx context.Context, names func() []string, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		for _, n := range names() {
			if _, err := c.ReverseCertificate(ctx, n); err != nil && ctx.Err() == nil {
				c.logf("tp expose: %v", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
