package cli

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"
)

// HelpCommand replaces cobra's help command, which answers a topic it does
// not know ("tp help forwrd") with the whole usage and success, by one that
// says which word it does not know and the command it probably meant, and
// fails, as a mistyped command does.
func HelpCommand(root *cobra.Command) {
	root.SetHelpCommand(&cobra.Command{
		Use:   "help [command]",
		Short: "Help about any command",
		Long:  fmt.Sprintf("Help provides help for any command: %s help COMMAND.", root.Name()),
		RunE: func(c *cobra.Command, args []string) error {
			cmd, rest, err := root.Find(args)
			if err == nil && cmd != nil && len(rest) == 0 {
				cmd.InitDefaultHelpFlag()
				return cmd.Help()
			}
			if cmd == nil {
				cmd = root
			}
			word := strings.Join(args, " ")
			if len(rest) > 0 {
				word = rest[0]
			}
			msg := fmt.Sprintf("%s help: %s has no command %q", root.Name(), cmd.CommandPath(), word)
			if cmd.SuggestionsMinimumDistance <= 0 {
				cmd.SuggestionsMinimumDistance = 2 // as cobra does for a mistyped command
			}
			if s := cmd.SuggestionsFor(word); len(s) > 0 {
				msg += fmt.Sprintf(": did you mean \"%s help %s\"?", root.Name(), strings.TrimPrefix(cmd.CommandPath()+" "+s[0], root.Name()+" "))
			}
			return UsageError(fmt.Sprintf("%s (%s --help lists the commands)", msg, cmd.CommandPath()))
		},
	})
}
