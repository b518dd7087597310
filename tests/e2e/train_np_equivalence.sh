#!/usr/bin/env bash
# End-to-end: the number of ranks does not change the training result.
#  1. np=1 x batch 2 and np=2 x batch 1 (global batch 2, dropout 0, same seed, 10 DPO steps):
#     the final adapter_model.safetensors agree within the adapter tolerance, and the logged
#     losses within the runs' tolerance at each step. The ranks change only the order of the
#     sums (batch shapes, the allreduce), so both tolerances are derived from the model's
#     shape, the steps and the learning rate (tests/e2e/fp_bounds.py; tests/fp_bounds.h).
#  1b. the same for --loss_type bco_pair (its running reward mean is reduced over all ranks),
#     with WPO and LD-DPO on (--use_weighting, --ld_alpha 0.5): adapters agree as in 1.
#  1c. the same for the reference-free --stage cpo (simpo and sigmoid, cpo_alpha 0; 6 steps):
#     adapters agree as in 1.
#  2. np=3 x batch 1 on 200 pairs (200 % 3 != 0) for 70 steps, across the epoch boundary
#     (66 or 67 steps/epoch), with an eval file of 40 pairs (uneven eval shards): completes,
#     logs every step 1..70 exactly once, reaches epoch > 1, and its adapter equals that of
#     np=1 x batch 3 within the adapter tolerance of 70 steps.
#   tests/e2e/train_np_equivalence.sh [BIN_DIR]     (or DPO_BIN=BIN_DIR)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Tolerances of two runs that differ only in the order of their sums: rows of <= 48 tokens
# (--max_length), learning rate <= 3e-3 (train_args).
adapter_tol() { python3 "$src/tests/e2e/fp_bounds.py" adapter_tolerance "$work/model/config.json" 48 "$1" 3e-3; }

run() {  # log_name np args...: one training run, bounded to 120 s
  local name=$1 np=$2 rc=0
  shift 2
  if [ "$np" = 1 ]; then
    run_bounded 120 "$work/$name.log" "$DPO_BIN/dpo_dist" "$@" || rc=$?
  else
    run_bounded 120 "$work/$name.log" "${mpi[@]}" -np "$np" "$DPO_BIN/dpo_dist" "$@" || rc=$?
  fi
  [ $rc = 0 ] || { tail -n 20 "$work/$name.log"; fail "$name (np=$np) exited $rc"; }
}

# ---- 1. np=1 x 2 == np=2 x 1 ---------------------------------------------------------------
t=$SECONDS
common=("${train_args[@]}" --lora_dropout 0 --max_steps 10 --save_steps 0)
run np1 1 "${common[@]}" --per_device_train_batch_size 2 --output_dir "$work/np1"
run np2 2 "${common[@]}" --per_device_train_batch_size 1 --output_dir "$work/np2"
grep -q "2 rank(s)" "$work/np2.log" || fail "the np=2 run did not report 2 ranks: $(head -n 3 "$work/np2.log")"
grep -q "global batch 2" "$work/np2.log" || fail "np=2 x 1 did not report global batch 2"
cmp_adapters "$work/np1/adapter_model.safetensors" "$work/np2/adapter_model.safetensors" "$(adapter_tol 10)"
python3 - "$work/np1/metrics.jsonl" "$work/np2/metrics.jsonl" "$src/tests/e2e" "$work/model/config.json" <<'PY' ||
import json, sys
sys.path.insert(0, sys.argv[3])
import fp_bounds
a, b = ([json.loads(l) for l in open(p) if l.strip()] for p in sys.argv[1:3])
ta, tb = ([(r["step"], r["loss"]) for r in x if "loss" in r] for x in (a, b))
assert [s for s, _ in ta] == list(range(1, 11)), "np=1 steps %s" % [s for s, _ in ta]
assert [s for s, _ in tb] == list(range(1, 11)), "np=2 steps %s" % [s for s, _ in tb]
tau = fp_bounds.llama_rel_tolerance(json.load(open(sys.argv[4])), 48, grads=True)
worst = max(abs(x[1] - y[1]) / (fp_bounds.run_rel_tolerance(tau, x[0]) * max(1.0, abs(x[1]))) for x, y in zip(ta, tb))
print("losses: max abs diff %.3g over 10 steps, %.3g of the tolerance" % (max(abs(x[1] - y[1]) for x, y in zip(ta, tb)), worst))
assert worst <= 1, "losses differ beyond the runs' tolerance"
PY
  fail "np=1 and np=2 logged different losses"
log "np=1 x 2 == np=2 x 1 ($((SECONDS - t)) s)"

