"""bpe.py - byte-level Byte Pair Encoding, from the lecture's algorithm to exact GPT-2 parity.

A regex cuts text into chunks (words, numbers, punctuation runs, whitespace); each becomes its
UTF-8 bytes, the 256 starting tokens. Training merges the most frequent adjacent pair into a new
token until the vocabulary has the requested size. Encoding replays the merges; decoding joins the
tokens' bytes.

Slide "Byte Pair Encoding algorithm" (lecture 001), bullet by bullet:
    - start from single characters/bytes       -> the 256 byte tokens, `_chunks_as_bytes`.
    - the "end of word" marker                  -> the regex pre-split: no merge crosses chunks.
    - find the most common adjacent pair        -> `count_pairs`, `best_pair` (deterministic ties).
    - merge it everywhere, add it to the list   -> `merge` on each chunk; new token = next free id.
    - repeat until the maximum number of merges -> `train_plain` (the slide's loop);
                                                   `train_fast` gives the same merges.
Slide "Word structure and subword models": frequent words become one token, rare ones split into
pieces, at worst into bytes. Try `python bpe.py --show "antidisestablishmentarianism"`.
WordPiece, BERT's subword scheme, closes the file: a vocabulary read greedily, longest piece first.

Papers
    Sennrich, Haddow, Birch 2016, "Neural Machine Translation of Rare Words with Subword Units",
    Sec. 3.2 (BPE merges).
    Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2), Sec. 2.2
    (byte-level BPE; the pre-split stops merges across character categories).
    Wu et al. 2016, "Google's Neural Machine Translation System", Sec. 4.1 (wordpieces).
    Devlin et al. 2019 (BERT), Sec. 3, and its released tokenization.py (the WordPiece rules here).

How to run
    python bpe.py --show "Hello world!"                      # GPT-2's split (or --tokenizer PATH)
    python bpe.py --train data/shakespeare/*.txt --vocab-size 1024 --out out/shakespeare.bpe
    python bpe.py --plot                                     # bytes/token vs vocab -> assets/*.png
    python bpe.py --bench                                    # plain vs fast trainer; encode speed

Python API
    tok = Tokenizer(pattern="gpt4").train(text, 1024)        # fast trainer (fast=False: plain)
    tok.register_special_tokens(["<|endoftext|>"])           # ids above the ordinary vocabulary
    ids = tok.encode(text, allowed_special="all"); tok.decode(ids)
    tok.save(path); Tokenizer.load(path); tok.to_tiktoken(); gpt2()
    wp = WordPiece.from_vocab_file("bert-base-uncased/vocab.txt"); wp.encode("My dog is [MASK].")

Legend
    id      a token id; ids 0..255 of a trained tokenizer are bytes (GPT-2 permutes them: gpt2())
    pair    two adjacent ids (a, b)
    merge   (a, b) -> new id, which is also its rank: lower id = learned earlier = applied first
    chunk   one regex match of the pre-split; tokens never span two chunks
    ranks   tiktoken's view of the same vocabulary: token bytes -> id
"""

import argparse
import base64
import glob
import hashlib
import heapq
import json
import os
import time
import unicodedata

import regex  # not `re`: the patterns need Unicode classes, e.g. \p{L} (letter), \p{N} (number)

from common import UsageError, command, pyplot, require

# ----------------------------------------------------------------------------------------------------------------------
# constants

# GPT-2's pre-split, as published: contractions, optional space + letters, optional space + digits,
# optional space + other symbols, then whitespace. `\s+(?!\S)` leaves a run's last space for the
# next word, so " world" stays one chunk after many spaces.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-4's (tiktoken cl100k_base) pre-split: contractions in any case, at most 3 digits per chunk,
# newlines apart from other whitespace. `?+`, `++`: possessive, no backtracking (`regex` has them).
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

HERE = os.path.dirname(os.path.abspath(__file__))  # data paths: relative to this file, not the cwd
GPT2_FILE = os.path.join(HERE, "data", "gpt2.tiktoken")
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_SPECIAL_TOKENS = {"<|endoftext|>": 50256}
CORPUS_DIR = os.path.join(HERE, "data")

FORMAT_HEADER = "bpe.py tokenizer v1"

# ----------------------------------------------------------------------------------------------------------------------
# building blocks


def count_pairs(ids, counts=None, weight=1):
    """Add `weight` to each adjacent pair's count (into `counts` if given); return the counts.

    count_pairs([1, 2, 3, 1, 2]) -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def best_pair(counts):
    """The pair to merge next: the most frequent one; on a tie, the smallest (a, b).

    best_pair({(104, 101): 3, (32, 116): 3, (116, 104): 1}) -> (32, 116)
    Why this tie-break: it depends only on the counts, not on dict order or where a pair first
    occurs, so the fast trainer (a heap ordered by (-count, a, b)) reproduces it exactly.
    """
    return min(counts, key=lambda pair: (-counts[pair], pair))


def merge(ids, pair, new_id):
    """Replace each occurrence of `pair` in `ids` by `new_id`, scanning left to right.

    merge([5, 6, 5, 6, 7], (5, 6), 300) -> [300, 300, 7]
    Trap: overlapping occurrences go to the leftmost one: merge([9, 9, 9], (9, 9), 256) -> [256, 9].
    """
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def split_chunks(text, pattern):
    """Pre-split `text` with the regex `pattern`; BPE works inside each chunk and never across two.

    split_chunks("Hello  world!", GPT2_PATTERN) -> ['Hello', ' ', ' world', '!']
    """
    return regex.findall(pattern, text)


def _chunks_as_bytes(chunks):
    """Each chunk as its list of UTF-8 byte values, the 256 starting tokens.

    _chunks_as_bytes(['hé']) -> [[104, 195, 169]]
    """
    return [list(chunk.encode("utf-8")) for chunk in chunks]


def _fix_surrogates(text):
    """Lone surrogates (e.g. '\\ud800') cannot be UTF-8: U+FFFD replaces them, as in tiktoken.

    _fix_surrogates('a\\ud800') -> 'a\\ufffd'; a valid pair '\\ud83d\\ude00' -> one emoji.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _any_of(strings):
    """A regex matching any of `strings`, longest first: a prefix of another string must not win.

    regex.findall(_any_of(["<a>", "<a>b"]), "<a>b") -> ['<a>b']
    """
    return "|".join(regex.escape(s) for s in sorted(strings, key=len, reverse=True))


