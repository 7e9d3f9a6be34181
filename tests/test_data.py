"""data.py: tokenizers (char, GPT-2 offline, BPE trained on the train split only) with each model's special tokens on
top; the corpus split by whole documents, joined by <|endoftext|>, with document and line boundaries; a token cache
that follows the files; unreadable data refused with one line."""

import os

import numpy as np
import pytest
import torch

import data
import train
from common import UsageError
from helpers import exit_code, tiny_args

SHAKESPEARE = os.path.join(train.ROOT, "data", "shakespeare")


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_gpt2_tokenizer_works_offline_and_matches_gpt2():
    tok = data.gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995], "GPT-2 encodes 'Hello world' as [15496, 995]"
    assert tok.eot_id == 50256 and tok.n_vocab == 50257
    text = "To be, or not to be: that is the question.<|endoftext|>"
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_round_trips_and_rejects_unknown_characters():
    tok = data.CharTokenizer("ab ")
    assert tok.encode("ba ab") == [1, 0, 2, 0, 1]
    assert tok.decode(tok.encode("ba ab")) == "ba ab"
    with pytest.raises(UsageError, match="'z'"):
        tok.encode("abz")


def test_model_special_tokens_sit_above_every_tokenizer_and_ordinary_text_is_unchanged(tmp_path, corpus):
    import toy_mlm
    specials = data.special_tokens_of(toy_mlm)
    assert specials == ["<|endoftext|>", "[MASK]", "[PAD]"]
    text = "Good my lord, [MASK] is here."
    docs = [(corpus / "hamlet.txt").read_text()]
    for kind in ("char", "gpt2", "bpe"):
        cfg = train.TrainConfig(tokenizer=kind, vocab_size=300, cache_dir=str(tmp_path / "cache"))
        plain = data.build_tokenizer(cfg, docs, docs + [text], [data.EOT])
        tok = data.build_tokenizer(cfg, docs, docs + [text], specials)
        assert tok.n_vocab == plain.n_vocab + 2 and tok.eot_id == plain.eot_id
        assert tok.specials["[MASK]"] == plain.n_vocab and tok.specials["[PAD]"] == plain.n_vocab + 1
        assert tok.encode_corpus(docs) == plain.encode_corpus(docs), f"{kind}: ordinary text encodes differently"
        ids = tok.encode(text)
        assert tok.specials["[MASK]"] in ids and tok.decode(ids) == text
        again = data.tokenizer_from_identity(tok.identity())
        assert again.specials == tok.specials and again.encode(text) == ids, f"{kind}: identity lost the specials"
    assert data.gpt2_tokenizer().encode("Hello world") == [15496, 995]


def test_bpe_tokenizer_is_trained_on_the_train_split_and_recorded_in_the_checkpoint(tmp_path, corpus, capsys):
    import bpe

    bpe_args = ("--tokenizer", "bpe", "--vocab-size", "300", "--val-docs", "lear", "--max-iters", "2")
    train.train(tiny_args("gpt", tmp_path, corpus, *bpe_args))
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    ident = ckpt["tokenizer"]
    assert ident["kind"] == "bpe" and len(ident["merges"]) == 300 - 256 - 1 and ident["special_tokens"] == {
        "<|endoftext|>": 299}, "checkpoint must hold the whole vocabulary as plain data"
    train_text = "".join((corpus / f"{n}.txt").read_text() for n in ("hamlet", "macbeth", "othello", "tempest"))
    expected = bpe.Tokenizer(pattern="gpt4").train(train_text, 299)
    merges = [list(p) for p, _ in sorted(expected.merges.items(), key=lambda m: m[1])]
    assert [m[:2] for m in ident["merges"]] == merges, \
        "the vocabulary must be learned from the training split alone (held-out works excluded)"
    model, tok, _ = train.load_for_inference(str(tmp_path / "out" / "ckpt.pt"))
    assert tok.decode(tok.encode("Good my lord,")) == "Good my lord,"
    capsys.readouterr()
    train.train(tiny_args("gpt", tmp_path, corpus, *bpe_args, "--out-dir", str(tmp_path / "out2")))
    assert "trained a" not in capsys.readouterr().out, "a second run must reuse the cached vocabulary"


# ----------------------------------------------------------------------------------------------------------------------
# Splits, streams and the cache


