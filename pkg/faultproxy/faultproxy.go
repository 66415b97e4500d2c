// Package faultproxy is an HTTP reverse proxy that injects faults in
// front of one S3 endpoint, so tests can make a single bucket fail while
// the others work: 5xx answers, connection resets, stalls, throttling and
// corrupted bodies.
// It also counts requests by method, which benchmarks use to show how
// many billable S3 operations an upload costs.
package faultproxy

import (
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

// Mode is the fault injected.
type Mode int32

const (
	// Pass forwards every request.
	Pass Mode = iota
	// Error5xx answers 500 InternalError.
	Error5xx
	// Reset closes the connection without an answer.
	Reset
	// Stall holds the request until the client gives up or StallFor ends.
	Stall
	// Throttle answers 429 like R2 does.
	Throttle
	// LoseResponse forwards the request, so the write lands, then resets
	// the connection instead of answering: the ambiguous failure a client
	// sees when a response is lost on the way back.
	LoseResponse
	// Corrupt forwards the request with one byte of its body flipped, as
	// a bit flip on the way would.
	Corrupt
	// StallBody forwards the request and answers with the status, the
	// headers and the first half of the body, then holds the connection
	// open without another byte until the client gives up or StallFor
	// ends: a bucket that stops sending midway.
	StallBody
	// Truncate forwards the request and answers with the status, the
	// headers and the first half of the body, then closes the connection:
	// a body cut short of its Content-Length.
	Truncate
	// DropContentRange forwards the request and answers a range read with
	// 200 and no Content-Range, as a server that ignores Range does (it
	// sends the whole object instead, which a reader must not take for
	// the range it asked for).
	DropContentRange
	// DropContentLength forwards the request and answers without a
	// Content-Length, chunked, as a proxy on the way may.
	DropContentLength
	// CorruptAnswer forwards the request and answers with one bit of the
	// body flipped, as a bit flip on the way back would.
	CorruptAnswer
	// Unapplied answers 204 No Content without forwarding: a request the
	// bucket says it did that did not take, such as an abort that a part
	// still landing outlives.
	Unapplied
	// RequestTimeout answers 400 RequestTimeout without forwarding, as S3
	// does when a request's body stops arriving: the status says bad
	// request, the code says the path was slow and another try may pass.
	RequestTimeout
	// IncompleteBody answers 400 IncompleteBody without forwarding, as S3
	// does when fewer bytes arrive than the Content-Length announced: the
	// body was cut short on the way.
	IncompleteBody
	// HTMLBadRequest answers 400 with an HTML page and no S3 error
	// document, as a proxy or CDN in front of a bucket may.
	HTMLBadRequest
)

// Proxy is a running fault-injecting proxy.
type Proxy struct {
	srv      *httptest.Server
	upstream *http.Transport // to the proxied server
	mode     atomic.Int32
	StallFor time.Duration

	only      atomic.Value // string: the S3 operation faults apply to; "" = all
	limited   atomic.Bool  // faults apply only while left > 0
	left      atomic.Int64
	closed    chan struct{}
	closeOnce sync.Once

	mu     sync.Mutex
	counts map[string]int
	seqOp  string // the operation seq applies to
	seq    []Mode
}

// New starts a proxy on 127.0.0.1 in front of target (e.g. the gateway).
func New(target string) (*Proxy, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}
	p := &Proxy{StallFor: time.Minute, counts: map[string]int{}, closed: make(chan struct{}),
		upstream: &http.Transport{MaxIdleConnsPerHost: 64, DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext}}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(u)
			pr.Out.Host = pr.In.Host // the Host the client signed (SigV4 signs it)
		},
		Transport: p.upstream,
		// A client that goes mid-body (a cancelled upload, a test's end)
		// is routine here; the standard logger would print each one into
		// test and benchmark output.
		ErrorLog: log.New(io.Discard, "", 0),
	}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		op := p.count(r)
		mode := Mode(p.mode.Load())
		if only, _ := p.only.Load().(string); only != "" && only != op {
			mode = Pass
		}
		if m, ok := p.nextInSequence(op); ok {
			mode = m
		} else if mode != Pass && p.limited.Load() && p.left.Add(-1) < 0 {
			mode = Pass
		}
		switch mode {
		case Error5xx:
			s3Error(w, http.StatusInternalServerError, "InternalError")
			return
		case RequestTimeout:
			s3Error(w, http.StatusBadRequest, "RequestTimeout")
			return
		case IncompleteBody:
			s3Error(w, http.StatusBadRequest, "IncompleteBody")
			return
		case Throttle:
			w.WriteHeader(http.StatusTooManyRequests)
			return
		case HTMLBadRequest:
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(http.StatusBadRequest)
			_, _ = io.WriteString(w, "<html><body><h1>400 Bad Request</h1><hr></body></html>")
			return
		case Unapplied:
			w.WriteHeader(http.StatusNoContent)
			return
		case Reset:
			reset(w)
			return
		case Corrupt:
			r.Body = struct {
				io.Reader
				io.Closer
			}{&flipReader{r: r.Body, at: r.ContentLength / 2}, r.Body}
		case LoseResponse:
			rp.ServeHTTP(httptest.NewRecorder(), r)
			reset(w)
			return
		case StallBody:
			halfAnswer(rp, w, r)
			p.stall(r)
			return
		case Truncate:
			halfAnswer(rp, w, r)
			hangUp(w, false)
			return
		case CorruptAnswer:
			rec := forward(rp, w, r)
			w.WriteHeader(rec.Code)
			_, _ = io.Copy(w, &flipReader{r: rec.Body, at: int64(rec.Body.Len() / 2)})
			return
		case DropContentLength:
			rec := forward(rp, w, r)
			w.Header().Del("Content-Length")
			w.WriteHeader(rec.Code)
			if f, ok := w.(http.Flusher); ok {
				f.Flush() // headers out first: the body goes chunked
			}
			_, _ = w.Write(rec.Body.Bytes())
			return
		case DropContentRange:
			rec := forward(rp, w, r)
			w.Header().Del("Content-Range")
			code := rec.Code
			if code == http.StatusPartialContent {
				code = http.StatusOK
			}
			w.WriteHeader(code)
			_, _ = w.Write(rec.Body.Bytes())
			return
		case Stall:
			// Read the body first: the server notices a client that gave
			// up only once the request body is consumed.
			_, _ = io.Copy(io.Discard, r.Body)
			p.stall(r)
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	return p, nil
}

