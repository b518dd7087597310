#!/usr/bin/env python3
"""Floating-point tolerances for the end-to-end scripts: the derivations of tests/fp_bounds.h
and tests/tiny_llama.h (read those for the reasoning), for runs of a model given by its
config.json. Never one machine's rounding: every number follows from the model's shape,
the step count and the learning rate.

  fp_bounds.py loss_tolerance CONFIG T STEP
      relative tolerance (of max(1, |loss|)) of step STEP's logged metrics between two runs
      whose evaluations differ only in the order of their sums (ranks, micro-batches)
  fp_bounds.py adapter_tolerance CONFIG T STEPS LR
      absolute tolerance of the trained adapter's entries between two such runs
"""
import json
import math
import sys

U32 = 2.0 ** -24  # fp32 unit roundoff
EXP_ULPS = 20     # the least accurate exp among the CPU kernels (ATen's exp_u20)


def gamma(k, u=U32):
    """k u / (1 - k u): the relative error of k roundings in a row (Higham, Lemma 3.1)."""
    ku = k * u
    if ku >= 1:
        raise ValueError("gamma: k u >= 1 for k = %g" % k)
    return ku / (1 - ku)


def llama_forward_roundings(layers, C, H, D, F, T):
    """The longest chain of dependent roundings of a Llama forward (tests/fp_bounds.h)."""
    layer = ((C + 4) + (C + 1) + (D + 4) + 3 + (D + 2) + (2 * EXP_ULPS + 2 * T + 4) + T + (H * D + 1) + 1 +
             (C + 4) + (C + 1) + (2 * EXP_ULPS + 5) + (F + 1) + 1)
    return layers * layer + (C + 4) + C


def llama_rel_tolerance(cfg, T, grads=False, extra=0.0):
    """2 gamma(N) (2N for gradients): two fp32 evaluations, relative to the largest entry."""
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    D = cfg.get("head_dim") or C // H
    n = llama_forward_roundings(cfg["num_hidden_layers"], C, H, D, cfg["intermediate_size"], T)
    return 2 * gamma((2 * n if grads else n) + extra)


def run_rel_tolerance(tau, step):
    """Step k's metrics after k - 1 AdamW updates of gradients within tau: (2k - 1) tau."""
    return (2 * step - 1) * tau


def adam_ratio(beta1=0.9, beta2=0.999):
    """|m^ / sqrt(v^)| <= max(1, (1 - beta1) / sqrt(1 - beta2)) (Kingma & Ba, section 2.1)."""
    return max(1.0, (1 - beta1) / math.sqrt(1 - beta2))


def adapter_tolerance(cfg, T, steps, lr, beta1=0.9, beta2=0.999):
    """Each AdamW update lr m^ / (sqrt(v^) + eps) moves by <= 2 tau_g relative when the
    gradients move by tau_g (m^ and sqrt(v^) each), i.e. by <= lr ratio 2 tau_g per entry:
    summed over the steps (lr <= its peak at every step)."""
    tau_g = llama_rel_tolerance(cfg, T, grads=True)
    return steps * lr * adam_ratio(beta1, beta2) * 2 * tau_g


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    what, cfg = argv[1], json.load(open(argv[2]))
    T = int(argv[3])
    if what == "loss_tolerance":
        print("%.6g" % run_rel_tolerance(llama_rel_tolerance(cfg, T, grads=True), int(argv[4])))
    elif what == "adapter_tolerance":
        print("%.6g" % adapter_tolerance(cfg, T, int(argv[4]), float(argv[5])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
