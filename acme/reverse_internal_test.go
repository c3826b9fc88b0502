package acme

import (
	"fmt"
	"strings"
	"testing"
)

// One name's owner cannot fill the challenge-answer store for everyone (bad input:
// the same signed answer replayed, then many distinct answers for one name).
func TestTXTStoreBoundedPerName(t *testing.T) {
	s := newTXTStore()
	for range 100 {
		if err := s.publish("_acme-challenge.a.rev.test", "same"); err != nil {
			t.Fatalf("replayed answer: %v", err)
		}
	}
	if got := s.lookup("_acme-challenge.a.rev.test"); len(got) != 1 {
		t.Fatalf("a replayed answer was stored %d times", len(got))
	}
	var err error
	for i := 0; i < 100 && err == nil; i++ {
		err = s.publish("_acme-challenge.a.rev.test", fmt.Sprint(i))
	}
	if err == nil || !strings.Contains(err.Error(), "a.rev.test") {
		t.Fatalf("one name filled the store without limit: %v", err)
	}
	if err := s.publish("_acme-challenge.b.rev.test", "x"); err != nil {
		t.Fatalf("another name is blocked: %v", err)
	}
}
