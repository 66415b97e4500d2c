package config

import (
	"errors"
	"fmt"
	"mime"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
)

// File is the whole configuration file. Each service reads its section.
type File struct {
	Allocator Allocator `json:"allocator"`
	Upload    Upload    `json:"upload"`
	Buckets   []Bucket  `json:"buckets"`
}

// Allocator configures the control plane.
type Allocator struct {
	// Listen is the gRPC listen address.
	Listen string `json:"listen"`
	// EtcdEndpoints are etcd client URLs.
	EtcdEndpoints []string `json:"etcdEndpoints"`
	// ReservationTTL is how long a reservation lives without renewal.
	ReservationTTL Duration `json:"reservationTTL"`
	// IdempotencyTTL is how long an upload's result answers retries with
	// the same idempotency key. etcd keeps one key per such upload for
	// this long: size it with the upload rate.
	IdempotencyTTL Duration `json:"idempotencyTTL"`
	// Strategy is the default placement strategy, e.g. "priority-first".
	Strategy string `json:"strategy"`
	// PeriodResetDay is the day of month (1–28, UTC) usage resets.
	PeriodResetDay int `json:"periodResetDay"`
	// AdminTokenFile holds the admin bearer token; BUCKETLB_ADMIN_TOKEN wins.
	AdminTokenFile string `json:"adminTokenFile"`
	// ServiceTokenFile holds the token the upload service must send on
	// every AllocatorService call; BUCKETLB_SERVICE_TOKEN wins.
	ServiceTokenFile string `json:"serviceTokenFile"`
	// StopTimeout bounds graceful shutdown.
	StopTimeout Duration `json:"stopTimeout"`
	// ProbeBuckets lets the elected replica read a probe object from every
	// bucket each ProbeInterval; it then needs the buckets' credentials
	// like the upload service (environment or CredentialsDir).
	ProbeBuckets   bool     `json:"probeBuckets"`
	ProbeInterval  Duration `json:"probeInterval"`
	CredentialsDir string   `json:"credentialsDir"`
	// TLS serves the AllocatorService and the AdminService over TLS (files
	// read again when rotated). With clientCAFile, upload replicas and
	// bucketctl must present a certificate that CA signed.
	TLS TLSFiles `json:"tls"`
}

