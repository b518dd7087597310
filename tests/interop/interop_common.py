"""Shared helpers of the interop suite (tests/interop, docs/interop.md).

Each test script checks files and numbers made by the dpo_* tools against the real
Hugging Face libraries of the project's venv (scripts/python/requirements.lock). This
module holds what they share:

  Checks        records every comparison: prints `PASS|FAIL name: measured X (bound B)`,
                `NOT CHECKED name: why` for a step the installed backend cannot do, and
                exits 1 when a check failed (ctest's failure), 0 otherwise.
  run_tool      runs build/bin/<tool> (DPO_BIN) with --threads 1 where the tool has it.
  h5_read       a dataset of an HDF5 file through h5dump (hdf5-tools, installed by
                scripts/setup.sh): the suite needs no h5py.
  make_tokenizer  a small byte-level BPE tokenizer trained and saved by `tokenizers` +
                transformers (tokenizer.json + tokenizer_config.json), so tiny models keep
                a tiny vocabulary.
  tiny_model    a random Llama / Mistral / Qwen2 / Qwen3 written by transformers'
                save_pretrained (weights drawn wide enough that log-probs depend on every
                part of the model; norms and biases random, not 1 and 0).
  hf_logps      the reference: summed answer log-probs from a transformers model's
                forward (logits in fp32, log-softmax in fp64).

Letters: N examples, T tokens of a row, V vocabulary, C hidden size.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import warnings  # noqa: E402

import torch  # noqa: E402

# transformers 5 renames (gradient_checkpointing -> activation_checkpointing) warn on every config
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

SKIP_RETURN_CODE = 77  # ctest SKIP_RETURN_CODE: only for a whole script the backend cannot run


class Checks:
    """Every comparison of one script: printed as it is made, failures counted."""

    def __init__(self, script):
        self.script = script
        self.failed = []
        self.not_checked = []
        self.known = []
        self.count = 0
        self.start = time.time()
        self.largest = {}  # group -> largest measured/bound ratio's (measured, bound)

    def check(self, name, measured, bound, group=None, unit=""):
        """measured <= bound passes; NaN fails."""
        self.count += 1
        ok = measured == measured and measured <= bound
        print(f"{'PASS' if ok else 'FAIL'} {name}: measured {measured:.3e}{unit} (bound {bound:.1e}{unit})", flush=True)
        if not ok:
            self.failed.append(name)
        if group is not None:
            m, b = self.largest.get(group, (None, bound))
            if m is None or measured > m or measured != measured:
                self.largest[group] = (measured, bound)
        return ok

    def above(self, name, measured, floor, unit=""):
        """measured > floor passes: a difference the check must be able to see."""
        self.count += 1
        ok = measured == measured and measured > floor
        print(f"{'PASS' if ok else 'FAIL'} {name}: measured {measured:.3e}{unit} (must exceed {floor:.1e}{unit})",
              flush=True)
        if not ok:
            self.failed.append(name)
        return ok

    def equal(self, name, got, want, detail=""):
        """An exact comparison (ids, bytes, keys): the number of differing items is measured."""
        self.count += 1
        ok = got == want
        print(f"{'PASS' if ok else 'FAIL'} {name}: {'equal' if ok else 'DIFFERENT'}{(' ' + detail) if detail else ''}",
              flush=True)
        if not ok:
            self.failed.append(name)
            print(f"    got:  {_short(got)}\n    want: {_short(want)}", flush=True)
        return ok

    def truth(self, name, ok, detail=""):
        self.count += 1
        print(f"{'PASS' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}", flush=True)
        if not ok:
            self.failed.append(name)
        return ok

    def known_bug(self, name, ok, bug):
        """A dpo_dist bug this suite found and reported, not fixed yet (strict: once it passes,
        the marker must go, so a fix is never left unchecked)."""
        self.count += 1
        if ok:
            print(f"FAIL {name}: passes now; remove its known_bug marker (was: {bug})", flush=True)
            self.failed.append(name)
        else:
            print(f"KNOWN BUG {name}: {bug}", flush=True)
            self.known.append(name)
        return ok

    def cannot(self, name, why):
        """A step the installed backend cannot do: said, never passed silently."""
        self.not_checked.append(name)
        print(f"NOT CHECKED {name}: {why}", flush=True)

    def finish(self):
        for g, (m, b) in sorted(self.largest.items()):
            print(f"largest {g}: {m:.3e} (bound {b:.1e})")
        dt = time.time() - self.start
        print(f"{self.script}: {self.count} checks, {len(self.failed)} failed, {len(self.known)} known bugs, "
              f"{len(self.not_checked)} not checked, {dt:.1f} s", flush=True)
        if self.failed:
            print("failed: " + ", ".join(self.failed), flush=True)
            sys.exit(1)
        sys.exit(0)


def _short(x, n=400):
    s = repr(x)
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


# ---- the dpo_* tools --------------------------------------------------------------

def bin_dir():
    d = os.environ.get("DPO_BIN")
    if not d:
        here = os.path.dirname(os.path.abspath(__file__))
        d = os.path.join(here, "..", "..", "build", "bin")
    if not os.path.exists(os.path.join(d, "dpo_score")):
        print(f"interop: no dpo_score in {d}: set DPO_BIN to the build's bin folder", file=sys.stderr)
        sys.exit(1)
    return d


_THREADED = {"dpo_dist", "dpo_score", "dpo_merge", "dpo_quantize"}


def run_tool(tool, *args, check=True):
    """Runs a dpo_* tool; its output is returned (and printed on failure)."""
    cmd = [os.path.join(bin_dir(), tool)] + [str(a) for a in args]
    if tool in _THREADED and "--threads" not in args:
        cmd += ["--threads", "1"]
    if tool in ("dpo_dist", "dpo_preprocess"):
        cmd += ["--progress", "off"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and p.returncode != 0:
        print(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}", flush=True)
        raise RuntimeError(f"{tool} failed with exit code {p.returncode}")
    return p


def work_dir(name):
    """A fresh temporary folder, removed at exit unless DPO_INTEROP_KEEP=1."""
    d = tempfile.mkdtemp(prefix=f"dpo_interop_{name}.")
    if os.environ.get("DPO_INTEROP_KEEP") != "1":
        import atexit
        atexit.register(shutil.rmtree, d, True)
    else:
        print(f"work dir kept: {d}")
    return d


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- HDF5 through h5dump ------------------------------------------------------------

def h5_read(path, dataset):
    """The values of a 1-D numeric dataset, as Python ints or floats."""
    h5dump = shutil.which("h5dump")
    if h5dump is None:
        print("interop: h5dump is missing (Debian package hdf5-tools, installed by scripts/setup.sh)", file=sys.stderr)
        sys.exit(1)
    out = subprocess.run([h5dump, "-d", dataset, "-y", "-w", "0", "-m", "%.17g", path],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True).stdout
    m = re.search(r"DATA \{(.*?)\}", out, re.S)
    if m is None:
        raise RuntimeError(f"h5dump {path} {dataset}: no DATA block")
    body = m.group(1).replace("\n", " ").strip()
    if not body:
        return []
    vals = [v.strip() for v in body.split(",")]
    return [float(v) if any(c in v for c in ".eEn") else int(v) for v in vals]


def h5_attr(path, name):
    """A numeric root attribute of an HDF5 file (h5dump -a)."""
    out = subprocess.run([shutil.which("h5dump") or "h5dump", "-a", "/" + name, path], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, check=True).stdout
    m = re.search(r"DATA \{\s*\(0\): (-?\d+)", out)
    if m is None:
        raise RuntimeError(f"h5dump {path}: no attribute {name}")
    return int(m.group(1))


def h5_examples(path):
    """[(prompt ids, chosen ids, rejected ids)] of a dpo_preprocess file."""
    parts = {}
    for k in ("prompt", "chosen", "rejected"):
        tok = h5_read(path, f"/{k}/tokens")
        off = h5_read(path, f"/{k}/offsets")
        parts[k] = [tok[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    return list(zip(parts["prompt"], parts["chosen"], parts["rejected"]))


# ---- tokenizer and models ---------------------------------------------------------------

CORPUS = [
    "Question: what is two plus two?\n\nAnswer: four.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "I cannot help with that, but here is a poem about the sea.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 1 2 3 10 42 2026, and a few words in French: le chat est noir.",
    "User: name a colour.\nAssistant: Blue.",
]

ROWS = [
    {"prompt": "Question: what is two plus two?\n\nAnswer: ", "chosen": "four.", "rejected": "The quick brown fox."},
    {"prompt": "Name the capital of France.", "chosen": " Paris is the capital of France.",
     "rejected": " I cannot help with that, but here is a poem about the sea."},
    {"prompt": "def add(a, b):\n", "chosen": "    return a + b\n", "rejected": "    return a - b  # wrong\n"},
    {"prompt": "Write a number.", "chosen": " 42", "rejected": " Numbers: 1 2 3 10 42 2026, and a few words."},
    {"prompt": "User: name a colour.\nAssistant:", "chosen": " Blue.", "rejected": " le chat est noir."},
    {"prompt": "The lazy dog", "chosen": " jumps over the quick brown fox.", "rejected": " is lazy."},
]


# A ChatML-like template over the tokenizer's own special tokens (what TRL's conversational
# rows and dpo_preprocess's chat path render).
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def make_tokenizer(out_dir, vocab_size=320):
    """A byte-level BPE (as Llama 3 / Qwen) trained on CORPUS by `tokenizers` and saved by
    transformers' PreTrainedTokenizerFast: tokenizer.json + tokenizer_config.json with
    <pad> 0, <s> 1 (bos, added in front by the post-processor as Llama's tokenizers do),
    </s> 2 (eos) and CHAT_TEMPLATE. Returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, tr)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def copy_tokenizer(src_dir, dst_dir):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src_dir, f), os.path.join(dst_dir, f))


