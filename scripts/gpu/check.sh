#!/usr/bin/env bash
# The one-shot GPU check (docs/gpu.md, issue 12): on a machine with an NVIDIA GPU, CUDA's
# nvcc, cmake, ninja and a Python torch (CUDA build), it builds dpo_dist against that torch's
# libtorch and the dependency bundle (.gpu_bundle, scripts/gpu/bundle.sh), runs every item
# and prints one verdict line per item: PASS, FAIL or NOT RUN, with its numbers.
#
#   scripts/gpu/check.sh OUTDIR
#
# OUTDIR gets check.log (everything), verdicts.txt (the verdict lines) and bench.txt (the
# 7B/8B benchmark lines); work files go to ${TMPDIR:-/tmp}. Exit 0 when no item FAILed.
# Sized for one H200 with 16 cores: about 8 minutes with the build (DPO_CHECK_SKIP_BUILD=1
# reuses build-gpu). Items:
#   build             configure + build against the Python torch (scripts/gpu/build.sh)
#   nf4_cuda          NF4 CUDA dequantization bitwise == CPU (test_cuda Nf4Cuda.*)
#   cuda_rng          CUDA generator state save/restore continues dropout (test_cuda CudaRng.*)
#   tiny_model_cuda   tiny QLoRA model on CUDA vs CPU, fp32 logps/grads (test_cuda CudaModel.Tiny*)
#   train_fp32        5 DPO steps --device cuda vs cpu, fp32: losses + adapters <= 1e-5 rel
#   train_bf16        5 DPO steps --device cuda bf16 vs cpu fp32: <= 2e-2 rel
#   grad_ckpt         gradient checkpointing on CUDA: gradients (test_cuda) and 5 steps == without
#   resume_cuda       LoRA dropout 0.1 on CUDA: 3 steps + resume to 6 == 6 steps, bit for bit;
#                     same without the saved RNG state must differ; --device cpu resume refused
#   nccl_vs_mpi       --backend nccl == --backend mpi (np=1; np=2 with 2 GPUs), bit for bit,
#                     and dist_nccl_test
#   bench_llama2_7b   QLoRA DPO micro-batch at Llama-2-7B shape: tokens/s, peak GPU memory, %peak
#   bench_llama3_8b   the same at Llama-3-8B shape
#   hf_logps          dpo_score (CUDA, fp32, dense base) vs transformers LlamaForCausalLM: <= 1e-4 rel
#   peft_rewards      PeftModel.from_pretrained(trainer's adapter) eval rewards == trainer's: <= 1e-4 rel
set -uo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ $# -ge 1 ] || { echo "usage: scripts/gpu/check.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
if [ "${DPO_CHECK_INNER:-0}" != 1 ]; then
  # Everything this script prints also goes to OUTDIR/check.log.
  DPO_CHECK_INNER=1 bash "${BASH_SOURCE[0]}" "$out" 2>&1 | tee "$out/check.log"
  exit "${PIPESTATUS[0]}"
fi
: >"$out/verdicts.txt"
: >"$out/bench.txt"
build=${DPO_CHECK_BUILD:-$src/build-gpu}
work=$(mktemp -d "${TMPDIR:-/tmp}/dpo_gpu_check.XXXXXX")
t_start=$SECONDS
nfail=0 npass=0 nnot=0

log() { echo "check[$((SECONDS - t_start))s]: $*"; }
verdict() { # verdict ITEM PASS|FAIL|"NOT RUN" DETAILS
  local line
  line=$(printf '%-16s %-7s %s' "$1" "$2" "$3")
  echo "VERDICT $line"
  echo "$line" >>"$out/verdicts.txt"
  case "$2" in PASS) npass=$((npass + 1)) ;; FAIL) nfail=$((nfail + 1)) ;; *) nnot=$((nnot + 1)) ;; esac
}
# skip_if_late ITEM...: true (and those items NOT RUN) once the time budget is spent, so that
# the verdicts so far come back before a 10-minute limit (DPO_CHECK_BUDGET_S, default 550).
skip_if_late() {
  [ $((SECONDS - t_start)) -ge "${DPO_CHECK_BUDGET_S:-550}" ] || return 1
  local i
  for i in "$@"; do verdict "$i" "NOT RUN" "time budget of ${DPO_CHECK_BUDGET_S:-550} s used up"; done
  return 0
}
# last_line FILE PATTERN: the last line of FILE matching PATTERN (for the numbers).
last_line() { grep -E "$2" "$1" 2>/dev/null | tail -n 1; }

