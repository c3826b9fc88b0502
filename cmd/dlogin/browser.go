package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// browserOpener finds how to open a page in the person's browser on this
// machine, and says why there is none: $BROWSER (a command, given the page as
// its last argument) when set; none in an ssh session (the browser is on
// another machine, which cannot reach this one's loopback), nor on a Unix
// desktop-less session; else the platform's opener (open, rundll32,
// xdg-open).
func browserOpener(getenv func(string) string, goos string, lookPath func(string) (string, error)) (open func(page string) error, why string) {
	run := func(terminal bool, name string, args ...string) func(string) error {
		return func(page string) error {
			cmd := exec.Command(name, append(args, page)...)
			if terminal { // a text browser ($BROWSER=w3m) runs in this terminal
				cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
			}
			if err := cmd.Start(); err != nil {
				return err
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }() // a browser may run on after dlogin
			// An opener that fails says so at once (xdg-open without a
			// browser to hand the page to); one that is still running after
			// openerWait has shown the page, or is the browser itself.
			t := time.NewTimer(openerWait)
			defer t.Stop()
			select {
			case err := <-exited:
				if err != nil {
					return fmt.Errorf("%s: %w", name, err)
				}
			case <-t.C:
			}
			return nil
		}
	}
	if b := strings.Fields(getenv("BROWSER")); len(b) > 0 {
		return run(true, b[0], b[1:]...), ""
	}
	if getenv("SSH_CONNECTION") != "" || getenv("SSH_TTY") != "" {
		return nil, "this is an ssh session"
	}
	switch goos {
	case "darwin":
		return run(false, "open"), ""
	case "windows":
		return run(false, "rundll32", "url.dll,FileProtocolHandler"), ""
	}
	if getenv("DISPLAY") == "" && getenv("WAYLAND_DISPLAY") == "" {
		return nil, "there is no graphical session (DISPLAY)"
	}
	xdgOpen, err := lookPath("xdg-open")
	if err != nil {
		return nil, "xdg-open is not installed"
	}
	return run(false, xdgOpen), ""
}

// openerWait is how long opening the page waits to see the opener fail.
var openerWait = 3 * time.Second

// errNoOpener is a browser sign-in asked for where none can open.
var errNoOpener = errors.New("no browser")