def tiny_config(arch, vocab_size, **over):
    """A transformers config of a tiny model: 2 layers, hidden 64, GQA 4/2 heads."""
    import transformers as tf
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
           "qwen3": tf.Qwen3Config}[arch]
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "qwen3":
        kw["head_dim"] = 24  # != hidden / heads, as Qwen3's 128 with hidden 1024 / 16 heads
    if arch == "mistral":
        kw["sliding_window"] = 4096
    kw.update(over)
    return cls(**kw)


def tiny_model(arch, out_dir, vocab_size, seed=0, dtype=torch.float32, max_shard_size=None, scale=0.35, **over):
    """A random model written by save_pretrained. Weights ~ N(0, scale) (transformers' 0.02
    makes every log-prob ~ -log V, which would hide a wrong layer), norms ~ 1 + N(0, 0.2),
    biases ~ N(0, 0.1). Returns the fp32 model (eval mode, eager attention)."""
    import transformers as tf
    cfg = tiny_config(arch, vocab_size, **over)
    cfg.initializer_range = scale
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                # projections: N(0, 1/sqrt(fan_in)) keeps every layer's output O(1)
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    model.eval()
    kw = {}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    if dtype != torch.float32:
        model.to(dtype).save_pretrained(out_dir, **kw)
        model = tf.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
        model.eval()
    else:
        model.save_pretrained(out_dir, **kw)
    return model


