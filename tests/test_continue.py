"""Continued pretraining: a mixture of corpora (--data a:0.25,b:0.75) draws each row's corpus with those probabilities
from the loop's generator, so resume stays exact; every named corpus is evaluated, weight 0 included; the re-warming
schedules have their shapes (tests/test_loop.py checks wsd and --init-from)."""

import os
import types

import numpy as np
import pytest
import torch

import data
import experiments
import gpt
import train
from helpers import assert_resumes, exit_code, tiny_args


@pytest.fixture
def two_corpora(tmp_path):
    """'plays' (Shakespeare) and 'poems' (Milton), three small documents each."""
    for name, src, files in (("plays", "shakespeare", ("hamlet", "macbeth", "lear")),
                             ("poems", "milton", ("paradise_lost", "paradise_regained", "areopagitica"))):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            with open(os.path.join(train.ROOT, "data", src, f + ".txt")) as fh:
                (d / f"{f}.txt").write_text(fh.read()[20000:26000])
    return tmp_path


def test_data_spec_names_a_corpus_or_a_weighted_mixture(tmp_path):
    (one,) = data.parse_data(str(tmp_path))
    assert one.weight == 1.0 and one.path == str(tmp_path)
    mix = data.parse_data("milton:3,shakespeare:1")
    assert [(d.name, d.weight) for d in mix] == [("milton", 0.75), ("shakespeare", 0.25)]
    assert mix[0].path == os.path.join(train.ROOT, "data", "milton"), "a bare name is a bundled corpus"
    assert data.parse_data("milton:1,shakespeare:0")[1].weight == 0.0
    for bad, msg in (("a:1,b:x", "not a number"), ("a:1,b", "name:weight"), ("a:0,b:0", "above 0"), ("a:1,a:2", "two")):
        with pytest.raises(train.UsageError, match=msg):
            data.parse_data(bad)


def test_the_mixture_sampler_draws_each_corpus_in_proportion(two_corpora):
    cfg = train.TrainConfig(data=f"{two_corpora / 'plays'}:0.25,{two_corpora / 'poems'}:0.75",
                            cache_dir=str(two_corpora / "cache"))
    tok, domains, _ = data.prepare_domains(cfg)
    assert [d.name for d in domains] == ["plays", "poems"] and tok.n_vocab > 60
    # tag every token with its corpus: an objective whose rows are the corpus index of the split they come from
    tags = {id(d.splits["train"]): i for i, d in enumerate(domains)}
    objective = types.SimpleNamespace(train_batch=lambda split, n, g: {"x": torch.full((n, 1), tags[id(split)])})
    run = types.SimpleNamespace(domains=domains, objective=objective, batch_gen=torch.Generator().manual_seed(0),
                                splits=domains[0].splits)
    rows = train.draw_train_batch(run, 4000)["x"].flatten()
    n_plays = int((rows == 0).sum())
    sigma = (4000 * 0.25 * 0.75) ** 0.5
    assert abs(n_plays - 1000) < 4 * sigma, f"{n_plays} of 4000 rows from a corpus of weight 0.25"
    run.domains[0].weight, run.domains[1].weight = 0.0, 1.0
    assert int((train.draw_train_batch(run, 500)["x"] == 0).sum()) == 0, "a corpus of weight 0 is never trained on"


def test_a_mixture_evaluates_every_corpus_and_resumes_exactly(tmp_path, two_corpora):
    spec = f"{two_corpora / 'plays'}:0.7,{two_corpora / 'poems'}:0.3"

    def args(sub):
        return tiny_args("gpt", tmp_path / sub, spec, "--max-iters", "12", "--eval-interval", "6", "--log-interval",
                         "1", "--dropout", "0.1")

    keys = ("step", "kind", "loss", "val_plays_loss", "val_poems_loss")
    straight = assert_resumes(train.train, args, stop_at=8, keys=keys)  # the mixture's stream resumes exactly
    evals = [r for r in straight if r["kind"] == "eval"]
    assert {"val_plays_loss", "val_poems_loss", "val_plays_bpb", "train_poems_loss", "val_loss"} <= set(evals[-1])
    assert evals[-1]["val_loss"] == pytest.approx(0.7 * evals[-1]["val_plays_loss"] + 0.3 * evals[-1]["val_poems_loss"])


