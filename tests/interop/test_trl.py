#!/usr/bin/env python3
"""The objective end to end: TRL's DPOTrainer (the pinned TRL) and dpo_dist on the same tiny
model, rows, hyper-parameters and starting adapter.

1. Tokenization: TRL's own DPOTrainer._prepare_dataset on text and conversational rows
   (Llama 3.1 and Qwen 3's real tokenizer.json + chat template, and the suite's tokenizer)
   vs dpo_preprocess's ids: equal. Where dpo_preprocess deliberately differs (it encodes
   prompt and answer separately, TRL 1.x the joined text), the difference is pinned.
2. Every loss_type this TRL offers (read from DPOTrainer's source) and one weighted mixture:
   step 1's loss and every metric both log <= 1e-5 relative (the log-prob bound of
   test_transformers.py: the metrics are means of those log-probs and of smooth functions of
   them); the logged losses of all 10 steps and the adapters after 10 AdamW steps
   <= 1e-3 relative (per tensor, Frobenius; the issue's bound: 10 steps of Adam amplify
   fp32 rounding of the gradients). Also with precompute_ref_log_probs, with gradient
   accumulation, on conversational rows, and QLoRA (an NF4 base quantized on load by
   transformers + bitsandbytes and by dpo_dist).
3. The SFT stage against SFTTrainer (prompt/completion rows, completion-only loss): step 1's
   loss and mean_token_accuracy <= 1e-5, 10 steps' losses and adapters <= 1e-3.
The starting adapter: dpo_dist draws its LoRA A from --seed (B = 0) and has no option to
read an adapter file; its initial adapter (a --learning_rate 0 step leaves it unchanged) is
loaded into peft and written again by peft's save_pretrained; TRL starts from that file, and
the suite checks it equals dpo_dist's start bit for bit.
"""
import inspect
import json
import logging
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

STEP1_BOUND = 1e-5
TRAJ_BOUND = 1e-3
STEPS = 10
METRICS = ["loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"]
TRL_ONLY = ["entropy", "mean_token_accuracy", "num_tokens"]  # not logged by dpo_dist (docs/objective.md)

# Rows whose prompt ends on a token boundary (no trailing space; answers start with a space
# or a newline): TRL 1.x tokenizes prompt + answer joined, dpo_preprocess separately.
TEXT_ROWS = [
    {"prompt": "Question: what is two plus two?\n\nAnswer:", "chosen": " four.", "rejected": " The quick brown fox."},
    {"prompt": "Name the capital of France.", "chosen": " Paris is the capital of France.",
     "rejected": " I cannot help with that, but here is a poem about the sea."},
    {"prompt": "Write a number.", "chosen": " 42", "rejected": " Numbers: 1 2 3 10 42 2026, and a few words."},
    {"prompt": "User: name a colour.\nAssistant:", "chosen": " Blue.", "rejected": " le chat est noir."},
    {"prompt": "The lazy dog", "chosen": " jumps over the quick brown fox.", "rejected": " is lazy."},
    {"prompt": "Rome is", "chosen": " the capital of Italy.", "rejected": " a number: 10."},
]
CHAT_ROWS = [
    {"prompt": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Lyon."}]},
    {"prompt": [{"role": "user", "content": "Name a colour."}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "I cannot help with that."}]},
    {"prompt": [{"role": "user", "content": "def add(a, b):"}],
     "chosen": [{"role": "assistant", "content": "return a + b"}],
     "rejected": [{"role": "assistant", "content": "le chat est noir"}]},
]
# TRL's implicit prompt: whole conversations, the prompt is their common first messages.
IMPLICIT_ROWS = [
    {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}],
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "The quick brown fox."}]},
    {"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Go away."}]},
]
# A boundary merge: "Answer: " + "four" is " four" joined, " " + "four" apart.
MERGE_ROW = {"prompt": "Question: what is two plus two?\n\nAnswer: ", "chosen": "four.", "rejected": "five."}

