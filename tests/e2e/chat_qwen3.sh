#!/usr/bin/env bash
# The modern-model path end to end, as docs/usage.md's second example runs it: a Qwen3
# model directory whose tokenizer is the real Qwen3 tokenizer.json (no tokenizer.model,
# no bos) with its chat template in tokenizer_config.json, conversational preference rows
# (explicit prompt), then:
#  1. dpo_preprocess renders the rows with the model's chat template (tokenizer_config.json,
#     enable_thinking false) and records tokenizer_type tokenizer.json (the token-level
#     rules are unit tests: test_preprocess_chat)
#  2. SFT with --modules_to_save embed_tokens,lm_head learns (train loss falls)
#  3. its adapter lists modules_to_save and holds PEFT's keys (tied embeddings: one
#     copy); dpo_merge writes a model directory that keeps tokenizer.json + template
#  4. DPO (QLoRA, all-linear) from that merged model, merged again, scored by dpo_score
# Needs the real tokenizer files: DPO_TOKENIZER_DIR (ctest sets it to the fixtures that
# CMake extracts from tests/fixtures/tokenizers.tar.xz); without them the test fails.
set -euo pipefail
BIN=${1:?usage: chat_qwen3.sh BIN_DIR}
tok_dir=${DPO_TOKENIZER_DIR:-}/tokenizer-qwen3/models
if [ -z "${DPO_TOKENIZER_DIR:-}" ] || [ ! -f "$tok_dir/tokenizer.json" ]; then
  echo "chat_qwen3: FAIL: no $tok_dir/tokenizer.json (set DPO_TOKENIZER_DIR to <build>/fixtures/tokenizers)" >&2
  exit 1
fi
work=$(mktemp -d /tmp/dpo_chat_qwen3.XXXXXX)
trap 'rc=$?; if [ $rc = 0 ]; then rm -rf "$work"; else echo "work dir kept: $work"; fi' EXIT
fail() { echo "chat_qwen3: FAIL: $*" >&2; exit 1; }
log() { echo "chat_qwen3[${SECONDS}s]: $*"; }
run() {  # run LOG cmd...: output to LOG, its tail on failure
  local logf=$1
  shift
  "$@" >"$logf" 2>&1 || fail "$(basename "$1") failed: $(tail -n 8 "$logf")"
}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

# A tiny random Qwen3 with the real vocabulary size (151936 as Qwen3's config.json) and the
# real tokenizer files next to it.
run "$work/init.log" "$BIN/dpo_init_model" --output_dir "$work/qwen3" --architecture qwen3 --num_hidden_layers 2 \
  --hidden_size 64 --num_attention_heads 4 --num_key_value_heads 2 --head_dim 32 --intermediate_size 128 \
  --vocab_size 151936 --bos_token_id 151643 --eos_token_id 151645 --seed 11
cp "$tok_dir/tokenizer.json" "$tok_dir/tokenizer_config.json" "$work/qwen3/"
[ ! -e "$work/qwen3/tokenizer.model" ] || fail "the model directory should hold no tokenizer.model"

