#!/usr/bin/env bash
# End-to-end: faults while the tools write leave the last good file intact, and the tool
# says so in one line. A checker compares every surviving file with its last good
# version (md5 of the whole file, or of the HDF5 token datasets where /ref_logps may
# legitimately change).
#  1. disk full during dpo_preprocess (a 160 KiB tmpfs): an earlier good out.h5 on it
#     survives byte for byte; exit non-zero; one "dpo_preprocess: error:" line; no
#     temporary file left.
#  2. read-only output (the tmpfs remounted ro): dpo_preprocess, dpo_score
#     --write_ref_logps and dpo_dist each fail with one error line; every file unchanged.
#  3. SIGKILL during dpo_score --write_ref_logps: killed at spread-out moments until one
#     run completes; after every kill the file opens, its tokens are unchanged and
#     /ref_logps is either absent (old) or complete (dpo_score --beta reads it).
# (Disk full during a checkpoint save: tests/e2e/train_errors.sh.)
# Needs root for mount (cases 1-2 say SKIPPED otherwise; case 3 always runs).
#   tests/e2e/data_safety.sh [BIN_DIR]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
command -v h5dump >/dev/null || fail "h5dump not found (hdf5-tools, scripts/setup.sh)"

# one_error NAME TOOL LOG: the log's stderr holds exactly one non-empty line "TOOL: error: ..."
one_error() {
  local n line
  n=$(grep -c . "$3" || true)
  line=$(grep -m1 "$2: error:" "$3" || true)
  [ -n "$line" ] && [ "$n" = 1 ] || { cat "$3"; fail "$1: expected one '$2: error:' line on stderr, got $n lines"; }
  log "$1: ${line:0:200}"
}
# tokens_sum FILE: md5 of the token and offset datasets (what /ref_logps writes must never touch)
tokens_sum() {
  local g
  for g in prompt chosen rejected; do h5dump -d "/$g/tokens" -d "/$g/offsets" "$1" | grep -v '^HDF5 "'; done | md5sum | cut -d' ' -f1
}
pp=("$DPO_BIN/dpo_preprocess" --tokenizer "$work/model/tokenizer.model" --format trl --max_length 48
  --max_prompt_length 40 --progress off)

