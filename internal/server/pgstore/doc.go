// Package pgstore keeps tpd's shared state in PostgreSQL, for several tpd
// instances behind one name: a connection pool from a DSN whose password comes
// from a file or the environment, the schema (created and migrated by tpd at
// start, versioned in schema_version), the user store (users, groups, devices,
// enrollment tokens; a [users.Store]), the deny list, the embedded CA's ACME
// nonces (an [acme.NonceStore]), what every instance must agree on (the
// CA's root fingerprint), reverse-name holds with leases (holds.go), shared
// secret keys (keys.go), certmagic's storage and locks for site certificates
// (certmagic.go), and the import `tpd migrate` does.
//
// Every instance keeps what it reads on each connection in memory and reloads
// it when another instance changes it: each write notifies on one channel
// (LISTEN/NOTIFY) in its own transaction, and a listener reloads; after the
// listener's connection was lost it reloads everything, since notifications
// sent meanwhile are gone. A slow periodic reload is only a safety net.
//
// The CA's own tables (accounts, orders, certificates) are step-ca's (github.com/smallstep/nosql's postgresql
// driver) in the same database; package acme opens them.
package pgstore
