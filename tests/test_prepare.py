"""`python data.py prepare`: a corpus streamed into a directory that --data points at. The tokens, document starts and
line starts are exactly those of the in-memory path; an interrupted prepare resumes from its last commit to the same
result; train.py trains on the directory; wrong uses fail with one line."""

import json

import numpy as np
import pytest

import data
import train
from common import UsageError
from helpers import exit_code, tiny_args


def arrays(split):
    return [np.asarray(split.tokens).tolist(), np.asarray(split.doc_starts).tolist(),
            np.asarray(split.line_starts).tolist()]


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_prepared_tokens_and_boundaries_equal_the_in_memory_path(tmp_path, corpus, tokenizer):
    meta = data.prepare(str(corpus), str(tmp_path / "prep"), tokenizer, val_docs="lear", commit_every=2)
    assert meta["done"] and meta["train"]["docs"] == 4 and meta["val"]["doc_names"] == ["lear"]
    cfg = train.TrainConfig(data=str(corpus), val_docs="lear", tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    tok, splits, _ = data.prepare_data(cfg)
    cfg_prep = train.TrainConfig(data=str(tmp_path / "prep"), tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    tok2, prepared, _ = data.prepare_data(cfg_prep)
    assert tok2.n_vocab == tok.n_vocab
    for part in ("train", "val"):
        assert arrays(prepared[part]) == arrays(splits[part]), f"{tokenizer}/{part}: prepared != in-memory"
        assert prepared[part].n_bytes == splits[part].n_bytes


def test_an_interrupted_prepare_resumes_from_its_last_commit_to_the_same_result(tmp_path, corpus, monkeypatch):
    reference = data.prepare(str(corpus), str(tmp_path / "ref"), "gpt2", val_docs="lear", commit_every=1)
    real, calls = data.read_text, []

    def flaky(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while reading the third document
        return real(path)

    monkeypatch.setattr(data, "read_text", flaky)
    out = tmp_path / "prep"
    with pytest.raises(KeyboardInterrupt):
        data.prepare(str(corpus), str(out), "gpt2", val_docs="lear", commit_every=1)
    meta = json.loads((out / "prepared.json").read_text())
    assert not meta["done"] and meta["train"]["read"] == 2 and meta["train"]["docs"] == 2
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert len(tokens) == meta["train"]["tokens"] and tokens[-1] == 50256, "a commit ends at a document boundary"
    with open(out / "train.bin", "ab") as f:
        f.write(b"\x01\x02" * 7)  # half-written tokens after the last commit (a crash mid-batch)
    monkeypatch.setattr(data, "read_text", real)
    with pytest.raises(UsageError, match="did not finish"):
        data.prepare_data(train.TrainConfig(data=str(out), tokenizer="gpt2"))
    resumed = data.prepare(str(corpus), str(out), "gpt2", val_docs="lear", commit_every=1)
    assert {k: resumed[k] for k in ("train", "val")} == {k: reference[k] for k in ("train", "val")}
    for ext in (".bin", ".docs.bin", ".lines.bin"):
        for part in ("train", "val"):
            assert (out / f"{part}{ext}").read_bytes() == (tmp_path / "ref" / f"{part}{ext}").read_bytes(), \
                f"{part}{ext} differs after resuming"


def test_train_py_trains_on_a_prepared_directory(tmp_path, corpus, capsys):
    data.main(["prepare", "--data", str(corpus), "--out", str(tmp_path / "prep"), "--val-docs", "lear"])
    out = capsys.readouterr().out
    assert "prepare train: 4/4 documents" in out and "train with --data" in out
    rows = train.train(tiny_args("gpt", tmp_path, tmp_path / "prep", "--tokenizer", "gpt2", "--max-iters", "2"))
    assert rows[-1]["step"] == 2 and rows[-1]["val_loss"] > 0
    with pytest.raises(UsageError, match="prepared with --tokenizer gpt2, not char"):
        train.train(["--model", "gpt", "--preset", "tiny", "--data", str(tmp_path / "prep"), "--out-dir",
                     str(tmp_path / "out2")])


def test_prepare_refuses_another_corpus_in_the_same_directory(tmp_path, corpus, capsys):
    data.prepare(str(corpus), str(tmp_path / "prep"), "gpt2", val_docs="lear")
    argv = ["prepare", "--data", str(corpus), "--out", str(tmp_path / "prep"), "--val-docs", "hamlet"]
    assert exit_code(data.main, argv) == 2 and "holds a prepare of other data" in capsys.readouterr().err