// Upload configures the data plane.
type Upload struct {
	// Listen is the gRPC listen address.
	Listen string `json:"listen"`
	// AllocatorAddr is the allocator's gRPC target, e.g. dns:///allocator:7001.
	AllocatorAddr string `json:"allocatorAddr"`
	// MaxObjectSize is the largest accepted object.
	MaxObjectSize ByteSize `json:"maxObjectSize"`
	// AllowedContentTypes is the content-type allowlist; empty means the
	// built-in default (images and common documents).
	AllowedContentTypes []string `json:"allowedContentTypes"`
	// MaxBucketAttempts bounds failover across buckets per upload.
	MaxBucketAttempts int `json:"maxBucketAttempts"`
	// CredentialsDir holds mounted secrets: <dir>/<ref>/access_key_id and
	// secret_access_key. Environment variables <REF>_ACCESS_KEY_ID and
	// <REF>_SECRET_ACCESS_KEY are used when it is empty or lacks a ref.
	CredentialsDir string `json:"credentialsDir"`
	// CAFile is an extra PEM bundle to trust for S3 endpoints.
	CAFile string `json:"caFile"`
	// ServiceTokenFile holds the token sent on every call to the
	// allocator (allocator.serviceTokenFile's); BUCKETLB_SERVICE_TOKEN wins.
	ServiceTokenFile string `json:"serviceTokenFile"`
	// AllocatorTLS reaches the allocator over TLS, for an allocator that
	// serves it (allocator.tls).
	AllocatorTLS ClientTLS `json:"allocatorTLS"`
	// BufferParts sends each multipart part only once whole, with a
	// Content-MD5 the store checks, instead of streaming it and checking
	// its ETag after (see uploader.Config.BufferParts).
	BufferParts bool `json:"bufferParts"`
	// BufferBudget bounds the memory that object and part buffers of all
	// uploads (and the chunk buffers of reads) on a replica take at once;
	// uploads and reads beyond it wait for room.
	// Keep it well under the container's memory limit.
	BufferBudget ByteSize `json:"bufferBudget"`
	// ClientBufferShare bounds the part of bufferBudget one client holds
	// at once, so one client's streams cannot keep the others waiting;
	// a client past it waits, then gets RESOURCE_EXHAUSTED. Default (0) a
	// quarter of bufferBudget; set it to bufferBudget for no bound.
	ClientBufferShare ByteSize `json:"clientBufferShare"`
	// ClientInFlightBytes bounds the sizes one client's running uploads
	// declare on a replica together: the allocator holds each declared
	// size reserved for as long as its upload runs, and a client trickling
	// data just above minDataRate would otherwise hold every bucket's
	// room for days. A client past it gets RESOURCE_EXHAUSTED. 0: no
	// bound. Default 16GiB (three of the largest default objects).
	ClientInFlightBytes ByteSize `json:"clientInFlightBytes"`
	// BufferWait is how long an upload waits for buffer room before it
	// fails with UNAVAILABLE (retryable).
	BufferWait Duration `json:"bufferWait"`
	// IdleTimeout abandons an upload whose client sends nothing for this
	// long, returning its buffers and reservation.
	IdleTimeout Duration `json:"idleTimeout"`
	// MinDataRate is the fewest bytes a second a client must send, judged
	// over each idleTimeout the service spends waiting for its data; a
	// client sending less (a byte now and then keeps idleTimeout from
	// firing) is cut off with DEADLINE_EXCEEDED. 0 turns the check off.
	MinDataRate ByteSize `json:"minDataRate"`
	// StopTimeout bounds graceful shutdown; keep it longer than a typical
	// upload and shorter than the pod's termination grace period.
	StopTimeout Duration `json:"stopTimeout"`
	// RateLimit is calls per second per client (0 disables); RateBurst
	// the bucket size.
	RateLimit float64 `json:"rateLimit"`
	RateBurst int     `json:"rateBurst"`
	// TLS serves the upload API over TLS (files read again when rotated).
	TLS TLSFiles `json:"tls"`
}

// TLSFiles names a server's PEM files. With ClientCAFile, every client
// must present a certificate that CA signed (mutual TLS), and the
// certificate's name (URI, else DNS, else subject) identifies the client
// for rate limits and buffer shares.
type TLSFiles struct {
	CertFile     string `json:"certFile"`
	KeyFile      string `json:"keyFile"`
	ClientCAFile string `json:"clientCAFile"`
}

// CheckAllocatorTLS refuses a file whose allocator section serves TLS that
// its upload section would not speak. The upload service calls it: when
// one file feeds both services (as in the manifests), every upload would
// otherwise fail with nothing saying why but "the allocator could not be
// reached". An allocator's own file need not say how others dial it.
func (f *File) CheckAllocatorTLS() error {
	switch at := f.Upload.AllocatorTLS; {
	case f.Allocator.TLS.CertFile != "" && !at.Enabled:
		return errors.New("config: upload.allocatorTLS: the allocator serves TLS (allocator.tls in this file) but the upload service would dial it in plain text; set upload.allocatorTLS.enabled and its caFile")
	case f.Allocator.TLS.ClientCAFile != "" && at.CertFile == "":
		return errors.New("config: upload.allocatorTLS: the allocator requires a client certificate (allocator.tls.clientCAFile in this file) but the upload service has none; set upload.allocatorTLS.certFile and keyFile")
	}
	return nil
}

// ClientTLS is how a service dials another over TLS.
type ClientTLS struct {
	// Enabled turns TLS on; the files are optional.
	Enabled bool `json:"enabled"`
	// CAFile is the CA bundle to trust (the system's roots when empty).
	CAFile string `json:"caFile"`
	// CertFile and KeyFile are a client certificate, for a server that
	// requires one (mutual TLS).
	CertFile string `json:"certFile"`
	KeyFile  string `json:"keyFile"`
	// ServerName is the name the server's certificate must carry; empty:
	// the host of the address dialled.
	ServerName string `json:"serverName"`
}

