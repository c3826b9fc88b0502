package proxy

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// defaultStreamCreditDelay is how long tpd may keep the credit of a finished
// stream before it tells the client that it may open another (MAX_STREAMS).
const defaultStreamCreditDelay = 100 * time.Millisecond

// streamCreditDelay, when not zero, replaces defaultStreamCreditDelay (tests).
var streamCreditDelay atomic.Int64

// streamCredit returns the stream credit of a tp/1 connection's finished
// streams in batches instead of one MAX_STREAMS packet per stream: when an
// eighth of the connection's streams have ended, or streamCreditDelay after the
// first of them ended, whichever comes first (docs/PROTOCOL.md, section 9.7).
//
// quic-go's default sends a packet of its own for every stream that ends, and
// on a busy connection that packet lands in the middle of the next tunnel's
// set-up: it is one more packet for the client to wake up for, and it makes
// the client's next packet the second one that asks for an acknowledgement,
// which quic-go then acknowledges at once, before the stream reader gets to
// run. A client that uses all its streams opens a further connection, as when
// the server's limit is reached (clients/quicpool.go); at most an eighth of the
// limit is held back, and for at most defaultStreamCreditDelay.
type streamCredit struct {
	batch int
	mu    sync.Mutex
	held  []*quic.Stream
	timer *time.Timer // set while held is not empty
	done  bool        // the connection ended: nothing is held any more
}

func newStreamCredit(maxStreams int64) *streamCredit {
	return &streamCredit{batch: int(max(1, maxStreams/8))}
}

// ended holds the credit of str, whose serving ended, for the next batch.
func (c *streamCredit) ended(str *quic.Stream) {
	c.mu.Lock()
	if c.done {
		c.mu.Unlock()
		str.ReleaseStreamCredit()
		return
	}
	c.held = append(c.held, str)
	var now []*quic.Stream
	if len(c.held) >= c.batch {
		now, c.held = c.held, nil
		if c.timer != nil {
			c.timer.Stop()
			c.timer = nil
		}
	} else if c.timer == nil {
		d := time.Duration(streamCreditDelay.Load())
		if d == 0 {
			d = defaultStreamCreditDelay
		}
		c.timer = time.AfterFunc(d, c.flush)
	}
	c.mu.Unlock()
	release(now)
}

// flush returns the credit held now.
func (c *streamCredit) flush() {
	c.mu.Lock()
	now := c.held
	c.held, c.timer = nil, nil
	c.mu.Unlock()
	release(now)
}

// stop returns what is held and holds nothing from now on: the connection ended.
func (c *streamCredit) stop() {
	c.mu.Lock()
	c.done = true
	if c.timer != nil {
		c.timer.Stop()
		c.timer = nil
	}
	now := c.held
	c.held = nil
	c.mu.Unlock()
	release(now)
}

func release(streams []*quic.Stream) {
	for _, str := range streams {
		str.ReleaseStreamCredit()
	}
}
