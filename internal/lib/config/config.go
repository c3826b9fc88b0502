// Package config is the schema of tpd's configuration and the one place that reads
// it: a YAML file, then TP_* environment variables, then flags, decoded into one
// typed struct that validates itself. Nothing below cmd/ reads configuration.
package config

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// FileName is tpd's configuration file inside the data dir.
const FileName = "tpd.yaml"

// Server is tpd's configuration.
type Server struct {
	// DataDir holds the CA, the user store, the policy and this config file.
	DataDir string `mapstructure:"data-dir"`
	// Listen is the TCP address of the public port.
	Listen string `mapstructure:"listen"`
	// Names go into tpd's server certificate (DNS names or IP addresses).
	Names []string `mapstructure:"names"`
	// ProxyNames are the names on which tpd is an HTTPS proxy for standard
	// clients (CONNECT, docs/HTTP.md). A handshake for one of them that does
	// not offer ALPN "tp/1" must present a device certificate; every other name
	// stays the website, which never asks for one. DNS names only, none of names
	// nor a site; tpd's certificate covers them.
	ProxyNames []string `mapstructure:"proxy-names"`
	// URL is how clients reach tpd; printed in `tpd enroll`. Derived from Listen when empty.
	URL string `mapstructure:"url"`
	// CertLifetime of device certificates.
	CertLifetime time.Duration `mapstructure:"cert-lifetime"`
	// TokenTTL is how long an enrollment token stays valid.
	TokenTTL time.Duration `mapstructure:"token-ttl"`

	HandshakeTimeout time.Duration `mapstructure:"handshake-timeout"`
	HelloTimeout     time.Duration `mapstructure:"hello-timeout"`
	DialTimeout      time.Duration `mapstructure:"dial-timeout"`
	// ShutdownTimeout bounds the drain on SIGTERM: sessions still live after it
	// are aborted with the shutdown code.
	ShutdownTimeout time.Duration `mapstructure:"shutdown-timeout"`
	MaxConns        int           `mapstructure:"max-conns"`
	// MaxWebConns bounds website connections separately (0: half of max-conns),
	// so web traffic can never take the proxy's slots.
	MaxWebConns int `mapstructure:"max-web-conns"`
	// MaxHandshakesPerIP bounds unfinished TLS handshakes from one source address
	// (0: 128). Raise it behind a load balancer that hides client addresses.
	MaxHandshakesPerIP int `mapstructure:"max-handshakes-per-ip"`
	// Bounds per device identity (user@device), so that one device cannot take
	// the server from everyone else: sessions open at once (requests, UDP flows,
	// agents' control sessions), reverse names and public exposures held (over
	// all its agents), and dials of reverse names waiting for an agent's pickup.
	MaxSessionsPerIdentity     int `mapstructure:"max-sessions-per-identity"`
	MaxReverseNamesPerIdentity int `mapstructure:"max-reverse-names-per-identity"`
	MaxPendingPerIdentity      int `mapstructure:"max-pending-per-identity"`
	// CARateLimit and CARateBurst are the token bucket each source address gets
	// for the endpoints anyone reaches without a certificate: the CA's ACME API
	// and enrollment (requests per second, and the burst a full bucket allows).
	CARateLimit float64 `mapstructure:"ca-rate-limit"`
	CARateBurst int     `mapstructure:"ca-rate-burst"`
	// CAMaxNonces bounds the ACME nonces held (in memory) at once.
	CAMaxNonces int `mapstructure:"ca-max-nonces"`
	// CARetention is how long the CA database keeps what logins leave behind
	// (ACME accounts, orders, expired certificates); CAPruneInterval is how often
	// it is pruned.
	CARetention     time.Duration `mapstructure:"ca-retention"`
	CAPruneInterval time.Duration `mapstructure:"ca-prune-interval"`
	// PolicyTimeout bounds one policy evaluation; a slower one denies.
	PolicyTimeout time.Duration `mapstructure:"policy-timeout"`
	// DecisionLog receives one JSON line per policy decision: "" is off, "-" is
	// stdout, anything else a file path (appended, created 0600).
	DecisionLog string `mapstructure:"decision-log"`
	// AuditLog receives the audit trail, one JSON line per session at its end
	// and per administrative act: "" is off, "-" or "stdout" is stdout, anything
	// else a file path (appended, created 0600, reopened on reload).
	AuditLog string `mapstructure:"audit-log"`
	// QUIC serves the proxy over QUIC on UDP at the listen address too.
	QUIC bool `mapstructure:"quic"`
	// QUICKeepAlive, QUICIdleTimeout and QUICMaxStreams bound QUIC connections.
	QUICKeepAlive   time.Duration `mapstructure:"quic-keepalive"`
	QUICIdleTimeout time.Duration `mapstructure:"quic-idle-timeout"`
	QUICMaxStreams  int           `mapstructure:"quic-max-streams"`
	// QUICServerID, when set, makes QUIC connection IDs carry this instance's
	// server ID in QUIC-LB's plaintext layout, for a load balancer that routes
	// UDP by connection ID: hex (1 to 15 octets, e.g. "0a01"), or "ip:ADDR" for
	// the octets of an IPv4 address (the low 8 of an IPv6 one), which suits a
	// pod's IP. QUICConfigID is the QUIC-LB config rotation, 0 to 6.
	QUICServerID string `mapstructure:"quic-server-id"`
	QUICConfigID int    `mapstructure:"quic-config-id"`
	// UDPIdleTimeout ends a UDP flow without datagrams for this long;
	// UDPMaxFlows bounds the UDP flows one identity has open at once.
	UDPIdleTimeout time.Duration `mapstructure:"udp-idle-timeout"`
	UDPMaxFlows    int           `mapstructure:"udp-max-flows"`
	// UDPMaxPublicFlows bounds the public clients (source addresses) one public
	// UDP port of `tp expose --udp --public` serves at once.
	UDPMaxPublicFlows int `mapstructure:"udp-max-public-flows"`
	// CONNECT-UDP (RFC 9298) on the proxy names (connectudp.go); 0 takes the default.
	ConnectUDPTemplate    string `mapstructure:"connect-udp-template"`
	ConnectUDPMaxDatagram int    `mapstructure:"connect-udp-max-datagram"`
	ConnectUDPMaxPPS      int    `mapstructure:"connect-udp-packets-per-second"`
	// WebTransport serves browsers' sessions on the website's HTTP/3
	// (docs/PROTOCOL.md, section 14).
	WebTransport bool `mapstructure:"webtransport"`
	// ReverseZone is the DNS suffix of reverse listeners (`tp expose NAME` serves
	// NAME.<zone>); empty disables them. ReverseGrace holds a name for its owner
	// while the owner's agent reconnects. ReverseRestartGrace holds the names
	// saved at the last stop (a crash included) for their owners after tpd starts,
	// long enough for agents to notice the restart and come back.
	ReverseZone         string        `mapstructure:"reverse-zone"`
	ReverseGrace        time.Duration `mapstructure:"reverse-grace"`
	ReverseRestartGrace time.Duration `mapstructure:"reverse-restart-grace"`
	// ReversePickupTimeout is how long a dial of a reverse name waits for
	// the agent to pick the session up before it is refused.
	ReversePickupTimeout time.Duration `mapstructure:"reverse-pickup-timeout"`
	// With database set: ReverseLease is how long one renewal lets an
	// instance serve its reverse names and public ports without renewing
	// again (it stops serving them on its own past it); ReverseRenew is how
	// often it renews (at most a third of the lease). docs/SCALE.md.
	ReverseLease time.Duration `mapstructure:"reverse-lease"`
	ReverseRenew time.Duration `mapstructure:"reverse-renew"`
	// PeerAddress is host:port where the other instances on the same database
	// reach this one's shared port (ALPN tp-peer/1, docs/SCALE.md "Peering");
	// empty: the address listen is bound to, or the host name and listen's
	// port when listen has no host.
	PeerAddress string `mapstructure:"peer-address"`
	// PublicPorts are the ports agents may open publicly (`tp expose --public
	// PORT`), e.g. "20000-30000,8080"; empty opens none. The policy decides too.
	PublicPorts string `mapstructure:"public-ports"`
	// IPTunnel configures CONNECT-IP tunnels (iptunnel.go, docs/IP.md).
	IPTunnel `mapstructure:",squash"`
	// SSO configures sign-in with an OpenID Connect provider (sso.go).
	SSO `mapstructure:",squash"`

	// Sites are websites served on the public port beside the proxy (sites.go).
	Sites []Site `mapstructure:"sites"`
	// DefaultSite answers TLS names no site has; empty refuses those handshakes.
	DefaultSite string `mapstructure:"default-site"`
	// ACMECA is the ACME directory URL for site certificates; empty is TP's embedded CA.
	ACMECA string `mapstructure:"acme-ca"`
	// ACMEEmail is the contact address given to ACMECA.
	ACMEEmail string `mapstructure:"acme-email"`
	// ACMECARoot is a PEM file of roots to trust for ACMECA (a private ACME CA).
	ACMECARoot string `mapstructure:"acme-ca-root"`
	// HTTPListen is an optional plain-HTTP address: redirects to HTTPS, ACME http-01.
	HTTPListen string `mapstructure:"http-listen"`
	// SiteMaxBody bounds request bodies forwarded to an upstream, in bytes.
	SiteMaxBody int64 `mapstructure:"site-max-body"`
	// SiteUpstreamTimeout bounds how long an upstream may take to send response headers.
	SiteUpstreamTimeout time.Duration `mapstructure:"site-upstream-timeout"`

	// AdminListen is the address of the admin HTTP listener (/metrics, /healthz,
	// /readyz); empty is off. A non-loopback address needs AdminListenRemote (admin.go).
	AdminListen       string `mapstructure:"admin-listen"`
	AdminListenRemote bool   `mapstructure:"admin-listen-remote"`

	// Database, when set, is the DSN of a PostgreSQL database (without its
	// password) that holds the state several tpd instances share: the CA's
	// database, users, devices, groups, enrollment tokens and the deny list.
	// Empty keeps everything in the data dir (bbolt and files), for one tpd.
	// The password comes from DatabasePasswordFile or TP_DATABASE_PASSWORD.
	Database             string `mapstructure:"database"`
	DatabasePasswordFile string `mapstructure:"database-password-file"`
	// DatabasePassword is read from TP_DATABASE_PASSWORD only: LoadServer
	// refuses it in the config file.
	DatabasePassword string `mapstructure:"database-password"`

	LogLevel  string `mapstructure:"log-level"`
	LogFormat string `mapstructure:"log-format"`
}

