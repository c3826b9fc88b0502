//go:build windows

package config

import (
	"fmt"
	"path/filepath"

	"golang.org/x/sys/windows"
)

// DefaultClientHome is where tp and dlogin keep their state when TP_HOME and
// --home are unset: %LocalAppData%\tp. Local, not roaming (%AppData%): the
// device key identifies this machine and must not follow the user to another
// one through a roaming profile.
func DefaultClientHome() (string, error) {
	dir, err := windows.KnownFolderPath(windows.FOLDERID_LocalAppData, 0)
	if err != nil {
		return "", fmt.Errorf("cannot find the local application data folder (%v); set TP_HOME", err)
	}
	return filepath.Join(dir, "tp"), nil
}
