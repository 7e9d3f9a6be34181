"""Tests for bpe.py: plain == fast trainer, round trips, exact GPT-2 parity with tiktoken, save/load, to_tiktoken().

Oracles: tiktoken's own GPT-2 definition (tiktoken_ext.openai_public.gpt2) fed the bundled data/gpt2.tiktoken instead of
a download, and tiktoken's own cl100k pattern for the GPT-4 pre-split. Nothing touches the network or the cwd.
"""
import random
from unittest import mock

import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public as openai_public
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpe
from helpers import exit_code


def seeded(max_examples):
    """Hypothesis settings: derandomized (same examples every run), no example database written, no deadline."""
    return settings(derandomize=True, deadline=None, database=None, max_examples=max_examples,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def shakespeare():
    return bpe.read_corpus("shakespeare")


@pytest.fixture(scope="module")
def milton():
    return bpe.read_corpus("milton")


@pytest.fixture(scope="module")
def ours_gpt2():
    return bpe.gpt2()


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """tiktoken's real GPT-2 encoding (its own constructor: pattern, special token, explicit vocab size), offline."""
    ranks = tiktoken.load.load_tiktoken_bpe(bpe.GPT2_FILE, expected_hash=bpe.GPT2_SHA256)
    with mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda **kwargs: ranks):
        return tiktoken.Encoding(**openai_public.gpt2())


@pytest.fixture(scope="module")
def trained():
    """A small tokenizer trained on Shakespeare with GPT-4's pattern, plus special tokens like train.py will add."""
    tok = bpe.Tokenizer.from_dict(_TRAINED_FOR_HYPOTHESIS().to_dict())  # a copy: specials stay out of the shared one
    tok.register_special_tokens(["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]"]
                                + [f"<extra_id_{i}>" for i in range(12)])
    return tok


ADVERSARIAL = [
    "", " ", "a", "hello world", "Hello, World!!!",
    "   leading and trailing   ", "\n\n\n", " \n \n\t\t x", "tabs\tand\r\nwindows\r\nlines", "a    b\n\n   c     ",
    "I'll we'VE don't it's 'S 'll 'd they'RE O'Neil ''s ' s", "isn't isN'T",
    "12345678901 3.14159 1,000,000 0x1F 2024-05-09 ٣٤٥ ½ ²³",
    "emoji 😀😃👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 ❤️",
    "中文字符测试，标点。 日本語のテキスト 한국어 텍스트",
    "mixed: Ελληνικά русский עברית العربية हिन्दी ไทย café naïve Zürich",
    "zero\u200bwidth\u200d joiners and \ufeff BOM, combining e\u0301 a\u0308",
    "code: def f(x):\n    return x**2  # comment\n\tif (a && b) { c[0] = 'd'; }",
    "<|endoftext|>", "before<|endoftext|>after", "<|endoftext|><|endoftext|>", " <|endoftext|> ", "<|endoftext",
    "<|endoftext|>\n\n<|endoftext|>  x", "\x00\x01\x7f control \x1b[31m",
    "!!!???...,,,;;;", "    ", "a" * 300, " " * 257 + "x", "ab" * 200, "🙂" * 50,
]


# ---------------------------------------------------------------------------------------------------------------------
# training: the plain (slide) trainer and the fast trainer learn the same merges


@pytest.mark.parametrize("corpus, start, length, pattern, vocab_size", [
    ("shakespeare", 0, 40_000, "gpt2", 420),
    ("milton", 100_000, 40_000, "gpt4", 380),
    ("shakespeare", 2_500_000, 25_000, "gpt4", 600),
])
def test_plain_and_fast_trainers_learn_identical_merges(corpus, start, length, pattern, vocab_size):
    text = bpe.read_corpus(corpus)[start:start + length]
    plain = bpe.train_plain(text, vocab_size, bpe.PATTERNS[pattern])
    fast = bpe.train_fast(text, vocab_size, bpe.PATTERNS[pattern])
    assert len(plain) == vocab_size - 256, f"plain trainer stopped early ({len(plain)} merges) on a real corpus"
    first_diff = next((i for i, (p, f) in enumerate(zip(plain, fast)) if p != f), None)
    assert plain == fast, f"plain and fast trainers disagree (first at merge {first_diff}, or in length)"


