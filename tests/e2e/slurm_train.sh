#!/usr/bin/env bash
# End-to-end test of the Slurm scripts on a local one-node Slurm (scripts/slurm_local.sh):
#  1. builds a tiny demo setup (dpo_make_demo_data, spm_train, dpo_init_model) and
#     tokenizes it with slurm/preprocess.sbatch;
#  2. trains with slurm/train.sbatch on 2 ranks (srun --mpi=pmix): COMPLETED + outputs;
#  3. preemption: once the first checkpoint exists, `scancel --signal=USR1 --batch` (what
#     `#SBATCH --signal=B:USR1@120` does before the time limit); the batch script's trap
#     forwards it, the trainer checkpoints and exits 75, the script requeues the job, the
#     job resumes from the checkpoint and finishes COMPLETED at the final step, with every
#     step logged exactly once (no restart from step 0, no step lost).
# Fails (never skips) when Slurm cannot be started: CI installs it. Needs root.
#
#   tests/e2e/slurm_train.sh            (ctest -L slurm runs it with DPO_BIN=<build>/bin)
# Environment: DPO_BIN (dir of the dpo_* binaries, default build/bin), DPO_SLURM_KEEP=1
# (keep the work dir and the Slurm daemons), DPO_SLURM_TEST_TIMEOUT (s per job, 600),
# DPO_SLURM_TEST_PREEMPT_STEPS (steps of the preempted run, 400).
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DPO_BIN=${DPO_BIN:-$src/build/bin}
DPO_BIN=$(cd "$DPO_BIN" 2>/dev/null && pwd || echo "$DPO_BIN")
job_timeout=${DPO_SLURM_TEST_TIMEOUT:-600}
preempt_steps=${DPO_SLURM_TEST_PREEMPT_STEPS:-400}
export PATH=$PATH:/usr/sbin

log() { echo "slurm_train[$(date +%H:%M:%S)]: $*"; }
fail() {
  echo "slurm_train: FAIL: $*" >&2
  exit 1
}

# ---- 0. prerequisites and local Slurm ------------------------------------------------
for t in dpo_dist dpo_init_model dpo_make_demo_data dpo_preprocess; do
  [ -x "$DPO_BIN/$t" ] || fail "$DPO_BIN/$t not found: build it (ninja -C <build> $t) or set DPO_BIN"
done
command -v spm_train >/dev/null || fail "spm_train not found (Debian package sentencepiece: scripts/setup.sh)"
command -v python3 >/dev/null || fail "python3 not found (scripts/setup.sh)"
command -v sbatch >/dev/null || fail "sbatch not found: install Slurm with DPO_WITH_SLURM=1 scripts/setup.sh"

slurm_was_up=0
if scontrol ping 2>/dev/null | grep -q UP; then slurm_was_up=1; fi
"$src/scripts/slurm_local.sh" || fail "scripts/slurm_local.sh could not start a local Slurm (see above)"

