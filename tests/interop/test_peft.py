#!/usr/bin/env python3
"""dpo_dist's LoRA adapters against peft.

1. Adapters trained by dpo_dist (plain q/v, use_rslora on all-linear, modules_to_save on an
   untied Llama and on a tied Qwen2) load with PeftModel.from_pretrained: every tensor of
   the file is taken (get_peft_model_state_dict gives the file back exactly), the scaling
   is alpha/r (alpha/sqrt(r)), and transformers + peft give dpo_score --adapter's
   log-probs (<= 1e-5 relative, the bound of test_transformers.py).
2. dpo_merge equals merge_and_unload(): every tensor <= 1e-6 relative (max |a - b| / max |b|:
   W + s B A in fp32, summed in another order, errs by a few ulp of max|W|); the merged
   directory loads in from_pretrained and its forward gives the unmerged PeftModel's
   log-probs; a bf16 + sharded merge differs from merge_and_unload().to(bf16) only where
   the fp32 sums round across a bf16 rounding boundary (at most 1 bf16 ulp).
3. Adapters written by peft (get_peft_model + save_pretrained, random B) are accepted by
   dpo_score --adapter and dpo_merge with the same numbers.
dpo_dist has no option to start training from an existing adapter file (its adapters
start from --seed); this is printed as NOT CHECKED.
"""
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

LOGPS_BOUND = 1e-5
MERGE_BOUND = 1e-6
SENSITIVE = 1e-3

# Found by this suite and fixed (2026-12-07, docs/interop.md): a tied model with
# --modules_to_save naming one table now records both keys (core/modules_to_save.h
# modules_to_save_recorded), and peft's tied adapter ("model.embed_tokens") is read as
# embed_tokens. Both runs below check them as plain checks.


