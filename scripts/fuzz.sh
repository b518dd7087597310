#!/usr/bin/env bash
# Fuzzes every parser with libFuzzer + ASan + UBSan (docs/robustness.md).
#   scripts/fuzz.sh [-t SECONDS] [HARNESS...]
# Builds the harnesses with clang in build-fuzz (-DDPO_FUZZ=ON; DPO_FUZZ_BUILD_DIR to
# change), then runs each HARNESS (default: all) for SECONDS (default 600) on its seed
# corpus + regression inputs, growing build-fuzz/corpus/<harness>/ (kept between runs),
# and writes a results table (harness, seconds, execs, coverage, crashes) to
# build-fuzz/fuzz_results.md. Exit status 1 when any harness found something: its
# input is in build-fuzz/artifacts/<harness>/ (fix the parser, then copy the input to
# tests/fuzz/regressions/<harness>/ so the ctest replay keeps it fixed).
# Needs clang-14 and libfuzzer-14-dev (DPO_WITH_FUZZ=1 scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
seconds=600
while getopts "t:h" opt; do
  case $opt in
    t) seconds=$OPTARG ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
all=(safetensors llama_config adapter_config quant_state cli jsonl_rows preference_h5 chat_template hf_tokenizer)
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=("${all[@]}")
for h in "${harnesses[@]}"; do
  [ -f "tests/fuzz/fuzz_$h.cpp" ] || { echo "fuzz.sh: no harness tests/fuzz/fuzz_$h.cpp (have: ${all[*]})" >&2; exit 2; }
done
CC=${CC_FUZZ:-clang-14}
CXX=${CXX_FUZZ:-clang++-14}
command -v "$CXX" >/dev/null || { echo "fuzz.sh: $CXX not found: DPO_WITH_FUZZ=1 scripts/setup.sh" >&2; exit 2; }
B=${DPO_FUZZ_BUILD_DIR:-build-fuzz}
if [ ! -f "$B/build.ninja" ]; then
  cmake -G Ninja -S . -B "$B" -DDPO_FUZZ=ON -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DDPO_WITH_CUDA=OFF >"$B.configure.log" 2>&1 ||
    { tail -n 20 "$B.configure.log"; exit 1; }
fi
targets=()
for h in "${harnesses[@]}"; do targets+=("fuzz_$h"); done
nice -n 5 ninja -C "$B" -j "${DPO_JOBS:-$(nproc)}" "${targets[@]}"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$src/tests/fuzz/lsan.supp:print_suppressions=0}
# Raw HDF5 bytes mostly find libhdf5's own bugs (tests/fuzz/libhdf5_issues/): fuzz the
# structured mode, which reaches our validation.
export DPO_FUZZ_H5_STRUCTURED=${DPO_FUZZ_H5_STRUCTURED:-1}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
results="$B/fuzz_results.md"
{
  echo "| harness | seconds | execs | exec/s | coverage (edges) | features | corpus | crashes |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
} >"$results"
found=0
for h in "${harnesses[@]}"; do
  corpus="$B/corpus/$h"
  art="$B/artifacts/$h"
  mkdir -p "$corpus" "$art"
  dict=()
  case $h in
    cli) dict=(-dict="$src/tests/fuzz/cli.dict") ;;
    safetensors | llama_config | adapter_config | quant_state | jsonl_rows | hf_tokenizer) dict=(-dict="$src/tests/fuzz/json.dict") ;;
  esac
  [ -f "tests/fuzz/$h.dict" ] && dict=(-dict="$src/tests/fuzz/$h.dict")
  seeds=("$src/tests/fuzz/corpus/$h" "$src/tests/fuzz/regressions/$h")
  # The chat-template seeds are the engine's golden fixtures (real model templates), and
  # hostile ones (deep nesting) in corpus/chat_template.
  [ "$h" = chat_template ] && seeds=("$src/tests/data/fixtures/chat" "$src/tests/fuzz/corpus/$h" "$src/tests/fuzz/regressions/$h")
  # Inputs as long as the JSON readers' hostile cases (nesting 50,000 deep, 100 KB lines:
  # issue 28): libFuzzer's default max_len (4,096) cannot express them.
  max_len=65536
  case $h in
    safetensors | llama_config | adapter_config | quant_state | jsonl_rows | chat_template | hf_tokenizer) max_len=1048576 ;;
  esac
  log="$B/fuzz_$h.log"
  echo "fuzz.sh: $h for ${seconds} s (log $log)"
  start=$SECONDS
  touch "$art/.start"
  set +e
  timeout -k 10 $((seconds + 300)) "$B/fuzz/fuzz_$h" -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 \
    -max_len="$max_len" -print_final_stats=1 -artifact_prefix="$art/" "${dict[@]}" "$corpus" "${seeds[@]}" >"$log" 2>&1
  rc=$?
  set -e
  took=$((SECONDS - start))
  execs=$(grep -a 'stat::number_of_executed_units:' "$log" | tail -n 1 | awk '{print $2}' || true)
  eps=$(grep -a 'stat::average_exec_per_sec:' "$log" | tail -n 1 | awk '{print $2}' || true)
  last=$(grep -a -E '^#[0-9]+.*cov: ' "$log" | tail -n 1 || true)
  cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
  crashes=$(find "$art" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'oom-*' -o -name 'timeout-*' \) -newer "$art/.start" 2>/dev/null | wc -l || true)
  if [ "$rc" != 0 ] && [ "$crashes" = 0 ]; then crashes="1 (exit $rc, see log)"; fi
  [ "$crashes" = 0 ] || found=1
  echo "| $h | $took | ${execs:-?} | ${eps:-?} | ${cov:-?} | ${ft:-?} | ${corp:-?} | $crashes |" >>"$results"
  tail -n 1 "$results"
done
echo
echo "fuzz.sh: results ($(date -u +%Y-%m-%d), load $(cut -d' ' -f1-3 /proc/loadavg)):"
cat "$results"
exit $found
