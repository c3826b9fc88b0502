// Package authz is the vocabulary of TP's authorization, shared by the server and
// the clients: it turns a verified client certificate into an [Identity], describes
// each [Request] that identity makes and the [Decision] about it, and defines the
// [Authorizer] interface the proxy asks.
//
// [IdentityFromCert] reads the device ID from the certificate's RFC 4043
// permanentIdentifier, the identity TP's CA writes through ACME device-attest-01.
// [Verify] adds what the certificate cannot say: whether the device may connect at
// all (a [DenyList] and a [Directory]) and which groups its user has. [Input] builds
// the policy input document for a request; its field names are a documented
// contract for policy authors.
//
// authz is a leaf: it links no policy engine. The Authorizer tpd runs, which asks a
// Rego policy, is policy.Authorizer.
//
// Everything fails closed: a certificate without exactly one valid device identity,
// a revoked or unknown device, or an unknown directory lead to an error.
//
// The package parses no configuration; callers hand it its parts.
package authz
