"""
One training loop for every model in this repository (GPT now; BERT, T5, ELECTRA, XLNet plug into the same loop).

    python train.py --model gpt                      # char-level GPT on the bundled Shakespeare, CPU, < 5 minutes
    python train.py --model gpt --help               # every flag, generated from the config dataclasses
    python train.py --model gpt --resume             # continue out/gpt from its checkpoint
    python train.py --model gpt --preset nanogpt-cpu --bench   # ms/step, tokens/s, MFU; writes nothing

What the loop owns (the same for every objective): the device and precision, tokenizers, reading the corpus and splitting it
by document, batching, AdamW, the learning-rate schedule, gradient accumulation and clipping, evaluation, logging,
checkpoints and resume, and a sample at the end.
What a model file owns (looked up in MODELS below, nothing else is model-specific here):
  Config     a dataclass of the architecture's settings                  (each field becomes a --flag)
  PRESETS    named sizes and recipes, DEFAULT_PRESET                     (--preset)
  Model      the nn.Module, built from a Config
  Objective  turns token data into inputs and targets and scores them:
               train_batch(split, batch_size, generator) -> dict of tensors   (random, from the loop's seeded generator)
               eval_batches(split, batch_size, max_tokens) -> iterator         (deterministic, covers the split)
               loss(model, batch) -> (mean loss, dict of sums)                 summarize(sums) -> named metrics
Slides (lecture 001): "Training recipe for LLMs" and "Pretraining language models" (model, data, objective, details).
Papers for the optimisation recipe: Loshchilov & Hutter 2019 (AdamW), Loshchilov & Hutter 2017 (cosine schedule, SGDR),
Goyal et al. 2017 §2.2 (linear warm-up), GPT-3 (Brown et al. 2020) §2.3 and App. B (the settings the gpt2 preset uses).
"""

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

import bpe

