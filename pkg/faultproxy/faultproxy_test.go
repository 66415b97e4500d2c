package faultproxy_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bucketlb/bucketlb/pkg/faultproxy"
)

// Each mode fails the way it says, switching applies to the next request,
// LoseResponse still delivers the request to the backend, and requests are
// counted by S3 operation.
func TestModesAndCounts(t *testing.T) {
	var hits atomic.Int32
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		_, _ = io.Copy(io.Discard, r.Body)
		_, _ = w.Write([]byte("ok"))
	}))
	defer backend.Close()
	p, err := faultproxy.New(backend.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	p.StallFor = 10 * time.Second
	hc := &http.Client{Transport: &http.Transport{}}
	defer hc.CloseIdleConnections()
	do := func(method, path string, timeout time.Duration) (int, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, method, p.URL()+path, strings.NewReader("body"))
		resp, err := hc.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, nil
	}

	cases := []struct {
		mode      faultproxy.Mode
		code      int
		wantErr   bool
		reachesS3 bool
	}{
		{faultproxy.Pass, 200, false, true},
		{faultproxy.Error5xx, 500, false, false},
		{faultproxy.Throttle, 429, false, false},
		{faultproxy.Reset, 0, true, false},
		{faultproxy.LoseResponse, 0, true, true},
		{faultproxy.Stall, 0, true, false},
	}
	for _, tc := range cases {
		p.Set(tc.mode)
		before := hits.Load()
		code, err := do(http.MethodPut, "/b/k", 300*time.Millisecond)
		if (err != nil) != tc.wantErr || code != tc.code {
			t.Fatalf("mode %d: code %d err %v, want code %d err=%v", tc.mode, code, err, tc.code, tc.wantErr)
		}
		if tc.mode == faultproxy.Stall && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("stall: %v, want the client's deadline", err)
		}
		if got := hits.Load() > before; got != tc.reachesS3 {
			t.Fatalf("mode %d: backend reached=%v, want %v", tc.mode, got, tc.reachesS3)
		}
	}
	p.Set(faultproxy.Pass)
	p.Counts()
	for _, r := range []struct{ method, path string }{
		{http.MethodPut, "/b/k"}, {http.MethodPost, "/b/k?uploads"}, {http.MethodPut, "/b/k?partNumber=1&uploadId=x"},
		{http.MethodPut, "/b/k?partNumber=2&uploadId=x"}, {http.MethodPost, "/b/k?uploadId=x"},
		{http.MethodDelete, "/b/k?uploadId=y"}, {http.MethodGet, "/b/k"}, {http.MethodHead, "/b/k"}, {http.MethodDelete, "/b/k"},
	} {
		if _, err := do(r.method, r.path, 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]int{"PutObject": 1, "CreateMultipartUpload": 1, "UploadPart": 2, "CompleteMultipartUpload": 1,
		"AbortMultipartUpload": 1, "GetObject": 1, "HeadObject": 1, "DeleteObject": 1}
	got := p.Counts()
	for op, n := range want {
		if got[op] != n {
			t.Fatalf("counts %v, want %v", got, want)
		}
	}
	if len(got) != len(want) {
		t.Fatalf("counts %v, want %v", got, want)
	}
	if len(p.Counts()) != 0 {
		t.Fatal("Counts did not reset")
	}
}

// SetFor limits faults to one S3 operation.
func TestSetForOneOperation(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok")) }))
	defer backend.Close()
	p, err := faultproxy.New(backend.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	p.SetFor("CompleteMultipartUpload", faultproxy.Error5xx)
	code := func(method, path string) int {
		req, _ := http.NewRequest(method, p.URL()+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if c := code(http.MethodPut, "/b/k?partNumber=1&uploadId=x"); c != 200 {
		t.Fatalf("UploadPart got %d while only Complete fails", c)
	}
	if c := code(http.MethodPost, "/b/k?uploadId=x"); c != 500 {
		t.Fatalf("Complete got %d, want 500", c)
	}
	p.Set(faultproxy.Error5xx)
	if c := code(http.MethodGet, "/b/k"); c != 500 {
		t.Fatalf("Set after SetFor must apply to all requests; got %d", c)
	}
	http.DefaultClient.CloseIdleConnections()
}

// SetForNext faults only the next n requests of the operation; Corrupt
// forwards the body with exactly one byte changed.
func TestSetForNextAndCorrupt(t *testing.T) {
	bodies := make(chan []byte, 4)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		bodies <- b
	}))
	defer backend.Close()
	p, err := faultproxy.New(backend.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	sent := []byte(strings.Repeat("0123456789", 100))
	put := func() []byte {
		req, _ := http.NewRequest(http.MethodPut, p.URL()+"/b/k?partNumber=1&uploadId=x", bytes.NewReader(sent))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return <-bodies
	}
	p.SetForNext("UploadPart", faultproxy.Corrupt, 1)
	got := put()
	diff := 0
	for i := range got {
		if got[i] != sent[i] {
			diff++
		}
	}
	if len(got) != len(sent) || diff != 1 {
		t.Fatalf("corrupted body: %d bytes, %d differing; want %d bytes, 1 differing", len(got), diff, len(sent))
	}
	if got := put(); !bytes.Equal(got, sent) {
		t.Fatal("the request after the limited fault was corrupted too")
	}
}

// CorruptAnswer flips one bit of the answer's body and keeps its length
// and headers.
func TestCorruptAnswer(t *testing.T) {
	stored := []byte(strings.Repeat("0123456789", 100))
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ETag", `"e"`)
		_, _ = w.Write(stored)
	}))
	defer backend.Close()
	p, err := faultproxy.New(backend.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	get := func() ([]byte, string) {
		resp, err := http.Get(p.URL() + "/b/k")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return b, resp.Header.Get("ETag")
	}
	p.SetForNext("GetObject", faultproxy.CorruptAnswer, 1)
	got, etag := get()
	diff := 0
	for i := range min(len(got), len(stored)) {
		if got[i] != stored[i] {
			diff++
		}
	}
	if len(got) != len(stored) || diff != 1 || etag != `"e"` {
		t.Fatalf("corrupted answer: %d bytes, %d differing, ETag %s; want %d bytes, 1 differing, the backend's ETag", len(got), diff, etag, len(stored))
	}
	if got, _ := get(); !bytes.Equal(got, stored) {
		t.Fatal("the answer after the limited fault was corrupted too")
	}
}

// A closed proxy leaves no connection to its upstream behind: the shared
// gateway of a test binary outlives every proxy in front of it. Found by
// the soak review.
func TestCloseLeavesNoUpstreamConnections(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") }))
	defer up.Close()
	readLoops := func() int {
		buf := make([]byte, 1<<20)
		return strings.Count(string(buf[:runtime.Stack(buf, true)]), "net/http.(*persistConn).readLoop")
	}
	before := readLoops()
	for i := 0; i < 3; i++ {
		p, err := faultproxy.New(up.URL)
		if err != nil {
			t.Fatal(err)
		}
		c := &http.Client{Transport: &http.Transport{}}
		resp, err := c.Get(p.URL() + "/b/k")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		c.CloseIdleConnections()
		p.Close()
	}
	for deadline := time.Now().Add(5 * time.Second); readLoops() > before; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections to the upstream outlive their closed proxies", readLoops()-before)
		}
	}
}
