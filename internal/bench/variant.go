package bench

import "fmt"

// variant is one thing measured in a scenario; fn returns one value per row.
type variant struct {
	rows []*Row
	fn   func() ([]float64, error)
}

// interleave runs every variant once per run, runs times, so that slow drifts of
// the machine (other load, caches, frequency) hit all variants alike and per-run
// ratios compare like with like. A failing variant is marked and skipped; once
// the bench's tpd has exited, every variant left is marked failed instead of
// run (each would wait out tp's timeout against a server that is gone).
func (e *Env) interleave(runs int, vs []*variant) {
	log := e.log
	for i := range runs {
		for _, v := range vs {
			if v.rows[0].Err != "" {
				continue
			}
			if err := e.tpdExited(); err != nil {
				for _, r := range v.rows {
					r.Err, r.Runs = firstLine(err.Error()), nil
				}
				continue
			}
			vals, err := v.fn()
			if err == nil && len(vals) != len(v.rows) {
				err = fmt.Errorf("internal: %d values for %d rows", len(vals), len(v.rows))
			}
			if err != nil {
				log("%s: %v", v.rows[0].Variant, err)
				for _, r := range v.rows {
					r.Err, r.Runs = firstLine(err.Error()), nil
				}
				continue
			}
			for j, r := range v.rows {
				r.Runs = append(r.Runs, vals[j])
			}
			log("  run %d %-44s %s %s", i+1, v.rows[0].Variant, fmtNum(vals[0]), v.rows[0].Unit)
		}
	}
}

// ratioRow compares two rows run by run (same run index), e.g. TP ÷ relay.
func ratioRow(scenario, name string, num, den *Row, target string) Row {
	r := Row{Scenario: scenario, Variant: name, Transport: num.Transport, Unit: "×", Target: target}
	if num.Err != "" || den.Err != "" {
		r.Err = "a compared variant failed"
		return r
	}
	for i := range min(len(num.Runs), len(den.Runs)) {
		if den.Runs[i] != 0 {
			r.Runs = append(r.Runs, num.Runs[i]/den.Runs[i])
		}
	}
	return r
}

func collect(vs []*variant) []Row {
	var out []Row
	for _, v := range vs {
		for _, r := range v.rows {
			out = append(out, *r)
		}
	}
	return out
}
