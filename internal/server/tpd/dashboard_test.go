package tpd

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// dashboardFile is the Grafana dashboard shipped for tpd's metrics.
const dashboardFile = "../../../deploy/grafana/tp-dashboard.json"

var (
	promString   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	promMatchers = regexp.MustCompile(`\{[^}]*\}`)
	promRange    = regexp.MustCompile(`\[[^\]]*\]`)
	promGrouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promIdent    = regexp.MustCompile(`[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?`)
	promKeywords = []string{"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right", "inf", "nan"}
)

// promMetricNames returns the metric names a PromQL expression selects: every
// identifier outside strings, label matchers, ranges and grouping clauses
// that is not a function or a keyword.
func promMetricNames(expr string) []string {
	e := promString.ReplaceAllString(expr, `""`)
	e = promMatchers.ReplaceAllString(e, " ")
	e = promRange.ReplaceAllString(e, " ")
	e = promGrouping.ReplaceAllString(e, " ")
	var names []string
	for _, m := range promIdent.FindAllStringSubmatch(e, -1) {
		if m[1] != "" || slices.Contains(promKeywords, strings.ToLower(m[0])) {
			continue // a function call, or a keyword
		}
		names = append(names, m[0])
	}
	return names
}

func TestPromMetricNames(t *testing.T) {
	t.Parallel()
	for expr, want := range map[string][]string{
		`sum by (action, outcome) (rate(tp_sessions_total{instance=~"$instance",outcome!="ok"}[$__rate_interval]))`: {"tp_sessions_total"},
		`histogram_quantile(0.99, sum by (le) (rate(tp_policy_decision_duration_seconds_bucket[5m])))`:              {"tp_policy_decision_duration_seconds_bucket"},
		`(tp_ca_root_expiry_timestamp_seconds - time()) / 86400`:                                                    {"tp_ca_root_expiry_timestamp_seconds"},
		`a_total / on (job) b_total`: {"a_total", "b_total"},
		// Bad input: a metric named like a label value or a keyword inside a
		// string is not a metric.
		`tp_x{reason="sum"} or tp_y`: {"tp_x", "tp_y"},
	} {
		if got := promMetricNames(expr); !slices.Equal(got, want) {
			t.Errorf("promMetricNames(%q) = %q, want %q", expr, got, want)
		}
	}
}

// dashboardExprs returns every PromQL expression of the dashboard: the
// panels' targets and the first argument of the variables' label_values.
func dashboardExprs(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(&dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	var exprs []string
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			if strings.TrimSpace(tg.Expr) == "" {
				t.Errorf("panel %q has a target without an expression", p.Title)
			}
			exprs = append(exprs, tg.Expr)
		}
	}
	lv := regexp.MustCompile(`label_values\(\s*([^,)]+)`)
	for _, v := range dash.Templating.List {
		if m := lv.FindStringSubmatch(v.Definition); m != nil {
			exprs = append(exprs, m[1])
		}
	}
	return exprs
}

// The dashboard in deploy/grafana cannot drift from what tpd exports: every
// metric name in its expressions is in a real scrape of a running tpd, and
// every tp_ metric tpd exports is on the dashboard.
func TestDashboardMatchesMetrics(t *testing.T) {
	t.Parallel()
	_, admin := metricsDaemon(t, allowAlice)
	_, body := adminGet(t, admin, "/metrics")
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	exported := func(name string) bool {
		if _, ok := fams[name]; ok {
			return true
		}
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && fams[base] != nil {
				return true
			}
		}
		return false
	}
	exprs := dashboardExprs(t)
	if len(exprs) < 20 {
		t.Fatalf("the dashboard has only %d expressions; is %s the dashboard?", len(exprs), dashboardFile)
	}
	used := map[string]bool{}
	for _, e := range exprs {
		names := promMetricNames(e)
		if len(names) == 0 {
			t.Errorf("expression %q selects no metric", e)
		}
		for _, n := range names {
			used[n] = true
			if !exported(n) {
				t.Errorf("the dashboard uses %s (in %q), which tpd does not export", n, e)
			}
		}
	}
	for name := range fams {
		if !strings.HasPrefix(name, "tp_") {
			continue
		}
		if !used[name] && !used[name+"_bucket"] && !used[name+"_count"] {
			t.Errorf("tpd exports %s but the dashboard does not show it", name)
		}
	}
}
