// Package cli holds what TP's three programs (tp, tpd, dlogin) say about a
// command line that does not fit: positional arguments named in the message
// (Positional, instead of cobra's "accepts 2 arg(s), received 1") and an
// unknown flag answered with the command's flags it probably meant, and a
// flag's bad or missing value with what it takes (FlagError, set with
// cobra.Command.SetFlagErrorFunc), and a mistyped help topic answered with the
// command it probably meant (HelpCommand).
package cli