def rel_tensor(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def main():
    import peft
    chk = ic.Checks("test_peft")
    work = ic.work_dir("peft")
    tok_dir = os.path.join(work, "tok")
    V = len(ic.make_tokenizer(tok_dir))
    h5 = ic.preprocess(work, tok_dir, ic.ROWS)
    ex = ic.h5_examples(h5)

    bases = {}
    for name, arch, over in (("llama", "llama", {}), ("qwen2_tied", "qwen2", {"tie_word_embeddings": True})):
        d = os.path.join(work, name)
        ic.tiny_model(arch, d, V, seed=7, **over)
        ic.copy_tokenizer(tok_dir, d)
        bases[name] = d
    base_logps = {n: ic.hf_logps(ic.load_hf(d)[0], ex) for n, d in bases.items()}

    def check_adapter(label, base, adir, r, alpha, rslora):
        """PeftModel.from_pretrained(adir) vs dpo_score --adapter adir, and dpo_merge vs merge_and_unload."""
        m, _ = ic.load_hf(bases[base])
        pm = peft.PeftModel.from_pretrained(m, adir)
        pm.eval()
        file_sd = load_file(os.path.join(adir, "adapter_model.safetensors"))
        peft_sd = peft.get_peft_model_state_dict(pm)
        chk.equal(f"{label}: the adapter's keys as peft loads them", sorted(peft_sd), sorted(file_sd))
        worst = max((rel_tensor(peft_sd[k], file_sd[k]) for k in file_sd if k in peft_sd), default=float("nan"))
        chk.check(f"{label}: peft's loaded tensors vs the file", worst, 0.0)
        want_s = alpha / (r ** 0.5 if rslora else r)
        scal = {mod.scaling["default"] for mod in pm.modules() if isinstance(mod, peft.tuners.lora.LoraLayer)}
        chk.equal(f"{label}: peft's scaling", sorted(scal), [want_s])
        want = ic.hf_logps(pm, ex)
        got = ic.score(bases[base], h5, work, label, "--load_in_4bit", "false", "--adapter", adir)
        chk.check(f"{label}: dpo_score --adapter vs transformers + peft logps (rel)", ic.max_rel(got, want),
                  LOGPS_BOUND, "logps")
        chk.above(f"{label}: the adapter is visible (peft logps vs the base's, rel)", ic.max_rel(want, base_logps[base]),
                  SENSITIVE)

        # dpo_merge (fp32, one file) vs merge_and_unload()
        merged = copy.deepcopy(pm).merge_and_unload()
        msd = {k: v for k, v in merged.state_dict().items()}
        out = os.path.join(work, label + ".merged")
        ic.run_tool("dpo_merge", "--model_name_or_path", bases[base], "--adapter", adir, "--output_dir", out,
                    "--load_in_4bit", "false", "--torch_dtype", "float32")
        dm, info = ic.load_hf(out)
        chk.equal(f"{label}: dpo_merge's model in from_pretrained: missing/unexpected keys",
                  sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]), [])
        dsd = dm.state_dict()
        worst, where = 0.0, ""
        for k, v in msd.items():
            e = rel_tensor(dsd[k], v)
            if e > worst:
                worst, where = e, k
        chk.check(f"{label}: dpo_merge vs merge_and_unload, every tensor (rel to its max; worst {where or '-'})",
                  worst, MERGE_BOUND, "merge")
        chk.check(f"{label}: transformers on dpo_merge's model vs the unmerged PeftModel, logps (rel)",
                  ic.max_rel(ic.hf_logps(dm, ex), want), LOGPS_BOUND, "logps")
        return pm, msd

    # ---- 1 + 2: adapters trained by dpo_dist -------------------------------------------
    # (label, base, r, alpha, rslora, options, known bug or None)
    runs = [
        ("dpo_dist plain", "llama", 4, 8, False, ["--lora_target_modules", "q_proj,v_proj"], None),
        ("dpo_dist rslora", "llama", 4, 8, True, ["--lora_target_modules", "all-linear", "--use_rslora"], None),
        ("dpo_dist modules_to_save", "llama", 4, 8, False,
         ["--lora_target_modules", "q_proj,k_proj", "--modules_to_save", "embed_tokens,lm_head"], None),
        ("dpo_dist modules_to_save tied", "qwen2_tied", 4, 8, False,
         ["--lora_target_modules", "q_proj,v_proj,down_proj", "--modules_to_save", "embed_tokens,lm_head"], None),
        ("dpo_dist modules_to_save tied, one name", "qwen2_tied", 4, 8, False,
         ["--lora_target_modules", "q_proj", "--modules_to_save", "embed_tokens"], None),
    ]
    for label, base, r, alpha, rslora, extra, bug in runs:
        out = os.path.join(work, label.replace(" ", "_").replace(",", ""))
        ic.run_tool("dpo_dist", "--model_name_or_path", bases[base], "--train_file", h5, "--output_dir", out,
                    "--max_steps", 3, "--learning_rate", 2e-2, "--lr_scheduler_type", "constant",
                    "--per_device_train_batch_size", 2, "--lora_r", r, "--lora_alpha", alpha, "--lora_dropout", 0,
                    "--save_steps", 0, "--logging_steps", 1, "--seed", 5, *extra)
        try:
            pm, _ = check_adapter(label, base, out, r, alpha, rslora)
            err = None
        except Exception as e:  # noqa: BLE001 (the failure is the finding)
            err = f"{type(e).__name__}: {e}"
        if bug is not None:
            chk.known_bug(f"{label}: PeftModel.from_pretrained loads it", err is None, f"{bug} (here: {err})")
            continue
        if err is not None:
            chk.truth(f"{label}: PeftModel.from_pretrained and the checks ran", False, err)
            continue
        if "tied" in label:
            with open(os.path.join(out, "adapter_config.json")) as f:
                cfg = json.load(f)
            chk.equal(f"{label}: adapter_config ensure_weight_tying", cfg.get("ensure_weight_tying"), True)
            emb = pm.get_input_embeddings().weight
            head = pm.get_output_embeddings().weight
            chk.check(f"{label}: peft keeps the trained table tied (|embed - lm_head|)",
                      (emb - head).abs().max().item(), 0.0)

    # bf16 + sharded merge of the rslora adapter: loads, and differs from
    # merge_and_unload().to(bf16) by at most one bf16 ulp where fp32 sums round differently.
    adir = os.path.join(work, "dpo_dist_rslora")
    m, _ = ic.load_hf(bases["llama"])
    ref = peft.PeftModel.from_pretrained(m, adir).merge_and_unload().to(torch.bfloat16).state_dict()
    out = os.path.join(work, "merged_bf16_sharded")
    ic.run_tool("dpo_merge", "--model_name_or_path", bases["llama"], "--adapter", adir, "--output_dir", out,
                "--load_in_4bit", "false", "--torch_dtype", "bfloat16", "--max_shard_size", "40KB")
    shards = [f for f in os.listdir(out) if f.startswith("model-0")]
    chk.truth("bf16 merge: several shards + index", len(shards) >= 3 and
              os.path.exists(os.path.join(out, "model.safetensors.index.json")), f"{len(shards)} shards")
    import transformers as tf
    bm, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    chk.equal("bf16 merge: from_pretrained dtype", str(bm.dtype), "torch.bfloat16")
    chk.equal("bf16 merge: missing/unexpected keys", sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]), [])
    bsd = bm.state_dict()
    ulps, ndiff, n = 0.0, 0, 0
    for k, v in ref.items():
        a, b = bsd[k].float(), v.float()
        ulp = torch.where(b == 0, torch.full_like(b, 2.0 ** -133), 2.0 ** (torch.floor(torch.log2(b.abs())) - 7))
        ulps = max(ulps, ((a - b).abs() / ulp).max().item())
        ndiff += int((a != b).sum())
        n += b.numel()
    chk.check(f"bf16 merge vs merge_and_unload().to(bf16): bf16 ulps ({ndiff} of {n} values differ)", ulps, 1.0)

    # ---- 3: adapters written by peft ------------------------------------------------------
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_cases = [
        ("peft plain", "llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), None),
        # what "all-linear" becomes in adapter_config.json on a model with >= 20 projections
        ("peft rslora", "llama", dict(r=8, lora_alpha=16, target_modules=seven, use_rslora=True), None),
        ("peft modules_to_save", "llama", dict(r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"],
                                               modules_to_save=["embed_tokens", "lm_head"]), None),
        ("peft modules_to_save tied", "qwen2_tied", dict(r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj"],
                                                         modules_to_save=["embed_tokens"], ensure_weight_tying=True),
         None),
    ]
    for label, base, kw, bug in peft_cases:
        m, _ = ic.load_hf(bases[base])
        torch.manual_seed(11)
        pm = peft.get_peft_model(m, peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0,
                                                    init_lora_weights=False, **kw))
        g = torch.Generator().manual_seed(12)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        out = os.path.join(work, label.replace(" ", "_"))
        pm.save_pretrained(out)
        try:
            check_adapter(label, base, out, kw["r"], kw["lora_alpha"], kw.get("use_rslora", False))
            err = None
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {e}"
        if bug is not None:
            chk.known_bug(f"{label}: dpo_score --adapter accepts it", err is None, f"{bug} (here: {err})")
        elif err is not None:
            chk.truth(f"{label}: dpo_score / dpo_merge accept peft's adapter", False, err)

    # peft keeps full module paths in target_modules when fewer than 20 modules are targeted
    # (here: all-linear on 2 layers = 14): PEFT matches them as suffixes of module names;
    # dpo_dist takes projection types only and must refuse such a file clearly.
    m, _ = ic.load_hf(bases["llama"])
    pm = peft.get_peft_model(m, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    out = os.path.join(work, "peft_full_paths")
    pm.save_pretrained(out)
    with open(os.path.join(out, "adapter_config.json")) as f:
        tm = json.load(f)["target_modules"]
    p = ic.run_tool("dpo_score", "--model_name_or_path", bases["llama"], "--data", h5, "--adapter", out,
                    "--output", os.path.join(work, "x.jsonl"), "--load_in_4bit", "false", check=False)
    chk.truth("peft target_modules as full module paths (peft's all-linear on < 20 modules): dpo_score refuses "
              "naming the module", p.returncode != 0 and "is unknown" in p.stdout and any(t in p.stdout for t in tm),
              p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "")

    chk.cannot("a peft-written adapter as dpo_dist's starting adapter",
               "dpo_dist has no option to start training from an adapter file (adapters start from --seed; "
               "--resume_from_checkpoint takes only its own checkpoints)")
    chk.finish()


if __name__ == "__main__":
    main()
