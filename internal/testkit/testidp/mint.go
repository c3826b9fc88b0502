package testidp

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
)

// Mint returns a token with the claims of an ID token the provider gives
// TP's client for the person with subject (iss, sub, aud, azp, iat, exp,
// email, email_verified, groups), signed with the provider's own key, as
// its ID tokens are; only the JOSE header differs as asked: typ when not ""
// (the provider's ID tokens carry "JWT"; an access token in JWT form
// carries "at+jwt", RFC 9068), and kid when not "" instead of the key's
// ID, as a forged token naming a key the provider does not have would.
// Tests use it for tokens a real provider issues in other flows, or an
// attacker makes, that TP must tell from an ID token.
func (p *IdP) Mint(t testing.TB, subject, typ, kid string) string {
	t.Helper()
	key, err := p.st.SigningKey(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if kid == "" {
		kid = key.ID()
	}
	opts := (&jose.SignerOptions{}).WithHeader(jose.HeaderKey("kid"), kid)
	if typ != "" {
		opts = opts.WithType(jose.ContentType(typ))
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: key.SignatureAlgorithm(), Key: key.Key()}, opts)
	if err != nil {
		t.Fatal(err)
	}
	person := p.people[subject]
	now := time.Now()
	claims := map[string]any{"iss": p.Issuer, "sub": subject, "aud": []string{ClientID}, "azp": ClientID,
		"iat": now.Unix(), "exp": now.Add(10 * time.Minute).Unix(),
		"email": person.Email, "email_verified": person.EmailVerified}
	if person.Groups != nil {
		claims["groups"] = person.Groups
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	jws, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// KeyFetches says how many times the provider has served its keys (the
// jwks_uri) so far.
func (p *IdP) KeyFetches() int64 { return p.keyFetches.Load() }

// countKeys counts the requests for the keys (path) before h serves them.
func (p *IdP) countKeys(path string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == path {
			p.keyFetches.Add(1)
		}
		h.ServeHTTP(w, r)
	})
}
