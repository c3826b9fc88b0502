package acme

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/smallstep/nosql/database"
)

// Pruning what logins leave behind. Every login makes a fresh ACME account bound
// by a fresh EAB key, an order, an authorization, a challenge and a certificate
// record; a reverse-name certificate does the same. None of it is read again
// once the certificate is issued, and step-ca never deletes it: without pruning
// the database grows with every login for ever, and step-ca's new-order, which
// lists every authorization in the database, slows down with it.
//
// The buckets and fields read here are step-ca v0.30's nosql layout
// (acme/db/nosql and db). Records are only deleted when they are older than the
// retention, which is never shorter than the longest certificate any provisioner
// issues (24h), and never when something kept still points at them: the websites'
// ACME account, which certmagic keeps using, and its pending orders stay.

// Bucket names of step-ca's nosql database.
var (
	bucketNonces         = []byte("nonces")
	bucketAccounts       = []byte("acme_accounts")
	bucketAccountByKeyID = []byte("acme_keyID_accountID_index")
	bucketOrders         = []byte("acme_orders")
	bucketOrdersByAcct   = []byte("acme_account_orders_index")
	bucketAuthzs         = []byte("acme_authzs")
	bucketChallenges     = []byte("acme_challenges")
	bucketACMECerts      = []byte("acme_certs")
	bucketSerialCerts    = []byte("acme_serial_certs_index")
	bucketX509Certs      = []byte("x509_certs")
	bucketX509CertsData  = []byte("x509_certs_data")
	// EAB key IDs per provisioner, a JSON list.
	bucketEABByProvisioner = []byte("acme_external_account_keyID_provisionerID_index")
)

// MinRetention is the shortest retention Prune accepts: the longest lifetime of
// a certificate the embedded CA issues.
const MinRetention = 24 * time.Hour

// unboundEABLifetime is how long an EAB key that no account was made with is
// kept: clients use theirs within seconds of receiving it.
const unboundEABLifetime = time.Hour

// pruneBatch is the number of deletions written in one transaction.
const pruneBatch = 1000

// PruneStats counts what one Prune removed.
type PruneStats struct {
	Nonces, EABKeys, Accounts, Orders, Authorizations, Challenges, ACMECertificates, Certificates int
}

// Total is the number of records removed.
func (s PruneStats) Total() int {
	return s.Nonces + s.EABKeys + s.Accounts + s.Orders + s.Authorizations + s.Challenges + s.ACMECertificates + s.Certificates
}