def _resolve_pattern(pattern):
    """'gpt2' / 'gpt4' -> the regex; any other string is a regex itself (checked to compile)."""
    pattern = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"pattern is neither 'gpt2', 'gpt4' nor a valid regex: {e}") from None
    return pattern


# ----------------------------------------------------------------------------------------------------------------------
# training: the same merges, written two ways


def train_plain(text, vocab_size, pattern=GPT4_PATTERN, verbose=False):
    """The slide's algorithm, as written: count all pairs, merge the best one everywhere, repeat.

    Returns the merges in the order learned: a list of pairs, the i-th becomes token 256 + i.
    train_plain("aaab aaab", 258, GPT2_PATTERN) -> [(97, 97), (97, 98)]
        # 'aa' (4 times), then 'ab': tied at 2 with 'aa'+'a' = (256, 97); (97, 98) is smaller
    Stops early when no chunk has two tokens left. Cost: each merge re-reads the whole text
    (O(text length) per merge), hence slow. It is here to be read; `train_fast` is what you run.
    """
    chunks = _chunks_as_bytes(split_chunks(text, pattern))  # every chunk occurrence: the whole text
    merges = []
    for new_id in range(256, vocab_size):
        counts = {}
        for ids in chunks:
            count_pairs(ids, counts)
        if not counts:
            break
        pair = best_pair(counts)
        chunks = [merge(ids, pair, new_id) for ids in chunks]
        merges.append(pair)
        if verbose and (new_id - 255) % 100 == 0:
            print(f"plain: merge {new_id - 255}/{vocab_size - 256}: {pair} -> {new_id} "
                  f"({counts[pair]} times)")
    return merges


def train_fast(text, vocab_size, pattern=GPT4_PATTERN, verbose=False):
    """Exactly the merges of `train_plain`, but fast. Three ideas:

    1. Count unique chunks, weighted by frequency: " the" (20000 times) is stored and merged once.
    2. Update the pair counts instead of recounting. A merge only changes pairs inside the chunks
       that contain the merged pair (`where` maps a pair to those chunks). Each such chunk's old
       pairs are subtracted and its new pairs added: exact even for overlaps like 'aaaa'.
    3. Find the best pair with a heap of (-count, pair), the same order as `best_pair`. A changed
       count is pushed as a new entry; the outdated one stays behind ("lazy deletion"). A popped
       entry is used only if its count is still current.
    train_fast("aaab aaab", 258, GPT2_PATTERN) -> [(97, 97), (97, 98)]
    """
    freq = {}
    for chunk in split_chunks(text, pattern):
        freq[chunk] = freq.get(chunk, 0) + 1
    words = _chunks_as_bytes(freq)  # unique chunks as lists of ids, updated in place by merges
    weights = list(freq.values())  # how often each unique chunk occurs in the text

    counts, where = {}, {}  # pair -> weighted count; pair -> indices of words that (may) hold it
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            counts[pair] = counts.get(pair, 0) + weights[w]
            where.setdefault(pair, set()).add(w)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)

    merges = []
    for new_id in range(256, vocab_size):
        while heap:  # pop until an entry is current (lazy deletion)
            neg_count, pair = heapq.heappop(heap)
            if counts.get(pair) == -neg_count:
                break
        else:
            break  # no pairs left anywhere: stop early, as train_plain does
        merges.append(pair)
        if verbose and (new_id - 255) % 100 == 0:
            print(f"fast: merge {new_id - 255}/{vocab_size - 256}: {pair} -> {new_id} "
                  f"({-neg_count} times)")

        changed = set()
        for w in where.pop(pair):
            old = words[w]
            new = merge(old, pair, new_id)
            if len(new) == len(old):
                continue  # stale entry: an earlier merge already used up this pair in this word
            n = weights[w]
            for p in zip(old, old[1:]):
                counts[p] -= n
                changed.add(p)
            for p in zip(new, new[1:]):
                counts[p] = counts.get(p, 0) + n
                where.setdefault(p, set()).add(w)
                changed.add(p)
            words[w] = new
        for p in changed:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                del counts[p]  # gone everywhere (always the case for the merged pair itself)
    return merges


# ----------------------------------------------------------------------------------------------------------------------
# recovering merges from a ranks file (GPT-2 ships token bytes -> rank, not the merges)


