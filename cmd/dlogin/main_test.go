package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// dlogin --help once rendered "--token tpd enroll": pflag takes a backquoted
// word in a usage as the value's name.
func TestHelpShowsFlagTypes(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--help"}, &out, &out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"--token string", "--server string", "--fingerprint string"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("dlogin --help does not show %q:\n%s", want, out.String())
		}
	}
}