def test_continued_pretraining_starts_from_the_checkpoint_and_evaluates_the_old_corpus(tmp_path, two_corpora):
    plays, poems = two_corpora / "plays", two_corpora / "poems"
    common = ["--model", "gpt", "--preset", "tiny", "--cache-dir", str(two_corpora / "cache"), "--sample-tokens", "0",
              "--dtype", "fp32"]
    # pretrain on plays, evaluating poems from the start (weight 0: the alphabet covers both corpora)
    train.train([*common, "--data", f"{plays}:1,{poems}:0", "--out-dir", str(tmp_path / "pre"), "--max-iters", "30",
                 "--lr", "1e-2"])
    rows = train.train([*common, "--data", f"{poems}:1,{plays}:0", "--out-dir", str(tmp_path / "cont"),
                        "--init-from", str(tmp_path / "pre" / "ckpt.pt"), "--max-iters", "30", "--lr", "1e-2",
                        "--schedule", "wsd", "--warmup-iters", "5"])
    first, last = rows[0], [r for r in rows if r["kind"] == "eval"][-1]
    assert last["val_poems_loss"] < first["val_poems_loss"], "continuing on poems did not help on poems"
    assert "val_plays_loss" in last and "train_plays_loss" not in last, "plays: evaluated, not trained on"
    run = train.open_run(str(tmp_path / "cont" / "ckpt.pt"))
    assert set(run.corpora) == {"poems", "plays"}
    obj = gpt.NextTokenObjective(run.model.config, run.tokenizer)
    assert run.evaluate(obj, "val", corpus="plays")["loss"] == pytest.approx(last["val_plays_loss"], rel=1e-5)
    assert np.isfinite(run.evaluate(obj, "val")["loss"])


def test_the_continue_experiment_runs_its_grid_and_writes_its_table_and_figure(tmp_path, two_corpora, capsys):
    tiny_model = "--n-layer 1 --n-embd 32 --n-head 2 --block-size 32 --batch-size 4"
    pre, runs, scratch = experiments.main([
        "continue", "--upstream", str(two_corpora / "plays"), "--downstream", str(two_corpora / "poems"),
        "--pre-iters", "10", "--cont-iters", "10", "--rewarm-lrs", "1e-3", "--replay", "0.25", "--eval-tokens", "512",
        "--evals", "2", "--out-dir", str(tmp_path / "exp"), "--cache-dir", str(two_corpora / "cache"),
        "--png", str(tmp_path / "c.png"), "--dtype", "fp32", "--train-args", tiny_model])
    assert list(runs) == ["no re-warm", "re-warm to 0.001", "re-warm 0.001 + 25% replay"]
    assert [r["step"] for r in scratch if r["kind"] == "eval"][-1] == 20, "scratch gets pretrain + continue steps"
    nr = [r for r in runs["no re-warm"] if r["kind"] == "train"]
    assert {r["lr"] for r in nr} == {3e-4}, "no re-warm continues at the pretraining's final lr"
    out = capsys.readouterr().out
    assert "scratch on" in out and "re-warm 0.001 + 25% replay" in out and (tmp_path / "c.png").exists()


def test_the_continue_experiment_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys):
    where = ["--out-dir", str(tmp_path / "exp"), "--png", str(tmp_path / "c.png")]
    for argv, word in ((["--pre-iters", "5"], "--pre-iters"), (["--replay", "1.5"], "--replay"),
                       (["--rewarm-lrs", "x"], "--rewarm-lrs"), (["--bogus"], "--bogus")):
        assert exit_code(experiments.main, ["continue", *argv, *where]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("experiments.py: error:") and word in err and len(err.splitlines()) == 1, (argv, err)
        assert not (tmp_path / "exp").exists() and not (tmp_path / "c.png").exists(), f"{argv}: wrote something"
