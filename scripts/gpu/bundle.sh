#!/usr/bin/env bash
# Builds the dependency bundle that travels with a run on a GPU machine which has CUDA,
# cmake, ninja and a Python torch but no HDF5 / OpenMPI / Boost / sentencepiece / JSON /
# GoogleTest development files and no network (docs/gpu.md).
#
#   scripts/gpu/bundle.sh [DEST]        (default DEST: <repo>/.gpu_bundle, git-ignored)
#
# Run on Debian 12 (amd64) with network access to the Debian archive. Nothing is installed:
# the packages are fetched with `apt-get download` and unpacked with `dpkg -x` into
#   DEST/root/      the packages dpo_dist builds against and runs with (always used)
#   DEST/fallback/  the shared libraries those need beyond glibc/libstdc++/libgcc/zlib (libcurl,
#                   libssl, libudev, ...): scripts/gpu/env.sh puts on the library path only
#                   the ones the GPU machine lacks, so its own copies win
# then pruned (docs, manuals, static libraries except GoogleTest's, Boost headers outside
# what program_options includes, OpenMPI plugins for fabrics not bundled) and checked to be
# at most 50 MiB. DEST/MANIFEST lists the packages and their versions.
# The downloaded .deb files are cached in ${DPO_BUNDLE_CACHE:-/var/cache/dpo_gpu_bundle}.
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=${1:-$src/.gpu_bundle}
cache=${DPO_BUNDLE_CACHE:-/var/cache/dpo_gpu_bundle}
limit_mib=50
arch=x86_64-linux-gnu

say() { echo "bundle [${SECONDS}s]: $*"; }
die() {
  echo "bundle: error: $*" >&2
  exit 1
}

[ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ] || die "run this on Debian 12 amd64 (the GPU machine is x86-64)"
grep -q 'VERSION_CODENAME=bookworm' /etc/os-release || die "run this on Debian 12 (bookworm): the bundle's libraries are bookworm's"
for t in apt-get dpkg dpkg-deb readelf g++ du; do
  command -v $t >/dev/null || die "$t not found (apt-get install binutils g++)"
done

# What dpo_dist compiles and links against, the launcher and the tokenizer trainer.
core_pkgs=(
  libhdf5-dev libhdf5-103-1 libhdf5-hl-100 libsz2 libaec0
  libopenmpi-dev libopenmpi3 openmpi-bin openmpi-common libpmix2 libhwloc15
  libevent-core-2.1-7 libevent-pthreads-2.1-7
  libboost-program-options1.74-dev libboost-program-options1.74.0
  libsentencepiece-dev libsentencepiece0 sentencepiece
  nlohmann-json3-dev libgtest-dev
  libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libutf8proc-dev libutf8proc2
  pkgconf pkgconf-bin libpkgconf3
)
# Libraries every Linux with a C++ compiler has: never bundled.
base_sonames='^(libc\.so\.6|libm\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|libutil\.so\.1|ld-linux-x86-64\.so\.2|libstdc\+\+\.so\.6|libgcc_s\.so\.1|libz\.so\.1|libresolv\.so\.2)$'
# Fabrics and GPU plugins not bundled: an OpenMPI/PMIx plugin that needs one is removed
# (ranks of one node talk over shared memory and TCP; NCCL does the GPU collectives).
refused_sonames='^(liboshmem|libmpi_mpifh|libmpi_usempi|libmpi_java|libfabric|libucp|libucs|libuct|libucm|libpsm|libibverbs|librdmacm|libnl-|libcuda|libnvidia|libOpenCL|libXNVCtrl|libX11|libxml2|libslurm|libpmi\.|libpmi2\.)'

mkdir -p "$cache"
tmp="$dest.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/root" "$tmp/fallback"
trap 'rm -rf "$tmp"' EXIT

# fetch PKG...: the .deb of each package (the archive's candidate version) into the cache.
fetch() {
  local p need=()
  for p in "$@"; do
    ls "$cache/${p}_"*_*.deb >/dev/null 2>&1 || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "${need[@]}" >/dev/null) ||
      die "apt-get download ${need[*]} failed (network? run apt-get update first)"
  fi
}
deb_of() { ls -t "$cache/${1}_"*_*.deb | head -n 1; }
manifest=()
unpack() { # unpack DIR PKG...
  local d=$1 p f
  shift
  for p in "$@"; do
    f=$(deb_of "$p")
    dpkg -x "$f" "$d"
    manifest+=("$(dpkg-deb -f "$f" Package) $(dpkg-deb -f "$f" Version) -> $(basename "$d")")
  done
}

