#!/usr/bin/env bash
# `make run`: the whole platform on this machine. Starts the dev stack, then gpuaasd
# against it, waits until it is ready, writes .gpuaas/dev.env (GPUAAS_API_URL=...)
# and prints the URL. Ctrl-C stops gpuaasd, then the stack; nothing is left behind.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/.gpuaas/bin"
state="$root/.gpuaas"
stack_env="$state/stack.env"
dev_env="$state/dev.env"
mkdir -p "$state"
rm -f "$stack_env"

stack_pid=""
core_pid=""
maas_pid=""
cleanup() {
  trap - INT TERM EXIT
  if [ -n "$core_pid" ] && kill -0 "$core_pid" 2>/dev/null; then
    kill -TERM "$core_pid" 2>/dev/null || true
    wait "$core_pid" 2>/dev/null || true
  fi
  if [ -n "$maas_pid" ] && kill -0 "$maas_pid" 2>/dev/null; then
    kill -TERM "$maas_pid" 2>/dev/null || true
    wait "$maas_pid" 2>/dev/null || true
  fi
  if [ -n "$stack_pid" ] && kill -0 "$stack_pid" 2>/dev/null; then
    kill -TERM "$stack_pid" 2>/dev/null || true
    wait "$stack_pid" 2>/dev/null || true
  fi
  echo "gpuaas: stopped"
}
trap cleanup INT TERM EXIT

"$bin/gpuaas-devstack" up --dir "$state/stack" --env-file "$stack_env" --quiet &
stack_pid=$!
for _ in $(seq 1 600); do
  [ -f "$stack_env" ] && break
  kill -0 "$stack_pid" 2>/dev/null || { echo "gpuaas: the dev stack failed to start (logs in $state/stack)" >&2; exit 1; }
  sleep 0.2
done
[ -f "$stack_env" ] || { echo "gpuaas: the dev stack was not ready after 120 s" >&2; exit 1; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=${GPUAAS_PORT:-8080}
while port_in_use "$port"; do port=$((port + 1)); done
api="http://127.0.0.1:$port"

# A simulated MAAS region with three H100 and two L40S machines, commissioned
# and Ready; deploys take a few seconds (see plugins/maas/README.md).
maas_port=${GPUAAS_MAAS_PORT:-5240}
while port_in_use "$maas_port" || [ "$maas_port" = "$port" ]; do maas_port=$((maas_port + 1)); done
maas_key="$state/maas.key"
rm -f "$maas_key"
"$bin/gpuaas-maas-sim" -listen "127.0.0.1:$maas_port" -sku h100=3,l40s=2 -timing fast -timing-scale 5 \
  -api-key-file "$maas_key" >"$state/maas-sim.out" 2>"$state/maas-sim.log" &
maas_pid=$!
for _ in $(seq 1 100); do [ -s "$maas_key" ] && break; sleep 0.1; done
[ -s "$maas_key" ] || { echo "gpuaas: the MAAS simulator did not start; see $state/maas-sim.log" >&2; exit 1; }
maas_url="http://127.0.0.1:$maas_port/MAAS"

set -a
# shellcheck disable=SC1090
. "$stack_env"
set +a
export GPUAAS_LOCAL_ACCOUNTS=true GPUAAS_STATE_DIR="$state/core"
"$bin/gpuaasd" --listen-addr "127.0.0.1:$port" >"$state/gpuaasd.log" 2>&1 &
core_pid=$!

for _ in $(seq 1 600); do
  if curl -fsS "$api/api/v1/readyz" >/dev/null 2>&1; then break; fi
  kill -0 "$core_pid" 2>/dev/null || { echo "gpuaas: gpuaasd exited; see $state/gpuaasd.log" >&2; tail -5 "$state/gpuaasd.log" >&2; exit 1; }
  sleep 0.2
done
curl -fsS "$api/api/v1/readyz" >/dev/null || { echo "gpuaas: gpuaasd not ready after 120 s; see $state/gpuaasd.log" >&2; exit 1; }

admin=$("$bin/gpuaasd" bootstrap-admin --email admin@gpuaas.local 2>>"$state/gpuaasd.log")
token=$(printf '%s\n' "$admin" | sed -n 's/^GPUAAS_TOKEN=//p')
password=$(printf '%s\n' "$admin" | sed -n 's/^GPUAAS_ADMIN_PASSWORD=//p')
umask 077
printf 'GPUAAS_API_URL=%s\nGPUAAS_TOKEN=%s\n' "$api" "$token" >"$dev_env"

# Drivers: Stripe against stripe-mock (top-ups) and S3 against the stack's gateway.
whsec="whsec_dev_$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
cfg="$state/plugin-config"
mkdir -p "$cfg"
printf '{"secret_key":"%s","webhook_secret":"%s","api_base":"%s"}\n' "$STRIPE_SECRET_KEY" "$whsec" "$STRIPE_API_BASE" >"$cfg/stripe.json"
printf '{"endpoint":"%s","region":"%s","bucket":"%s","path_style":true,"access_key_id":"%s","secret_access_key":"%s"}\n' \
  "$S3_ENDPOINT" "$S3_REGION" "$S3_BUCKET" "$S3_ACCESS_KEY_ID" "$S3_SECRET_ACCESS_KEY" >"$cfg/storage.json"
plugin_log="$state/plugins.log"
{
  GPUAAS_API_URL="$api" GPUAAS_TOKEN="$token" "$bin/gpuaas" plugin install "$bin/gpuaas-plugin-stripe" &&
  GPUAAS_API_URL="$api" GPUAAS_TOKEN="$token" "$bin/gpuaas" plugin configure stripe stripe "$cfg/stripe.json" &&
  GPUAAS_API_URL="$api" GPUAAS_TOKEN="$token" "$bin/gpuaas" plugin install "$bin/gpuaas-plugin-storage-s3" &&
  GPUAAS_API_URL="$api" GPUAAS_TOKEN="$token" "$bin/gpuaas" plugin configure storage storage-s3 "$cfg/storage.json"
} >"$plugin_log" 2>&1 || echo "gpuaas: installing the dev plugins failed; see $plugin_log" >&2

# The MAAS driver against the simulator, the catalog, the nodes, and a demo
# org with credit to rent them with.
maas_secret="$state/maas-webhook.secret"
[ -s "$maas_secret" ] || (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$maas_secret")
seed_log="$state/seed.log"
seed=$(GPUAAS_API_URL="$api" GPUAAS_TOKEN="$token" "$bin/gpuaas" dev seed --maas-url "$maas_url" --maas-api-key-file "$maas_key" \
  --webhook-secret-file "$maas_secret" --plugin-path "$bin/gpuaas-plugin-maas" --instance maas 2>"$seed_log") ||
  echo "gpuaas: seeding the development data failed; see $seed_log" >&2
cat <<MSG

  gpuaas is running.
    API:        $api   (try: curl $api/api/v1/readyz)
    Admin:      admin@gpuaas.local / ${password:-"(unchanged)"}   (shown once)
    API key:    in $dev_env as GPUAAS_TOKEN (the gpuaas CLI reads it)
                curl -H "Authorization: Bearer \$GPUAAS_TOKEN" $api/api/v1/users/me
    Plugins:    stripe (stripe-mock; webhook secret $whsec), storage (S3 on the stack),
                maas (simulated MAAS at $maas_url)
    Logs:       $state/gpuaasd.log, $state/stack/, $state/maas-sim.log

$seed
  Press Ctrl-C to stop.

MSG
wait -n "$core_pid" "$stack_pid" "$maas_pid" || true
echo "gpuaas: a process exited; stopping the rest" >&2
