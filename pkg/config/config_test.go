package config_test

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/config"
)

func envOf(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestSeedEnvFormat(t *testing.T) {
	env := envOf(map[string]string{
		"R2_BUCKETS":                   "bucket1, bucket2",
		"R2_BUCKET1_NAME":              "media-a",
		"R2_BUCKET1_ACCOUNT_ID":        "acc123",
		"R2_BUCKET1_ACCESS_KEY_ID":     "AKIDSECRETISH",
		"R2_BUCKET1_SECRET_ACCESS_KEY": "super-secret",
		"R2_BUCKET1_PUBLIC_URL":        "https://cdn.example.com",
		"R2_BUCKET1_MONTHLY_LIMIT":     "2.5",
		"R2_BUCKET1_PRIORITY":          "1",
		"R2_BUCKET2_NAME":              "media-b",
		"R2_BUCKET2_ACCOUNT_ID":        "acc456",
		"R2_BUCKET2_PRIORITY":          "2",
	})
	f, err := config.Load("", env)
	if err != nil {
		t.Fatal(err)
	}
	specs, err := f.Specs()
	if err != nil {
		t.Fatal(err)
	}
	if len(specs) != 2 {
		t.Fatalf("got %d buckets, want 2", len(specs))
	}
	b1 := specs[0]
	if b1.Id != "bucket1" || b1.Name != "media-a" || b1.Endpoint != "https://acc123.r2.cloudflarestorage.com" ||
		b1.Region != "auto" || b1.MonthlyLimitBytes != 2_500_000_000 || b1.Priority != 1 ||
		b1.CredentialsRef != "R2_BUCKET1" || b1.PublicUrl != "https://cdn.example.com" ||
		b1.State != adminv1.BucketState_BUCKET_STATE_ACTIVE || b1.Weight != 1 {
		t.Fatalf("bucket1 spec = %v", b1)
	}
	if specs[1].MonthlyLimitBytes != 10_000_000_000 {
		t.Fatalf("default limit = %d, want R2 free tier 10 GB", specs[1].MonthlyLimitBytes)
	}
	// Secrets never become part of a spec.
	for _, s := range specs {
		if strings.Contains(s.String(), "super-secret") || strings.Contains(s.String(), "AKIDSECRETISH") {
			t.Fatalf("spec carries a secret: %v", s)
		}
	}
}

func TestYAMLAndOverrides(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bucketlb.yaml")
	yaml := `
allocator:
  reservationTTL: 45s
  strategy: least-used
upload:
  maxObjectSize: 512MiB
  bufferBudget: 1GiB
buckets:
  - id: local-a
    name: a
    endpoint: http://127.0.0.1:9000
    credentialsRef: LOCAL
    monthlyLimit: 1GB
    pathStyle: true
    state: draining
`
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := config.Load(path, envOf(map[string]string{"BUCKETLB_ETCD_ENDPOINTS": "http://e1:2379,http://e2:2379", "BUCKETLB_CREDENTIALS_DIR": "/keys",
		"BUCKETLB_SERVICE_TOKEN_FILE": "/tok"}))
	if err != nil {
		t.Fatal(err)
	}
	if f.Upload.CredentialsDir != "/keys" || f.Allocator.CredentialsDir != "/keys" {
		t.Fatalf("BUCKETLB_CREDENTIALS_DIR gave upload %q and allocator %q, want both /keys", f.Upload.CredentialsDir, f.Allocator.CredentialsDir)
	}
	if f.Upload.ServiceTokenFile != "/tok" || f.Allocator.ServiceTokenFile != "/tok" {
		t.Fatalf("BUCKETLB_SERVICE_TOKEN_FILE gave upload %q and allocator %q, want both /tok", f.Upload.ServiceTokenFile, f.Allocator.ServiceTokenFile)
	}
	if f.Allocator.ReservationTTL.D() != 45*time.Second || f.Allocator.Strategy != "least-used" {
		t.Fatalf("allocator = %+v", f.Allocator)
	}
	if f.Upload.MaxObjectSize != 512<<20 || f.Upload.BufferBudget != 1<<30 || f.Upload.BufferWait.D() != 10*time.Second {
		t.Fatalf("upload = %+v", f.Upload)
	}
	if len(f.Allocator.EtcdEndpoints) != 2 {
		t.Fatalf("env override of etcd endpoints ignored: %v", f.Allocator.EtcdEndpoints)
	}
	specs, err := f.Specs()
	if err != nil {
		t.Fatal(err)
	}
	if s := specs[0]; s.MonthlyLimitBytes != 1e9 || !s.PathStyle || s.State != adminv1.BucketState_BUCKET_STATE_DRAINING {
		t.Fatalf("spec = %v", s)
	}
}

func TestInvalidConfigNamesTheField(t *testing.T) {
	cases := []struct {
		name, yaml, wantField string
	}{
		{"unknown field", "allocator:\n  listn: x\n", "listn"},
		{"bad size", "upload:\n  maxObjectSize: lots\n", "lots"},
		{"bad duration", "allocator:\n  reservationTTL: soon\n", "soon"},
		{"short ttl", "allocator:\n  reservationTTL: 1s\n", "reservationTTL"},
		{"small buffer budget", "upload:\n  bufferBudget: 4MiB\n", "bufferBudget"},
		{"client share over the budget", "upload:\n  bufferBudget: 64MiB\n  clientBufferShare: 65MiB\n", "clientBufferShare"},
		{"TLS certificate without its key", "upload:\n  tls:\n    certFile: /tls/tls.crt\n", "upload.tls"},
		{"client CA without a certificate", "upload:\n  tls:\n    clientCAFile: /tls/ca.crt\n", "upload.tls"},
		{"allocator TLS key without its certificate", "allocator:\n  tls:\n    keyFile: /tls/tls.key\n", "allocator.tls"},
		{"allocator TLS files while off", "upload:\n  allocatorTLS:\n    caFile: /tls/ca.crt\n", "upload.allocatorTLS"},
		{"allocator client certificate without its key", "upload:\n  allocatorTLS:\n    enabled: true\n    certFile: /tls/c.crt\n", "upload.allocatorTLS"},
		{"no idle timeout", "upload:\n  idleTimeout: 0s\n", "idleTimeout"},
		{"reset day", "allocator:\n  periodResetDay: 31\n", "periodResetDay"},
		{"negative stop timeout", "upload:\n  stopTimeout: -5s\n", "upload.stopTimeout"},
		{"negative probe interval", "allocator:\n  probeInterval: -30s\n", "allocator.probeInterval"},
		{"empty listen address", "upload:\n  listen: ''\n", "upload.listen"},
		{"empty allocator address", "upload:\n  allocatorAddr: ''\n", "upload.allocatorAddr"},
		{"negative rate limit", "upload:\n  rateLimit: -10\n", "upload.rateLimit"},
		{"negative in-flight bytes", "upload:\n  clientInFlightBytes: -1\n", "upload.clientInFlightBytes"},
		{"in-flight bytes below the largest object", "upload:\n  clientInFlightBytes: 1GiB\n", "upload.clientInFlightBytes"},
		{"negative rate burst", "upload:\n  rateBurst: -10\n", "upload.rateBurst"},
		{"content type wildcard", "upload:\n  allowedContentTypes: ['image/*']\n", "wildcards"},
		{"content type without a subtype", "upload:\n  allowedContentTypes: ['image']\n", "allowedContentTypes"},
		{"bucket limit too large", "buckets:\n  - {id: a, name: a, endpoint: 'http://x', credentialsRef: R, monthlyLimit: 65537TiB}\n", "monthlyLimit"},
		{"bucket without limit", "buckets:\n  - {id: a, name: a, endpoint: 'http://x', credentialsRef: R}\n", "monthlyLimit"},
		{"bad bucket id", "buckets:\n  - {id: 'A B', name: a, endpoint: 'http://x', credentialsRef: R, monthlyLimit: 1}\n", "id"},
		{"duplicate id", "buckets:\n  - {id: a, name: a, endpoint: 'http://x', credentialsRef: R, monthlyLimit: 1}\n  - {id: a, name: b, endpoint: 'http://x', credentialsRef: R, monthlyLimit: 1}\n", "used by another bucket"},
		{"bad S3 name", "buckets:\n  - {id: a, name: 'Bad Name!!', endpoint: 'http://x', credentialsRef: R, monthlyLimit: 1}\n", "name"},
		{"endpoint not a URL", "buckets:\n  - {id: a, name: a, endpoint: 'ftp://x', credentialsRef: R, monthlyLimit: 1}\n", "endpoint"},
		{"credentials ref with a path", "buckets:\n  - {id: a, name: a, endpoint: 'http://x', credentialsRef: '../etc', monthlyLimit: 1}\n", "credentialsRef"},
		{"account id with a slash", "buckets:\n  - {id: a, name: a, accountId: 'x/y', credentialsRef: R, monthlyLimit: 1}\n", "accountId"},
		{"bad state", "buckets:\n  - {id: a, name: a, endpoint: 'http://x', credentialsRef: R, monthlyLimit: 1, state: sleepy}\n", "state"},
	}
	var many strings.Builder
	many.WriteString("buckets:\n")
	for i := range config.MaxBuckets + 1 {
		fmt.Fprintf(&many, "  - {id: b%d, name: b%d, endpoint: 'http://x', credentialsRef: R, monthlyLimit: 1}\n", i, i)
	}
	cases = append(cases, struct{ name, yaml, wantField string }{"too many buckets", many.String(), "at most 126"})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "c.yaml")
			if err := os.WriteFile(path, []byte(tc.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := config.Load(path, envOf(nil))
			if err == nil {
				t.Fatal("Load accepted invalid config")
			}
			if !strings.Contains(err.Error(), tc.wantField) {
				t.Fatalf("error %q does not name %q", err, tc.wantField)
			}
		})
	}
}

