package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// database: a DSN without a password; each bad case names what is wrong.
func TestDatabaseValidate(t *testing.T) {
	for _, c := range []struct {
		name, dsn, pwFile, pw string
		want                  string // "" accepts
	}{
		{"off", "", "", "", ""},
		{"url", "postgres://tp@db.example:5432/tp?sslmode=verify-full", "", "", ""},
		{"keywords", "host=db.example user=tp dbname=tp", "", "", ""},
		{"env password", "postgres://tp@db.example/tp", "", "s3cret", ""},
		{"password in url", "postgres://tp:s3cret@db.example/tp", "", "", "contains a password"},
		{"password in query", "postgres://tp@db.example/tp?password=s3cret", "", "", "contains a password"},
		{"password keyword", "host=db user=tp password=s3cret dbname=tp", "", "", "contains password="},
		{"no database", "postgres://tp@db.example", "", "", "must name a host and a database"},
		{"not a dsn", "db.example", "", "", "must be a URL"},
		{"file and env", "postgres://tp@db.example/tp", "/etc/tp/pw", "s3cret", "keep one"},
		{"file without database", "", "/etc/tp/pw", "", "database is empty"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := DefaultServer()
			s.Database, s.DatabasePasswordFile, s.DatabasePassword = c.dsn, c.pwFile, c.pw
			err := s.Validate()
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("database %q refused: %v", c.dsn, err)
			case c.want != "" && err == nil:
				t.Fatalf("database %q (password file %q) accepted", c.dsn, c.pwFile)
			case c.want != "" && !strings.Contains(err.Error(), c.want):
				t.Fatalf("error %q does not say %q", err, c.want)
			case err != nil && strings.Contains(err.Error(), "s3cret"):
				t.Fatalf("error %q repeats the password", err)
			}
		})
	}
}

// The password comes from the file or TP_DATABASE_PASSWORD, never from tpd.yaml.
func TestDatabasePasswordSources(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("TP_DATA_DIR", dir)
	t.Setenv("TP_CONFIG", "")
	cfgFile := filepath.Join(dir, FileName)
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(cfgFile, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("database: postgres://tp@db.example/tp\ndatabase-password: s3cret\n")
	if _, err := LoadServer(nil); err == nil || !strings.Contains(err.Error(), "must not be written in the config file") {
		t.Fatalf("database-password in tpd.yaml: %v; want a refusal", err)
	}

	write("database: postgres://tp@db.example/tp\n")
	t.Setenv(DatabasePasswordEnv, "from-env")
	s, err := LoadServer(nil)
	if err != nil {
		t.Fatal(err)
	}
	if pw, err := s.DatabasePasswordValue(); err != nil || pw != "from-env" {
		t.Fatalf("password with %s set: %q, %v", DatabasePasswordEnv, pw, err)
	}

	t.Setenv(DatabasePasswordEnv, "")
	pwFile := filepath.Join(dir, "pw")
	os.WriteFile(pwFile, []byte("from-file\n"), 0o600)
	write("database: postgres://tp@db.example/tp\ndatabase-password-file: " + pwFile + "\n")
	if s, err = LoadServer(nil); err != nil {
		t.Fatal(err)
	}
	if pw, err := s.DatabasePasswordValue(); err != nil || pw != "from-file" {
		t.Fatalf("password from %s: %q, %v", pwFile, pw, err)
	}
	if !strings.Contains(string(ServerYAML(s)), "database: \"postgres://tp@db.example/tp\"") {
		t.Fatalf("tpd init's file lacks the database key:\n%s", ServerYAML(s))
	}
}
