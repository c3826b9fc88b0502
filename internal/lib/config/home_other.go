//go:build !windows

package config

import (
	"fmt"
	"os"
	"path/filepath"
)

// DefaultClientHome is where tp and dlogin keep their state when TP_HOME and
// --home are unset: the platform's per-user configuration directory plus "tp",
// that is $XDG_CONFIG_HOME/tp or ~/.config/tp on Linux and the BSDs, and
// ~/Library/Application Support/tp on macOS.
func DefaultClientHome() (string, error) {
	dir, err := os.UserConfigDir()
	if err != nil {
		return "", fmt.Errorf("cannot find a config directory (%v); set TP_HOME", err)
	}
	return filepath.Join(dir, "tp"), nil
}
