package direct

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pion/ice/v4"
	"github.com/pion/logging"
	"github.com/pion/stun/v4"
	"github.com/quic-go/quic-go"
)

// Signalling runs on one unidirectional QUIC stream each way, opened by each
// end as the pair's connection is up: JSON lines, each at most maxSignal
// bytes. The first gives the sender's ICE credentials ({"ufrag","pwd"}); then
// one line per local candidate ({"candidate": RFC 8839 candidate-attribute
// value}), as they are gathered; then {"done":true}.
const (
	maxSignal     = 2048
	maxCandidates = 32
	// signalWait bounds waiting for the other end's credentials.
	signalWait = 10 * time.Second
)

// ICE timing: a consent check a second; a pair that answers none for
// iceDisconnected is taken as gone (the Path sends on the relay), and ICE
// gives up after iceFailed.
const (
	iceKeepalive    = time.Second
	iceDisconnected = 3 * time.Second
	iceFailed       = 15 * time.Second
)

type signal struct {
	Ufrag     string `json:"ufrag,omitempty"`
	Pwd       string `json:"pwd,omitempty"`
	Candidate string `json:"candidate,omitempty"`
	Done      bool   `json:"done,omitempty"`
}

// ICEOptions is how an end looks for a direct path.
type ICEOptions struct {
	// STUN are host:port addresses that answer STUN binding requests (the TP
	// server's UDP port): the end learns there the address a NAT gives it.
	STUN []string
	// Loopback also offers loopback addresses as candidates (tests on one host).
	Loopback bool
	// Interface says which network interfaces give candidates; nil means all
	// but TP's own tun devices (tp*): a path through TP is no direct path.
	Interface func(name string) bool
	Logger    *slog.Logger
}

