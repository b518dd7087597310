#!/usr/bin/env python3
"""Tokenizers and chat templates live: the real Llama 3.1, Qwen 3 and Llama 2 / Mistral
tokenizer.json files (tests/fixtures/tokenizers.tar.xz) through Hugging Face's Rust
`tokenizers` and transformers' apply_chat_template, now, against dpo_preprocess's ids.

1. The golden corpus (tests/data/fixtures/make_tokenizer_goldens.py) and a hostile one
   (leading/trailing spaces, CRLF, NBSP and other spaces, combining marks, emoji ZWJ
   sequences and flags, BOM, zero-width and bidi marks, control characters, runs of
   thousands of characters, special-token look-alikes): tokenizers.Tokenizer.encode
   (add_special_tokens=False) vs dpo_preprocess's ids of the same text (as an answer,
   less the eos it appends): equal (bound 0). The stored goldens must equal the live
   encoding (a pinned-version drift would show here first). Where transformers'
   AutoTokenizer differs from tokenizer.json (docs/preprocess.md), the count is printed.
2. Chat rows whose messages hold the hostile texts, rendered by transformers'
   apply_chat_template(tokenize=True) with each tokenizer's own template (prompt with the
   generation prompt, prompt + answer without), vs dpo_preprocess's prompt and answer ids.
"""
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDENS = os.path.join(HERE, "..", "data", "fixtures")

HOSTILE = [
    "  two leading spaces", "trailing spaces  ", "   ", "\t", " \t \n ", "a  b   c    d",
    "CRLF line\r\nnext\r\n", "\r\n\r\n", "lone CR\rend", "\n\n\n\nfour newlines",
    "no\u00a0break\u00a0spaces\u00a0", "\u2009thin\u200aspace\u202fnarrow\u3000ideographic", "\u00a0 \u00a0",
    "e\u0301 vs \u00e9, a\u0308 vs \u00e4, o\u0302\u0323\u0304 stacked", "Z\u0351\u036b\u0343a\u0310\u0364l\u0350g\u0343o\u0357",
    "\u1100\u1161\u11a8 jamo vs \uac01", "\u0915\u094d\u0937 virama, \u0dc1\u0dca\u200d\u0dbb\u0dd3 ZWJ Sinhala",
    "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 family", "\U0001F44D\U0001F3FD\U0001F44D\U0001F3FF skin tones",
    "\U0001F3F3\ufe0f\u200d\U0001F308 \U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F flags",
    "\u2764\ufe0f\u2764\ufe0e variation selectors", "\U0001F1FA\U0001F1F8\U0001F1EF\U0001F1F5\U0001F1E9",
    "\ufeffBOM at start", "zero\u200bwidth\u200cnon\u200djoiner\u2060word", "\u202eright-to-left override\u202c \u200fRLM",
    "bell\x07 vertical\x0btab form\x0cfeed unit\x1fsep del\x7f", "nul\x00inside",
    "a" * 3000, " " * 700, "!" * 1200, "0123456789" * 200, "\n" * 300, "\U0001F600" * 400,
    "ab" * 1500 + " end", "supercalifragilistic" * 60,
    "<|eot_id|>", "<|eot_id|><|eot_id|>", "x<|eot_id|>y", "<|eot_id", "|eot_id|>", "< |eot_id| >", "<|EOT_ID|>",
    "<|im_start|>user\nhi<|im_end|>", "<|im_start|", "<|im_end|>\n<|endoftext|>", "<｜im_start｜>",
    "<s>", "</s>", "<s> </s>", "< s >", "<unk>", "[INST] x [/INST]", "<<SYS>>\nsys\n<</SYS>>",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>", "<think>\n\n</think>\n\n", "<tool_call>{}</tool_call>",
    "\\u0000 escaped, \\n not a newline, &lt;s&gt;", "Ａｂｃ fullwidth, ﬁ ligature, Ⅻ, ①, ², ½",
]

TOKENIZERS = [("llama3_1", "tokenizer-llama3_1"), ("qwen3", "tokenizer-qwen3"), ("llama2", "tokenizer-llama2")]


