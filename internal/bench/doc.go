// Package bench is TP's benchmark harness behind cmd/tpbench: it builds tpd, tp
// and dlogin, starts them on loopback next to the baselines they are compared with
// (direct TCP, a minimal Go mTLS relay, a plain Go TLS server, OpenSSH's ssh and
// sshd), runs each scenario several times and reports the median, the range and
// the ratio to a baseline measured in the same run.
//
// Figures are never asserted: the harness is an instrument. Ratios against
// baselines from the same run are what carry over between machines.
package bench
