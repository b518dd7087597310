#!/usr/bin/env bash
# End-to-end: valid-but-hostile JSON (issue 28) ends every tool that reads it with a
# non-zero exit (no signal), one "TOOL: error: ..." line naming the file (and line, for
# JSONL) and the limit of util/json_read.h, and no output file left behind:
#   dpo_preprocess: a JSONL row whose prompt nests 10^5 arrays (alone, with --skip_invalid,
#     and under mpirun -np 2), a tokenizer.json, a tokenizer_config.json and
#     --chat_template_kwargs nested 10^5 deep;
#   dpo_score (every tool that loads a model): a config.json with one key nested 200,000
#     deep, a safetensors header and an adapter_config.json nested 10^5 deep;
#   dpo_dist: --resume_from_checkpoint of a checkpoint whose trainer_state.json is;
#   dpo_report: a metrics.jsonl line that is.
# Before issue 28 the first two killed the tools with SIGSEGV (stack overflow).
#   tests/e2e/hostile_json.sh [BIN_DIR]     (or DPO_BIN=BIN_DIR)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

deep_arrays() { python3 -c "import sys; n = int(sys.argv[1]); sys.stdout.write('[' * n + ']' * n)" "$1"; }
deep_objects() { python3 -c "import sys; n = int(sys.argv[1]); sys.stdout.write('{\"a\":' * n + '1' + '}' * n)" "$1"; }
limit="JSON nested deeper than 512 levels (the limit of every JSON reader here)"

# expect_refused NAME PATTERN NOFILE cmd...: cmd must exit non-zero within 60 s without a
# signal, print one non-empty line on stderr (when not under mpirun) containing
# "error:" and the fixed string PATTERN, and leave no file NOFILE ("" to skip).
expect_refused() {
  local name=$1 pat=$2 nofile=$3 rc=0
  shift 3
  timeout -k 5 60 "$@" >"$work/$name.out" 2>"$work/$name.err" || rc=$?
  [ $rc != 0 ] || fail "$name: exit status 0, expected an error"
  [ $rc != 124 ] && [ $rc != 137 ] || fail "$name: still running after 60 s"
  [ $rc -lt 128 ] || { cat "$work/$name.err"; fail "$name: killed by signal $((rc - 128))"; }
  local line
  line=$(grep -h "error:" "$work/$name.err" "$work/$name.out" | head -n 1 || true)
  [ -n "$line" ] || { cat "$work/$name.err"; fail "$name: no 'error:' line"; }
  [[ "$line" == *"$pat"* ]] || fail "$name: the error does not contain \"$pat\": $line"
  if [ "$1" != mpirun ]; then
    local n
    n=$(grep -c . "$work/$name.err" || true)
    [ "$n" = 1 ] || { cat "$work/$name.err"; fail "$name: $n lines on stderr, expected one"; }
  fi
  if [ -n "$nofile" ]; then
    [ ! -e "$nofile" ] || fail "$name: $nofile was written"
    compgen -G "$nofile.tmp*" >/dev/null && fail "$name: a temporary $nofile.tmp* was left"
  fi
  log "$name: exit $rc: ${line:0:160}"
}

# ---- dpo_preprocess ----------------------------------------------------------------------
rows="$work/deep.jsonl"
head -n 2 "$work/data/train.jsonl" >"$rows"
{ printf '{"prompt": '; deep_arrays 100000; printf ', "chosen": "b", "rejected": "c"}\n'; } >>"$rows"
tail -n 5 "$work/data/train.jsonl" >>"$rows"
pre=("$DPO_BIN/dpo_preprocess" --tokenizer "$work/model/tokenizer.model" --progress off --max_length 48
  --max_prompt_length 40)
want="$rows:3: $limit; is this file really preference data?"
expect_refused preprocess_row "$want" "$work/p.h5" "${pre[@]}" --input "$rows" --output "$work/p.h5"
expect_refused preprocess_row_skip "$want" "$work/p.h5" "${pre[@]}" --input "$rows" --output "$work/p.h5" --skip_invalid
expect_refused preprocess_row_np2 "$want" "$work/p.h5" "${mpi[@]}" -np 2 "${pre[@]}" --input "$rows" --output "$work/p.h5"
# On the command line (60,000 levels: one argument may hold 128 KiB), and from --config.
expect_refused preprocess_kwargs "--chat_template_kwargs: $limit" "$work/p.h5" "${pre[@]}" --input "$work/data/train.jsonl" \
  --output "$work/p.h5" --chat_template "$src/tests/data/fixtures/chat/qwen3.jinja" \
  --chat_template_kwargs "{\"x\": $(deep_arrays 60000)}"
{ printf 'chat_template_kwargs = {"x": '; deep_arrays 100000; printf '}\n'; } >"$work/kwargs.ini"
expect_refused preprocess_kwargs_config "--chat_template_kwargs: $limit" "$work/p.h5" "${pre[@]}" \
  --input "$work/data/train.jsonl" --output "$work/p.h5" --chat_template "$src/tests/data/fixtures/chat/qwen3.jinja" \
  --config "$work/kwargs.ini"
