#!/usr/bin/env bash
# Installs every Debian package dpo_dist needs to build, test and run.
# Idempotent: packages already present are skipped by apt-get; safe to re-run.
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build pkg-config git ccache
  libtorch-dev libopenblas0-pthread libopenblas-pthread-dev
  libopenmpi-dev openmpi-bin
  libhdf5-dev hdf5-tools
  libsentencepiece-dev sentencepiece
  libboost-program-options-dev
  libgtest-dev googletest
  nlohmann-json3-dev
  python3
  chromium          # headless: the HTML report test (tests/e2e/report_browser.sh)
)
if [ "${DPO_WITH_SLURM:-0}" = 1 ]; then
  PKGS+=(slurm-wlm munge slurm-client)
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "setup: all ${#PKGS[@]} packages present"
