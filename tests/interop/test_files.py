#!/usr/bin/env python3
"""Files dpo_dist writes that users hand to Hugging Face tools.

1. trainer_state.json (the run's and every checkpoint's) loads with transformers'
   TrainerState.load_from_json (which takes no unknown key), has the step, epoch and
   max_steps of the run, and its log_history is metrics.jsonl (train and eval events).
2. training_args.json: every key is a name of TrainingArguments / DPOConfig / SFTConfig
   (TRL), of TRL's ModelConfig, of peft's LoraConfig or of transformers'
   BitsAndBytesConfig, or one of dpo_dist's own options listed below with the reason it has
   no Hugging Face counterpart; and the values given to TRL's own argument parser
   (HfArgumentParser((DPOConfig, ModelConfig)), as a command line) parse to the same values.
3. TensorBoard event files: the tensorboard package is not in the pinned environment
   (scripts/python/requirements.lock), so its reader cannot run here (printed NOT CHECKED);
   the file is read by the TFRecord framing (masked CRC-32C of every length and record) and
   the Event / Summary protobuf fields tensorboard's reader uses, and its scalars are
   metrics.jsonl's.
"""
import dataclasses
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402

# dpo_dist options with no Hugging Face name, and why.
DPO_ONLY = {
    "train_file": "pre-tokenized HDF5 (TRL takes a datasets.Dataset, not a file option)",
    "eval_file": "pre-tokenized HDF5 (as train_file)",
    "stage": "one executable for DPO and SFT (TRL: DPOTrainer / SFTTrainer)",
    "device": "cpu|cuda (TrainingArguments.use_cpu is the nearest, a bool)",
    "threads": "compute threads per rank (HF uses OMP_NUM_THREADS)",
    "backend": "dpo_dist's communicator (mpi|nccl|fake); HF's ddp_backend names torch.distributed backends",
    "collective_timeout": "watchdog seconds per step (HF's ddp_timeout is the process-group timeout)",
    "dry_run": "print the plan and exit",
    "progress": "progress line on|off|auto (HF: disable_tqdm, a bool)",
    "prefix_sharing": "dpo_dist's packed [prompt; chosen; rejected] layout",
    "tiled_mlp_tokens": "dpo_dist's MLP tiling",
    "world_size": "recorded, not an option",
    "rpo_alpha": "TRL <= 0.x's DPOConfig.rpo_alpha (removed in TRL 1.x, which uses loss_type sft)",
}
# transformers 4.x TrainingArguments names that transformers 5 dropped (INTERFACES.md keeps them):
# warmup_ratio is now warmup_steps < 1, group_by_length is train_sampling_strategy="group_by_length".
V4_NAMES = {"warmup_ratio", "group_by_length"}


def extra_configs():
    """TRL's configs of the other objectives dpo_dist has (--stage orpo|cpo|kto), where this TRL has them."""
    import trl
    out = []
    for name in ("CPOConfig", "ORPOConfig", "KTOConfig"):
        try:
            out.append(getattr(trl, name))
        except (AttributeError, ImportError):
            try:
                import importlib
                mod = importlib.import_module(f"trl.experimental.{name[:-6].lower()}")
                out.append(getattr(mod, name))
            except (ImportError, AttributeError):
                pass
    return out


def hf_names():
    import inspect

    import peft
    import transformers as tf
    import trl
    names = {}
    for cls in (trl.DPOConfig, trl.SFTConfig, trl.ModelConfig, peft.LoraConfig, *extra_configs()):
        for f in dataclasses.fields(cls):
            names.setdefault(f.name, cls.__name__)
    for p in inspect.signature(tf.BitsAndBytesConfig.__init__).parameters:
        names.setdefault(p, "BitsAndBytesConfig")
    return names


