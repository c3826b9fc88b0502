package testidp_test

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/coreos/go-oidc/v3/oidc"

	"github.com/tp-proxy/tp/internal/testkit/testidp"
)

// A minted token verifies against the provider's published keys as its ID
// tokens do, and carries the typ asked for; one minted with another kid
// (the bad input: a key the provider does not have) does not verify. Each
// fetch of the keys is counted.
func TestMint(t *testing.T) {
	t.Parallel()
	idp := testidp.Start(t, testidp.Person{Subject: "s1", Email: "alice@example.org", EmailVerified: true})
	ctx := oidc.ClientContext(context.Background(), http.DefaultClient)
	p, err := oidc.NewProvider(ctx, idp.Issuer)
	if err != nil {
		t.Fatal(err)
	}
	v := p.Verifier(&oidc.Config{ClientID: testidp.ClientID})
	if n := idp.KeyFetches(); n != 0 {
		t.Fatalf("%d key fetches before any verification; want 0", n)
	}
	tok, err := v.Verify(ctx, idp.Mint(t, "s1", "at+jwt", ""))
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Email string `json:"email"`
	}
	if err := tok.Claims(&c); err != nil || c.Email != "alice@example.org" || tok.Subject != "s1" {
		t.Fatalf("minted claims %+v, sub %q (%v)", c, tok.Subject, err)
	}
	if n := idp.KeyFetches(); n != 1 {
		t.Fatalf("%d key fetches after one verification; want 1", n)
	}
	raw := idp.Mint(t, "s1", "", "no-such-key")
	if _, err := v.Verify(ctx, raw); err == nil || !strings.Contains(err.Error(), "signature") {
		t.Fatalf("a token naming a key the provider lacks: %v; want it refused", err)
	}
}