def _bpe_by_rank(ranks, token, max_rank):
    """Split `token` (bytes) as tiktoken's BPE would, with only tokens of rank < max_rank: join the
    adjacent pair whose concatenation has the lowest rank (leftmost on ties), and repeat.

    With ranks {b'a': 0, b'b': 1, b'c': 2, b'ab': 3, b'abc': 4}:
    _bpe_by_rank(ranks, b'abc', 4) -> [b'ab', b'c']
    In a vocabulary built by BPE, every multi-byte token splits into exactly two parts: its merge.
    """
    parts = [bytes([b]) for b in token]
    while True:
        best_rank, best_i = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            return parts
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def read_tiktoken_file(path, expected_sha256=None):
    """Read a tiktoken ranks file (one 'base64(token bytes) rank' per line) into {bytes: rank}.

    A line 'IQ== 0' means b'!' has rank (= id) 0.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: ranks file not found") from None
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise ValueError(f"{path}: sha256 is {hashlib.sha256(raw).hexdigest()}, "
                         f"expected {expected_sha256}")
    ranks = {}
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{line_no}: expected 'base64 rank', got {line[:60]!r}") from None
    return ranks


# ----------------------------------------------------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """A byte-level BPE tokenizer: a pre-split pattern, 256 byte tokens, merges and special tokens.

    Plain data that identifies it (what a checkpoint records, see `to_dict`):
        pattern         the pre-split regex
        byte_ids        byte_ids[b] = id of the byte b (identity after training; permuted for GPT-2)
        merges          {(a, b): new_id}; new ids ascend in the order the merges were learned
        special_tokens  {"<|endoftext|>": id, ...}; ids above every ordinary id
    vocab_size counts every id including special tokens (it is max id + 1).
    """

    def __init__(self, pattern="gpt4"):
        self.pattern = _resolve_pattern(pattern)
        self.byte_ids = list(range(256))
        self.merges = {}
        self.special_tokens = {}
        self._rebuild()

    # --- construction ---

    def _rebuild(self):
        """Recompute the derived tables (id -> bytes) after the merges or byte ids change."""
        self.vocab = {self.byte_ids[b]: bytes([b]) for b in range(256)}  # id -> token bytes
        for (a, b), new_id in self._merges_in_order():
            if a not in self.vocab or b not in self.vocab:
                raise ValueError(f"merge ({a}, {b}) -> {new_id} "
                                 f"uses an id not defined by an earlier merge")
            self.vocab[new_id] = self.vocab[a] + self.vocab[b]
        if len(self.vocab) != 256 + len(self.merges):
            raise ValueError("token ids are not unique: a byte id or a merge reuses an id")
        self._regex = regex.compile(self.pattern)
        self._cache = {}  # chunk bytes -> ids; chunks repeat in real text: most of the speed

    def train(self, text, vocab_size, fast=True, verbose=False):
        """Learn vocab_size - 256 merges from `text`. fast=False runs the plain trainer: the same
        merges, far slower. vocab_size counts ordinary tokens; register special tokens afterwards.
        Stops early if the text runs out of pairs. Returns self."""
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be at least 256 (the byte tokens), got {vocab_size}")
        if self.special_tokens:
            raise ValueError("train before registering special tokens: "
                             "their ids must lie above the merges")
        pairs = (train_fast if fast else train_plain)(text, vocab_size, self.pattern, verbose=verbose)
        self.byte_ids = list(range(256))
        self.merges = {pair: 256 + i for i, pair in enumerate(pairs)}
        self._rebuild()
        return self

    def register_special_tokens(self, tokens):
        """Add special tokens. `tokens` is a list of strings (each gets the next free id, in order)
        or a dict {string: id}; re-registering with its id is a no-op. Returns all {string: id}.

        On a 1024-token vocabulary:
        tok.register_special_tokens(["[CLS]", "[SEP]"]) -> {"[CLS]": 1024, "[SEP]": 1025}
        """
        items = tokens.items() if isinstance(tokens, dict) else [(t, None) for t in tokens]
        for text, token_id in items:
            if not isinstance(text, str) or not text:
                raise ValueError(f"a special token must be a non-empty string, got {text!r}")
            if text in self.special_tokens:
                if token_id is not None and token_id != self.special_tokens[text]:
                    raise ValueError(f"special token {text!r} already has id "
                                     f"{self.special_tokens[text]}, not {token_id}")
                continue
            token_id = self.vocab_size if token_id is None else int(token_id)
            if token_id in self.vocab or token_id in self.special_tokens.values() or token_id < 0:
                raise ValueError(f"special token {text!r}: id {token_id} is already taken")
            self.special_tokens[text] = token_id
        return dict(self.special_tokens)

    @property
    def vocab_size(self):
        """Number of ids, special tokens included (max id + 1)."""
        return max([*self.vocab, *self.special_tokens.values()]) + 1

    # --- encoding ---

    def _encode_chunk(self, chunk):
        """One chunk's bytes -> ids: from bytes, apply the earliest-learned merge present; repeat.

        With merges {(104, 105): 256}: _encode_chunk(b"hihi") -> [256, 256]
        Applying merges in learned order replays training: a chunk is tokenized as in training.
        For GPT-2 this is exactly tiktoken's lowest-rank-first rule (rank = id of the merged token).
        Trap: tiktoken looks up the *bytes* of two neighbours in its ranks; we look up the *pair of
        ids* in merges. One token's bytes can often be cut into two known tokens in several ways.
        The rules still agree: each merge is recovered as the very split tiktoken's BPE makes for
        that token (`from_ranks`), and in a chunk any two neighbours were built as in that split.
        The GPT-2 parity tests check it on real text.
        """
        ids = self._cache.get(chunk)
        if ids is not None:
            return ids
        ids = [self.byte_ids[b] for b in chunk]
        merges, never = self.merges, float("inf")
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, never))  # ranks are unique
            if pair not in merges:
                break
            ids = merge(ids, pair, merges[pair])
        if len(self._cache) >= 200_000:
            self._cache.clear()  # keep memory bounded on huge, very diverse inputs
        self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text):
        """Text -> ids, special-token text treated as ordinary text.
        encode_ordinary("<|endoftext|>") gives ~6 ids."""
        ids = []
        for chunk in self._regex.findall(_fix_surrogates(text)):
            ids.extend(self._encode_chunk(chunk.encode("utf-8")))
        return ids

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Text -> ids, with tiktoken's rules for special tokens:
        - allowed_special ("all" or a set of strings): these are encoded as their single special id;
        - disallowed_special ("all": every special not allowed; or a set; () turns it off): if the
          text holds one, raise ValueError. User text must not inject an <|endoftext|> by accident;
        - any other special-token text is encoded as ordinary text.
        gpt2().encode("hi<|endoftext|>", allowed_special="all") -> [5303, 50256]
        """
        text = _fix_surrogates(text)
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else set(allowed_special)
        disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed:
            found = regex.search(_any_of(disallowed), text)
            if found:
                raise ValueError(
                    f"text contains the disallowed special token {found.group()!r}; pass "
                    f"allowed_special={{{found.group()!r}}} to encode it as a special token, or "
                    f"disallowed_special=() to encode it as ordinary text")
        allowed &= specials
        if not allowed:
            return self.encode_ordinary(text)
        # Split around the allowed specials; pieces between are pre-split alone, as tiktoken does.
        ids = []
        for i, piece in enumerate(regex.split("(" + _any_of(allowed) + ")", text)):
            if i % 2 == 1:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    # --- decoding ---

    def token_bytes(self, token_id):
        """The bytes of one id (special tokens: their UTF-8 text).
        May be part of a character: b'\\xf0\\x9f'."""
        if token_id in self.vocab:
            return self.vocab[token_id]
        for text, special_id in self.special_tokens.items():
            if special_id == token_id:
                return text.encode("utf-8")
        raise ValueError(f"unknown token id {token_id} (vocab_size is {self.vocab_size})")

    def decode_bytes(self, ids):
        """ids -> the raw bytes they stand for."""
        vocab = self.vocab
        return b"".join(vocab[i] if i in vocab else self.token_bytes(i) for i in ids)

    def decode(self, ids):
        """ids -> text. Any ids decode: invalid UTF-8 (e.g. half an emoji) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- plain data, files, tiktoken ---

    def to_dict(self):
        """All that defines this tokenizer as JSON-ready data (for checkpoints); see from_dict."""
        merges = [[a, b, new_id] for (a, b), new_id in self._merges_in_order()]
        return {"format": FORMAT_HEADER, "pattern": self.pattern, "byte_ids": list(self.byte_ids),
                "merges": merges, "special_tokens": dict(self.special_tokens)}

    def _merges_in_order(self):
        """[((a, b), new_id), ...] in the order the merges were learned."""
        return sorted(self.merges.items(), key=lambda m: m[1])

    @classmethod
    def from_dict(cls, data):
        """Inverse of to_dict: Tokenizer.from_dict(tok.to_dict()) encodes exactly like tok."""
        tok = cls(data["pattern"])
        tok.byte_ids = [int(i) for i in data["byte_ids"]]
        if sorted(tok.byte_ids) != sorted(set(tok.byte_ids)) or len(tok.byte_ids) != 256:
            raise ValueError("byte_ids must be 256 distinct ids")
        tok.merges = {(int(a), int(b)): int(new_id) for a, b, new_id in data["merges"]}
        tok._rebuild()
        tok.register_special_tokens({k: int(v) for k, v in data["special_tokens"].items()})
        return tok

    def save(self, path):
        """Write a small human-readable file, one fact per line:
            bpe.py tokenizer v1
            pattern "<the regex, as a JSON string>"
            byte_ids identity                   (or 256 ids, for a permuted byte table: GPT-2's)
            merge 116 104 -> 256   # 't' + 'h' -> 'th'      (a comment for people; load ignores it)
            special 1024 "<|endoftext|>"
        """
        lines = [FORMAT_HEADER, "pattern " + json.dumps(self.pattern)]
        identity = self.byte_ids == list(range(256))
        lines.append("byte_ids " + ("identity" if identity else " ".join(map(str, self.byte_ids))))
        for (a, b), new_id in self._merges_in_order():
            show = (" + ".join(_show(self.vocab[i]) for i in (a, b))
                    + " -> " + _show(self.vocab[new_id]))
            lines.append(f"merge {a} {b} -> {new_id}   # {show}")
        for text, token_id in sorted(self.special_tokens.items(), key=lambda s: s[1]):
            lines.append(f"special {token_id} {json.dumps(text)}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    @classmethod
    def load(cls, path):
        """Read a file written by save (a classmethod: tok = Tokenizer.load(path))."""
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if not lines or lines[0] != FORMAT_HEADER:
            raise ValueError(f"{path}: not a bpe.py tokenizer file "
                             f"(first line should be {FORMAT_HEADER!r})")
        data = {"pattern": None, "byte_ids": list(range(256)), "merges": [], "special_tokens": {}}
        for line_no, line in enumerate(lines[1:], 2):
            key, _, rest = line.partition(" ")
            try:
                if key == "pattern":
                    data["pattern"] = json.loads(rest)
                elif key == "byte_ids":
                    identity = rest == "identity"
                    data["byte_ids"] = list(range(256)) if identity else [int(x) for x in rest.split()]
                elif key == "merge":
                    a, b, arrow, new_id = rest.split("#")[0].split()
                    assert arrow == "->"
                    data["merges"].append([int(a), int(b), int(new_id)])
                elif key == "special":
                    token_id, text = rest.split(" ", 1)
                    data["special_tokens"][json.loads(text)] = int(token_id)
                elif line.strip():
                    raise ValueError
            except (ValueError, AssertionError, json.JSONDecodeError):
                raise ValueError(f"{path}:{line_no}: cannot parse {line[:60]!r}") from None
        if data["pattern"] is None:
            raise ValueError(f"{path}: no 'pattern' line")
        return cls.from_dict(data)

    def mergeable_ranks(self):
        """{token bytes: id} of the ordinary tokens: tiktoken's form of the same vocabulary."""
        ranks = {token: token_id for token_id, token in self.vocab.items()}
        if len(ranks) != len(self.vocab):
            raise ValueError("two ids share the same bytes; "
                             "tiktoken's ranks cannot represent this vocabulary")
        return ranks

    def save_tiktoken(self, path):
        """Write the ordinary tokens in tiktoken's ranks format: 'base64 rank' lines, no special
        tokens (as in tiktoken's own files).
        Read it back with Tokenizer.load_tiktoken(path, pattern, special_tokens)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="ascii") as f:
            for token, rank in sorted(self.mergeable_ranks().items(), key=lambda r: r[1]):
                f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")

    @classmethod
    def from_ranks(cls, ranks, pattern, special_tokens=None):
        """A merge-based tokenizer from tiktoken ranks {bytes: rank}. A multi-byte token of rank r
        is the merge of the two lower-rank tokens tiktoken's BPE splits it into (`_bpe_by_rank`)."""
        tok = cls(pattern)
        try:
            tok.byte_ids = [ranks[bytes([b])] for b in range(256)]
        except KeyError as e:
            raise ValueError(f"ranks lack the single byte {e.args[0]!r}; "
                             f"byte-level BPE needs all 256") from None
        merges = {}
        for token, rank in sorted(ranks.items(), key=lambda r: r[1]):
            if len(token) == 1:
                continue
            parts = _bpe_by_rank(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (rank {rank}) "
                                 f"is not the merge of two lower-rank tokens")
            merges[(ranks[parts[0]], ranks[parts[1]])] = rank
        tok.merges = merges
        tok._rebuild()
        tok.register_special_tokens(dict(special_tokens or {}))
        return tok

    @classmethod
    def load_tiktoken(cls, path, pattern, special_tokens=None, expected_sha256=None):
        """Read a tiktoken ranks file (e.g. one written by save_tiktoken) into a Tokenizer."""
        return cls.from_ranks(read_tiktoken_file(path, expected_sha256), pattern, special_tokens)

    def to_tiktoken(self, name="bpe.py"):
        """This vocabulary as a tiktoken.Encoding (same pattern, ranks and special tokens): the ids
        of `encode`, at native speed. tiktoken's regex engine must accept the pattern (GPT2_PATTERN
        and GPT4_PATTERN pass)."""
        import tiktoken  # imported here so the rest of bpe.py works without it

        return tiktoken.Encoding(name=name, pat_str=self.pattern,
                                 mergeable_ranks=self.mergeable_ranks(),
                                 special_tokens=dict(self.special_tokens))

    def __repr__(self):
        name = next((k for k, v in PATTERNS.items() if v == self.pattern), "custom")
        return (f"Tokenizer(pattern={name}, merges={len(self.merges)}, "
                f"special_tokens={len(self.special_tokens)}, vocab_size={self.vocab_size})")


def gpt2():
    """GPT-2's tokenizer (50257 ids, <|endoftext|> = 50256) from data/gpt2.tiktoken beside this
    file (sha256-checked). Merges are recovered from the ranks: encode gives tiktoken's GPT-2 ids
    exactly. Takes ~0.3-1 s; a new object each call (register special tokens on it freely)."""
    return Tokenizer.load_tiktoken(GPT2_FILE, GPT2_PATTERN, GPT2_SPECIAL_TOKENS,
                                   expected_sha256=GPT2_SHA256)


# ----------------------------------------------------------------------------------------------------------------------
# WordPiece: BERT's subword scheme, so a released BERT checkpoint (vocab.txt + weights) fills masks
# with its own vocabulary (bert.py --hf DIR).
#
# BPE and WordPiece both cut rare words into frequent pieces; they differ in storage and encoding.
#   BPE (above)   stores the merges, in order; encoding replays them. Starting from the 256 bytes,
#                 every text encodes, nothing is unknown. A leading space joins a token (" world").
#   WordPiece     stores only a vocabulary (vocab.txt: one piece per line; line number = id).
#                 Text is cut into words (whitespace, and each punctuation character alone),
#                 optionally lower-cased without accents ("uncased"). Each word is split greedily,
#                 longest match first, from the left; later pieces carry "##" ("playing" -> "play",
#                 "##ing"). A word that cannot be covered is [UNK] as a whole. Spaces are not
#                 tokens: decoding joins the words with single spaces.
# How the vocabulary was learned (Schuster & Nakajima 2012; Wu et al. 2016, Sec. 4.1: pieces that
# maximise the training data's likelihood) is not needed to use one, and not implemented here.
# Paper: Devlin et al. 2019, Sec. 3 ("WordPiece embeddings with a 30,000 token vocabulary"). The
# released tokenization.py (BasicTokenizer, WordpieceTokenizer) defined the rules below, and
# transformers' BertTokenizer, the tokenizer we match (tests/test_wordpiece.py), kept them but two:
#   - a word of more than 100 characters is [UNK] (Google's: 200);
#   - a private-use character (category Co) is dropped as a control character (Google's drops
#     only Cc and Cf, so there it stays in its word, which then is [UNK]).
# We follow transformers: it is what loads a released checkpoint today, and the test's oracle.

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _wp_is_whitespace(ch):
    """Space, tab, newline, carriage return and Unicode space separators (category Zs)."""
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _wp_is_control(ch):
    """Control, format, private-use and surrogate characters (Cc, Cf, Co, Cs), except the whitespace
    BERT keeps as such. Unassigned code points (Cn) are not: transformers keeps them in their word
    (its Python tokenizer of transformers 4 dropped every C*, Google's keeps Co too).
    Trap: "unassigned" depends on the Unicode version. A format character newer than the Unicode
    tables of transformers' Rust tokenizer (U+0890, added in Unicode 14) is kept there, dropped here."""
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs")


def _wp_is_punctuation(ch):
    """Every printable ASCII non-alphanumeric character (so "$", "^", "`" split words, although
    Unicode calls them symbols), and every Unicode punctuation character (category P*)."""
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(ch).startswith("P")


def _wp_is_cjk(ch):
    """CJK ideographs (the Unicode blocks BERT lists): each is a word, as Chinese has no spaces."""
    cp = ord(ch)
    return any(first <= cp <= last for first, last in _CJK_BLOCKS)


_CJK_BLOCKS = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def basic_tokenize(text, lowercase):
    """BERT's pre-tokenization: text -> words. Drops NUL, U+FFFD and control characters, turns
    each whitespace into a space, puts spaces around CJK ideographs, splits on whitespace. With
    lowercase: lower-cases and strips accents (Unicode NFD, then drop the combining marks).
    Finally each punctuation character becomes a word of its own.

    basic_tokenize("Héllo,  World!", lowercase=True) -> ['hello', ',', 'world', '!']
    basic_tokenize("Héllo,  World!", lowercase=False) -> ['Héllo', ',', 'World', '!']
    """
    cleaned = []
    for ch in text:
        if ch == "\x00" or ch == "\ufffd" or _wp_is_control(ch):
            continue
        cleaned.append(" " if _wp_is_whitespace(ch) else f" {ch} " if _wp_is_cjk(ch) else ch)
    words = []
    for word in "".join(cleaned).split():
        if lowercase:
            word = unicodedata.normalize("NFD", word.lower())  # "é" -> "e" + combining accent (Mn)
            word = "".join(c for c in word if unicodedata.category(c) != "Mn")
        start = 0
        for i, ch in enumerate(word):
            if _wp_is_punctuation(ch):
                words += [word[start:i], ch] if i > start else [ch]
                start = i + 1
        if start < len(word):
            words.append(word[start:])
    return words


def wordpiece_split(word, vocab, unk="[UNK]", max_chars=100):
    """One word -> its pieces, greedy longest-match-first from the left; later pieces carry "##".
    A word that cannot be fully covered (or has more than max_chars characters) is [UNK] whole.

    wordpiece_split("unaffable", {"un", "##aff", "##able", "##a"}) -> ['un', '##aff', '##able']
    wordpiece_split("unaffablex", {"un", "##aff", "##able"}) -> ['[UNK]']
    Trap: greedy can fail where another split exists. With {"a", "ab", "##bc"}, "abc" -> ['[UNK]']
    (no "##c" after "ab"), although 'a', '##bc' would cover it. BERT reads greedily; so must we.
    """
    if len(word) > max_chars:
        return [unk]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
            end -= 1
        else:
            return [unk]  # no piece starts here: the whole word is unknown, not just this part
        pieces.append(piece)
        start = end
    return pieces


class WordPiece:
    """BERT's tokenizer from a vocab.txt, with data.py's tokenizers' interface (encode, decode,
    specials, n_vocab) so bert.py can use either.

    tok = WordPiece.from_vocab_file("bert-base-uncased/vocab.txt")
    tok.tokenize("My dog is [MASK].") -> ['my', 'dog', 'is', '[MASK]', '.']
    Special-token strings ([CLS], [SEP], [MASK], [PAD], [UNK]) match exactly, before lower-casing.
    """

    def __init__(self, tokens, lowercase=True):
        self.itos = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.itos)}
        if len(self.vocab) != len(self.itos):
            raise ValueError("vocab.txt lists a token twice")
        if "[UNK]" not in self.vocab:
            raise ValueError("vocab.txt has no [UNK] token")
        self.lowercase = lowercase
        self.specials = {s: self.vocab[s] for s in WORDPIECE_SPECIALS if s in self.vocab}
        self.n_vocab = len(self.itos)
        self._special_re = regex.compile("|".join(regex.escape(s) for s in self.specials))

    @classmethod
    def from_vocab_file(cls, path, lowercase=None):
        """Read vocab.txt. lowercase=None: do_lower_case of a tokenizer_config.json next to it, else
        guessed (an uncased vocabulary has no upper-case letters outside its [SPECIAL] tokens)."""
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n").rstrip("\r") for line in f]
        while tokens and tokens[-1] == "":
            tokens.pop()
        if lowercase is None:
            config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
            if os.path.exists(config):
                with open(config) as f:
                    lowercase = json.load(f).get("do_lower_case")
            if lowercase is None:
                lowercase = not any(c.isupper() for t in tokens
                                    if not (t.startswith("[") and t.endswith("]")) for c in t)
        return cls(tokens, lowercase)

    def tokenize(self, text):
        """Text -> pieces (strings)."""
        pieces, at = [], 0
        for m in self._special_re.finditer(text) if self.specials else ():
            pieces += self._tokenize_ordinary(text[at:m.start()]) + [m.group()]
            at = m.end()
        return pieces + self._tokenize_ordinary(text[at:])

    def _tokenize_ordinary(self, text):
        return [p for word in basic_tokenize(text, self.lowercase)
                for p in wordpiece_split(word, self.vocab)]

    def encode(self, text):
        return [self.vocab[p] for p in self.tokenize(text)]

    def decode(self, ids):
        """Pieces joined by spaces, "##" continuations glued to the piece before. Casing and accents
        removed by lower-casing, and the spacing around punctuation, do not come back."""
        return " ".join(self.itos[i] for i in ids).replace(" ##", "").strip()


