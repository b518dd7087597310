#!/usr/bin/env bash
# The built-in demo, end to end from a fresh Debian 12 machine: installs every
# package (apt-get and the project's venv, whose torch wheel carries the libtorch the
# tools link), builds the tools, then
#   1. dpo_make_demo_data: a synthetic preference task (held-out eval prompts)
#   2. spm_train: a sentencepiece tokenizer trained on the demo text
#   3. dpo_init_model: a tiny random Llama in the Hugging Face layout
#   4. dpo_preprocess: JSONL -> HDF5 triples (train, eval)
#   5. mpirun -np 2 dpo_dist --stage sft, then dpo_merge (SFT adapter -> model)
#   6. mpirun -np 2 dpo_dist (DPO, 4-bit base + LoRA) with evaluation
#   7. dpo_score on the held-out pairs
# Output: ${DEMO_DIR:-demo_out}. Extra arguments go to the DPO dpo_dist run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bash scripts/setup.sh
BUILD=${DPO_BUILD_DIR:-build}
source scripts/venv.sh
source scripts/ccache_env.sh
cmake -G Ninja -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release ${DPO_CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target dpo_dist dpo_preprocess dpo_init_model dpo_make_demo_data dpo_merge dpo_score
bin="$root/$BUILD/bin"
out=${DEMO_DIR:-demo_out}
rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)
np=${DEMO_NP:-2}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi=(mpirun -np "$np" --oversubscribe --bind-to none)
start=$(date +%s)
step() { printf '\n=== %s (%ds)\n' "$*" $(( $(date +%s) - start )); }

step "1. demo data"
"$bin/dpo_make_demo_data" --output_dir "$out/data" --num_train 2000 --num_eval 200 --seed 1
step "2. tokenizer"
spm_train --input="$out/data/corpus.txt" --model_prefix="$out/spm" --model_type=bpe --vocab_size=256 \
  --hard_vocab_limit=false --character_coverage=1.0 --bos_id=1 --eos_id=2 --unk_id=0 --pad_id=-1 \
  --minloglevel=2 >"$out/spm_train.log" 2>&1
vocab=$(spm_export_vocab --model="$out/spm.model" | wc -l)
echo "tokenizer: $vocab pieces"
step "3. tiny random Llama"
"$bin/dpo_init_model" --output_dir "$out/model" --num_hidden_layers 2 --hidden_size 64 --num_attention_heads 4 \
  --num_key_value_heads 2 --intermediate_size 128 --vocab_size "$vocab" --seed 1 --tokenizer "$out/spm.model"
step "4. preprocess"
for split in train eval; do
  "$bin/dpo_preprocess" --input "$out/data/$split.jsonl" --output "$out/$split.h5" --tokenizer "$out/model/tokenizer.model" \
    --format trl --max_length 48 --max_prompt_length 40 --progress off
done
step "5. SFT on prompt -> chosen ($np ranks)"
"${mpi[@]}" "$bin/dpo_dist" --config configs/demo-sft.ini --model_name_or_path "$out/model" \
  --train_file "$out/train.h5" --eval_file "$out/eval.h5" --output_dir "$out/sft" --progress off
"$bin/dpo_merge" --model_name_or_path "$out/model" --adapter "$out/sft" --output_dir "$out/sft-merged"
step "6. DPO ($np ranks)"
"${mpi[@]}" "$bin/dpo_dist" --config configs/demo-dpo.ini --model_name_or_path "$out/sft-merged" \
  --train_file "$out/train.h5" --eval_file "$out/eval.h5" --output_dir "$out/dpo" --progress off "$@"
step "7. score held-out pairs"
"$bin/dpo_score" --model_name_or_path "$out/sft-merged" --adapter "$out/dpo" --data "$out/eval.h5" \
  --output "$out/eval_scores.jsonl" --beta 1.0
step "done"
echo "eval (held-out prompts), from $out/dpo/metrics.jsonl:"
grep eval_ "$out/dpo/metrics.jsonl" | python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print("  step %5d  eval_loss %.4f  eval_rewards/accuracies %.3f  eval_rewards/margins %.4f" % (
        e["step"], e["eval_loss"], e["eval_rewards/accuracies"], e["eval_rewards/margins"]))'
cat <<EOT
adapter:      $out/dpo/adapter_model.safetensors (+ adapter_config.json, PEFT layout)
metrics:      $out/dpo/metrics.jsonl (SFT: $out/sft/metrics.jsonl)
report:       $out/dpo/report.html (SFT: $out/sft/report.html; both: dpo_report $out/sft $out/dpo)
checkpoints:  $out/dpo/checkpoint-*
scores:       $out/eval_scores.jsonl
total time:   $(( $(date +%s) - start )) s
EOT
