package proxy

import (
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
