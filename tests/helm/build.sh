#!/usr/bin/env bash
# The Helm CLI of the chart tests (cli/tests/helm_e2e.rs), built from its Go module: go.mod and
# go.sum beside this script pin helm.sh/helm/v4; cached by version (tests/go-peer.sh).
#
#   build.sh          build (or find in the cache); prints the binary's path on stdout
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../go-peer.sh
source "$HERE/../go-peer.sh"
version="$(go_mod_version "$HERE" helm.sh/helm/v4)"
# The version stamp the Helm Makefile sets (`helm version`).
go_peer helm "$version" "$HERE" helm -trimpath \
  -ldflags "-X helm.sh/helm/v4/internal/version.version=$version" helm.sh/helm/v4/cmd/helm
