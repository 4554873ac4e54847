#!/usr/bin/env bash
# Runs the project's benchmarks against the dev stack (make bench starts it) and
# prints one summary. Every number is measured next to its baseline in the same
# run; the targets are those of the design (doc/architecture.md lists them).
set -euo pipefail
out=.gpuaas/bench.txt
: >"$out"
run() { # package pattern benchtime
  go test -run '^$' -bench "$2" -benchtime "$3" -count 1 -timeout 30m "$1" 2>&1 | tee -a "$out" | grep -E '^Benchmark|^(ok|FAIL)|^--- FAIL' || true
}
echo "== outbox pipeline (ratio of raw JetStream publish, commit→consumer latency)"
run ./core/internal/events 'BenchmarkOutboxPipeline' 1x
echo "== authentication cost (ratio of GET /healthz)"
run ./core/internal/daemon 'BenchmarkAuthCost' 1x
echo "== accrual of 100,000 open usage records; balance read with 1,000,000 entries vs 100"
run ./core/internal/billing 'BenchmarkAccrual100k|BenchmarkBalanceRead' 1x
echo "== allocation create throughput (ratio of pgbench TPC-B-like, 50 clients, same Postgres) and time to active (instant MAAS simulator)"
run ./core/internal/daemon 'BenchmarkAllocationCreate|BenchmarkTimeToActive' 1x
echo "== node agents: task dispatch latency with 1,000 agents in their long poll, core memory per connected agent"
run ./core/internal/daemon 'BenchmarkAgentDispatch' 1x
echo "== plugin unary call overhead (p50/p99 µs, next to in-process) and storage streaming (ratio of a file copy)"
run ./sdk/sdktest 'BenchmarkPluginUnary' 2000x
run ./sdk/sdktest 'BenchmarkPluginStream' 3x
run ./core/internal/pluginhost 'BenchmarkUnaryCall' 2000x
echo "== storage-s3 driver alone, 64 MiB, called in process and over the plugin's gRPC stream (ratio of direct S3 to the same server; the stream is the data path only for stores the driver cannot presign for, the core's path is the next section)"
run ./plugins/storage-s3 'BenchmarkPutGet' 3x
echo "== project storage through the core and the driver, 256 MiB, seven rounds of one upload and eight downloads on each path (ratio of direct S3 to the same server; driver as plugin process and in process)"
run ./core/internal/daemon 'BenchmarkStorageThroughput' 7x
echo "== browser terminal: keystroke round trip through the proxy vs a direct SSH session to the same sshd (target: +1 ms at p50), and memory of 1,000 idle sessions in the serving process (target: 200 MB)"
run ./core/internal/terminal 'BenchmarkTerminalRoundTrip|BenchmarkTerminalIdleSessions' 1x
echo
echo "summary (from $out):"
grep -hE '(ratio|/s|_ms|_s|µs|x-filecopy|/agent)' "$out" | grep -E '^\s+bench[a-z_]*_test.go|^Benchmark' | sed 's/^ *//' | head -60
