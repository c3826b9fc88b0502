package wire

import "io"

// PeerALPN is the TLS application protocol of connections between TP server
// instances on the shared port (docs/SCALE.md, "Peering"). Only a node
// certificate of TP's own CA is accepted there, and a node certificate is
// accepted nowhere else.
const PeerALPN = "tp-peer/1"

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
	switch {
	case o.V != Version || o.Header.V != Version:
		return PeerOpen{}, Errorf(CodeUnsupportedVersion, "peer open version %d (header %d); this side speaks %d", o.V, o.Header.V, Version)
	case o.Epoch <= 0:
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open without a positive epoch")
	case ValidHost(o.Key) != nil:
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open for an invalid name: %v", ValidHost(o.Key))
	case ValidReverseName(o.Header.Name) != nil:
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: %v", ValidReverseName(o.Header.Name))
	case validSessionID(o.Header.Session) != nil:
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: %v", validSessionID(o.Header.Session))
	case o.Header.Net != "" && o.Header.Net != "udp":
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: network %q (want \"\" or \"udp\")", o.Header.Net)
	case o.Header.Public != "" || o.Header.Flow != nil || o.Header.Ping || o.Header.End != "":
		return PeerOpen{}, Errorf(CodeBadRequest, "peer open: a dial's header carries no public, flow, ping or end")
	}
	return o, nil
}
