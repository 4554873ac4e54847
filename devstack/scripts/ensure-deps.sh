#!/usr/bin/env bash
# Installs what the dev stack and the tests need when it is missing: Debian packages
# with apt, and the stripe-mock and versitygw binaries with `go install` at pinned
# versions. Safe to run again: it only acts on what is absent.
set -euo pipefail

STRIPE_MOCK_VERSION=v0.203.0
VERSITYGW_VERSION=v1.8.0
GOBIN_DIR=$(go env GOPATH)/bin

need_apt=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# The browser terminal's tests dial a real OpenSSH sshd on loopback.
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "ensure-deps: installing ${need_apt[*]} with apt" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

installed_version() { # binary module
  [ -x "$GOBIN_DIR/$1" ] || return 0
  go version -m "$GOBIN_DIR/$1" 2>/dev/null | awk -v m="$2" '$1 == "mod" && $2 == m { print $3 }'
}
if [ "$(installed_version stripe-mock github.com/stripe/stripe-mock)" != "$STRIPE_MOCK_VERSION" ]; then
  echo "ensure-deps: go install stripe-mock@$STRIPE_MOCK_VERSION" >&2
  go install "github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION"
fi
if [ "$(installed_version versitygw github.com/versity/versitygw)" != "$VERSITYGW_VERSION" ]; then
  echo "ensure-deps: go install versitygw@$VERSITYGW_VERSION" >&2
  go install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
fi
