// Package web holds TP.js, TP's client for browsers (tp.js, typed by
// tp.d.ts), and its terminal page (ssh.html), which tpd serves on its
// website at /tp/web/. dist holds what deploy/build-web.sh built for the
// page (the SSH client as WebAssembly, xterm.js) when tpd was built after
// it; without them the page says how to build them.
package web

import "embed"

// FS holds tp.js, tp.d.ts, ssh.html, echo.html and dist.
//
//go:embed tp.js tp.d.ts ssh.html echo.html dist
var FS embed.FS