// Refusals of R2_* seeds name the variable the operator set, not the
// YAML position the seed was turned into.
// A file whose allocator serves TLS its upload section would not speak is
// refused by CheckAllocatorTLS, which the upload service runs; an
// allocator's own file, without the upload section, loads.
func TestCheckAllocatorTLS(t *testing.T) {
	load := func(yaml string) *config.File {
		t.Helper()
		path := filepath.Join(t.TempDir(), "bucketlb.yaml")
		if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := config.Load(path, envOf(nil))
		if err != nil {
			t.Fatalf("an allocator's own file with TLS is refused: %v", err)
		}
		return f
	}
	serves := "allocator:\n  tls:\n    certFile: /tls/tls.crt\n    keyFile: /tls/tls.key\n"
	mutual := serves + "    clientCAFile: /tls/ca.crt\n"
	for _, tc := range []struct{ yaml, want string }{
		{serves, "would dial it in plain text"},
		{mutual + "upload:\n  allocatorTLS:\n    enabled: true\n", "requires a client certificate"},
		{mutual + "upload:\n  allocatorTLS:\n    enabled: true\n    certFile: /tls/c.crt\n    keyFile: /tls/c.key\n", ""},
		{"upload:\n  allocatorTLS:\n    enabled: true\n", ""},
	} {
		err := load(tc.yaml).CheckAllocatorTLS()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%q: %v, want %q", tc.yaml, err, tc.want)
		}
	}
}