// check reports a client TLS setting that would not do what it says.
func (t ClientTLS) check(field string) error {
	switch {
	case !t.Enabled && (t.CAFile != "" || t.CertFile != "" || t.KeyFile != "" || t.ServerName != ""):
		return fmt.Errorf("%s: files or a server name are set but enabled is false, so the connection would be plain text; set enabled: true", field)
	case (t.CertFile == "") != (t.KeyFile == ""):
		return fmt.Errorf("%s: certFile and keyFile go together", field)
	}
	return nil
}

// check reports server TLS files that do not go together.
func (t TLSFiles) check(field string) error {
	if (t.CertFile == "") != (t.KeyFile == "") || (t.ClientCAFile != "" && t.CertFile == "") {
		return fmt.Errorf("%s: certFile and keyFile go together, and clientCAFile needs them", field)
	}
	return nil
}

// Bucket is one bucket seed as written in YAML.
type Bucket struct {
	ID             string   `json:"id"`
	Name           string   `json:"name"`
	Endpoint       string   `json:"endpoint"`
	AccountID      string   `json:"accountId"`
	Region         string   `json:"region"`
	CredentialsRef string   `json:"credentialsRef"`
	PublicURL      string   `json:"publicUrl"`
	MonthlyLimit   ByteSize `json:"monthlyLimit"`
	Priority       int32    `json:"priority"`
	Weight         int32    `json:"weight"`
	State          string   `json:"state"`
	PathStyle      bool     `json:"pathStyle"`

	// envPrefix is "R2_<ENTRY>" for a bucket seeded from the environment,
	// whose errors name the variables the operator set.
	envPrefix, envEntry string
}

// envVars names the seed variables behind each field a spec check may
// refuse (see BucketsFromEnv).
var envVars = map[string]string{
	"name": "_NAME", "endpoint": "_ENDPOINT or _ACCOUNT_ID", "accountId": "_ACCOUNT_ID",
	"monthlyLimit": "_MONTHLY_LIMIT", "weight": "_WEIGHT", "publicUrl": "_PUBLIC_URL",
}

// where names a refused field of the i-th bucket as its operator wrote it:
// a YAML path, or the R2_* variables of a seeded one.
func (b Bucket) where(i int, yamlField string) string {
	if b.envPrefix == "" {
		return fmt.Sprintf("buckets[%d].%s", i, yamlField)
	}
	if v, ok := envVars[yamlField]; ok {
		return b.envPrefix + strings.ReplaceAll(v, " or _", " or "+b.envPrefix+"_")
	}
	// The id and the credentials reference come from the R2_BUCKETS entry.
	return fmt.Sprintf("R2_BUCKETS entry %q", b.envEntry)
}

// minBufferBudget holds one large upload's two parts at the default part
// size.
const minBufferBudget = 16 << 20

// Defaults returns the configuration used when nothing is set.
func Defaults() File {
	return File{
		Allocator: Allocator{
			Listen:         "127.0.0.1:7001",
			EtcdEndpoints:  []string{"http://127.0.0.1:2379"},
			ReservationTTL: Duration(30 * time.Second),
			IdempotencyTTL: Duration(24 * time.Hour),
			Strategy:       "priority-first",
			PeriodResetDay: 1,
			StopTimeout:    Duration(20 * time.Second),
			ProbeInterval:  Duration(30 * time.Second),
		},
		Upload: Upload{
			Listen:              "127.0.0.1:7002",
			AllocatorAddr:       "127.0.0.1:7001",
			MaxObjectSize:       5 << 30,
			MaxBucketAttempts:   3,
			BufferBudget:        512 << 20,
			ClientInFlightBytes: 16 << 30,
			BufferWait:          Duration(10 * time.Second),
			IdleTimeout:         Duration(time.Minute),
			MinDataRate:         1 << 10,
			// With the 2 s drain and up to 5 s of cleanup, within the
			// manifests' 60 s termination grace period.
			StopTimeout: Duration(50 * time.Second),
			RateLimit:   50,
			RateBurst:   100,
		},
	}
}

