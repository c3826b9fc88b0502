// Package login is the device side of TP's login: fetching and pinning the root,
// enrolling a device key with a one-time token, and getting a fresh 4-hour
// certificate through the enrollment endpoint and ACME device-attest-01 (acmez).
// It also holds the enrollment wire types the server in package acme answers.
// It also says, for dlogin and tp alike, why a connection to the server failed
// (connect.go): nothing listens, the port speaks no TLS, or it hung up.
// It does not import step-ca, so clients stay small.
package login
