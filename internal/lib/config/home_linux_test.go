//go:build linux

package config

import (
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// On Linux the default $TP_HOME stays where existing users have their keys:
// $XDG_CONFIG_HOME/tp, else ~/.config/tp. Bad input: no HOME and no
// XDG_CONFIG_HOME at all, which must ask for TP_HOME rather than guess.
func TestDefaultClientHomeOnLinux(t *testing.T) {
	load := func() (Client, error) {
		fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
		ClientFlags(fs)
		return LoadClient(fs)
	}
	t.Setenv("TP_HOME", "")
	for _, tc := range []struct{ xdg, home, want string }{
		{xdg: "/xdg", home: "/home/alice", want: "/xdg/tp"},
		{xdg: "", home: "/home/alice", want: "/home/alice/.config/tp"},
	} {
		t.Setenv("XDG_CONFIG_HOME", tc.xdg)
		t.Setenv("HOME", tc.home)
		c, err := load()
		if err != nil {
			t.Fatal(err)
		}
		if c.Home != tc.want {
			t.Errorf("XDG_CONFIG_HOME=%q HOME=%q: home %q, want %q", tc.xdg, tc.home, c.Home, tc.want)
		}
	}
	t.Setenv("XDG_CONFIG_HOME", "")
	t.Setenv("HOME", "")
	if _, err := load(); err == nil || !strings.Contains(err.Error(), "set TP_HOME") {
		t.Errorf("no HOME and no XDG_CONFIG_HOME: %v, want an error asking for TP_HOME", err)
	}
}