ROOT = os.path.dirname(os.path.abspath(__file__))
MODELS = {"gpt": "gpt"}  # --model name -> module. Adding a model = one line here and one file.
DEFAULT_DATA = os.path.join(ROOT, "data", "shakespeare")
# Held-out works of the bundled corpus: whole plays, so val loss measures generalisation to unseen text, not memory of a
# neighbouring passage. One tragedy, one comedy, one history: 384 KB, 7.6% of the 5.06 MB corpus.
BUNDLED_VAL_DOCS = ("julius_caesar", "twelfth_night", "henry_v")


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2, nothing written."""


# ----------------------------------------------------------------------------------------------------------------------
# Configuration. Every field is a --flag (underscores become dashes); presets and checkpoints fill the same fields.


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = opt("gpt", f"which model file to train: {', '.join(MODELS)}")
    preset: str = opt("", "named size/recipe from the model file (default: its DEFAULT_PRESET)")
    data: str = opt("", "directory or glob of UTF-8 .txt files, one document each (default: bundled Shakespeare)")
    val_docs: str = opt("", "comma-separated document names to hold out (default: the bundled held-out works, "
                            "else every 10th document)")
    tokenizer: str = opt("char", "char | gpt2 | bpe")
    vocab_size: int = opt(1024, "vocabulary size to train when --tokenizer bpe")
    out_dir: str = opt("", "where ckpt.pt, metrics.jsonl and loss.png go (default: out/<model>)")
    cache_dir: str = opt(os.path.join(ROOT, "data", "cache"), "where tokenised corpora and trained tokenizers are cached")
    device: str = opt("auto", "auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    dtype: str = opt("auto", "auto | bf16 | fp16 | fp32; auto = bf16 where the device does it natively, "
                             "else fp16 + GradScaler on CUDA, else fp32")
    compile: bool = opt(False, "torch.compile the model (slow start, faster steps on GPU)")
    batch_size: int = opt(16, "micro-batch: sequences per forward/backward pass")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    tokens_per_step: int = opt(0, "tokens per optimizer step; if set, grad_accum = this / (batch_size * block_size)")
    max_iters: int = opt(2000, "optimizer steps")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "floor of the cosine decay")
    warmup_iters: int = opt(100, "linear warm-up steps")
    lr_decay_iters: int = opt(0, "steps over which lr decays to min_lr (0 = max_iters)")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay, on matrices only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = opt(500, "evaluate, plot and checkpoint every N steps (and at the end)")
    eval_batch_size: int = opt(0, "sequences per eval forward pass (0 = about 16K tokens, at least --batch-size)")
    eval_train_tokens: int = opt(0, "train tokens scored at each eval (0 = as many as the val split has)")
    log_interval: int = opt(10, "print a training line every N steps")
    seed: int = opt(1337, "seeds the model init, the batch order and dropout")
    resume: bool = opt(False, "continue the run in --out-dir from its ckpt.pt")
    overwrite: bool = opt(False, "start a new run even if --out-dir already holds one")
    bench: bool = opt(False, "benchmark: time --bench-iters steps, print ms/step, tokens/s, MFU; write nothing")
    bench_iters: int = opt(30, "timed steps for --bench (after 5 warm-up steps)")
    prompt: str = opt("\n", "prompt for the sample printed at the end")
    sample_tokens: int = opt(500, "tokens to sample at the end (0 = none)")
    temperature: float = opt(0.8, "sampling temperature")
    top_k: int = opt(0, "sample from the k most likely tokens (0 = all)")


def model_module(name):
    if name not in MODELS:
        raise UsageError(f"unknown --model {name!r}; choose from: {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name])


DERIVED = {"vocab_size"}  # model-config fields set from the data, never from a flag


def model_fields(mod):
    return [f for f in fields(mod.Config) if f.name not in DERIVED]


def field_comments(cls):
    """{field: its end-of-line comment} from a config class's source. Model configs document each field with a comment,
    as nanoGPT does, rather than with metadata; --help shows those comments."""
    found = (re.match(r"\s+(\w+):[^#]*#\s*(.*)", line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def build_parser(mod, preset_name):
    """The CLI, generated from the config dataclasses: one typed --flag per field. --help shows the value a run will
    use, i.e. the preset's where it sets one."""
    p = argparse.ArgumentParser(prog="train.py", allow_abbrev=False, description=(
        f"Train a model of this repository. Flags left out come from the preset ({mod.__name__}: {preset_name}), "
        "then from the defaults; --help shows the values that apply to this --model/--preset."))
    p.error = lambda message: _fail(f"{message} (see --help)")
    preset = mod.PRESETS.get(preset_name, {})
    comments = field_comments(mod.Config)
    for title, fs, defaults in [("training", fields(TrainConfig), TrainConfig()),
                                (f"model ({mod.__name__}.Config)", model_fields(mod), mod.Config())]:
        g = p.add_argument_group(title)
        for f in fs:
            flag = "--" + f.name.replace("_", "-")
            value = preset.get(f.name, getattr(defaults, f.name))
            where = f" from preset {preset_name}" if f.name in preset else ""
            help = f.metadata.get("help", comments.get(f.name, "")) + (f" [{value!r}{where}]" if value not in ("", None) else "")
            if f.type is bool:
                g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help)
            else:
                g.add_argument(flag, dest=f.name, type=f.type, default=argparse.SUPPRESS, help=help,
                               metavar=f.name.upper())
    return p


def _fail(message):
    raise UsageError(message)


def resolve_config(argv):
    """argv -> (TrainConfig, model Config kwargs, explicit flag names). Precedence: flags > preset > defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="gpt")
    pre.add_argument("--preset", default="")
    known, _ = pre.parse_known_args(argv)
    mod = model_module(known.model)
    preset_name = known.preset or mod.DEFAULT_PRESET
    if preset_name not in mod.PRESETS:
        raise UsageError(f"unknown --preset {preset_name!r} for {known.model}; choose from: {', '.join(mod.PRESETS)}")
    explicit = vars(build_parser(mod, preset_name).parse_args(argv))
    values = {}
    train_names, model_names = {f.name for f in fields(TrainConfig)}, {f.name for f in model_fields(mod)}
    for key, value in {**mod.PRESETS[preset_name], **explicit}.items():
        if key not in train_names and key not in model_names:
            raise UsageError(f"preset {preset_name!r} sets unknown key {key!r}")
        values[key] = value
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_names})
    cfg.preset = preset_name
    model_kwargs = {k: v for k, v in values.items() if k in model_names}
    return cfg, model_kwargs, set(explicit)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers: text <-> ids, plus the plain-data identity a checkpoint records so sampling and resume rebuild the same one.
# Special tokens sit above the ordinary vocabulary; GPT needs only <|endoftext|> (between documents), the other objectives
# will ask for theirs ([CLS], [SEP], [MASK], sentinels) through the same list.

EOT = "<|endoftext|>"


class CharTokenizer:
    """One id per character of the corpus's alphabet (nanoGPT's shakespeare_char), specials after it.
    CharTokenizer("ab").encode("ba") -> [1, 0]"""

    def __init__(self, chars, specials=(EOT,)):
        self.chars, self.specials = "".join(chars), list(specials)
        self.itos = list(self.chars) + self.specials
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.n_vocab = len(self.itos)
        self.eot_id = self.itos.index(EOT)

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - set(self.stoi))
            raise UsageError(f"characters not in this char vocabulary: {unknown!r}") from None

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def token_bytes(self):
        return torch.tensor([len(c.encode("utf-8")) for c in self.chars] + [0] * len(self.specials))

    def identity(self):
        return {"kind": "char", "chars": self.chars, "specials": self.specials}


class TiktokenTokenizer:
    """Any tiktoken.Encoding; `gpt2` is OpenAI's GPT-2 encoding read offline from data/gpt2.tiktoken."""

    def __init__(self, enc, identity):
        self.enc, self._identity = enc, identity
        self.n_vocab, self.eot_id = enc.n_vocab, enc.eot_token

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")

    def encode_corpus(self, docs):
        return self.enc.encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self):
        special = set(self.enc.special_tokens_set)
        out = []
        for i in range(self.n_vocab):
            try:
                b = self.enc.decode_single_token_bytes(i)
                out.append(0 if b.decode("utf-8", "replace") in special else len(b))
            except KeyError:
                out.append(0)
        return torch.tensor(out)

    def identity(self):
        return self._identity