# ---- 1. disk full during dpo_preprocess -------------------------------------------------------
fs=$work/small
mkdir -p "$fs"
if mount -t tmpfs -o size=160k tmpfs "$fs" 2>"$work/mount.err"; then
  e2e_cleanup_hooks+=("umount -l '$fs'")
  head -n 20 "$work/data/train.jsonl" >"$work/small.jsonl"
  rc=0
  "${pp[@]}" --input "$work/small.jsonl" --output "$fs/out.h5" >"$work/pp_good.log" 2>&1 || rc=$?
  [ $rc = 0 ] || { cat "$work/pp_good.log"; fail "the small preprocess onto the tmpfs failed ($rc)"; }
  good=$(md5sum <"$fs/out.h5")
  # 20000 distinct rows: their HDF5 file is far larger than the 160 KiB tmpfs.
  "$DPO_BIN/dpo_make_demo_data" --output_dir "$work/bigdata" --num_train 20000 --num_eval 1 --seed 2 \
    >"$work/bigdata.log" 2>&1 || fail "dpo_make_demo_data (20000 rows) failed: $(tail -n 3 "$work/bigdata.log")"
  cp "$work/bigdata/train.jsonl" "$work/big.jsonl"
  rc=0
  "${pp[@]}" --input "$work/big.jsonl" --output "$fs/out.h5" >"$work/pp_full.out" 2>"$work/pp_full.err" || rc=$?
  [ $rc != 0 ] || fail "disk_full_preprocess: exit 0 on a full disk"
  one_error disk_full_preprocess dpo_preprocess "$work/pp_full.err"
  grep -qi "space\|full" "$work/pp_full.err" || fail "disk_full_preprocess: the error does not say the disk is full"
  [ "$(md5sum <"$fs/out.h5")" = "$good" ] || fail "disk_full_preprocess: the earlier out.h5 changed"
  left=$(find "$fs" -name '*.tmp*')
  [ -z "$left" ] || fail "disk_full_preprocess: temporary files left: $left"
  log "disk_full_preprocess: out.h5 unchanged, no temporary file left"

  # ---- 2. read-only output ----------------------------------------------------------------------
  cp "$work/train.h5" "$fs/train.h5"
  sum_train=$(md5sum <"$fs/train.h5")
  mount -o remount,ro "$fs" || fail "cannot remount the tmpfs read-only"
  rc=0
  "${pp[@]}" --input "$work/small.jsonl" --output "$fs/out.h5" >/dev/null 2>"$work/ro_pp.err" || rc=$?
  [ $rc != 0 ] || fail "readonly_preprocess: exit 0"
  one_error readonly_preprocess dpo_preprocess "$work/ro_pp.err"
  rc=0
  "$DPO_BIN/dpo_score" --threads 1 --model_name_or_path "$work/model" --data "$fs/train.h5" --write_ref_logps \
    >/dev/null 2>"$work/ro_score.err" || rc=$?
  [ $rc != 0 ] || fail "readonly_score: exit 0"
  one_error readonly_score dpo_score "$work/ro_score.err"
  rc=0
  timeout -k 5 60 "$DPO_BIN/dpo_dist" "${train_args[@]}" --output_dir "$fs/run" --max_steps 2 \
    >/dev/null 2>"$work/ro_train.err" || rc=$?
  [ $rc != 0 ] || fail "readonly_train: exit 0"
  one_error readonly_train dpo_dist "$work/ro_train.err"
  [ "$(md5sum <"$fs/out.h5")" = "$good" ] && [ "$(md5sum <"$fs/train.h5")" = "$sum_train" ] ||
    fail "readonly: a file on the read-only file system changed"
  log "readonly: three one-line errors, files unchanged"
else
  log "SKIPPED disk-full and read-only cases: mount -t tmpfs not permitted here ($(cat "$work/mount.err"))"
fi

# ---- 3. SIGKILL during dpo_score --write_ref_logps --------------------------------------------
victim=$work/victim.h5
cp "$work/train.h5" "$victim"
tok=$(tokens_sum "$victim")
score=("$DPO_BIN/dpo_score" --threads 1 --model_name_or_path "$work/model" --data "$victim" --write_ref_logps)
# How long an undisturbed run takes, then kills spread over that time.
t0=$(date +%s%N)
"${score[@]}" >"$work/score_full.log" 2>&1 || fail "dpo_score --write_ref_logps failed: $(tail -n 3 "$work/score_full.log")"
full_ms=$((($(date +%s%N) - t0) / 1000000))
cp "$work/train.h5" "$victim"
kills=0
completed=0
for pct in 30 70 90 96 98 99 100 102 110 150; do  # dense around the commit (rename) at ~100%
  delay=$(awk -v m="$full_ms" -v p="$pct" 'BEGIN {printf "%.3f", m * p / 100000}')
  setsid "${score[@]}" >"$work/score_k.log" 2>&1 &
  p=$!
  sleep "$delay"
  if kill -9 "$p" 2>/dev/null; then
    wait "$p" 2>/dev/null || true
    kills=$((kills + 1))
  else
    wait "$p" && completed=$((completed + 1))
  fi
  [ "$(tokens_sum "$victim")" = "$tok" ] || fail "kill at ${delay}s: the token data of $victim changed"
  rc=0
  "$DPO_BIN/dpo_score" --threads 1 --model_name_or_path "$work/model" --data "$victim" --beta 0.1 >"$work/score_check.log" 2>&1 || rc=$?
  [ $rc = 0 ] || { cat "$work/score_check.log"; fail "kill at ${delay}s: $victim no longer reads (exit $rc)"; }
done
log "sigkill_ref_logps: $kills kills at 30%..150% of a ${full_ms} ms run, $completed completed runs; file intact after each"
[ $kills -gt 0 ] || fail "sigkill_ref_logps: no kill landed"
log "PASS"