# ----------------------------------------------------------------------------------------------------------------------
# command line: --train, --show, --plot, --bench


def _show(token):
    """A token's bytes for people: text where it is valid UTF-8, hex for partial characters.
    _show(b' the') -> "' the'"; _show(b'\\xf0\\x9f') -> '<f0 9f>'"""
    try:
        return repr(token.decode("utf-8"))
    except UnicodeDecodeError:
        return "<" + token.hex(" ") + ">"


def read_corpus(name="shakespeare"):
    """All data/<name>/*.txt files (sorted by name) joined by newlines."""
    files = sorted(glob.glob(os.path.join(CORPUS_DIR, name, "*.txt")))
    if not files:
        raise FileNotFoundError(f"no .txt files in {os.path.join(CORPUS_DIR, name)}")
    return "\n".join(_read_text(f) for f in files)


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _load_cli_tokenizer(path):
    if path is None or path == "gpt2":
        return gpt2()
    require(os.path.isfile(path), f"--tokenizer {path}: no such tokenizer file")
    try:
        return Tokenizer.load(path)
    except ValueError as e:  # not our format, or not UTF-8 (UnicodeDecodeError is a ValueError)
        why = str(e) if str(e).startswith(path) else f"{path}: {e}"
        raise UsageError(f"--tokenizer {why}") from None


