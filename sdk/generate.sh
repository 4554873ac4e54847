#!/usr/bin/env bash
# Regenerates the driver contracts' Go code from sdk/*/proto/*.proto.
# Run from the repository root (make generate does). Idempotent: running it
# twice yields byte-identical files. The generated files are committed.
#
# protoc comes from the system (apt-get install -y protobuf-compiler); the
# Go plugins are pinned in tools/go.mod and built into .gpuaas/bin.
set -euo pipefail

cd "$(dirname "$0")/.."

bin="$PWD/.gpuaas/bin"
go build -C tools -o "$bin/" \
	google.golang.org/protobuf/cmd/protoc-gen-go \
	google.golang.org/grpc/cmd/protoc-gen-go-grpc
export PATH="$bin:$PATH"

if ! command -v protoc >/dev/null; then
	echo "sdk/generate.sh: protoc not found; install it with: apt-get install -y protobuf-compiler" >&2
	exit 1
fi

for proto in sdk/base/proto/base.proto \
	sdk/provisioner/proto/provisioner.proto \
	sdk/payments/proto/payments.proto \
	sdk/storage/proto/storage.proto; do
	protoc -I . \
		--go_out=. --go_opt=paths=source_relative \
		--go-grpc_out=. --go-grpc_opt=paths=source_relative \
		"$proto"
done
