#!/usr/bin/env bash
# Real kube-apiserver + kube-controller-manager + etcd for the `k8s` test tier, built offline from
# Debian bookworm's `kubernetes` source package (no binary ships on PyPI/npm/Debian; FACTS.md).
# Idempotent: the binaries are cached outside the repo, keyed by the Debian version, so a warm
# machine (and CI on it) pays the ~6 min build once. Prints the cache directory on stdout.
# Needs root for apt-get (CI and these machines run as root). `--dir` only prints the cache directory
# (tests use it to find the binaries without ever building them).
set -euo pipefail

DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
CACHE_ROOT="${FORGELINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/forgeline}"
OUT="$CACHE_ROOT/kube-${DEB_VERSION//+/_}"
BINARIES=(kube-apiserver kube-controller-manager etcd)
if [[ "${1:-}" == "--dir" ]]; then echo "$OUT"; exit 0; fi

have_all() { for b in "${BINARIES[@]}"; do [[ -x "$OUT/$b" ]] || return 1; done; }
if have_all; then echo "$OUT"; exit 0; fi

log() { echo "kube_binaries: $*" >&2; }
export DEBIAN_FRONTEND=noninteractive
PKGS=(golang-go etcd-server dpkg-dev rsync golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  apt-get update -qq >&2
  apt-get install -y -qq "${missing[@]}" >&2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/forgeline-kube-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# A private deb-src list, so the machine's own apt sources stay as they are.
SRC_LIST="$WORK/src.list"
echo "deb-src http://deb.debian.org/debian bookworm main" >"$SRC_LIST"
SRC_STATE="$WORK/apt-lists"
mkdir -p "$SRC_STATE/partial"
APT_SRC=(-o "Dir::Etc::sourcelist=$SRC_LIST" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$SRC_STATE")
log "fetching the kubernetes $DEB_VERSION source package"
apt-get "${APT_SRC[@]}" update -qq >&2
(cd "$WORK" && apt-get "${APT_SRC[@]}" source -qq "kubernetes=$DEB_VERSION" >&2)
SRC="$(find "$WORK" -maxdepth 1 -type d -name 'kubernetes-*' | head -1)"

# The vendored reflect2 1.0.1 crashes under Go >= 1.18: use Debian's maintained copies instead.
for dep in github.com/modern-go/reflect2 github.com/json-iterator/go; do
  rm -rf "$SRC/vendor/$dep"
  cp -r "/usr/share/gocode/src/$dep" "$SRC/vendor/$dep"
done

log "building kube-apiserver and kube-controller-manager (GOPATH mode, ~6 min on 2 cores)"
mkdir -p "$SRC/.go/src/k8s.io"
ln -s ../../.. "$SRC/.go/src/k8s.io/kubernetes"
(cd "$SRC/.go/src/k8s.io/kubernetes" \
  && GOPATH="$SRC/.go" CGO_ENABLED=0 GOCACHE="$WORK/gocache" make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2)

STAGE="$OUT.partial-$$"
rm -rf "$STAGE"
mkdir -p "$STAGE"
for b in kube-apiserver kube-controller-manager; do
  cp "$(find "$SRC/_output" -type f -name "$b" -perm -u+x | head -1)" "$STAGE/$b"
done
cp "$(command -v etcd || echo /usr/bin/etcd)" "$STAGE/etcd"
"$STAGE/kube-apiserver" --version >&2
rm -rf "$OUT"
mv "$STAGE" "$OUT"
echo "$OUT"
