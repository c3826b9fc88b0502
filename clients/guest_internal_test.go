package clients

import (
	"testing"

	"github.com/tp-proxy/tp/proxy/wire"
)

// An agent admits a guest only of its own user's shares, and none when it
// refuses guests or does not know its user. Bad input: a header announcing
// a guest of another user's share (a name that changed hands since, say).
func TestAgentAdmitsGuestsOfItsOwner(t *testing.T) {
	guestOf := func(user string) wire.SessionHeader {
		return wire.SessionHeader{Name: "laptop-ssh", PeerID: "bob_partner.example@laptop", PeerUser: "bob_partner.example", PeerGuestOf: user}
	}
	for _, tc := range []struct {
		name   string
		agent  *Agent
		hdr    wire.SessionHeader
		admits bool
	}{
		{"a guest of the agent's user", &Agent{Owner: "alice"}, guestOf("alice"), true},
		{"a guest of another user's share", &Agent{Owner: "alice"}, guestOf("carol"), false},
		{"an agent that refuses guests", &Agent{Owner: "alice", RefuseGuests: true}, guestOf("alice"), false},
		{"an agent that does not know its user", &Agent{}, guestOf("alice"), false},
		{"no guest, not allowed", &Agent{Owner: "alice"}, guestOf(""), false},
		{"no guest, allowed by user", &Agent{Owner: "alice", AllowUsers: []string{"bob_partner.example"}}, guestOf(""), true},
	} {
		if got := tc.agent.allowed(tc.hdr.PeerUser, tc.hdr); got != tc.admits {
			t.Errorf("%s: allowed = %v, want %v", tc.name, got, tc.admits)
		}
	}
}
