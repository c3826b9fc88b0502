// Package version holds TP's version, so that the client binaries can print it
// without linking the server assembly that also reports it.
package version

// Version is reported by the binaries and in tp's "Connecting …" line.
const Version = "v0.1.0"
