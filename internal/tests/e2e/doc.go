// Package e2e holds end-to-end tests that run the real tpd, dlogin and tp binaries
// against each other on loopback, with OpenSSH's ssh and sshd for the ProxyCommand path.
package e2e
