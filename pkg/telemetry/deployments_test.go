package telemetry_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"sigs.k8s.io/yaml"

	"github.com/bucketlb/bucketlb/pkg/config"
	"github.com/bucketlb/bucketlb/pkg/telemetry"
)

// The tests in this file check deployments/ against what this package
// emits. TestOverlayManifests also needs a kustomize binary: `make
// deploy-check` passes it in BUCKETLB_KUSTOMIZE; without it that test skips.

func deploymentsDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", "..", "deployments"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("deployments directory: %v", err)
	}
	return dir
}

type rulesFile struct {
	Groups []struct {
		Name     string `json:"name"`
		Interval string `json:"interval"`
		Rules    []struct {
			Record      string            `json:"record"`
			Alert       string            `json:"alert"`
			Expr        string            `json:"expr"`
			For         string            `json:"for"`
			Labels      map[string]string `json:"labels"`
			Annotations map[string]string `json:"annotations"`
		} `json:"rules"`
	} `json:"groups"`
}

func loadRules(t *testing.T) rulesFile {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(deploymentsDir(t), "monitoring", "bucketlb.rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var rf rulesFile
	if err := yaml.UnmarshalStrict(data, &rf); err != nil {
		t.Fatalf("bucketlb.rules.yaml: %v", err)
	}
	return rf
}

type dashboard struct {
	UID    string `json:"uid"`
	Title  string `json:"title"`
	Panels []struct {
		ID      int    `json:"id"`
		Type    string `json:"type"`
		Title   string `json:"title"`
		Targets []struct {
			Expr  string `json:"expr"`
			RefID string `json:"refId"`
		} `json:"targets"`
	} `json:"panels"`
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(deploymentsDir(t), "monitoring", "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	return d
}

// TestDeploymentsRulesAndDashboardParse: the rules file and the dashboard
// parse, and hold the four alerts the design asks for with its thresholds.
func TestDeploymentsRulesAndDashboardParse(t *testing.T) {
	t.Parallel()
	rf := loadRules(t)
	alerts := map[string]string{}
	records := map[string]bool{}
	for _, g := range rf.Groups {
		if g.Name == "" || len(g.Rules) == 0 {
			t.Errorf("rule group %q is unnamed or empty", g.Name)
		}
		for _, r := range g.Rules {
			switch {
			case r.Expr == "":
				t.Errorf("rule %q%q has no expr", r.Alert, r.Record)
			case r.Alert != "" && r.Record != "":
				t.Errorf("rule %q is both alert and record", r.Alert)
			case r.Alert != "":
				alerts[r.Alert] = r.Expr
				if r.Labels["severity"] == "" || r.Annotations["summary"] == "" {
					t.Errorf("alert %s lacks a severity label or a summary", r.Alert)
				}
			case r.Record != "":
				records[r.Record] = true
			}
		}
	}
	// Recording rules an alert uses must exist.
	for name, expr := range alerts {
		for _, rec := range regexp.MustCompile(`bucketlb:[a-z0-9_:]+`).FindAllString(expr, -1) {
			if !records[rec] {
				t.Errorf("alert %s uses %s, which no recording rule defines", name, rec)
			}
		}
	}
	for alert, want := range map[string]string{
		"BucketlbBucketUtilizationHigh": "> 0.9",
		"BucketlbBucketHealthLow":       "< 50",
		"BucketlbEtcdUnreachable":       "bucketlb_etcd_up == 0",
		"BucketlbUploadSuccessRateLow":  "< 0.995",
	} {
		expr, ok := alerts[alert]
		if !ok {
			t.Errorf("no alert %s", alert)
			continue
		}
		if !strings.Contains(expr, want) {
			t.Errorf("alert %s expr %q lacks %q", alert, expr, want)
		}
	}

	d := loadDashboard(t)
	if d.UID == "" || d.Title == "" {
		t.Error("dashboard has no uid or title")
	}
	ids := map[int]bool{}
	var all string
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		if p.Type != "row" && len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			all += tg.Expr + "\n"
		}
	}
	for _, want := range []string{
		"bucketlb_bucket_used_bytes", "bucketlb_bucket_health_score", "bucketlb_allocator_reservations_total",
		"bucketlb_uploads_total", "bucketlb_upload_bytes_total", "histogram_quantile(0.99, sum by (le, rpc_method) (rate(rpc_server_call_duration_seconds_bucket",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("no dashboard query uses %s", want)
		}
	}
}

