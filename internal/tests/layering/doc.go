// Package layering holds no code: its test checks, from the packages' real import
// graph (go list -deps), that TP's layers stay apart — clients and the wire
// protocol carry no server, no policy engine and no configuration library, the
// data plane carries no OPA, step-ca or viper, and the protocol families under
// proxy/ import the wire package, never the proxy that assembles them. A
// failure names the import chain.
package layering
