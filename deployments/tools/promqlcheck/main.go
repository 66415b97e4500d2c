// Command promqlcheck parses every PromQL expression in a Prometheus rules
// file and a Grafana dashboard with Prometheus's own parser, so a typo
// fails `make deploy-check` instead of an alert never firing. It is its own
// module (outside go.work) so the services do not inherit Prometheus's
// dependencies; run it with GOWORK=off.
//
//	promqlcheck RULES.yaml DASHBOARD.json
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/yaml"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "promqlcheck:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: promqlcheck RULES.yaml DASHBOARD.json")
	}
	var exprs []string
	var rules struct {
		Groups []struct {
			Rules []struct {
				Expr string `json:"expr"`
			} `json:"rules"`
		} `json:"groups"`
	}
	data, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	if err := yaml.Unmarshal(data, &rules); err != nil {
		return fmt.Errorf("%s: %w", args[0], err)
	}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			exprs = append(exprs, r.Expr)
		}
	}
	var dash struct {
		Panels []struct {
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if data, err = os.ReadFile(args[1]); err != nil {
		return err
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		return fmt.Errorf("%s: %w", args[1], err)
	}
	// Grafana variables become values PromQL accepts.
	vars := strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$bucket", ".*")
	for _, p := range dash.Panels {
		for _, t := range p.Targets {
			exprs = append(exprs, vars.Replace(t.Expr))
		}
	}
	p := parser.NewParser(parser.Options{})
	bad := 0
	for _, e := range exprs {
		if _, err := p.ParseExpr(e); err != nil {
			fmt.Fprintf(os.Stderr, "%q: %v\n", e, err)
			bad++
		}
	}
	if bad > 0 {
		return fmt.Errorf("%d of %d expressions do not parse", bad, len(exprs))
	}
	fmt.Printf("%d PromQL expressions parse\n", len(exprs))
	return nil
}
