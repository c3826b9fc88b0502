// Package website serves the websites that share TP's public port with the proxy:
// static directories and reverse proxies to upstream HTTP servers, chosen by the
// TLS server name, with the Host header held to that name (421 otherwise). It
// also keeps the sites' certificates from ACME (certmagic). The proxy package
// hands it every HTTP request that arrived on h2, http/1.1 or h3; it knows
// nothing about the proxy.
package website
