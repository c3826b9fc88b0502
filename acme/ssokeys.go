package acme

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
)

// ssoKeysRefetch: after a fetch of the provider's keys, tpd fetches them
// again at most this much later, however many tokens name a key it does not
// have.
const ssoKeysRefetch = 10 * time.Second

// ssoMaxKeySet bounds the provider's key set document.
const ssoMaxKeySet = 1 << 20

// ssoKeys is the provider's signing keys (its jwks_uri), for the ID token
// verifier (an oidc.KeySet). go-oidc's RemoteKeySet fetches the keys again
// for every token that none of its keys verifies; concurrent ones share a
// fetch, but one after another each makes tpd fetch, so anyone could make
// tpd hammer the provider with tokens naming made-up key IDs. ssoKeys
// fetches again at most once per ssoKeysRefetch, requests that come while
// a fetch is under way sharing it; a token no key verifies then is refused.
type ssoKeys struct {
	url  string
	hc   *http.Client
	algs []jose.SignatureAlgorithm
	now  func() time.Time

	mu     sync.Mutex
	keys   []jose.JSONWebKey
	last   time.Time // when the last fetch began; zero before the first
	err    error     // why the last fetch failed; nil when it did not
	flight *keyFetch // the fetch under way; nil when none is
}

// keyFetch is one fetch of the keys, which requests wait on together.
type keyFetch struct {
	done chan struct{} // closed when keys and err are set
	keys []jose.JSONWebKey
	err  error
}

// VerifySignature implements oidc.KeySet: the verifier has checked the
// token's algorithm and claims; this checks its signature.
func (k *ssoKeys) VerifySignature(ctx context.Context, raw string) ([]byte, error) {
	jws, err := jose.ParseSigned(raw, k.algs)
	if err != nil {
		return nil, fmt.Errorf("malformed ID token: %v", err)
	}
	if len(jws.Signatures) != 1 {
		return nil, errors.New("an ID token has one signature")
	}
	kid := jws.Signatures[0].Header.KeyID
	k.mu.Lock()
	keys := k.keys
	k.mu.Unlock()
	if payload, ok := verifyJWS(jws, keys, kid); ok {
		return payload, nil
	}
	// A key the provider added since (it rotates them): fetch them again,
	// within bounds.
	keys, err = k.refetch(ctx)
	if err != nil {
		return nil, fmt.Errorf("fetching keys: %w", err)
	}
	if payload, ok := verifyJWS(jws, keys, kid); ok {
		return payload, nil
	}
	for _, key := range keys {
		if key.KeyID == kid {
			return nil, errors.New("its signature does not verify with the provider's key")
		}
	}
	return nil, fmt.Errorf("the provider publishes no key with its key ID %q", kid)
}

// verifyJWS verifies jws with the key of ID kid among keys, or with any of
// them when kid is "".
func verifyJWS(jws *jose.JSONWebSignature, keys []jose.JSONWebKey, kid string) ([]byte, bool) {
	for i := range keys {
		if kid == "" || keys[i].KeyID == kid {
			if payload, err := jws.Verify(&keys[i]); err == nil {
				return payload, true
			}
		}
	}
	return nil, false
}

// refetch returns the keys as a fetch begun now, or one under way, finds
// them; within ssoKeysRefetch of the last fetch, the keys that one found
// (or its failure).
func (k *ssoKeys) refetch(ctx context.Context) ([]jose.JSONWebKey, error) {
	k.mu.Lock()
	f := k.flight
	if f == nil {
		if !k.last.IsZero() && k.now().Sub(k.last) < ssoKeysRefetch {
			keys, err := k.keys, k.err
			k.mu.Unlock()
			return keys, err
		}
		f = &keyFetch{done: make(chan struct{})}
		k.flight, k.last = f, k.now()
		go k.fetch(f)
	}
	k.mu.Unlock()
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-f.done:
		return f.keys, f.err
	}
}

// fetch gets the keys for f, outside any one request (a client that hangs
// up must not fail the fetch the others wait on), and keeps them.
func (k *ssoKeys) fetch(f *keyFetch) {
	ctx, cancel := context.WithTimeout(context.Background(), ssoDiscoveryTimeout)
	defer cancel()
	f.keys, f.err = k.get(ctx)
	k.mu.Lock()
	if f.err == nil {
		k.keys = f.keys
	}
	k.err, k.flight = f.err, nil
	k.mu.Unlock()
	close(f.done)
}

func (k *ssoKeys) get(ctx context.Context) ([]jose.JSONWebKey, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := k.hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, ssoMaxKeySet+1))
	switch {
	case err != nil:
		return nil, err
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("the provider's keys (%s) answered %s", k.url, resp.Status)
	case len(body) > ssoMaxKeySet:
		return nil, fmt.Errorf("the provider's keys (%s) are more than %d bytes", k.url, ssoMaxKeySet)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("the provider's keys (%s) are not a JSON Web Key Set: %v", k.url, err)
	}
	return set.Keys, nil
}