[ "${DPO_CHECK_DRY_RUN:-0}" != 1 ] || log "DRY RUN: --device cuda runs on the CPU, --backend nccl is mpi: a test of this script, not GPU results"
log "machine: $(nproc) cores, $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"), $(uname -m)"
nvidia-smi -L 2>&1 | sed 's/^/check: /'
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
python3 -c 'import torch; print("check: torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())' 2>&1
export CUBLAS_WORKSPACE_CONFIG=:4096:8 OMP_NUM_THREADS=4
export PYTHONUNBUFFERED=1

# ---- build ---------------------------------------------------------------------------------
targets=(dpo_dist dpo_init_model dpo_make_demo_data dpo_preprocess dpo_score test_cuda test_launch bench_cuda_step)
t=$SECONDS
if [ "${DPO_CHECK_SKIP_BUILD:-0}" = 1 ] && [ -x "$build/bin/dpo_dist" ]; then
  # shellcheck source=scripts/gpu/env.sh
  source "$src/scripts/gpu/env.sh" >/dev/null
  verdict build "PASS" "reused $build"
elif timeout 330 bash "$src/scripts/gpu/build.sh" "$build" "${targets[@]}" >"$work/build.log" 2>&1; then
  source "$src/scripts/gpu/env.sh" >/dev/null
  if ninja -C "$build" -t query dist_nccl_test >/dev/null 2>&1; then
    timeout 120 ninja -C "$build" -j "$(nproc)" dist_nccl_test >>"$work/build.log" 2>&1 || true
  fi
  verdict build "PASS" "$(($SECONDS - t)) s: $(grep -m1 'dpo_dist: CUDA kernels' "$work/build.log" | sed 's/^-- //')"
else
  tail -n 40 "$work/build.log"
  verdict build "FAIL" "$(($SECONDS - t)) s; see check.log (last 40 lines of the build above)"
  cat "$out/verdicts.txt"
  exit 1
fi
grep -E 'dpo_dist: |gpu/build: ' "$work/build.log" | sed 's/^/check: /'
B=$build/bin
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x OMP_NUM_THREADS -x CUBLAS_WORKSPACE_CONFIG -x LD_LIBRARY_PATH)

# ---- gtest items ---------------------------------------------------------------------------
gtest_item() { # gtest_item NAME FILTER NUMBERS_PATTERN
  local rc=0
  timeout 240 "$build/tests/test_cuda" --gtest_filter="$2" >"$work/$1.log" 2>&1 || rc=$?
  cat "$work/$1.log"
  local nums
  nums=$(last_line "$work/$1.log" "$3")
  if [ $rc = 77 ]; then verdict "$1" "NOT RUN" "$(head -n 1 "$work/$1.log")"
  elif [ $rc = 0 ] && grep -q '^\[  PASSED  \]' "$work/$1.log"; then verdict "$1" PASS "$nums"
  else verdict "$1" FAIL "exit $rc; $nums $(grep -m1 -E 'Failure|error' "$work/$1.log")"; fi
}
gtest_item nf4_cuda 'Nf4Cuda.*' '^Nf4Cuda:'
gtest_item cuda_rng 'CudaRng.*' 'PASSED|FAILED'
gtest_item tiny_model_cuda 'CudaModel.Tiny*' '^CudaModel fp32:'
gtest_item grad_ckpt_grads 'CudaModel.Gradient*' '^CudaModel checkpointing:'
rc=0
timeout 120 "$build/tests/test_launch" --gtest_filter='RngState.*' >"$work/rng_unit.log" 2>&1 || rc=$?
[ $rc = 0 ] || { cat "$work/rng_unit.log"; verdict rng_state_unit FAIL "test_launch RngState.* exit $rc"; }

# ---- tiny model, tokenizer, data (as tests/e2e/common.sh) ----------------------------------
t=$SECONDS
setup_ok=1
{
  "$B/dpo_make_demo_data" --output_dir "$work/data" --num_train 200 --num_eval 40 --seed 1 &&
    spm_train --input="$work/data/corpus.txt" --model_prefix="$work/spm" --model_type=bpe --vocab_size=256 \
      --hard_vocab_limit=false --character_coverage=1.0 --bos_id=1 --eos_id=2 --unk_id=0 --pad_id=-1 --minloglevel=2 &&
    vocab=$(spm_export_vocab --model="$work/spm.model" | wc -l) &&
    "$B/dpo_init_model" --output_dir "$work/model" --num_hidden_layers 2 --hidden_size 64 --num_attention_heads 4 \
      --num_key_value_heads 2 --intermediate_size 128 --vocab_size "$vocab" --seed 1 --tokenizer "$work/spm.model" &&
    for split in train eval; do
      "$B/dpo_preprocess" --input "$work/data/$split.jsonl" --output "$work/$split.h5" \
        --tokenizer "$work/model/tokenizer.model" --format trl --max_length 48 --max_prompt_length 40 --progress off || exit 1
    done
} >"$work/setup.log" 2>&1 || setup_ok=0
if [ $setup_ok = 0 ]; then
  tail -n 20 "$work/setup.log"
  verdict setup FAIL "tiny model / data setup failed (see check.log)"
