#!/usr/bin/env bash
# End-to-end: user errors end dpo_dist quickly (each run bounded to 60 s) with a non-zero
# exit and one clear "dpo_dist: error: ..." line naming the culprit:
#   unknown option; missing --train_file; a train file tokenized with ANOTHER tokenizer
#   (np=2: both ranks stop, the line mentions the tokenizer); --resume_from_checkpoint of a
#   missing dir; resume with another --lora_r (np=2; names lora_r); a model dir holding only
#   pytorch_model.bin (names safetensors); disk full while saving a checkpoint (a 300 KiB
#   tmpfs as output_dir: the error names the checkpoint path, the earlier checkpoint stays
#   complete, no checkpoint-N dir is left half written); --device cuda without a GPU; a
#   --device cuda run's checkpoint resumed on --device cpu (np=2; names rng_state.safetensors
#   and the way on), and, with that file deleted, the resume that reseeds dropout.
#   tests/e2e/train_errors.sh [BIN_DIR]     (or DPO_BIN=BIN_DIR)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# expect_error NAME NP PATTERN args...: runs dpo_dist (alone, or under mpirun -np NP), wants a
# non-zero exit within 60 s and a "dpo_dist: error:" line matching PATTERN (grep -E -i); when
# alone, exactly one non-empty line of stderr.
expect_error() {
  local name=$1 np=$2 pat=$3 rc=0 t=$SECONDS
  shift 3
  if [ "$np" = 1 ]; then
    timeout -k 5 60 "$DPO_BIN/dpo_dist" "$@" >"$work/$name.out" 2>"$work/$name.err" || rc=$?
  else
    timeout -k 5 60 "${mpi[@]}" -np "$np" "$DPO_BIN/dpo_dist" "$@" >"$work/$name.out" 2>"$work/$name.err" || rc=$?
  fi
  [ $rc != 0 ] || fail "$name: exit status 0, expected an error"
  [ $rc != 124 ] && [ $rc != 137 ] || fail "$name: still running after 60 s (hang); output: $(tail -n 5 "$work/$name.err")"
  local line
  line=$(grep -h "dpo_dist: error:" "$work/$name.err" "$work/$name.out" | head -n 1 || true)
  [ -n "$line" ] || { cat "$work/$name.err"; fail "$name: no 'dpo_dist: error:' line"; }
  echo "$line" | grep -E -i -q -- "$pat" || fail "$name: the error does not match /$pat/: $line"
  if [ "$np" = 1 ]; then
    local n
    n=$(grep -c . "$work/$name.err" || true)
    [ "$n" = 1 ] || { cat "$work/$name.err"; fail "$name: $n lines on stderr, expected one"; }
  fi
  log "$name: exit $rc in $((SECONDS - t)) s: ${line:0:200}"
}

base=("${train_args[@]}" --per_device_train_batch_size 2 --lora_dropout 0)
# Every case runs even when an earlier one fails; the test fails at the end, listing them.
failed=()
check() {  # expect_error args...
  if ! (expect_error "$@"); then failed+=("$1"); fi
}

# ---- options -------------------------------------------------------------------------------
check unknown_option 1 "no_such_option" "${base[@]}" --output_dir "$work/o1" --no_such_option 3
check missing_train_file 1 "train_file" --model_name_or_path "$work/model" --output_dir "$work/o2" --progress off
check missing_resume_dir 1 "resume_from_checkpoint.*$work/nope" "${base[@]}" --output_dir "$work/o3" \
  --resume_from_checkpoint "$work/nope" --max_steps 2

# ---- data tokenized with another tokenizer (np=2) ------------------------------------------
# Same corpus, another model type: a different tokenizer with a similar vocabulary size.
make_tokenizer "$work/spm2" "$work/data/corpus.txt" --model_type=unigram --vocab_size=200 >/dev/null
"$DPO_BIN/dpo_preprocess" --input "$work/data/train.jsonl" --output "$work/train_other.h5" --tokenizer "$work/spm2.model" \
  --format trl --max_length 48 --max_prompt_length 40 --progress off >"$work/pp2.log" 2>&1 ||
  fail "dpo_preprocess with the second tokenizer failed: $(tail -n 3 "$work/pp2.log")"
mapfile -d '' other < <(with_opt train_file "$work/train_other.h5" "${base[@]}")
check other_tokenizer 2 "train_other\.h5.*tokenizer" "${other[@]}" --output_dir "$work/o4" --max_steps 2

# ---- resume with another lora_r (np=2) -----------------------------------------------------
rc=0
run_bounded 60 "$work/r4.log" "${mpi[@]}" -np 2 "$DPO_BIN/dpo_dist" "${base[@]}" --output_dir "$work/o5" --max_steps 2 \
  --save_steps 1 || rc=$?
[ $rc = 0 ] || { tail -n 10 "$work/r4.log"; fail "the lora_r=4 run to resume from exited $rc"; }
mapfile -d '' lr < <(with_opt lora_r 8 "${base[@]}")
check resume_other_lora_r 2 "lora_r" "${lr[@]}" --output_dir "$work/o5" --max_steps 4 --resume_from_checkpoint auto

# ---- --device cuda where there is no GPU (CPU-only libtorch or machine) ----------------------
if ! nvidia-smi -L >/dev/null 2>&1; then
  check device_cuda_no_gpu 1 "device cuda: no CUDA device" "${base[@]}" --output_dir "$work/o8" --max_steps 2 --device cuda
fi