def cmd_train(args):
    text = "\n".join(_read_text(f) for f in args.train)
    t0 = time.perf_counter()
    tok = Tokenizer(args.pattern).train(text, args.vocab_size, fast=not args.plain,
                                        verbose=args.verbose)
    print(f"trained {tok} on {len(text.encode('utf-8')):,} bytes in {time.perf_counter() - t0:.1f} s")
    if args.special:
        tok.register_special_tokens(args.special)
    tok.save(args.out)
    print(f"wrote {args.out}")
    if args.tiktoken_out:
        tok.save_tiktoken(args.tiktoken_out)
        print(f"wrote {args.tiktoken_out} "
              f"(tiktoken ranks; pattern and special tokens are in {args.out})")


def _bare(token):
    """A token's text without quotes, newlines and tabs made visible; hex if not valid UTF-8."""
    text = _show(token)
    return (text if text.startswith("<")
            else token.decode("utf-8").replace("\n", "\\n").replace("\t", "\\t"))


def cmd_show(args):
    tok = _load_cli_tokenizer(args.tokenizer)
    ids = tok.encode(args.show, allowed_special="all")
    pieces = [tok.token_bytes(i) for i in ids]
    print("|".join(_bare(p) for p in pieces))
    print(f"{len(args.show.encode('utf-8'))} bytes -> {len(ids)} tokens with {tok}")
    for i, p in zip(ids, pieces):
        print(f"{i:>7}  {_show(p)}")