say "fetching ${#core_pkgs[@]} packages into $cache"
fetch "${core_pkgs[@]}" libboost1.74-dev
say "unpacking"
unpack "$tmp/root" "${core_pkgs[@]}"
say "pruning"
R=$tmp/root/usr

# ---- prune -------------------------------------------------------------------------------
rm -rf "$R/share/doc" "$R/share/man" "$R/share/lintian" "$R/share/locale" "$R/share/bug" \
  "$R/share/doc-base" "$R/share/javascript" "$R/src" "$R/share/aclocal"
# Static libraries: only GoogleTest's (it ships no shared ones).
find "$tmp/root" -name '*.a' ! -name 'libgtest*.a' ! -name 'libgmock*.a' -delete
# HDF5: the C library only (the C++/Fortran/high-level .so links would dangle); its compiler
# wrappers print the system paths, so CMake must not find them (FindHDF5 then searches the
# prefix); the same for the Fortran module dirs.
find "$tmp/root" \( -name 'libhdf5*fortran*' -o -name 'libhdf5*_cpp*' -o -name 'h5*fc*' -o -name 'h5c++*' \
  -o -name 'h5cc*' -o -name 'h5pcc*' \) -exec rm -rf {} +
rm -rf "$R/lib/$arch/hdf5/serial/include"/*.mod "$R/include/hdf5/serial"/*.mod "$R/lib/$arch/fortran"
# OpenMPI: no Fortran or Java bindings, no Open SHMEM, no VampirTrace/man data.
# (OPAL's own mca_shmem_* plugins stay: ranks on one node share memory through them.)
find "$tmp/root" \( -name '*mpifh*' -o -name '*usempi*' -o -name '*mpi_java*' -o -name '*oshmem*' \
  -o -name 'mpif*' -o -name 'mpijavac*' -o -name '*.mod' \) -exec rm -rf {} +
# OpenMPI's internal headers: only those <mpi.h> reads from C++ (its C++ bindings).
mi="$R/lib/$arch/openmpi/include"
printf '#include <mpi.h>\nint main() { return 0; }\n' >"$tmp/mpi.cpp"
g++ -std=c++17 -M -I "$mi" "$tmp/mpi.cpp" | tr ' \\' '\n\n' | sed -n "s|^$mi/openmpi/||p" | sort -u >"$tmp/mpi.list"
[ -s "$tmp/mpi.list" ] || die "g++ -M <mpi.h> read nothing under $mi/openmpi"
mv "$mi/openmpi" "$tmp/mpi_inc"
(cd "$tmp/mpi_inc" && while read -r h; do mkdir -p "$mi/openmpi/$(dirname "$h")" && cp -a "$h" "$mi/openmpi/$h"; done <"$tmp/mpi.list")
rm -rf "$tmp/mpi_inc" "$tmp/mpi.cpp" "$tmp/mpi.list"
# Boost: only the headers program_options pulls in + boost/config, and Boost's CMake
# packages, taken straight from the .deb (unpacking all of its 14000 headers is slow). The
# header list is what the compiler reads from the same Boost installed here (setup.sh).
boost_deb=$(deb_of libboost1.74-dev)
[ "$(dpkg-query -W -f='${Version}' libboost1.74-dev 2>/dev/null)" = "$(dpkg-deb -f "$boost_deb" Version)" ] ||
  die "libboost1.74-dev $(dpkg-deb -f "$boost_deb" Version) must be installed here to list its headers (scripts/setup.sh)"
printf '#include <boost/program_options.hpp>\nint main() { return 0; }\n' >"$tmp/po.cpp"
{
  g++ -std=c++17 -M "$tmp/po.cpp" | tr ' \\' '\n\n' | sed -n 's|^/usr/include/boost/|./usr/include/boost/|p'
  dpkg-deb --fsys-tarfile "$boost_deb" | tar -t | grep -E '^\./usr/include/boost/(config/.*[^/]|version\.hpp)$|^\./usr/lib/[^/]*/cmake/.*[^/]$'
} | sort -u >"$tmp/boost.list"
dpkg-deb --fsys-tarfile "$boost_deb" | tar -x -C "$tmp/root" -T "$tmp/boost.list"
manifest+=("$(dpkg-deb -f "$boost_deb" Package) $(dpkg-deb -f "$boost_deb" Version) -> root (program_options headers, CMake files)")
# Boost's CMake packages other than the headers and program_options.
for d in "$R/lib/$arch/cmake"/boost_* "$R/lib/$arch/cmake"/Boost*; do
  case "$(basename "$d")" in
    Boost-*|BoostDetectToolset*|boost_headers-*|boost_program_options-*) ;;
    *) rm -rf "$d" ;;
  esac