fi
log "setup: tiny model and data in $((SECONDS - t)) s"
common=(--model_name_or_path "$work/model" --train_file "$work/train.h5" --stage dpo --beta 1.0
  --learning_rate 3e-3 --lr_scheduler_type cosine --warmup_steps 2 --gradient_accumulation_steps 1
  --lora_r 4 --lora_alpha 8 --lora_target_modules q_proj,v_proj --seed 7 --logging_steps 1
  --threads 4 --progress off --collective_timeout 120 --report_to jsonl --per_device_train_batch_size 4)
# DPO_CHECK_DRY_RUN=1 (a test of this script on a machine without a GPU, not a check):
# --device cuda becomes cpu and --backend nccl becomes mpi. run_dpo NP ARGS...: mpirun dpo_dist.
run_dpo() {
  local np=$1 a=() x
  shift
  for x in "$@"; do
    if [ "${DPO_CHECK_DRY_RUN:-0}" = 1 ]; then
      [ "$x" = cuda ] && x=cpu
      [ "$x" = nccl ] && x=mpi
    fi
    a+=("$x")
  done
  timeout 180 "${mpi[@]}" -np "$np" "$B/dpo_dist" "${a[@]}"
}
# train NAME NP ARGS...: one dpo_dist run into $work/NAME (log $work/NAME.log); returns its exit code.
train() {
  local name=$1 np=$2
  shift 2
  rm -rf "${work:?}/$name"
  run_dpo "$np" "${common[@]}" --output_dir "$work/$name" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  [ $rc = 0 ] || { echo "--- $name exited $rc:"; tail -n 15 "$work/$name.log"; }
  return $rc
}
cmp_item() { # cmp_item ITEM A B ARGS... (compare_runs.py)
  local item=$1 a=$2 b=$3 res
  shift 3
  res=$(python3 "$src/scripts/gpu/compare_runs.py" "$work/$a" "$work/$b" "$@" 2>&1)
  local rc=$?
  echo "$item: $res"
  return $rc
}

