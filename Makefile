# gpuaas — see README.md. `make run` and `make test` do all set-up themselves.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

BIN       := $(CURDIR)/.gpuaas/bin
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
GOTEST    ?= go test
TEST_FLAGS ?= -count=1 -p 2 -timeout 30m
export PATH := $(BIN):$(PATH)

.PHONY: help
help:
	@echo "make run       the whole platform on this machine (Ctrl-C stops it)"
	@echo "make test      every test, with the dev stack started and stopped"
	@echo "make build     binaries into .gpuaas/bin"
	@echo "make bench     benchmarks, printed as ratios against same-run baselines"
	@echo "make generate  regenerate generated code (OpenAPI, AsyncAPI, protobuf)"
	@echo "make lint      go vet and staticcheck"

.PHONY: deps
deps:
	@devstack/scripts/ensure-deps.sh

.PHONY: build
build:
	@mkdir -p $(BIN)
	go build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./core/cmd/gpuaasd ./core/cmd/gpuaas \
		./plugins/stripe/cmd/gpuaas-plugin-stripe ./plugins/storage-s3/cmd/gpuaas-plugin-storage-s3 \
		./plugins/maas/cmd/gpuaas-plugin-maas ./plugins/maas/cmd/gpuaas-maas-sim ./plugins/manual/cmd/gpuaas-plugin-manual \
		./agent/cmd/gpuaas-agent
	go build -C devstack -o $(BIN)/ ./cmd/gpuaas-devstack

.PHONY: run
run: deps build
	@devstack/scripts/run.sh

# --- code generation -------------------------------------------------------------

.PHONY: tools
tools:
	@mkdir -p $(BIN)
	@go build -C tools -o $(BIN)/ \
		github.com/oapi-codegen/oapi-codegen/v2/cmd/oapi-codegen \
		google.golang.org/protobuf/cmd/protoc-gen-go \
		google.golang.org/grpc/cmd/protoc-gen-go-grpc \
		honnef.co/go/tools/cmd/staticcheck \
		./cmd/asyncapigen

.PHONY: generate
generate: tools
	$(BIN)/oapi-codegen -config api/oapi-codegen.server.yaml api/openapi.yaml
	$(BIN)/oapi-codegen -config api/oapi-codegen.client.yaml api/openapi.yaml
	$(BIN)/asyncapigen -in api/asyncapi.yaml -out core/internal/events/catalog.gen.go -pkg events
	@if [ -x sdk/generate.sh ]; then sdk/generate.sh; fi

# Fails when a generated file differs from what `make generate` writes.
.PHONY: check-generated
check-generated: generate
	@if [ -n "$$(git status --porcelain -- api core sdk)" ]; then \
		echo "generated files drifted from their sources; run 'make generate' and commit:"; \
		git status --porcelain -- api core sdk; git diff --stat -- api core sdk; exit 1; fi

# --- checks ----------------------------------------------------------------------

.PHONY: lint
lint: tools
	go vet ./...
	go vet -C devstack ./...
	go vet -C tools ./...
	$(BIN)/staticcheck $$(go list ./... | grep -v '/apigen$$')

.PHONY: test
test: deps build check-generated lint
	@echo "== product tests (dev stack started for the run)"
	GPUAAS_DEVSTACK_BIN=$(BIN)/gpuaas-devstack \
		$(BIN)/gpuaas-devstack exec --dir .gpuaas/test-stack --quiet -- \
		$(GOTEST) $(TEST_FLAGS) ./...
	@echo "== dev stack tests"
	cd devstack && $(GOTEST) $(TEST_FLAGS) ./...

# Each benchmark measures its own baseline in the same run and reports ratios;
# devstack/scripts/bench.sh prints the summary (and keeps the raw output in
# .gpuaas/bench.txt).
.PHONY: bench
bench: deps build
	GPUAAS_DEVSTACK_BIN=$(BIN)/gpuaas-devstack \
		$(BIN)/gpuaas-devstack exec --dir .gpuaas/bench-stack --quiet -- \
		devstack/scripts/bench.sh

.PHONY: clean
clean:
	rm -rf .gpuaas
