#!/usr/bin/env bash
# The HTML report in a real browser: dpo_report writes report.html for two runs (a
# metrics.jsonl fixture with train and eval events, a NaN, several metrics), Debian's
# chromium (headless) loads it: no console messages, every chart's <svg> in the parsed
# DOM, and a screenshot that is an image of the right size, not blank, with both runs'
# line colours drawn. Exits 77 (ctest: not run) when chromium is not installed.
# usage: report_browser.sh BIN_DIR [SCREENSHOT_OUT.png]
set -euo pipefail
bin=${1:?usage: report_browser.sh BIN_DIR [SCREENSHOT_OUT.png]}
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
chrome=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$chrome" ]; then
  echo "report_browser: chromium not installed (scripts/setup.sh installs it): NOT RUN"
  exit 77
fi
work=$(mktemp -d /tmp/dpo_report_browser.XXXXXX)
trap 'rm -rf "$work"' EXIT
fail() { echo "report_browser: FAIL: $*" >&2; exit 1; }

# Two runs as dpo_dist writes them (metrics.jsonl + training_args.json).
for run in a b; do
  mkdir -p "$work/$run"
  python3 - "$work/$run" "$run" <<'PY'
import json, math, sys
d, run = sys.argv[1], sys.argv[2]
k = 1.0 if run == "a" else 1.6
with open(d + "/metrics.jsonl", "w") as f:
    ev = lambda s, acc, m: {"step": s, "epoch": s / 100, "eval_loss": 0.6931 / (1 + k * s / 40),
        "eval_rewards/accuracies": acc, "eval_rewards/chosen": m / 2, "eval_rewards/rejected": -m / 2,
        "eval_rewards/margins": m, "eval_logps/chosen": -60 + m, "eval_logps/rejected": -62 - m,
        "eval_logits/chosen": 0.02, "eval_logits/rejected": 0.03}
    f.write(json.dumps(ev(0, 0.0, 0.0)) + "\n")
    for s in range(5, 101, 5):
        x = k * s / 40
        f.write(json.dumps({"step": s, "epoch": s / 100, "loss": 0.6931 / (1 + x), "rewards/chosen": 0.1 * x,
            "rewards/rejected": -0.2 * x, "rewards/accuracies": min(1.0, 0.5 + 0.1 * x), "rewards/margins": 0.3 * x,
            "logps/chosen": -60 + x, "logps/rejected": -62 - 2 * x, "logits/chosen": 0.02 * x, "logits/rejected": 0.03,
            "learning_rate": 5e-4 * min(1, s / 20), "grad_norm": None if s == 50 else 2.0 / (1 + x),
            "tokens_per_second": 900 + 10 * math.sin(s)}) + "\n")
        if s % 50 == 0:
            f.write(json.dumps(ev(s, min(1.0, 0.5 + 0.1 * x), 0.3 * x)) + "\n")
json.dump({"stage": "dpo", "loss_type": "sigmoid" if run == "a" else "sigmoid,bco_pair,sft", "world_size": 2,
           "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1", "max_steps": "100",
           "model_name_or_path": "/nonexistent/model", "train_file": "train.h5"}, open(d + "/training_args.json", "w"))
PY
done
"$bin/dpo_report" "$work/a" "$work/b" --output "$work/report.html" || fail "dpo_report exited $?"

run_chrome() {
  timeout 120 "$chrome" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
    --disable-extensions --disable-background-networking --user-data-dir="$work/profile" \
    --enable-logging=stderr --v=0 "$@" "file://$work/report.html"
}
run_chrome --dump-dom >"$work/dom.html" 2>"$work/dom.log" || fail "chromium --dump-dom failed: $(tail -3 "$work/dom.log")"
# Console messages (errors, failed loads) show as CONSOLE lines with --enable-logging.
if grep -E "CONSOLE|Uncaught|Failed to load|net::ERR" "$work/dom.log"; then
  fail "the browser console reported the lines above"
fi
for id in chart-loss chart-rewards chart-margins chart-accuracies chart-logps chart-logits chart-learning-rate \
          chart-grad-norm chart-tokens-per-second; do
  grep -q "<svg id=\"$id\"" "$work/dom.html" || fail "chart $id missing from the rendered DOM"
done
n_lines=$(grep -o "<polyline" "$work/dom.html" | wc -l)
[ "$n_lines" -ge 30 ] || fail "only $n_lines polylines in the rendered DOM"
grep -q "parsererror" "$work/dom.html" && fail "the browser could not parse an SVG"

shot=${2:-$work/shot.png}
run_chrome --screenshot="$shot" --window-size=1400,1800 --hide-scrollbars >/dev/null 2>"$work/shot.log" ||
  fail "chromium --screenshot failed: $(tail -3 "$work/shot.log")"
python3 "$src/tests/e2e/png_check.py" "$shot" 1400 1800 "#1f77b4" "#ff7f0e" || fail "screenshot check"
echo "report_browser: OK (9 charts, $n_lines lines, no console messages)"
