// Package policy owns TP's OPA engine: it loads the Rego files of one directory
// (package tp.authz), compiles them once into a prepared query, evaluates that query
// for each authorization question, and hot-reloads the directory atomically.
//
// The engine knows nothing about sockets or certificates: it takes the input
// document as a map and answers with a [Result]. Building that input is the job of
// package authz, which also documents its fields. [Authorizer] joins the two: it is
// the authz.Authorizer tpd hands the proxy, checking the deny list, the directory
// and the certificate's expiry before it asks the engine, and recording each
// decision in a [DecisionLog].
//
// Everything fails closed. A file that does not parse or compile stops [Load]; a
// failed [Engine.Reload] keeps the previous good policy active; and an evaluation
// that errors, runs past its timeout, leaves allow undefined or sets it to anything
// but a boolean returns an error, which callers treat as a denial.
//
// Policies decide on their input alone: the builtins that reach the network
// (http.send, net.lookup_ip_addr) are not available, so a decision never waits for
// another server and never sees addresses other than the ones TP will dial.
package policy
