#!/usr/bin/env bash
# Builds the local Kubernetes control plane the end-to-end tests run against:
# kube-apiserver and kube-controller-manager from Debian's `kubernetes` source package (1.20)
# with Debian's Go 1.19, plus etcd from Debian's `etcd-server`.
#
# No registry publishes these as binaries we can use here, so we build them. Everything goes into
# a cache outside the repository (nothing is installed system-wide):
#   ${FOVEAL_K8S_CACHE:-$HOME/.cache/foveal-k8s}/bin/{etcd,kube-apiserver,kube-controller-manager}
# Package sources are derived from the machine's own apt configuration (its Debian entries get a
# deb-src twin in a private apt directory), so no registry host is written down here.
#
# Idempotent: when the three binaries are present and answer --version, it exits at once.
# A cold build takes about 4-8 minutes on 2 cores. Set FOVEAL_K8S_KEEP_BUILD=1 to keep the build
# tree (sources, Go toolchain, Go build cache) after a successful build.
set -euo pipefail

W="${FOVEAL_K8S_CACHE:-$HOME/.cache/foveal-k8s}"
BIN="$W/bin"
TOOLS=(etcd kube-apiserver kube-controller-manager)

log() { echo "k8s-build: $*" >&2; }
die() {
  echo "k8s-build: error: $*" >&2
  exit 1
}

built() {
  local t
  for t in "${TOOLS[@]}"; do
    [ -x "$BIN/$t" ] || return 1
    "$BIN/$t" --version >/dev/null 2>&1 || return 1
  done
}

if built; then
  exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found: this recipe needs a Debian (12) machine"
command -v dpkg >/dev/null || die "dpkg not found: this recipe needs a Debian (12) machine"
command -v make >/dev/null || die "make not found; install it (apt-get install make)"

mkdir -p "$W"
# One build at a time per cache (e.g. `make test` and a second shell).
exec 9>"$W/.lock"
if command -v flock >/dev/null; then
  flock 9
  if built; then
    exit 0
  fi
fi

start=$(date +%s)
log "building etcd, kube-apiserver and kube-controller-manager into $BIN (takes minutes)"
rm -rf "$W/apt/parts" "$W/root" "$W/src"
mkdir -p "$W"/{apt/lists/partial,apt/cache/archives/partial,apt/parts,debs,root,src,bin,tools}

# --- apt sources: the machine's Debian entries, as deb + deb-src, in a private apt directory ----
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || die "cannot read VERSION_CODENAME from /etc/os-release"
sl=/etc/apt/sources.list
sp=/etc/apt/sources.list.d
eval "$(apt-config shell sl Dir::Etc::SourceList/f sp Dir::Etc::SourceParts/d)"

