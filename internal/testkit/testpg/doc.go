// Package testpg runs a real PostgreSQL server for tests: Debian's PostgreSQL
// binaries (package postgresql, under /usr/lib/postgresql/VERSION/bin), a
// throwaway cluster made by initdb in a temporary directory, listening on a free
// loopback port with its unix socket in that directory.
//
// One server serves a whole test binary (Main starts it on first use and stops
// it when the tests end, failed or not); each test gets a database of its own
// (NewDatabase), created from an empty template and dropped at the test's end.
// PostgreSQL refuses to run as root, so when the tests run as root the server
// runs as the postgres user the Debian package creates.
//
// It owns that server only; a test's own schema is the code under test's.
package testpg
