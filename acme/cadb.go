package acme

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/smallstep/nosql"
	bolt "go.etcd.io/bbolt"
)

// CACopy counts what CopyCADatabase copied.
type CACopy struct {
	Buckets, Rows int
}

// CopyCADatabase copies every bucket of the embedded CA's bbolt database at
// boltPath (accounts, orders, certificates, EAB keys, …) into the PostgreSQL
// database dsn (with its password) through step-ca's postgresql driver, the
// one NewCA uses there. Rows of the same key are replaced, so copying again
// changes nothing. The bbolt file is opened read-only and must not be in use:
// tpd holds its lock while it runs.
func CopyCADatabase(boltPath, dsn string) (CACopy, error) {
	var res CACopy
	if _, err := os.Stat(boltPath); errors.Is(err, os.ErrNotExist) {
		return res, nil // a data dir whose tpd never ran: nothing to copy
	}
	src, err := bolt.Open(boltPath, 0o600, &bolt.Options{ReadOnly: true, Timeout: 2 * time.Second})
	if err != nil {
		return res, fmt.Errorf("open the CA database %s: %w (stop the tpd that uses this data dir first)", boltPath, err)
	}
	defer src.Close()
	dst, err := nosql.New(nosql.PostgreSQLDriver, dsn)
	if err != nil {
		return res, fmt.Errorf("open the CA's tables in the database: %w", err)
	}
	defer dst.Close()
	err = src.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			if err := dst.CreateTable(name); err != nil {
				return err
			}
			res.Buckets++
			return b.ForEach(func(k, v []byte) error {
				if v == nil {
					return fmt.Errorf("bucket %s holds a nested bucket %s, which step-ca does not write; this is not a TP CA database", name, k)
				}
				res.Rows++
				return dst.Set(name, k, v)
			})
		})
	})
	if err != nil {
		return res, fmt.Errorf("copy the CA database: %w", err)
	}
	return res, nil
}