// Defaults of the CA's bounds: a login takes 12 requests, so a burst of 100
// lets a few devices behind one NAT address log in at once.
const (
	DefaultCARateLimit = 10.0
	DefaultCARateBurst = 100
	DefaultCAMaxNonces = 65536
	// minCARateBurst is more than one login or reverse certificate needs.
	minCARateBurst = 30
)

// DefaultServer is the configuration tpd runs with when nothing is set.
func DefaultServer() Server {
	return Server{
		IPTunnel:             defaultIPTunnel(),
		SSO:                  defaultSSO(),
		DataDir:              "./tpdata",
		Listen:               "127.0.0.1:8443",
		Names:                []string{"localhost", "127.0.0.1", "::1"},
		ProxyNames:           []string{"proxy.localhost"},
		CertLifetime:         4 * time.Hour,
		TokenTTL:             24 * time.Hour,
		HandshakeTimeout:     10 * time.Second,
		HelloTimeout:         10 * time.Second,
		DialTimeout:          10 * time.Second,
		ShutdownTimeout:      30 * time.Second,
		MaxConns:             10000,
		CARateLimit:          DefaultCARateLimit,
		CARateBurst:          DefaultCARateBurst,
		CAMaxNonces:          DefaultCAMaxNonces,
		CARetention:          48 * time.Hour,
		CAPruneInterval:      time.Hour,
		PolicyTimeout:        100 * time.Millisecond,
		QUIC:                 true,
		QUICKeepAlive:        15 * time.Second,
		QUICIdleTimeout:      60 * time.Second,
		QUICMaxStreams:       1000,
		UDPIdleTimeout:       60 * time.Second,
		UDPMaxFlows:          256,
		UDPMaxPublicFlows:    512,
		ReverseZone:          "rev.tp.internal",
		ReverseGrace:         30 * time.Second,
		ReverseRestartGrace:  2 * time.Minute,
		ReversePickupTimeout: 10 * time.Second,
		ReverseLease:         15 * time.Second,
		ReverseRenew:         5 * time.Second,
		SiteMaxBody:          DefaultSiteMaxBody,
		SiteUpstreamTimeout:  time.Minute,
		LogLevel:             "info",
		LogFormat:            "text",

		// Far above what one person's devices do, far below a server's capacity.
		MaxSessionsPerIdentity:     512,
		MaxReverseNamesPerIdentity: 64,
		MaxPendingPerIdentity:      128,
	}
}

