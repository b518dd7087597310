#!/usr/bin/env python3
"""Compares two dpo_dist output directories (GPU check, scripts/gpu/check.sh). stdlib only.

  compare_runs.py A B --tol T [--steps 4-6] [--bitwise]

A, B: output dirs (metrics.jsonl + adapter_model.safetensors). Per logged training step the
difference of loss (and, printed only, rewards/chosen|rejected) relative to that metric's
largest |value| over the steps, and per adapter tensor ||a-b|| / ||b||; --tol applies to the
loss and the adapters (what issue 12 bounds); the worst of each is printed on one line. --bitwise: the adapter files
must be byte-identical and the metrics exactly equal. --steps: only those steps (a range).
Exit 0 when within T (or identical), 1 otherwise; a run whose lora_B are all zero (nothing
trained) fails, as the comparison would prove nothing.
"""
import argparse
import array
import json
import os
import struct
import sys

KEYS = ["loss", "rewards/chosen", "rewards/rejected"]
GATED = ["loss"]  # what --tol applies to (with the adapters); the rewards are printed only


def load_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        if info["dtype"] == "F32":
            a = array.array("f")
            a.frombytes(raw[base + b:base + e])
        elif info["dtype"] == "BF16":
            h = array.array("H")
            h.frombytes(raw[base + b:base + e])
            a = array.array("f")
            a.frombytes(b"".join(struct.pack("<I", x << 16) for x in h))
        else:
            sys.exit("%s: tensor %s has dtype %s (F32/BF16 read here)" % (path, name, info["dtype"]))
        out[name] = a
    return raw, out


def metrics(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def rel(a, b, scale):
    return abs(a - b) / max(scale, 1e-30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--tol", type=float, default=0.0)
    ap.add_argument("--steps", default="")
    ap.add_argument("--bitwise", action="store_true")
    o = ap.parse_args()
    fa, fb = (os.path.join(d, "adapter_model.safetensors") for d in (o.a, o.b))
    raw_a, ta = load_safetensors(fa)
    raw_b, tb = load_safetensors(fb)
    if sorted(ta) != sorted(tb):
        print("FAIL: adapter tensor names differ")
        return 1
    trained = sum(1 for k in ta if k.endswith("lora_B.weight") and any(x != 0 for x in ta[k]))
    if trained == 0:
        print("FAIL: every lora_B of %s is zero: nothing was trained" % fa)
        return 1
    # Per tensor ||a - b|| / ||b|| (Frobenius): a few elements whose tiny gradients Adam
    # turned the other way do not dominate it as they would a max-abs measure.
    worst_t, worst_tn = 0.0, ""
    for k in ta:
        num = sum((x - y) * (x - y) for x, y in zip(ta[k], tb[k]))
        den = sum(y * y for y in tb[k])
        d = (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
        if d != d:
            d = float("inf")
        if d > worst_t:
            worst_t, worst_tn = d, k
    ma, mb = metrics(os.path.join(o.a, "metrics.jsonl")), metrics(os.path.join(o.b, "metrics.jsonl"))
    steps = sorted(set(ma) & set(mb))
    if o.steps:
        lo, hi = (int(x) for x in o.steps.split("-"))
        steps = [s for s in steps if lo <= s <= hi]
        missing = [s for s in range(lo, hi + 1) if s not in ma or s not in mb]
        if missing:
            print("FAIL: steps %s not logged by both runs" % missing)
            return 1
    if not steps:
        print("FAIL: no common logged steps")
        return 1
    # Metrics: |a - b| relative to the largest |b| of that metric over the steps compared
    # (rewards start at exactly 0, where a per-value relative error means nothing).
    worst_m, worst_mk = 0.0, ""
    worst_r, worst_rk = 0.0, ""
    exact = True
    scale = {k: max([abs(mb[s][k]) for s in steps if mb[s].get(k) is not None] or [0.0]) for k in KEYS}
    for s in steps:
        for k in KEYS:
            x, y = ma[s].get(k), mb[s].get(k)
            if x is None or y is None:
                continue
            exact = exact and x == y
            d = rel(x, y, scale[k])
            if k in GATED and d > worst_m:
                worst_m, worst_mk = d, "%s@%d" % (k, s)
            if k not in GATED and d > worst_r:
                worst_r, worst_rk = d, "%s@%d" % (k, s)
    same_bytes = raw_a == raw_b
    summary = ("%d steps: loss max rel diff %.3g (%s), adapters (%d tensors, %d lora_B trained) max ||a-b||/||b|| %.3g (%s), "
               "files %s; rewards max diff / scale %.3g (%s)") % (
        len(steps), worst_m, worst_mk or "-", len(ta), trained, worst_t, worst_tn or "-",
        "byte-identical" if same_bytes else "differ", worst_r, worst_rk or "-")
    ok = (same_bytes and exact) if o.bitwise else (worst_m <= o.tol and worst_t <= o.tol)
    print(("PASS: " if ok else "FAIL: ") + summary + ("" if o.bitwise else " (tol %g)" % o.tol))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
