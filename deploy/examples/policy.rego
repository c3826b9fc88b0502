# Example policy: copy into DATA_DIR/policy/ next to (or instead of) tp.rego.
# tpd picks up changes within a few seconds (or on SIGHUP) and keeps the
# previous policy if the new one does not compile.
package tp.authz

default allow := false

# Group ops may ssh to any host under .internal.example.org.
allow if {
	input.action == "dial"
	input.destination.port == 22
	endswith(input.destination.host, ".internal.example.org")
	"ops" in input.identity.groups
}

# Group dba may reach the database, and nothing else on that host.
allow if {
	input.action == "dial"
	input.destination.host == "db.internal.example.org"
	input.destination.port == 5432
	"dba" in input.identity.groups
}

reason := sprintf("%s:%d is not allowed for %s (groups: %v)", [
	input.destination.host, input.destination.port,
	input.identity.device_id, input.identity.groups,
]) if not allow
