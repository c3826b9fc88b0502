package cli

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

func helpTree() (*cobra.Command, *bytes.Buffer) {
	var out bytes.Buffer
	root := &cobra.Command{Use: "tp HOST PORT", Args: cobra.ArbitraryArgs, SilenceErrors: true, SilenceUsage: true, RunE: func(*cobra.Command, []string) error { return nil }}
	fwd := &cobra.Command{Use: "forward LOCAL DEST", Short: "Forward a port", Run: func(*cobra.Command, []string) {}}
	exp := &cobra.Command{Use: "expose NAME", Short: "Expose a service", Run: func(*cobra.Command, []string) {}}
	exp.AddCommand(&cobra.Command{Use: "public PORT", Short: "Expose publicly", Run: func(*cobra.Command, []string) {}})
	root.AddCommand(fwd, exp)
	root.SuggestionsMinimumDistance = 2
	HelpCommand(root)
	root.SetOut(&out)
	root.SetErr(&out)
	return root, &out
}

// A mistyped help topic is an error that names the word and the command it
// probably meant; cobra printed the root's usage and exited 0.
func TestHelpUnknownTopic(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"help", "forwrd"}, []string{`tp help: tp has no command "forwrd"`, `did you mean "tp help forward"?`, "(tp --help lists the commands)"}},
		{[]string{"help", "expose", "publc"}, []string{`tp help: tp expose has no command "publc"`, `did you mean "tp help expose public"?`, "(tp expose --help lists the commands)"}},
		{[]string{"help", "zzz"}, []string{`tp help: tp has no command "zzz" (tp --help lists the commands)`}},
	} {
		root, out := helpTree()
		root.SetArgs(tc.args)
		err := root.Execute()
		var usage UsageError
		if !errors.As(err, &usage) {
			t.Fatalf("%q: err = %v, want a UsageError", tc.args, err)
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%q: %q lacks %q", tc.args, err, w)
			}
		}
		if out.Len() != 0 {
			t.Errorf("%q: printed the usage as well: %q", tc.args, out)
		}
	}
}

// A known topic still prints that command's help.
func TestHelpKnownTopic(t *testing.T) {
	root, out := helpTree()
	root.SetArgs([]string{"help", "expose", "public"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "Expose publicly") || !strings.Contains(out.String(), "tp expose public PORT") {
		t.Fatalf("help expose public printed %q", out)
	}
}
