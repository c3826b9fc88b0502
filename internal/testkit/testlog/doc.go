// Package testlog collects what a logger or a child process writes, from any
// number of goroutines, for a test to read while the writing goes on: an
// slog handler's output, a tpd's standard error.
//
// It owns that buffer only; sockets are internal/testkit/testnet's.
package testlog
