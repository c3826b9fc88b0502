package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// tpd answers a command line that does not fit as tp does: a missing argument
// by its name, with the usage and an example, and a misspelled flag with the
// flags it probably meant. Before, tpd enroll said "accepts 1 arg(s),
// received 0" and tpd serve --data-dri said only "unknown flag: --data-dri".
func TestCommandLineMistakes(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"enroll", "--device", "laptop"},
			"tpd enroll needs USER (got none): tpd enroll USER --device NAME, e.g. tpd enroll alice --device laptop --groups ops"},
		{[]string{"enroll", "alice", "bob", "--device", "laptop"},
			`tpd enroll takes only USER (got "bob" after it)`},
		// Bad input: a yes-or-no flag given another word, and a flag without
		// its value. tpd once said `invalid argument "maybe" for "--json"
		// flag: strconv.ParseBool: parsing "maybe": invalid syntax`.
		{[]string{"status", "--json=maybe"},
			`--json takes true or false, not "maybe" (tpd status --help lists its flags)`},
		{[]string{"serve", "--listen"},
			"--listen needs a value: TCP address of the public port, host:port (env TP_LISTEN) (tpd serve --help lists its flags)"},
		{[]string{"serve", "--data-dri", "/tmp/x"},
			"unknown flag --data-dri for tpd serve: did you mean --data-dir? (tpd serve --help lists its flags)"},
		{[]string{"enroll", "alice", "--devcie", "laptop"},
			"unknown flag --devcie for tpd enroll: did you mean --device? (tpd enroll --help lists its flags)"},
	} {
		err := run(context.Background(), tt.args, new(bytes.Buffer), new(bytes.Buffer))
		if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
			t.Errorf("tpd %s:\n  %v\nwant it to start\n  %s", strings.Join(tt.args, " "), err, tt.want)
		}
	}
}
