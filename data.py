"""
The data every model trains on: text files -> documents -> a tokenizer -> one token stream per
split, with where each document and each line begins. train.py calls prepare_data(); the model
files' objectives read the Splits it returns.

    tok, splits, key = prepare_data(cfg)    # cfg: data, val_docs, tokenizer, vocab_size, cache_dir
    splits["train"].tokens                  # uint16/uint32 memmap: <|endoftext|>-joined documents
    splits["val"].doc_starts, .line_starts  # document / line starts (BERT's sentence pairs, T5)

Whole documents are held out: val measures text the model never saw, not a neighbouring passage.
Token streams are cached on disk, keyed by the files' contents and the tokenizer: either change
rebuilds them. Tokenizers: `char` (one id per character, nanoGPT's shakespeare_char), `gpt2`
(OpenAI's, offline from data/gpt2.tiktoken), `bpe` (trained by bpe.py on the train split).
Every model's special tokens go above the ordinary ids.
Slides (lecture 001): "Byte Pair Encoding algorithm" (bpe.py), "Pretraining language models" (data).
"""

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

import bpe
from common import UsageError, command, require

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(ROOT, "data", "shakespeare")
# The bundled corpora's held-out works, whole (val measures unseen text, not memory of a nearby
# passage). Shakespeare: one tragedy, one comedy, one history (384 KB, 7.6% of 5.06 MB).
# Milton: Paradise Regained (93 KB of 726 KB), verse like Paradise Lost, which stays in training.
BUNDLED_VAL_DOCS = ("julius_caesar", "twelfth_night", "henry_v")
BUNDLED_VAL = {"shakespeare": BUNDLED_VAL_DOCS, "milton": ("paradise_regained",)}

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers: text <-> ids, and the plain-data identity a checkpoint records, so sampling and
# resume rebuild the same one. Special tokens sit above the ordinary vocabulary: <|endoftext|>
# (between documents; every model has it), then the model file's SPECIAL_TOKENS in their order.
# Encoding the corpus never turns ordinary text into a special token.

EOT = "<|endoftext|>"


def special_tokens_of(mod):
    """[EOT, then the model's own specials]: the order fixes their ids."""
    return [EOT] + [s for s in getattr(mod, "SPECIAL_TOKENS", ()) if s != EOT]