def crc32c(data, _table=[]):
    if not _table:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _table.append(c)
    c = 0xFFFFFFFF
    for b in data:
        c = _table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked(c):
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def fields(buf):
    """(field number, wire type, value) of a protobuf message."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        f, w = key >> 3, key & 7
        if w == 0:
            v, i = varint(buf, i)
        elif w == 1:
            v, i = buf[i:i + 8], i + 8
        elif w == 2:
            n, i = varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif w == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {w}")
        yield f, w, v


def varint(buf, i):
    r = s = 0
    while True:
        b = buf[i]
        i += 1
        r |= (b & 0x7F) << s
        s += 7
        if not b & 0x80:
            return r, i


def read_events(path):
    """[(step, tag, value)] and the number of records whose CRCs failed."""
    out, bad, version = [], 0, None
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        rec = data[i + 12:i + 12 + n]
        (dcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        bad += (masked(crc32c(header)) != hcrc) + (masked(crc32c(rec)) != dcrc)
        i += 16 + n
        step = 0
        for f, w, v in fields(rec):
            if f == 2:
                step = v
            elif f == 3:
                version = v.decode()
            elif f == 5:  # Summary
                for vf, _, vv in fields(v):
                    if vf == 1:  # Summary.Value
                        tag, val = None, None
                        for sf, _, sv in fields(vv):
                            if sf == 1:
                                tag = sv.decode()
                            elif sf == 2:
                                (val,) = struct.unpack("<f", sv)
                        out.append((step, tag, val))
    return out, bad, version


def main():
    import transformers as tf
    import trl
    chk = ic.Checks("test_files")
    work = ic.work_dir("files")
    tok_dir = os.path.join(work, "tok")
    V = len(ic.make_tokenizer(tok_dir))
    base = os.path.join(work, "base")
    ic.tiny_model("llama", base, V, seed=4)
    ic.copy_tokenizer(tok_dir, base)
    train = ic.preprocess(work, tok_dir, ic.ROWS, "train")
    evalf = ic.preprocess(work, tok_dir, ic.ROWS[:4], "eval")
    out = os.path.join(work, "run")
    ic.run_tool("dpo_dist", "--model_name_or_path", base, "--train_file", train, "--eval_file", evalf,
                "--output_dir", out, "--max_steps", 4, "--per_device_train_batch_size", 2, "--logging_steps", 1,
                "--eval_steps", 2, "--save_steps", 2, "--learning_rate", 1e-2, "--report_to", "jsonl,tensorboard",
                "--lora_target_modules", "all-linear", "--warmup_ratio", 0.25, "--seed", 3)
    metrics = ic.read_jsonl(os.path.join(out, "metrics.jsonl"))

    # ---- 1. trainer_state.json ----------------------------------------------------------------
    paths = [os.path.join(out, "trainer_state.json")] + sorted(
        os.path.join(out, d, "trainer_state.json") for d in os.listdir(out) if d.startswith("checkpoint-"))
    chk.truth("checkpoints written", len(paths) >= 3, f"{len(paths) - 1} checkpoints")
    for p in paths:
        name = os.path.relpath(p, out)
        try:
            st = tf.TrainerState.load_from_json(p)
        except Exception as e:  # noqa: BLE001
            chk.truth(f"{name}: TrainerState.load_from_json", False, f"{type(e).__name__}: {e}")
            continue
        step = int(os.path.basename(os.path.dirname(p)).split("-")[1]) if "checkpoint-" in p else 4
        chk.equal(f"{name}: TrainerState global_step / max_steps", (st.global_step, st.max_steps), (step, 4))
        want = [m for m in metrics if m["step"] <= step]
        chk.equal(f"{name}: log_history = metrics.jsonl up to step {step} ({len(want)} events)", st.log_history, want)
        chk.truth(f"{name}: epoch", abs(st.epoch - step * 2 / len(ic.ROWS)) < 1e-9, f"{st.epoch}")
        # and back: transformers writes the same keys
        rt = os.path.join(work, "roundtrip.json")
        st.save_to_json(rt)
        with open(p) as f, open(rt) as g:
            mine, hf = json.load(f), json.load(g)
        chk.equal(f"{name}: keys as TrainerState.save_to_json writes them", sorted(mine), sorted(hf))

    # ---- 2. training_args.json ----------------------------------------------------------------
    with open(os.path.join(out, "training_args.json")) as f:
        targs = json.load(f)
    names = hf_names()
    unknown = sorted(k for k in targs if k not in names and k not in DPO_ONLY and k not in V4_NAMES)
    chk.equal("training_args.json: keys that are neither Hugging Face names nor documented dpo_dist options",
              unknown, [])
    stale = sorted(k for k in DPO_ONLY if k in names)
    chk.equal("dpo_dist-only list: entries that are Hugging Face names after all", stale, [])
    print("PINNED transformers 4 names dropped by transformers " + tf.__version__ + ": " +
          ", ".join(sorted(k for k in V4_NAMES if k in targs)))
    print("dpo_dist-only options: " + "; ".join(f"{k} ({v})" for k, v in sorted(DPO_ONLY.items()) if k in targs))
    # TRL's own parser on the values (report_to: dpo_dist's jsonl/html are not HF integrations)
    parser = tf.HfArgumentParser((trl.DPOConfig, trl.ModelConfig))
    fields_of = {f.name for c in (trl.DPOConfig, trl.ModelConfig) for f in dataclasses.fields(c)}
    shared = {k: v for k, v in targs.items() if k in fields_of and k not in ("report_to", "resume_from_checkpoint")}
    argv = []
    for k, v in shared.items():
        v = str(v)
        if k in ("lora_target_modules", "loss_type", "loss_weights"):
            if v:
                argv += [f"--{k}"] + v.split(",")
        elif v != "":
            argv += [f"--{k}", v]
    argv += ["--report_to", "none", "--use_cpu", "true"]
    try:
        dcfg, mcfg = parser.parse_args_into_dataclasses(args=argv)
        got = {k: getattr(dcfg, k, getattr(mcfg, k, None)) for k in shared}
        diff = []
        for k, v in shared.items():
            g = got[k]
            w = v.split(",") if isinstance(g, list) else v
            if isinstance(g, list) and k == "loss_weights":
                w = [float(x) for x in w]
            if isinstance(g, bool):
                w = {"true": True, "false": False}.get(str(v), v)
            elif isinstance(g, (int, float)) and not isinstance(g, bool):
                w = type(g)(float(v)) if isinstance(g, float) else int(float(v))
            elif g is None:
                w = None if v in ("", None) else v
            elif hasattr(g, "value"):  # an Enum (lr_scheduler_type, ...)
                g = g.value
            if g != w:
                diff.append(f"{k}: {v!r} -> {got[k]!r}")
        chk.equal(f"training_args.json: {len(shared)} shared options through TRL's HfArgumentParser", diff, [])
    except (SystemExit, Exception) as e:  # noqa: BLE001
        chk.truth("training_args.json values parse with TRL's HfArgumentParser", False, f"{type(e).__name__}: {e}")

    # ---- 3. TensorBoard -----------------------------------------------------------------------------
    try:
        import tensorboard  # noqa: F401
        have_tb = True
    except ImportError:
        have_tb = False
        chk.cannot("TensorBoard files through the tensorboard package's reader",
                   "tensorboard is not in scripts/python/requirements.lock (the pinned venv); read by its "
                   "TFRecord framing and protobuf fields instead")
    runs = os.path.join(out, "runs")
    evs = [os.path.join(runs, f) for f in os.listdir(runs) if f.startswith("events.out.tfevents.")] \
        if os.path.isdir(runs) else []
    chk.equal("one events.out.tfevents.* file under runs/", len(evs), 1)
    if evs:
        print("event tags: " + ", ".join(sorted({t for _, t, _ in read_events(evs[0])[0]})))
    if evs:
        scalars, bad, version = read_events(evs[0])
        chk.equal("TFRecord masked CRC-32C of every length and record: failures", bad, 0)
        chk.equal("file_version", version, "brain.Event:2")
        want = {(m["step"], k, float(v)) for m in metrics for k, v in m.items()
                if k not in ("step", "epoch") and isinstance(v, (int, float))}
        # transformers' TensorBoardCallback (rewrite_logs): eval_x -> eval/x, x -> train/x
        def tb_tag(k):
            return "eval/" + k[5:] if k.startswith("eval_") else "train/" + k
        got = {(s, t): v for s, t, v in scalars}
        missing = sorted((s, t) for s, t, v in want if (s, tb_tag(t)) not in got)
        chk.equal(f"every metrics.jsonl value ({len(want)}) has its scalar in the event file under transformers' "
                  f"TensorBoardCallback tag (eval_x -> eval/x, x -> train/x)", missing, [])
        worst = 0.0
        for s, t, v in want:
            if (s, tb_tag(t)) in got:
                worst = max(worst, abs(got[(s, tb_tag(t))] - v) / max(abs(v), 1e-30))
        chk.check("event scalars vs metrics.jsonl (rel; stored as fp32)", worst, 2 ** -24)
        if have_tb:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
            acc = EventAccumulator(runs)
            acc.Reload()
            chk.truth("tensorboard's EventAccumulator reads the scalars", len(acc.Tags()["scalars"]) > 0)
    chk.finish()


if __name__ == "__main__":
    main()
