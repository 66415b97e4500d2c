package objstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/faultproxy"
	"github.com/bucketlb/bucketlb/pkg/objstore"
	"github.com/bucketlb/bucketlb/pkg/testenv"
)

// Every fault a bucket can show is classified by what the upload service
// should do about it, against the real gateway behind the fault proxy, and
// the SDK never tries one request more than twice (bucketlb fails over
// itself).
func TestClassifyFaults(t *testing.T) {
	g := testenv.S3(t)
	name := testenv.NewBucket(t, g)
	proxy, err := faultproxy.New(g.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	proxy.StallFor = 10 * time.Second
	s, err := objstore.New(objstore.Options{
		Credentials: objstore.StaticCredentials{"R": {g.AccessKey, g.SecretKey}, "BAD": {g.AccessKey, "wrong-secret"}},
		CallTimeout: 300 * time.Millisecond, DataTimeout: 300 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	target := objstore.Target{ID: name, Name: name, Endpoint: proxy.URL(), Region: g.Region, CredentialsRef: "R", PathStyle: true}
	b, err := s.Bucket(target)
	if err != nil {
		t.Fatal(err)
	}
	badTarget := target
	badTarget.CredentialsRef = "BAD"
	bad, err := s.Bucket(badTarget)
	if err != nil {
		t.Fatal(err)
	}
	missingTarget := target
	missingTarget.Name = "no-such-bucket-here"
	missing, err := s.Bucket(missingTarget)
	if err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name   string
		mode   faultproxy.Mode
		bucket *objstore.Bucket
		want   objstore.Failure
		// mayHaveLanded: no answer came back, so the write may exist.
		mayHaveLanded bool
		key           string // when set, instead of a short one
	}{
		{"500 internal error", faultproxy.Error5xx, b, objstore.BucketError, false, ""},
		{"429 throttled", faultproxy.Throttle, b, objstore.BucketThrottled, false, ""},
		{"connection reset", faultproxy.Reset, b, objstore.BucketError, true, ""},
		{"stall past the call timeout", faultproxy.Stall, b, objstore.BucketTimeout, true, ""},
		{"response lost after the write", faultproxy.LoseResponse, b, objstore.BucketError, true, ""},
		// 400s whose S3 code says the path, not the request, was at fault.
		{"400 RequestTimeout", faultproxy.RequestTimeout, b, objstore.BucketTimeout, false, ""},
		{"400 IncompleteBody", faultproxy.IncompleteBody, b, objstore.BucketError, false, ""},
		// A bucket that refuses because of how it is set up is the bucket's
		// fault: the same request goes through on another bucket.
		{"wrong secret (403)", faultproxy.Pass, bad, objstore.BucketError, false, ""},
		{"no such bucket (404)", faultproxy.Pass, missing, objstore.BucketError, false, ""},
		// What was asked is wrong: no other bucket would take it.
		{name: "key over 1024 bytes (400)", mode: faultproxy.Pass, bucket: b, want: objstore.NotBucketFault, key: strings.Repeat("k", 1100)},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			proxy.Set(tc.mode)
			defer proxy.Set(faultproxy.Pass)
			proxy.Counts()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			key := tc.key
			if key == "" {
				key = "k" + string(rune('a'+i))
			}
			_, err := tc.bucket.Put(ctx, objstore.PutInput{Key: key, ContentType: "application/octet-stream"}, []byte("hello"))
			if err == nil {
				t.Fatal("put succeeded through a fault")
			}
			if got := objstore.Classify(ctx, err); got != tc.want {
				t.Fatalf("Classify(%v) = %v, want %v", err, got, tc.want)
			}
			if got := objstore.MayHaveLanded(err); got != tc.mayHaveLanded {
				t.Fatalf("MayHaveLanded(%v) = %v, want %v", err, got, tc.mayHaveLanded)
			}
			if n := proxy.Counts()["PutObject"]; n < 1 || n > 2 {
				t.Fatalf("%d PUT requests for one Put; the SDK may try at most twice", n)
			}
			if strings.Contains(err.Error(), "wrong-secret") || strings.Contains(err.Error(), g.SecretKey) {
				t.Fatalf("error leaks a secret: %v", err)
			}
		})
	}

	// A lost response is ambiguous: the object may exist. Callers must
	// clean up after a bucket failure, not assume nothing was written.
	proxy.Set(faultproxy.LoseResponse)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, _ = b.Put(ctx, objstore.PutInput{Key: "ambiguous", ContentType: "application/octet-stream"}, []byte("x"))
	proxy.Set(faultproxy.Pass)
	if _, err := b.Head(ctx, "ambiguous"); err != nil {
		t.Fatalf("the write behind a lost response did not land (%v); the test no longer shows the ambiguity", err)
	}

	// The caller's own cancellation is never the bucket's fault.
	cctx, ccancel := context.WithCancel(context.Background())
	ccancel()
	_, err = b.Put(cctx, objstore.PutInput{Key: "c", ContentType: "application/octet-stream"}, []byte("x"))
	if err == nil || objstore.Classify(cctx, err) != objstore.NotBucketFault {
		t.Fatalf("cancelled put: err %v classified %v, want NotBucketFault", err, objstore.Classify(cctx, err))
	}
	if objstore.Classify(ctx, nil) != objstore.NotBucketFault || objstore.Classify(ctx, errors.New("read: connection reset by peer")) != objstore.BucketError {
		t.Fatal("nil or a bare reset error misclassified")
	}
}

