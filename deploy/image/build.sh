#!/usr/bin/env bash
# The meshca container image, built with no Docker daemon and no base image: two static binaries
# (`meshca`, and `meshca-sds`, the SDS server alone for sidecars) in one layer of an otherwise
# empty (scratch) OCI image, written by umoci (built from the Go module
# that tests/image/go.mod pins, cached by version like the test peers, or $UMOCI >= 0.6).
#
#   build.sh binary DEST              the static release binaries (glibc, crt-static), stripped:
#                                     meshca at DEST and meshca-sds beside it (profile `sidecar`)
#                                     (MESHCA_IMAGE_PROFILE=dev: the dev profile for both, a quicker
#                                     build for tests of the packaging; .ci/run uses it)
#   build.sh image [--binary PATH] OUT
#                                     the OCI image layout OUT (tag: the crate version); builds the
#                                     binaries unless --binary names meshca (meshca-sds must be
#                                     beside it); prints the manifest digest
#   build.sh umoci                    builds umoci (or finds it in the cache); prints its path
#
# deploy/Dockerfile runs `build.sh binary` in its build stage and sets the same USER, ENTRYPOINT,
# CMD and labels (cli/tests/image.rs compares the two). Reproducible: every timestamp is
# SOURCE_DATE_EPOCH (default: the last commit's time), owners are 0:0, so the same binary gives
# the same digest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# The image's configuration; deploy/Dockerfile's final stage must say the same.
ENTRYPOINT=/usr/local/bin/meshca
SIDECAR=/usr/local/bin/meshca-sds
CMD=(signer run)
USER_ID=65532:65532

die() { echo "image build.sh: $*" >&2; exit 1; }

# The static binary: glibc's static libc (crt-static), since the musl target is not part of the
# toolchain here. RUSTFLAGS with an explicit --target applies to the binary only, not to build
# scripts and proc macros (which must stay dynamic). getrandom (0.3, 0.4: ahash in kube-runtime,
# rand in kube-lease-manager) finds libc's getrandom through dlsym, which a static binary does not
# have, and then reads /dev/urandom: in a root without /dev that panicked the signer's lease task
# (cli/tests/image.rs). Its linux_getrandom backend calls getrandom(2) directly, as aws-lc does.
# pack-relative-relocs (DT_RELR, glibc >= 2.36, binutils >= 2.38) stores the relocations of the
# position-independent binary in a few KiB instead of 1.3 MiB that every process reads at start
# (docs/sds.md, "Idle footprint").
STATIC_RUSTFLAGS=(-C target-feature=+crt-static --cfg 'getrandom_backend="linux_getrandom"'
  -C link-arg=-Wl,-z,pack-relative-relocs)
build_binary() {
  local dest="$1" host profile="${MESHCA_IMAGE_PROFILE:-release}" sidecar_profile dir sidecar_dir
  case "$profile" in
    release) dir=release sidecar_profile=sidecar sidecar_dir=sidecar ;;
    dev) dir=debug sidecar_profile=dev sidecar_dir=debug ;;
    *) die "MESHCA_IMAGE_PROFILE=$profile: release (the default) or dev" ;;
  esac
  command -v cargo >/dev/null || die "cargo is not installed"
  host="$(rustc -vV | sed -n 's/^host: //p')"
  [[ "$host" == *-linux-gnu ]] || die "host $host: the static build expects a *-linux-gnu target"
  # Two builds: meshca with every feature, meshca-sds without ACM Private CA (no AWS SDK) in the
  # size-optimised `sidecar` profile (cli/Cargo.toml, Cargo.toml).
  (cd "$ROOT" && export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }${STATIC_RUSTFLAGS[*]}" &&
    cargo build --profile "$profile" --locked -p meshca-cli --bin meshca --target "$host" >&2 &&
    cargo build --profile "$sidecar_profile" --locked -p meshca-cli --no-default-features \
      --bin meshca-sds --target "$host" >&2)
  local bin="$ROOT/target/$host/$dir/meshca" sidecar="$ROOT/target/$host/$sidecar_dir/meshca-sds"
  check_static "$bin"
  check_static "$sidecar"
  mkdir -p "$(dirname "$dest")"
  # strip to temporary files, then rename: DEST is never left half-written, and meshca-sds is
  # in place before DEST is.
  local side_dest
  side_dest="$(dirname "$dest")/meshca-sds"
  strip -o "$side_dest.tmp" "$sidecar" && chmod 0755 "$side_dest.tmp" &&
    mv -f "$side_dest.tmp" "$side_dest"
  strip -o "$dest.tmp" "$bin" && chmod 0755 "$dest.tmp" && mv -f "$dest.tmp" "$dest"
  echo "$dest"
}