def bytes_per_token(enc, text):
    """UTF-8 bytes of `text` per token of tiktoken encoding `enc` (higher = better compression)."""
    return len(text.encode("utf-8")) / len(enc.encode_ordinary(text))


def cmd_plot(args):
    train_text, heldout = read_corpus("shakespeare"), read_corpus("milton")
    t0 = time.perf_counter()
    full = Tokenizer(args.pattern).train(train_text, args.max_vocab)
    print(f"trained to {full.vocab_size} tokens on Shakespeare ({len(train_text):,} bytes) in "
          f"{time.perf_counter() - t0:.1f} s")
    merges = full._merges_in_order()
    sizes = [256] + [2 ** k for k in range(9, 30) if 2 ** k < full.vocab_size] + [full.vocab_size]
    rows = []
    for size in sizes:
        # training is greedy: the first size-256 merges are what training to `size` would give
        first = [[a, b, n] for (a, b), n in merges[:size - 256]]
        enc = Tokenizer.from_dict({**full.to_dict(), "merges": first}).to_tiktoken()
        rows.append((size, bytes_per_token(enc, train_text), bytes_per_token(enc, heldout)))
        print(f"vocab {size:>6}: {rows[-1][1]:.2f} bytes/token on Shakespeare (train), "
              f"{rows[-1][2]:.2f} on Milton")
    g = gpt2().to_tiktoken("gpt2")
    g_train, g_held = bytes_per_token(g, train_text), bytes_per_token(g, heldout)
    print(f"GPT-2  {50257:>6}: {g_train:.2f} bytes/token on Shakespeare, {g_held:.2f} on Milton")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [r[0] for r in rows]
    ax.plot(sizes, [r[1] for r in rows], "o-", label="our BPE, Shakespeare (training text)")
    ax.plot(sizes, [r[2] for r in rows], "s--", label="our BPE, Milton (held out)")
    ax.plot([50257], [g_train], "o", color="C0", mfc="none", ms=9,
            label="GPT-2 (WebText), Shakespeare")
    ax.plot([50257], [g_held], "s", color="C1", mfc="none", ms=9, label="GPT-2 (WebText), Milton")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="vocabulary size (log scale)", ylabel="bytes per token",
           title=f"Byte-level BPE ({args.pattern} pre-split) trained on Shakespeare")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.plot_out)), exist_ok=True)
    fig.savefig(args.plot_out, dpi=120)
    print(f"wrote {args.plot_out}")