func TestSeedEnvErrors(t *testing.T) {
	ok := map[string]string{"R2_BUCKETS": "b1", "R2_B1_NAME": "x", "R2_B1_ACCOUNT_ID": "a"}
	with := func(kv ...string) map[string]string {
		env := maps.Clone(ok)
		for i := 0; i < len(kv); i += 2 {
			env[kv[i]] = kv[i+1]
		}
		return env
	}
	cases := map[string]struct {
		env  map[string]string
		want string
	}{
		"missing name":    {map[string]string{"R2_BUCKETS": "b1"}, "R2_B1_NAME"},
		"bad limit":       {with("R2_B1_MONTHLY_LIMIT", "ten"), "R2_B1_MONTHLY_LIMIT"},
		"bad priority":    {with("R2_B1_PRIORITY", "first"), "R2_B1_PRIORITY"},
		"NaN limit":       {with("R2_B1_MONTHLY_LIMIT", "NaN"), "R2_B1_MONTHLY_LIMIT"},
		"endless limit":   {with("R2_B1_MONTHLY_LIMIT", "Inf"), "R2_B1_MONTHLY_LIMIT"},
		"huge limit":      {with("R2_B1_MONTHLY_LIMIT", "1e12"), "R2_B1_MONTHLY_LIMIT: \"1e12\" is not"},
		"bad name":        {with("R2_B1_NAME", "Not_A_Bucket"), "R2_B1_NAME"},
		"bad account":     {with("R2_B1_ACCOUNT_ID", "ab-cd"), "R2_B1_ACCOUNT_ID"},
		"bad endpoint":    {with("R2_B1_ENDPOINT", "ftp://host"), "R2_B1_ENDPOINT"},
		"no endpoint":     {with("R2_B1_ACCOUNT_ID", ""), "R2_B1_ENDPOINT or R2_B1_ACCOUNT_ID"},
		"negative weight": {with("R2_B1_WEIGHT", "-2"), "R2_B1_WEIGHT"},
		"bad entry":       {with("R2_BUCKETS", "b1,b.2", "R2_B.2_NAME", "x", "R2_B.2_ACCOUNT_ID", "a"), `R2_BUCKETS entry "b.2"`},
		"listed twice":    {with("R2_BUCKETS", "b1,B1"), `R2_BUCKETS entry "B1"`},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := config.Load("", envOf(tc.env))
			if err == nil {
				t.Fatal("accepted invalid R2_* environment")
			}
			if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "buckets[") {
				t.Fatalf("error %q does not name %s alone", err, tc.want)
			}
		})
	}
}