# ---- 1b. bco_pair's running mean over ranks; WPO and LD-DPO -----------------------------------
t=$SECONDS
common=("${train_args[@]}" --lora_dropout 0 --max_steps 6 --save_steps 0 --loss_type bco_pair
  --use_weighting --ld_alpha 0.5)
run bco1 1 "${common[@]}" --per_device_train_batch_size 2 --output_dir "$work/bco1"
run bco2 2 "${common[@]}" --per_device_train_batch_size 1 --output_dir "$work/bco2"
cmp_adapters "$work/bco1/adapter_model.safetensors" "$work/bco2/adapter_model.safetensors" "$(adapter_tol 6)"
log "bco_pair + WPO + LD-DPO: np=1 x 2 == np=2 x 1 ($((SECONDS - t)) s)"

# ---- 1c. the reference-free stages (ORPO, CPO/SimPO): np=1 x 2 == np=2 x 1 -------------------
t=$SECONDS
# (With an NLL term, ORPO and CPO's cpo_alpha > 0, the NLL is a token mean per micro-batch,
# as in TRL: rows of other lengths on other ranks then weigh differently, so those are not
# rank-count invariant yet; see docs/objective.md.)
for stage in "cpo --loss_type simpo --cpo_alpha 0" "cpo --loss_type sigmoid --cpo_alpha 0"; do
  args=()
  for ((i = 0; i < ${#train_args[@]}; i++)); do  # train_args with its --stage and --beta replaced
    case ${train_args[$i]} in --stage | --beta) i=$((i + 1)); continue ;; esac
    args+=("${train_args[$i]}")
  done
  # shellcheck disable=SC2206  # "cpo --loss_type simpo" splits into its options on purpose
  args+=(--stage $stage --beta 0.1 --lora_dropout 0 --max_steps 6 --save_steps 0)
  name=$(cut -d' ' -f3 <<<"$stage")
  run ${name}1 1 "${args[@]}" --per_device_train_batch_size 2 --output_dir "$work/${name}1"
  run ${name}2 2 "${args[@]}" --per_device_train_batch_size 1 --output_dir "$work/${name}2"
  cmp_adapters "$work/${name}1/adapter_model.safetensors" "$work/${name}2/adapter_model.safetensors" "$(adapter_tol 6)"
done
log "cpo simpo, cpo sigmoid (cpo_alpha 0): np=1 x 2 == np=2 x 1 ($((SECONDS - t)) s)"

# ---- 2. np=3, uneven data, across the epoch boundary -----------------------------------------
t=$SECONDS
common=("${train_args[@]}" --lora_dropout 0 --max_steps 70 --save_steps 0 --eval_file "$work/eval.h5"
  --per_device_eval_batch_size 4 --eval_steps 35)
run np3 3 "${common[@]}" --per_device_train_batch_size 1 --output_dir "$work/np3"
grep -q "3 rank(s)" "$work/np3.log" || fail "the np=3 run did not report 3 ranks"
spe=$(sed -n 's/.*global batch 3; \([0-9]*\) steps\/epoch.*/\1/p' "$work/np3.log")
[ -n "$spe" ] || fail "np=3 log has no 'global batch 3; N steps/epoch' line: $(grep -m1 'global batch' "$work/np3.log")"
[ "$spe" -lt 70 ] || fail "70 steps do not cross the epoch boundary ($spe steps/epoch)"
python3 - "$work/np3/metrics.jsonl" <<'PY' || fail "np=3 metrics wrong"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r for r in rows if "loss" in r]
assert [r["step"] for r in train] == list(range(1, 71)), "steps logged: %s" % [r["step"] for r in train]
assert train[-1]["epoch"] > 1.0, "final epoch %s not past 1" % train[-1]["epoch"]
evals = [r["step"] for r in rows if "eval_loss" in r]
assert 35 in evals and 70 in evals, "eval events at %s, expected 35 and 70" % evals
for r in rows:
    for k, v in r.items():
        assert not (isinstance(v, float) and v != v), "NaN %s at step %s" % (k, r["step"])
print("np=3: steps 1..70 once, final epoch %.3f, eval at %s" % (train[-1]["epoch"], evals))
PY
run np1b3 1 "${common[@]}" --per_device_train_batch_size 3 --output_dir "$work/np1b3"
cmp_adapters "$work/np1b3/adapter_model.safetensors" "$work/np3/adapter_model.safetensors" "$(adapter_tol 70)"
log "np=3 x 1 ($spe steps/epoch, 70 steps) == np=1 x 3 ($((SECONDS - t)) s)"
log "PASS"