# deb822 stanzas (*.sources) of the release's own suites with component main.
for f in "$sp"/*.sources; do
  [ -f "$f" ] || continue
  awk -v cn="$codename" 'BEGIN { RS = ""; FS = "\n" }
    {
      types = 0; suite = 0; main = 0; enabled = 1
      for (i = 1; i <= NF; i++) {
        line = $i
        if (line ~ /^#/) continue
        n = split(line, w, /[ \t]+/)
        key = tolower(w[1])
        if (key == "types:") { for (j = 2; j <= n; j++) if (w[j] == "deb") types = 1 }
        else if (key == "suites:") {
          for (j = 2; j <= n; j++) if (w[j] == cn || index(w[j], cn "-") == 1) suite = 1
        }
        else if (key == "components:") { for (j = 2; j <= n; j++) if (w[j] == "main") main = 1 }
        else if (key == "enabled:" && tolower(w[2]) == "no") enabled = 0
      }
      if (!(types && suite && main && enabled)) next
      for (i = 1; i <= NF; i++) {
        if (tolower($i) ~ /^types:/) print "Types: deb deb-src"; else print $i
      }
      print ""
    }' "$f" >"$W/apt/parts/$(basename "$f")"
done
# One-line entries (sources.list, *.list).
for f in "$sl" "$sp"/*.list; do
  [ -f "$f" ] || continue
  awk -v cn="$codename" '
    $1 == "deb" {
      rest = $0; sub(/^deb[ \t]+/, "", rest)
      opts = ""
      if (rest ~ /^\[/) { opts = substr(rest, 1, index(rest, "]")); rest = substr(rest, index(rest, "]") + 1) }
      n = split(rest, w, /[ \t]+/); k = (w[1] == "") ? 1 : 0
      uri = w[1 + k]; suite = w[2 + k]; main = 0
      for (j = 3 + k; j <= n; j++) if (w[j] == "main") main = 1
      if (!main || !(suite == cn || index(suite, cn "-") == 1)) next
      print "deb " opts " " rest; print "deb-src " opts " " rest
    }' "$f" >"$W/apt/parts/$(basename "$f" .list)-derived.list"
done
if ! grep -qs -E '^(Types:|deb)' "$W"/apt/parts/*; then
  die "no Debian '$codename' entries with component main found in $sl or $sp"
fi

A=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$W/apt/parts"
  -o "Dir::State::Lists=$W/apt/lists" -o "Dir::Cache=$W/apt/cache")
if [ "$(id -u)" -eq 0 ]; then
  # The cache lives under $HOME, which apt's unprivileged download user cannot enter.
  A+=(-o "APT::Sandbox::User=root")
fi

log "apt-get update (private lists in $W/apt)"
apt-get "${A[@]}" update -qq || die "apt-get update failed (sources in $W/apt/parts)"

log "downloading the kubernetes source package"
(cd "$W/src" && apt-get "${A[@]}" source --download-only -qq kubernetes) ||
  die "apt-get source kubernetes failed"
orig=$(ls "$W"/src/kubernetes_*.orig.tar.* 2>/dev/null | grep -v 'orig-' | head -n1 || true)
[ -n "$orig" ] || die "no kubernetes_*.orig.tar.* in $W/src"
tar -C "$W/src" -xf "$orig"
K=$(ls -d "$W"/src/kubernetes-*/ 2>/dev/null | head -n1 || true)
[ -n "$K" ] || die "the kubernetes source archive $orig did not unpack into kubernetes-*/"
K=${K%/}
version=${K##*/kubernetes-}
[[ "$version" =~ ^([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || die "unexpected kubernetes source version '$version'"
major=${BASH_REMATCH[1]}
minor=${BASH_REMATCH[2]}

log "downloading Go 1.19, etcd and helpers (.deb, unpacked into $W/root, not installed)"
rm -f "$W"/debs/*.deb
(cd "$W/debs" && apt-get "${A[@]}" download -qq golang-1.19-go golang-1.19-src etcd-server \
  rsync libpopt0 golang-github-modern-go-reflect2-dev) || die "apt-get download failed"
for f in "$W"/debs/*.deb; do dpkg -x "$f" "$W/root"; done

# The build calls rsync; use the system's, else the unpacked one with its unpacked libpopt.
if ! command -v rsync >/dev/null; then
  popt=$(find "$W/root" -name 'libpopt.so.0*' -print -quit)
  [ -n "$popt" ] || die "libpopt.so.0 missing from the unpacked libpopt0 package"
  cat >"$W/tools/rsync" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$(dirname "$popt")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$W/root/usr/bin/rsync" "\$@"
EOF
  chmod +x "$W/tools/rsync"
  "$W/tools/rsync" --version >/dev/null || die "the unpacked rsync does not run"
fi

# The vendored reflect2 1.0.1 crashes under Go >= 1.18 on the first custom resource
# ("unexpected fault address" in reflect2.unsafeType); Debian's 1.0.2 fixes it.
R="$K/vendor/github.com/modern-go/reflect2"
D="$W/root/usr/share/gocode/src/github.com/modern-go/reflect2"
[ -d "$R" ] || die "vendored reflect2 not found at $R"
ls "$D"/*.go >/dev/null 2>&1 || die "Debian's reflect2 sources not found at $D"
rm -f "$R"/*.go "$R"/*.s
cp "$D"/*.go "$R"/
cp "$D"/*.s "$R"/ 2>/dev/null || true

# Version stamped into the binaries (the source archive has no git metadata).
cat >"$W/src/version.env" <<EOF
KUBE_GIT_VERSION='v$version'
KUBE_GIT_MAJOR='$major'
KUBE_GIT_MINOR='$minor'
KUBE_GIT_COMMIT='0000000000000000000000000000000000000000'
KUBE_GIT_TREE_STATE='clean'
EOF

GO_ROOT="$W/root/usr/lib/go-1.19"
[ -x "$GO_ROOT/bin/go" ] || die "Go 1.19 not found at $GO_ROOT/bin/go"
log "compiling kubernetes v$version with $("$GO_ROOT/bin/go" version | cut -d' ' -f3) (the long step)"
(
  cd "$K"
  export PATH="$W/tools:$GO_ROOT/bin:$PATH" GOROOT="$GO_ROOT" GOCACHE="$W/gocache" GOPROXY=off \
    CGO_ENABLED=0 KUBE_GIT_VERSION_FILE="$W/src/version.env"
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager"
) >"$W/build.log" 2>&1 || {
  tail -n 40 "$W/build.log" >&2
  die "the kubernetes build failed; full log: $W/build.log"
}

for t in kube-apiserver kube-controller-manager; do
  install -m 0755 "$K/_output/bin/$t" "$BIN/.$t.new"
  mv -f "$BIN/.$t.new" "$BIN/$t"
done
install -m 0755 "$W/root/usr/bin/etcd" "$BIN/.etcd.new"
mv -f "$BIN/.etcd.new" "$BIN/etcd"
built || die "the built binaries in $BIN do not run (--version)"

if [ "${FOVEAL_K8S_KEEP_BUILD:-0}" != "1" ]; then
  rm -rf "$W/src" "$W/root" "$W/gocache" "$W/tools"
fi
log "done in $(($(date +%s) - start)) s:"
for t in "${TOOLS[@]}"; do
  log "  $BIN/$t ($("$BIN/$t" --version 2>&1 | head -n1))"
done
