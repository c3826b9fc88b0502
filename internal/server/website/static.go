package website

import (
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path"
	"strings"
)

// newStatic serves the directory root: files only, through os.Root so that no
// path or symlink leads outside it; no directory listings (a directory without
// index.html is 404) and no dotfiles (except .well-known).
func newStatic(root string) (http.Handler, error) {
	r, err := os.OpenRoot(root)
	if err != nil {
		return nil, fmt.Errorf("open root directory: %w", err)
	}
	fsys := staticFS{r.FS()}
	files := http.FileServerFS(fsys)
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method != http.MethodGet && req.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "405 method not allowed: this site serves static files", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("X-Content-Type-Options", "nosniff")
		files.ServeHTTP(w, req)
	}), nil
}

// staticFS hides what a static site must not show.
type staticFS struct{ fs.FS }

func (s staticFS) Open(name string) (fs.File, error) {
	for _, elem := range strings.Split(name, "/") {
		if strings.HasPrefix(elem, ".") && elem != "." && elem != ".well-known" {
			return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
		}
	}
	f, err := s.FS.Open(name)
	if err != nil {
		// A symlink out of the root ("path escapes from parent") and other
		// failures look like absence from outside, not like a server error.
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if fi.IsDir() {
		// FileServer serves index.html from a directory and lists it otherwise:
		// a directory without index.html does not exist as far as the web knows.
		idx, err := s.FS.Open(path.Join(name, "index.html"))
		if err != nil {
			f.Close()
			if errors.Is(err, fs.ErrNotExist) {
				return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
			}
			return nil, err
		}
		idx.Close()
	}
	return f, nil
}