def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding, built offline from the bundled ranks (sha256-checked) and bpe.py's GPT-2 pattern."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(bpe.GPT2_FILE, expected_hash=bpe.GPT2_SHA256)
    enc = tiktoken.Encoding(name="gpt2", pat_str=bpe.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})
    return TiktokenTokenizer(enc, {"kind": "gpt2", "sha256": bpe.GPT2_SHA256})


def bpe_tokenizer(tok):
    """A bpe.Tokenizer trained by us; corpora are encoded through tiktoken (tests/test_bpe.py proves it gives the same
    ids as bpe.py's own, readable encoder). The identity is the full merge list: the checkpoint alone can rebuild it."""
    return TiktokenTokenizer(tok.to_tiktoken(), {"kind": "bpe", **tok.to_dict()})


def train_bpe(cfg, train_docs):
    """Train (or load from the cache) a BPE vocabulary on the TRAINING split only: the held-out works must not shape
    the vocabulary either, or val bits per byte would flatter it."""
    key = hashlib.sha256(json.dumps({"vocab_size": cfg.vocab_size, "pattern": bpe.GPT4_PATTERN, "specials": [EOT],
                                     "docs": [hashlib.sha256(d.encode()).hexdigest() for d in train_docs]}
                                    ).encode()).hexdigest()[:16]
    path = os.path.join(cfg.cache_dir, f"bpe-{cfg.vocab_size}-{key}.txt")
    if os.path.exists(path):
        return bpe.Tokenizer.load(path)
    if cfg.vocab_size <= 256:
        raise UsageError(f"--vocab-size {cfg.vocab_size}: a byte-level BPE vocabulary has at least 256 byte tokens + 1")
    t = time.time()
    tok = bpe.Tokenizer(pattern="gpt4").train("".join(train_docs), cfg.vocab_size - 1)  # -1: room for <|endoftext|>
    tok.register_special_tokens([EOT])
    os.makedirs(cfg.cache_dir, exist_ok=True)
    tok.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"trained a {tok.vocab_size}-token BPE vocabulary on the train split in {time.time() - t:.1f}s -> {path}")
    return tok


def build_tokenizer(cfg, train_docs, all_docs):
    """A fresh tokenizer for a new run. char: the alphabet of the whole corpus, held-out works included, as nanoGPT does
    (it gives every character an id; it tells the model nothing about the held-out text). gpt2: fixed. bpe: trained on
    the train split only, because its merges do encode knowledge of the text."""
    if cfg.tokenizer == "char":
        return CharTokenizer(sorted(set("".join(all_docs))))
    if cfg.tokenizer == "gpt2":
        return gpt2_tokenizer()
    if cfg.tokenizer == "bpe":
        return bpe_tokenizer(train_bpe(cfg, train_docs))
    raise UsageError(f"unknown --tokenizer {cfg.tokenizer!r}; choose from: char, gpt2, bpe")


def tokenizer_from_identity(ident):
    """Rebuild the tokenizer a checkpoint recorded."""
    if ident["kind"] == "char":
        return CharTokenizer(ident["chars"], ident["specials"])
    if ident["kind"] == "gpt2":
        return gpt2_tokenizer()
    if ident["kind"] == "bpe":
        return bpe_tokenizer(bpe.Tokenizer.from_dict({k: v for k, v in ident.items() if k != "kind"}))
    raise UsageError(f"checkpoint uses tokenizer {ident['kind']!r}, which this checkout cannot rebuild")


