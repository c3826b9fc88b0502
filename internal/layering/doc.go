// Package layering holds no code: its test checks, from the packages' real import
// graph (go list -deps), that TP's layers stay apart — clients and the wire
// protocol carry no server, no policy engine and no configuration library, and the
// data plane carries no OPA, step-ca or viper. A failure names the import chain.
package layering
