package tpd

// Peering between the instances on one database (docs/SCALE.md, "Peering"):
// this instance's node certificate, the TLS configurations that accept only
// node certificates on ALPN tp-peer/1, the route lookup (pgstore.Routes,
// invalidated by the holds notification) and the row in tp_instances that
// tells the others where to reach this one.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/tp-proxy/tp/authz"
	"github.com/tp-proxy/tp/internal/server/pgstore"
	"github.com/tp-proxy/tp/proxy"
)

// nodeCertLifetime is a node certificate's; it is renewed after two thirds.
const nodeCertLifetime = 24 * time.Hour

// peerOptions are the proxy's PeerOptions, or nil without a database or
// reverse names.
func (d *Daemon) peerOptions(revOpts proxy.ReverseOptions) (*proxy.PeerOptions, error) {
	if d.db == nil || revOpts.Store == nil || revOpts.Zone == "" {
		return nil, nil
	}
	if err := d.renewNodeCert(); err != nil {
		return nil, fmt.Errorf("issuing this instance's node certificate: %w", err)
	}
	d.routes = pgstore.NewRoutes(d.db)
	d.db.OnChange(pgstore.TopicHolds, func(ctx context.Context) error {
		d.routes.Invalidate()
		return d.refreshPeerPublic(ctx)
	})
	getCert := func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return d.nodeCert.Load(), nil }
	return &proxy.PeerOptions{
		Self:         d.instance,
		Route:        d.routes.Route,
		Forget:       d.routes.Forget,
		InstanceAddr: d.db.InstanceAddr,
		AgentRoutes: func(ctx context.Context, deviceID string) ([]proxy.PeerRoute, error) {
			return d.db.AgentRoutes(ctx, d.instance, deviceID)
		},
		ServerTLS: &tls.Config{
			GetCertificate: getCert,
			ClientAuth:     tls.RequireAnyClientCert, // verified below: node certificates only
			VerifyConnection: func(cs tls.ConnectionState) error {
				_, err := d.verifyNode(cs, "")
				return err
			},
		},
		ClientTLS: func(instance string) *tls.Config {
			return &tls.Config{
				GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return d.nodeCert.Load(), nil },
				InsecureSkipVerify:   true, // verified below: that instance's node certificate from TP's CA
				VerifyConnection: func(cs tls.ConnectionState) error {
					_, err := d.verifyNode(cs, instance)
					return err
				},
			}
		},
	}, nil
}

// verifyNode accepts the peer's certificate in cs if it is a node
// certificate of TP's CA (of instance want, unless want is empty).
func (d *Daemon) verifyNode(cs tls.ConnectionState, want string) (string, error) {
	if len(cs.PeerCertificates) == 0 {
		return "", errors.New("a TP node certificate is required on ALPN tp-peer/1")
	}
	leaf := cs.PeerCertificates[0]
	name, ok := authz.NodeName(leaf)
	if !ok {
		return "", errors.New("only a TP node certificate (of another TP server instance) is accepted on ALPN tp-peer/1; a device certificate is not")
	}
	is := authz.Issuer{Root: d.pki.Root, Intermediate: d.pki.Intermediate}
	if err := is.VerifyLeaf(leaf, time.Now()); err != nil {
		return "", fmt.Errorf("node certificate of %s: %w", name, err)
	}
	if want != "" && name != want {
		return "", fmt.Errorf("the peer at this address is instance %s, not %s (it restarted or the address moved)", name, want)
	}
	return name, nil
}

// renewNodeCert issues a fresh node certificate for this instance.
func (d *Daemon) renewNodeCert() error {
	chain, key, leaf, err := d.pki.IssueNodeCert(d.instance, nodeCertLifetime)
	if err != nil {
		return err
	}
	d.nodeCert.Store(&tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf})
	d.metrics.certIssued("node")
	return nil
}

// peerAddress is where the other instances reach this one: peer-address, or
// the address ln is bound to, or the host name and its port when ln listens
// on every address.
func (d *Daemon) peerAddress(ln net.Listener) string {
	if d.cfg.PeerAddress != "" {
		return d.cfg.PeerAddress
	}
	host, port, err := net.SplitHostPort(ln.Addr().String())
	if err != nil {
		return ln.Addr().String()
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsUnspecified() {
		return ln.Addr().String()
	}
	name, err := os.Hostname()
	if err != nil || name == "" {
		name = "localhost"
	}
	return net.JoinHostPort(name, port)
}

// runPeers keeps this instance's row in tp_instances (peer address, policy
// revision) fresh every reverse-renew and its node certificate renewed, until
// ctx ends; then, while the drain lasts (until drained is closed), the row
// says the instance drains, and then it is deleted (instances.go).
func (d *Daemon) runPeers(ctx context.Context, ln net.Listener, drained <-chan struct{}) {
	if d.routes == nil {
		return
	}
	addr := d.peerAddress(ln)
	d.peerAddr.Store(&addr)
	d.log.Info("peering with the other instances", "instance", d.instance, "peer_address", addr)
	beat := func() {
		err := d.db.Heartbeat(ctx, pgstore.Instance{Name: d.instance, PeerAddress: addr, PolicyRevision: d.policy.Revision()})
		if err != nil && ctx.Err() == nil {
			d.log.Warn("peering: cannot record this instance in the database; other instances cannot reach its names until it can", "err", err)
		}
	}
	beat()
	_ = d.refreshPeerPublic(ctx)
	t := time.NewTicker(d.cfg.ReverseRenew)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			d.drainInstance(ctx, addr, t.C, drained)
			return
		case <-t.C:
		}
		beat()
		if err := d.refreshPeerPublic(ctx); err != nil && ctx.Err() == nil {
			d.log.Warn("peering: cannot read which public ports and server names other instances serve; keeping the last known", "err", err)
		}
		if c := d.nodeCert.Load(); c != nil && time.Until(c.Leaf.NotAfter) < nodeCertLifetime/3 {
			if err := d.renewNodeCert(); err != nil {
				d.log.Error("peering: renewing the node certificate failed; retrying", "err", err)
			}
		}
	}
}

// refreshPeerPublic tells the proxy which public ports and pass-through names
// other instances serve, so that it keeps those ports open and carries their
// connections there (a holds notification, and every reverse-renew for leases
// that ran out without one).
func (d *Daemon) refreshPeerPublic(ctx context.Context) error {
	if d.proxy == nil {
		return nil
	}
	exps, err := d.db.PeerPublic(ctx, d.instance)
	if err != nil {
		return err
	}
	own := d.peerAddr.Load()
	keys := make([]string, 0, len(exps))
	for _, e := range exps {
		// An instance on this host and address (several tpd on one machine)
		// already serves the port on the address this one would bind: opening
		// it here would take it from that instance. Ports wait until this
		// instance knows its own address (runPeers).
		if !strings.HasPrefix(e.Key, "sni/") && (own == nil || sameHost(e.PeerAddress, *own)) {
			continue
		}
		keys = append(keys, e.Key)
	}
	d.proxy.SetPeerPublic(keys)
	return nil
}

// sameHost reports whether two host:port addresses name the same host.
func sameHost(a, b string) bool {
	ha, _, errA := net.SplitHostPort(a)
	hb, _, errB := net.SplitHostPort(b)
	return errA == nil && errB == nil && strings.EqualFold(ha, hb)
}

// Instance is this instance's name on the database ("" without one).
func (d *Daemon) Instance() string { return d.instance }