# ----------------------------------------------------------------------------------------------------------------------
# Data: documents -> split by document -> one token stream per split (documents joined by <|endoftext|>), cached on disk
# as a uint16/uint32 memmap and rebuilt whenever a file's contents or the tokenizer change. Document starts are kept so
# objectives that need boundaries (BERT's sentence pairs, T5) can find them.


@dataclass
class Split:
    name: str
    tokens: np.ndarray  # 1-D memmap of token ids
    doc_starts: np.ndarray  # index into tokens where each document begins
    doc_names: list
    n_bytes: int  # UTF-8 bytes of the split's text


def read_documents(data):
    """{name: text} for every .txt file under a directory or matching a glob, sorted by name."""
    path = data or DEFAULT_DATA
    files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True)) if os.path.isdir(path) \
        else sorted(glob.glob(path, recursive=True))
    if not files:
        raise UsageError(f"--data {path!r}: no such directory, or no .txt files in it/matching it")
    base = path if os.path.isdir(path) else os.path.dirname(path.split("*")[0]) or "."
    docs = {}
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                text = fh.read()
        except (UnicodeDecodeError, OSError) as e:
            raise UsageError(f"--data: cannot read {f} as UTF-8 text ({e.__class__.__name__})") from None
        if text.strip():
            docs[os.path.splitext(os.path.relpath(f, base))[0]] = text
    if not docs:
        raise UsageError(f"--data {path!r}: the .txt files found hold no text")
    return docs