@seeded(300)
@given(st.text(alphabet="aab \n\u00e9\u4e2d", max_size=120), st.integers(256, 300))
def test_plain_and_fast_agree_on_repetitive_text_with_ties_and_overlaps(text, vocab_size):
    # a tiny alphabet makes ties and overlapping pairs ('aaaa') the common case, and texts run out of pairs early
    plain = bpe.train_plain(text, vocab_size, bpe.GPT2_PATTERN)
    fast = bpe.train_fast(text, vocab_size, bpe.GPT2_PATTERN)
    assert plain == fast, "plain and fast trainers disagree on ties/overlaps/early stop"


def test_ties_go_to_the_smallest_pair():
    # after 'aa', both 'ab' = (97, 98) and 'aa'+'a' = (256, 97) occur twice: the documented rule picks (97, 98)
    for train in (bpe.train_plain, bpe.train_fast):
        assert train("aaab aaab", 258, bpe.GPT2_PATTERN) == [(97, 97), (97, 98)], \
            f"{train.__name__} does not break ties by the smallest pair"


def test_merges_never_cross_chunk_boundaries(trained):
    for token in trained.vocab.values():
        text = token.decode("utf-8", errors="replace")
        if "\ufffd" not in text:
            assert len(bpe.split_chunks(text, trained.pattern)) <= 1, f"token {token!r} spans two pre-split chunks"


def test_common_words_stay_whole_rare_words_split(trained):
    assert len(trained.encode(" the")) == 1, "a very common word was not learned as one token"
    assert len(trained.encode(" antidisestablishmentarianism")) > 3, "a word never seen was not split into pieces"


def test_train_validates_input():
    with pytest.raises(ValueError, match="at least 256"):
        bpe.Tokenizer().train("abc", 100)
    tok = bpe.Tokenizer()
    tok.register_special_tokens(["<|endoftext|>"])
    with pytest.raises(ValueError, match="before registering"):
        tok.train("abc", 300)
    with pytest.raises(ValueError, match="pattern"):
        bpe.Tokenizer("([unclosed")


# ---------------------------------------------------------------------------------------------------------------------
# encode / decode round trips


@seeded(1500)
@given(st.text(max_size=80))
def test_round_trip_random_unicode(text):
    for name, tok in (("trained", _TRAINED_FOR_HYPOTHESIS()), ("gpt2", _GPT2_FOR_HYPOTHESIS())):
        ids = tok.encode_ordinary(text)
        assert tok.decode(ids) == text, f"{name}: decode(encode(text)) != text"
        assert tok.decode_bytes(ids) == text.encode("utf-8"), f"{name}: token bytes do not join to the text's UTF-8"


@seeded(1500)
@given(st.binary(max_size=80))
def test_round_trip_random_bytes(data):
    text = data.decode("utf-8", errors="replace")  # arbitrary bytes as a user would get them from a file
    tok = _TRAINED_FOR_HYPOTHESIS()
    assert tok.decode(tok.encode_ordinary(text)) == text, "round trip failed on text decoded from random bytes"


@seeded(1000)
@given(st.lists(st.integers(0, 699), max_size=40))
def test_decode_never_crashes_and_replaces_invalid_utf8(ids):
    tok = _TRAINED_FOR_HYPOTHESIS()
    raw = b"".join(tok.vocab[i] for i in ids)
    assert tok.decode(ids) == raw.decode("utf-8", errors="replace"), "decode of arbitrary ids is not bytes->'replace'"


def test_decode_partial_character_and_unknown_id(ours_gpt2):
    emoji = ours_gpt2.encode("😀")
    assert len(emoji) > 1, "setup: expected the emoji to need several GPT-2 tokens"
    assert ours_gpt2.decode(emoji[:1]) == "\ufffd", "half an emoji did not decode to U+FFFD"
    with pytest.raises(ValueError, match="unknown token id"):
        ours_gpt2.decode([ours_gpt2.vocab_size])


# hypothesis cannot take pytest fixtures; these build the tokenizers once per session instead
_cache = {}