// Load reads the YAML file at path (none when path is empty) over the
// defaults, then applies environment overrides and R2_BUCKETS seeds, and
// validates the result. env is os.Getenv in production.
func Load(path string, env func(string) string) (*File, error) {
	f := Defaults()
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("config: read %s: %w", path, err)
		}
		if err := yaml.UnmarshalStrict(data, &f); err != nil {
			return nil, fmt.Errorf("config: parse %s: %w", path, err)
		}
	}
	if err := f.applyEnv(env); err != nil {
		return nil, err
	}
	envBuckets, err := BucketsFromEnv(env)
	if err != nil {
		return nil, err
	}
	f.Buckets = append(f.Buckets, envBuckets...)
	// A duration set to 0 takes its default, as Validate's refusals of
	// negative ones say: 0 is no bound to stop within, nor a period.
	def := Defaults()
	for _, d := range []struct{ got, def *Duration }{
		{&f.Allocator.StopTimeout, &def.Allocator.StopTimeout},
		{&f.Upload.StopTimeout, &def.Upload.StopTimeout},
		{&f.Allocator.ProbeInterval, &def.Allocator.ProbeInterval},
	} {
		if *d.got == 0 {
			*d.got = *d.def
		}
	}
	if err := f.Validate(); err != nil {
		return nil, err
	}
	return &f, nil
}

func (f *File) applyEnv(env func(string) string) error {
	set := func(name string, dst *string) {
		if v := env(name); v != "" {
			*dst = v
		}
	}
	set("BUCKETLB_ALLOCATOR_LISTEN", &f.Allocator.Listen)
	set("BUCKETLB_STRATEGY", &f.Allocator.Strategy)
	set("BUCKETLB_ADMIN_TOKEN_FILE", &f.Allocator.AdminTokenFile)
	// Both services read the service token: one sends it, one checks it.
	set("BUCKETLB_SERVICE_TOKEN_FILE", &f.Allocator.ServiceTokenFile)
	set("BUCKETLB_SERVICE_TOKEN_FILE", &f.Upload.ServiceTokenFile)
	set("BUCKETLB_UPLOAD_LISTEN", &f.Upload.Listen)
	set("BUCKETLB_ALLOCATOR_ADDR", &f.Upload.AllocatorAddr)
	// Both services read bucket keys (the allocator for its probes).
	set("BUCKETLB_CREDENTIALS_DIR", &f.Upload.CredentialsDir)
	set("BUCKETLB_CREDENTIALS_DIR", &f.Allocator.CredentialsDir)
	set("BUCKETLB_CA_FILE", &f.Upload.CAFile)
	if v := env("BUCKETLB_ETCD_ENDPOINTS"); v != "" {
		f.Allocator.EtcdEndpoints = splitList(v)
	}
	if v := env("BUCKETLB_MAX_OBJECT_SIZE"); v != "" {
		n, err := ParseByteSize(v)
		if err != nil {
			return fmt.Errorf("config: BUCKETLB_MAX_OBJECT_SIZE: %w", err)
		}
		f.Upload.MaxObjectSize = ByteSize(n)
	}
	if v := env("BUCKETLB_ALLOWED_CONTENT_TYPES"); v != "" {
		f.Upload.AllowedContentTypes = splitList(v)
	}
	return nil
}