done
# Launcher names that Debian gives through update-alternatives (not in the packages).
for t in mpirun mpiexec mpicc mpicxx mpic++ ompi_info orterun; do
  [ -e "$R/bin/$t" ] || { [ -e "$R/bin/$t.openmpi" ] && ln -s "$t.openmpi" "$R/bin/$t"; } || true
done
[ -e "$R/bin/pkg-config" ] || ln -s pkgconf "$R/bin/pkg-config"

# ---- shared-library closure ---------------------------------------------------------------
elf_files() { find "$@" -type f \( -name '*.so*' -o -perm -u+x \) -exec sh -c 'head -c4 "$1" | grep -q ELF && echo "$1"' _ {} \; 2>/dev/null; }
provided() { grep -Fxq "$1" "$tmp/provided.list"; }
say "shared-library closure"
round=0
while :; do
  round=$((round + 1))
  new_pkgs=()
  removed=0
  find "$tmp/root" "$tmp/fallback" \( -type f -o -type l \) -printf '%f\n' | sort -u >"$tmp/provided.list"
  while read -r f; do
    for so in $(readelf -d "$f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [[ $so =~ $base_sonames ]] && continue
      if [[ $so =~ $refused_sonames ]] || { [[ $so == libmca_common_* ]] && ! provided "$so"; }; then
        case "$f" in
          */openmpi3/*|*/pmix/*|*/hwloc/*|*/libmca_common_*) rm -f "$f"; removed=$((removed + 1)); break ;;
          *) die "$f needs $so, which is not bundled (refused list): extend the bundle" ;;
        esac
      fi
      provided "$so" && continue
      path=$(ldconfig -p | awk -v s="$so" '$1 == s && /x86-64/ && !p {print $NF; p = 1}')
      [ -n "$path" ] || die "$f needs $so: not installed here, so its package is unknown (apt-get install it, re-run)"
      pkg=$(dpkg -S "*/$so" 2>/dev/null | sed -n '1s/:.*//p') || true
      [ -n "$pkg" ] || die "$f needs $so ($path): no Debian package owns it"
      [[ " ${new_pkgs[*]} " == *" $pkg "* ]] || new_pkgs+=("$pkg")
    done
  done < <(elf_files "$tmp/root" "$tmp/fallback")
  [ ${#new_pkgs[@]} -eq 0 ] && break
  [ $round -lt 10 ] || die "library closure did not settle after 10 rounds: ${new_pkgs[*]}"
  say "round $round: runtime libraries from ${new_pkgs[*]}"
  fetch "${new_pkgs[@]}"
  unpack "$tmp/fallback" "${new_pkgs[@]}"
  # Only the shared libraries of a runtime package matter.
  find "$tmp/fallback" -mindepth 1 -maxdepth 1 ! -name usr ! -name lib -exec rm -rf {} +
  rm -rf "$tmp/fallback/usr/share" "$tmp/fallback/usr/bin" "$tmp/fallback/usr/sbin"
  [ $removed -eq 0 ] || say "removed $removed plugins that need unbundled fabrics"
done
# Debian 12 keeps some runtime libraries in /lib (merged-/usr systems see them in /usr/lib).
if [ -d "$tmp/fallback/lib" ]; then
  mkdir -p "$tmp/fallback/usr/lib"
  cp -a "$tmp/fallback/lib/." "$tmp/fallback/usr/lib/"
  rm -rf "$tmp/fallback/lib"
fi

printf '%s\n' "${manifest[@]}" | sort >"$tmp/MANIFEST"
echo "made by scripts/gpu/bundle.sh on $(date -u +%Y-%m-%dT%H:%MZ) from Debian $(cat /etc/debian_version)" >>"$tmp/MANIFEST"
rm -f "$tmp/po.cpp" "$tmp/boost.list" "$tmp/provided.list"

size_kib=$(du -sk "$tmp" | cut -f1)
size_mib=$(((size_kib + 1023) / 1024))
say "size: root $(du -sh "$tmp/root" | cut -f1), fallback $(du -sh "$tmp/fallback" | cut -f1), total ${size_mib} MiB (limit ${limit_mib} MiB)"
[ "$size_mib" -le "$limit_mib" ] || die "bundle is ${size_mib} MiB > ${limit_mib} MiB: prune more"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
say "$(wc -l <"$dest/MANIFEST") packages in $dest (MANIFEST); use: source scripts/gpu/env.sh $dest"
