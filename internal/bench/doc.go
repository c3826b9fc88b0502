// Package bench is TP's benchmark harness behind cmd/tpbench: it builds tpd, tp
// and dlogin, starts them on loopback next to the baselines they are compared with
// (direct TCP, a minimal Go mTLS relay, a plain Go TLS server, OpenSSH's ssh and
// sshd) and, when their binaries are given, TP's multiplexing peers (ghostunnel,
// chisel, frp; peers.go), runs each scenario several times with every variant in
// turn, and reports the median, the range and the ratio to a baseline measured in
// the same run.
//
// Figures are never asserted: the harness is an instrument. Ratios against
// baselines from the same run are what carry over between machines.
package bench
