#!/usr/bin/env bash
# Builds the files TP.js's terminal page (clients/web/ssh.html) loads into
# clients/web/dist, which tpd embeds when it is built afterwards: the SSH
# client compiled to WebAssembly, Go's wasm_exec.js, and xterm.js from npm.
# Needs Go and npm (the npm registry).
set -euo pipefail
cd "$(dirname "$0")/.."
out=clients/web/dist
xterm=@xterm/xterm@6.0.0
GOOS=js GOARCH=wasm go build -trimpath -ldflags=-s -o "$out/ssh.wasm" ./clients/web/sshterm
cp "$(go env GOROOT)/lib/wasm/wasm_exec.js" "$out/wasm_exec.js"
if [ ! -f "$out/xterm.mjs" ] || ! grep -q "$xterm" "$out/xterm.version" 2>/dev/null; then
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && npm pack --silent "$xterm" >/dev/null && tar xzf ./*.tgz)
	cp "$tmp/package/lib/xterm.mjs" "$tmp/package/css/xterm.css" "$out/"
	cp "$tmp/package/LICENSE" "$out/xterm.LICENSE"
	echo "$xterm" >"$out/xterm.version"
fi
echo "build-web.sh: $out holds ssh.wasm ($(du -h "$out/ssh.wasm" | cut -f1)), wasm_exec.js and xterm.js"
