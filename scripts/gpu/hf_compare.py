#!/usr/bin/env python3
"""dpo_dist against Hugging Face transformers + PEFT on the same tiny model (GPU check item).

  hf_compare.py logps --model DIR --data FILE.h5 --scores SCORES.jsonl [--tol 1e-4]
      The sequence log-probs that `dpo_score --output SCORES.jsonl` wrote for each pair
      (summed over the answer tokens) against transformers' LlamaForCausalLM in fp32.
  hf_compare.py rewards --model DIR --data FILE.h5 --adapter DIR --metrics METRICS.jsonl
                        --beta B [--tol 1e-4]
      PeftModel.from_pretrained(base, ADAPTER) scores the eval file (policy = adapter on,
      reference = adapter off) and its mean DPO rewards are compared with the trainer's last
      eval_rewards/* row in METRICS.jsonl (a run with a dense fp32 base: --load_in_4bit false);
      each within tol relative or 1e-5 absolute.

Prints one line with the worst relative difference and exits 0 (within tol), 1 (not), 77
(transformers/peft/h5py missing: not run). Needs only python3, torch, h5py, transformers, peft.
"""
import argparse
import json
import sys


def need(modules):
    missing = []
    for m in modules:
        try:
            __import__(m)
        except Exception:  # noqa: BLE001 - any import failure means "not here"
            missing.append(m)
    if missing:
        print("NOT RUN: python modules missing: " + ", ".join(missing))
        sys.exit(77)


def read_pairs(path):
    import h5py

    with h5py.File(path, "r") as f:
        cols = {}
        for c in ("prompt", "chosen", "rejected"):
            cols[c] = (f[c + "/tokens"][:], f[c + "/offsets"][:])
        n = len(cols["prompt"][1]) - 1
        out = []
        for i in range(n):
            ex = {}
            for c, (tok, off) in cols.items():
                ex[c] = [int(t) for t in tok[off[i]:off[i + 1]]]
            out.append(ex)
        return out


def load_model(model_dir):
    import torch
    from transformers import LlamaForCausalLM

    kw = dict(attn_implementation="eager")
    try:
        m = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        m = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **kw)
    m.eval()
    return m


def answer_logps(model, prompt, answer):
    """Sum of log p(answer token | everything before it), one unpadded sequence."""
    import torch

    ids = torch.tensor([prompt + answer], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    nxt = ids[0, 1:]
    per_tok = lp.gather(1, nxt[:, None])[:, 0]
    return float(per_tok[len(prompt) - 1:].sum())


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def cmd_logps(a):
    model = load_model(a.model)
    pairs = read_pairs(a.data)
    scores = [json.loads(l) for l in open(a.scores) if l.strip()]
    if len(scores) != len(pairs):
        print("FAIL: %s has %d rows, %s %d pairs" % (a.scores, len(scores), a.data, len(pairs)))
        return 1
    worst, where = 0.0, None
    for s in scores:
        i = int(s["index"])
        for side in ("chosen", "rejected"):
            hf = answer_logps(model, pairs[i]["prompt"], pairs[i][side])
            d = rel(float(s[side + "_logps"]), hf)
            if d > worst:
                worst, where = d, (i, side, float(s[side + "_logps"]), hf)
    ok = worst <= a.tol
    print("%s: %d pairs, log-probs max rel diff %.3g vs LlamaForCausalLM fp32 (tol %g)%s" % (
        "PASS" if ok else "FAIL", len(scores), worst, a.tol,
        "" if where is None else "; worst: pair %d %s dpo_dist %.6f hf %.6f" % where))
    return 0 if ok else 1


def cmd_rewards(a):
    from peft import PeftModel

    base = load_model(a.model)
    model = PeftModel.from_pretrained(base, a.adapter)
    model.eval()
    pairs = read_pairs(a.data)
    rows = [json.loads(l) for l in open(a.metrics) if l.strip()]
    ev = [r for r in rows if "eval_rewards/chosen" in r]
    if not ev:
        print("FAIL: no eval_rewards/* row in %s (run with --eval_file)" % a.metrics)
        return 1
    ev = ev[-1]
    rc, rr, acc = [], [], []
    for p in pairs:
        pol = [answer_logps(model, p["prompt"], p[s]) for s in ("chosen", "rejected")]
        with model.disable_adapter():
            ref = [answer_logps(model, p["prompt"], p[s]) for s in ("chosen", "rejected")]
        c, r = a.beta * (pol[0] - ref[0]), a.beta * (pol[1] - ref[1])
        rc.append(c)
        rr.append(r)
        acc.append(1.0 if c > r else 0.0)
    n = len(pairs)
    hf = {"eval_rewards/chosen": sum(rc) / n, "eval_rewards/rejected": sum(rr) / n,
          "eval_rewards/margins": (sum(rc) - sum(rr)) / n, "eval_rewards/accuracies": sum(acc) / n}
    # Each value within tol relative, or within 1e-5 absolute (a reward near 0 has no
    # meaningful relative error).
    worst, where, ok = 0.0, None, True
    for k, v in hf.items():
        t = float(ev[k])
        d = rel(t, v)
        ok = ok and (d <= a.tol or abs(t - v) <= 1e-5)
        if d > worst:
            worst, where = d, (k, t, v)
    if max(abs(x) for x in rc + rr) == 0.0:
        print("FAIL: every reward is 0: the adapter was not trained, the comparison proves nothing")
        return 1
    print("%s: %d eval pairs, PEFT rewards vs trainer eval (step %s): max rel diff %.3g (tol %g)%s" % (
        "PASS" if ok else "FAIL", n, ev.get("step"), worst, a.tol,
        "" if where is None else "; worst: %s trainer %.6g peft %.6g" % where))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logps")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--scores", required=True)
    p.add_argument("--tol", type=float, default=1e-4)
    r = sub.add_parser("rewards")
    r.add_argument("--model", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--adapter", required=True)
    r.add_argument("--metrics", required=True)
    r.add_argument("--beta", type=float, required=True)
    r.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    need(["torch", "h5py", "transformers"] + (["peft"] if a.cmd == "rewards" else []))
    sys.exit(cmd_logps(a) if a.cmd == "logps" else cmd_rewards(a))


if __name__ == "__main__":
    main()
