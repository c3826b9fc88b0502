// Package testpar sets how many tests of a package run at once when the
// command line does not say (go test -parallel).
//
// Go runs as many parallel tests at once as there are processors. The tests
// of tpd, the proxy and the clients spend most of their time waiting for
// network round trips, timers and PostgreSQL, not computing: on a machine
// with two processors, two at a time leaves it mostly idle. Their TestMain
// raises the number with Default.
//
// It owns that number only.
package testpar
