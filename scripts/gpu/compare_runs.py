#!/usr/bin/env python3
"""Compares two dpo_dist output directories (GPU check, scripts/gpu/check.sh). stdlib only.

  compare_runs.py A B --tol T [--steps 4-6] [--bitwise]

A, B: output dirs (metrics.jsonl + adapter_model.safetensors). Per logged training step the
relative difference of loss and rewards/chosen|rejected, and per adapter tensor
max|a-b| / max|b|; the worst of each is printed on one line. --bitwise: the adapter files
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
    worst_t, worst_tn = 0.0, ""
    for k in ta:
        scale = max(abs(x) for x in tb[k]) if len(tb[k]) else 0.0
        d = max((rel(x, y, scale) for x, y in zip(ta[k], tb[k])), default=0.0)
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
    worst_m, worst_mk = 0.0, ""
    exact = True
    for s in steps:
        for k in KEYS:
            x, y = ma[s].get(k), mb[s].get(k)
            if x is None or y is None:
                continue
            exact = exact and x == y
            d = rel(x, y, abs(y))
            if d > worst_m:
                worst_m, worst_mk = d, "%s@%d" % (k, s)
    same_bytes = raw_a == raw_b
    summary = "%d steps: metrics max rel diff %.3g (%s), adapters (%d tensors, %d lora_B trained) max rel diff %.3g (%s), files %s" % (
        len(steps), worst_m, worst_mk or "-", len(ta), trained, worst_t, worst_tn or "-",
        "byte-identical" if same_bytes else "differ")
    ok = (same_bytes and exact) if o.bitwise else (worst_m <= o.tol and worst_t <= o.tol)
    print(("PASS: " if ok else "FAIL: ") + summary + ("" if o.bitwise else " (tol %g)" % o.tol))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
