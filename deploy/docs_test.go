package deploy

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The README is the way in, not the manual: short, in the order a newcomer
// needs, and every topic on a page of its own in docs/.
func TestReadmeIsShort(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "\n"); n > 400 {
		t.Errorf("README.md has %d lines; keep it to 400 and move the detail to a page in docs/", n)
	}
	order := []string{"## Install", "## Set up", "## A first ssh, on one machine", "## What TP does", "## Tests"}
	at := 0
	for _, h := range order {
		i := strings.Index(string(b), "\n"+h+"\n")
		if i < at {
			t.Errorf("README.md: %q is missing or out of order; a newcomer reads %q", h, order)
		}
		at = i
	}
}

// Every page in docs/ starts with its title and a paragraph saying what it is
// for, and every relative link in the README and docs/ reaches a file and, when
// it names one, a heading there.
func TestDocsLinksAndPages(t *testing.T) {
	pages, err := filepath.Glob("../docs/*.md")
	if err != nil || len(pages) == 0 {
		t.Fatalf("no pages in docs/: %v", err)
	}
	for _, p := range pages {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.SplitN(string(b), "\n", 4)
		if len(lines) < 3 || !strings.HasPrefix(lines[0], "# ") || lines[1] != "" || lines[2] == "" || strings.HasPrefix(lines[2], "#") {
			t.Errorf("%s does not start with a title and a paragraph saying what the page is for", p)
		}
	}
	link := regexp.MustCompile(`\]\(([^)\s]+)\)`)
	for _, p := range append([]string{"../README.md"}, pages...) {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range link.FindAllStringSubmatch(string(b), -1) {
			target := m[1]
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			file, anchor, _ := strings.Cut(target, "#")
			path := p
			if file != "" {
				path = filepath.Join(filepath.Dir(p), file)
			}
			if _, err := os.Stat(path); err != nil {
				t.Errorf("%s links to %s, which does not exist", p, target)
				continue
			}
			if anchor != "" && strings.HasSuffix(path, ".md") && !headingAnchors(t, path)[anchor] {
				t.Errorf("%s links to %s, but %s has no heading with the anchor #%s", p, target, path, anchor)
			}
		}
	}
}

// headingAnchors returns the anchors GitHub gives the headings of a Markdown
// file: lower case, punctuation other than - and _ dropped, spaces to -.
func headingAnchors(t *testing.T, path string) map[string]bool {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	fenced := false
	drop := regexp.MustCompile(`[^\p{L}\p{N}\- _]`)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "```") {
			fenced = !fenced
		}
		if fenced || !strings.HasPrefix(line, "#") {
			continue
		}
		h := strings.TrimSpace(strings.TrimLeft(line, "#"))
		out[strings.ReplaceAll(drop.ReplaceAllString(strings.ToLower(h), ""), " ", "-")] = true
	}
	return out
}

// The repository speaks of the product: a tracker's numbers mean nothing to a
// reader of the docs or the code.
func TestNoTrackerNumbers(t *testing.T) {
	re := regexp.MustCompile(`(?i)\bissues? #?[0-9]+\b|\(#[0-9]+\)`)
	err := filepath.WalkDir("..", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); name == ".git" || name == "testdata" || name == "node_modules" {
				return filepath.SkipDir
			}
			return nil
		}
		switch filepath.Ext(path) {
		case ".go", ".md", ".sh", ".yaml", ".yml", ".rego", ".json":
		default:
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for i, line := range strings.Split(string(b), "\n") {
			if loc := re.FindString(line); loc != "" {
				t.Errorf("%s:%d names a tracker number (%q): say what was built or measured instead", path, i+1, loc)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
