package proxy

// IdentitySessions is the number of sessions device id has open, as counted
// against Config.MaxSessionsPerIdentity.
func IdentitySessions(s *Server, id string) int { return s.perID.count(id) }

// IdentityPending is the number of dials of reverse names device id has waiting
// for their agents, as counted against ReverseOptions.MaxPendingPerIdentity.
func IdentityPending(s *Server, id string) int { return s.rev.pendingPerID.count(id) }