// TestDeploymentsUseEmittedMetrics records through every instrument and
// the gRPC stats handlers, scrapes /metrics, and fails if the dashboard or
// the rules query a bucketlb_* or rpc_* series that is not emitted: a
// renamed instrument cannot silently blank a panel or an alert.
func TestDeploymentsUseEmittedMetrics(t *testing.T) {
	t.Parallel()
	tel, base := start(t, telemetry.Options{})
	recordAll(t, tel.Metrics())
	if err := invoke(t, serveEcho(t, tel), pingMethod); err != nil {
		t.Fatal(err)
	}
	emitted := map[string]bool{}
	for name, fam := range scrape(t, base) {
		emitted[name] = true
		if fam.GetType() == dto.MetricType_HISTOGRAM {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				emitted[name+s] = true
			}
		}
	}

	var exprs []string
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			exprs = append(exprs, r.Expr)
		}
	}
	for _, p := range loadDashboard(t).Panels {
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	// Metric names only: rpc_method and friends are labels.
	names := regexp.MustCompile(`\b(bucketlb_[a-z0-9_]+|rpc_(?:server|client)_[a-z0-9_]+)\b`)
	used := map[string]bool{}
	for _, e := range exprs {
		for _, n := range names.FindAllString(e, -1) {
			used[n] = true
		}
	}
	if len(used) < 10 {
		t.Fatalf("found only %d metric names in the dashboard and rules: %v", len(used), used)
	}
	for n := range used {
		if !emitted[n] {
			t.Errorf("deployments/monitoring queries %s, which pkg/telemetry does not emit", n)
		}
	}
}

// TestDeploymentConfigLoads: the ConfigMap's bucketlb.yaml passes
// config.Load (strict keys, validation) with the ports the manifests use.
func TestDeploymentConfigLoads(t *testing.T) {
	t.Parallel()
	cfg, err := config.Load(filepath.Join(deploymentsDir(t), "base", "bucketlb.yaml"), func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	checkConfig(t, cfg)
}

// TestDeploymentConfigBucketExample: the commented bucket example in the
// ConfigMap's bucketlb.yaml, uncommented, loads and gives the bucket it
// describes.
func TestDeploymentConfigBucketExample(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile(filepath.Join(deploymentsDir(t), "base", "bucketlb.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	start := strings.Index(text, "\n# buckets:\n")
	end := strings.Index(text, "\nbuckets: []")
	if start < 0 || end < start {
		t.Fatal("bucketlb.yaml has no commented bucket example before buckets: []")
	}
	var example []string
	for _, line := range strings.Split(text[start+1:end], "\n") {
		example = append(example, strings.TrimPrefix(strings.TrimPrefix(line, "#"), " "))
	}
	path := filepath.Join(t.TempDir(), "bucketlb.yaml")
	yaml := text[:start+1] + strings.Join(example, "\n") + text[end+len("\nbuckets: []"):]
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path, func(string) string { return "" })
	if err != nil {
		t.Fatalf("the example does not load: %v", err)
	}
	specs, err := cfg.Specs()
	if err != nil || len(specs) != 1 {
		t.Fatalf("the example gives %d buckets (%v), want 1", len(specs), err)
	}
	s := specs[0]
	if s.GetId() != "r2-primary" || s.GetMonthlyLimitBytes() != 10e9 || s.GetWeight() != 3 || s.GetEndpoint() != "https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com" {
		t.Fatalf("the example gives %v", s)
	}
}

// Where the manifests mount the token Secrets.
const (
	adminTokenDir   = "/var/run/secrets/bucketlb/admin"
	serviceTokenDir = "/var/run/secrets/bucketlb/service"
)

// secretMountPath is where a Deployment's first container mounts the
// Secret whose name starts with secret ("" if it does not).
func secretMountPath(deployment any, secret string) string {
	spec := dig(deployment, "spec", "template", "spec")
	vols, _ := dig(spec, "volumes").([]any)
	for _, v := range vols {
		if !strings.HasPrefix(str(dig(v, "secret", "secretName")), secret) {
			continue
		}
		mounts, _ := dig(spec, "containers", 0, "volumeMounts").([]any)
		for _, m := range mounts {
			if dig(m, "name") == dig(v, "name") {
				return str(dig(m, "mountPath"))
			}
		}
	}
	return ""
}

func checkConfig(t *testing.T, cfg *config.File) {
	t.Helper()
	if cfg.Allocator.Listen != ":7001" || cfg.Upload.Listen != ":7002" {
		t.Errorf("listen addresses %q, %q; the manifests expose :7001 and :7002", cfg.Allocator.Listen, cfg.Upload.Listen)
	}
	if !strings.HasPrefix(cfg.Upload.AllocatorAddr, "dns:///") {
		t.Errorf("upload.allocatorAddr %q does not use the dns resolver (round_robin needs every address)", cfg.Upload.AllocatorAddr)
	}
	if cfg.Allocator.AdminTokenFile != adminTokenDir+"/token" {
		t.Errorf("allocator.adminTokenFile %q is not where the Secret is mounted", cfg.Allocator.AdminTokenFile)
	}
	if cfg.Allocator.ServiceTokenFile != serviceTokenDir+"/token" || cfg.Upload.ServiceTokenFile != serviceTokenDir+"/token" {
		t.Errorf("serviceTokenFile %q (allocator), %q (upload): not where the Secret is mounted", cfg.Allocator.ServiceTokenFile, cfg.Upload.ServiceTokenFile)
	}
	if len(cfg.Allocator.EtcdEndpoints) != 3 {
		t.Errorf("allocator.etcdEndpoints %v, want the three StatefulSet members", cfg.Allocator.EtcdEndpoints)
	}
}

// TestOverlayManifests builds each overlay with kustomize and checks the
// rendered objects against the production rules of DESIGN.md and STYLE.md.
func TestOverlayManifests(t *testing.T) {
	kustomize := os.Getenv("BUCKETLB_KUSTOMIZE")
	if kustomize == "" {
		t.Skip("BUCKETLB_KUSTOMIZE is not set (make deploy-check sets it)")
	}
	for _, overlay := range []string{"dev", "production"} {
		t.Run(overlay, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			out, err := exec.CommandContext(ctx, kustomize, "build", filepath.Join(deploymentsDir(t), "overlays", overlay)).Output()
			if err != nil {
				t.Fatalf("kustomize build %s: %v: %s", overlay, err, stderr(err))
			}
			checkManifests(t, overlay, parseDocs(t, string(out)))
		})
	}
	t.Run("production+hpa-active-streams", func(t *testing.T) {
		// kustomize takes only relative paths to other kustomizations.
		dir := t.TempDir()
		rel := func(target string) string {
			r, err := filepath.Rel(dir, filepath.Join(deploymentsDir(t), target))
			if err != nil {
				t.Fatal(err)
			}
			return r
		}
		k := fmt.Sprintf("resources: [%s]\ncomponents: [%s]\n",
			rel(filepath.Join("overlays", "production")), rel(filepath.Join("components", "hpa-active-streams")))
		if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, kustomize, "build", dir).Output()
		if err != nil {
			t.Fatalf("kustomize build with the component: %v: %s", err, stderr(err))
		}
		for _, o := range parseDocs(t, string(out)) {
			if o["kind"] != "HorizontalPodAutoscaler" {
				continue
			}
			if got := str(dig(o, "spec", "metrics", 1, "pods", "metric", "name")); got != "bucketlb_upload_active_streams" {
				t.Errorf("HPA second metric %q, want bucketlb_upload_active_streams", got)
			}
			return
		}
		t.Error("no HPA rendered")
	})
}