def split_documents(docs, val_docs):
    """(train names, val names). Whole documents are held out; a single document is split 90/10 by position."""
    names = list(docs)
    if val_docs:
        val = [v.strip() for v in val_docs.split(",") if v.strip()]
        missing = [v for v in val if v not in docs]
        if missing:
            raise UsageError(f"--val-docs: no document named {missing[0]!r} (documents: {', '.join(names[:8])}, ...)")
    elif all(v in docs for v in BUNDLED_VAL_DOCS):
        val = list(BUNDLED_VAL_DOCS)
    elif len(names) >= 2:
        val = names[len(names) // 20::10] or names[-1:]  # every 10th, starting mid-stride: deterministic, spread out
    else:
        return names, []
    train = [n for n in names if n not in val]
    if not train:
        raise UsageError("--val-docs holds out every document; nothing is left to train on")
    return train, val


def prepare_data(cfg, tokenizer_ident=None):
    """Tokenise (or load from cache) the corpus. Returns (tokenizer, {"train": Split, "val": Split})."""
    docs = read_documents(cfg.data)
    train_names, val_names = split_documents(docs, cfg.val_docs)
    texts = {"train": [docs[n] for n in train_names], "val": [docs[n] for n in val_names]}
    if not val_names:  # one document: hold out its last 10% (by position: the only split a single text allows)
        (name, text), = docs.items()
        cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1 or int(len(text) * 0.9)
        texts = {"train": [text[:cut]], "val": [text[cut:]]}
        train_names, val_names = [name + "[:90%]"], [name + "[90%:]"]
        print(f"note: one document only: validating on its last 10% ({len(text) - cut:,} characters)")
    if tokenizer_ident is not None:
        tok = tokenizer_from_identity(tokenizer_ident)
    else:
        tok = build_tokenizer(cfg, texts["train"], list(docs.values()))
    key = hashlib.sha256(json.dumps({
        "tokenizer": tok.identity(), "train": train_names, "val": val_names, "format": 2,
        "content": [hashlib.sha256(t.encode()).hexdigest() for part in ("train", "val") for t in texts[part]],
    }, sort_keys=True).encode()).hexdigest()[:16]
    cache = os.path.join(cfg.cache_dir, key)
    if not os.path.exists(os.path.join(cache, "meta.json")):
        _write_cache(cache, tok, texts, {"train": train_names, "val": val_names})
    with open(os.path.join(cache, "meta.json")) as f:
        meta = json.load(f)
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for part in ("train", "val"):
        tokens = np.memmap(os.path.join(cache, f"{part}.bin"), dtype=dtype, mode="r")
        m = meta[part]
        starts = np.load(os.path.join(cache, f"{part}.starts.npy"))
        splits[part] = Split(part, tokens, starts, m["doc_names"], m["n_bytes"])
    return tok, splits, key


def _write_cache(cache, tok, texts, names):
    """Tokenise each split into <part>.bin, a batch of documents at a time, appending to the file as we go: memory
    holds one batch of token lists, never the whole stream (a Python int costs ~36 bytes; GPT-2's 9B tokens would not
    fit). Document starts go to <part>.starts.npy."""
    os.makedirs(cache, exist_ok=True)
    dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32
    meta = {"dtype": np.dtype(dtype).name, "tokenizer": tok.identity()}
    encode_all = getattr(tok, "encode_corpus", None) or (lambda ds: [tok.encode(d) for d in ds])
    for part in ("train", "val"):
        docs, starts, n = texts[part], [], 0
        with open(os.path.join(cache, f"{part}.bin.tmp"), "wb") as f:
            for i in range(0, len(docs), 256):
                for ids in encode_all(docs[i:i + 256]):
                    starts.append(n)
                    arr = np.array(ids + [tok.eot_id], dtype=dtype)  # documents end with <|endoftext|>, as in GPT-2's data
                    arr.tofile(f)
                    n += len(arr)
        np.save(os.path.join(cache, f"{part}.starts.npy"), np.array(starts, dtype=np.int64))
        os.replace(os.path.join(cache, f"{part}.bin.tmp"), os.path.join(cache, f"{part}.bin"))
        meta[part] = {"doc_names": names[part], "n_tokens": n, "n_bytes": sum(len(t.encode("utf-8")) for t in docs)}
    _atomic_write_text(os.path.join(cache, "meta.json"), json.dumps(meta))  # written last: marks the cache complete


def _atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# Device, precision, throughput


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown --device {name!r}; choose from: auto, cpu, cuda, cuda:N, mps")
    return name


def cpu_has_native_bf16():
    # AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32 (measured in the README). Without them, CPU
    # bf16 is emulated and slower than fp32.
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def pick_dtype(name, device):
    if name != "auto":
        if name not in ("bf16", "fp16", "fp32"):
            raise UsageError(f"unknown --dtype {name!r}; choose from: auto, bf16, fp16, fp32")
        return name
    kind = device.split(":")[0]
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"  # mps: autocast support varies by macOS version; fp32 always works


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for MFU (Chowdhery et al. 2022, PaLM App. B).
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12,
                 "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device, dtype):
    """(FLOP/s, how it was obtained). GPUs: the datasheet. CPUs have no such number that means anything, so we time the
    best case ourselves: a 2048^3 matmul in the training dtype, i.e. MFU is relative to what this CPU actually reaches."""
    kind = device.split(":")[0]
    if kind == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} datasheet dense bf16"
        return None, f"{name}: peak unknown"
    if kind != "cpu":
        return None, "peak unknown"
    # its own generator: drawing from the global one would shift dropout's random stream and break exact resume
    a = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0)).to(TORCH_DTYPES[dtype])
    best = float("inf")
    for _ in range(16):  # the fastest of several: the first ones pay for warm-up and clock ramp-up
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best, f"best {dtype} 2048^3 matmul timed on this CPU at start-up"


