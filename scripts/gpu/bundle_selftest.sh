#!/usr/bin/env bash
# Proves here (Debian 12, as root) that the dependency bundle alone is enough: in a private
# mount namespace, every file that the bundle's build packages installed on this machine
# (HDF5, OpenMPI, PMIx, hwloc, libevent, Boost.Program_options, sentencepiece, PCRE2, utf8proc, nlohmann-json,
# GoogleTest, pkgconf) is hidden behind an overlay whiteout, as on the GPU machine which
# lacks them; then, with scripts/gpu/env.sh:
#   1. pkg-config, mpicc and mpirun are the bundle's, and mpirun -np 2 runs an MPI program;
#   2. CMake configures dpo_dist with DPO_BUNDLE_CMAKE_ARGS and finds every dependency
#      inside the bundle (checked in CMakeCache.txt);
#   3. the torch-free targets that use each dependency build, and their tests pass
#      (test_data: HDF5, sentencepiece, JSON, dpo_preprocess run under mpirun; test_preprocess_mpi:
#      OpenMPI at 1-3 ranks; all: GoogleTest; dpo_preprocess --help: Boost.Program_options).
# Nothing outside the namespace changes. Build dir: build-bundle (or $2).
#   scripts/gpu/bundle_selftest.sh [BUNDLE] [BUILD_DIR]
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bundle=$(cd "${1:-$src/.gpu_bundle}" && pwd)
build=${2:-$src/build-bundle}