// checkSecretsReadable fails unless the pod's user can read every secret
// volume it mounts. The kubelet writes a secret's files as uid 0, with
// group fsGroup (0 without one) and the volume's defaultMode (0644 when
// unset); the pod's processes run as runAsUser with fsGroup among their
// groups. A 0440 file without fsGroup is root's alone, and the process
// fails at startup reading it.
func checkSecretsReadable(t *testing.T, name string, pod any) {
	t.Helper()
	volumes, _ := dig(pod, "volumes").([]any)
	for _, v := range volumes {
		if dig(v, "secret") == nil {
			continue
		}
		mode := 0o644
		if m, ok := dig(v, "secret", "defaultMode").(float64); ok {
			mode = int(m)
		}
		_, fsGroup := dig(pod, "securityContext", "fsGroup").(float64)
		if mode&0o004 == 0 && (!fsGroup || mode&0o040 == 0) {
			t.Errorf("%s: secret volume %s (mode %#o) is not readable by the pod's user: set the pod's securityContext.fsGroup and a group-readable mode",
				name, str(dig(v, "name")), mode)
		}
	}
}

func stderr(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(ee.Stderr)
	}
	return ""
}

type object = map[string]any

func parseDocs(t *testing.T, s string) []object {
	t.Helper()
	var objs []object
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(s, -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		var o object
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			t.Fatalf("rendered manifest: %v\n%s", err, doc)
		}
		objs = append(objs, o)
	}
	return objs
}

