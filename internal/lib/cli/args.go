package cli

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"
)

// Positional checks that a command got exactly the positional arguments names
// (in order), and when it did not says which are missing or extra by name,
// with the command's usage line and its first example, instead of cobra's
// "accepts 2 arg(s), received 1". No names: the command takes none.
func Positional(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) == len(names) {
			return nil
		}
		return UsageError(ArgsMessage(cmd, names, args))
	}
}

// UsageError is a command line that does not fit the command's usage. Its
// message starts with the command ("tp forward needs …"), so the program prints it
// without the "tp:" prefix.
type UsageError string

func (e UsageError) Error() string { return string(e) }

// ArgsMessage is Positional's message, e.g.
//
//	tp forward needs LOCAL and DEST (got only LOCAL "127.0.0.1:22960"): tp forward [--udp] LOCAL DEST, e.g. tp forward 127.0.0.1:15432 db.internal:5432
func ArgsMessage(cmd *cobra.Command, names, args []string) string {
	var b strings.Builder
	path, usage := called(cmd)
	switch {
	case len(args) < len(names):
		fmt.Fprintf(&b, "%s needs %s (got ", path, and(names))
		if len(args) == 0 {
			b.WriteString("none")
		} else {
			given := make([]string, len(args))
			for i, a := range args {
				given[i] = fmt.Sprintf("%s %q", names[i], a)
			}
			fmt.Fprintf(&b, "only %s", and(given))
		}
		b.WriteString(")")
	case len(names) == 0:
		fmt.Fprintf(&b, "%s takes no arguments (got %s)", path, quoted(args))
	case len(names) == 1:
		fmt.Fprintf(&b, "%s takes only %s (got %s after it)", path, names[0], quoted(args[1:]))
	default:
		fmt.Fprintf(&b, "%s takes only %s (got %s after them)", path, and(names), quoted(args[len(names):]))
	}
	fmt.Fprintf(&b, ": %s", usage)
	if ex := firstExample(cmd); ex != "" {
		fmt.Fprintf(&b, ", e.g. %s", ex)
	}
	return b.String()
}

// called is the command as the user typed it ("tp status" for the alias of
// whoami) and its usage line under that name.
func called(cmd *cobra.Command) (path, usage string) {
	name := cmd.CalledAs()
	if name == "" {
		name = cmd.Name()
	}
	_, rest, _ := strings.Cut(cmd.Use, " ")
	usage = strings.TrimSpace(name + " " + rest)
	path = name
	if cmd.HasParent() {
		path = cmd.Parent().CommandPath() + " " + name
		usage = cmd.Parent().CommandPath() + " " + usage
	}
	return path, usage
}

// firstExample is the first line of cmd's examples without its comment.
func firstExample(cmd *cobra.Command) string {
	line, _, _ := strings.Cut(strings.TrimSpace(cmd.Example), "\n")
	line, _, _ = strings.Cut(line, "  #")
	return strings.TrimSpace(line)
}

// and joins words as a person would: "A", "A and B", "A, B and C".
func and(words []string) string {
	if len(words) < 2 {
		return strings.Join(words, "")
	}
	return strings.Join(words[:len(words)-1], ", ") + " and " + words[len(words)-1]
}

func quoted(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = fmt.Sprintf("%q", a)
	}
	return and(q)
}