def load_hf(model_dir, **kw):
    import transformers as tf
    m, info = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                      output_loading_info=True, **kw)
    m.eval()
    return m, info


@torch.no_grad()
def hf_logps(model, examples):
    """Per example (chosen, rejected) summed answer log-probs of [prompt; answer] rows under
    a transformers model: fp32 logits, log-softmax in fp64 (the reference)."""
    out = []
    for p, c, r in examples:
        pair = []
        for a in (c, r):
            ids = torch.tensor([p + a])
            logits = model(input_ids=ids).logits[0].double()  # (T, V)
            lp = torch.log_softmax(logits[len(p) - 1:-1], dim=-1)
            pair.append(lp.gather(1, torch.tensor(a).unsqueeze(1)).sum().item())
        out.append(tuple(pair))
    return out


@torch.no_grad()
def hf_logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].double()


def score(model_dir, h5, work, name, *extra):
    """dpo_score's (chosen, rejected) log-probs per example."""
    out = os.path.join(work, name + ".scores.jsonl")
    run_tool("dpo_score", "--model_name_or_path", model_dir, "--data", h5, "--output", out, *extra)
    rows = sorted(read_jsonl(out), key=lambda r: r["index"])
    return [(r["chosen_logps"], r["rejected_logps"]) for r in rows]


def max_rel(got, want):
    """max over examples and answers of |got - want| / |want|."""
    worst = 0.0
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            worst = max(worst, abs(a - b) / max(abs(b), 1e-30))
    if len(got) != len(want):
        return float("nan")
    return worst


def preprocess(work, tok_dir, rows, name="rows", *extra):
    src = os.path.join(work, name + ".jsonl")
    write_jsonl(src, rows)
    h5 = os.path.join(work, name + ".h5")
    run_tool("dpo_preprocess", "--tokenizer", os.path.join(tok_dir, "tokenizer.json"), "--input", src,
             "--output", h5, *extra)
    return h5