// RunICE looks for a direct path for path's pair, over qc (the pair's QUIC
// connection, whose packets path carries): it exchanges candidates with the
// other end on a unidirectional stream each way, runs ICE (the dialer
// controlling) and gives path the direct path once a candidate pair works,
// then tells it when ICE loses and regains it. It returns when ctx ends or the
// search failed; the error says why no direct path was found.
func RunICE(ctx context.Context, qc *quic.Conn, path *Path, controlling bool, opts ICEOptions) error {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var urls []*stun.URI
	for _, s := range opts.STUN {
		host, port, err := net.SplitHostPort(s)
		if err != nil {
			continue
		}
		pn, err := strconv.Atoi(port)
		if err != nil {
			continue
		}
		urls = append(urls, &stun.URI{Scheme: stun.SchemeTypeSTUN, Host: host, Port: pn, Proto: stun.ProtoTypeUDP})
	}
	quiet := logging.NewDefaultLoggerFactory()
	quiet.DefaultLogLevel = logging.LogLevelDisabled
	opt := []ice.AgentOption{
		ice.WithNetworkTypes([]ice.NetworkType{ice.NetworkTypeUDP4, ice.NetworkTypeUDP6}),
		ice.WithCandidateTypes([]ice.CandidateType{ice.CandidateTypeHost, ice.CandidateTypeServerReflexive}),
		ice.WithMulticastDNSMode(ice.MulticastDNSModeDisabled),
		ice.WithKeepaliveInterval(iceKeepalive),
		ice.WithDisconnectedTimeout(iceDisconnected),
		ice.WithFailedTimeout(iceFailed),
		ice.WithLoggerFactory(quiet),
	}
	if opts.Interface != nil {
		opt = append(opt, ice.WithInterfaceFilter(opts.Interface))
	} else {
		opt = append(opt, ice.WithInterfaceFilter(func(name string) bool { return !strings.HasPrefix(name, "tp") }))
	}
	if len(urls) > 0 {
		opt = append(opt, ice.WithUrls(urls))
	}
	if opts.Loopback {
		opt = append(opt, ice.WithIncludeLoopback())
	}
	agent, err := ice.NewAgentWithOptions(opt...)
	if err != nil {
		return fmt.Errorf("starting ICE: %w", err)
	}
	defer agent.Close()

	send, err := qc.OpenUniStream()
	if err != nil {
		return fmt.Errorf("opening the signalling stream: %w", err)
	}
	defer send.CancelWrite(0)
	var smu sync.Mutex
	write := func(s signal) {
		b, _ := json.Marshal(s)
		smu.Lock()
		defer smu.Unlock()
		_ = send.SetWriteDeadline(time.Now().Add(signalWait))
		_, _ = send.Write(append(b, '\n'))
	}
	ufrag, pwd, err := agent.GetLocalUserCredentials()
	if err != nil {
		return err
	}
	write(signal{Ufrag: ufrag, Pwd: pwd})
	if err := agent.OnCandidate(func(c ice.Candidate) {
		if c == nil {
			write(signal{Done: true})
			return
		}
		log.Debug("tp direct: local candidate", "candidate", c.Marshal())
		write(signal{Candidate: c.Marshal()})
	}); err != nil {
		return err
	}
	var once, failOnce sync.Once
	var conn *ice.Conn
	connected, failed := make(chan struct{}), make(chan struct{})
	if err := agent.OnConnectionStateChange(func(s ice.ConnectionState) {
		log.Debug("tp direct: ICE", "state", s.String())
		switch s {
		case ice.ConnectionStateConnected, ice.ConnectionStateCompleted:
			once.Do(func() { close(connected) })
			path.SetICEUp(true)
		case ice.ConnectionStateFailed:
			failOnce.Do(func() { close(failed) })
			path.SetICEUp(false)
		case ice.ConnectionStateDisconnected, ice.ConnectionStateClosed:
			path.SetICEUp(false)
		}
	}); err != nil {
		return err
	}
	if err := agent.GatherCandidates(); err != nil {
		return fmt.Errorf("gathering ICE candidates: %w", err)
	}

	actx, cancel := context.WithTimeout(ctx, signalWait)
	recv, err := qc.AcceptUniStream(actx)
	cancel()
	if err != nil {
		return fmt.Errorf("the other end opened no signalling stream: %w", err)
	}
	defer recv.CancelRead(0)
	stop := context.AfterFunc(ctx, func() { recv.CancelRead(0) })
	defer stop()
	r := bufio.NewReaderSize(recv, maxSignal)
	_ = recv.SetReadDeadline(time.Now().Add(signalWait))
	first, err := readSignal(r)
	if err != nil {
		return err
	}
	if first.Ufrag == "" || first.Pwd == "" {
		return errors.New("tp direct: the first signalling line carries no ICE credentials")
	}
	_ = recv.SetReadDeadline(time.Time{})
	if controlling {
		conn, err = agent.StartDial(first.Ufrag, first.Pwd)
	} else {
		conn, err = agent.StartAccept(first.Ufrag, first.Pwd)
	}
	if err != nil {
		return fmt.Errorf("starting ICE checks: %w", err)
	}
	go func() { // the other end's candidates, as they come
		for n := 0; ; n++ {
			s, err := readSignal(r)
			if err != nil || s.Done {
				return
			}
			if n >= maxCandidates {
				log.Debug("tp direct: more candidates than taken", "max", maxCandidates)
				return
			}
			log.Debug("tp direct: remote candidate", "candidate", s.Candidate)
			c, err := ice.UnmarshalCandidate(s.Candidate)
			if err != nil {
				log.Debug("tp direct: a candidate that does not parse", "err", err.Error())
				continue
			}
			if err := agent.AddRemoteCandidate(c); err != nil {
				log.Debug("tp direct: a candidate not taken", "err", err.Error())
			}
		}
	}()
	select {
	case <-connected:
		path.SetDirect(conn)
		if pair, err := agent.GetSelectedCandidatePair(); err == nil && pair != nil {
			log.Info("tp direct: direct path found", "local", pair.Local.String(), "remote", pair.Remote.String())
		}
	case <-failed:
		return errors.New("no candidate pair answered: the devices' networks let no direct path through (symmetric NATs, or UDP blocked); the relay carries the session")
	case <-ctx.Done():
		return ctx.Err()
	}
	<-ctx.Done()
	return nil
}

func readSignal(r *bufio.Reader) (signal, error) {
	line, err := r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		return signal{}, fmt.Errorf("tp direct: a signalling line longer than %d bytes", maxSignal)
	}
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return signal{}, fmt.Errorf("tp direct: reading the other end's signalling: %w", err)
	}
	var s signal
	if err := json.Unmarshal(line, &s); err != nil {
		return signal{}, fmt.Errorf("tp direct: a signalling line that is not JSON: %w", err)
	}
	return s, nil
}
