# Sourced by the scripts that build a test peer from its Go module (tests/helm/build.sh,
# tests/prometheus/promtool.sh, tests/istio/build.sh, deploy/image/build.sh): the module is
# pinned by the go.mod/go.sum of the script's directory, and the binary is cached by version
# under $MESHCA_CLUSTER_CACHE (default ~/.cache/meshca/cluster), as tests/cluster/cluster.sh
# caches its binaries, so a second run builds nothing.

# The version of module $2 that go.mod in directory $1 pins.
go_mod_version() {
  (cd "$1" && go list -m -f '{{.Version}}' "$2")
}

# go_peer NAME KEY DIR BIN [go build flags...] PACKAGE
# Builds PACKAGE (in module directory DIR) as BIN into $CACHE/NAME-KEY unless it is there
# already; logs on stderr and prints the binary's path on stdout.
go_peer() {
  local name="$1" key="$2" mod="$3" bin="$4"
  shift 4
  local cache="${MESHCA_CLUSTER_CACHE:-$HOME/.cache/meshca/cluster}" dir out
  command -v go >/dev/null || {
    echo "$name: go is not installed ($name is built from its Go module)" >&2
    return 1
  }
  dir="$cache/$name-$key"
  if [[ -x "$dir/$bin" ]]; then
    echo "$name $key cached in $dir" >&2
  else
    echo "building $name $key into $dir" >&2
    mkdir -p "$cache"
    out="$(mktemp -d "$cache/.$name-$key.XXXXXX")"
    (cd "$mod" && CGO_ENABLED="${CGO_ENABLED:-0}" go build -mod=readonly -o "$out/$bin" "$@") || {
      rm -rf "$out"
      return 1
    }
    rm -rf "$dir" && mv "$out" "$dir"
  fi
  echo "$dir/$bin"
}