# ----------------------------------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(model, cfg, device):
    # Decay matrices (Linear weights, embeddings) only: decaying biases and LayerNorm gains pulls them toward 0, which
    # is not a "simpler" model, just a different one (the convention since BERT's AdamWeightDecayOptimizer).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel updates every tensor (same maths, tests/test_train.py checks it); on CPU it is ~3x faster than
    # the per-tensor loop, which matters for small models whose step is a few ms.
    fused = device.split(":")[0] in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def lr_at(step, cfg):
    """Linear warm-up from 0 to lr over warmup_iters, then cosine decay to min_lr at lr_decay_iters, then flat.
    With lr=1e-3, min_lr=1e-4, warmup=100, decay=2000: lr_at(50) = 5e-4, lr_at(1050) = 5.5e-4, lr_at(2000) = 1e-4."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: plain data only (tensors, numbers, strings, lists, dicts), so torch.load(weights_only=True) can read them
# without running any pickled code; written to a temp file and renamed, so a crash mid-save keeps the previous one.


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a readable checkpoint ({e.__class__.__name__}); it may be corrupt") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "tokenizer", "step"} <= set(ckpt):
        raise UsageError(f"{path} is not a checkpoint written by train.py")
    return ckpt


def load_for_inference(path, device="cpu"):
    """(model in eval mode, tokenizer, checkpoint dict) from a train.py checkpoint. Used by gpt.py's sampler."""
    ckpt = load_checkpoint(path)
    mod = model_module(ckpt["train_config"]["model"])
    model = mod.Model(mod.Config(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tokenizer_from_identity(ckpt["tokenizer"]), ckpt


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation, logging, plotting


@torch.no_grad()
def evaluate(model, objective, split, cfg, device, autocast, max_tokens=None):
    """Score the model on `split` (all of it unless max_tokens) in a fixed order: the same numbers on every run."""
    model.eval()
    sums = {}
    rows = cfg.eval_batch_size or max(cfg.batch_size, 16384 // objective.block_size)  # no backward: big batches are cheap
    for batch in objective.eval_batches(split, rows, max_tokens):
        with autocast:
            _, stats = objective.loss(model, to_device(batch, device))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + (v.item() if torch.is_tensor(v) else v)
    model.train()
    return objective.summarize(sums)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def chunk(batch, n):
    """Split a step's batch (leading dim B * n) into n micro-batches."""
    parts = {k: v.chunk(n) for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plot_metrics(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2 if ev and "val_bpb" in ev[0] else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    if tr:
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], color="tab:blue", alpha=0.35, lw=1,
                label="train (batch)")
    if ev:
        ax.plot([r["step"] for r in ev], [r["train_loss"] for r in ev], "o-", color="tab:blue", label="train (eval)")
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", color="tab:orange", label="val (held-out works)")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    if axes.shape[1] > 1:
        ax = axes[0][1]
        ax.plot([r["step"] for r in ev], [r["train_bpb"] for r in ev], "o-", color="tab:blue", label="train")
        ax.plot([r["step"] for r in ev], [r["val_bpb"] for r in ev], "o-", color="tab:orange", label="val")
        ax.set(xlabel="step", ylabel="bits per byte", title="tokenizer-independent: bits per UTF-8 byte")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ----------------------------------------------------------------------------------------------------------------------
# The loop


class Interrupted(Exception):
    pass


class NonFiniteLoss(Exception):
    pass


def optimizer_step(train_model, model, objective, optimizer, scaler, autocast, batch, cfg, device):
    """One optimizer step on `batch` (batch_size * grad_accum rows): forward and backward per micro-batch, then clip and
    update. Returns the step's mean loss. The loss is read back once per step (one host sync, not one per micro-batch)
    and checked before the update, so a NaN never reaches the weights."""
    loss_sum = 0.0
    for micro in chunk(batch, cfg.grad_accum):
        with autocast:
            loss, _ = objective.loss(train_model, to_device(micro, device))
        scaler.scale(loss / cfg.grad_accum).backward()  # mean over the step = mean of the micro-batch means
        loss_sum = loss_sum + loss.detach()
    step_loss = loss_sum.item() / cfg.grad_accum
    if not math.isfinite(step_loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss is {step_loss}")
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def train(argv=None, on_step=None):
    """Run training as `python train.py argv...` would. on_step(step, loss) is called after every optimizer step (tests
    and notebooks use it to watch or interrupt a run). Returns the list of metric rows."""
    cfg, model_kwargs, explicit = resolve_config(argv or [])
    mod = model_module(cfg.model)
    cfg.out_dir = cfg.out_dir or os.path.join("out", cfg.model)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    # --- everything that can be wrong with the input is checked before anything is written ---
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        saved = ckpt["model_config"]
        for key, value in model_kwargs.items():
            if key in explicit and saved.get(key) != value:
                if key == "block_size" and value > saved[key]:
                    raise UsageError(f"--block-size {value} is larger than the checkpoint's position table "
                                     f"({saved[key]} positions)")
                raise UsageError(f"--resume: --{key.replace('_', '-')} {value!r} does not match the checkpoint's "
                                 f"{saved.get(key)!r}")
        saved_train = ckpt["train_config"]
        for key in ("model", "tokenizer", "data", "val_docs", "vocab_size"):
            if key in explicit and getattr(cfg, key) != saved_train[key]:
                raise UsageError(f"--resume: --{key.replace('_', '-')} {getattr(cfg, key)!r} does not match the "
                                 f"checkpoint's {saved_train[key]!r}")
        # the run continues with the settings it was started with; only flags given now change them (e.g. a longer
        # --max-iters). Falling back to the preset instead would silently change lr or schedule mid-run.
        for key, value in saved_train.items():
            if key not in explicit and key not in ("resume", "overwrite", "bench", "out_dir"):
                setattr(cfg, key, value)
        model_kwargs = {k: v for k, v in saved.items() if k != "vocab_size"}
    elif os.path.exists(ckpt_path) and not cfg.bench and not cfg.overwrite:
        raise UsageError(f"{cfg.out_dir} already holds a run (ckpt.pt); pass --resume to continue it, --overwrite to "
                         f"replace it, or --out-dir to start another")
    device = pick_device(cfg.device)  # after a resume has restored the run's own --device/--dtype
    dtype = pick_dtype(cfg.dtype, device)
    try:
        model_cfg_probe = mod.Config(vocab_size=1, **model_kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    tokens_per_micro = cfg.batch_size * model_cfg_probe.block_size
    if cfg.tokens_per_step:
        if cfg.tokens_per_step % tokens_per_micro:
            raise UsageError(f"--tokens-per-step {cfg.tokens_per_step} is not a multiple of batch_size x block_size = "
                             f"{cfg.batch_size} x {model_cfg_probe.block_size} = {tokens_per_micro}")
        cfg.grad_accum = cfg.tokens_per_step // tokens_per_micro
    for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "log_interval"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")

    tokenizer, splits, data_key = prepare_data(cfg, ckpt["tokenizer"] if ckpt else None)
    for part, split in splits.items():
        if len(split.tokens) < model_cfg_probe.block_size + 1:
            raise UsageError(f"the {part} split has {len(split.tokens)} tokens, fewer than block_size + 1 = "
                             f"{model_cfg_probe.block_size + 1}; use a smaller --block-size or more data")
    if ckpt and ckpt.get("data_key") not in (None, data_key):
        raise UsageError("--resume: the corpus changed since the checkpoint was written (its files' contents differ)")

    # --- build ---
    torch.manual_seed(cfg.seed)
    model_cfg = mod.Config(vocab_size=tokenizer.n_vocab, **model_kwargs)
    model = mod.Model(model_cfg).to(device)
    objective = mod.Objective(model_cfg, tokenizer.token_bytes().to(device))
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == "fp16"))
    autocast = torch.autocast(device.split(":")[0], dtype=TORCH_DTYPES[dtype]) if dtype != "fp32" \
        else contextlib.nullcontext()
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # owns the batch order: saved and restored with the run
    step, rows = 0, []
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        batch_gen.set_state(ckpt["rng"]["batch"])
        if device.startswith("cuda") and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        rows = [r for r in _read_metrics(cfg.out_dir) if r["step"] <= step]
    train_model = torch.compile(model) if cfg.compile else model
    tokens_per_step = cfg.batch_size * cfg.grad_accum * model_cfg.block_size
    peak, peak_how = peak_flops(device, dtype)
    flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else None

    print(f"model {cfg.model} preset {cfg.preset}: {model.num_params() / 1e6:.2f}M parameters | {json.dumps(model_kwargs)}")
    print(f"data {cfg.data or DEFAULT_DATA}: train {len(splits['train'].doc_names)} docs {len(splits['train'].tokens):,} "
          f"tokens | val {len(splits['val'].doc_names)} docs {len(splits['val'].tokens):,} tokens "
          f"({', '.join(splits['val'].doc_names)}) | tokenizer {cfg.tokenizer} ({tokenizer.n_vocab} ids)")
    print(f"device {device} {dtype}{' +compile' if cfg.compile else ''} | tokens per step = batch {cfg.batch_size} x "
          f"block {model_cfg.block_size} x grad_accum {cfg.grad_accum} = {tokens_per_step:,}"
          + (f" | resuming at step {step}" if ckpt else ""))
    if peak:
        print(f"MFU is relative to {peak / 1e12:.2f} TFLOP/s ({peak_how})")

    if cfg.bench:
        return _bench(cfg, train_model, model, objective, optimizer, scaler, autocast, splits, batch_gen, device,
                      tokens_per_step, peak, flops_per_token)

    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    _atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    val_tokens = len(splits["val"].tokens)
    eval_train_tokens = cfg.eval_train_tokens or val_tokens

    def log_row(row):
        rows.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "model_config": asdict(model_cfg), "train_config": asdict(cfg),
            "tokenizer": tokenizer.identity(), "data_key": data_key,
            "rng": {"torch": torch.get_rng_state(), "batch": batch_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None},
        })

    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt  # second Ctrl-C: give up at once
        stop["signal"] = signal.Signals(signum).name
        print(f"\n{stop['signal']}: finishing this step, then saving a checkpoint (press again to abort)", flush=True)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    t_start, t_last, steps_timed = time.time(), time.time(), 0
    resumed_at = step if ckpt else None
    try:
        while True:
            if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step != resumed_at:
                t_eval = time.time()
                val = evaluate(model, objective, splits["val"], cfg, device, autocast)
                tr = evaluate(model, objective, splits["train"], cfg, device, autocast, max_tokens=eval_train_tokens)
                row = {"kind": "eval", "step": step, **{f"train_{k}": v for k, v in tr.items()},
                       **{f"val_{k}": v for k, v in val.items()}, "time": time.time() - t_start}
                log_row(row)
                print(f"eval step {step}: " + " | ".join(
                    f"{part} " + " ".join(f"{v:.4f} {'nats/tok' if k == 'loss' else k}" for k, v in m.items())
                    for part, m in (("train", tr), ("val", val))) + f" ({time.time() - t_eval:.1f}s)", flush=True)
                checkpoint()
                plot_metrics(rows, os.path.join(cfg.out_dir, "loss.png"), f"{cfg.model} / {cfg.preset}")
                t_last += time.time() - t_eval  # evals do not count toward ms/step
            if step >= cfg.max_iters:
                break

            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = objective.train_batch(splits["train"], cfg.batch_size * cfg.grad_accum, batch_gen)
            try:
                step_loss = optimizer_step(train_model, model, objective, optimizer, scaler, autocast, batch, cfg, device)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"{e} at step {step}") from None
            step += 1
            steps_timed += 1

            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                now = time.time()
                ms = (now - t_last) * 1000 / steps_timed
                tok_s = tokens_per_step / (ms / 1000)
                mfu = flops_per_token * tok_s / peak if peak and flops_per_token else None
                log_row({"kind": "train", "step": step, "loss": step_loss, "lr": lr, "tok_s": tok_s, "ms": ms,
                         "mfu": mfu, "time": now - t_start})
                print(f"step {step}/{cfg.max_iters} | loss {step_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                      f"{ms:.0f} ms/step | MFU {'n/a' if mfu is None else f'{mfu:.1%}'} | "
                      f"ETA {fmt_time((cfg.max_iters - step) * ms / 1000)}", flush=True)
                t_last, steps_timed = now, 0
            if on_step is not None:
                on_step(step, step_loss)
            if stop["signal"]:
                raise Interrupted
    except Interrupted:
        checkpoint()
        print(f"stopped at step {step}; checkpoint saved to {ckpt_path}; continue with: python train.py "
              f"--model {cfg.model} --out-dir {cfg.out_dir} --resume")
        return rows
    except NonFiniteLoss as e:
        kept = f"the last good checkpoint ({ckpt_path}) is kept" if os.path.exists(ckpt_path) else "no checkpoint yet"
        raise UsageError(f"{e}; stopping. {kept}. Try a lower --lr or --grad-clip") from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

    print(f"done: {step} steps in {fmt_time(time.time() - t_start)}; wrote {ckpt_path}, {metrics_path}, "
          f"{os.path.join(cfg.out_dir, 'loss.png')}")
    if cfg.sample_tokens > 0 and hasattr(model, "generate"):
        prompt = tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        out = model.generate(torch.tensor([prompt], device=device), cfg.sample_tokens, temperature=cfg.temperature,
                             top_k=cfg.top_k or None, generator=g)
        print("-" * 80 + "\n" + tokenizer.decode(out[0].tolist()) + "\n" + "-" * 80)
    return rows


