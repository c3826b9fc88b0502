package cli

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// FlagError answers a flag pflag does not know with the command's flags it
// probably meant ("unknown flag --upd for tp forward: did you mean --udp?"),
// as cobra does for commands, and points at the command's help. A bad or
// missing value is said with what the flag takes, instead of pflag's words and
// Go's parse error ("strconv.ParseInt: parsing …: invalid syntax"). Other flag
// errors are left as pflag wrote them.
func FlagError(cmd *cobra.Command, err error) error {
	path, _ := called(cmd)
	var ive *pflag.InvalidValueError
	var vre *pflag.ValueRequiredError
	switch {
	case errors.As(err, &ive) && ive.GetFlag() != nil:
		return fmt.Errorf("--%s takes %s, not %q (%s --help lists its flags)", ive.GetFlag().Name, takes(ive.GetFlag()), ive.GetValue(), path)
	case errors.As(err, &vre) && vre.GetFlag() != nil:
		return fmt.Errorf("--%s needs a value: %s (%s --help lists its flags)", vre.GetFlag().Name, takes(vre.GetFlag()), path)
	}
	var ne *pflag.NotExistError
	if !errors.As(err, &ne) {
		return err
	}
	typed := "--" + ne.GetSpecifiedName()
	word := ne.GetSpecifiedName() // what a person meant as a flag's name
	if group := ne.GetSpecifiedShortnames(); group != "" {
		// "-udp" is read as -u -d -p: it was most likely --udp.
		typed = "-" + ne.GetSpecifiedName()
		if group != ne.GetSpecifiedName() {
			typed += " in -" + group
		}
		word = group
	}
	msg := fmt.Sprintf("unknown flag %s for %s", typed, path)
	if s := flagSuggestions(cmd, word); len(s) > 0 {
		for i := range s {
			s[i] = "--" + s[i]
		}
		msg += ": did you mean " + or(s) + "?"
	}
	return fmt.Errorf("%s (%s --help lists its flags)", msg, path)
}

// takes says what a flag's value is: by its type, or by its usage line for
// a string.
func takes(f *pflag.Flag) string {
	switch t := f.Value.Type(); {
	case t == "duration":
		return "a duration with a unit, e.g. 30s, 5m or 1h30m"
	case strings.HasPrefix(t, "int"), strings.HasPrefix(t, "uint"):
		return "a whole number"
	case t == "bool":
		return "true or false"
	case strings.HasPrefix(t, "float"):
		return "a number"
	}
	return f.Usage
}

// flagSuggestions are the names of cmd's flags (its own and those it inherits)
// that typo may have meant: within two edits of it, or starting with it, the
// nearest first, at most three.
func flagSuggestions(cmd *cobra.Command, typo string) []string {
	typo = strings.ToLower(strings.TrimLeft(typo, "-"))
	if typo == "" {
		return nil
	}
	type near struct {
		name string
		d    int
	}
	var found []near
	seen := map[string]bool{}
	visit := func(f *pflag.Flag) {
		if f.Hidden || seen[f.Name] {
			return
		}
		seen[f.Name] = true
		d := levenshtein(typo, strings.ToLower(f.Name))
		switch {
		case d <= 2 && d < len(f.Name):
		case strings.HasPrefix(f.Name, typo) && len(typo) > 1:
		default:
			return
		}
		found = append(found, near{f.Name, d})
	}
	cmd.LocalFlags().VisitAll(visit)
	cmd.InheritedFlags().VisitAll(visit)
	slices.SortStableFunc(found, func(a, b near) int { return a.d - b.d })
	var out []string
	for _, n := range found[:min(len(found), 3)] {
		out = append(out, n.name)
	}
	return out
}

// or joins words as a person would: "A", "A or B", "A, B or C".
func or(words []string) string {
	if len(words) < 2 {
		return strings.Join(words, "")
	}
	return strings.Join(words[:len(words)-1], ", ") + " or " + words[len(words)-1]
}

// levenshtein is the edit distance of a and b (insertions, deletions and
// substitutions of bytes), as cobra measures a typed command's distance.
func levenshtein(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