if [ "${DPO_SELFTEST_INNER:-0}" != 1 ]; then
  [ "$(id -u)" = 0 ] || { echo "bundle_selftest: needs root (mount namespace + overlay)"; exit 77; }
  command -v unshare >/dev/null || { echo "bundle_selftest: needs unshare (util-linux)"; exit 77; }
  # Packages whose files are hidden: those the bundle carries in root/ (not the fallback
  # runtime libraries like libssl or libcurl, which this machine's own tools need).
  # libpcre2-8-0 stays visible: this machine's mount, grep and sed need it (through
  # libselinux), and every Debian/Ubuntu image has it; the bundle carries it anyway (newer
  # than Ubuntu 22.04's, same soname) for the -dev link and the GPU machine's build.
  pkgs=$(sed -n 's/^\([^ ]*\) .* -> root.*/\1/p' "$bundle/MANIFEST" | grep -vx 'libpcre2-8-0')
  [ -n "$pkgs" ] || { echo "bundle_selftest: $bundle/MANIFEST lists no packages"; exit 1; }
  ov=$(mktemp -d /tmp/dpo_bundle_selftest.XXXXXX)
  trap 'rm -rf "$ov"' EXIT
  mkdir -p "$ov/usr.up" "$ov/usr.work" "$ov/etc.up" "$ov/etc.work"
  # One whiteout (character device 0/0) per file of those packages, and per /usr/bin link
  # (update-alternatives: mpirun, mpicc, h5cc, ...) that leads to one.
  n=$(python3 - "$ov" $pkgs <<'PY'
import os, subprocess, sys
ov, pkgs = sys.argv[1], sys.argv[2:]
files = set()
for p in pkgs:
    r = subprocess.run(["dpkg", "-L", p], capture_output=True, text=True)
    if r.returncode != 0:
        continue  # not installed here: nothing to hide
    for f in r.stdout.split("\n"):
        for g in (f, "/usr" + f):  # merged /usr: /lib/x.so is /usr/lib/x.so
            if (g.startswith("/usr/") or g.startswith("/etc/")) and (os.path.islink(g) or os.path.isfile(g)):
                files.add(g)
for l in os.listdir("/usr/bin"):
    l = "/usr/bin/" + l
    if os.path.islink(l) and os.path.realpath(l) in files:
        files.add(l)
for g in files:
    top, rel = g[1:].split("/", 1)
    dst = os.path.join(ov, top + ".up", rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.mknod(dst, 0o600 | 0o020000, os.makedev(0, 0))
print(len(files))
PY
)
  echo "bundle_selftest: hiding $n files of $(echo $pkgs | wc -w) packages"
  rc=0
  unshare -m bash -c '
    set -e
    mount --make-rprivate /
    mount -t overlay overlay -o lowerdir=/usr,upperdir='"$ov"'/usr.up,workdir='"$ov"'/usr.work /usr
    mount -t overlay overlay -o lowerdir=/etc,upperdir='"$ov"'/etc.up,workdir='"$ov"'/etc.work /etc
    DPO_SELFTEST_INNER=1 exec bash "$0" "$1" "$2"' "${BASH_SOURCE[0]}" "$bundle" "$build" || rc=$?
  exit $rc
fi

# ---- inside the namespace ---------------------------------------------------------------
fail() { echo "bundle_selftest: FAIL: $*"; exit 1; }
ok() { echo "bundle_selftest: ok: $*"; }
[ ! -e /usr/include/hdf5/serial/hdf5.h ] || fail "system HDF5 headers still visible (overlay did not hide them)"
[ ! -e /usr/lib/x86_64-linux-gnu/libmpi.so.40 ] || fail "system libmpi still visible"
# shellcheck source=scripts/gpu/env.sh
source "$src/scripts/gpu/env.sh" "$bundle"
if [ -n "${DPO_SELFTEST_CMD:-}" ]; then  # debugging: run a command in this environment instead
  eval "$DPO_SELFTEST_CMD"
  exit $?
fi
ok "env.sh: $DPO_BUNDLE_MISSING_LIBS fallback libraries linked as missing on this machine"

for t in pkg-config mpicc mpirun spm_train; do
  p=$(command -v $t) || fail "$t not found on PATH"
  case "$p" in "$bundle"/*) ;; *) fail "$t is $p, not the bundle's" ;; esac
done
pc=$(pkg-config --cflags --libs sentencepiece)
[[ $pc == *"$bundle/root/usr/"* ]] || fail "pkg-config sentencepiece: '$pc' does not point into the bundle"
ok "pkg-config sentencepiece -> $pc"
mc=$(mpicc -showme:compile)
[[ $mc == *"$bundle/root/usr/"* ]] || fail "mpicc -showme:compile: '$mc' does not point into the bundle (OPAL_PREFIX?)"
ok "mpicc -showme:compile -> $mc"

tmpd=$(mktemp -d /tmp/dpo_bundle_mpi.XXXXXX)
cat >"$tmpd/hello.c" <<'EOF'
#include <mpi.h>
#include <stdio.h>
int main(int argc, char** argv) {
  int rank, size, sum = 0;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int one = rank + 1;
  MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) printf("allreduce %d ranks: %d\n", size, sum);
  MPI_Finalize();
  return sum == size * (size + 1) / 2 ? 0 : 1;
}
EOF
mpicc "$tmpd/hello.c" -o "$tmpd/hello" || fail "mpicc could not build an MPI program"
out=$(timeout 60 mpirun --oversubscribe -np 2 "$tmpd/hello" 2>&1) || fail "mpirun -np 2: $out"
[[ $out == *"allreduce 2 ranks: 3"* ]] || fail "mpirun -np 2 printed: $out"
rm -rf "$tmpd"
ok "mpirun -np 2: $out"

rm -rf "$build"
mkdir -p "$build"
cmake -G Ninja -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$DPO_BUNDLE_PREFIX" "${DPO_BUNDLE_CMAKE_ARGS[@]}" >"$build/selftest-configure.log" 2>&1 ||
  { tail -n 30 "$build/selftest-configure.log"; fail "cmake configure against the bundle failed (log: $build/selftest-configure.log)"; }
ok "configured $build"
cache=$build/CMakeCache.txt
for v in HDF5_C_INCLUDE_DIR HDF5_hdf5_LIBRARY_RELEASE MPI_C_HEADER_DIR MPI_mpi_LIBRARY Boost_DIR nlohmann_json_DIR GTest_DIR \
  boost_program_options_DIR; do
  line=$(grep -E "^$v(:[A-Z]+)?=" "$cache" | head -n 1) || true
  [ -n "$line" ] || { grep -E "^(HDF5|MPI|Boost|boost|nlohmann|GTest)[A-Za-z_]*(:[A-Z]+)?=" "$cache" | head -n 40; fail "$v not in CMakeCache.txt"; }
  [[ ${line#*=} == "$bundle"/* ]] || fail "$line: not in the bundle"
  ok "$line"
done
for pc in SENTENCEPIECE PCRE2 UTF8PROC; do  # the pkg-config dependencies
  found=$(grep -E "^${pc}_(INCLUDEDIR|LIBDIR)" "$cache" | head -n 2 | tr '\n' ' ')
  [[ $found == *"$bundle"/* ]] || fail "$pc (pkg-config) not found in the bundle: $found"
  ok "$found"
done
targets=(dpo_preprocess test_data test_preprocess_mpi)
nice -n 5 ninja -C "$build" -j "${DPO_SELFTEST_JOBS:-2}" "${targets[@]}" >"$build/selftest-build.log" 2>&1 ||
  { tail -n 30 "$build/selftest-build.log"; fail "building ${targets[*]} against the bundle failed (log: $build/selftest-build.log)"; }
ok "built ${targets[*]}"
"$build/bin/dpo_preprocess" --help >/dev/null || fail "dpo_preprocess --help failed"
if ldd "$build/bin/dpo_preprocess" | grep -E "libhdf5|libmpi|libsentencepiece|libboost|libutf8proc|libpcre2-(16|32|posix)" | grep -v "$bundle" | grep .; then
  fail "dpo_preprocess loads the libraries above from outside the bundle"
fi
ok "dpo_preprocess loads HDF5, MPI, sentencepiece, Boost and utf8proc from the bundle"
for t in test_data test_preprocess_mpi; do
  timeout 600 "$build/tests/$t" >"$build/selftest-$t.log" 2>&1 || { tail -n 30 "$build/selftest-$t.log"; fail "$t against the bundle failed (log: $build/selftest-$t.log)"; }
  ok "$t: $(grep -E '^\[  PASSED  \]' "$build/selftest-$t.log")"
done
echo "bundle_selftest: PASS"
