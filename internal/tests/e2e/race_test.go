//go:build race

package e2e

// raceEnabled makes TestMain build the binaries with -race too, so they reuse the
// packages the test binary was compiled with and run under the detector.
const raceEnabled = true
