#!/usr/bin/env bash
# The release build of tpd, tp and dlogin: static (no cgo), build paths trimmed,
# symbols stripped, for GOOS/GOARCH if set (default: this machine).
#   deploy/build.sh OUTDIR
# The Dockerfile runs exactly this, CI runs it and checks what it built
# (deploy/deploy_test.go), and the README's Install section names it.
set -euo pipefail
if [ $# -ne 1 ]; then
	echo "usage: deploy/build.sh OUTDIR   (builds tpd, tp and dlogin into OUTDIR)" >&2
	exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$out/" ./cmd/tpd ./cmd/tp ./cmd/dlogin
