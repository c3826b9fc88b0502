package clients_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tp-proxy/tp/acme/login"
	"github.com/tp-proxy/tp/clients"
)

// A device whose renewals sign in again keeps the provider's refresh token
// sealed with its device key: the file on disk does not hold it in clear,
// the home reads it back, and with another device key in its place (the bad
// input: sso.json copied to another machine, or a key replaced by a new
// enrollment) it cannot be opened and is dropped, so the next renewal signs
// in anew rather than failing.
func TestSSOStateSealed(t *testing.T) {
	home := clients.Home{Dir: filepath.Join(t.TempDir(), "home")}
	if err := home.Init(); err != nil {
		t.Fatal(err)
	}
	key, err := clients.NewDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := home.SaveDeviceKey(key); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := home.SSO(); ok || err != nil {
		t.Fatalf("a home with no sign-in kept: %v, %v", ok, err)
	}
	const secret = "refresh-token-of-alice-0123456789"
	info := login.SSOInfo{Issuer: "https://accounts.example.org", ClientID: "tp", Scopes: []string{"openid", "offline_access"}, Renew: login.RenewSignIn, KeepRefresh: true}
	if err := home.SaveSSO(clients.SSOState{SSOInfo: info, RefreshToken: secret}); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(home.Dir, "sso.json"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(raw), secret) {
		t.Fatalf("sso.json holds the refresh token in clear:\n%s", raw)
	}
	if fi, err := os.Stat(filepath.Join(home.Dir, "sso.json")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("sso.json mode %v (%v); want 0600", fi.Mode(), err)
	}
	st, ok, err := home.SSO()
	if err != nil || !ok || st.RefreshToken != secret || st.Issuer != info.Issuer || st.Renew != login.RenewSignIn {
		t.Fatalf("read back %+v, %v, %v", st, ok, err)
	}

	other, err := clients.NewDeviceKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := home.SaveDeviceKey(other); err != nil {
		t.Fatal(err)
	}
	st, ok, err = home.SSO()
	if err != nil || !ok || st.RefreshToken != "" || st.Issuer != info.Issuer {
		t.Fatalf("with another device key: %+v, %v, %v; want the sign-in's place kept and the refresh token dropped", st, ok, err)
	}
}
