// Package authz turns a verified client certificate into an [Identity] and decides
// each [Request] that identity makes.
//
// [IdentityFromCert] reads the device ID from the certificate's RFC 4043
// permanentIdentifier, the identity TP's CA writes through ACME device-attest-01.
// [Policy] adds what the certificate cannot say: whether the device may connect at
// all (a [DenyList] and a [Directory]) and which groups its user has. It then asks a
// policy [Evaluator] — in tpd, *policy.Engine — about each request, with the input
// document built by [Input]. That document's field names are a documented contract
// for policy authors.
//
// Everything fails closed: a certificate without exactly one valid device identity,
// a revoked or unknown device, an expired certificate, or a policy that errors all
// lead to a denial.
//
// The package parses no configuration; callers hand it its parts.
package authz
