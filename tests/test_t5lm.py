"""What t5lm.py promises (Raffel et al. 2020 §3.2, Table 2's decoder-only rows under denoising): a row is T5's corrupted
input then its targets, the very corruption t5.py gives the encoder-decoder at the same seed; the language model
predicts every next token, the prefix LM only the targets, reading the input both ways and no target before its turn;
it trains and resumes through train.py, and fine-tunes on the encoder's view of an example."""

import pytest
import torch

import data
import gpt
import t5
import t5lm
import train
from helpers import assert_resumes, exit_code, redraw, tiny_args


def objective(tmp_path, corpus, **kw):
    tc = train.TrainConfig(data=str(corpus), cache_dir=str(tmp_path / "cache"))
    tok, splits, _ = data.prepare_data(tc, data.special_tokens_of(t5lm))
    cfg = t5lm.Config(**{**train.tokenizer_fields(t5lm, tok), "inputs_length": 32, "n_layer": 2, "n_head": 2,
                         "n_embd": 16, **kw})
    return t5lm.Objective(cfg, tok), splits, cfg, tok


def test_a_row_is_the_input_then_its_targets_as_the_docstring_shows(tmp_path, corpus):
    obj, _, cfg, _ = objective(tmp_path, corpus)
    eos, s, pad = cfg.eos_token_id, obj.t5.vocab_size - 1, cfg.pad_token_id  # s: sentinel 0
    batch = {"input_ids": torch.tensor([[7, 8, s, eos, pad]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),
             "labels": torch.tensor([[s, 9, eos, -100]])}
    obj.block_size = 7
    got = obj.join(batch)
    assert got["idx"].tolist() == [[7, 8, s, eos, s, 9, pad]]
    assert got["targets"].tolist() == [[8, s, eos, s, 9, eos, -100]], "the LM predicts every next token"
    obj.prefix_lm = True
    got = obj.join(batch)
    assert got["targets"].tolist() == [[-100, -100, -100, s, 9, eos, -100]], "the prefix LM predicts the targets only"
    assert got["prefix_len"].tolist() == [4], "the prefix is the input and its </s>"


@pytest.mark.parametrize("noise", ["iid", "spans"])
def test_rows_are_t5s_corruption_at_the_same_seed_and_no_target_is_visible_to_its_position(tmp_path, corpus, noise):
    for prefix_lm in (False, True):
        obj, splits, cfg, tok = objective(tmp_path, corpus, noise_mask=noise, prefix_lm=prefix_lm)
        ref = t5.DenoisingObjective(cfg.t5_config(), tok).train_batch(splits["train"], 16,
                                                                      torch.Generator().manual_seed(0))
        got = obj.train_batch(splits["train"], 16, torch.Generator().manual_seed(0))
        for b in range(16):
            inputs = ref["input_ids"][b][ref["attention_mask"][b].bool()]
            targets = ref["labels"][b][ref["labels"][b] != -100]
            row, S = torch.cat([inputs, targets]), len(inputs)
            n = len(row)
            assert torch.equal(got["idx"][b, :n - 1], row[:-1]) and (got["idx"][b, n - 1:] == cfg.pad_token_id).all(), \
                f"row {b}: not T5's input then its targets, then padding"
            predicted = (got["targets"][b] != -100).nonzero().flatten()
            first = S - 1 if prefix_lm else 0  # the prefix LM's first prediction: the first target, after the input
            assert predicted.tolist() == list(range(first, n - 1)), f"row {b}: predicted positions {predicted.tolist()}"
            assert torch.equal(got["targets"][b, first:n - 1], row[first + 1:]), f"row {b}: not the next tokens"
            if prefix_lm:
                assert int(got["prefix_len"][b]) == S, f"row {b}: the prefix is not the input"
                assert (predicted + 1 >= S).all(), f"row {b}: a predicted token lies inside the prefix, visible"
            assert obj.t5.vocab_size - 1 in row.tolist() or noise == "spans", "span corruption writes sentinels"


def test_the_prefix_lm_reads_the_input_both_ways_and_no_token_after_its_own_in_the_targets(tmp_path, corpus, float64):
    obj, splits, cfg, _ = objective(tmp_path, corpus, noise_mask="iid", prefix_lm=True)
    batch = obj.train_batch(splits["train"], 1, torch.Generator().manual_seed(1))
    S, n = int(batch["prefix_len"][0]), int((batch["idx"][0] != cfg.pad_token_id).sum())
    torch.manual_seed(0)
    model = gpt.GPT(cfg).double().eval()
    redraw(model)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) | (j < S)  # (n, n): what position i may read
    with torch.no_grad():
        base = model(batch["idx"][:, :n], prefix_len=batch["prefix_len"])[0][0]  # (n, V)
        for k in range(n):
            other = batch["idx"][:, :n].clone()
            other[0, k] = (other[0, k] + 1) % cfg.vocab_size
            moved = (model(other, prefix_len=batch["prefix_len"])[0][0] - base).abs().amax(-1) > 1e-9  # (n,)
            assert torch.equal(moved, allowed[:, k]), f"changing token {k} (input: 0..{S - 1}) moved positions " \
                f"{moved.nonzero().flatten().tolist()}"


def test_train_py_trains_both_rows_resumes_and_fine_tunes_on_the_encoders_view(tmp_path, corpus, capsys):
    rows = train.train(tiny_args("t5lm", tmp_path / "lm", corpus, "--max-iters", "30", "--eval-interval", "30",
                                 "--lr", "1e-2", "--noise-mask", "iid", "--fill", "Thank you <X> me to your party."))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, "the language model's loss did not fall"
    out = capsys.readouterr().out
    assert "input : Thank you <X> me to your party.\noutput: " in out and "filled: Thank you [" in out, \
        "the end-of-run demo fills the span after the input"
    ckpt = str(tmp_path / "lm" / "out" / "ckpt.pt")
    assert exit_code(t5lm.t5.main, ["--ckpt", ckpt, "Thank you <X> me to <Y> party."]) == 0
    assert "decoded: " in capsys.readouterr().out, "python t5lm.py --ckpt ... fills the spans of a text"
    args = lambda sub: tiny_args("t5lm", tmp_path / sub, corpus, "--max-iters", "6", "--eval-interval", "3",
                                 "--log-interval", "1", "--prefix-lm")
    assert_resumes(train.train, args, stop_at=2)
    model, tok, _ = train.load_for_inference(str(tmp_path / "lm" / "out" / "ckpt.pt"), torch.device("cpu"), "--ckpt",
                                             model="t5lm")
    head = t5lm.Classifier(model, None, ["a", "b"], tok)
    assert model.config.block_size == 63 and head.max_len == 32, "fine-tuning reads what T5's encoder reads"


def test_a_row_longer_than_block_size_is_refused_in_one_line(tmp_path, corpus, capsys):
    assert exit_code(train.main, tiny_args("t5lm", tmp_path, corpus, "--block-size", "30")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs 39 positions" in err, err
