package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Handler serves GET /metrics (this process's registry, text or
// OpenMetrics by content negotiation) and GET /healthz (200 until
// Shutdown, 503 after, while Shutdown flushes traces).
func (t *Telemetry) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(t.registry, promhttp.HandlerOpts{
		ErrorLog:          slogPrinter{t.log},
		ErrorHandling:     promhttp.ContinueOnError,
		Registry:          t.registry, // counts promhttp_metric_handler_errors_total
		EnableOpenMetrics: true,
		Timeout:           10 * time.Second,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if t.closed.Load() {
			http.Error(w, "shutting down", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// Serve serves Handler on lis until ctx ends, then shuts the HTTP server
// down within five seconds. It returns nil after a shutdown caused by ctx.
func (t *Telemetry) Serve(ctx context.Context, lis net.Listener) error {
	srv := &http.Server{
		Handler:           t.Handler(),
		ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:          slog.NewLogLogger(t.log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("telemetry: serve metrics on %s: %w", lis.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	shutdownErr := srv.Shutdown(sctx)
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("telemetry: serve metrics on %s: %w", lis.Addr(), err)
	}
	if shutdownErr != nil {
		_ = srv.Close()
		return fmt.Errorf("telemetry: stop metrics server: %w", shutdownErr)
	}
	return nil
}

// slogPrinter adapts slog to promhttp's Println-style logger.
type slogPrinter struct{ log *slog.Logger }

func (p slogPrinter) Println(v ...any) {
	p.log.Error("metrics handler", "error", fmt.Sprint(v...))
}

// StartService is what a service main needs: telemetry for service,
// traces exported when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, and
// /metrics and /healthz served on metricsAddr (empty: not served) until
// Shutdown, which the caller calls after its servers have stopped: a
// service draining its calls after a signal (ctx ended) is still scraped.
func StartService(ctx context.Context, service, version, metricsAddr string, log *slog.Logger) (*Telemetry, error) {
	t, err := New(ctx, Options{
		ServiceName: service, Version: version, Logger: log,
		OTLPEndpoint: os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
	})
	if err != nil {
		return nil, err
	}
	if metricsAddr == "" {
		return t, nil
	}
	lis, err := net.Listen("tcp", metricsAddr)
	if err != nil {
		_ = t.Shutdown(ctx)
		return nil, fmt.Errorf("telemetry: metrics listen: %w", err)
	}
	serveCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	t.metricsAddr, t.stopServing, t.served = lis.Addr(), stop, make(chan struct{})
	go func() {
		defer close(t.served)
		_ = t.Serve(serveCtx, lis)
	}()
	return t, nil
}

// MetricsAddr is where StartService serves /metrics ("" when it does not).
func (t *Telemetry) MetricsAddr() string {
	if t.metricsAddr == nil {
		return ""
	}
	return t.metricsAddr.String()
}
