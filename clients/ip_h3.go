package clients

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/quicvarint"
)

// HTTP/3 stream and frame types and the one setting `tp ip` reads itself
// (RFC 9114 §6.2, §7.2.4; RFC 9297 §2.1.1).
const (
	h3StreamControl  = 0x00
	h3FrameSettings  = 0x04
	h3SettingDgram   = 0x33
	h3MaxSettingsLen = 16 << 10
)

// serverStreams takes the server's unidirectional streams instead of quic-go's
// http3 client, and reads the server's SETTINGS on its control stream itself.
//
// Why: quic-go's http3 starts its own reader of the connection's datagrams
// once the server's SETTINGS announce HTTP Datagrams, and that reader puts them
// on a queue of 32 per stream that drops the rest of a burst: about a quarter
// of a bulk TCP transfer through the tunnel was lost there. With the control
// stream read here, the tunnel's own reader (wire.H3Datagrams) is the only
// one. The request itself still goes through http3.ClientConn.
//
// The returned channel yields nil once the SETTINGS announce HTTP Datagrams,
// or the error why not; when the control stream ends later, the connection is
// closed (H3_CLOSED_CRITICAL_STREAM), as RFC 9114 §6.2.1 requires.
func serverStreams(qc *quic.Conn) <-chan error {
	settings := make(chan error, 1)
	var once sync.Once
	report := func(err error) { once.Do(func() { settings <- err }) }
	var control atomic.Bool
	go func() {
		for {
			str, err := qc.AcceptUniStream(qc.Context())
			if err != nil {
				report(fmt.Errorf("the server sent no HTTP/3 control stream: %w", err))
				return
			}
			str.ReleaseStreamCredit()
			go func() {
				typ, err := quicvarint.Read(quicvarint.NewReader(str))
				switch {
				case err != nil:
					str.CancelRead(quic.StreamErrorCode(http3.ErrCodeStreamCreationError))
				case typ != h3StreamControl:
					// QPACK streams (quic-go's server uses no dynamic table),
					// push streams (never allowed: no MAX_PUSH_ID) and unknown
					// types: read and discarded (RFC 9114 §6.2).
					_, _ = io.Copy(io.Discard, io.LimitReader(str, 1<<20))
					str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
				case !control.CompareAndSwap(false, true):
					_ = qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeStreamCreationError), "duplicate control stream")
				default:
					report(readSettings(str))
					// The rest (GOAWAY, unknown frames) does not concern one
					// tunnel: a draining server ends the request itself.
					_, _ = io.Copy(io.Discard, str)
					_ = qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeClosedCriticalStream), "control stream closed")
				}
			}()
		}
	}()
	return settings
}

// errNoH3Datagrams: the server did not announce SETTINGS_H3_DATAGRAM.
var errNoH3Datagrams = errors.New("the server's HTTP/3 SETTINGS do not announce HTTP Datagrams (RFC 9297), which an IP tunnel over HTTP/3 needs")

// readSettings reads the first frame of the control stream, which must be
// SETTINGS, and reports whether it enables HTTP Datagrams.
func readSettings(r io.Reader) error {
	br := quicvarint.NewReader(r)
	typ, err := quicvarint.Read(br)
	if err != nil {
		return fmt.Errorf("reading the server's HTTP/3 SETTINGS: %w", err)
	}
	if typ != h3FrameSettings {
		return fmt.Errorf("the server's HTTP/3 control stream starts with frame type %#x, not SETTINGS", typ)
	}
	n, err := quicvarint.Read(br)
	if err != nil {
		return fmt.Errorf("reading the server's HTTP/3 SETTINGS: %w", err)
	}
	if n > h3MaxSettingsLen {
		return fmt.Errorf("the server's HTTP/3 SETTINGS frame is %d bytes, more than %d", n, h3MaxSettingsLen)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return fmt.Errorf("reading the server's HTTP/3 SETTINGS: %w", err)
	}
	dgram := false
	for len(b) > 0 {
		id, k, err := quicvarint.Parse(b)
		if err != nil {
			return errors.New("the server's HTTP/3 SETTINGS frame is malformed")
		}
		b = b[k:]
		v, k, err := quicvarint.Parse(b)
		if err != nil {
			return errors.New("the server's HTTP/3 SETTINGS frame is malformed")
		}
		b = b[k:]
		if id == h3SettingDgram {
			dgram = v == 1
		}
	}
	if !dgram {
		return errNoH3Datagrams
	}
	return nil
}