def _TRAINED_FOR_HYPOTHESIS():
    if "trained" not in _cache:
        _cache["trained"] = bpe.Tokenizer("gpt4").train(bpe.read_corpus("shakespeare")[:200_000], 700)
    return _cache["trained"]


def _GPT2_FOR_HYPOTHESIS():
    if "gpt2" not in _cache:
        _cache["gpt2"] = bpe.gpt2()
    return _cache["gpt2"]


# ---------------------------------------------------------------------------------------------------------------------
# GPT-2 parity with tiktoken


def test_gpt2_basics(ours_gpt2, tiktoken_gpt2):
    assert ours_gpt2.vocab_size == tiktoken_gpt2.n_vocab == 50257, "GPT-2 vocab size is not 50257"
    assert ours_gpt2.special_tokens == {"<|endoftext|>": 50256}, "GPT-2's <|endoftext|> is not id 50256"


def test_gpt2_parity_on_whole_bundled_corpus(ours_gpt2, tiktoken_gpt2, shakespeare, milton):
    for name, text in (("shakespeare", shakespeare), ("milton", milton)):
        ours, theirs = ours_gpt2.encode(text), tiktoken_gpt2.encode(text)
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        assert ours == theirs, f"GPT-2 ids differ from tiktoken on {name} (first at token {first_diff})"


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_gpt2_parity_on_adversarial_text(ours_gpt2, tiktoken_gpt2, text):
    assert ours_gpt2.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all"), \
        "GPT-2 parity broken with special tokens allowed"
    assert ours_gpt2.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text), \
        "GPT-2 parity broken on encode_ordinary"
    assert ours_gpt2.encode(text, disallowed_special=()) == tiktoken_gpt2.encode(text, disallowed_special=()), \
        "GPT-2 parity broken with special-token text encoded as ordinary text"


@seeded(1500)
@given(st.text(max_size=60) | st.lists(st.sampled_from(["<|endoftext|>", " ", "\n", "'s", "12", "a", "😀", "中"]),
                                       max_size=12).map("".join))
def test_gpt2_parity_on_random_text(text):
    ours, ref = _GPT2_FOR_HYPOTHESIS(), _tiktoken_gpt2_for_hypothesis()
    assert ours.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all"), \
        "GPT-2 parity broken on random text"


def _tiktoken_gpt2_for_hypothesis():
    if "tiktoken_gpt2" not in _cache:
        ranks = tiktoken.load.load_tiktoken_bpe(bpe.GPT2_FILE, expected_hash=bpe.GPT2_SHA256)
        with mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda **kwargs: ranks):
            _cache["tiktoken_gpt2"] = tiktoken.Encoding(**openai_public.gpt2())
    return _cache["tiktoken_gpt2"]


@pytest.mark.parametrize("text", ["lone \ud800 surrogate", "\udfff", "pair \ud83d\ude00 as two code units"])
def test_gpt2_parity_on_surrogates(ours_gpt2, tiktoken_gpt2, text):
    assert ours_gpt2.encode(text) == tiktoken_gpt2.encode(text), "surrogates are not handled as tiktoken does"


def test_special_tokens_allowed_and_disallowed_like_tiktoken(ours_gpt2, tiktoken_gpt2):
    text = "end<|endoftext|>start"
    for enc, name in ((ours_gpt2, "bpe.py"), (tiktoken_gpt2, "tiktoken")):
        with pytest.raises(ValueError):
            enc.encode(text)  # default: every special is disallowed
        with pytest.raises(ValueError):
            enc.encode(text, disallowed_special={"<|endoftext|>"})
    assert ours_gpt2.encode(text, allowed_special={"<|endoftext|>"}) == \
        tiktoken_gpt2.encode(text, allowed_special={"<|endoftext|>"}), "allowed special set differs from tiktoken"
    assert 50256 in ours_gpt2.encode(text, allowed_special="all"), "allowed <|endoftext|> was not id 50256"
    assert 50256 not in ours_gpt2.encode(text, disallowed_special=()), \
        "special text became a special id although not allowed"
    assert ours_gpt2.encode("plain text") == tiktoken_gpt2.encode("plain text"), "text without specials changed"


def test_gpt2_reads_its_file_relative_to_bpe_py_not_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bpe.gpt2().encode("Hello world") == [15496, 995], "gpt2() failed or changed when run from another cwd"