def test_split_is_by_document_and_bundled_val_works_are_held_out(tmp_path):
    cfg = train.TrainConfig(cache_dir=str(tmp_path / "cache"))
    tok, splits, _ = data.prepare_data(cfg)
    assert splits["val"].doc_names == list(data.BUNDLED_VAL_DOCS)
    assert not set(splits["train"].doc_names) & set(splits["val"].doc_names), "a work is in both splits"
    assert len(splits["train"].doc_names) == 39
    with open(os.path.join(SHAKESPEARE, "julius_caesar.txt")) as f:
        caesar = f.read()
    probe = tok.encode(caesar[20000:20200])  # a passage of a held-out play must not be in the training stream
    train_text = tok.decode(splits["train"].tokens[:].tolist())
    assert tok.decode(probe) not in train_text, "held-out text leaked into the training split"
    assert splits["val"].n_bytes == sum(os.path.getsize(os.path.join(SHAKESPEARE, n + ".txt"))
                                        for n in data.BUNDLED_VAL_DOCS)


def test_token_cache_is_rebuilt_when_a_file_or_the_tokenizer_changes(tmp_path, corpus):
    cfg = train.TrainConfig(data=str(corpus), cache_dir=str(tmp_path / "cache"), val_docs="lear")
    tok, s1, key1 = data.prepare_data(cfg)
    _, s1b, key1b = data.prepare_data(cfg)
    assert key1 == key1b and np.array_equal(s1["train"].tokens, s1b["train"].tokens), "cache not reused"
    (corpus / "hamlet.txt").write_text((corpus / "hamlet.txt").read_text().replace("the", "THE"))
    tok2, s2, key2 = data.prepare_data(cfg)
    assert key2 != key1, "editing a file did not invalidate the cache"
    assert "THE" in tok2.decode(s2["train"].tokens[:].tolist())
    cfg.tokenizer = "gpt2"
    _, s3, key3 = data.prepare_data(cfg)
    assert key3 != key2 and s3["train"].tokens.dtype == np.uint16 and s3["train"].tokens.max() < 50257


def test_documents_are_joined_by_endoftext(tmp_path, corpus):
    cfg = train.TrainConfig(data=str(corpus), cache_dir=str(tmp_path / "cache"), val_docs="lear")
    tok, splits, _ = data.prepare_data(cfg)
    tr = splits["train"]
    assert list(tr.doc_names) == ["hamlet", "macbeth", "othello", "tempest"]
    ends = list(tr.doc_starts[1:] - 1) + [len(tr.tokens) - 1]
    assert all(tr.tokens[e] == tok.eot_id for e in ends), "each document must end with <|endoftext|>"
    assert (tr.tokens == tok.eot_id).sum() == 4


def test_data_cache_keeps_line_starts(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("First line\n  second, indented\n\nfourth\n")
    (d / "b.txt").write_text("x\ny\n")
    assert data._line_starts("ab\ncd", [0, 1, 2, 3, 4], np.ones(5, dtype=np.int64)).tolist() == [0, 3]
    for kind in ("char", "gpt2"):
        cfg = train.TrainConfig(data=str(d), val_docs="b", tokenizer=kind, cache_dir=str(tmp_path / kind))
        tok, splits, _ = data.prepare_data(cfg)
        tr = splits["train"]
        starts = tr.line_starts.tolist()
        lines = [tok.decode(tr.tokens[a:b].tolist()) for a, b in zip(starts, starts[1:] + [len(tr.tokens)])]
        assert "".join(lines) == tok.decode(tr.tokens[:].tolist())
        stripped = [ln.strip() for ln in lines]
        assert stripped == ["First line", "second, indented", "", "fourth", "<|endoftext|>"] or \
            [ln for ln in stripped if ln] == ["First line", "second, indented", "fourth", "<|endoftext|>"], \
            f"{kind}: lines are {lines}"
        assert lines[1].lstrip(" ").startswith("second") and lines[0].startswith("First")
        assert splits["val"].line_starts.tolist() == [0, 2, 4], f"{kind}: val lines (x, y, <|endoftext|>)"


def test_split_slices_keep_their_boundaries():
    s = data.Split("t", np.arange(100), np.array([0, 40, 70]), np.array([0, 10, 40, 55, 70, 90]), ["a", "b", "c"], 100)
    part = s.slice(50, 80)
    assert part.tokens.tolist() == list(range(50, 80))
    assert part.doc_starts.tolist() == [0, 20] and part.line_starts.tolist() == [0, 5, 20]


def test_data_with_no_readable_text_is_rejected(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.txt").write_text("  \n")
    (tmp_path / "d" / "binary.txt").write_bytes(b"\xff\xfe\x00abc")
    assert exit_code(train.main, ["--data", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c"),
                                  "--out-dir", str(tmp_path / "out")]) == 2
    assert "cannot read" in capsys.readouterr().err
