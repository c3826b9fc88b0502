package tpd

import (
	"context"
	"strings"

	"github.com/caddyserver/certmagic"

	"github.com/tp-proxy/tp/internal/server/pgstore"
)

// embeddedIssuer names the embedded CA in the shared certificate storage.
// certmagic files certificates and ACME accounts under an issuer key made
// from the ACME directory's URL, and each instance reaches the embedded CA at
// its own address; but every instance on one database is one CA (same root,
// same CA database), so their certificates are filed under this one key.
const embeddedIssuer = "tp-embedded-ca"

// siteStorage is where site and exposed-name certificates are kept when
// several instances share them (the database), or nil for the data dir's
// sites directory. dir is the ACME directory the certificates come from.
func (d *Daemon) siteStorage(dir string) certmagic.Storage {
	if d.certDB == nil {
		return nil
	}
	if d.cfg.ACMECA != "" { // one URL for every instance: its key is shared already
		return d.certDB
	}
	from := certmagic.StorageKeys.Safe((&certmagic.ACMEIssuer{CA: dir}).IssuerKey()) // as certmagic files it
	return &issuerAlias{CertStorage: d.certDB, from: from, to: embeddedIssuer}
}

// issuerAlias files the keys of one issuer (the second path segment of
// certmagic's "certificates/ISSUER/…" and "acme/ISSUER/…") under another
// name; locks, which name no issuer, pass through.
type issuerAlias struct {
	*pgstore.CertStorage
	from, to string
}

var (
	_ certmagic.Storage          = (*issuerAlias)(nil)
	_ certmagic.TryLocker        = (*issuerAlias)(nil)
	_ certmagic.LockLeaseRenewer = (*issuerAlias)(nil)
)

func swapSegment(key, from, to string) string {
	parts := strings.SplitN(key, "/", 3)
	if len(parts) >= 2 && parts[1] == from {
		parts[1] = to
		return strings.Join(parts, "/")
	}
	return key
}

func (s *issuerAlias) in(key string) string  { return swapSegment(key, s.from, s.to) }
func (s *issuerAlias) out(key string) string { return swapSegment(key, s.to, s.from) }

func (s *issuerAlias) Store(ctx context.Context, key string, value []byte) error {
	return s.CertStorage.Store(ctx, s.in(key), value)
}

func (s *issuerAlias) Load(ctx context.Context, key string) ([]byte, error) {
	return s.CertStorage.Load(ctx, s.in(key))
}

func (s *issuerAlias) Delete(ctx context.Context, key string) error {
	return s.CertStorage.Delete(ctx, s.in(key))
}

func (s *issuerAlias) Exists(ctx context.Context, key string) bool {
	return s.CertStorage.Exists(ctx, s.in(key))
}

func (s *issuerAlias) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	ki, err := s.CertStorage.Stat(ctx, s.in(key))
	ki.Key = s.out(ki.Key)
	return ki, err
}

func (s *issuerAlias) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	keys, err := s.CertStorage.List(ctx, s.in(dir), recursive)
	for i, k := range keys {
		keys[i] = s.out(k)
	}
	return keys, err
}
