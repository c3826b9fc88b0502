//go:build race

package e2e

// raceFlags makes TestMain build tpd with -race too, so that it reuses the
// packages the test binary was compiled with and runs under the detector.
var raceFlags = []string{"-race"}