// One s3.Client per (endpoint, region, credentials, path style), shared by
// every bucket handle on it.
func TestClientsCachedPerAccount(t *testing.T) {
	s, err := objstore.New(objstore.Options{Credentials: objstore.StaticCredentials{"A": {"k", "s"}, "B": {"k2", "s2"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	t1 := objstore.Target{ID: "1", Name: "one", Endpoint: "https://acct.r2.cloudflarestorage.com", CredentialsRef: "A"}
	t2 := t1
	t2.ID, t2.Name = "2", "two"
	t3 := t1
	t3.CredentialsRef = "B"
	b1, _ := s.Bucket(t1)
	b2, _ := s.Bucket(t2)
	b3, _ := s.Bucket(t3)
	if !objstore.SameClient(b1, b2) {
		t.Fatal("two buckets of one account and key got different clients")
	}
	if objstore.SameClient(b1, b3) {
		t.Fatal("different credentials share a client")
	}
	if _, err := s.Bucket(objstore.Target{Endpoint: "x", CredentialsRef: "MISSING"}); err == nil {
		t.Fatal("unknown credentials_ref accepted")
	}
}

// A client whose account settings are no longer asked for (a bucket moved
// to another endpoint, say) is dropped after an hour unused; one in use
// stays.
func TestIdleClientsAreDropped(t *testing.T) {
	s, err := objstore.New(objstore.Options{Credentials: objstore.StaticCredentials{"A": {"k", "s"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	now := time.Unix(1_700_000_000, 0)
	objstore.SetClock(s, func() time.Time { return now })
	old := objstore.Target{ID: "1", Endpoint: "https://old.example", CredentialsRef: "A"}
	moved := old
	moved.Endpoint = "https://new.example"
	kept, _ := s.Bucket(moved)
	if _, err := s.Bucket(old); err != nil {
		t.Fatal(err)
	}
	if n := objstore.CachedClients(s); n != 2 {
		t.Fatalf("%d clients cached, want 2", n)
	}
	for range 3 { // the moved bucket stays in use, the old settings do not
		now = now.Add(40 * time.Minute)
		if _, err := s.Bucket(moved); err != nil {
			t.Fatal(err)
		}
	}
	if n := objstore.CachedClients(s); n != 1 {
		t.Fatalf("%d clients cached after 2 h, want 1 (the unused one dropped)", n)
	}
	again, _ := s.Bucket(moved)
	if !objstore.SameClient(kept, again) {
		t.Fatal("the client in use was dropped")
	}
}

func TestEnvCredentials(t *testing.T) {
	dir := t.TempDir()
	env := map[string]string{"R2_A_ACCESS_KEY_ID": "id-a", "R2_A_SECRET_ACCESS_KEY": "secret-a"}
	c := objstore.EnvCredentials{Dir: dir, Getenv: func(k string) string { return env[k] }}
	got, err := c.Resolve("R2_A")
	if err != nil || got.AccessKeyID != "id-a" || got.SecretAccessKey != "secret-a" {
		t.Fatalf("env: %+v, %v", got, err)
	}
	writeSecret(t, dir, "R2_B", "id-b", "secret-b")
	if got, err := c.Resolve("R2_B"); err != nil || got.AccessKeyID != "id-b" || got.SecretAccessKey != "secret-b" {
		t.Fatalf("mounted secret: %+v, %v", got, err)
	}
	// Values from a Secret made from files end in a newline.
	env["R2_D_ACCESS_KEY_ID"], env["R2_D_SECRET_ACCESS_KEY"] = "id-d\n", " secret-d\r\n"
	if got, err := c.Resolve("R2_D"); err != nil || got.AccessKeyID != "id-d" || got.SecretAccessKey != "secret-d" {
		t.Fatalf("env with surrounding whitespace: %+v, %v", got, err)
	}
	env["R2_C_ACCESS_KEY_ID"], env["R2_C_SECRET_ACCESS_KEY"] = "id-c", "\n" // secret missing
	_, err = c.Resolve("R2_C")
	if err == nil {
		t.Fatal("half-configured credentials accepted")
	}
	if strings.Contains(err.Error(), "id-c") {
		t.Fatalf("error names a key value: %v", err)
	}
}

func TestR2Defaults(t *testing.T) {
	if got := objstore.R2Endpoint("0123abcd"); got != "https://0123abcd.r2.cloudflarestorage.com" {
		t.Fatalf("R2Endpoint = %q", got)
	}
	s, err := objstore.New(objstore.Options{Credentials: objstore.StaticCredentials{"A": {"k", "s"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	b, _ := s.Bucket(objstore.Target{Endpoint: objstore.R2Endpoint("acct"), CredentialsRef: "A"})
	if r := objstore.ClientRegion(b); r != "auto" {
		t.Fatalf("region without configuration = %q, want auto (R2)", r)
	}
}

func writeSecret(t *testing.T, dir, ref, id, secret string) {
	t.Helper()
	d := filepath.Join(dir, ref)
	if err := os.MkdirAll(d, 0o700); err != nil {
		t.Fatal(err)
	}
	for f, v := range map[string]string{"access_key_id": id + "\n", "secret_access_key": secret + "\n"} {
		if err := os.WriteFile(filepath.Join(d, f), []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// A secret rotated in its mounted file takes effect once CredentialsTTL
// has passed, without a restart, even with the same access key id (the
// SDK would keep signing with the old secret): a bucket refused with the
// old secret accepts the same write with the new one.
func TestRotatedSecretTakesEffect(t *testing.T) {
	g := testenv.S3(t)
	name := testenv.NewBucket(t, g)
	dir := t.TempDir()
	writeSecret(t, dir, "R2_A", g.AccessKey, "the-old-secret")
	s, err := objstore.New(objstore.Options{
		Credentials:    objstore.EnvCredentials{Dir: dir, Getenv: func(string) string { return "" }},
		CredentialsTTL: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// A handle per write, as the upload service takes one per attempt.
	put := func() error {
		b, err := s.Bucket(objstore.Target{ID: name, Name: name, Endpoint: g.Endpoint, Region: g.Region, CredentialsRef: "R2_A", PathStyle: true})
		if err != nil {
			t.Fatal(err)
		}
		_, err = b.Put(ctx, objstore.PutInput{Key: "rotated", ContentType: "application/octet-stream"}, []byte("x"))
		return err
	}
	if err := put(); objstore.Classify(ctx, err) != objstore.BucketError {
		t.Fatalf("put with the old secret: %v, want refused", err)
	}
	writeSecret(t, dir, "R2_A", g.AccessKey, g.SecretKey)
	for deadline := time.Now().Add(10 * time.Second); ; {
		err := put()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("put 10 s after the secret was rotated: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Metadata that cannot travel as a header is the request's fault: it is
// refused before anything is sent, and never counts against the bucket.
func TestInvalidMetadataIsNotTheBucketsFault(t *testing.T) {
	b, proxy := newBucket(t, objstore.Options{}, true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	proxy.Counts()
	many := map[string]string{}
	for i := range 200 {
		many[fmt.Sprintf("k%03d", i)] = "v"
	}
	const ct = "application/octet-stream"
	for name, in := range map[string]objstore.PutInput{
		"line break in a value":            {Metadata: map[string]string{"note": "one\ntwo"}},
		"key not ASCII":                    {Metadata: map[string]string{"clé": "v"}},
		"entries beyond the header budget": {Metadata: many},
		"control char in a type parameter": {ContentType: ct + "; charset=\"utf-8\x01\""},
		"type not ASCII":                   {ContentType: ct + "; name=\"café\""},
	} {
		in.Key = "k"
		if in.ContentType == "" {
			in.ContentType = ct
		}
		_, perr := b.Put(ctx, in, []byte("x"))
		_, merr := b.CreateMultipart(ctx, in)
		for _, err := range []error{perr, merr} {
			if !errors.Is(err, objstore.ErrInvalidRequest) || objstore.Classify(ctx, err) != objstore.NotBucketFault {
				t.Fatalf("%s: %v (classified %v), want ErrInvalidRequest, not the bucket's fault", name, err, objstore.Classify(ctx, err))
			}
		}
	}
	if c := proxy.Counts(); len(c) != 0 {
		t.Fatalf("invalid requests reached the bucket: %v", c)
	}
}