# umoci >= 0.6: SOURCE_DATE_EPOCH support, and layers that are complete tar archives (Debian's
# 0.4.7 writes layers without the end-of-archive blocks, which GNU tar rejects).
umoci_bin() {
  if [[ -n "${UMOCI:-}" ]]; then
    local v
    v="$("$UMOCI" --version)" || die "UMOCI=$UMOCI: --version failed"
    v="${v%%$'\n'*}"
    [[ "$v" =~ version\ (0\.([6-9]|[1-9][0-9])|[1-9][0-9]*)\. ]] ||
      die "UMOCI=$UMOCI is $v; version 0.6.0 or newer is needed"
    echo "$UMOCI"
    return
  fi
  # shellcheck source=../../tests/go-peer.sh
  source "$ROOT/tests/go-peer.sh"
  local mod="$ROOT/tests/image"
  go_peer umoci "$(go_mod_version "$mod" github.com/opencontainers/umoci)" "$mod" umoci -trimpath \
    github.com/opencontainers/umoci/cmd/umoci
}

# The binary must run with no libc in the image: no ELF interpreter.
check_static() {
  [[ -f "$1" && -x "$1" ]] || die "$1 is not an executable file"
  if readelf -lW "$1" | grep -q 'program interpreter'; then
    die "$1 is dynamically linked: the image has no libc (build it with: build.sh binary DEST)"
  fi
}

build_image() {
  local binary="" out
  if [[ "${1:-}" == --binary ]]; then
    binary="${2:?--binary needs a path}"
    shift 2
    check_static "$binary"
    check_static "$(dirname "$binary")/meshca-sds"
  fi
  [[ $# -eq 1 ]] || die "usage: build.sh image [--binary PATH] OUT"
  out="$1"
  [[ ! -e "$out" ]] || die "$out exists: give a new directory"

  local umoci version source license revision
  umoci="$(umoci_bin)"
  # The workspace's version, repository and license (Cargo.toml) for the tag and the labels.
  { read -r version; read -r source; read -r license; } < <(python3 -c '
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["workspace"]["package"]
print(p["version"], p["repository"], p["license"], sep="\n")' "$ROOT/Cargo.toml")
  [[ -n "$license" ]] || die "could not read the version, repository and license from $ROOT/Cargo.toml"
  source="${MESHCA_IMAGE_SOURCE:-$source}"
  revision="${MESHCA_IMAGE_REVISION:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}"
  export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}"

  # Work beside OUT, so that the final rename is atomic: OUT is complete or absent.
  mkdir -p "$(dirname "$out")"
  WORK="$(mktemp -d "$(dirname "$out")/.meshca-image.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  local work="$WORK"
  if [[ -z "$binary" ]]; then
    binary="$(build_binary "$work/meshca")"
    check_static "$binary"
  fi

  # The layer's tree: /usr/local/bin/meshca, /usr/local/bin/meshca-sds and their directories,
  # nothing else (no shell, no /etc/passwd: the user is numeric). Everything root-owned and dated
  # SOURCE_DATE_EPOCH.
  local tree="$work/tree"
  install -d -m 0755 "$tree/usr/local/bin"
  install -m 0755 "$binary" "$tree$ENTRYPOINT"
  install -m 0755 "$(dirname "$binary")/meshca-sds" "$tree$SIDECAR"
  find "$tree" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

  # umoci: config and history dates default to SOURCE_DATE_EPOCH; its output goes to stderr,
  # so that stdout is the digest alone.
  local layout="$work/oci" ref
  ref="$layout:$version"
  u() { "$umoci" "$@" >&2; }
  u init --layout "$layout"
  u new --image "$ref"
  u insert --image "$ref" --history.created_by "meshca $version (static) at $ENTRYPOINT and $SIDECAR" \
    "$tree/usr" /usr
  local cmd_args=() c
  for c in "${CMD[@]}"; do cmd_args+=(--config.cmd "$c"); done
  u config --image "$ref" --no-history \
    --config.user "$USER_ID" \
    --config.entrypoint "$ENTRYPOINT" "${cmd_args[@]}" \
    --config.label "org.opencontainers.image.source=$source" \
    --config.label "org.opencontainers.image.version=$version" \
    --config.label "org.opencontainers.image.revision=$revision" \
    --config.label "org.opencontainers.image.title=meshca" \
    --config.label "org.opencontainers.image.licenses=$license"
  u gc --layout "$layout"
  # Blobs readable by whoever loads the layout (umoci writes them 0600).
  chmod -R a+rX "$layout"
  mv "$layout" "$out"

  python3 -c '
import json, sys
print(json.load(open(sys.argv[1] + "/index.json"))["manifests"][0]["digest"])' "$out"
}

case "${1:-}" in
  binary)
    [[ $# -eq 2 ]] || die "usage: build.sh binary DEST"
    build_binary "$2" >/dev/null
    ;;
  image)
    shift
    build_image "$@"
    ;;
  umoci) umoci_bin ;;
  *) die "usage: build.sh binary DEST | image [--binary PATH] OUT | umoci" ;;
esac