// Validate reports the first invalid field with a sentence naming it.
func (f *File) Validate() error {
	var errs []error
	if len(f.Allocator.EtcdEndpoints) == 0 {
		errs = append(errs, errors.New("allocator.etcdEndpoints: at least one etcd endpoint is required"))
	}
	if d := f.Allocator.PeriodResetDay; d < 1 || d > 28 {
		errs = append(errs, fmt.Errorf("allocator.periodResetDay: %d is not a day between 1 and 28", d))
	}
	if f.Allocator.IdempotencyTTL.D() < time.Minute {
		errs = append(errs, fmt.Errorf("allocator.idempotencyTTL: %s is too short for a client to retry an upload (at least 1m)", f.Allocator.IdempotencyTTL.D()))
	}
	if f.Allocator.ReservationTTL.D() < 2*time.Second {
		errs = append(errs, fmt.Errorf("allocator.reservationTTL: %s is shorter than etcd's 2s minimum lease", f.Allocator.ReservationTTL.D()))
	}
	for _, err := range []error{f.Upload.TLS.check("upload.tls"), f.Allocator.TLS.check("allocator.tls"), f.Upload.AllocatorTLS.check("upload.allocatorTLS")} {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if f.Upload.MaxObjectSize <= 0 {
		errs = append(errs, errors.New("upload.maxObjectSize: must be positive"))
	}
	if f.Upload.MaxBucketAttempts < 1 {
		errs = append(errs, errors.New("upload.maxBucketAttempts: must be at least 1"))
	}
	if f.Upload.BufferBudget < minBufferBudget {
		errs = append(errs, fmt.Errorf("upload.bufferBudget: %d bytes is less than one large upload's two 8 MiB part buffers (16MiB)", f.Upload.BufferBudget))
	}
	if b := f.Upload.ClientInFlightBytes; b < 0 || b > 0 && b < f.Upload.MaxObjectSize {
		errs = append(errs, fmt.Errorf("upload.clientInFlightBytes: %d bytes is neither 0 (no bound) nor at least upload.maxObjectSize (%d bytes): the largest uploads could never run", b, f.Upload.MaxObjectSize))
	}
	if f.Upload.ClientBufferShare < 0 || f.Upload.ClientBufferShare > f.Upload.BufferBudget {
		errs = append(errs, fmt.Errorf("upload.clientBufferShare: %d bytes is not between 0 (a quarter of upload.bufferBudget) and upload.bufferBudget (%d bytes)", f.Upload.ClientBufferShare, f.Upload.BufferBudget))
	}
	if f.Upload.BufferWait.D() <= 0 {
		errs = append(errs, errors.New("upload.bufferWait: must be positive"))
	}
	if f.Upload.MinDataRate < 0 {
		errs = append(errs, errors.New("upload.minDataRate: must not be negative (0 turns the check off)"))
	}
	if f.Upload.IdleTimeout.D() <= 0 {
		errs = append(errs, errors.New("upload.idleTimeout: must be positive"))
	}
	for _, c := range []struct {
		name string
		d    Duration
	}{{"allocator.stopTimeout", f.Allocator.StopTimeout}, {"upload.stopTimeout", f.Upload.StopTimeout}, {"allocator.probeInterval", f.Allocator.ProbeInterval}} {
		if c.d.D() < 0 {
			errs = append(errs, fmt.Errorf("%s: %s must not be negative (0 takes the default)", c.name, c.d.D()))
		}
	}
	for _, c := range []struct{ name, addr string }{
		{"allocator.listen", f.Allocator.Listen}, {"upload.listen", f.Upload.Listen}, {"upload.allocatorAddr", f.Upload.AllocatorAddr},
	} {
		if strings.TrimSpace(c.addr) == "" {
			errs = append(errs, fmt.Errorf("%s: an address is required", c.name))
		}
	}
	if f.Upload.RateLimit < 0 || f.Upload.RateBurst < 0 {
		errs = append(errs, fmt.Errorf("upload.rateLimit, upload.rateBurst: %v and %d must not be negative (a rateLimit of 0 turns limits off)", f.Upload.RateLimit, f.Upload.RateBurst))
	}
	for _, ct := range f.Upload.AllowedContentTypes {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || strings.Contains(ct, "*") || !strings.Contains(mt, "/") {
			errs = append(errs, fmt.Errorf("upload.allowedContentTypes: %q is not a media type such as image/png (wildcards are not supported: list each type)", ct))
		}
	}
	if len(f.Buckets) > MaxBuckets {
		errs = append(errs, fmt.Errorf("buckets: %d configured buckets are more than the %d the first start can seed; configure at most %d and add the others with the admin API", len(f.Buckets), MaxBuckets, MaxBuckets))
	}
	seen := map[string]bool{}
	for i, b := range f.Buckets {
		if _, err := b.spec(); err != nil {
			var se *SpecError
			if errors.As(err, &se) {
				errs = append(errs, fmt.Errorf("%s: %s", b.where(i, se.YAMLField), se.Msg))
			} else {
				errs = append(errs, fmt.Errorf("%s: %w", strings.TrimSuffix(b.where(i, ""), "."), err))
			}
			continue
		}
		if seen[b.ID] {
			errs = append(errs, fmt.Errorf("%s: %q is used by another bucket", b.where(i, "id"), b.ID))
		}
		seen[b.ID] = true
	}
	if len(errs) > 0 {
		return fmt.Errorf("config: %w", errors.Join(errs...))
	}
	return nil
}

var idPattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// BucketIDRule says what ValidBucketID accepts.
const BucketIDRule = "1–63 characters of a-z, 0-9 and '-'"

// ValidBucketID reports whether id can name a bucket; callers that look
// buckets up by a client's id refuse others without asking.
func ValidBucketID(id string) bool { return idPattern.MatchString(id) }

// MaxBuckets is the most buckets a configuration may name: the allocator
// seeds them in one etcd transaction (ledger.MaxSeedBuckets, which config
// does not import for the reason below).
const MaxBuckets = 126

// MaxMonthlyLimit is the largest monthly limit a bucket may have (64 PiB),
// the ledger's bound on any one commit (ledger.MaxBytes, which config does
// not import: the upload service uses config and must not link etcd).
const MaxMonthlyLimit = 1 << 56

// SpecError is a bucket spec's field a check refused. Its Error names
// the field as the admin API does (monthly_limit_bytes); a configuration
// file names it as YAML does (monthlyLimit, see Bucket.Spec).
type SpecError struct {
	Field, YAMLField string
	Msg              string
}

func (e *SpecError) Error() string { return e.Field + ": " + e.Msg }

// ValidateSpec checks a bucket spec as stored in etcd or sent by an
// admin; its errors are *SpecError.
func ValidateSpec(s *adminv1.BucketSpec) error {
	bad := func(field, yamlField, format string, args ...any) error {
		return &SpecError{Field: field, YAMLField: yamlField, Msg: fmt.Sprintf(format, args...)}
	}
	switch {
	case !ValidBucketID(s.GetId()):
		return bad("id", "id", "%q must be %s", s.GetId(), BucketIDRule)
	case s.GetName() == "":
		return bad("name", "name", "bucket %q needs an S3 bucket name", s.GetId())
	case s.GetEndpoint() == "" && s.GetAccountId() == "":
		return bad("endpoint", "endpoint", "bucket %q needs an endpoint URL or an R2 account id", s.GetId())
	case s.GetMonthlyLimitBytes() <= 0:
		return bad("monthly_limit_bytes", "monthlyLimit", "bucket %q needs a positive monthly limit", s.GetId())
	case s.GetMonthlyLimitBytes() > MaxMonthlyLimit:
		return bad("monthly_limit_bytes", "monthlyLimit", "bucket %q has a monthly limit of %d bytes; at most %d (64 PiB) is allowed", s.GetId(), s.GetMonthlyLimitBytes(), int64(MaxMonthlyLimit))
	case s.GetWeight() < 0:
		return bad("weight", "weight", "bucket %q has negative weight %d", s.GetId(), s.GetWeight())
	case s.GetCredentialsRef() == "":
		return bad("credentials_ref", "credentialsRef", "bucket %q needs a credentials reference", s.GetId())
	case !credRefPattern.MatchString(s.GetCredentialsRef()):
		// It names environment variables and a directory of mounted
		// secrets: no path separators, nothing a shell would mangle.
		return bad("credentials_ref", "credentialsRef", "bucket %q has %q; a reference is 1–128 characters of A-Z, a-z, 0-9, '_' and '-'", s.GetId(), s.GetCredentialsRef())
	case !bucketNamePattern.MatchString(s.GetName()):
		return bad("name", "name", "bucket %q has S3 name %q; an S3 bucket name is at most 63 characters of a-z, 0-9, '.' and '-', starting and ending with a letter or digit", s.GetId(), s.GetName())
	case s.GetAccountId() != "" && !accountPattern.MatchString(s.GetAccountId()):
		return bad("account_id", "accountId", "bucket %q has %q; an R2 account id is letters and digits (32 hex characters)", s.GetId(), s.GetAccountId())
	case !ValidState(s.GetState()):
		return bad("state", "state", "bucket %q has state %v; it must be ACTIVE, DRAINING or DISABLED", s.GetId(), s.GetState())
	}
	if e := s.GetEndpoint(); e != "" {
		if u, err := url.Parse(e); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad("endpoint", "endpoint", "bucket %q has %q; an endpoint is an http:// or https:// URL with a host", s.GetId(), e)
		}
	}
	return nil
}

