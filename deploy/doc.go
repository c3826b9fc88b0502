// Package deploy holds TP's deploy files (systemd unit, Kubernetes manifests,
// container build, example config) and, in its tests, the checks CI runs on
// them: systemd-analyze verify, strict decoding into Kubernetes' API types, and
// the release build the Dockerfile runs. It has no code of its own.
package deploy
