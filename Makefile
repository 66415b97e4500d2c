SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

# Pinned tools, installed into ./bin only when missing.
BIN := $(CURDIR)/bin
BUF_VERSION := v1.75.0
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
GRPCURL_VERSION := v1.9.4
# v5.8.3+ needs Go 1.27.
KUSTOMIZE_VERSION := v5.8.2
STATICCHECK_VERSION := v0.8.2
PROMTOOL_VERSION := v0.316.0

MODULES := ./pkg/... ./services/allocator/... ./services/upload/... ./services/bucketctl/...
GO_TEST_FLAGS ?= -race -count=1 -timeout 20m

DATA_DIR ?= $(CURDIR)/.data

.PHONY: help
help: ## Show this help.
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/buf:
	GOBIN=$(BIN) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(BIN)/staticcheck:
	GOBIN=$(BIN) go install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
$(BIN)/protoc-gen-go:
	GOBIN=$(BIN) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
$(BIN)/protoc-gen-go-grpc:
	GOBIN=$(BIN) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
$(BIN)/grpcurl:
	GOBIN=$(BIN) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)
$(BIN)/kustomize:
	GOBIN=$(BIN) go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)
$(BIN)/promtool:
	GOBIN=$(BIN) go install github.com/prometheus/prometheus/cmd/promtool@$(PROMTOOL_VERSION)

.PHONY: tools
tools: $(BIN)/buf $(BIN)/protoc-gen-go $(BIN)/protoc-gen-go-grpc ## Install the pinned build tools into ./bin.

.PHONY: grpcurl
grpcurl: $(BIN)/grpcurl ## Install grpcurl into ./bin (for the README examples).

.PHONY: proto
proto: tools ## Regenerate Go code from proto/ with buf (local plugins).
	$(BIN)/buf format -w
	$(BIN)/buf generate

.PHONY: proto-check
proto-check: tools ## Fail if proto/ is not formatted or pkg/api is stale.
	$(BIN)/buf format --diff --exit-code
	tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	$(BIN)/buf generate -o $$tmp; \
	if ! diff -r $$tmp/pkg/api pkg/api; then \
	  echo "generated code in pkg/api is stale: run 'make proto' and commit" >&2; exit 1; fi

.PHONY: lint
lint: tools $(BIN)/staticcheck ## buf lint, gofmt, go vet, staticcheck and tidy go.mod files.
	$(BIN)/buf lint
	@out=$$(gofmt -l pkg services); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet $(MODULES)
	$(BIN)/staticcheck $(MODULES)
	@for m in pkg services/allocator services/upload services/bucketctl; do \
	  (cd $$m && go mod tidy -diff >/dev/null) || { echo "$$m/go.mod is not tidy: run go mod tidy there and commit"; exit 1; }; done

.PHONY: breaking
breaking: tools ## Check proto/ for breaking changes against the main branch.
	$(BIN)/buf breaking --against '.git#branch=main'

.PHONY: manifests-check
manifests-check: $(BIN)/kustomize ## Build both kustomize overlays.
	$(BIN)/kustomize build deployments/overlays/dev >/dev/null
	$(BIN)/kustomize build deployments/overlays/production >/dev/null

.PHONY: rules-check
rules-check: $(BIN)/promtool ## Check the Prometheus rules and run their unit tests (deployments/monitoring).
	$(BIN)/promtool check rules deployments/monitoring/bucketlb.rules.yaml
	$(BIN)/promtool test rules deployments/monitoring/bucketlb.rules_test.yaml

.PHONY: test
test: proto-check lint manifests-check rules-check ## Install tools, check generated code, lint, manifests and alert rules, run every test with -race.
	BUCKETLB_KUSTOMIZE=$(BIN)/kustomize go test $(GO_TEST_FLAGS) $(MODULES)

.PHONY: bench
bench: ## Run the benchmarks and print figures with ratios against same-run baselines.
	go test -run '^$$' -bench . -benchtime 1x -timeout 30m $(MODULES)

.PHONY: build
build: ## Build the three binaries into ./bin.
	go build -o $(BIN)/allocator ./services/allocator
	go build -o $(BIN)/upload ./services/upload
	go build -o $(BIN)/bucketctl ./services/bucketctl

.PHONY: run
run: build ## Start the whole system locally (embedded etcd, both services, 3 local S3 buckets).
	$(BIN)/bucketctl dev --data-dir $(DATA_DIR) $(DEV_FLAGS)

.PHONY: deploy-check
deploy-check: $(BIN)/kustomize ## Build the kustomize overlays, parse dashboard/rules (JSON, YAML, PromQL), check manifests and metric names (needs python3).
	for overlay in dev production; do \
	  $(BIN)/kustomize build deployments/overlays/$$overlay > /dev/null; \
	  echo "deployments/overlays/$$overlay: builds"; done
	python3 -c 'import json,sys; json.load(open(sys.argv[1]))' deployments/monitoring/grafana-dashboard.json
	cd deployments/tools/promqlcheck && GOWORK=off go run . ../../monitoring/bucketlb.rules.yaml ../../monitoring/grafana-dashboard.json
	BUCKETLB_KUSTOMIZE=$(BIN)/kustomize go test -count=1 -run 'TestDeployment|TestOverlayManifests' ./pkg/telemetry/
