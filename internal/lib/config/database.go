package config

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strings"
)

// DatabasePasswordEnv is the environment variable that may hold the database
// password (database-password-file is the other way).
const DatabasePasswordEnv = "TP_DATABASE_PASSWORD"

var keywordPassword = regexp.MustCompile(`(^|\s)password\s*=`)

// CheckDatabaseDSN accepts a PostgreSQL DSN (postgres://USER@HOST:PORT/DB?… or
// "host=… user=… dbname=…") that carries no password: a DSN is written in
// config files and on command lines, which others can read (ps, shell
// history, backups), so the password comes from a file or the environment.
func CheckDatabaseDSN(dsn string) error {
	if strings.TrimSpace(dsn) == "" {
		return errors.New("the database DSN is empty")
	}
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			var ue *url.Error
			if errors.As(err, &ue) {
				err = ue.Err // url.Error repeats the URL, password included
			}
			return fmt.Errorf("the database DSN is not a valid URL (postgres://USER@HOST:PORT/DATABASE): %v", err)
		}
		if _, ok := u.User.Password(); ok || u.Query().Has("password") {
			return errors.New("the database DSN contains a password, which anyone who can read the config file or the command line (ps) would see; remove it from the DSN and put it in database-password-file (a file only tpd reads) or the " + DatabasePasswordEnv + " environment variable")
		}
		if u.Host == "" || strings.Trim(u.Path, "/") == "" {
			return errors.New("the database DSN must name a host and a database: postgres://USER@HOST:PORT/DATABASE")
		}
		return nil
	}
	if keywordPassword.MatchString(dsn) {
		return errors.New("the database DSN contains password=…, which anyone who can read the config file or the command line (ps) would see; remove it and put it in database-password-file (a file only tpd reads) or the " + DatabasePasswordEnv + " environment variable")
	}
	if !strings.Contains(dsn, "=") {
		return errors.New("the database DSN must be a URL, postgres://USER@HOST:PORT/DATABASE, or key=value pairs such as \"host=db user=tp dbname=tp\"")
	}
	return nil
}

// validateDatabase checks the database keys; nothing when database is empty.
func (s Server) validateDatabase() []error {
	if s.Database == "" {
		if s.DatabasePasswordFile != "" {
			return []error{errors.New("database-password-file is set but database is empty; set database: postgres://USER@HOST/DB, or remove database-password-file")}
		}
		return nil
	}
	var errs []error
	if err := CheckDatabaseDSN(s.Database); err != nil {
		errs = append(errs, fmt.Errorf("database: %w", err))
	}
	if s.DatabasePasswordFile != "" && s.DatabasePassword != "" {
		errs = append(errs, fmt.Errorf("both database-password-file and %s are set; keep one", DatabasePasswordEnv))
	}
	return errs
}

// DatabasePasswordValue reads the database password: the file's first line
// when database-password-file is set, else TP_DATABASE_PASSWORD, else "" (the
// server may trust the connection, or PostgreSQL's own ~/.pgpass applies).
func (s Server) DatabasePasswordValue() (string, error) {
	if s.DatabasePasswordFile == "" {
		return s.DatabasePassword, nil
	}
	b, err := os.ReadFile(s.DatabasePasswordFile)
	if err != nil {
		return "", fmt.Errorf("database-password-file: %w", err)
	}
	pw, _, _ := strings.Cut(string(b), "\n")
	pw = strings.TrimRight(pw, "\r")
	if pw == "" {
		return "", fmt.Errorf("database-password-file %s is empty; its first line is the password", s.DatabasePasswordFile)
	}
	return pw, nil
}