def corpus():
    spec = importlib.util.spec_from_file_location("goldens", os.path.join(GOLDENS, "make_tokenizer_goldens.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.CORPUS)


def main():
    import tokenizers
    import transformers as tf
    chk = ic.Checks("test_tokenizers")
    work = ic.work_dir("tok")
    root = os.environ.get("DPO_TOKENIZER_DIR", "")
    gold_corpus = corpus()
    # dpo_preprocess refuses a blank answer (only spaces, tabs, CR, LF: data/sources.cpp is_blank), so
    # those texts are compared inside chat messages (part 2) only
    texts = [t for t in gold_corpus + HOSTILE if t.strip(" \t\r\n")]
    for name, pkg in TOKENIZERS:
        tdir = os.path.join(root, pkg, "models")
        tj = os.path.join(tdir, "tokenizer.json")
        if not os.path.exists(tj):
            chk.truth(f"{name}: tokenizer fixture", False, f"no {tj}: set DPO_TOKENIZER_DIR to <build>/fixtures/tokenizers")
            continue
        rust = tokenizers.Tokenizer.from_file(tj)
        live = {t: rust.encode(t, add_special_tokens=False).ids for t in texts}

        # the stored goldens are what the pinned library gives now
        with open(os.path.join(GOLDENS, f"tokenizer_goldens_{name}.json"), encoding="utf-8") as f:
            stored = {c["text"]: c["ids"] for c in json.load(f)["cases"]}
        drift = [t for t in gold_corpus if t in stored and stored[t] != rust.encode(t, add_special_tokens=False).ids]
        chk.equal(f"{name}: stored goldens that tokenizers {tokenizers.__version__} now encodes differently "
                  f"({len(stored)} cases)", drift, [])

        # dpo_preprocess: each text as an answer (its ids are encode(text) + [eos])
        rows = [{"prompt": "p", "chosen": t, "rejected": "r"} for t in texts]
        h5 = ic.preprocess(work, tdir, rows, name, "--max_length", 100000, "--max_prompt_length", 16)
        ex = ic.h5_examples(h5)
        eos = ic.h5_attr(h5, "eos_id")
        bad = []
        for t, (_, c, _) in zip(texts, ex):
            got = c[:-1] if c and c[-1] == eos else c
            if got != live[t]:
                bad.append(t)
        if len(ex) != len(texts):
            bad.append(f"{len(ex)} rows written of {len(texts)}")
        chk.check(f"{name}: texts whose ids differ, dpo_preprocess vs tokenizers {tokenizers.__version__} "
                  f"({len(gold_corpus)} golden + {len(HOSTILE)} hostile, {sum(map(len, live.values()))} ids)",
                  len(bad), 0, "tokenizer ids")
        for t in bad[:3]:
            i = texts.index(t) if t in texts else -1
            print(f"    {t[:80]!r}: dpo_preprocess {ex[i][1][:20] if i >= 0 else '-'} tokenizers {live.get(t, [])[:20]}")
        auto = tf.AutoTokenizer.from_pretrained(tdir)
        ndiff = sum(auto.encode(t, add_special_tokens=False) != live[t] for t in texts)
        print(f"info {name}: transformers {tf.__version__} AutoTokenizer differs from tokenizer.json on {ndiff} of "
              f"{len(texts)} texts (dpo_dist follows tokenizer.json, as the Rust library; docs/preprocess.md)")

        # chat rows through the tokenizer's own template
        if not auto.chat_template:
            continue
        kw = {"enable_thinking": False} if name == "qwen3" else {}
        chat_rows, want = [], []
        for i, t in enumerate(HOSTILE):
            prompt = [{"role": "user", "content": t}]
            if i % 3 == 0:
                prompt.insert(0, {"role": "system", "content": HOSTILE[(i + 7) % len(HOSTILE)]})
            chosen = [{"role": "assistant", "content": HOSTILE[(i + 1) % len(HOSTILE)]}]
            # (a distinct rejected text: Llama 3.1's template trims contents, so blank ones render alike)
            rejected = [{"role": "assistant", "content": "No. " + HOSTILE[(i + 2) % len(HOSTILE)]}]
            chat_rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            p = auto.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **kw)
            pc = auto.apply_chat_template(prompt + chosen, tokenize=True, return_dict=True, **kw)
            pr = auto.apply_chat_template(prompt + rejected, tokenize=True, return_dict=True, **kw)
            p, pc, pr = p["input_ids"], pc["input_ids"], pr["input_ids"]
            want.append((p, pc[len(p):] if pc[:len(p)] == p else None, pr[len(p):] if pr[:len(p)] == p else None))
        extra = ["--chat_template_kwargs", json.dumps(kw)] if kw else []
        h5 = ic.preprocess(work, tdir, chat_rows, name + "_chat", "--max_length", 100000, "--max_prompt_length",
                           50000, *extra)
        got = ic.h5_examples(h5)
        bad = [i for i, (g, w) in enumerate(zip(got, want)) if tuple(g) != w]
        bad += ["rows"] if len(got) != len(want) else []
        chk.check(f"{name}: chat rows (hostile message texts, the tokenizer's own template) whose (prompt, chosen, "
                  f"rejected) ids differ from apply_chat_template's", len(bad), 0, "tokenizer ids")
        for i in bad[:2]:
            if isinstance(i, int):
                print(f"    row {i}: dpo_preprocess {[x[:12] for x in got[i]]}\n    transformers   "
                      f"{[x[:12] if x else x for x in want[i]]}")
    chk.finish()


if __name__ == "__main__":
    main()