def test_gpt2_file_hash_is_checked(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(open(bpe.GPT2_FILE, "rb").read().replace(b"IQ== 0", b"IQ== 7", 1))
    with pytest.raises(ValueError, match="sha256"):
        bpe.Tokenizer.load_tiktoken(str(bad), bpe.GPT2_PATTERN, expected_sha256=bpe.GPT2_SHA256)


# ---------------------------------------------------------------------------------------------------------------------
# special tokens on a trained tokenizer


def test_register_special_tokens(trained):
    assert trained.special_tokens["<|endoftext|>"] == 700, "first special token is not right above the merges"
    assert trained.vocab_size == 700 + 17, "vocab_size does not count the special tokens"
    ids = trained.encode("[CLS] to be [SEP] or not<extra_id_3>", allowed_special="all")
    assert trained.special_tokens["[CLS]"] in ids and trained.special_tokens["<extra_id_3>"] in ids, \
        "allowed special tokens were not encoded as their ids"
    assert trained.decode(ids) == "[CLS] to be [SEP] or not<extra_id_3>", "special tokens do not decode to their text"
    with pytest.raises(ValueError, match="already"):
        trained.register_special_tokens({"[NEW]": 5})  # id of a byte token
    with pytest.raises(ValueError, match="already"):
        trained.register_special_tokens({"[CLS]": 9999})


# ---------------------------------------------------------------------------------------------------------------------
# save / load, tiktoken format, to_tiktoken()


def test_save_load_round_trip(trained, ours_gpt2, shakespeare, tmp_path):
    sample = shakespeare[-50_000:] + " <|endoftext|> [MASK]"
    for name, tok in (("trained", trained), ("gpt2", ours_gpt2)):
        path = tmp_path / f"{name}.bpe"
        tok.save(str(path))
        loaded = bpe.Tokenizer.load(str(path))
        assert loaded.to_dict() == tok.to_dict(), f"{name}: save/load changed the tokenizer's data"
        assert loaded.encode(sample, allowed_special="all") == tok.encode(sample, allowed_special="all"), \
            f"{name}: loaded tokenizer encodes differently"
        again = bpe.Tokenizer.from_dict(tok.to_dict())
        assert again.encode(sample, allowed_special="all") == tok.encode(sample, allowed_special="all"), \
            f"{name}: from_dict(to_dict()) encodes differently"
    head = (tmp_path / "trained.bpe").read_text(encoding="utf-8").splitlines()[:5]
    assert head[0] == bpe.FORMAT_HEADER and head[3].startswith("merge "), "saved file is not the documented text format"


def test_tiktoken_format_round_trip(trained, shakespeare, tmp_path):
    path = tmp_path / "trained.tiktoken"
    trained.save_tiktoken(str(path))
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == trained.mergeable_ranks(), \
        "tiktoken cannot read our ranks file"
    loaded = bpe.Tokenizer.load_tiktoken(str(path), trained.pattern, trained.special_tokens)
    assert loaded.merges == trained.merges, "merges recovered from our ranks file differ from the trained merges"
    sample = shakespeare[-30_000:]
    assert loaded.encode(sample) == trained.encode(sample), "tokenizer read from tiktoken format encodes differently"


def test_to_tiktoken_agrees_with_encode(trained, ours_gpt2, tiktoken_gpt2, shakespeare, milton):
    enc = trained.to_tiktoken()
    for text in (shakespeare[:400_000], milton, *ADVERSARIAL):
        assert enc.encode(text, allowed_special="all") == trained.encode(text, allowed_special="all"), \
            "to_tiktoken() disagrees with encode"
    assert enc.n_vocab == trained.vocab_size, "to_tiktoken() has a different vocab size"
    gpt2_enc = ours_gpt2.to_tiktoken()
    assert gpt2_enc.encode(milton) == tiktoken_gpt2.encode(milton), "gpt2().to_tiktoken() is not tiktoken's GPT-2"


@seeded(1000)
@given(st.text(max_size=80))
def test_to_tiktoken_agrees_with_encode_on_random_text(text):
    tok = _TRAINED_FOR_HYPOTHESIS()
    if "enc" not in _cache:
        _cache["enc"] = tok.to_tiktoken()
    assert _cache["enc"].encode_ordinary(text) == tok.encode_ordinary(text), "to_tiktoken() disagrees on random text"


def test_gpt4_pattern_matches_tiktoken_cl100k(trained, shakespeare):
    # tiktoken's own cl100k_base definition, fed our ranks: its pre-split must tokenize exactly like ours
    with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *a, **k: trained.mergeable_ranks()):
        pat_str = openai_public.cl100k_base()["pat_str"]
    enc = tiktoken.Encoding("cl100k-pattern", pat_str=pat_str, mergeable_ranks=trained.mergeable_ranks(),
                            special_tokens={})
    rng = random.Random(0)
    pieces = ADVERSARIAL + ["Don'T", "1234567", "x\r\n\r\n  y", "  \n", "end  "]
    texts = [shakespeare[:100_000]] + pieces + ["".join(rng.choice(pieces) for _ in range(8)) for _ in range(300)]
    for text in texts:
        assert trained.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=()), \
            "GPT4_PATTERN splits differently from tiktoken's cl100k pattern"


