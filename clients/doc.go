// Package clients is TP's Go client library: dialing through a TP server over the
// wire protocol (Dialer), bridging a dialed connection to stdin/stdout for ssh's
// ProxyCommand (Stdio), and local TCP forwarders (Forwarder). Credential storage,
// login and the reverse agent live here too as they are added.
package clients