def _throughput(encode, text, repeats=1):
    """MB/s of `encode(text)` (best of `repeats`), in 10^6 bytes per second."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        encode(text)
        best = min(best, time.perf_counter() - t0)
    return len(text.encode("utf-8")) / best / 1e6


def cmd_bench(args):
    corpus = read_corpus("shakespeare")
    text = corpus.encode("utf-8")[:int(args.bench_mb * 1e6)].decode("utf-8", errors="ignore")
    print(f"training: {len(text.encode('utf-8')):,} bytes of Shakespeare, vocab {args.bench_vocab} "
          f"({args.bench_vocab - 256} merges), pattern {args.pattern}")
    merges, seconds = {}, {}
    for name, train in (("fast", train_fast), ("plain", train_plain)):
        t0 = time.perf_counter()
        merges[name] = train(text, args.bench_vocab, PATTERNS[args.pattern])
        seconds[name] = time.perf_counter() - t0
        per_merge = 1e3 * seconds[name] / (args.bench_vocab - 256)
        print(f"  {name:<5} trainer: {seconds[name]:8.2f} s  ({per_merge:.2f} ms/merge)", flush=True)
    same = merges["plain"] == merges["fast"]
    print(f"  speedup: {seconds['plain'] / seconds['fast']:.1f}x; identical merges: {same}")

    tok = Tokenizer(args.pattern)
    tok.merges = {pair: 256 + i for i, pair in enumerate(merges["fast"])}
    tok._rebuild()
    heldout = read_corpus("milton")
    print(f"encoding: {len(heldout.encode('utf-8')):,} bytes of Milton (held out); "
          f"bpe.py starts with an empty cache")
    for label, t in [(f"trained, vocab {tok.vocab_size}", tok), ("GPT-2, vocab 50257", gpt2())]:
        ours = _throughput(t.encode_ordinary, heldout)
        theirs = _throughput(t.to_tiktoken().encode_ordinary, heldout, repeats=3)
        print(f"  {label:<20}  bpe.py encode: {ours:6.2f} MB/s   to_tiktoken(): {theirs:6.2f} MB/s")


def _check_writable(flag, path):
    """Refuse, before a long training run, an output path that saving would fail on: a directory,
    or a place whose nearest existing folder is a file or not writable."""
    require(not os.path.isdir(path), f"{flag} {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    require(os.path.isdir(parent) and os.access(parent, os.W_OK),
            f"{flag} {path}: cannot write into {parent}")


def _check_args(args):
    """Every bad value refused before anything is read, trained or written."""
    if args.train:
        require(args.vocab_size is not None and args.out is not None,
                "--train needs --vocab-size and --out")
        require(args.vocab_size >= 256,
                f"--vocab-size {args.vocab_size}: must be at least 256 (the byte tokens)")
        require(all(args.special), "--special: a special token must be a non-empty string")
        _check_writable("--out", args.out)
        if args.tiktoken_out:
            _check_writable("--tiktoken-out", args.tiktoken_out)
    elif args.plot:
        require(args.max_vocab > 256, f"--max-vocab {args.max_vocab}: must be above 256")
        _check_writable("--plot-out", args.plot_out)
    elif args.bench:
        require(args.bench_vocab > 256, f"--bench-vocab {args.bench_vocab}: must be above 256")
        require(args.bench_mb > 0, f"--bench-mb {args.bench_mb}: must be positive")


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description="Byte-level BPE: train, show, plot, benchmark.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--train", nargs="+", metavar="FILE", help="train on these UTF-8 text files")
    action.add_argument("--show", metavar="TEXT", help="print how TEXT splits into tokens")
    action.add_argument("--plot", action="store_true",
                        help="plot bytes/token against vocab size (bundled corpus)")
    action.add_argument("--bench", action="store_true",
                        help="time plain vs fast trainer and encode throughput")
    add = parser.add_argument
    add("--vocab-size", type=int, help="--train: ordinary vocabulary size (256 + merges)")
    add("--out", help="--train: where to write the tokenizer (human-readable format)")
    add("--tiktoken-out", help="--train: also write tiktoken's ranks format here")
    add("--special", nargs="*", default=[],
        help="--train: special tokens to add, e.g. '<|endoftext|>'")
    add("--plain", action="store_true", help="--train: use the plain (slow) trainer")
    add("--verbose", action="store_true", help="--train: print progress")
    add("--pattern", choices=sorted(PATTERNS), default="gpt4", help="pre-split regex")
    add("--tokenizer", help="--show: a file written by --train (default: GPT-2)")
    add("--max-vocab", type=int, default=16384, help="--plot: largest vocab size trained")
    add("--plot-out", default=os.path.join(HERE, "assets", "bpe_bytes_per_token.png"),
        help="--plot: PNG path")
    add("--bench-mb", type=float, default=1.0, help="--bench: MB of corpus to train on (shrink it)")
    add("--bench-vocab", type=int, default=1024, help="--bench: vocab size to train to")
    args = parser.parse_args(argv)
    _check_args(args)
    if args.train:
        cmd_train(args)
    elif args.show is not None:
        cmd_show(args)
    elif args.plot:
        cmd_plot(args)
    else:
        cmd_bench(args)


if __name__ == "__main__":
    main()
