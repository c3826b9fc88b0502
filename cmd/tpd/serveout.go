package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
)

// errReported is returned by a command that already logged its error: main
// then prints nothing more, so that with log-format json every line stays JSON.
var errReported = errors.New("error already reported")

// announcer prints the lines `tpd serve` writes to stdout (the banner, notes):
// as text, or with log-format json as JSON lines from slog, so that every line
// tpd prints parses as JSON.
type announcer struct {
	w    io.Writer
	json *slog.Logger // nil for text
}

func newAnnouncer(stdout io.Writer, format string) announcer {
	if format == "json" {
		return announcer{w: stdout, json: slog.New(slog.NewJSONHandler(stdout, nil))}
	}
	return announcer{w: stdout}
}

// say prints text as a line, or logs msg with attrs (key, value pairs) as JSON.
func (a announcer) say(text, msg string, attrs ...any) {
	if a.json != nil {
		a.json.Info(msg, attrs...)
		return
	}
	fmt.Fprintln(a.w, text)
}