if [ $setup_ok = 1 ]; then
  # ---- CUDA vs CPU -----------------------------------------------------------------------
  if ! skip_if_late train_fp32 train_bf16 grad_ckpt; then
    t=$SECONDS
    if train cpu32 1 --device cpu --bnb_4bit_compute_dtype float32 --lora_dropout 0 --max_steps 5 &&
      train cuda32 1 --device cuda --bnb_4bit_compute_dtype float32 --lora_dropout 0 --max_steps 5; then
      res=$(cmp_item train_fp32 cuda32 cpu32 --tol 1e-5)
      [ $? = 0 ] && verdict train_fp32 PASS "${res#*PASS: }" || verdict train_fp32 FAIL "${res#*: }"
    else
      verdict train_fp32 FAIL "a run failed (see check.log)"
    fi
    if train cuda16 1 --device cuda --bnb_4bit_compute_dtype bfloat16 --lora_dropout 0 --max_steps 5; then
      res=$(cmp_item train_bf16 cuda16 cpu32 --tol 2e-2)
      [ $? = 0 ] && verdict train_bf16 PASS "${res#*PASS: }" || verdict train_bf16 FAIL "${res#*: }"
    else
      verdict train_bf16 FAIL "the bf16 CUDA run failed (see check.log)"
    fi
    if train cuda32ck 1 --device cuda --bnb_4bit_compute_dtype float32 --lora_dropout 0 --max_steps 5 --gradient_checkpointing true; then
      res=$(cmp_item grad_ckpt cuda32ck cuda32 --tol 1e-6)
      [ $? = 0 ] && verdict grad_ckpt PASS "5 steps with vs without: ${res#*PASS: }" || verdict grad_ckpt FAIL "${res#*: }"
    else
      verdict grad_ckpt FAIL "the checkpointing run failed"
    fi
    log "cuda vs cpu: $((SECONDS - t)) s"
  fi

  # ---- exact resume on CUDA with dropout -------------------------------------------------
  if ! skip_if_late resume_cuda; then
    t=$SECONDS
    rargs=(--device cuda --lora_dropout 0.1 --max_steps 6 --save_steps 3 --gradient_checkpointing true)
    if train resA 1 "${rargs[@]}" && train resA2 1 "${rargs[@]}"; then
      det=$(cmp_item determinism resA2 resA --bitwise)
      mkdir -p "$work/resB" "$work/resC"
      cp -r "$work/resA/checkpoint-3" "$work/resB/"
      cp -r "$work/resA/checkpoint-3" "$work/resC/"
      rm -f "$work/resC/checkpoint-3/rng_state.safetensors"
      # The checkpoint's rng_state.safetensors holds rank 0's CUDA generator (launch/rng_state.h).
      has_cuda_rng=$(python3 -c 'import json, struct, sys; raw = open(sys.argv[1], "rb").read(); n = struct.unpack("<Q", raw[:8])[0]; h = json.loads(raw[8:8 + n]); print("yes" if "rank_0.cuda" in h and h.get("__metadata__", {}).get("device_type") == "cuda" else "no")' \
        "$work/resA/checkpoint-3/rng_state.safetensors" 2>&1)
      rc_b=0 rc_c=0 rc_d=0
      run_dpo 1 "${common[@]}" "${rargs[@]}" --output_dir "$work/resB" \
        --resume_from_checkpoint auto >"$work/resB.log" 2>&1 || rc_b=$?
      run_dpo 1 "${common[@]}" "${rargs[@]}" --output_dir "$work/resC" \
        --resume_from_checkpoint auto >"$work/resC.log" 2>&1 || rc_c=$?
      mkdir -p "$work/resD"
      cp -r "$work/resA/checkpoint-3" "$work/resD/"
      timeout 180 "${mpi[@]}" -np 1 "$B/dpo_dist" "${common[@]}" --device cpu --lora_dropout 0.1 --max_steps 6 --save_steps 3 \
        --output_dir "$work/resD" --resume_from_checkpoint auto >"$work/resD.log" 2>&1 || rc_d=$?
      refusal=$(grep -m1 "cannot continue on --device cpu" "$work/resD.log")
      res=$(cmp_item resume resB resA --bitwise --steps 4-6)
      rc_res=$?
      ctl=$(cmp_item resume_ctl resC resA --bitwise)
      rc_ctl=$?
      echo "determinism: $det"
      echo "refusal (exit $rc_d): $refusal"
      if [ $rc_b = 0 ] && [ $rc_res = 0 ] && [ "$has_cuda_rng" = yes ] && [ $rc_c = 0 ] && [ $rc_ctl != 0 ] && [ $rc_d != 0 ] && [ -n "$refusal" ]; then
        verdict resume_cuda PASS "3+3 == 6 steps: ${res#*PASS: }; without rng_state: differs (control); --device cpu refused"
      else
        verdict resume_cuda FAIL "resume exit $rc_b, cmp: ${res#*: }; cuda rng in checkpoint: $has_cuda_rng; control (no rng_state, exit $rc_c) must differ: $(cut -d' ' -f2 <<<"$ctl"); cpu refusal exit $rc_d '${refusal}'; two uninterrupted runs identical: $(cut -d' ' -f2 <<<"$det")"
      fi
    else
      verdict resume_cuda FAIL "the uninterrupted CUDA run failed"
    fi
    log "resume: $((SECONDS - t)) s"
  fi

  # ---- NCCL vs MPI backend ---------------------------------------------------------------
  if ! skip_if_late nccl_vs_mpi; then
    t=$SECONDS
    nargs=(--device cuda --lora_dropout 0.1 --max_steps 5)
    nums=""
    ok=1
    nps=(1)
    [ "${ngpu:-0}" -ge 2 ] && nps=(1 2)
    for np in "${nps[@]}"; do
      if train "nccl$np" "$np" "${nargs[@]}" --backend nccl && train "mpi$np" "$np" "${nargs[@]}" --backend mpi; then
        res=$(cmp_item "nccl_vs_mpi np=$np" "nccl$np" "mpi$np" --bitwise)
        [ $? = 0 ] || ok=0
        nums="$nums np=$np: ${res#*: };"
      else
        ok=0
        nums="$nums np=$np: a run failed;"
      fi
    done
    if [ -x "$build/tests/dist_nccl_test" ]; then
      rc=0
      timeout 120 "${mpi[@]}" -np 1 "$build/tests/dist_nccl_test" >"$work/nccl_test.log" 2>&1 || rc=$?
      cat "$work/nccl_test.log"
      [ $rc = 0 ] || ok=0
      nums="$nums dist_nccl_test np=1 exit $rc"
    else
      ok=0
      nums="$nums dist_nccl_test not built (no NCCL found at configure)"
    fi
    [ "${ngpu:-0}" -ge 2 ] || nums="$nums (np=2 NOT RUN: $ngpu GPU)"
    [ $ok = 1 ] && verdict nccl_vs_mpi PASS "$nums" || verdict nccl_vs_mpi FAIL "$nums"
    log "nccl: $((SECONDS - t)) s"
  fi

  # ---- transformers + PEFT ---------------------------------------------------------------
  if skip_if_late hf_logps peft_rewards; then
    :
  elif python3 -c 'import transformers, peft, h5py' >/dev/null 2>&1; then
    t=$SECONDS
    rc=0
    timeout 120 "$B/dpo_score" --model_name_or_path "$work/model" --load_in_4bit false --bnb_4bit_compute_dtype float32 \
      --device cuda --data "$work/eval.h5" --output "$work/scores.jsonl" >"$work/score.log" 2>&1 || rc=$?
    if [ $rc = 0 ]; then
      res=$(timeout 180 python3 "$src/scripts/gpu/hf_compare.py" logps --model "$work/model" --data "$work/eval.h5" \
        --scores "$work/scores.jsonl" --tol 1e-4 2>&1)
      rc=$?
      echo "hf_logps: $res"
      [ $rc = 0 ] && verdict hf_logps PASS "${res#PASS: }" || verdict hf_logps FAIL "$(tail -n 1 <<<"$res")"
    else
      tail -n 10 "$work/score.log"
      verdict hf_logps FAIL "dpo_score --device cuda exited $rc"
    fi
    if train peft 1 --device cuda --load_in_4bit false --bnb_4bit_compute_dtype float32 --lora_dropout 0 --max_steps 20 \
      --eval_file "$work/eval.h5" --per_device_eval_batch_size 8; then
      res=$(timeout 180 python3 "$src/scripts/gpu/hf_compare.py" rewards --model "$work/model" --data "$work/eval.h5" \
        --adapter "$work/peft" --metrics "$work/peft/metrics.jsonl" --beta 1.0 --tol 1e-4 2>&1)
      rc=$?
      echo "peft_rewards: $res"
      [ $rc = 0 ] && verdict peft_rewards PASS "${res#PASS: }" || verdict peft_rewards FAIL "$(tail -n 1 <<<"$res")"
    else
      verdict peft_rewards FAIL "the dense-base CUDA training run failed"
    fi
    log "hf: $((SECONDS - t)) s"
  else
    verdict hf_logps "NOT RUN" "python3 lacks transformers/peft/h5py"
    verdict peft_rewards "NOT RUN" "python3 lacks transformers/peft/h5py"
  fi
