package main

import (
	"errors"
	"os/exec"
	"strings"
)

// browserOpener finds how to open a page in the person's browser on this
// machine, and says why there is none: $BROWSER (a command, given the page as
// its last argument) when set; none in an ssh session (the browser is on
// another machine, which cannot reach this one's loopback), nor on a Unix
// desktop-less session; else the platform's opener (open, rundll32,
// xdg-open).
func browserOpener(getenv func(string) string, goos string, lookPath func(string) (string, error)) (open func(page string) error, why string) {
	run := func(name string, args ...string) func(string) error {
		return func(page string) error {
			cmd := exec.Command(name, append(args, page)...)
			if err := cmd.Start(); err != nil {
				return err
			}
			go func() { _ = cmd.Wait() }() // a browser may run on after dlogin
			return nil
		}
	}
	if b := strings.Fields(getenv("BROWSER")); len(b) > 0 {
		return run(b[0], b[1:]...), ""
	}
	if getenv("SSH_CONNECTION") != "" || getenv("SSH_TTY") != "" {
		return nil, "this is an ssh session"
	}
	switch goos {
	case "darwin":
		return run("open"), ""
	case "windows":
		return run("rundll32", "url.dll,FileProtocolHandler"), ""
	}
	if getenv("DISPLAY") == "" && getenv("WAYLAND_DISPLAY") == "" {
		return nil, "there is no graphical session (DISPLAY)"
	}
	if _, err := lookPath("xdg-open"); err != nil {
		return nil, "xdg-open is not installed"
	}
	return run("xdg-open"), ""
}

// errNoOpener is a browser sign-in asked for where none can open.
var errNoOpener = errors.New("no browser")
