// Package telemetry sets up OpenTelemetry metrics and traces for one
// bucketlb process without touching any global: New returns a Telemetry
// holding its own MeterProvider (exported through the OTel Prometheus
// exporter into its own prometheus.Registry, next to the Go and process
// collectors), a TracerProvider (OTLP/gRPC export when an endpoint is set,
// no-op otherwise), a W3C propagator, the otelgrpc stats handlers
// (ServerOptions, DialOptions) and the bucketlb domain instruments
// (Metrics). Handler serves /metrics and /healthz; Serve runs it on a
// listener (the services use :9090).
//
// Typical wiring in a service main:
//
//	tel, err := telemetry.New(ctx, telemetry.Options{ServiceName: "bucketlb-upload", Version: version, OTLPEndpoint: *otlp, Logger: log})
//	defer tel.Shutdown(shutdownCtx)            // after the gRPC server stopped
//	go tel.Serve(ctx, metricsListener)         // :9090
//	srv := grpcserver.New(grpcserver.Options{ServerOptions: tel.ServerOptions(), ...})
//	conn, _ := grpc.NewClient(target, append(tel.DialOptions(), creds)...)
//	uploader.New(uploader.Config{Metrics: tel.Metrics(), ...}, ...)
//
// # Metric names
//
// OTel instrument names are translated to Prometheus names by the pinned
// UnderscoreEscapingWithSuffixes strategy: dots become underscores, the
// unit is appended (By -> _bytes, s -> _seconds) and counters get _total.
// Every series also carries otel_scope_name/otel_scope_version labels;
// target_info carries service_name and service_version. The names below
// are asserted by TestMetricsScrapedOverHTTP and TestGRPCCallDurationScraped,
// and deployments/ (dashboard, alert rules) may use only these
// (TestDeploymentsUseEmittedMetrics).
//
// Recorded by the upload service:
//
//	bucketlb_uploads_total{outcome}                  counter   RecordUpload, once per Upload call
//	bucketlb_upload_bytes_total{bucket,outcome}      counter   RecordUpload (bytes received)
//	bucketlb_upload_duration_seconds{outcome}        histogram RecordUpload
//	bucketlb_upload_active_streams                   gauge     TrackUploadStream (HPA signal)
//	bucketlb_upload_buffer_bytes                     gauge     TrackUploadBuffer (buffers held)
//	bucketlb_upload_buffer_waiting                   gauge     TrackBufferWait (calls waiting for buffer room)
//	bucketlb_upload_failovers_total{bucket,reason}   counter   RecordFailover (bucket left: bucket_failed, no_keys)
//	bucketlb_upload_leftovers_total{bucket,kind}     counter   RecordLeftover (removal failed: object, multipart)
//	bucketlb_upload_corrupt_reads_total{bucket}      counter   RecordCorruptRead (bytes not matching the stored sha256)
//	bucketlb_upload_last_leftover_seconds{bucket,kind}  gauge  RecordLeftover (unix time of the last, for alerts)
//	bucketlb_upload_last_corrupt_read_seconds{bucket}   gauge  RecordCorruptRead (unix time of the last, for alerts)
//
// Recorded by the allocator service:
//
//	bucketlb_allocator_reservations_total{bucket,outcome}  counter  RecordReservation, once per Allocate
//	bucketlb_allocator_commits_total{bucket,outcome}       counter  RecordCommit, once per Commit
//	bucketlb_bucket_used_bytes{bucket}                     gauge    ObserveBuckets
//	bucketlb_bucket_reserved_bytes{bucket}                 gauge    ObserveBuckets
//	bucketlb_bucket_limit_bytes{bucket}                    gauge    ObserveBuckets
//	bucketlb_bucket_health_score{bucket}                   gauge    ObserveBuckets (0-100)
//	bucketlb_bucket_consecutive_failures{bucket}           gauge    ObserveBuckets
//	bucketlb_bucket_cooling_down{bucket}                   gauge    ObserveBuckets (0/1)
//	bucketlb_bucket_state{bucket,state}                    gauge    ObserveBuckets (1 for the current state)
//	bucketlb_etcd_up                                       gauge    ObserveAllocator (0/1)
//	bucketlb_allocator_leader                              gauge    ObserveAllocator (0/1)
//
// Every allocator replica publishes the bucket gauges from its watch
// cache, so queries aggregate them with max by (bucket).
//
// Recorded by every gRPC server:
//
//	bucketlb_grpc_panics_total{rpc_method}           counter   RecordPanic (panic-recovery interceptor)
//	rpc_server_call_duration_seconds{rpc_method,rpc_response_status_code,rpc_system_name}
//	                                                 histogram otelgrpc via ServerOptions
//	rpc_client_call_duration_seconds{...}            histogram otelgrpc via DialOptions
//
// rpc_method is the fully qualified "package.Service/Method"
// (e.g. bucketlb.upload.v1.UploadService/Upload), as otelgrpc >= v0.70
// writes it; health and reflection calls are not recorded. otelgrpc no
// longer emits message-size metrics, hence bucketlb_upload_bytes_total.
//
// # Outcomes
//
// The outcome label takes the values of the Outcome* constants; Outcome
// maps a returned error onto them. The upload success ratio the alerts
// use is (ok + replay) / (all - rejected - canceled): callers' mistakes
// and callers hanging up do not count against the service. An Upload
// marked CallerFault (a client cut off for sending too little, over its
// share of the buffers, or racing its own idempotency key) is rejected
// whatever its code.
package telemetry