var (
	credRefPattern    = regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`)
	bucketNamePattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$`)
	accountPattern    = regexp.MustCompile(`^[A-Za-z0-9]{1,64}$`)
)

// Spec converts the YAML form to the API form, filling R2 defaults; its
// errors name YAML fields.
func (b Bucket) Spec() (*adminv1.BucketSpec, error) {
	s, err := b.spec()
	var se *SpecError
	if errors.As(err, &se) {
		return nil, fmt.Errorf("%s: %s", se.YAMLField, se.Msg)
	}
	return s, err
}

// spec is Spec with the checks' *SpecError unwrapped.
func (b Bucket) spec() (*adminv1.BucketSpec, error) {
	s := &adminv1.BucketSpec{
		Id:                b.ID,
		Name:              b.Name,
		Endpoint:          b.Endpoint,
		AccountId:         b.AccountID,
		Region:            b.Region,
		CredentialsRef:    b.CredentialsRef,
		PublicUrl:         b.PublicURL,
		MonthlyLimitBytes: int64(b.MonthlyLimit),
		Priority:          b.Priority,
		Weight:            b.Weight,
		PathStyle:         b.PathStyle,
	}
	state, err := ParseState(b.State)
	if err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	s.State = state
	FillDefaults(s)
	if err := ValidateSpec(s); err != nil {
		return nil, err
	}
	return s, nil
}

