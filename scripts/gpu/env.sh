# shellcheck shell=bash
# Environment for building and running dpo_dist against the dependency bundle made by
# scripts/gpu/bundle.sh (docs/gpu.md). Sourced, not run:
#
#   source scripts/gpu/env.sh [BUNDLE]        (default BUNDLE: <repo>/.gpu_bundle)
#
# Sets PATH, LD_LIBRARY_PATH, PKG_CONFIG_*, OPAL_PREFIX/PMIX_INSTALL_PREFIX (the bundle's
# OpenMPI and PMIx are relocated from /usr), lets mpirun run as root, and defines the array
# DPO_BUNDLE_CMAKE_ARGS (the -D options that, with DPO_BUNDLE_PREFIX in CMAKE_PREFIX_PATH, make
# CMake find HDF5, MPI, Boost, sentencepiece, nlohmann-json and GoogleTest in the bundle). The bundle's fallback libraries (libcurl,
# libssl, libudev, ...) are put on the library path only where this machine lacks them.
_dpo_src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DPO_BUNDLE=$(cd "${1:-$_dpo_src/.gpu_bundle}" 2>/dev/null && pwd) || {
  echo "env.sh: no bundle at ${1:-$_dpo_src/.gpu_bundle}: run scripts/gpu/bundle.sh (on Debian 12, with network)" >&2
  return 1 2>/dev/null || exit 1
}
export DPO_BUNDLE
_dpo_r=$DPO_BUNDLE/root/usr
_dpo_l=$_dpo_r/lib/x86_64-linux-gnu
[ -d "$_dpo_l/openmpi" ] || {
  echo "env.sh: $DPO_BUNDLE is not a complete bundle (no OpenMPI in it): re-run scripts/gpu/bundle.sh" >&2
  return 1 2>/dev/null || exit 1
}

# Fallback libraries this machine lacks, as links in one directory (rebuilt each time).
_dpo_missing=$DPO_BUNDLE/host-missing
rm -rf "$_dpo_missing"
mkdir -p "$_dpo_missing"
_dpo_have=$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null) | awk '/x86-64/ {print $1}' | sort -u)
_dpo_nmissing=0
for _f in "$DPO_BUNDLE"/fallback/usr/lib/x86_64-linux-gnu/*.so.*; do
  _n=$(basename "$_f")
  # Sonames only (libcurl.so.4, not libcurl.so.4.8.0): what the dynamic loader looks up.
  [[ $_n =~ \.so\.[0-9]+$ ]] && [ -e "$_f" ] || continue
  if ! grep -Fxq "$_n" <<<"$_dpo_have"; then
    ln -s "$_f" "$_dpo_missing/$_n"
    _dpo_nmissing=$((_dpo_nmissing + 1))
  fi
done
export DPO_BUNDLE_MISSING_LIBS=$_dpo_nmissing

export PATH=$_dpo_r/bin:$PATH
export LD_LIBRARY_PATH=$_dpo_l:$_dpo_l/openmpi/lib:$_dpo_l/pmix2/lib:$_dpo_missing${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PKG_CONFIG_LIBDIR=$_dpo_l/pkgconfig:$_dpo_r/share/pkgconfig
export PKG_CONFIG_SYSROOT_DIR=$DPO_BUNDLE/root
# OpenMPI and PMIx were built for /usr: these relocate them (plugins, help texts, wrappers).
export OPAL_PREFIX=$_dpo_r
export PMIX_INSTALL_PREFIX=$_dpo_l/pmix2
export PMIX_MCA_mca_base_component_path=$_dpo_l/pmix2/lib/pmix  # PMIx's plugins (zlib, ...)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# A single node: shared memory and TCP (the fabric plugins are not bundled).
export OMPI_MCA_btl=self,vader,tcp OMPI_MCA_pml=ob1 OMPI_MCA_osc=^ucx OMPI_MCA_mtl=^ofi,psm,psm2
export DPO_BUNDLE_PREFIX=$_dpo_r  # for CMAKE_PREFIX_PATH (with libtorch's)
DPO_BUNDLE_CMAKE_ARGS=(
  "-DMPI_C_COMPILER=$_dpo_r/bin/mpicc"
  "-DMPIEXEC_EXECUTABLE=$_dpo_r/bin/mpirun"
  "-DPKG_CONFIG_EXECUTABLE=$_dpo_r/bin/pkgconf"
)
unset _dpo_src _dpo_r _dpo_l _dpo_missing _dpo_have _dpo_nmissing _f _n
