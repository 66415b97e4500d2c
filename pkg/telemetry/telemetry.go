package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/otlptranslator"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// Options configure New.
type Options struct {
	// ServiceName becomes the service.name resource attribute (target_info
	// in Prometheus, the service in trace backends). Required.
	ServiceName string
	// Version becomes service.version.
	Version string
	// OTLPEndpoint is the OTLP/gRPC trace collector. "host:port" dials
	// without TLS (an in-cluster collector); "http://host:port" or
	// "https://host:port" choose explicitly. Empty disables trace export:
	// spans are not recorded, but trace context still propagates.
	// The standard OTEL_EXPORTER_OTLP_* and OTEL_TRACES_SAMPLER variables
	// still apply (headers, timeouts, sampling).
	OTLPEndpoint string
	// Logger receives errors from the metrics handler and the HTTP server.
	// Nil means slog.Default().
	Logger *slog.Logger
}

// Telemetry holds one process's providers, its Prometheus registry and the
// bucketlb instruments. Nothing in it is global: pass it (or the parts a
// component needs) explicitly.
type Telemetry struct {
	log        *slog.Logger
	registry   *prometheus.Registry
	meters     *sdkmetric.MeterProvider
	traces     trace.TracerProvider
	sdkTraces  *sdktrace.TracerProvider // nil when export is off
	propagator propagation.TextMapPropagator
	metrics    *Metrics
	closed     atomic.Bool

	// Set by StartService: the metrics server runs until Shutdown.
	metricsAddr net.Addr
	stopServing context.CancelFunc
	served      chan struct{}
}

// shutdownTimeout bounds Shutdown: a trace collector that takes
// connections and never answers must not hold a stopping process past its
// termination grace period.
const shutdownTimeout = 5 * time.Second

// New builds the providers. It does not contact the collector: the OTLP
// exporter connects lazily, so New succeeds while the collector is down.
func New(ctx context.Context, opts Options) (*Telemetry, error) {
	if opts.ServiceName == "" {
		return nil, errors.New("telemetry: ServiceName is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	res, err := resource.New(ctx,
		resource.WithTelemetrySDK(),
		resource.WithAttributes(
			attribute.String("service.name", opts.ServiceName),
			attribute.String("service.version", opts.Version),
		),
	)
	if err != nil {
		return nil, fmt.Errorf("telemetry: resource: %w", err)
	}

	reg := prometheus.NewRegistry()
	if err := reg.Register(collectors.NewGoCollector()); err != nil {
		return nil, fmt.Errorf("telemetry: go collector: %w", err)
	}
	if err := reg.Register(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})); err != nil {
		return nil, fmt.Errorf("telemetry: process collector: %w", err)
	}
	exp, err := otelprom.New(
		otelprom.WithRegisterer(reg),
		// Pinned so names do not change when the exporter's default does:
		// dots become underscores, units and _total are appended.
		otelprom.WithTranslationStrategy(otlptranslator.UnderscoreEscapingWithSuffixes),
	)
	if err != nil {
		return nil, fmt.Errorf("telemetry: prometheus exporter: %w", err)
	}
	t := &Telemetry{
		log:      opts.Logger,
		registry: reg,
		meters:   sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp), sdkmetric.WithResource(res)),
		propagator: propagation.NewCompositeTextMapPropagator(
			propagation.TraceContext{}, propagation.Baggage{},
		),
		traces: noop.NewTracerProvider(),
	}
	if opts.OTLPEndpoint != "" {
		exporter, err := otlptracegrpc.New(ctx, endpointOptions(opts.OTLPEndpoint)...)
		if err != nil {
			_ = t.meters.Shutdown(ctx)
			return nil, fmt.Errorf("telemetry: otlp trace exporter for %q: %w", opts.OTLPEndpoint, err)
		}
		// No sampler given: the SDK's default is parent-based always-on,
		// overridable with OTEL_TRACES_SAMPLER(_ARG).
		t.sdkTraces = sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
		t.traces = t.sdkTraces
	}
	t.metrics, err = NewMetrics(t.meters)
	if err != nil {
		_ = t.Shutdown(ctx)
		return nil, err
	}
	return t, nil
}

func endpointOptions(endpoint string) []otlptracegrpc.Option {
	if strings.Contains(endpoint, "://") {
		return []otlptracegrpc.Option{otlptracegrpc.WithEndpointURL(endpoint)}
	}
	return []otlptracegrpc.Option{otlptracegrpc.WithEndpoint(endpoint), otlptracegrpc.WithInsecure()}
}

// MeterProvider is the SDK meter provider, exported through Prometheus.
func (t *Telemetry) MeterProvider() metric.MeterProvider { return t.meters }

// TracerProvider is the SDK tracer provider when an OTLP endpoint is set,
// a no-op provider otherwise.
func (t *Telemetry) TracerProvider() trace.TracerProvider { return t.traces }

// TracesExported reports whether spans go anywhere (an OTLP endpoint is
// set), so costly instrumentation can stay off when they do not.
func (t *Telemetry) TracesExported() bool { return t.sdkTraces != nil }

// Propagator carries W3C trace context and baggage across calls.
func (t *Telemetry) Propagator() propagation.TextMapPropagator { return t.propagator }

// Registry is this process's own Prometheus registry (Go and process
// collectors plus every OTel instrument). Register extra collectors here,
// never on prometheus.DefaultRegisterer.
func (t *Telemetry) Registry() *prometheus.Registry { return t.registry }

// Metrics are the bucketlb domain instruments.
func (t *Telemetry) Metrics() *Metrics { return t.metrics }

// Shutdown flushes pending spans and stops the providers; /healthz answers
// 503 from then on. Call it after the servers that record through it have
// stopped. Safe to call more than once.
func (t *Telemetry) Shutdown(ctx context.Context) error {
	if t.closed.Swap(true) {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, shutdownTimeout)
	defer cancel()
	if t.stopServing != nil {
		// Last: the metrics of a drain are scraped until the end.
		defer func() {
			t.stopServing()
			select {
			case <-t.served:
			case <-ctx.Done():
			}
		}()
	}
	var errs []error
	if t.sdkTraces != nil {
		if err := t.sdkTraces.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("telemetry: tracer provider shutdown: %w", err))
		}
	}
	if err := t.meters.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("telemetry: meter provider shutdown: %w", err))
	}
	return errors.Join(errs...)
}
