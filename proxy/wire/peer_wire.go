package wire

import (
	"io"
	"net/netip"
	"strconv"
	"strings"
)

// PeerALPN is the TLS application protocol of connections between TP server
// instances on the shared port (docs/SCALE.md, "Peering"). Only a node
// certificate of TP's own CA is accepted there, and a node certificate is
// accepted nowhere else.
const PeerALPN = "tp-peer/1"

// NetHTTP is a PeerOpen's Header.Net for one HTTP/1.1 request to a reverse
// HTTP name (tp expose --http) served by the receiving instance's tunnels: the
// connection then carries that request and its response (docs/SCALE.md).
// Header.PeerID is the requesting device as the forwarding instance verified
// it, empty for a browser without a device certificate.
const NetHTTP = "http"

// NetAccept is a PeerOpen's Header.Net for an agent's pickup (op accept) that
// reached the forwarding instance while the session is pending on the
// receiving one: Header.Session is the pending session's id, Header.PeerID the
// agent's device as the forwarding instance authenticated it, Key one of the
// agent's names at Epoch. After ok the connection is the agent's stream.
const NetAccept = "accept"

// NetEnd is a PeerOpen's Header.Net for a notice, from the instance that
// serves a forwarded dial to the instance that forwarded it, that the session
// Header.Session ends for the reason Header.End ("shutdown": the serving
// instance is stopping). The receiver cuts the dialer's session with that
// reason, answers ok (unknown_session when no such session is forwarded from
// there) and closes.
const NetEnd = "end"

// PeerOpen is the one frame an instance (B) sends on a fresh peer connection to
// the instance (A) that serves a reverse name: open a session to the name's
// agent at Epoch, the route's fencing token as B read it from the database. A
// answers with a ServerHello (OK and E2E as to a dialer, or a refusal:
// reverse_offline when Epoch is not the one its agent holds or its lease ran
// out), and the connection then carries the session's bytes both ways.
type PeerOpen struct {
	V int `json:"v"`
	// Key is the full reverse name ("laptop-ssh.rev.tp.internal").
	Key   string `json:"key"`
	Epoch int64  `json:"epoch"`
	// Header is the session header A sends to the agent: the dialer as B
	// authenticated it and authorised it (Peer*), the name's label, Net.
	Header SessionHeader `json:"header"`
}

// WritePeerOpen writes o as one frame.
func WritePeerOpen(w io.Writer, o PeerOpen) error { return writeFrame(w, o) }

// ReadPeerOpen reads and validates one PeerOpen frame.
func ReadPeerOpen(r io.Reader) (PeerOpen, error) {
	body, err := readFrame(r)
	if err != nil {
		return PeerOpen{}, err
	}
	var o PeerOpen
	if err := strictJSON(body, &o); err != nil {
		return PeerOpen{}, Errorf(CodeBadRequest, "malformed peer open: %v", err)
	}
	if o.V != Version || o.Header.V != Version {
		return PeerOpen{}, Errorf(CodeUnsupportedVersion, "peer open version %d (header %d); this side speaks %d", o.V, o.Header.V, Version)
	}
	if o.Epoch <= 0 {
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open without a positive epoch")
	}
	if err := validSessionID(o.Header.Session); err != nil {
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: %v", err)
	}
	if o.Header.Flow != nil || o.Header.Ping || (o.Header.End != "") != (o.Header.Net == NetEnd) {
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: a session header between instances carries no flow or ping, and an end only with net \"end\"")
	}
	if o.Header.Net == NetEnd && o.Header.End != EndShutdown {
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: end %q (want %q)", o.Header.End, EndShutdown)
	}
	if net, ok := PublicKeyNet(o.Key); ok {
		return o, validPeerPublic(o, net)
	}
	switch {
	case ValidHost(o.Key) != nil:
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open for an invalid name: %v", ValidHost(o.Key))
	case ValidReverseName(o.Header.Name) != nil:
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: %v", ValidReverseName(o.Header.Name))
	case o.Header.Net != "" && o.Header.Net != "udp" && o.Header.Net != NetHTTP && o.Header.Net != NetAccept && o.Header.Net != NetEnd:
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: network %q (want \"\", \"udp\", \"http\", \"accept\" or \"end\")", o.Header.Net)
	case o.Header.Net == NetAccept && o.Header.PeerID == "":
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: an accept names the agent's device (peer_id)")
	case o.Header.Public != "" || o.Header.PeerAddr != "":
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: a dial's header carries no public or peer_addr")
	}
	return o, nil
}

// validPeerPublic checks a peer open of a public exposure (Key "tcp/PORT",
// "udp/PORT" or "sni/NAME"): the header names the exposure, the public
// client's address and the network, and no label (the serving instance
// fills in the label its agent registered) and no dialer.
func validPeerPublic(o PeerOpen, net string) error {
	h := o.Header
	want := ""
	if net == "udp" {
		want = "udp"
	}
	switch {
	case h.Public != o.Key:
		return Errorf(CodeBadRequest, "peer open of %s: header public %q differs", o.Key, h.Public)
	case h.Name != "":
		return Errorf(CodeBadRequest, "peer open of %s: a public session's label is the serving instance's to set", o.Key)
	case h.Net != want:
		return Errorf(CodeBadRequest, "peer open of %s: network %q (want %q)", o.Key, h.Net, want)
	case h.PeerID != "" || h.PeerUser != "" || len(h.PeerGroups) > 0 || h.PeerGuestOf != "":
		return Errorf(CodeBadRequest, "peer open of %s: a public session has no dialer identity", o.Key)
	}
	if _, err := netip.ParseAddrPort(h.PeerAddr); err != nil {
		return Errorf(CodeBadRequest, "peer open of %s: public client address %q: %v", o.Key, h.PeerAddr, err)
	}
	return nil
}

// PublicKeyNet says whether key names a public exposure ("tcp/PORT",
// "udp/PORT" with PORT 1–65535, or "sni/NAME" with a valid host name) and its
// network: "tcp", "udp", or "tcp" for a server name.
func PublicKeyNet(key string) (string, bool) {
	kind, rest, ok := strings.Cut(key, "/")
	if !ok {
		return "", false
	}
	switch kind {
	case "tcp", "udp":
		p, err := strconv.Atoi(rest)
		if err != nil || p < 1 || p > 65535 || strconv.Itoa(p) != rest {
			return "", false
		}
		return kind, true
	case "sni":
		return "tcp", ValidHost(rest) == nil
	}
	return "", false
}