fi

# ---- 7B / 8B benchmarks (last: the longest) ------------------------------------------------
for shape in llama2-7b llama3-8b; do
  item=bench_${shape/-/_}
  skip_if_late "$item" && continue
  rc=0
  timeout 150 "$B/bench_cuda_step" --shape "$shape" --pairs 4 --seq 1024 --answer 512 --steps 3 >"$work/$item.log" 2>&1 || rc=$?
  cat "$work/$item.log" | tee -a "$out/bench.txt"
  res=$(last_line "$work/$item.log" '^RESULT')
  if [ $rc = 0 ] && [ -n "$res" ]; then verdict "$item" PASS "${res#RESULT }"
  elif [ $rc = 77 ]; then verdict "$item" "NOT RUN" "$(head -n 1 "$work/$item.log")"
  else
    tail -n 10 "$work/$item.log"
    verdict "$item" FAIL "exit $rc: $(tail -n 1 "$work/$item.log")"
  fi
done

log "done in $((SECONDS - t_start)) s: $npass PASS, $nfail FAIL, $nnot NOT RUN"
echo "==== verdicts ($(date -u +%Y-%m-%dT%H:%MZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1))"
cat "$out/verdicts.txt"
[ "${DPO_CHECK_KEEP:-0}" = 1 ] && echo "work dir kept: $work" || rm -rf "$work"
[ $nfail = 0 ]