// Prune deletes from the CA database, as of now:
//   - every stored nonce (nonces live in memory since nonce.go; these are left
//     over from older versions);
//   - EAB keys no account was made with, after an hour;
//   - the ACME accounts of logins and reverse-name certificates (single use),
//     older than retention, with their EAB keys and index entries;
//   - orders, authorizations, challenges and ACME certificate records older than
//     retention that nothing kept refers to;
//   - issued certificates that expired more than retention ago.
//
// It is safe to run while the CA serves: everything it deletes is older than
// anything a client still uses.
func (c *CA) Prune(ctx context.Context, now time.Time, retention time.Duration) (PruneStats, error) {
	var st PruneStats
	if retention < MinRetention {
		return st, fmt.Errorf("retention %s is shorter than %s, the longest certificate lifetime", retention, MinRetention)
	}
	cutoff := now.Add(-retention)
	del := &deleter{db: c.store}

	// Nonces left by versions that stored them.
	entries, err := c.list(bucketNonces)
	if err != nil {
		return st, err
	}
	for _, e := range entries {
		del.add(bucketNonces, e.Key)
	}
	st.Nonces = len(entries)

	// Accounts of single-use provisioners, older than the retention.
	entries, err = c.list(bucketAccounts)
	if err != nil {
		return st, err
	}
	singleUse := map[string]bool{provisionerID: true, reverseProvisionerID: true}
	accounts := map[string]bool{} // every account ID → pruned
	for _, e := range entries {
		var a struct {
			ID            string    `json:"id"`
			ProvisionerID string    `json:"provisionerID"`
			CreatedAt     time.Time `json:"createdAt"`
		}
		if json.Unmarshal(e.Value, &a) != nil || a.ID == "" {
			continue // not ours to judge
		}
		gone := singleUse[a.ProvisionerID] && a.CreatedAt.Before(cutoff)
		accounts[a.ID] = gone
		if gone {
			del.add(bucketAccounts, e.Key)
			st.Accounts++
		}
	}
	if entries, err = c.list(bucketAccountByKeyID); err != nil {
		return st, err
	}
	for _, e := range entries {
		if accounts[string(e.Value)] {
			del.add(bucketAccountByKeyID, e.Key)
		}
	}

	// Orders still listed for a kept account (pending ones) stay, whatever their age.
	keepOrders := map[string]bool{}
	if entries, err = c.list(bucketOrdersByAcct); err != nil {
		return st, err
	}
	for _, e := range entries {
		if accounts[string(e.Key)] {
			del.add(bucketOrdersByAcct, e.Key)
			continue
		}
		var ids []string
		if json.Unmarshal(e.Value, &ids) != nil {
			return st, fmt.Errorf("prune: order index of account %s is unreadable; nothing was deleted", e.Key)
		}
		for _, id := range ids {
			keepOrders[id] = true
		}
	}

	keepAuthz, keepCert := map[string]bool{}, map[string]bool{}
	if entries, err = c.list(bucketOrders); err != nil {
		return st, err
	}
	for _, e := range entries {
		var o struct {
			ID               string    `json:"id"`
			AuthorizationIDs []string  `json:"authorizationIDs"`
			CreatedAt        time.Time `json:"createdAt"`
			CertificateID    string    `json:"certificate"`
		}
		if json.Unmarshal(e.Value, &o) != nil || o.ID == "" {
			continue
		}
		if o.CreatedAt.Before(cutoff) && !keepOrders[o.ID] {
			del.add(bucketOrders, e.Key)
			st.Orders++
			continue
		}
		for _, id := range o.AuthorizationIDs {
			keepAuthz[id] = true
		}
		keepCert[o.CertificateID] = true
	}

	keepChallenge := map[string]bool{}
	if entries, err = c.list(bucketAuthzs); err != nil {
		return st, err
	}
	for _, e := range entries {
		var a struct {
			ID           string    `json:"id"`
			ChallengeIDs []string  `json:"challengeIDs"`
			CreatedAt    time.Time `json:"createdAt"`
		}
		if json.Unmarshal(e.Value, &a) != nil || a.ID == "" {
			continue
		}
		if a.CreatedAt.Before(cutoff) && !keepAuthz[a.ID] {
			del.add(bucketAuthzs, e.Key)
			st.Authorizations++
			continue
		}
		for _, id := range a.ChallengeIDs {
			keepChallenge[id] = true
		}
	}
	if st.Challenges, err = c.pruneCreatedBefore(del, bucketChallenges, cutoff, keepChallenge); err != nil {
		return st, err
	}

	goneCerts := map[string]bool{}
	if entries, err = c.list(bucketACMECerts); err != nil {
		return st, err
	}
	for _, e := range entries {
		var r struct {
			ID        string    `json:"id"`
			CreatedAt time.Time `json:"createdAt"`
		}
		if json.Unmarshal(e.Value, &r) != nil || r.ID == "" {
			continue
		}
		if r.CreatedAt.Before(cutoff) && !keepCert[r.ID] {
			del.add(bucketACMECerts, e.Key)
			goneCerts[r.ID] = true
			st.ACMECertificates++
		}
	}
	if entries, err = c.list(bucketSerialCerts); err != nil {
		return st, err
	}
	for _, e := range entries {
		var s struct {
			CertificateID string `json:"certificateID"`
		}
		if json.Unmarshal(e.Value, &s) == nil && goneCerts[s.CertificateID] {
			del.add(bucketSerialCerts, e.Key)
		}
	}

	// The authority's copy of every certificate it issued, once expired.
	if entries, err = c.list(bucketX509Certs); err != nil {
		return st, err
	}
	for _, e := range entries {
		cert, err := x509.ParseCertificate(e.Value)
		if err != nil || !cert.NotAfter.Before(cutoff) {
			continue
		}
		del.add(bucketX509Certs, e.Key)
		del.add(bucketX509CertsData, e.Key)
		st.Certificates++
	}
	if err := del.flush(); err != nil {
		return st, err
	}

	// EAB keys go through step-ca's own API, which keeps its per-provisioner index.
	for _, prov := range []string{provisionerID, reverseProvisionerID, sitesProvisionerID} {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		keys, _, err := c.acmeDB.GetExternalAccountKeys(ctx, prov, "", 0)
		if err != nil {
			return st, fmt.Errorf("prune: list account bindings of %s: %w", prov, err)
		}
		for _, k := range keys {
			pruned, exists := accounts[k.AccountID]
			switch {
			case k.AccountID == "" && k.CreatedAt.Before(now.Add(-unboundEABLifetime)):
			case k.AccountID != "" && pruned:
			case k.AccountID != "" && !exists && k.CreatedAt.Before(cutoff): // its account is gone
			default:
				continue
			}
			if err := c.acmeDB.DeleteExternalAccountKey(ctx, prov, k.ID); err != nil {
				return st, fmt.Errorf("prune: delete account binding: %w", err)
			}
			st.EABKeys++
		}
		// step-ca leaves an empty list ("[]") when the last key of a provisioner is
		// deleted, and then fails to add the next one (it expects no entry): drop it.
		// Nothing but deletion writes "[]", so nobody can be adding to it meanwhile.
		if b, err := c.store.Get(bucketEABByProvisioner, []byte(prov)); err == nil && isEmptyJSONList(b) {
			if err := c.store.Del(bucketEABByProvisioner, []byte(prov)); err != nil {
				return st, fmt.Errorf("prune: clear account binding index of %s: %w", prov, err)
			}
		}
	}
	return st, nil
}