// Validate reports every problem at once, each as a sentence naming the setting.
func (s Server) Validate() error {
	var errs []error
	if s.DataDir == "" {
		errs = append(errs, errors.New("data-dir must be set"))
	}
	if _, port, err := net.SplitHostPort(s.Listen); err != nil {
		errs = append(errs, fmt.Errorf("listen %q must be host:port, e.g. 127.0.0.1:8443 or :443", s.Listen))
	} else if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
		errs = append(errs, fmt.Errorf("listen %q has an invalid port", s.Listen))
	}
	if len(s.Names) == 0 {
		errs = append(errs, errors.New("names must list at least one DNS name or IP address for tpd's certificate"))
	}
	for _, n := range s.Names {
		if n == "" || strings.ContainsAny(n, " /:@") && net.ParseIP(n) == nil {
			errs = append(errs, fmt.Errorf("names: %q is neither a DNS name nor an IP address", n))
		}
	}
	errs = append(errs, s.validateProxyNames()...)
	if s.URL != "" && !strings.HasPrefix(s.URL, "https://") {
		errs = append(errs, fmt.Errorf("url %q must start with https://", s.URL))
	}
	if s.CertLifetime < 5*time.Minute || s.CertLifetime > 24*time.Hour {
		errs = append(errs, fmt.Errorf("cert-lifetime %s must be between 5m and 24h", s.CertLifetime))
	}
	if s.TokenTTL < time.Minute || s.TokenTTL > 30*24*time.Hour {
		errs = append(errs, fmt.Errorf("token-ttl %s must be between 1m and 720h", s.TokenTTL))
	}
	for name, d := range map[string]time.Duration{"handshake-timeout": s.HandshakeTimeout, "hello-timeout": s.HelloTimeout, "dial-timeout": s.DialTimeout} {
		if d <= 0 || d > 5*time.Minute {
			errs = append(errs, fmt.Errorf("%s %s must be between 0 and 5m", name, d))
		}
	}
	if s.ShutdownTimeout < 0 || s.ShutdownTimeout > time.Hour {
		errs = append(errs, fmt.Errorf("shutdown-timeout %s must be between 0 (abort at once) and 1h", s.ShutdownTimeout))
	}
	if s.PolicyTimeout < time.Millisecond || s.PolicyTimeout > 10*time.Second {
		errs = append(errs, fmt.Errorf("policy-timeout %s must be between 1ms and 10s", s.PolicyTimeout))
	}
	if s.QUICKeepAlive < time.Second || s.QUICKeepAlive > 5*time.Minute {
		errs = append(errs, fmt.Errorf("quic-keepalive %s must be between 1s and 5m (NATs forget idle UDP flows after about 30s)", s.QUICKeepAlive))
	}
	if s.QUICIdleTimeout < 5*time.Second || s.QUICIdleTimeout > time.Hour {
		errs = append(errs, fmt.Errorf("quic-idle-timeout %s must be between 5s and 1h", s.QUICIdleTimeout))
	} else if s.QUICKeepAlive >= s.QUICIdleTimeout {
		errs = append(errs, fmt.Errorf("quic-keepalive %s must be shorter than quic-idle-timeout %s", s.QUICKeepAlive, s.QUICIdleTimeout))
	}
	if s.QUICMaxStreams < 1 || s.QUICMaxStreams > 100_000 {
		errs = append(errs, fmt.Errorf("quic-max-streams %d must be between 1 and 100000", s.QUICMaxStreams))
	}
	if _, err := s.QUICServerIDBytes(); err != nil {
		errs = append(errs, err)
	}
	if s.QUICConfigID < 0 || s.QUICConfigID > 6 {
		errs = append(errs, fmt.Errorf("quic-config-id %d must be between 0 and 6 (7 marks connection IDs a load balancer cannot route)", s.QUICConfigID))
	}
	if s.UDPIdleTimeout < time.Second || s.UDPIdleTimeout > time.Hour {
		errs = append(errs, fmt.Errorf("udp-idle-timeout %s must be between 1s and 1h", s.UDPIdleTimeout))
	}
	if s.UDPMaxFlows < 1 || s.UDPMaxFlows > 100_000 {
		errs = append(errs, fmt.Errorf("udp-max-flows %d must be between 1 and 100000", s.UDPMaxFlows))
	}
	if s.UDPMaxPublicFlows < 1 || s.UDPMaxPublicFlows > 100_000 {
		errs = append(errs, fmt.Errorf("udp-max-public-flows %d must be between 1 and 100000", s.UDPMaxPublicFlows))
	}
	errs = append(errs, s.validateConnectUDP()...)
	if s.ReverseZone != "" && !validZone(s.ReverseZone) {
		errs = append(errs, fmt.Errorf("reverse-zone %q must be a DNS name of at least two labels (e.g. rev.tp.example.org), or empty to turn reverse listeners off", s.ReverseZone))
	}
	if z := strings.ToLower(strings.TrimSuffix(s.ReverseZone, ".")); z != "" {
		// A name under the zone can be claimed by any device the policy lets
		// listen, and gets a certificate from TP's root: tpd's own names and the
		// sites must never be among them.
		names := slices.Clone(s.Names)
		for _, site := range s.Sites {
			names = append(names, site.Name)
		}
		for _, n := range names {
			n = strings.ToLower(strings.TrimSuffix(n, "."))
			if n == z || strings.HasSuffix(n, "."+z) {
				errs = append(errs, fmt.Errorf("reverse-zone %q contains %q, one of tpd's names or sites: devices could claim it with tp expose; choose a zone below it instead, e.g. rev.%s", s.ReverseZone, n, n))
			}
		}
	}
	if s.ReverseGrace < 0 || s.ReverseGrace > time.Hour {
		errs = append(errs, fmt.Errorf("reverse-grace %s must be between 0s and 1h", s.ReverseGrace))
	}
	if s.ReverseRestartGrace < time.Minute || s.ReverseRestartGrace > time.Hour {
		errs = append(errs, fmt.Errorf("reverse-restart-grace %s must be between 1m and 1h: agents need up to about a minute to notice a restarted tpd and come back", s.ReverseRestartGrace))
	}
	if s.ReversePickupTimeout < time.Second || s.ReversePickupTimeout > 5*time.Minute {
		errs = append(errs, fmt.Errorf("reverse-pickup-timeout %s must be between 1s and 5m", s.ReversePickupTimeout))
	}
	if s.PeerAddress != "" {
		if h, p, err := net.SplitHostPort(s.PeerAddress); err != nil || h == "" || p == "" || p == "0" {
			errs = append(errs, fmt.Errorf("peer-address %q must be host:port where the other instances reach this one (e.g. 10.0.0.5:443)", s.PeerAddress))
		}
	}
	if s.ReverseLease < time.Second || s.ReverseLease > 5*time.Minute {
		errs = append(errs, fmt.Errorf("reverse-lease %s must be between 1s and 5m", s.ReverseLease))
	}
	if s.ReverseRenew < 100*time.Millisecond || s.ReverseRenew > s.ReverseLease/3 {
		errs = append(errs, fmt.Errorf("reverse-renew %s must be between 100ms and a third of reverse-lease (%s), so that two renewals can fail before the lease runs out", s.ReverseRenew, s.ReverseLease))
	}
	if _, err := ParsePortRanges(s.PublicPorts); err != nil {
		errs = append(errs, fmt.Errorf("public-ports: %w", err))
	}
	if s.MaxHandshakesPerIP < 0 || s.MaxHandshakesPerIP > 1_000_000 {
		errs = append(errs, fmt.Errorf("max-handshakes-per-ip %d must be between 0 (128) and 1000000", s.MaxHandshakesPerIP))
	}
	if s.MaxWebConns < 0 || s.MaxWebConns > 1_000_000 {
		errs = append(errs, fmt.Errorf("max-web-conns %d must be between 0 (half of max-conns) and 1000000", s.MaxWebConns))
	}
	if s.MaxConns < 1 || s.MaxConns > 1_000_000 {
		errs = append(errs, fmt.Errorf("max-conns %d must be between 1 and 1000000", s.MaxConns))
	}
	// No "unlimited": an unbounded device is what these settings exist to prevent.
	for _, b := range []struct {
		key      string
		v, upper int
	}{
		{"max-sessions-per-identity", s.MaxSessionsPerIdentity, 1_000_000},
		{"max-reverse-names-per-identity", s.MaxReverseNamesPerIdentity, 100_000},
		{"max-pending-per-identity", s.MaxPendingPerIdentity, 100_000},
	} {
		if b.v < 1 || b.v > b.upper {
			errs = append(errs, fmt.Errorf("%s %d must be between 1 and %d", b.key, b.v, b.upper))
		}
	}
	if s.CARateLimit <= 0 || s.CARateLimit > 100_000 || math.IsNaN(s.CARateLimit) {
		errs = append(errs, fmt.Errorf("ca-rate-limit %g must be above 0 and at most 100000 requests per second per source address", s.CARateLimit))
	}
	if s.CARateBurst < minCARateBurst || s.CARateBurst > 1_000_000 {
		errs = append(errs, fmt.Errorf("ca-rate-burst %d must be between %d (one login takes 12 requests) and 1000000", s.CARateBurst, minCARateBurst))
	}
	if s.CAMaxNonces < 100 || s.CAMaxNonces > 1_000_000 {
		errs = append(errs, fmt.Errorf("ca-max-nonces %d must be between 100 and 1000000 (about 80 bytes of memory each)", s.CAMaxNonces))
	}
	if s.CARetention < 24*time.Hour || s.CARetention > 365*24*time.Hour {
		errs = append(errs, fmt.Errorf("ca-retention %s must be between 24h (the longest certificate lifetime) and 8760h", s.CARetention))
	}
	if s.CAPruneInterval < time.Minute || s.CAPruneInterval > 24*time.Hour {
		errs = append(errs, fmt.Errorf("ca-prune-interval %s must be between 1m and 24h", s.CAPruneInterval))
	}
	errs = append(errs, s.validateSites()...)
	errs = append(errs, s.validateAdmin()...)
	errs = append(errs, s.validateSSO()...)
	errs = append(errs, s.validateDatabase()...)
	errs = append(errs, s.IPTunnel.validate())
	if _, err := ParseLevel(s.LogLevel); err != nil {
		errs = append(errs, err)
	}
	if s.LogFormat != "text" && s.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("log-format %q must be text or json", s.LogFormat))
	}
	return errors.Join(errs...)
}