# ---- a --device cuda run's checkpoint resumed on --device cpu (np=2) -------------------------
# o5's newest checkpoint rewritten as a CUDA run writes it (rank_<i>.cuda + device_type, docs/gpu.md).
cp -r "$work/o5" "$work/o7"
k7=$(newest_checkpoint "$work/o7")
python3 - "$work/o7/checkpoint-$k7/rng_state.safetensors" <<'PY' || fail "could not rewrite rng_state.safetensors"
import json, struct, sys
p = sys.argv[1]
raw = open(p, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
h, data = json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])
for name in [k for k in h if k != "__metadata__"]:
    b, e = h[name]["data_offsets"]
    h[name + ".cuda"] = {"dtype": "U8", "shape": [16], "data_offsets": [len(data), len(data) + 16]}
    data += bytes(16)
h["__metadata__"] = {"device_type": "cuda"}
hb = json.dumps(h).encode()
hb += b" " * (-len(hb) % 8)
open(p, "wb").write(struct.pack("<Q", len(hb)) + hb + bytes(data))
PY
check resume_cuda_rng_on_cpu 2 "rng_state\.safetensors: dropout RNG state written by a --device cuda run cannot continue on --device cpu.*delete this file" \
  "${base[@]}" --output_dir "$work/o7" --max_steps 4 --resume_from_checkpoint auto
# Deleting the file is the documented way on: it resumes, with reseeded dropout streams.
rm "$work/o7/checkpoint-$k7/rng_state.safetensors"
rc=0
run_bounded 60 "$work/r7.log" "${mpi[@]}" -np 2 "$DPO_BIN/dpo_dist" "${base[@]}" --output_dir "$work/o7" --max_steps 4 \
  --resume_from_checkpoint auto || rc=$?
if [ $rc != 0 ] || ! grep -q "rng_state.safetensors is absent; dropout streams reseeded" "$work/r7.log"; then
  tail -n 5 "$work/r7.log"
  failed+=(resume_without_rng_state)
else
  log "resume_without_rng_state: resumed at $k7 with reseeded dropout streams"
fi

# ---- model dir with only pytorch_model.bin -------------------------------------------------
mkdir -p "$work/model_bin"
cp "$work/model/config.json" "$work/model/tokenizer.model" "$work/model_bin/"
head -c 4096 /dev/urandom >"$work/model_bin/pytorch_model.bin"
mapfile -d '' pt < <(with_opt model_name_or_path "$work/model_bin" "${base[@]}")
check pytorch_bin_only 1 "safetensors" "${pt[@]}" --output_dir "$work/o6" --max_steps 2

# ---- disk full while saving a checkpoint ---------------------------------------------------
full=$work/full
mkdir -p "$full"
if ! mount -t tmpfs -o size=300k tmpfs "$full" 2>"$work/mount.err"; then
  log "SKIPPED disk-full case: mount -t tmpfs not permitted here ($(cat "$work/mount.err")); every other case ran"
  [ ${#failed[@]} = 0 ] || fail "cases failed: ${failed[*]}"
  log "PASS (disk-full case skipped)"
  exit 0
fi
e2e_cleanup_hooks+=("umount '$full'")
out=$full/run
# No metrics.jsonl writes between the saves: the checkpoint save is what meets the full disk.
mapfile -d '' quiet < <(with_opt logging_steps 1000 "${base[@]}")
# 1. a 5-step run whose checkpoint-5 fits.
rc=0
run_bounded 60 "$work/full1.log" "$DPO_BIN/dpo_dist" "${quiet[@]}" --output_dir "$out" --max_steps 5 --save_steps 5 || rc=$?
[ $rc = 0 ] || { tail -n 5 "$work/full1.log"; fail "the first run on the 300k tmpfs failed ($rc): make it smaller"; }
[ -f "$out/checkpoint-5/trainer_state.json" ] || fail "no checkpoint-5 on the tmpfs"
ck5=$(cd "$out/checkpoint-5" && md5sum * | md5sum)
# 2. fill the file system, keeping 16 KiB back: enough for the resumed run's setup files
#    (training_args.json), too little for checkpoint-10 (adapter + optimizer + RNG state).
dd if=/dev/zero of="$full/reserve" bs=16k count=1 status=none
dd if=/dev/zero of="$full/filler" bs=4k status=none 2>/dev/null || true
rm -f "$full/reserve"
log "tmpfs: $(df -k "$full" | awk 'NR==2 {print $4}') KiB free; checkpoint-5 is $(du -sk "$out/checkpoint-5" | cut -f1) KiB"
check disk_full 1 "checkpoint-10" "${quiet[@]}" --output_dir "$out" --max_steps 10 --save_steps 5 \
  --resume_from_checkpoint auto
grep -q "resumed from .*checkpoint-5" "$work/disk_full.out" || fail "disk_full: the run did not resume from checkpoint-5 (it failed before training: $(cat "$work/disk_full.err"))"
[ ! -e "$out/checkpoint-10" ] || fail "disk_full: a half-written $out/checkpoint-10 was left: $(ls "$out/checkpoint-10")"
[ -z "$(find "$out" -maxdepth 1 -name '.checkpoint-*')" ] || fail "disk_full: temporary dir left: $(ls -a "$out")"
[ "$(cd "$out/checkpoint-5" && md5sum * | md5sum)" = "$ck5" ] || fail "disk_full: checkpoint-5 changed"
rm -f "$full/filler"
[ ${#failed[@]} = 0 ] || fail "cases failed: ${failed[*]}"
rc=0
run_bounded 60 "$work/full3.log" "$DPO_BIN/dpo_score" --model_name_or_path "$work/model" --adapter "$out/checkpoint-5" \
  --data "$work/eval.h5" --output "$work/scores5.jsonl" || rc=$?
[ $rc = 0 ] || fail "checkpoint-5 no longer loads after the failed save: $(tail -n 3 "$work/full3.log")"
log "PASS"