# ---------------------------------------------------------------------------------------------------------------------
# command line


def test_cli_train_and_show(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text(bpe.read_corpus("milton")[:20_000], encoding="utf-8")
    out = tmp_path / "m.bpe"
    bpe.main(["--train", str(src), "--vocab-size", "300", "--out", str(out), "--special", "<|endoftext|>",
              "--tiktoken-out", str(tmp_path / "m.tiktoken")])
    tok = bpe.Tokenizer.load(str(out))
    assert len(tok.merges) == 44 and tok.special_tokens == {"<|endoftext|>": 300}, "--train wrote the wrong tokenizer"
    assert (tmp_path / "m.tiktoken").exists(), "--tiktoken-out wrote nothing"
    capsys.readouterr()
    bpe.main(["--show", "Of Man's first disobedience", "--tokenizer", str(out)])
    shown = capsys.readouterr().out
    assert shown.splitlines()[0].replace("|", "") == "Of Man's first disobedience", "--show does not split the text"
    assert exit_code(bpe.main, ["--train", str(src), "--vocab-size", "300"]) == 2, "--out missing: not a usage error"


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    ok, latin1 = tmp_path / "ok.txt", tmp_path / "latin1.txt"
    ok.write_text("to be or not to be", encoding="utf-8")
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    out = str(tmp_path / "new" / "t.bpe")
    train = ["--train", str(ok), "--out", out]
    for argv, message in [
        (["--train", str(tmp_path / "missing.txt"), "--vocab-size", "300", "--out", out], "no such file"),
        (["--train", str(latin1), "--vocab-size", "300", "--out", out], "not UTF-8"),
        ([*train, "--vocab-size", "100"], "--vocab-size 100"),
        (["--train", str(ok), "--vocab-size", "300"], "needs --vocab-size and --out"),
        ([*train, "--vocab-size", "300", "--special", ""], "--special"),
        (["--train", str(ok), "--vocab-size", "300", "--out", str(tmp_path)], "is a directory"),
        (["--train", str(ok), "--vocab-size", "300", "--out", str(ok / "t.bpe")], "cannot write"),
        (["--show", "hi", "--tokenizer", str(tmp_path / "missing.bpe")], "no such tokenizer file"),
        (["--show", "hi", "--tokenizer", str(ok)], "not a bpe.py tokenizer file"),
        (["--show", "hi", "--tokenizer", str(latin1)], "--tokenizer"),
        (["--plot", "--max-vocab", "256"], "--max-vocab 256"),
        (["--plot", "--plot-out", str(tmp_path)], "--plot-out"),
        (["--bench", "--bench-vocab", "100"], "--bench-vocab 100"),
        (["--bench", "--bench-mb", "-1"], "--bench-mb"),
    ]:
        assert exit_code(bpe.main, argv) == 2, f"{argv}: not exit code 2"
        err = capsys.readouterr().err
        assert err.startswith("bpe.py: error: ") and message in err and len(err.strip().splitlines()) == 1, \
            f"{argv}: {err!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt", "ok.txt"], "a refused command wrote a file"