func isEmptyJSONList(b []byte) bool {
	var ids []string
	return json.Unmarshal(b, &ids) == nil && len(ids) == 0
}

// pruneCreatedBefore deletes the records of bucket with a createdAt before cutoff
// whose id is not in keep.
func (c *CA) pruneCreatedBefore(del *deleter, bucket []byte, cutoff time.Time, keep map[string]bool) (int, error) {
	entries, err := c.list(bucket)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		var r struct {
			ID        string    `json:"id"`
			CreatedAt time.Time `json:"createdAt"`
		}
		if json.Unmarshal(e.Value, &r) != nil || r.ID == "" {
			continue
		}
		if r.CreatedAt.Before(cutoff) && !keep[r.ID] {
			del.add(bucket, e.Key)
			n++
		}
	}
	return n, nil
}

func (c *CA) list(bucket []byte) ([]*database.Entry, error) {
	entries, err := c.store.List(bucket)
	if err != nil && !database.IsErrNotFound(err) {
		return nil, fmt.Errorf("prune: read %s: %w", bucket, err)
	}
	return entries, nil
}

// deleter writes deletions in batches, one transaction each.
type deleter struct {
	db  interface{ Update(*database.Tx) error }
	ops []*database.TxEntry
	err error
}

func (d *deleter) add(bucket, key []byte) {
	d.ops = append(d.ops, &database.TxEntry{Bucket: bucket, Key: key, Cmd: database.Delete})
	if len(d.ops) >= pruneBatch {
		d.write()
	}
}

func (d *deleter) write() {
	if len(d.ops) == 0 {
		return
	}
	if err := d.db.Update(&database.Tx{Operations: d.ops}); err != nil {
		d.err = errors.Join(d.err, fmt.Errorf("prune: delete: %w", err))
	}
	d.ops = nil
}

// flush writes what is left and reports every failed batch.
func (d *deleter) flush() error {
	d.write()
	return d.err
}