// R2Endpoint is the S3 endpoint of a Cloudflare account's R2 buckets.
func R2Endpoint(accountID string) string {
	return "https://" + accountID + ".r2.cloudflarestorage.com"
}

// FillDefaults sets R2 defaults: endpoint from account id, region "auto",
// weight 1, state ACTIVE.
func FillDefaults(s *adminv1.BucketSpec) {
	if s.Endpoint == "" && s.AccountId != "" {
		s.Endpoint = R2Endpoint(s.AccountId)
	}
	if s.Region == "" {
		s.Region = "auto"
	}
	if s.Weight == 0 {
		s.Weight = 1
	}
	if s.State == adminv1.BucketState_BUCKET_STATE_UNSPECIFIED {
		s.State = adminv1.BucketState_BUCKET_STATE_ACTIVE
	}
}

// ValidState reports whether st is a state a bucket can be in: ACTIVE,
// DRAINING or DISABLED (a client can send any number in the enum field).
func ValidState(st adminv1.BucketState) bool {
	switch st {
	case adminv1.BucketState_BUCKET_STATE_ACTIVE, adminv1.BucketState_BUCKET_STATE_DRAINING, adminv1.BucketState_BUCKET_STATE_DISABLED:
		return true
	}
	return false
}

// ParseState reads "active", "draining" or "disabled" (empty = active).
func ParseState(v string) (adminv1.BucketState, error) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "", "active":
		return adminv1.BucketState_BUCKET_STATE_ACTIVE, nil
	case "draining":
		return adminv1.BucketState_BUCKET_STATE_DRAINING, nil
	case "disabled":
		return adminv1.BucketState_BUCKET_STATE_DISABLED, nil
	}
	return 0, fmt.Errorf("%q is not one of active, draining, disabled", v)
}

