//go:build windows

package fileperm

import (
	"fmt"
	"os"

	"golang.org/x/sys/windows"
)

// Chmod sets f's read-only attribute from perm (as os.Chmod does on Windows)
// and, when perm grants nothing to group and others, replaces f's ACL with one
// that grants access only to the current user, SYSTEM and Administrators. Call
// it before writing anything secret into f.
func Chmod(f *os.File, perm os.FileMode) error {
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if perm&0o077 != 0 {
		return nil // readable by others: the ACL inherited from the directory is right
	}
	return restrict(f.Name(), false)
}

// PrivateDir creates dir if it does not exist and gives it an ACL that grants
// access only to the current user, SYSTEM and Administrators, inherited by every
// file and directory in it (existing ones included) and by those created later.
func PrivateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	return restrict(dir, true)
}

// restrict replaces path's DACL with a protected one (nothing inherited from
// the parent) for the current user, SYSTEM and Administrators; inherit makes the
// entries apply to the directory's files and subdirectories too.
func restrict(path string, inherit bool) error {
	u, err := windows.GetCurrentProcessToken().GetTokenUser()
	if err != nil {
		return fmt.Errorf("find the current user to protect %s: %w", path, err)
	}
	flags := ""
	if inherit {
		flags = "OICI" // object inherit, container inherit
	}
	// D:P — a protected DACL; FA — full access; SY — SYSTEM; BA — Administrators.
	sddl := fmt.Sprintf("D:P(A;%[1]s;FA;;;%[2]s)(A;%[1]s;FA;;;SY)(A;%[1]s;FA;;;BA)", flags, u.User.Sid.String())
	sd, err := windows.SecurityDescriptorFromString(sddl)
	if err != nil {
		return fmt.Errorf("build the access list for %s: %w", path, err)
	}
	dacl, _, err := sd.DACL()
	if err != nil {
		return fmt.Errorf("build the access list for %s: %w", path, err)
	}
	err = windows.SetNamedSecurityInfo(path, windows.SE_FILE_OBJECT,
		windows.DACL_SECURITY_INFORMATION|windows.PROTECTED_DACL_SECURITY_INFORMATION, nil, nil, dacl, nil)
	if err != nil {
		return fmt.Errorf("%s could not be restricted to your user (%w); keep TP_HOME on an NTFS volume you own", path, err)
	}
	return nil
}