func TestParseByteSize(t *testing.T) {
	for in, want := range map[string]int64{"1048576": 1 << 20, "512MiB": 512 << 20, "10GB": 10e9, "5 GiB": 5 << 30, "1.5KB": 1500, "1.1KB": 1100, "0.3GB": 3e8, "7b": 7} {
		got, err := config.ParseByteSize(in)
		if err != nil || got != want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "x", "-1", "10XB", "1e19", "1e30TB", "0.5", "1.0001KB"} {
		if _, err := config.ParseByteSize(bad); err == nil {
			t.Errorf("ParseByteSize(%q) accepted", bad)
		}
	}
}

// A duration set to 0 takes its default (the refusal of a negative one
// says so), rather than meaning no bound: an allocator with stopTimeout 0
// let old connections' calls run on for ever.
func TestZeroDurationsTakeTheirDefaults(t *testing.T) {
	path := filepath.Join(t.TempDir(), "zero.yaml")
	yaml := "allocator:\n  stopTimeout: 0s\n  probeInterval: 0s\nupload:\n  stopTimeout: 0s\n"
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := config.Load(path, envOf(nil))
	if err != nil {
		t.Fatal(err)
	}
	def := config.Defaults()
	if f.Allocator.StopTimeout != def.Allocator.StopTimeout || f.Upload.StopTimeout != def.Upload.StopTimeout || f.Allocator.ProbeInterval != def.Allocator.ProbeInterval {
		t.Fatalf("stop timeouts %s, %s and probe interval %s; want the defaults %s, %s, %s",
			f.Allocator.StopTimeout.D(), f.Upload.StopTimeout.D(), f.Allocator.ProbeInterval.D(),
			def.Allocator.StopTimeout.D(), def.Upload.StopTimeout.D(), def.Allocator.ProbeInterval.D())
	}
	if f.Allocator.StopTimeout == 0 || f.Upload.StopTimeout == 0 {
		t.Fatal("a default stop timeout is 0")
	}
}
