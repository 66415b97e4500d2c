package telemetry

import (
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc/filters"
	"google.golang.org/grpc"
)

// untraced leaves out calls that would drown the rest: kubelet's health
// probes (every few seconds per pod) and reflection (grpcurl).
func untraced() otelgrpc.Filter {
	return filters.None(
		filters.HealthCheck(),
		filters.ServicePrefix("grpc.reflection."),
	)
}

func (t *Telemetry) otelgrpcOptions() []otelgrpc.Option {
	return []otelgrpc.Option{
		otelgrpc.WithMeterProvider(t.meters),
		otelgrpc.WithTracerProvider(t.traces),
		otelgrpc.WithPropagators(t.propagator),
		otelgrpc.WithFilter(untraced()),
	}
}

// ServerOptions install the otelgrpc server stats handler with this
// Telemetry's providers: a span per call and the rpc.server.call.duration
// histogram (seconds; Prometheus rpc_server_call_duration_seconds with
// labels rpc_method, rpc_response_status_code, rpc_system_name). Health and
// reflection calls are not recorded.
func (t *Telemetry) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.StatsHandler(otelgrpc.NewServerHandler(t.otelgrpcOptions()...))}
}

// DialOptions install the otelgrpc client stats handler: a client span per
// call, trace context sent in metadata, and rpc.client.call.duration.
// Transport credentials and balancing are left to the caller.
func (t *Telemetry) DialOptions() []grpc.DialOption {
	return []grpc.DialOption{grpc.WithStatsHandler(otelgrpc.NewClientHandler(t.otelgrpcOptions()...))}
}
