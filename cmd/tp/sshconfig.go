package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tp-proxy/tp/internal/lib/atomicfile"
)

// The lines that mark the block tp ssh-config --write owns in ~/.ssh/config.
const (
	sshBlockBegin = "# >>> tp ssh-config: written by `tp ssh-config --write`, which replaces this block"
	sshBlockEnd   = "# <<< tp ssh-config"
)

func sshConfigCmd(stdout, stderr io.Writer) *cobra.Command {
	var write bool
	var file, zone string
	cmd := &cobra.Command{
		Use:   "ssh-config [PATTERN...]",
		Short: "Print (or, with --write, add to ~/.ssh/config) a Host block that sends ssh through tp",
		Long: "tp ssh-config prints an OpenSSH Host block for the names under TP's reverse zone\n" +
			"(tp expose) and the host patterns you name, with ProxyCommand set to this tp\n" +
			"by its absolute path. With --write it puts the block into ~/.ssh/config between\n" +
			"two marker lines, replacing the block an earlier --write left, so running it\n" +
			"again changes nothing else in the file.",
		Example: "  tp ssh-config '*.internal' db1.example.org\n" +
			"  tp ssh-config --write '*.internal'\n" +
			"  ssh alice@laptop-ssh.rev.tp.internal",
		Args: cobra.ArbitraryArgs, // host patterns, none or many
		RunE: func(cmd *cobra.Command, patterns []string) error {
			exe, err := os.Executable()
			if err != nil {
				return fmt.Errorf("finding this tp's path for ProxyCommand: %w", err)
			}
			if p, err := filepath.EvalSymlinks(exe); err == nil {
				exe = p
			}
			if strings.Contains(exe, string(filepath.Separator)+"go-build") {
				fmt.Fprintf(stderr, "Note: this tp runs from go run's temporary build (%s), which goes away; install tp (go install ./cmd/tp) and run tp ssh-config from there.\n", exe)
			}
			block, err := sshBlock(exe, zone, patterns)
			if err != nil {
				return err
			}
			if !write {
				_, err := io.WriteString(stdout, block)
				return err
			}
			if file == "" {
				home, err := os.UserHomeDir()
				if err != nil {
					return fmt.Errorf("finding ~/.ssh/config: %w (name the file with --file)", err)
				}
				file = filepath.Join(home, ".ssh", "config")
			}
			changed, err := writeSSHBlock(file, block)
			if err != nil {
				return err
			}
			if changed {
				fmt.Fprintf(stderr, "Wrote the tp block to %s\n", file)
			} else {
				fmt.Fprintf(stderr, "%s already holds this tp block; nothing changed\n", file)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&write, "write", false, "put the block into the ssh config file (replacing an earlier one) instead of printing it")
	cmd.Flags().StringVar(&file, "file", "", "ssh config file for --write (default ~/.ssh/config)")
	cmd.Flags().StringVar(&zone, "zone", "rev.tp.internal", "the TP server's reverse-zone (tpd.yaml); empty leaves it out")
	return cmd
}

// sshBlock renders the marked Host block.
func sshBlock(exe, zone string, patterns []string) (string, error) {
	var hosts []string
	if zone = strings.Trim(zone, "."); zone != "" {
		hosts = append(hosts, "*."+zone)
	}
	for _, p := range patterns {
		if p == "" || strings.ContainsAny(p, " \t\n\"'#") {
			return "", fmt.Errorf("host pattern %q must be one word without quotes or #, e.g. '*.internal' or db1.example.org", p)
		}
		hosts = append(hosts, p)
	}
	if len(hosts) == 0 {
		return "", errors.New("no hosts: name host patterns, e.g. tp ssh-config '*.internal', or keep --zone")
	}
	if strings.ContainsAny(exe, "\"\n") {
		return "", fmt.Errorf("this tp's path %q holds a quote or a newline, which ssh's ProxyCommand cannot carry", exe)
	}
	if strings.ContainsAny(exe, " \t") {
		exe = `"` + exe + `"`
	}
	return fmt.Sprintf("%s\nHost %s\n    ProxyCommand %s %%h %%p\n%s\n", sshBlockBegin, strings.Join(hosts, " "), exe, sshBlockEnd), nil
}

// writeSSHBlock replaces the marked block in file, or appends it, and reports
// whether the file changed. A missing file (and ~/.ssh) is created private.
func writeSSHBlock(file, block string) (bool, error) {
	if p, err := filepath.EvalSymlinks(file); err == nil {
		file = p // a dotfiles symlink stays a symlink
	}
	old, err := os.ReadFile(file)
	perm := fs.FileMode(0o600)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
			return false, fmt.Errorf("creating %s: %w", filepath.Dir(file), err)
		}
	case err != nil:
		return false, fmt.Errorf("reading %s: %w", file, err)
	default:
		if fi, err := os.Stat(file); err == nil {
			perm = fi.Mode().Perm()
		}
	}
	text := string(old)
	var next string
	begin := strings.Index(text, sshBlockBegin+"\n")
	if begin >= 0 {
		end := strings.Index(text[begin:], sshBlockEnd+"\n")
		if end < 0 {
			return false, fmt.Errorf("%s has the line %q but not %q after it: fix the file by hand (remove the partial block)", file, sshBlockBegin, sshBlockEnd)
		}
		next = text[:begin] + block + text[begin+end+len(sshBlockEnd)+1:]
	} else {
		next = text
		if next != "" && !strings.HasSuffix(next, "\n") {
			next += "\n"
		}
		if next != "" {
			next += "\n"
		}
		next += block
	}
	if next == text {
		return false, nil
	}
	if err := atomicfile.Write(file, []byte(next), perm); err != nil {
		return false, fmt.Errorf("writing %s: %w", file, err)
	}
	return true, nil
}
