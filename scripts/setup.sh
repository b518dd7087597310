#!/usr/bin/env bash
# Installs everything dpo_dist needs to build, test and run, on Debian 12 with Debian's
# packages and PyPI (no other registry):
#  1. Debian packages (apt-get; skipped when present);
#  2. the project's Python venv (scripts/python/requirements.lock: torch 2.15 whose wheel
#     carries the libtorch the build links, and transformers / peft / trl / bitsandbytes /
#     tokenizers for the interop tests and benchmarks), in $DPO_VENV, default
#     ~/.cache/dpo_dist/venv: outside the checkout, so every clone (and CI's) finds it
#     again; nothing is downloaded when it already matches the lock file.
# Idempotent; safe to re-run. Prints the venv's path last (scripts/venv.sh finds it too).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PKGS=(
  build-essential cmake ninja-build pkg-config git ccache
  clang             # the default compiler of scripts/: ~2.5x faster than GCC on this tree, same results
  libopenmpi-dev openmpi-bin
  libhdf5-dev hdf5-tools
  libsentencepiece-dev sentencepiece
  libboost-program-options-dev
  libgtest-dev googletest
  nlohmann-json3-dev
  libpcre2-dev libutf8proc-dev
  python3 python3-venv xz-utils
  iproute2 procps
  chromium          # headless: the HTML report test (tests/e2e/report_browser.sh)
)
# DPO_WITH_FUZZ=1: libFuzzer for scripts/fuzz.sh (the ctest replay of the fuzz corpora
# does not need it: it builds with the normal compiler).
if [ "${DPO_WITH_FUZZ:-0}" = 1 ]; then
  PKGS+=(clang-14 libfuzzer-14-dev)
fi
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
echo "setup: all ${#PKGS[@]} Debian packages present"

# ---- the Python venv ------------------------------------------------------------------
# shellcheck source=scripts/venv.sh
source "$here/venv.sh"
lock=$here/python/requirements.lock
want=$(sha256sum "$lock" | cut -d' ' -f1)
stamp=$DPO_VENV/.dpo_requirements_sha256
if [ -x "$DPO_VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup: venv $DPO_VENV matches scripts/python/requirements.lock"
else
  # The interpreter the venv is made from: DPO_PYTHON_BASE, else python3 (on this machine
  # kind a pyenv 3.11; the lock is for CPython 3.11 on x86_64).
  base=${DPO_PYTHON_BASE:-python3}
  if [ ! -x "$DPO_VENV/bin/python" ]; then
    mkdir -p "$(dirname "$DPO_VENV")"
    "$base" -m venv "$DPO_VENV"
  fi
  echo "setup: installing scripts/python/requirements.lock into $DPO_VENV (first time: ~6 GB, torch's CUDA wheel)"
  "$DPO_VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$DPO_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$lock"
  # Offline: bitsandbytes looks for a hub kernel on import (a warning, nothing else);
  # the whole output is shown only when an import fails.
  if ! out=$(HF_HUB_OFFLINE=1 "$DPO_VENV/bin/python" - 2>&1 <<'PY'
import torch, transformers, peft, trl, bitsandbytes, tokenizers  # noqa: F401 (they import)
print("setup: torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "trl", trl.__version__, "bitsandbytes", bitsandbytes.__version__)
PY
  ); then
    echo "$out" >&2
    echo "setup: the venv $DPO_VENV does not import its packages (above); remove it and re-run" >&2
    exit 1
  fi
  grep '^setup:' <<<"$out"
  echo "$want" >"$stamp"
fi
echo "setup: venv $DPO_VENV"