work=$(mktemp -d /tmp/dpo_slurm_e2e.XXXXXX)
jobs_submitted=()
cleanup() {
  local rc=$?
  for j in "${jobs_submitted[@]}"; do scancel "$j" 2>/dev/null || true; done
  if [ "$rc" != 0 ]; then
    for f in "$work"/*.out; do
      [ -f "$f" ] && { echo "---- $f ----"; tail -n 40 "$f"; }
    done
    echo "slurm_train: work dir kept: $work"
  elif [ "${DPO_SLURM_KEEP:-0}" = 1 ]; then
    echo "slurm_train: work dir kept: $work"
  else
    rm -rf "$work"
  fi
  # Leave the machine as we found it: stop Slurm if this test started it.
  if [ "$slurm_was_up" = 0 ] && [ "${DPO_SLURM_KEEP:-0}" != 1 ]; then
    "$src/scripts/slurm_stop.sh" --keep-munge >/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT

# A field of `scontrol show job -o` (empty when the job is gone).
job_field() {  # jobid field
  { scontrol show job -o "$1" 2>/dev/null || true; } | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1
}

# Waits until the job is finished for good (not pending after a requeue); prints its state.
wait_job() {  # jobid timeout_s
  local j=$1 deadline=$((SECONDS + $2)) state
  while [ $SECONDS -lt $deadline ]; do
    state=$(job_field "$j" JobState)
    if [ -z "$state" ]; then
      # Purged from slurmctld (MinJobAge): the job completion log has the final state.
      state=$({ grep "^JobId=$j " /var/log/slurm/jobcomp.log 2>/dev/null || true; } | tail -n 1 | tr ' ' '\n' | sed -n 's/^JobState=//p')
      [ -n "$state" ] || fail "job $j vanished without a final state"
    fi
    case "$state" in
      COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
        echo "$state"
        return 0 ;;
    esac
    sleep 1
  done
  fail "job $j still $(job_field "$j" JobState) after $2 s"
}

# Submits and sets the variable named $1 to the job id (not in a subshell: the id must
# reach jobs_submitted so that cleanup can cancel it).
submit() {  # var sbatch-args...
  local _var=$1 _id
  shift
  _id=$(sbatch --parsable "$@") || fail "sbatch $* failed"
  _id=${_id%%;*}
  jobs_submitted+=("$_id")
  printf -v "$_var" '%s' "$_id"
}

# ---- 1. demo data, tokenizer, model, HDF5 --------------------------------------------
log "work dir $work, binaries $DPO_BIN"
"$DPO_BIN/dpo_make_demo_data" --output_dir "$work/data" --num_train 400 --num_eval 40 --seed 1
spm_train --input="$work/data/corpus.txt" --model_prefix="$work/spm" --model_type=bpe --vocab_size=256 \
  --hard_vocab_limit=false --character_coverage=1.0 --minloglevel=2 >"$work/spm_train.log" 2>&1 ||
  fail "spm_train failed: $(tail -n 5 "$work/spm_train.log")"
vocab=$(spm_export_vocab --model="$work/spm.model" | wc -l)
log "tokenizer: $vocab pieces"
"$DPO_BIN/dpo_init_model" --output_dir "$work/model" --num_hidden_layers 2 --hidden_size 64 \
  --num_attention_heads 4 --num_key_value_heads 2 --intermediate_size 128 --vocab_size "$vocab" --seed 1 \
  --torch_dtype float32 --tokenizer "$work/spm.model"
[ -f "$work/model/tokenizer.model" ] || cp "$work/spm.model" "$work/model/tokenizer.model"

cd "$work"
j_train="" j_eval=""
pp_args=(--ntasks=1 --output="$work/%x-%j.out")
DPO_BIN=$DPO_BIN INPUT="$work/data/train.jsonl" OUTPUT="$work/train.h5" TOKENIZER="$work/model/tokenizer.model" \
  FORMAT=trl submit j_train "${pp_args[@]}" "$src/slurm/preprocess.sbatch" --max_length 48 --max_prompt_length 40
DPO_BIN=$DPO_BIN INPUT="$work/data/eval.jsonl" OUTPUT="$work/eval.h5" TOKENIZER="$work/model/tokenizer.model" \
  FORMAT=trl submit j_eval "${pp_args[@]}" "$src/slurm/preprocess.sbatch" --max_length 48 --max_prompt_length 40
for j in "$j_train" "$j_eval"; do
  s=$(wait_job "$j" "$job_timeout")
  [ "$s" = COMPLETED ] || fail "preprocess job $j ended $s"
done
if [ ! -s "$work/train.h5" ] || [ ! -s "$work/eval.h5" ]; then fail "preprocess.sbatch did not write train.h5/eval.h5"; fi
log "preprocess.sbatch: jobs $j_train $j_eval COMPLETED"

# Options shared by both training runs (the demo config supplies the rest; paths here).
common=(--model_name_or_path "$work/model" --train_file "$work/train.h5" --eval_file "$work/eval.h5"
  --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --per_device_eval_batch_size 8
  --logging_steps 1 --threads 1 --collective_timeout 120 --progress off)

# Checks a finished run: outputs exist, every step logged once, last step = max_steps.
check_run() {  # output_dir max_steps
  local out=$1 steps=$2
  for f in adapter_model.safetensors adapter_config.json metrics.jsonl; do
    [ -s "$out/$f" ] || fail "$out/$f missing"
  done
  python3 - "$out" "$steps" <<'EOF' || fail "metrics/checkpoint check failed for $1"
import json, os, re, sys
out, steps = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
train = [r["step"] for r in rows if "loss" in r]
assert train, "no training rows (with 'loss') in metrics.jsonl"
assert train == list(range(1, steps + 1)), "training steps logged are not exactly 1..%d once each: %s" % (steps, train)
cks = sorted(int(m.group(1)) for d in os.listdir(out) for m in [re.fullmatch(r"checkpoint-(\d+)", d)] if m)
assert cks, "no checkpoint-N directories"
for n in cks:
    st = json.load(open(os.path.join(out, "checkpoint-%d" % n, "trainer_state.json")))
    assert st["global_step"] == n, "checkpoint-%d has global_step %s" % (n, st["global_step"])
assert cks[-1] == steps, "last checkpoint is %d, not %d" % (cks[-1], steps)
print("metrics: %d training rows, steps 1..%d; checkpoints %s" % (len(train), steps, cks if len(cks) <= 6 else cks[:3] + ["..."] + cks[-3:]))
EOF
}

# ---- 2. a plain training job on 2 ranks ---------------------------------------------
steps_a=20
CONFIG="$src/configs/demo-dpo.ini" OUTPUT_DIR="$work/run_a" DPO_BIN=$DPO_BIN \
  submit j -n 2 --output="$work/%x-%j.out" "$src/slurm/train.sbatch" "${common[@]}" --max_steps $steps_a --save_steps 10 --eval_steps 10
log "train.sbatch job $j submitted (2 ranks, $steps_a steps)"
s=$(wait_job "$j" "$job_timeout")
[ "$s" = COMPLETED ] || fail "training job $j ended $s (log: $work/dpo_dist-$j.out)"
[ "$(job_field "$j" ExitCode)" = "0:0" ] || [ -z "$(job_field "$j" ExitCode)" ] || fail "job $j exit code $(job_field "$j" ExitCode)"
check_run "$work/run_a" $steps_a
grep -q "2 rank" "$work/dpo_dist-$j.out" || fail "the trainer did not report 2 ranks (log: $work/dpo_dist-$j.out)"
log "plain run: job $j COMPLETED"

# ---- 3. preemption: USR1 to the batch shell -> checkpoint, exit 75, requeue, resume ---
out_b=$work/run_b
CONFIG="$src/configs/demo-dpo.ini" OUTPUT_DIR="$out_b" DPO_BIN=$DPO_BIN \
  submit j -n 2 --output="$work/%x-%j.out" "$src/slurm/train.sbatch" "${common[@]}" --max_steps "$preempt_steps" --save_steps 5 --save_total_limit 3 --eval_steps 0
log "train.sbatch job $j submitted for preemption ($preempt_steps steps)"
deadline=$((SECONDS + job_timeout))
until [ -f "$out_b/checkpoint-5/trainer_state.json" ]; do
  [ $SECONDS -lt $deadline ] || fail "no first checkpoint after $job_timeout s"
  st=$(job_field "$j" JobState)
  case "$st" in PENDING | RUNNING | CONFIGURING) ;; *) fail "job $j is $st before its first checkpoint" ;; esac
  sleep 0.2
done
# --batch: only the batch shell gets it, as with `#SBATCH --signal=B:USR1@120`.
scancel --signal=USR1 --batch "$j" || fail "scancel --signal=USR1 --batch $j failed"
log "sent USR1 to the batch shell of job $j"
# The job must come back: Restarts=1, pending (held, see below) or running again.
deadline=$((SECONDS + job_timeout))
while [ "$(job_field "$j" Restarts)" != 1 ]; do
  st=$(job_field "$j" JobState)
  case "$st" in
    COMPLETED) fail "job $j completed before the signal took effect: raise DPO_SLURM_TEST_PREEMPT_STEPS ($preempt_steps)" ;;
    FAILED | CANCELLED | TIMEOUT | NODE_FAIL) fail "job $j ended $st instead of being requeued" ;;
  esac
  [ $SECONDS -lt $deadline ] || fail "job $j was not requeued within $job_timeout s"
  sleep 0.5
done
grep -q "requeueing job $j" "$work/dpo_dist-$j.out" || fail "train.sbatch did not requeue after exit 75"
ck_at_requeue=$(find "$out_b" -maxdepth 1 -name 'checkpoint-*' -printf '%f\n' | { grep -E '^checkpoint-[0-9]+$' || true; } | sed 's/^checkpoint-//' | sort -n | tail -n 1)
[ -n "$ck_at_requeue" ] || fail "job $j was requeued without any checkpoint in $out_b"
log "job $j requeued (newest checkpoint: $ck_at_requeue)"
[ "$ck_at_requeue" -lt "$preempt_steps" ] || fail "the preempted run already reached step $preempt_steps"
# Slurm holds a requeued job for cred_expire seconds (15 in slurm_local.sh's config, 120
# by default), then starts it again.
s=$(wait_job "$j" "$job_timeout")
[ "$s" = COMPLETED ] || fail "requeued job $j ended $s"
check_run "$out_b" "$preempt_steps"
grep -q "resum.*checkpoint-$ck_at_requeue" "$work/dpo_dist-$j.out" ||
  fail "the requeued run did not report resuming from checkpoint-$ck_at_requeue (log: $work/dpo_dist-$j.out)"
log "preemption: job $j checkpointed at step $ck_at_requeue, requeued, resumed, COMPLETED at step $preempt_steps"
log "PASS"