def _read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _bench(cfg, train_model, model, objective, optimizer, scaler, autocast, splits, batch_gen, device, tokens_per_step,
           peak, flops_per_token):
    """Time full optimizer steps (data, forward, backward, clip, AdamW) after a warm-up; nothing is written."""

    def one_step():  # exactly what the training loop runs per step
        batch = objective.train_batch(splits["train"], cfg.batch_size * cfg.grad_accum, batch_gen)
        optimizer_step(train_model, model, objective, optimizer, scaler, autocast, batch, cfg, device)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(5):
        one_step()
    sync()
    t = time.perf_counter()
    for _ in range(cfg.bench_iters):
        one_step()
    sync()
    ms = (time.perf_counter() - t) * 1000 / cfg.bench_iters
    tok_s = tokens_per_step / (ms / 1000)
    mfu = flops_per_token * tok_s / peak if peak and flops_per_token else None
    print(f"bench: {ms:.1f} ms/step | {tok_s:,.0f} tokens/s | MFU {'n/a' if mfu is None else f'{mfu:.1%}'} | "
          f"{cfg.bench_iters} steps of {tokens_per_step:,} tokens")
    return [{"kind": "bench", "ms": ms, "tok_s": tok_s, "mfu": mfu}]


def main(argv=None):
    try:
        train(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
