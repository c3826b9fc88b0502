package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
)

// Row is one line of the result table: a variant of a scenario measured Runs times.
type Row struct {
	Scenario  string    `json:"scenario"`
	Variant   string    `json:"variant"`
	Transport string    `json:"transport"` // tcp, tls, quic, ssh or "-" (in-process)
	Unit      string    `json:"unit"`
	Runs      []float64 `json:"runs"`
	Median    float64   `json:"median"`
	Min       float64   `json:"min"`
	Max       float64   `json:"max"`
	// Baseline names the variant of the same scenario this row is compared with;
	// Ratio is Median / the baseline's Median (0 when there is none).
	Baseline string  `json:"baseline,omitempty"`
	Ratio    float64 `json:"ratio,omitempty"`
	Target   string  `json:"target,omitempty"` // the target, for the reader
	Note     string  `json:"note,omitempty"`
	Err      string  `json:"error,omitempty"`
}

// Report is what --json writes.
type Report struct {
	Date    string `json:"date"`
	Machine string `json:"machine"`
	Command string `json:"command"`
	Quick   bool   `json:"quick"`
	// Peers says, per peer binary, the path and version measured or why it was not.
	Peers map[string]string `json:"peers,omitempty"`
	Rows  []Row             `json:"rows"`
}

func (r *Row) summarise() {
	if len(r.Runs) == 0 {
		return
	}
	s := slices.Clone(r.Runs)
	slices.Sort(s)
	r.Min, r.Max = s[0], s[len(s)-1]
	r.Median = median(s)
}

// median of sorted values.
func median(s []float64) float64 {
	n := len(s)
	if n == 0 {
		return math.NaN()
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// percentile of sorted values, nearest rank.
func percentile(s []float64, p float64) float64 {
	if len(s) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// fillRatios computes every row's ratio to its baseline row.
func fillRatios(rows []Row) {
	for i := range rows {
		r := &rows[i]
		if r.Baseline == "" || r.Err != "" {
			continue
		}
		for _, b := range rows {
			if b.Scenario == r.Scenario && b.Variant == r.Baseline && b.Err == "" && b.Median != 0 {
				r.Ratio = r.Median / b.Median
			}
		}
	}
}

func fmtNum(v float64) string {
	a := math.Abs(v)
	switch {
	case math.IsNaN(v):
		return "—"
	case a >= 10000:
		return thousands(int64(math.Round(v)))
	case v == math.Trunc(v): // counts
		return fmt.Sprintf("%.0f", v)
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

func thousands(n int64) string {
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 && c != '-' {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func cells(r Row) []string {
	med, rng, ratio := fmtNum(r.Median), fmtNum(r.Min)+"–"+fmtNum(r.Max), "—"
	if r.Err != "" {
		med, rng = "error", r.Err
		switch {
		case strings.HasPrefix(r.Err, "skipped"):
			med = "skipped"
		case strings.HasPrefix(r.Err, "not given"):
			med = "not given"
		}
	}
	if r.Ratio != 0 {
		ratio = fmt.Sprintf("%.2f×", r.Ratio)
	}
	base := r.Baseline
	if base == "" {
		base = "—"
	}
	target := r.Target
	if target == "" {
		target = "—"
	}
	note := r.Note
	if note == "" {
		note = "—"
	}
	return []string{r.Scenario, r.Variant, r.Transport, med, rng, r.Unit, ratio, base, target, note}
}

// The note column carries what a row's figure alone does not say (how many
// handshakes resumed, how a batch was counted, the peer's version).
var header = []string{"scenario", "variant", "transport", "median", "min–max", "unit", "ratio", "baseline", "target", "note"}

// WriteTable prints rows as an aligned text table, or as Markdown.
func WriteTable(w io.Writer, rows []Row, markdown bool) error {
	if markdown {
		fmt.Fprintf(w, "| %s |\n", strings.Join(header, " | "))
		fmt.Fprintf(w, "|%s\n", strings.Repeat("---|", len(header)))
		for _, r := range rows {
			c := cells(r)
			for i := range c {
				c[i] = strings.ReplaceAll(c[i], "|", "\\|")
			}
			fmt.Fprintf(w, "| %s |\n", strings.Join(c, " | "))
		}
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.ToUpper(strings.Join(header, "\t")))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(cells(r), "\t"))
	}
	return tw.Flush()
}

func writeJSON(path string, rep Report) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
