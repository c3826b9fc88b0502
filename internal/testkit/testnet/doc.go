// Package testnet gives tests real loopback sockets that end with the test: the
// two ends of a TCP connection, small TCP services (an echo, an upper-case
// replier, an endless stream, a service whose connections the test handles
// itself), UDP services that answer each datagram, ports that were free a
// moment ago, and a test's run again in a network or user namespace of its own
// (InNetns, InUserns) for what loopback on the host cannot give: addresses
// that are not loopback ones, tun devices, a process without capabilities.
//
// It owns the sockets only. Certificates are internal/testkit/testpki's; a running TP
// server belongs to the test helpers of the package under test.
//
// Every helper takes a testing.TB and fails the test (never skips it) when the
// loopback socket or the namespace cannot be had (under -short, InNetns and
// InUserns skip: they start a process); every socket it opens, accepted connections
// included, is closed by t.Cleanup; every wait inside it is bounded.
package testnet