// PublicURL is URL, or https://LISTEN with the host replaced by the first name
// when it is unspecified or not one of names: tpd's certificate holds only the
// names, so a URL with any other host would fail for every device (tpd answers
// a request for a name it does not serve with 421 Misdirected Request).
func (s Server) PublicURL() string {
	if s.URL != "" {
		return strings.TrimRight(s.URL, "/")
	}
	host, port, err := net.SplitHostPort(s.Listen)
	if err != nil {
		return "https://" + s.Listen
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() || !s.isName(host) {
		if len(s.Names) > 0 {
			host = s.Names[0]
		}
	}
	if port == "443" {
		return "https://" + hostForURL(host)
	}
	return "https://" + net.JoinHostPort(host, port)
}

// isName reports whether host is among names (DNS names without case, IP
// addresses by value).
func (s Server) isName(host string) bool {
	ip := net.ParseIP(host)
	for _, n := range s.Names {
		if strings.EqualFold(strings.TrimSuffix(n, "."), strings.TrimSuffix(host, ".")) {
			return true
		}
		if ip != nil && ip.Equal(net.ParseIP(n)) {
			return true
		}
	}
	return false
}

func hostForURL(h string) string {
	if strings.Contains(h, ":") {
		return "[" + h + "]"
	}
	return h
}

// Paths inside the data dir.
func (s Server) CADir() string        { return filepath.Join(s.DataDir, "ca") }
func (s Server) PolicyDir() string    { return filepath.Join(s.DataDir, "policy") }
func (s Server) UsersFile() string    { return filepath.Join(s.DataDir, "users.json") }
func (s Server) AdminSocket() string  { return filepath.Join(s.DataDir, "admin.sock") }
func (s Server) ConfigFile() string   { return filepath.Join(s.DataDir, FileName) }
func (s Server) DenyListFile() string { return filepath.Join(s.DataDir, "denylist.json") }

// ServerFlags registers the flags of `tpd serve` and `tpd init`.
func ServerFlags(fs *pflag.FlagSet) {
	d := DefaultServer()
	fs.String("data-dir", d.DataDir, "directory holding the CA, users, policy and tpd.yaml (env TP_DATA_DIR)")
	fs.String("listen", d.Listen, "TCP address of the public port, host:port (env TP_LISTEN)")
	fs.StringSlice("name", nil, "DNS name or IP address for tpd's certificate; repeat for several (default localhost, 127.0.0.1, ::1)")
	fs.String("url", "", "URL clients use to reach tpd, printed by 'tpd enroll' (default https://LISTEN, with the first --name as host unless LISTEN's host is one)")
	fs.String("log-level", d.LogLevel, "debug, info, warn or error")
	fs.String("log-format", d.LogFormat, "text or json")
	fs.String("database", d.Database, "PostgreSQL DSN without a password, postgres://USER@HOST:PORT/DB, for state shared by several tpd (env TP_DATABASE; password from database-password-file or TP_DATABASE_PASSWORD)")
}

// LoadServer reads DATA_DIR/tpd.yaml (or the file named by TP_CONFIG), then TP_*
// environment variables, then the flags that were set, into a validated Server.
func LoadServer(fs *pflag.FlagSet) (Server, error) {
	v := viper.New()
	d := DefaultServer()
	v.SetDefault("data-dir", d.DataDir)
	v.SetDefault("listen", d.Listen)
	v.SetDefault("names", d.Names)
	v.SetDefault("proxy-names", d.ProxyNames)
	v.SetDefault("url", d.URL)
	v.SetDefault("cert-lifetime", d.CertLifetime)
	v.SetDefault("token-ttl", d.TokenTTL)
	v.SetDefault("handshake-timeout", d.HandshakeTimeout)
	v.SetDefault("hello-timeout", d.HelloTimeout)
	v.SetDefault("dial-timeout", d.DialTimeout)
	v.SetDefault("shutdown-timeout", d.ShutdownTimeout)
	v.SetDefault("max-conns", d.MaxConns)
	v.SetDefault("max-web-conns", d.MaxWebConns)
	v.SetDefault("max-handshakes-per-ip", d.MaxHandshakesPerIP)
	v.SetDefault("max-sessions-per-identity", d.MaxSessionsPerIdentity)
	v.SetDefault("max-reverse-names-per-identity", d.MaxReverseNamesPerIdentity)
	v.SetDefault("max-pending-per-identity", d.MaxPendingPerIdentity)
	v.SetDefault("ca-rate-limit", d.CARateLimit)
	v.SetDefault("ca-rate-burst", d.CARateBurst)
	v.SetDefault("ca-max-nonces", d.CAMaxNonces)
	v.SetDefault("ca-retention", d.CARetention)
	v.SetDefault("ca-prune-interval", d.CAPruneInterval)
	v.SetDefault("policy-timeout", d.PolicyTimeout)
	v.SetDefault("decision-log", d.DecisionLog)
	v.SetDefault("audit-log", d.AuditLog)
	v.SetDefault("quic", d.QUIC)
	v.SetDefault("quic-keepalive", d.QUICKeepAlive)
	v.SetDefault("quic-idle-timeout", d.QUICIdleTimeout)
	v.SetDefault("quic-max-streams", d.QUICMaxStreams)
	v.SetDefault("quic-server-id", d.QUICServerID)
	v.SetDefault("quic-config-id", d.QUICConfigID)
	v.SetDefault("udp-idle-timeout", d.UDPIdleTimeout)
	v.SetDefault("udp-max-flows", d.UDPMaxFlows)
	v.SetDefault("udp-max-public-flows", d.UDPMaxPublicFlows)
	v.SetDefault("connect-udp-template", d.ConnectUDPTemplate)
	v.SetDefault("connect-udp-max-datagram", d.ConnectUDPMaxDatagram)
	v.SetDefault("connect-udp-packets-per-second", d.ConnectUDPMaxPPS)
	v.SetDefault("webtransport", d.WebTransport)
	v.SetDefault("reverse-zone", d.ReverseZone)
	v.SetDefault("reverse-grace", d.ReverseGrace)
	v.SetDefault("reverse-restart-grace", d.ReverseRestartGrace)
	v.SetDefault("reverse-pickup-timeout", d.ReversePickupTimeout)
	v.SetDefault("reverse-lease", d.ReverseLease)
	v.SetDefault("reverse-renew", d.ReverseRenew)
	v.SetDefault("peer-address", d.PeerAddress)
	v.SetDefault("public-ports", d.PublicPorts)
	v.SetDefault("sites", d.Sites)
	v.SetDefault("default-site", d.DefaultSite)
	v.SetDefault("acme-ca", d.ACMECA)
	v.SetDefault("acme-email", d.ACMEEmail)
	v.SetDefault("acme-ca-root", d.ACMECARoot)
	v.SetDefault("http-listen", d.HTTPListen)
	v.SetDefault("site-max-body", d.SiteMaxBody)
	v.SetDefault("site-upstream-timeout", d.SiteUpstreamTimeout)
	setSSODefaults(v, d.SSO)
	v.SetDefault("admin-listen", d.AdminListen)
	v.SetDefault("admin-listen-remote", d.AdminListenRemote)
	v.SetDefault("database", d.Database)
	v.SetDefault("database-password-file", d.DatabasePasswordFile)
	v.SetDefault("database-password", d.DatabasePassword)
	v.SetDefault("log-level", d.LogLevel)
	v.SetDefault("log-format", d.LogFormat)
	setIPTunnelDefaults(v, d.IPTunnel)
	v.SetEnvPrefix("TP")
	v.SetEnvKeyReplacer(strings.NewReplacer("-", "_", ".", "_"))
	v.AutomaticEnv()
	if fs != nil {
		for _, key := range []string{"data-dir", "listen", "url", "log-level", "log-format", "database", "database-password-file"} {
			if f := fs.Lookup(key); f != nil {
				if err := v.BindPFlag(key, f); err != nil {
					return Server{}, err
				}
			}
		}
		if f := fs.Lookup("name"); f != nil {
			if err := v.BindPFlag("names", f); err != nil {
				return Server{}, err
			}
		}
	}
	file := os.Getenv("TP_CONFIG")
	if file == "" {
		file = filepath.Join(v.GetString("data-dir"), FileName)
	}
	v.SetConfigFile(file)
	v.SetConfigType("yaml")
	if err := v.ReadInConfig(); err != nil && !errors.Is(err, os.ErrNotExist) {
		var nf viper.ConfigFileNotFoundError
		if !errors.As(err, &nf) {
			return Server{}, fileError(file, err)
		}
	}
	if v.InConfig("database-password") {
		return Server{}, fmt.Errorf("config file %s: database-password must not be written in the config file, which others may read; put the password in a file named by database-password-file, or in the %s environment variable", file, DatabasePasswordEnv)
	}
	var s Server
	if err := v.UnmarshalExact(&s, decodeHook()); err != nil {
		return Server{}, fmt.Errorf("invalid configuration (%s, TP_* environment variables, flags):\n%w", file, explainDecodeErr(err))
	}
	if err := s.Validate(); err != nil {
		return Server{}, fmt.Errorf("invalid configuration:\n%w", err)
	}
	return s, nil
}

// ServerYAML renders s as the commented tpd.yaml that `tpd init` writes.
func ServerYAML(s Server) []byte {
	var b strings.Builder
	b.WriteString("# tpd configuration. Environment variables TP_<KEY> (e.g. TP_LISTEN) and flags override it.\n")
	fmt.Fprintf(&b, "# TCP address of the public port.\nlisten: %q\n", s.Listen)
	b.WriteString("# Names in tpd's server certificate; clients must reach tpd by one of them.\nnames:\n")
	for _, n := range s.Names {
		fmt.Fprintf(&b, "  - %q\n", n)
	}
	b.WriteString("# Names on which tpd is an HTTPS proxy for standard clients (curl --proxy https://NAME:PORT with the\n# device certificate; docs/HTTP.md). Only these names ask for a client certificate outside TP's own\n# protocol, so browsers on names and sites are never prompted. DNS names, none of names nor a site.\nproxy-names:")
	if len(s.ProxyNames) == 0 {
		b.WriteString(" []")
	}
	b.WriteString("\n")
	for _, n := range s.ProxyNames {
		fmt.Fprintf(&b, "  - %q\n", n)
	}
	fmt.Fprintf(&b, "# URL printed by `tpd enroll` for dlogin; empty derives it from listen.\nurl: %q\n", s.URL)
	fmt.Fprintf(&b, "# Lifetime of device certificates (5m to 24h).\ncert-lifetime: %s\n", s.CertLifetime)
	fmt.Fprintf(&b, "# How long `tpd enroll` tokens stay valid.\ntoken-ttl: %s\n", s.TokenTTL)
	fmt.Fprintf(&b, "handshake-timeout: %s\nhello-timeout: %s\ndial-timeout: %s\n", s.HandshakeTimeout, s.HelloTimeout, s.DialTimeout)
	fmt.Fprintf(&b, "# On SIGTERM, how long live sessions may finish before the rest are aborted.\nshutdown-timeout: %s\n", s.ShutdownTimeout)
	fmt.Fprintf(&b, "# Connections handled at once; more are closed at accept.\nmax-conns: %d\n", s.MaxConns)
	fmt.Fprintf(&b, "# Unfinished TLS handshakes from one address (0: 128); raise it behind a load balancer that hides client addresses.\nmax-handshakes-per-ip: %d\n", s.MaxHandshakesPerIP)
	fmt.Fprintf(&b, "# Website connections, counted apart so the web cannot take the proxy's slots (0: half of max-conns).\nmax-web-conns: %d\n", s.MaxWebConns)
	fmt.Fprintf(&b, "# Bounds per device (user@device), so one device cannot take the server from everyone else:\n# sessions open at once, reverse names held over all its agents, dials of reverse names waiting for an agent.\nmax-sessions-per-identity: %d\nmax-reverse-names-per-identity: %d\nmax-pending-per-identity: %d\n",
		s.MaxSessionsPerIdentity, s.MaxReverseNamesPerIdentity, s.MaxPendingPerIdentity)
	fmt.Fprintf(&b, "# Per source address, for the CA's ACME and enrollment endpoints (no certificate needed):\n# requests per second and the burst a full bucket allows; over it, 429 with Retry-After.\nca-rate-limit: %g\nca-rate-burst: %d\n", s.CARateLimit, s.CARateBurst)
	fmt.Fprintf(&b, "# ACME nonces held in memory at once (about 80 bytes each); the oldest go first.\nca-max-nonces: %d\n", s.CAMaxNonces)
	fmt.Fprintf(&b, "# How long the CA database keeps what logins leave behind (ACME accounts, orders,\n# expired certificates; at least 24h), and how often it is pruned.\nca-retention: %s\nca-prune-interval: %s\n", s.CARetention, s.CAPruneInterval)
	fmt.Fprintf(&b, "# Bound on one policy evaluation; a slower evaluation denies the request.\npolicy-timeout: %s\n", s.PolicyTimeout)
	fmt.Fprintf(&b, "# One JSON line per policy decision: \"\" is off, \"-\" is stdout, else a file (appended, 0600).\ndecision-log: %q\n", s.DecisionLog)
	fmt.Fprintf(&b, "# Audit trail, one JSON line per session and per administrative act: \"\" is off,\n# \"-\" or \"stdout\" is stdout, else a file (appended, 0600).\naudit-log: %q\n", s.AuditLog)
	fmt.Fprintf(&b, "# Serve the proxy over QUIC on UDP at the listen address too; keepalive period,\n# idle timeout and concurrent requests per QUIC connection.\nquic: %t\nquic-keepalive: %s\nquic-idle-timeout: %s\nquic-max-streams: %d\n",
		s.QUIC, s.QUICKeepAlive, s.QUICIdleTimeout, s.QUICMaxStreams)
	fmt.Fprintf(&b, "# Behind a load balancer that routes UDP by QUIC connection ID (QUIC-LB, plaintext):\n# this instance's server ID, hex (1 to 15 octets) or \"ip:ADDR\" (an IPv4 address's 4 octets,\n# an IPv6 address's low 8), unique per instance, and the config rotation (0 to 6).\n# \"\" keeps random connection IDs.\nquic-server-id: %q\nquic-config-id: %d\n", s.QUICServerID, s.QUICConfigID)
	fmt.Fprintf(&b, "# Reverse listeners (tp expose NAME) are reached as NAME.<reverse-zone>; \"\" turns them off.\n# A name stays reserved for its owner for reverse-grace after its agent went away,\n# and for reverse-restart-grace after tpd starts (a crash included).\nreverse-zone: %q\nreverse-grace: %s\nreverse-restart-grace: %s\n", s.ReverseZone, s.ReverseGrace, s.ReverseRestartGrace)
	fmt.Fprintf(&b, "# Ports agents may open publicly (tp expose --public PORT), e.g. \"20000-30000,8080/tcp,27015/udp\"\n# (no suffix: TCP and UDP); \"\" opens none. The policy must allow them too (action expose_public).\npublic-ports: %q\n", s.PublicPorts)
	connectUDPYAML(&b, s)
	siteYAML(&b, s)
	adminYAML(&b, s)
	ssoYAML(&b, s)
	fmt.Fprintf(&b, "# PostgreSQL for several tpd instances behind one name: a DSN without its password,\n# e.g. postgres://tp@db.example.org:5432/tp?sslmode=verify-full; the password comes from\n# database-password-file (its first line) or the TP_DATABASE_PASSWORD environment variable.\n# \"\" keeps everything in the data dir (one tpd). Every instance needs the same ca/ directory.\ndatabase: %q\ndatabase-password-file: %q\n", s.Database, s.DatabasePasswordFile)
	fmt.Fprintf(&b, "# With a database, reverse names and public ports are held with leases on its clock\n# (docs/SCALE.md): renewed every reverse-renew; an instance that cannot renew within\n# reverse-lease stops serving them, before another instance may take them.\nreverse-lease: %s\nreverse-renew: %s\n", s.ReverseLease, s.ReverseRenew)
	fmt.Fprintf(&b, "# With a database: host:port where the other instances reach this one's shared port to\n# carry dials of its reverse names (docs/SCALE.md, \"Peering\"); \"\" = the bound listen address.\npeer-address: %q\n", s.PeerAddress)
	fmt.Fprintf(&b, "log-level: %s\nlog-format: %s\n", s.LogLevel, s.LogFormat)
	return []byte(b.String())
}

// ParseLevel maps a log level name to slog's.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("log-level %q must be debug, info, warn or error", s)
	}
	return l, nil
}