mkdir -p "$work/tok"
{ printf '{"x": '; deep_arrays 100000; printf '}'; } >"$work/tok/tokenizer.json"
expect_refused preprocess_tokenizer_json "$work/tok/tokenizer.json: $limit" "$work/p.h5" \
  "$DPO_BIN/dpo_preprocess" --input "$work/data/train.jsonl" --output "$work/p.h5" --tokenizer "$work/tok/tokenizer.json"
mkdir -p "$work/tokcfg"
cp "$work/model/tokenizer.model" "$work/tokcfg/"
{ printf '{"chat_template": "x", "x": '; deep_arrays 100000; printf '}'; } >"$work/tokcfg/tokenizer_config.json"
expect_refused preprocess_tokenizer_config "$work/tokcfg/tokenizer_config.json: $limit" "$work/p.h5" \
  "$DPO_BIN/dpo_preprocess" --input "$work/data/train.jsonl" --output "$work/p.h5" --model_name_or_path "$work/tokcfg"

# ---- every tool that loads a model (dpo_score here) --------------------------------------
score=("$DPO_BIN/dpo_score" --threads 1 --data "$work/eval.h5")
cp -r "$work/model" "$work/m_cfg"
python3 - "$work/m_cfg/config.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
text = json.dumps(cfg)
with open(sys.argv[1], "w") as f:
    f.write(text[:-1] + ', "x": ' + '{"a":' * 200000 + '1' + '}' * 200000 + '}')
PY
expect_refused score_config "$work/m_cfg/config.json: $limit" "$work/s.jsonl" \
  "${score[@]}" --model_name_or_path "$work/m_cfg" --output "$work/s.jsonl"
cp -r "$work/model" "$work/m_st"
python3 - "$work/m_st/model.safetensors" <<'PY'
import struct, sys
raw = open(sys.argv[1], "rb").read()
(n,) = struct.unpack("<Q", raw[:8])
header = raw[8:8 + n].rstrip(b" ")
deep = b'"deep":' + b"[" * 100000 + b"]" * 100000 + b","
header = header[:1] + deep + header[1:]
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + raw[8 + n:])
PY
expect_refused score_safetensors_header "model.safetensors: header: $limit" "$work/s.jsonl" \
  "${score[@]}" --model_name_or_path "$work/m_st" --output "$work/s.jsonl"

# An adapter (a one-step run), then its adapter_config.json nested too deep.
timeout -k 5 120 "$DPO_BIN/dpo_dist" "${train_args[@]}" --output_dir "$work/run" --max_steps 2 --save_steps 1 \
  --per_device_train_batch_size 2 >"$work/run.log" 2>&1 || fail "training run failed: $(tail -n 5 "$work/run.log")"
cp -r "$work/run/checkpoint-1" "$work/ad"
{ printf '{"r": 4, "x": '; deep_arrays 100000; printf '}'; } >"$work/ad/adapter_config.json"
expect_refused score_adapter_config "$work/ad/adapter_config.json: $limit" "$work/s.jsonl" \
  "${score[@]}" --model_name_or_path "$work/model" --adapter "$work/ad" --output "$work/s.jsonl"

# ---- dpo_dist resume, dpo_report ---------------------------------------------------------
{ printf '{"global_step": 1, "x": '; deep_arrays 100000; printf '}'; } >"$work/run/checkpoint-1/trainer_state.json"
expect_refused resume_trainer_state "error:" "" \
  "$DPO_BIN/dpo_dist" "${train_args[@]}" --output_dir "$work/run" --max_steps 3 --save_steps 1 \
  --per_device_train_batch_size 2 --resume_from_checkpoint "$work/run/checkpoint-1"
{ printf '{"step": 3, "x": '; deep_arrays 100000; printf '}\n'; } >>"$work/run/metrics.jsonl"
if [ -x "$DPO_BIN/dpo_report" ]; then
  expect_refused report_metrics "$limit" "" "$DPO_BIN/dpo_report" "$work/run"
fi
log "hostile JSON: every tool refused it with one line, no signal, nothing written"
