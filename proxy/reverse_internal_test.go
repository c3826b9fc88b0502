package proxy

import (
	"io"
	"strings"
	"testing"
	"time"
)

// RestartGrace shorter than Grace is raised to Grace: the holds restored after
// a restart stay reserved at least as long as those of an agent that went away.
func TestReverseRestartGraceAtLeastGrace(t *testing.T) {
	t.Parallel()
	if o := (ReverseOptions{Grace: time.Hour, RestartGrace: time.Minute}).withDefaults(); o.RestartGrace != time.Hour {
		t.Fatalf("RestartGrace %s below Grace %s", o.RestartGrace, o.Grace)
	}
}

// closeCount is a request body that counts its Closes.
type closeCount struct {
	io.Reader
	closes int
}

func (c *closeCount) Close() error { c.closes++; return nil }

// A request body held for another attempt is closed when something read it,
// and otherwise only once no attempt follows: a Close asked for before then
// is carried out then, and a Close after then at once.
func TestHeldBodyCloses(t *testing.T) {
	t.Parallel()
	unread := &closeCount{Reader: strings.NewReader("body")}
	b := &heldBody{rc: unread}
	_ = b.Close() // a failed attempt, before any byte went
	if unread.closes != 0 {
		t.Fatal("an unread body was closed while another attempt may send it")
	}
	b.last()
	if unread.closes != 1 {
		t.Fatalf("closes after the last attempt: %d, want the Close asked for before, once", unread.closes)
	}
	_ = b.Close()
	if unread.closes != 1 {
		t.Fatalf("closes: %d, want 1", unread.closes)
	}

	read := &closeCount{Reader: strings.NewReader("body")}
	b = &heldBody{rc: read}
	_, _ = b.Read(make([]byte, 2))
	_ = b.Close()
	if read.closes != 1 {
		t.Fatalf("closes of a body something read: %d, want 1 at once", read.closes)
	}

	late := &closeCount{Reader: strings.NewReader("body")}
	b = &heldBody{rc: late}
	b.last()
	_ = b.Close()
	if late.closes != 1 {
		t.Fatalf("closes of a Close after the last attempt: %d, want 1 at once", late.closes)
	}
}