// Logger builds the process logger writing to w.
func (s Server) Logger(w io.Writer) *slog.Logger {
	lvl, _ := ParseLevel(s.LogLevel)
	opts := &slog.HandlerOptions{Level: lvl}
	if s.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// LoggerWithLevel is Logger with its level held in lv (set to log-level here),
// so that a reload can change it.
func (s Server) LoggerWithLevel(w io.Writer, lv *slog.LevelVar) *slog.Logger {
	lvl, _ := ParseLevel(s.LogLevel)
	lv.Set(lvl)
	opts := &slog.HandlerOptions{Level: lv}
	if s.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// QUICServerIDBytes is QUICServerID decoded; nil when it is not set.
func (s Server) QUICServerIDBytes() ([]byte, error) {
	v := strings.TrimSpace(s.QUICServerID)
	if v == "" {
		return nil, nil
	}
	if a, ok := strings.CutPrefix(v, "ip:"); ok {
		ip, err := netip.ParseAddr(a)
		if err != nil {
			return nil, fmt.Errorf("quic-server-id %q: %q is not an IP address", s.QUICServerID, a)
		}
		b := ip.Unmap().AsSlice()
		if len(b) == 16 {
			b = b[8:]
		}
		return b, nil
	}
	b, err := hex.DecodeString(v)
	if err != nil || len(b) < 1 || len(b) > 15 {
		return nil, fmt.Errorf("quic-server-id %q must be 1 to 15 octets in hex (e.g. \"0a01\") or ip:ADDR", s.QUICServerID)
	}
	return b, nil
}

// fileError says what is wrong with the config file in a sentence that names
// it, with YAML's line numbers and without viper's "While parsing config:".
func fileError(file string, err error) error {
	var pe viper.ConfigParseError
	if !errors.As(err, &pe) || pe.Unwrap() == nil {
		return fmt.Errorf("config file %s: %w", file, err)
	}
	msg := strings.TrimPrefix(pe.Unwrap().Error(), "yaml: ")
	msg = strings.TrimPrefix(msg, "unmarshal errors:")
	var lines []string
	for _, l := range strings.Split(msg, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	return fmt.Errorf("config file %s is not valid YAML: %s", file, strings.Join(lines, "; "))
}