# TRL's configs default to bf16=True (autocast, also on the CPU): the comparison is in fp32.
FP32 = dict(bf16=False, fp16=False)
HYPER = dict(beta=0.1, learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.01,
             adam_beta1=0.85, adam_beta2=0.99, adam_epsilon=1e-7, max_grad_norm=0.5)
# SFT learns fast enough in 10 steps that mean_token_accuracy leaves 0
SFT_HYPER = dict({k: v for k, v in HYPER.items() if k != "beta"}, learning_rate=5e-2)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-8)


def quiet():
    import datasets
    datasets.disable_progress_bars()
    for name in ("trl", "transformers", "datasets", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings
    warnings.filterwarnings("ignore")


def trl_loss_types():
    from trl import DPOTrainer
    src = inspect.getsource(DPOTrainer._compute_loss)
    return sorted(set(re.findall(r'loss_type == "(\w+)"', src)))


def dpo_loss_types():
    p = ic.run_tool("dpo_dist", "--help")
    m = re.search(r"--loss_type S\s+(\S+)", p.stdout)
    return sorted(m.group(1).split(",")[0].split("|")) if m else []


class Recorder:
    def __init__(self):
        from transformers import TrainerCallback

        class CB(TrainerCallback):
            def on_log(cb, args, state, control, logs=None, **kw):  # noqa: N805
                if logs and "loss" in logs:
                    self.logs.append(dict(logs))
        self.logs = []
        self.cb = CB()


def trl_prepare(rows, tok, chat_kwargs=None):
    """TRL's own tokenization (DPOTrainer._prepare_dataset) of rows."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    if chat_kwargs:
        rows = [dict(r, chat_template_kwargs=chat_kwargs) for r in rows]

    class Owner:  # what _prepare_dataset reads from the trainer
        _tokenizer = tok
    args = DPOConfig(output_dir="/tmp/unused", report_to="none", use_cpu=True)
    ds = DPOTrainer._prepare_dataset(Owner(), Dataset.from_list(rows), tok, args, "train")
    return [(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in ds]


def main():
    quiet()
    import peft
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    chk = ic.Checks("test_trl")
    work = ic.work_dir("trl")

    # ---- 1. tokenization ------------------------------------------------------------------
    fixtures = os.environ.get("DPO_TOKENIZER_DIR", "")
    for name, rows, kw in (("llama3_1", TEXT_ROWS, None), ("llama3_1", CHAT_ROWS, None),
                           ("llama3_1", IMPLICIT_ROWS, None), ("qwen3", CHAT_ROWS, {"enable_thinking": False}),
                           ("qwen3", IMPLICIT_ROWS, {"enable_thinking": False}), ("qwen3", CHAT_ROWS, None),
                           ("qwen3", TEXT_ROWS, None)):
        tdir = os.path.join(fixtures, f"tokenizer-{name}", "models")
        if not os.path.exists(os.path.join(tdir, "tokenizer.json")):
            chk.truth(f"tokenizer fixture {tdir}", False, "missing: set DPO_TOKENIZER_DIR to <build>/fixtures/tokenizers")
            continue
        kind = ("text" if not isinstance(rows[0]["chosen"], list) else "chat" if "prompt" in rows[0]
                else "implicit-prompt chat") + (f" {json.dumps(kw)}" if kw else "")
        tok = AutoTokenizer.from_pretrained(tdir)
        want = trl_prepare(rows, tok, kw)
        extra = ["--chat_template_kwargs", json.dumps(kw)] if kw else []
        h5 = ic.preprocess(work, tdir, rows, f"tok_{name}_{len(os.listdir(work))}", *extra)
        got = ic.h5_examples(h5)
        ndiff = sum(g != w for g, w in zip(got, want)) + abs(len(got) - len(want))
        chk.check(f"{name} {kind} rows: examples whose (prompt, chosen, rejected) ids differ, dpo_preprocess vs "
                  f"TRL's _prepare_dataset", ndiff, 0, "tokenization")
        if ndiff:
            for g, w in zip(got, want):
                if g != w:
                    print(f"    dpo_preprocess {g}\n    TRL            {w}")
                    break

    # ---- the tiny model, tokenizer, rows ---------------------------------------------------------
    tok_dir = os.path.join(work, "tok")
    tok = ic.make_tokenizer(tok_dir)
    base = os.path.join(work, "base")
    # intermediate 128: bitsandbytes' CPU dequantize_4bit is wrong for in_features 96
    # (test_bitsandbytes.py), which the QLoRA run below would otherwise meet in down_proj
    ic.tiny_model("llama", base, len(tok), seed=21, intermediate_size=128)
    ic.copy_tokenizer(tok_dir, base)
    shutil.copy(os.path.join(tok_dir, "chat_template.jinja"), base)
    data = {}
    for kind, rows in (("text", TEXT_ROWS), ("chat", CHAT_ROWS)):
        h5 = ic.preprocess(work, tok_dir, rows, "train_" + kind)
        got, want = ic.h5_examples(h5), trl_prepare(rows, tok)
        chk.equal(f"suite tokenizer {kind} rows: dpo_preprocess ids vs TRL's", got, want)
        data[kind] = (rows, h5)

    # the pinned difference: a prompt ending inside a token
    h5 = ic.preprocess(work, tok_dir, [MERGE_ROW], "merge")
    (gp, gc, gr), = ic.h5_examples(h5)
    (tp, tc, tr), = trl_prepare([MERGE_ROW], tok)
    same_text = tok.decode(gp + gc) == tok.decode(tp + tc)
    chk.truth("pinned: a prompt ending in a space (\"Answer: \" + \"four.\"): dpo_preprocess encodes prompt and "
              "answer apart (INTERFACES.md), TRL 1.x the joined text and cuts at the common prefix: other ids, "
              "same text", gp + gc != tp + tc and same_text, f"dpo {gp[-2:]}|{gc[:2]} vs TRL {tp[-2:]}|{tc[:2]}")

    # ---- the starting adapter --------------------------------------------------------------
    text_rows, text_h5 = data["text"]
    n = len(text_rows)
    dpo_init = os.path.join(work, "dpo_init")
    common = ["--model_name_or_path", base, "--lora_r", LORA["r"],
              "--lora_alpha", LORA["lora_alpha"], "--lora_dropout", 0, "--lora_target_modules",
              ",".join(LORA["target_modules"]), "--seed", 7, "--save_steps", 0, "--logging_steps", 1]
    ic.run_tool("dpo_dist", *common, "--load_in_4bit", "false", "--train_file", text_h5, "--output_dir", dpo_init,
                "--max_steps", 1,
                "--learning_rate", 0, "--per_device_train_batch_size", n)
    m, _ = ic.load_hf(base)
    pm = peft.PeftModel.from_pretrained(m, dpo_init)
    start = os.path.join(work, "start_adapter")
    pm.save_pretrained(start)
    a, b = load_file(os.path.join(start, "adapter_model.safetensors")), load_file(
        os.path.join(dpo_init, "adapter_model.safetensors"))
    chk.truth("the peft-written starting adapter equals dpo_dist's start (--seed 7) bit for bit",
              sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f"{len(a)} tensors")

    # mean |logit| over the answer positions of the rows (the floor of logits/* above)
    with torch.no_grad():
        zs = [ic.hf_logits(m, p + c)[len(p) - 1:-1].abs().mean().item() for p, c, _ in ic.h5_examples(text_h5)]
    logit_scale = sum(zs) / len(zs)
    print(f"mean |logit| over the answer positions: {logit_scale:.3f}")

    def run_trl(label, rows, loss_type, weights=None, precompute=False, batch=None, accum=1, nf4=False, **over):
        if nf4:  # QLoRA: transformers + bitsandbytes quantize the base on load (training mode: fp32 path)
            from transformers import BitsAndBytesConfig
            m, _ = ic.load_hf(base, device_map="cpu", quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
            # bitsandbytes' AVX512-BF16 CPU kernel (no-grad forwards: the reference pass) is bf16;
            # its fp32 path is what dpo_dist computes (test_bitsandbytes.py)
            for mod in m.modules():
                if type(mod).__name__ == "Linear4bit":
                    mod.support_avx512bf16_for_cpu = False
        else:
            m, _ = ic.load_hf(base)
        pm = peft.PeftModel.from_pretrained(m, start, is_trainable=True)
        start_values = {k: p.detach().clone() for k, p in pm.named_parameters() if p.requires_grad}
        rec = Recorder()
        args = DPOConfig(output_dir=os.path.join(work, "trl_" + label), per_device_train_batch_size=batch or n,
                         gradient_accumulation_steps=accum, max_steps=STEPS, logging_steps=1, report_to="none",
                         use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, loss_type=loss_type,
                         loss_weights=weights, precompute_ref_log_probs=precompute, dataloader_drop_last=False,
                         **FP32, **HYPER, **over)
        tr = DPOTrainer(model=pm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                        callbacks=[rec.cb])
        tr.remove_callback(PrinterCallback)
        if nf4:
            # TRL 1.16 rounds a quantized model's LoRA weights to bf16 (QLoRA paper's advice), whatever
            # args.bf16 says; dpo_dist keeps them fp32: the exact fp32 start is put back before the
            # optimizer is made (PINNED)
            for k, p in tr.model.named_parameters():
                if k in start_values:
                    p.data = start_values[k].clone()
        tr.train()
        return rec.logs, {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(tr.model).items()}

    def run_dpo(label, h5, loss_type, weights=None, precompute=False, batch=None, accum=1, stage="dpo", nf4=False,
                **over):
        out = os.path.join(work, "dpo_" + label)
        if precompute:  # dpo_dist writes /ref_logps into the file
            h5c = os.path.join(work, label + ".h5")
            shutil.copy(h5, h5c)
            h5 = h5c
        opts = dict(HYPER if stage == "dpo" else {}, **over)
        args = [f"--{k}={v}" for k, v in opts.items()]
        if stage == "dpo":
            args += ["--loss_type", ",".join(loss_type)]
            if weights:
                args += ["--loss_weights", ",".join(str(w) for w in weights)]
        ic.run_tool("dpo_dist", *common, "--load_in_4bit", str(nf4).lower(), "--train_file", h5, "--output_dir", out,
                    "--max_steps", STEPS,
                    "--per_device_train_batch_size", batch or n, "--gradient_accumulation_steps", accum,
                    "--stage", stage, "--precompute_ref_log_probs", str(precompute).lower(), *args)
        logs = [r for r in ic.read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in r]
        return logs, load_file(os.path.join(out, "adapter_model.safetensors"))

    def compare(label, trl, dpo, metrics=METRICS, pinned=(), steps_only=False):
        tlogs, tsd = trl
        dlogs, dsd = dpo
        chk.equal(f"{label}: logged steps", len(dlogs), len(tlogs))
        if not tlogs or not dlogs:
            return
        t1, d1 = tlogs[0], dlogs[0]
        # rewards are beta x differences of log-probs: their error is measured against the size of
        # those log-probs (at step 1 from B = 0 they are 0 up to rounding of the reference pass)
        rscale = HYPER["beta"] * (abs(t1.get("logps/chosen", 0)) + abs(t1.get("logps/rejected", 0)))
        floors = {k: rscale for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")}
        # logits/* are means over V of logits of size ~logit_scale that cancel to ~1e-3: their
        # rounding is measured against the size of the logits summed, not of their mean
        floors.update({k: logit_scale for k in ("logits/chosen", "logits/rejected")})
        worst, where = 0.0, ""
        for k in metrics:
            if k in pinned:
                continue
            if k not in d1 or k not in t1:
                chk.truth(f"{label}: step-1 metric {k} logged by both", False,
                          f"TRL {'has' if k in t1 else 'lacks'} it, dpo_dist {'has' if k in d1 else 'lacks'} it")
                continue
            if k == "rewards/accuracies" and abs(t1.get("rewards/margins", 1.0)) < 1e-3:
                continue  # margins ~ 0 (policy = reference): a count of signs of rounding noise
            e = abs(d1[k] - t1[k]) / max(abs(d1[k]), abs(t1[k]), floors.get(k, 1e-8))
            if e > worst:
                worst, where = e, f"{k}: dpo_dist {d1[k]:.9g}, TRL {t1[k]:.9g}"
        chk.check(f"{label}: step 1, loss and every shared metric (rel; worst {where or '-'})", worst, STEP1_BOUND,
                  "step 1")
        if os.environ.get("DPO_INTEROP_DEBUG"):
            for i, (d, t) in enumerate(zip(dlogs, tlogs)):
                print(f"  step {i + 1}: " + "  ".join(f"{k} {d.get(k, float('nan')):.7g}/{t.get(k, float('nan')):.7g}"
                                                    for k in metrics))
        if steps_only:
            return
        losses = max(rel(d["loss"], t["loss"]) for d, t in zip(dlogs, tlogs))
        chk.check(f"{label}: logged loss of all {len(tlogs)} steps (rel)", losses, TRAJ_BOUND, "10 steps")
        worst, where = 0.0, ""
        for i, (d, t) in enumerate(zip(dlogs, tlogs)):
            for k in metrics:
                if k in pinned or k not in d or k not in t or k == "rewards/accuracies":
                    continue
                e = abs(d[k] - t[k]) / max(abs(d[k]), abs(t[k]), floors.get(k, 1e-8))
                if e > worst:
                    worst, where = e, f"step {i + 1} {k}: dpo_dist {d[k]:.9g}, TRL {t[k]:.9g}"
        chk.check(f"{label}: every shared metric of all {len(tlogs)} steps (rel; worst {where or '-'})", worst,
                  TRAJ_BOUND, "10 steps")
        if "rewards/accuracies" in metrics and "rewards/accuracies" not in pinned:
            chk.check(f"{label}: rewards/accuracies at step {len(tlogs)} (rel; TRL's is an fp32 mean)",
                      rel(dlogs[-1]["rewards/accuracies"], tlogs[-1]["rewards/accuracies"]), STEP1_BOUND, "step 1")
        worst, where = 0.0, ""
        for k, v in tsd.items():
            if k not in dsd:
                chk.truth(f"{label}: adapter key {k} in dpo_dist's adapter", False)
                continue
            e = ((dsd[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-30)).item()
            if e > worst:
                worst, where = e, k
        chk.check(f"{label}: adapters after {STEPS} steps, per tensor (rel Frobenius; worst {where})", worst,
                  TRAJ_BOUND, "10 steps")

    # ---- 2. every loss type ----------------------------------------------------------------------
    trl_types, dpo_types = trl_loss_types(), dpo_loss_types()
    chk.equal("loss types TRL offers that dpo_dist lacks", sorted(set(trl_types) - set(dpo_types)), [],
              f"TRL: {','.join(trl_types)}")
    special = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.1)}
    only = os.environ.get("DPO_INTEROP_TRL_ONLY")
    for lt in trl_types:
        if only and lt not in only.split(","):
            continue
        over = special.get(lt, {})
        pinned, steps_only = (), False
        if lt == "ipo":
            # dpo_dist's ipo alone averages log-probs by length before the loss (TRL 0.x), so its
            # rewards and logps metrics are per token (docs/objective.md); the loss is the same
            pinned = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
            print(f"PINNED ipo: {', '.join(pinned)} are per-token in dpo_dist, summed in TRL {__import__('trl').__version__}")
        if lt == "bco_pair":
            # dpo_dist keeps BCO's running reward mean (TRL <= 0.29); TRL 1.x has none: equal at step 1 only
            steps_only = True
            print("PINNED bco_pair: from step 2 dpo_dist shifts by the running reward mean (TRL <= 0.29), TRL 1.x "
                  "does not; step 1 (mean 0) compared")
        compare(f"loss_type {lt}", run_trl(lt, text_rows, [lt], **over), run_dpo(lt, text_h5, [lt], **over),
                pinned=pinned, steps_only=steps_only)
    mix, w = ["sigmoid", "sigmoid_norm", "sft"], [0.8, 0.2, 1.0]
    compare("mixture sigmoid,sigmoid_norm,sft (0.8, 0.2, 1.0)", run_trl("mix", text_rows, mix, w),
            run_dpo("mix", text_h5, mix, w))
    print("PINNED metrics TRL logs and dpo_dist does not: " + ", ".join(TRL_ONLY))

    # precompute_ref_log_probs, gradient accumulation (micro-batches drawn in another order:
    # logits/* are token-weighted per micro-batch in TRL, so they are left out), chat rows
    compare("sigmoid, precompute_ref_log_probs", run_trl("pre", text_rows, ["sigmoid"], precompute=True),
            run_dpo("pre", text_h5, ["sigmoid"], precompute=True))
    compare("sigmoid, 2 micro-batches of 3 accumulated", run_trl("acc", text_rows, ["sigmoid"], batch=n // 2, accum=2),
            run_dpo("acc", text_h5, ["sigmoid"], batch=n // 2, accum=2),
            metrics=[k for k in METRICS if not k.startswith("logits/")])
    print("PINNED QLoRA: TRL 1.16's DPOTrainer rounds a quantized model's LoRA weights to bf16 (dpo_dist keeps fp32 "
          "on the CPU); the suite puts the exact fp32 start back to compare the NF4 path")
    compare("sigmoid, QLoRA (NF4 base quantized on load by bitsandbytes / dpo_dist)",
            run_trl("nf4", text_rows, ["sigmoid"], nf4=True), run_dpo("nf4", text_h5, ["sigmoid"], nf4=True))
    chat_rows, chat_h5 = data["chat"]
    nc = len(chat_rows)
    compare("sigmoid, conversational rows", run_trl("chat", chat_rows, ["sigmoid"], batch=nc),
            run_dpo("chat", chat_h5, ["sigmoid"], batch=nc))

    # ---- 3. SFT ---------------------------------------------------------------------------------
    m, _ = ic.load_hf(base)
    pm = peft.PeftModel.from_pretrained(m, start, is_trainable=True)
    rec = Recorder()
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in text_rows]
    args = SFTConfig(output_dir=os.path.join(work, "trl_sft"), per_device_train_batch_size=n, max_steps=STEPS,
                     logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                     completion_only_loss=True, **FP32, **SFT_HYPER)
    tr = SFTTrainer(model=pm, args=args, train_dataset=Dataset.from_list(sft_rows), processing_class=tok,
                    callbacks=[rec.cb])
    tr.remove_callback(PrinterCallback)
    sft_ids = [(list(r["input_ids"]), [int(x != -100) for x in r["labels"]]) for r in tr.train_dataset] \
        if "labels" in tr.train_dataset.column_names else \
        [(list(r["input_ids"]), list(r["completion_mask"])) for r in tr.train_dataset]
    want_ids = [(p + c, [0] * len(p) + [1] * len(c)) for p, c, _ in ic.h5_examples(text_h5)]
    chk.equal("SFT: SFTTrainer's input_ids and completion (loss) mask vs dpo_preprocess's prompt + chosen", sft_ids,
              want_ids)
    tr.train()
    tsd = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(tr.model).items()}
    dpo = run_dpo("sft_stage", text_h5, None, stage="sft", **SFT_HYPER)
    compare("SFT stage vs SFTTrainer", (rec.logs, tsd), dpo, metrics=["loss", "grad_norm", "learning_rate",
                                                                       "mean_token_accuracy"])
    chk.finish()


if __name__ == "__main__":
    main()