// s3Error answers with an S3 error document carrying code.
func s3Error(w http.ResponseWriter, status int, code string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>` + code + `</Code><Message>injected</Message></Error>`))
}

// forward sends r on to the bucket and records the whole answer, whose
// headers it copies to w; the caller sends the status and the body it
// makes of it.
func forward(rp http.Handler, w http.ResponseWriter, r *http.Request) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	rp.ServeHTTP(rec, r)
	maps.Copy(w.Header(), rec.Header())
	return rec
}

// halfAnswer forwards r and sends the client the answer's status, its
// headers (with the whole body's Content-Length) and the first half of
// its body.
func halfAnswer(rp http.Handler, w http.ResponseWriter, r *http.Request) {
	rec := forward(rp, w, r)
	// An empty body is whole at once, and the client would send its next
	// request on this connection while the handler still holds it: that
	// request would reach the bucket late, after its client gave up.
	w.Header().Set("Connection", "close")
	w.WriteHeader(rec.Code)
	body := rec.Body.Bytes()
	_, _ = w.Write(body[:len(body)/2])
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
}

// stall waits until r's client gives up, the proxy closes or StallFor ends.
func (p *Proxy) stall(r *http.Request) {
	t := time.NewTimer(p.StallFor)
	defer t.Stop()
	select {
	case <-r.Context().Done():
	case <-p.closed:
	case <-t.C:
	}
}

// flipReader flips the lowest bit of the byte at offset at.
type flipReader struct {
	r       io.Reader
	at, off int64
}

func (f *flipReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if f.at >= f.off && f.at < f.off+int64(n) {
		p[f.at-f.off] ^= 1
	}
	f.off += int64(n)
	return n, err
}

// reset closes the client's connection with a TCP RST and no answer.
func reset(w http.ResponseWriter) { hangUp(w, true) }

// hangUp closes the client's connection, with an RST or else a FIN.
func hangUp(w http.ResponseWriter, rst bool) {
	if hj, ok := w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			if tc, ok := conn.(*net.TCPConn); ok && rst {
				_ = tc.SetLinger(0) // RST instead of FIN
			}
			conn.Close()
			return
		}
	}
	panic(http.ErrAbortHandler)
}

// URL is the proxy's base URL.
func (p *Proxy) URL() string { return p.srv.URL }

// Set switches the fault mode for every request; it applies to the next
// request.
func (p *Proxy) Set(m Mode) {
	p.limited.Store(false)
	p.only.Store("")
	p.mode.Store(int32(m))
}

// Close stops the proxy.
func (p *Proxy) Close() {
	p.closeOnce.Do(func() { close(p.closed) })
	p.srv.CloseClientConnections()
	p.srv.Close()
	// Its connections to the upstream would otherwise live as long as
	// the upstream, a gateway shared by a whole test binary.
	p.upstream.CloseIdleConnections()
}

// SetFor switches the fault mode for one S3 operation only (as named by
// Counts, e.g. "CompleteMultipartUpload"); every other request passes.
func (p *Proxy) SetFor(op string, m Mode) {
	p.limited.Store(false)
	p.only.Store(op)
	p.mode.Store(int32(m))
}

// SetForNext is SetFor for the next n requests of op only; later ones pass.
func (p *Proxy) SetForNext(op string, m Mode, n int) {
	p.left.Store(int64(n))
	p.limited.Store(true)
	p.only.Store(op)
	p.mode.Store(int32(m))
}

// SetSequence gives the next len(modes) requests of op these modes, in
// order (a lost answer, then a 5xx, say); the sequence goes before any
// mode set otherwise, and later requests follow that mode again.
func (p *Proxy) SetSequence(op string, modes ...Mode) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seqOp, p.seq = op, append([]Mode(nil), modes...)
}

func (p *Proxy) nextInSequence(op string) (Mode, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if op != p.seqOp || len(p.seq) == 0 {
		return Pass, false
	}
	m := p.seq[0]
	p.seq = p.seq[1:]
	return m, true
}

// count records r under its S3 operation name and returns that name.
func (p *Proxy) count(r *http.Request) string {
	op := r.Method
	q := r.URL.Query()
	switch {
	case r.Method == http.MethodPut && q.Has("partNumber"):
		op = "UploadPart"
	case r.Method == http.MethodPost && q.Has("uploads"):
		op = "CreateMultipartUpload"
	case r.Method == http.MethodPost && q.Has("uploadId"):
		op = "CompleteMultipartUpload"
	case r.Method == http.MethodDelete && q.Has("uploadId"):
		op = "AbortMultipartUpload"
	case r.Method == http.MethodGet && q.Has("uploads"):
		op = "ListMultipartUploads"
	case r.Method == http.MethodGet && q.Has("uploadId"):
		op = "ListParts"
	case r.Method == http.MethodPut:
		op = "PutObject"
	case r.Method == http.MethodGet:
		op = "GetObject"
	case r.Method == http.MethodHead:
		op = "HeadObject"
	case r.Method == http.MethodDelete:
		op = "DeleteObject"
	}
	p.mu.Lock()
	p.counts[op]++
	p.mu.Unlock()
	return op
}

// Counts returns requests seen per S3 operation, and resets the counters.
func (p *Proxy) Counts() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	c := p.counts
	p.counts = map[string]int{}
	return c
}