class CharTokenizer:
    """One id per character of the corpus's alphabet (nanoGPT's shakespeare_char), specials after.
    CharTokenizer("ab").encode("ba") -> [1, 0]
    With specials=[EOT, "[MASK]"]: encode("a[MASK]") -> [0, 3]"""

    def __init__(self, chars, specials=(EOT,)):
        self.chars = "".join(chars)
        self.itos = list(self.chars) + list(specials)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.specials = {s: len(self.chars) + i for i, s in enumerate(specials)}
        self.n_vocab = len(self.itos)
        self.eot_id = self.specials[EOT]
        # longest first, so a special that is a prefix of another does not win
        self._special_re = re.compile("|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))))

    def encode(self, text):
        """Text -> ids; special-token strings become their ids (a prompt may say "[MASK]")."""
        ids, at = [], 0
        for m in self._special_re.finditer(text):
            ids += self.encode_ordinary(text[at:m.start()]) + [self.specials[m.group()]]
            at = m.end()
        return ids + self.encode_ordinary(text[at:])

    def encode_ordinary(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - set(self.stoi))
            raise UsageError(f"characters not in this char vocabulary: {unknown!r}") from None

    def encode_corpus(self, docs):
        return [self.encode_ordinary(d) for d in docs]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    @functools.cached_property
    def token_bytes(self):
        """(V,) UTF-8 length of each token (0 for specials): bits per byte, line boundaries."""
        return torch.tensor([len(c.encode("utf-8")) for c in self.chars] + [0] * len(self.specials))

    def identity(self):
        return {"kind": "char", "chars": self.chars, "specials": list(self.specials)}


class TiktokenTokenizer:
    """Any tiktoken.Encoding; `gpt2`: OpenAI's GPT-2 encoding, offline from data/gpt2.tiktoken."""

    def __init__(self, enc, identity):
        self.enc, self._identity = enc, identity
        self.n_vocab, self.eot_id = enc.n_vocab, enc.eot_token
        self.specials = dict(enc._special_tokens)

    def encode(self, text):
        return self.enc.encode(text, allowed_special="all")

    def encode_corpus(self, docs):
        return self.enc.encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.enc.decode(ids)

    @functools.cached_property
    def token_bytes(self):
        special = set(self.specials.values())
        out = []
        for i in range(self.n_vocab):
            try:
                out.append(0 if i in special else len(self.enc.decode_single_token_bytes(i)))
            except KeyError:
                out.append(0)
        return torch.tensor(out)

    def identity(self):
        return self._identity


def gpt2_tokenizer(extra_specials=()):
    """tiktoken's GPT-2 encoding, built offline from the bundled ranks (sha256-checked) and bpe.py's
    GPT-2 pattern. extra_specials: ids 50257, 50258, ... after GPT-2's <|endoftext|> = 50256."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(bpe.GPT2_FILE, expected_hash=bpe.GPT2_SHA256)
    specials = {EOT: 50256, **{s: 50257 + i for i, s in enumerate(extra_specials)}}
    enc = tiktoken.Encoding(name="gpt2", pat_str=bpe.GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials)
    return TiktokenTokenizer(enc, {"kind": "gpt2", "sha256": bpe.GPT2_SHA256,
                                   "specials": list(extra_specials)})


def bpe_tokenizer(tok):
    """A bpe.Tokenizer we trained; corpora go through tiktoken (tests/test_bpe.py: the same ids as
    bpe.py's own, readable encoder). Its identity is the full merge list: enough to rebuild it."""
    return TiktokenTokenizer(tok.to_tiktoken(), {"kind": "bpe", **tok.to_dict()})


def train_bpe(cfg, train_docs):
    """Train (or load from cache) a BPE vocabulary on the TRAINING split only. The held-out works
    must not shape the vocabulary either, or val bits per byte would flatter it."""
    key = hashlib.sha256(json.dumps({
        "vocab_size": cfg.vocab_size, "pattern": bpe.GPT4_PATTERN, "specials": [EOT],
        "docs": [hashlib.sha256(d.encode()).hexdigest() for d in train_docs],
    }).encode()).hexdigest()[:16]
    path = os.path.join(cfg.cache_dir, f"bpe-{cfg.vocab_size}-{key}.txt")
    if os.path.exists(path):
        return bpe.Tokenizer.load(path)
    if cfg.vocab_size <= 256:
        raise UsageError(f"--vocab-size {cfg.vocab_size}: "
                         "a byte-level BPE vocabulary has at least 256 byte tokens + 1")
    t = time.time()
    # vocab_size - 1: room for <|endoftext|>
    tok = bpe.Tokenizer(pattern="gpt4").train("".join(train_docs), cfg.vocab_size - 1)
    tok.register_special_tokens([EOT])
    os.makedirs(cfg.cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # of this process, as atomic_write_text's
    tok.save(tmp)
    os.replace(tmp, path)
    print(f"trained a {tok.vocab_size}-token BPE vocabulary on the train split "
          f"in {time.time() - t:.1f}s -> {path}")
    return tok


def build_tokenizer(cfg, train_docs, all_docs, specials):
    """A fresh tokenizer for a new run. char: the whole corpus's alphabet, held-out works included,
    as nanoGPT does (an id per character tells the model nothing of the held-out text). gpt2: fixed.
    bpe: the train split only, as its merges do encode knowledge of the text. Specials go on top."""
    if cfg.tokenizer == "char":
        return CharTokenizer(sorted(set("".join(all_docs))), specials)
    if cfg.tokenizer == "gpt2":
        return gpt2_tokenizer(specials[1:])
    if cfg.tokenizer == "bpe":
        tok = train_bpe(cfg, train_docs)
        tok.register_special_tokens(specials[1:])
        return bpe_tokenizer(tok)
    raise UsageError(f"unknown --tokenizer {cfg.tokenizer!r}; choose from: char, gpt2, bpe")


def tokenizer_from_identity(ident):
    """Rebuild the tokenizer a checkpoint recorded."""
    if ident["kind"] == "char":
        return CharTokenizer(ident["chars"], ident["specials"])
    if ident["kind"] == "gpt2":
        return gpt2_tokenizer(ident.get("specials", ()))
    if ident["kind"] == "bpe":
        return bpe_tokenizer(bpe.Tokenizer.from_dict({k: v for k, v in ident.items() if k != "kind"}))
    raise UsageError(f"checkpoint uses tokenizer {ident['kind']!r}, which this checkout cannot rebuild")


# ----------------------------------------------------------------------------------------------------------------------
# Data: documents -> split by document -> one token stream per split, documents joined by
# <|endoftext|>. Cached on disk as a uint16/uint32 memmap; rebuilt when a file or the tokenizer
# changes. Document and line starts are kept for boundaries (BERT's sentence pairs, T5, XLNet).


@dataclass
class Split:
    name: str
    tokens: np.ndarray  # 1-D memmap of token ids
    doc_starts: np.ndarray  # index into tokens where each document begins (0 first)
    line_starts: np.ndarray  # index of each line's first token: the first starting at or after
    #                          the byte after a newline (a BPE "\n " ends the previous line)
    doc_names: list
    n_bytes: int  # UTF-8 bytes of the split's text

    def slice(self, start, end):
        """The tokens [start, end) as a Split of their own, boundaries shifted. A slice always
        begins a document and a line: the part of one it cuts into.
        Split.slice(0, 100).tokens is tokens[:100]."""
        def inside(starts):
            s = np.asarray(starts[(starts > start) & (starts < end)], dtype=np.int64) - start
            return np.concatenate([[0], s])
        return Split(self.name, self.tokens[start:end], inside(self.doc_starts),
                     inside(self.line_starts), self.doc_names, 0)


def list_documents(data):
    """{name: path} for every .txt file under a directory or matching a glob, sorted by name.
    The name is the path relative to the directory, without .txt."""
    path = data or DEFAULT_DATA
    files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True)) \
        if os.path.isdir(path) else sorted(glob.glob(path, recursive=True))
    if not files:
        raise UsageError(f"--data {path!r}: no such directory, or no .txt files in it/matching it")
    # a FIFO or a device would block the read forever, or never end: only regular files are read
    odd = [f for f in files if not os.path.isfile(f)]
    if odd:
        raise UsageError(f"--data {path!r}: {odd[0]} is neither a regular file nor a directory")
    base = path if os.path.isdir(path) else os.path.dirname(path.split("*")[0]) or "."
    return {os.path.splitext(os.path.relpath(f, base))[0]: f for f in files}


def read_text(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (UnicodeDecodeError, OSError) as e:
        raise UsageError(f"--data: cannot read {path} as UTF-8 text ({e.__class__.__name__})") from None


def read_documents(data):
    """{name: text} for every non-empty .txt file of list_documents, sorted by name."""
    docs = {name: text for name, f in list_documents(data).items() if (text := read_text(f)).strip()}
    if not docs:
        raise UsageError(f"--data {data or DEFAULT_DATA!r}: the .txt files found hold no text")
    return docs


def split_documents(names, val_docs, val_every=10):
    """(train names, val names). Whole documents are held out: the named ones, else the bundled
    held-out works, else every val_every-th (from mid-stride: deterministic, spread out). A single
    document is not split here (its caller holds out its last 10% by position).
    split_documents(["a", "b", "c"], "b") -> (["a", "c"], ["b"])"""
    names = list(names)
    known = set(names)
    if val_docs:
        val = [v.strip() for v in val_docs.split(",") if v.strip()]
        missing = [v for v in val if v not in known]
        if missing:
            raise UsageError(f"--val-docs: no document named {missing[0]!r} "
                             f"(documents: {', '.join(names[:8])}, ...)")
    elif any(all(v in known for v in group) for group in BUNDLED_VAL.values()):
        val = [v for group in BUNDLED_VAL.values() if all(v in known for v in group) for v in group]
    elif len(names) >= 2:
        val = names[len(names) // (2 * val_every)::val_every] or names[-1:]
    else:
        return names, []
    held = set(val)
    train = [n for n in names if n not in held]
    if not train:
        raise UsageError("--val-docs holds out every document; nothing is left to train on")
    return train, val


# ----------------------------------------------------------------------------------------------------------------------
# Several corpora at once (continued pretraining with replay): --data milton:0.75,shakespeare:0.25
# trains on a mixture, each row drawn from a corpus with these probabilities, and evaluates on
# every corpus named, weight 0 included (never trained on). One tokenizer built from all serves all.


@dataclass
class Domain:
    name: str
    path: str
    weight: float
    splits: dict = None  # {"train": Split, "val": Split}


def parse_data(spec):
    """--data -> [Domain]. A path or glob is one corpus of weight 1; "a:0.75,b:0.25" is a mixture,
    where a name without os.sep that is no file or directory is a bundled corpus (data/<name>).
    parse_data("milton:3,shakespeare:1") ->
        [Domain("milton", "data/milton", 0.75), Domain("shakespeare", ..., 0.25)]"""
    spec = spec or DEFAULT_DATA

    def resolve(path):
        if not os.path.exists(path) and os.sep not in path and os.path.isdir(os.path.join(ROOT, "data", path)):
            return os.path.join(ROOT, "data", path)  # a bundled corpus by name
        return path

    parts = [p.rsplit(":", 1) for p in spec.split(",")]
    if len(parts) == 1 and (len(parts[0]) == 1 or not re.fullmatch(r"[0-9.eE+-]+", parts[0][1])):
        return [Domain(os.path.basename(os.path.normpath(spec.split("*")[0])) or "data", resolve(spec), 1.0)]
    domains = []
    for p in parts:
        if len(p) != 2:
            raise UsageError(f"--data {spec!r}: a mixture is name:weight,name:weight "
                             "(milton:0.75,shakespeare:0.25)")
        path, weight = p
        try:
            weight = float(weight)
        except ValueError:
            raise UsageError(f"--data {spec!r}: weight {weight!r} of {path!r} is not a number") from None
        if weight < 0:
            raise UsageError(f"--data {spec!r}: weights must be >= 0")
        path = resolve(path)
        domains.append(Domain(os.path.basename(os.path.normpath(path)), path, weight))
    total = sum(d.weight for d in domains)
    if total <= 0:
        raise UsageError(f"--data {spec!r}: at least one corpus needs a weight above 0")
    names = [d.name for d in domains]
    if len(set(names)) < len(names):
        raise UsageError(f"--data {spec!r}: two corpora are called {max(names, key=names.count)!r}")
    for d in domains:
        d.weight /= total
    return domains


def prepare_domains(cfg, specials=(EOT,), tokenizer_ident=None):
    """(tokenizer, [Domain + splits], cache key) for --data; one corpus goes to prepare_data."""
    domains = parse_data(cfg.data)
    if len(domains) == 1:
        tok, domains[0].splits, key = prepare_data(dataclasses.replace(cfg, data=domains[0].path),
                                                   specials, tokenizer_ident)
        return tok, domains, key
    if tokenizer_ident is None:  # one tokenizer from every corpus (BPE: their train splits)
        train_texts, all_texts = [], []
        for d in domains:
            docs = read_documents(d.path)
            train_names, _ = split_documents(docs, "")
            train_texts += [docs[n] for n in train_names]
            all_texts += list(docs.values())
        tokenizer_ident = build_tokenizer(cfg, train_texts, all_texts, list(specials)).identity()
    keys = []
    for d in domains:
        tok, d.splits, key = prepare_data(dataclasses.replace(cfg, data=d.path, val_docs=""),
                                          specials, tokenizer_ident)
        keys.append(key)
    return tok, domains, _digest({"domains": [(d.name, d.weight) for d in domains], "keys": keys})


def prepare_data(cfg, specials=(EOT,), tokenizer_ident=None):
    """Tokenise or load from cache: (tokenizer, {"train": Split, "val": Split}, cache key).
    A directory written by `python data.py prepare` is read as is (big corpora: see prepare())."""
    if cfg.data and os.path.exists(os.path.join(cfg.data, PREPARED)):
        return _read_prepared(cfg, specials, tokenizer_ident)
    docs = read_documents(cfg.data)
    train_names, val_names = split_documents(docs, cfg.val_docs)
    texts = {"train": [docs[n] for n in train_names], "val": [docs[n] for n in val_names]}
    if not val_names:  # one document: hold out its last 10% (by position: all one text allows)
        (name, text), = docs.items()
        cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1 or int(len(text) * 0.9)
        texts = {"train": [text[:cut]], "val": [text[cut:]]}
        train_names, val_names = [name + "[:90%]"], [name + "[90%:]"]
        print(f"note: one document only: validating on its last 10% ({len(text) - cut:,} characters)")
    if tokenizer_ident is not None:
        tok = tokenizer_from_identity(tokenizer_ident)
    else:
        tok = build_tokenizer(cfg, texts["train"], list(docs.values()), list(specials))
    key = hashlib.sha256(json.dumps({
        "tokenizer": tok.identity(), "train": train_names, "val": val_names, "format": 3,
        "content": [hashlib.sha256(t.encode()).hexdigest()
                    for part in ("train", "val") for t in texts[part]],
    }, sort_keys=True).encode()).hexdigest()[:16]
    cache = os.path.join(cfg.cache_dir, key)
    if not os.path.exists(os.path.join(cache, "meta.json")):
        # Trap: runs started at once (tables.py --jobs) would append to the same files. Each builds in a
        # directory of its own and renames it into place; the first rename wins, the others' copies are the same.
        build = f"{cache}.{os.getpid()}.tmp"
        os.makedirs(build, exist_ok=True)
        meta = {"dtype": _dtype_for(tok), "tokenizer": tok.identity()}
        for part, names in (("train", train_names), ("val", val_names)):
            writer = StreamWriter(build, part, tok, meta["dtype"])
            for i in range(0, len(texts[part]), 256):
                writer.add(texts[part][i:i + 256])
            meta[part] = {**writer.commit(), "doc_names": names}
            writer.close()
        atomic_write_text(os.path.join(build, "meta.json"), json.dumps(meta))
        if os.path.isdir(cache) and not os.path.exists(os.path.join(cache, "meta.json")):
            shutil.rmtree(cache)  # an interrupted build (meta.json is written last)
        try:
            os.rename(build, cache)
        except OSError:  # another run's build was renamed first
            shutil.rmtree(build)
    with open(os.path.join(cache, "meta.json")) as f:
        meta = json.load(f)
    return tok, {part: _split(cache, part, meta) for part in ("train", "val")}, key


def _split(directory, part, meta):
    m = meta[part]
    names = m["doc_names"] if m.get("doc_names") is not None else [f"#{i}" for i in range(m["docs"])]
    return Split(part, _memmap(os.path.join(directory, f"{part}.bin"), meta["dtype"], m["tokens"]),
                 _memmap(os.path.join(directory, f"{part}.docs.bin"), "int64", m["docs"]),
                 _memmap(os.path.join(directory, f"{part}.lines.bin"), "int64", m["lines"]),
                 names, m["n_bytes"])


def _dtype_for(tok):
    return "uint16" if tok.n_vocab <= 2**16 else "uint32"


def _memmap(path, dtype, n):
    """The first n items of a binary file: an interrupted prepare may write past its last commit."""
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)


def _line_starts(text, ids, token_bytes):
    """Token index of each line's first token in one document: '\\n' bytes -> byte offsets -> the
    first token starting at or after each.
    _line_starts("ab\\ncd", [0, 1, 2, 3, 4], ones) -> [0, 3] (char tokens: one byte each)."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    line_bytes = np.concatenate([[0], np.flatnonzero(raw == 10) + 1])  # lines start after newlines
    token_starts = np.concatenate([[0], np.cumsum(token_bytes[np.asarray(ids, dtype=np.int64)])[:-1]])
    idx = np.unique(np.searchsorted(token_starts, line_bytes, side="left"))
    return idx[idx < len(ids)]


class StreamWriter:
    """Appends tokenised documents to <directory>/<part>.bin (the token stream, each document
    followed by <|endoftext|>, as in GPT-2's data), <part>.docs.bin and <part>.lines.bin (int64:
    document and line starts). Memory holds one batch of documents, never the stream: at ~36 bytes
    a Python int, GPT-2's 9B tokens would not fit. commit() flushes and returns the counts so far.
    A writer opened with those counts truncates the files to them and continues: so an interrupted
    `prepare` resumes exactly at its last commit."""

    EXTS = (".bin", ".docs.bin", ".lines.bin")

    def __init__(self, directory, part, tok, dtype, committed=None):
        self.tok, self.dtype, self.token_bytes = tok, np.dtype(dtype), tok.token_bytes.numpy()
        c = committed or {"tokens": 0, "docs": 0, "lines": 0, "n_bytes": 0}
        self.counts = {k: c[k] for k in ("tokens", "docs", "lines", "n_bytes")}
        sizes = (c["tokens"] * self.dtype.itemsize, c["docs"] * 8, c["lines"] * 8)
        self.files = []
        for ext, size in zip(self.EXTS, sizes):
            path = os.path.join(directory, part + ext)
            with open(path, "ab") as f:
                f.truncate(size)  # drop what an interrupted run wrote after its last commit
            self.files.append(open(path, "ab"))

    def add(self, texts):
        """Tokenise and append a batch of documents (the tokenizer encodes a batch on all cores).
        Empty ones are skipped, as read_documents skips empty files."""
        out, doc_out, line_out = self.files
        texts = [t for t in texts if t.strip()]
        for text, ids in zip(texts, self.tok.encode_corpus(texts)):
            n = self.counts["tokens"]
            np.array([n], dtype=np.int64).tofile(doc_out)
            # <|endoftext|>: a line of its own
            lines = np.append(_line_starts(text, ids, self.token_bytes), len(ids))
            (lines + n).astype(np.int64).tofile(line_out)
            np.array(ids + [self.tok.eot_id], dtype=self.dtype).tofile(out)
            self.counts["tokens"] += len(ids) + 1
            self.counts["docs"] += 1
            self.counts["lines"] += len(lines)
            self.counts["n_bytes"] += len(text.encode("utf-8"))

    def commit(self):
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
        return dict(self.counts)

    def close(self):
        for f in self.files:
            f.close()


# ----------------------------------------------------------------------------------------------------------------------
# Big corpora: `python data.py prepare` streams a corpus into a directory for --data. The path
# above reads every file into memory first (fine for the bundled 6 MB); this one holds at most a
# batch of documents, commits every --commit-every documents, and resumes from its last commit.

PREPARED = "prepared.json"


def _sources(data, text_column):
    """(names or None, number of documents, documents(start) -> texts from document `start` on).
    A directory or glob of .txt files (one document each), or a `datasets` dataset saved with
    save_to_disk (optional package; one document per record of text_column)."""
    if data and os.path.exists(os.path.join(data, "dataset_info.json")):
        try:
            import datasets
        except ImportError:
            raise UsageError(f"--data {data} is a Hugging Face `datasets` directory; "
                             "pip install datasets to read it") from None
        ds = datasets.load_from_disk(data)
        if text_column not in ds.column_names:
            raise UsageError(f"--text-column {text_column!r}: the dataset has columns {ds.column_names}")
        return None, len(ds), lambda start, idx: (ds[int(i)][text_column] for i in idx[start:])
    files = list_documents(data)
    paths = list(files.values())
    return list(files), len(paths), lambda start, idx: (read_text(paths[i]) for i in idx[start:])


def prepare(data, out, tokenizer="gpt2", val_docs="", val_every=10, commit_every=1000,
            text_column="text"):
    """Resumably tokenise a corpus into `out`: train/val .bin, .docs.bin, .lines.bin, prepared.json.
    Returns the prepared.json contents."""
    names, n, documents = _sources(data, text_column)
    if names is not None:
        train_names, val_names = split_documents(names, val_docs, val_every)
        index = {name: i for i, name in enumerate(names)}
        order = {"train": [index[x] for x in train_names], "val": [index[x] for x in val_names]}
    else:
        val = set(range(val_every // 2, n, val_every))
        order = {"train": [i for i in range(n) if i not in val], "val": sorted(val)}
    if not order["val"] or not order["train"]:
        raise UsageError(f"--data {data}: {n} document(s) cannot be split into train and val documents")
    meta_path = os.path.join(out, PREPARED)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["source"] != {"data": data, "order": _digest(order), "tokenizer": tokenizer}:
            raise UsageError(f"{out} holds a prepare of other data or settings; "
                             "choose another output directory")
        tok = tokenizer_from_identity(meta["tokenizer"])
    else:
        if tokenizer == "char":  # one streaming pass for the alphabet
            chars = set()
            for text in documents(0, list(range(n))):
                chars |= set(text)
            tok = CharTokenizer(sorted(chars))
        elif tokenizer == "gpt2":
            tok = gpt2_tokenizer()
        else:
            raise UsageError(f"prepare: --tokenizer {tokenizer!r}: choose char or gpt2 "
                             f"(a BPE vocabulary is trained on text in memory: "
                             f"use the in-memory path for it)")
        meta = {"source": {"data": data, "order": _digest(order), "tokenizer": tokenizer},
                "dtype": _dtype_for(tok), "tokenizer": tok.identity(), "done": False,
                **{part: {"tokens": 0, "docs": 0, "lines": 0, "n_bytes": 0, "read": 0,
                          "doc_names": None if names is None else [names[i] for i in order[part]]}
                   for part in ("train", "val")}}
        os.makedirs(out, exist_ok=True)
        atomic_write_text(meta_path, json.dumps(meta))
    t0, batch_size = time.time(), max(1, min(64, commit_every))
    for part in ("train", "val"):
        writer = StreamWriter(out, part, tok, meta["dtype"], meta[part])
        read, start, batch = meta[part]["read"], meta[part]["read"], []
        for text in documents(start, order[part]):
            batch.append(text)
            read += 1
            if len(batch) == batch_size or read == len(order[part]):
                writer.add(batch)
                batch = []
                if read // commit_every > (read - batch_size) // commit_every or read == len(order[part]):
                    meta[part] = {**meta[part], **writer.commit(), "read": read}
                    atomic_write_text(meta_path, json.dumps(meta))  # the resumable unit: a commit
                rate = (read - start) / max(1e-9, time.time() - t0)
                print(f"\rprepare {part}: {read:,}/{len(order[part]):,} documents, "
                      f"{writer.counts['tokens']:,} tokens, {rate:,.0f} documents/s",
                      end="", flush=True)
        writer.close()
        print()
    meta["done"] = True
    atomic_write_text(meta_path, json.dumps(meta))
    return meta


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _read_prepared(cfg, specials, tokenizer_ident):
    """A prepared directory; its tokenizer gets this model's specials (the stream holds none)."""
    with open(os.path.join(cfg.data, PREPARED)) as f:
        meta = json.load(f)
    if not meta["done"]:
        raise UsageError(f"--data {cfg.data}: its prepare did not finish; "
                         f"run the same `python data.py prepare` command again to resume it")
    if meta["source"]["tokenizer"] != cfg.tokenizer:
        raise UsageError(f"--data {cfg.data} was prepared with "
                         f"--tokenizer {meta['source']['tokenizer']}, not {cfg.tokenizer}")
    base = meta["tokenizer"]
    ident = tokenizer_ident or ({**base, "specials": list(specials)} if base["kind"] == "char" else
                                {**base, "specials": list(specials[1:])})
    tok = tokenizer_from_identity(ident)
    key = _digest({"prepared": {k: meta[k] for k in ("source", "train", "val", "tokenizer")}, "ident": ident})
    return tok, {part: _split(cfg.data, part, meta) for part in ("train", "val")}, key


def atomic_write_text(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"  # of this process: two writing one file at once each rename a whole one
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _usage_error(message):
    raise UsageError(f"{message} (see --help)")


@command
def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="data.py", description=(
        "Prepare a big corpus for train.py: tokenise it once, streaming, into a directory "
        "that --data then points at. Resumable: run the same command again after an interruption."))
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare", help="tokenise a corpus into OUT "
                                       "(train/val .bin + boundaries + prepared.json)")
    p.error = q.error = _usage_error  # one line, exit 2, like every other bad input
    q.add_argument("--data", required=True,
                   help="a directory or glob of .txt files (one document each), "
                        "or a `datasets` directory written by save_to_disk")
    q.add_argument("--out", required=True, help="output directory; give it to train.py as --data")
    q.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "char"])
    q.add_argument("--val-docs", default="", help="comma-separated document names to hold out")
    q.add_argument("--val-every", type=int, default=10, help="else hold out every N-th document (default 10)")
    q.add_argument("--commit-every", type=int, default=1000, help="documents between resumable commits")
    q.add_argument("--text-column", default="text", help="the text column of a `datasets` dataset")
    args = p.parse_args(argv)
    for name in ("val_every", "commit_every"):
        n = getattr(args, name)
        require(n >= 1, f"--{name.replace('_', '-')} {n}: must be at least 1")
    meta = prepare(args.data, args.out, args.tokenizer, args.val_docs, args.val_every,
                   args.commit_every, args.text_column)
    train, val = meta["train"], meta["val"]
    print(f"prepared {args.out}: train {train['tokens']:,} tokens in {train['docs']:,} documents, "
          f"val {val['tokens']:,} in {val['docs']:,}; "
          f"train with --data {args.out} --tokenizer {args.tokenizer}")


if __name__ == "__main__":
    main()
