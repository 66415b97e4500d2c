package telemetry_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/goleak"

	"github.com/bucketlb/bucketlb/pkg/telemetry"
)

// TestMain fails the package if a test leaves goroutines behind.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// start builds a Telemetry and serves its handler on 127.0.0.1:0. It
// returns the base URL; cleanup stops the server, then the providers.
func start(t *testing.T, opts telemetry.Options) (*telemetry.Telemetry, string) {
	t.Helper()
	if opts.ServiceName == "" {
		opts.ServiceName = "bucketlb-test"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tel, err := telemetry.New(ctx, opts)
	if err != nil {
		t.Fatalf("telemetry.New: %v", err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tel.Serve(sctx, lis) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := tel.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return tel, "http://" + lis.Addr().String()
}

// get fetches url over a fresh connection (no idle connections survive
// the test for goleak to find).
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return resp.StatusCode, b.String()
}

// scrape GETs /metrics in the Prometheus text format and parses it.
func scrape(t *testing.T, base string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := get(t, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: status %d: %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	return fams
}

// find returns the sample of family name whose labels include want, or
// an error listing what the family holds.
func find(fams map[string]*dto.MetricFamily, name string, want map[string]string) (*dto.Metric, error) {
	fam, ok := fams[name]
	if !ok {
		var names []string
		for n := range fams {
			if strings.HasPrefix(n, "bucketlb") || strings.HasPrefix(n, "rpc") {
				names = append(names, n)
			}
		}
		return nil, fmt.Errorf("no metric family %q (bucketlb/rpc families: %v)", name, names)
	}
	var seen []string
next:
	for _, m := range fam.GetMetric() {
		got := map[string]string{}
		for _, l := range m.GetLabel() {
			got[l.GetName()] = l.GetValue()
		}
		seen = append(seen, fmt.Sprint(got))
		for k, v := range want {
			if got[k] != v {
				continue next
			}
		}
		return m, nil
	}
	return nil, fmt.Errorf("%s has no sample with labels %v; samples: %v", name, want, seen)
}

// value is a counter's, gauge's or untyped sample's value.
func value(m *dto.Metric) (float64, error) {
	switch {
	case m.GetCounter() != nil:
		return m.GetCounter().GetValue(), nil
	case m.GetGauge() != nil:
		return m.GetGauge().GetValue(), nil
	case m.GetUntyped() != nil:
		return m.GetUntyped().GetValue(), nil
	}
	return 0, errors.New("sample is not a counter, gauge or untyped")
}

func wantValue(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels map[string]string, want float64) {
	t.Helper()
	m, err := find(fams, name, labels)
	if err != nil {
		t.Error(err)
		return
	}
	got, err := value(m)
	if err != nil {
		t.Errorf("%s%v: %v", name, labels, err)
		return
	}
	if got != want {
		t.Errorf("%s%v = %v, want %v", name, labels, got, want)
	}
}