// Specs converts every YAML bucket.
func (f *File) Specs() ([]*adminv1.BucketSpec, error) {
	out := make([]*adminv1.BucketSpec, 0, len(f.Buckets))
	for i, b := range f.Buckets {
		s, err := b.Spec()
		if err != nil {
			return nil, fmt.Errorf("config: buckets[%d]: %w", i, err)
		}
		out = append(out, s)
	}
	return out, nil
}

// BucketsFromEnv reads the seed system's format: R2_BUCKETS=bucket1,bucket2
// and for each entry R2_<ENTRY>_NAME, _ACCOUNT_ID, _PUBLIC_URL,
// _MONTHLY_LIMIT (GB, decimal: 1 GB = 10^9 bytes, the smaller unit, so the
// budget never exceeds the provider's), _PRIORITY, plus bucketlb's
// optional _ENDPOINT, _WEIGHT and _PATH_STYLE. Credentials stay in the
// environment: the spec's credentials_ref is "R2_<ENTRY>", resolved to
// R2_<ENTRY>_ACCESS_KEY_ID and R2_<ENTRY>_SECRET_ACCESS_KEY.
func BucketsFromEnv(env func(string) string) ([]Bucket, error) {
	list := env("R2_BUCKETS")
	if list == "" {
		return nil, nil
	}
	var out []Bucket
	for _, entry := range splitList(list) {
		prefix := "R2_" + strings.ToUpper(strings.ReplaceAll(entry, "-", "_"))
		get := func(suffix string) string { return strings.TrimSpace(env(prefix + "_" + suffix)) }
		b := Bucket{
			ID:             strings.ToLower(strings.ReplaceAll(entry, "_", "-")),
			Name:           get("NAME"),
			AccountID:      get("ACCOUNT_ID"),
			Endpoint:       get("ENDPOINT"),
			PublicURL:      get("PUBLIC_URL"),
			CredentialsRef: prefix,
			envPrefix:      prefix,
			envEntry:       entry,
		}
		if b.Name == "" {
			return nil, fmt.Errorf("config: %s_NAME is required for %q listed in R2_BUCKETS", prefix, entry)
		}
		if v := get("MONTHLY_LIMIT"); v != "" {
			gb, err := strconv.ParseFloat(v, 64)
			if err != nil || !(gb > 0) || gb*1e9 > MaxMonthlyLimit {
				// !(gb > 0) also refuses NaN; the bound, Inf and sizes that
				// would overflow the byte count.
				return nil, fmt.Errorf("config: %s_MONTHLY_LIMIT: %q is not a number of GB above 0 and at most 2^56 bytes (64 PiB)", prefix, v)
			}
			b.MonthlyLimit = ByteSize(gb * 1e9)
		} else {
			b.MonthlyLimit = 10 * 1e9 // R2's free tier: 10 GB-month
		}
		for suffix, dst := range map[string]*int32{"PRIORITY": &b.Priority, "WEIGHT": &b.Weight} {
			if v := get(suffix); v != "" {
				n, err := strconv.ParseInt(v, 10, 32)
				if err != nil {
					return nil, fmt.Errorf("config: %s_%s: %q is not an integer", prefix, suffix, v)
				}
				*dst = int32(n)
			}
		}
		if v := get("PATH_STYLE"); v != "" {
			ps, err := strconv.ParseBool(v)
			if err != nil {
				return nil, fmt.Errorf("config: %s_PATH_STYLE: %q is not true or false", prefix, v)
			}
			b.PathStyle = ps
		}
		out = append(out, b)
	}
	return out, nil
}

func splitList(v string) []string {
	var out []string
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