// dig walks maps and, for an int key, lists.
func dig(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func str(v any) string {
	if v == nil {
		return ""
	}
	return fmt.Sprint(v)
}

func checkManifests(t *testing.T, overlay string, objs []object) {
	byKind := map[string]map[string]object{}
	for _, o := range objs {
		kind, name := str(o["kind"]), str(dig(o, "metadata", "name"))
		if byKind[kind] == nil {
			byKind[kind] = map[string]object{}
		}
		byKind[kind][name] = o
		if kind != "Namespace" && str(dig(o, "metadata", "namespace")) != "bucketlb" {
			t.Errorf("%s %s is not in namespace bucketlb", kind, name)
		}
	}

	// Every pod: non-root, read-only root, no privilege escalation, no
	// capabilities, requests and a memory limit.
	workloads := []object{byKind["Deployment"]["allocator"], byKind["Deployment"]["upload"], byKind["StatefulSet"]["etcd"]}
	for i, w := range workloads {
		if w == nil {
			t.Fatalf("workload %d (allocator, upload, etcd) missing", i)
		}
		name := str(dig(w, "metadata", "name"))
		pod := dig(w, "spec", "template", "spec")
		if dig(pod, "securityContext", "runAsNonRoot") != true {
			t.Errorf("%s: pod securityContext.runAsNonRoot is not true", name)
		}
		if dig(pod, "automountServiceAccountToken") != false {
			t.Errorf("%s: service account token is mounted", name)
		}
		checkSecretsReadable(t, name, pod)
		containers, _ := dig(pod, "containers").([]any)
		for _, c := range containers {
			cn := name + "/" + str(dig(c, "name"))
			sc := dig(c, "securityContext")
			if dig(sc, "readOnlyRootFilesystem") != true || dig(sc, "allowPrivilegeEscalation") != false {
				t.Errorf("%s: root filesystem writable or privilege escalation allowed", cn)
			}
			if drop, _ := dig(sc, "capabilities", "drop").([]any); !slices.Contains(drop, any("ALL")) {
				t.Errorf("%s: capabilities not dropped (drop: %v)", cn, drop)
			}
			if dig(c, "resources", "requests", "cpu") == nil || dig(c, "resources", "requests", "memory") == nil || dig(c, "resources", "limits", "memory") == nil {
				t.Errorf("%s: cpu/memory requests or memory limit missing", cn)
			}
			img := str(dig(c, "image"))
			if overlay == "production" && (strings.HasSuffix(img, ":latest") || !strings.Contains(img, ":")) {
				t.Errorf("%s: production image %q is not pinned", cn, img)
			}
		}
	}

	// The two services: config flag, gRPC + metrics ports, native gRPC
	// probes with distinct liveness and readiness service names.
	for name, port := range map[string]float64{"allocator": 7001, "upload": 7002} {
		d := byKind["Deployment"][name]
		c := dig(d, "spec", "template", "spec", "containers", 0)
		if got := fmt.Sprint(dig(c, "args")); got != "[--config /etc/bucketlb/bucketlb.yaml]" {
			t.Errorf("%s args %s", name, got)
		}
		ports := map[string]float64{}
		for _, p := range dig(c, "ports").([]any) {
			ports[str(dig(p, "name"))] = dig(p, "containerPort").(float64)
		}
		if ports["grpc"] != port || ports["metrics"] != 9090 {
			t.Errorf("%s ports %v, want grpc %v and metrics 9090", name, ports, port)
		}
		if str(dig(d, "spec", "template", "metadata", "annotations", "prometheus.io/port")) != "9090" {
			t.Errorf("%s: no prometheus.io/port 9090 annotation", name)
		}
		live, ready := dig(c, "livenessProbe", "grpc"), dig(c, "readinessProbe", "grpc")
		if live == nil || ready == nil {
			t.Errorf("%s: liveness or readiness is not a native gRPC probe", name)
			continue
		}
		if dig(live, "port") != port || dig(ready, "port") != port {
			t.Errorf("%s: probes do not target port %v", name, port)
		}
		if str(dig(live, "service")) == str(dig(ready, "service")) {
			t.Errorf("%s: liveness and readiness use the same health service name %q", name, str(dig(live, "service")))
		}
		svc := byKind["Service"][name]
		if str(dig(svc, "spec", "clusterIP")) != "None" {
			t.Errorf("Service %s is not headless", name)
		}
	}
	if r, _ := dig(byKind["Deployment"]["allocator"], "spec", "replicas").(float64); r < 2 {
		t.Errorf("allocator replicas %v, want >= 2", r)
	}
	for _, name := range []string{"allocator", "upload", "etcd"} {
		pdb := byKind["PodDisruptionBudget"][name]
		if pdb == nil {
			t.Errorf("no PodDisruptionBudget %s", name)
			continue
		}
		if str(dig(pdb, "spec", "unhealthyPodEvictionPolicy")) != "AlwaysAllow" {
			t.Errorf("PDB %s: unhealthyPodEvictionPolicy is not AlwaysAllow", name)
		}
	}
	if got := dig(byKind["PodDisruptionBudget"]["etcd"], "spec", "maxUnavailable"); got != float64(1) {
		t.Errorf("etcd PDB maxUnavailable %v, want 1", got)
	}
	etcd := byKind["StatefulSet"]["etcd"]
	if dig(etcd, "spec", "replicas") != float64(3) {
		t.Errorf("etcd replicas %v, want 3", dig(etcd, "spec", "replicas"))
	}
	args := fmt.Sprint(dig(etcd, "spec", "template", "spec", "containers", 0, "args"))
	for _, flag := range []string{"--auto-compaction-mode=periodic", "--auto-compaction-retention=", "--quota-backend-bytes="} {
		if !strings.Contains(args, flag) {
			t.Errorf("etcd args lack %s", flag)
		}
	}
	if byKind["HorizontalPodAutoscaler"]["upload"] == nil {
		t.Error("no HPA for upload")
	}

	// Only upload pods and operators reach the allocator's gRPC port, and
	// only the allocator and operators etcd's client port, all from
	// bucketlb's own namespace: a pod label is anyone's to set, and
	// neither the allocator's data calls nor etcd ask who calls.
	for _, c := range []struct {
		policy string
		port   float64
		peers  []string
	}{
		{"allocator-ingress", 7001, []string{"map[app:upload]", "map[bucketlb.io/operator:true]"}},
		{"etcd-ingress", 2379, []string{"map[app:allocator]", "map[bucketlb.io/operator:true]"}},
	} {
		np := byKind["NetworkPolicy"][c.policy]
		if np == nil {
			t.Fatalf("no %s NetworkPolicy", c.policy)
		}
		ruleFound := false
		for _, rule := range dig(np, "spec", "ingress").([]any) {
			ports, _ := dig(rule, "ports").([]any)
			for _, p := range ports {
				if dig(p, "port") != c.port {
					continue
				}
				ruleFound = true
				for _, peer := range dig(rule, "from").([]any) {
					labels := fmt.Sprint(dig(peer, "podSelector", "matchLabels"))
					if !slices.Contains(c.peers, labels) || dig(peer, "namespaceSelector") != nil || dig(peer, "ipBlock") != nil {
						t.Errorf("%s: port %v open to %v, want only pods labelled %v in the namespace", c.policy, c.port, peer, c.peers)
					}
				}
			}
		}
		if !ruleFound {
			t.Errorf("%s has no rule for port %v", c.policy, c.port)
		}
	}

	// Secrets: credentials by env, tokens as files where the config
	// looks for them (see checkConfig).
	up := dig(byKind["Deployment"]["upload"], "spec", "template", "spec", "containers", 0)
	if !strings.HasPrefix(str(dig(up, "envFrom", 0, "secretRef", "name")), "bucket-credentials") {
		t.Error("upload does not take bucket-credentials as environment")
	}
	for _, m := range []struct{ deployment, secret, dir string }{
		{"allocator", "bucketlb-admin-token", adminTokenDir},
		{"allocator", "bucketlb-service-token", serviceTokenDir},
		{"upload", "bucketlb-service-token", serviceTokenDir},
	} {
		if got := secretMountPath(byKind["Deployment"][m.deployment], m.secret); got != m.dir {
			t.Errorf("%s mounts the %s Secret at %q, want %q", m.deployment, m.secret, got, m.dir)
		}
	}
	if overlay == "dev" {
		for _, prefix := range []string{"bucket-credentials", "bucketlb-admin-token", "bucketlb-service-token"} {
			found := false
			for name := range byKind["Secret"] {
				found = found || strings.HasPrefix(name, prefix)
			}
			if !found {
				t.Errorf("dev overlay generates no %s Secret", prefix)
			}
		}
	}

	// The generated config is the one the services will load.
	for name, cm := range byKind["ConfigMap"] {
		if !strings.HasPrefix(name, "bucketlb-config") {
			continue
		}
		path := filepath.Join(t.TempDir(), "bucketlb.yaml")
		if err := os.WriteFile(path, []byte(str(dig(cm, "data", "bucketlb.yaml"))), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := config.Load(path, func(string) string { return "" })
		if err != nil {
			t.Fatalf("ConfigMap %s: %v", name, err)
		}
		checkConfig(t, cfg)
	}
}