# Conversational rows (TRL's explicit-prompt form) from the demo task.
run "$work/demo.log" "$BIN/dpo_make_demo_data" --output_dir "$work/data" --num_train 96 --num_eval 24 --seed 2
for split in train eval; do
  python3 - "$work/data/$split.jsonl" "$work/$split.chat.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for i, line in enumerate(f):
        r = json.loads(line)
        prompt = [{"role": "user", "content": r["prompt"]}]
        if i % 2 == 0:
            prompt.insert(0, {"role": "system", "content": "Answer in one word."})
        out.write(json.dumps({"prompt": prompt,
                              "chosen": [{"role": "assistant", "content": r["chosen"]}],
                              "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n")
EOF
  run "$work/pre_$split.log" "$BIN/dpo_preprocess" --input "$work/$split.chat.jsonl" --output "$work/$split.h5" \
    --model_name_or_path "$work/qwen3" --chat_template_kwargs '{"enable_thinking": false}' \
    --max_length 96 --max_prompt_length 64 --progress off
done
"$BIN/dpo_preprocess" --inspect "$work/train.h5" >"$work/inspect.txt" 2>&1 || fail "--inspect: $(tail -n 5 "$work/inspect.txt")"
grep -q '^tokenizer_type: .*json' "$work/inspect.txt" || fail "train.h5 does not record a tokenizer.json tokenizer_type: $(cat "$work/inspect.txt")"
grep -q '^bos_id: -1$' "$work/inspect.txt" || fail "Qwen3 has no bos token, yet: $(grep bos_id "$work/inspect.txt")"
log "1. preprocess: $(grep -c . "$work/train.chat.jsonl") conversational rows rendered with the Qwen3 template"

# 2. SFT with trainable embeddings and head: the train loss must fall.
# train_args MODEL_DIR: the options of both runs.
train_args() {
  echo --model_name_or_path "$1" --train_file "$work/train.h5" --eval_file "$work/eval.h5" --lora_r 8 \
    --lora_alpha 16 --seed 3 --threads 1 --progress off --report_to jsonl --logging_steps 1 \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 1
}
# shellcheck disable=SC2046
run "$work/sft.log" "$BIN/dpo_dist" $(train_args "$work/qwen3") --stage sft --learning_rate 3e-3 --max_steps 12 \
  --eval_steps 12 --lora_target_modules q_proj,k_proj,v_proj,o_proj --modules_to_save embed_tokens,lm_head \
  --output_dir "$work/sft"
python3 - "$work/sft/metrics.jsonl" <<'EOF' || fail "SFT did not learn (see above)"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ev = [r["eval_loss"] for r in rows if "eval_loss" in r]
tr = [r["loss"] for r in rows if "loss" in r]
print("sft: train loss %.3f -> %.3f, eval loss %s" % (tr[0], tr[-1], ev))
if not ev or not tr or not tr[-1] < 0.9 * tr[0]:
    sys.exit("train loss did not fall by 10%")
EOF
log "2. SFT with modules_to_save learns"

# 3. the SFT adapter: modules_to_save in PEFT's layout (tied embeddings: one saved
# copy), merged into a model directory that still carries the tokenizer.json files.
[ -f "$work/sft/adapter_model.safetensors" ] || fail "no adapter_model.safetensors in $work/sft"
python3 - "$work/sft" <<'EOF' || fail "adapter layout (see above)"
import json, struct, sys
d = sys.argv[1]
cfg = json.load(open(d + "/adapter_config.json"))
assert sorted(cfg.get("modules_to_save") or []) == ["embed_tokens", "lm_head"], cfg.get("modules_to_save")
raw = open(d + "/adapter_model.safetensors", "rb").read()
(n,) = struct.unpack("<Q", raw[:8])
keys = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
saved = [k for k in keys if "lora_" not in k]
print("adapter: %d tensors; modules_to_save keys: %s" % (len(keys), saved))
assert any(k.endswith("embed_tokens.weight") for k in saved), saved
assert any(k.startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_A") for k in keys), keys[:4]
EOF
run "$work/merge_sft.log" "$BIN/dpo_merge" --threads 1 --model_name_or_path "$work/qwen3" --adapter "$work/sft" \
  --output_dir "$work/qwen3-sft"
for f in tokenizer.json tokenizer_config.json config.json; do
  [ -f "$work/qwen3-sft/$f" ] || fail "the merged model lacks $f"
done
grep -q '"Qwen3ForCausalLM"' "$work/qwen3-sft/config.json" || fail "the merged config.json is not Qwen3ForCausalLM"
log "3. SFT adapter (modules_to_save in PEFT's layout) merged into qwen3-sft"

# 4. DPO from the merged SFT model (QLoRA on every linear layer), merged again, scored.
# shellcheck disable=SC2046
run "$work/dpo.log" "$BIN/dpo_dist" $(train_args "$work/qwen3-sft") --stage dpo --beta 0.1 --learning_rate 1e-3 \
  --max_steps 2 --eval_steps 2 --lora_target_modules all-linear --output_dir "$work/dpo"
grep -q '"rewards/accuracies"' "$work/dpo/metrics.jsonl" || fail "no DPO metrics logged"
run "$work/merge_dpo.log" "$BIN/dpo_merge" --threads 1 --model_name_or_path "$work/qwen3-sft" --adapter "$work/dpo" \
  --output_dir "$work/qwen3-dpo"
[ -f "$work/qwen3-dpo/tokenizer.json" ] || fail "the DPO-merged model lacks tokenizer.json"
run "$work/score.log" "$BIN/dpo_score" --threads 1 --model_name_or_path "$work/qwen3-dpo" --data "$work/eval.h5" \
  --output "$work/scores.jsonl"
[ "$(grep -c . "$work/scores.jsonl")" -gt 0 ] || fail "dpo_score wrote no rows"
log "4. DPO from the SFT model, merged, scored: $(grep -c . "$work/scores.jsonl") pairs"
log "PASS"
