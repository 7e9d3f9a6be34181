"""Every command, given bad values as a new user would type them, answers as the shell should: exit code 2, exactly one
line on stderr, no traceback, and nothing created or overwritten (the working directory, the run directory, the token
cache and the checkpoints are snapshotted before and after each case). Training runs through train.main for each of
the five models; the inference commands get tiny checkpoints trained once for the whole module."""

import hashlib
import json
import os
import socket
import traceback

import pytest
import torch

import bert
import bpe
import data
import electra
import assignment
import bench
import experiments
import gpt
import mtp
import positions
import t5
import train
import xlnet
from helpers import exit_code, tiny_args

MODELS = ("gpt", "bert", "electra", "t5", "xlnet")
LAYERS = {"gpt": "--n-layer", "bert": "--num-hidden-layers", "electra": "--num-hidden-layers", "t5": "--num-layers",
          "xlnet": "--n-layer"}
DROPOUT = {"gpt": "--dropout", "bert": "--hidden-dropout-prob", "electra": "--hidden-dropout-prob",
           "t5": "--dropout-rate", "xlnet": "--dropout"}
FAST = ("--max-iters", "1", "--eval-tokens", "256", "--eval-train-tokens", "256")  # if a bad value got through


@pytest.fixture(scope="module")
def shared(module_corpus):
    """The corpus, a token cache every case reads from (so a case that reaches the data writes nothing), and a tiny
    checkpoint of gpt, bert and t5 for the inference commands."""
    root = module_corpus.parent
    for model in ("gpt", "bert", "t5"):
        train.train(tiny_args(model, root / model, module_corpus, *FAST, "--cache-dir", str(root / "cache")))
    return root


def snapshot(*roots):
    """{path: (size, mtime, sha256)} of every file, {path: 'dir'} of every directory under roots (and 'special' for
    a FIFO or a device)."""
    seen = {}
    for root in roots:
        for where, _, files in os.walk(root):
            seen[where] = "dir"
            for name in files:
                path = os.path.join(where, name)
                if not os.path.isfile(path):  # a FIFO (a case below): opening it would wait for a writer forever
                    seen[path] = "special"
                    continue
                with open(path, "rb") as f:
                    seen[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).digest())
    return seen


def answer(main, argv, capsys):
    """(exit code, stderr) as the shell would see them; an exception escaping main is a traceback and exit code 1."""
    try:
        code = exit_code(main, argv)
    except Exception:
        return 1, capsys.readouterr().err + traceback.format_exc()
    return code, capsys.readouterr().err


def assert_refused(main, argv, capsys, roots):
    before = snapshot(*roots)
    code, err = answer(main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, \
        f"exit code {code}, {len(lines)} lines on stderr (want 2 and one line):\n{err[-3000:]}"
    assert ": error: " in lines[0], lines[0]
    after = snapshot(*roots)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"{lines[0]}\nbut created or changed: {changed}"


@pytest.fixture
def work(tmp_path, shared, monkeypatch):
    """A fresh directory to run in (the working directory too), with an existing run directory out/ holding a file
    that must survive every refused start."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("an earlier run's notes\n")
    return tmp_path


def train_argv(model, work, shared, *bad):
    return [*tiny_args(model, work, shared / "corpus", *FAST), "--cache-dir", str(shared / "cache"), *bad]


# ----------------------------------------------------------------------------------------------------------------------
# Training: train.py for each model


MODEL_CASES = {  # each model refuses these through its own flags or the loop's
    "lr-negative": lambda m: ["--lr", "-1"],
    "lr-nan": lambda m: ["--lr", "nan"],
    "zero-layers": lambda m: [LAYERS[m], "0"],
    "dropout-2": lambda m: [DROPOUT[m], "2"],
}
LOOP_CASES = {  # the loop's own settings, the same for every model: tried on gpt
    "min-lr-negative": ["--min-lr", "-1e-4"],
    "batch-size-0": ["--batch-size", "0"],
    "grad-accum-0": ["--grad-accum", "0"],
    "max-iters-negative": ["--max-iters", "-3"],
    "eval-interval-0": ["--eval-interval", "0"],
    "warmup-negative": ["--warmup-iters", "-1"],
    "weight-decay-negative": ["--weight-decay", "-0.1"],
    "grad-clip-negative": ["--grad-clip", "-1"],
    "beta2-1": ["--beta2", "1"],
    "tokens-per-step-negative": ["--tokens-per-step", "-256"],
    "warmup-minus-10": ["--warmup-iters", "-10"],
    "eval-tokens-negative": ["--eval-tokens", "-1"],
    "divergence-evals-negative": ["--divergence-evals", "-1"],
    "resume-and-overwrite": ["--resume", "--overwrite"],
    "resume-and-init-from": ["--resume", "--init-from", "elsewhere/ckpt.pt"],
    "tokens-per-step-and-grad-accum": ["--tokens-per-step", "256", "--grad-accum", "2"],
}
DEMO_CASES = {  # the end-of-run demo's flags, through train.py
    "gpt-temperature-negative": ("gpt", ["--temperature", "-1"]),
    "gpt-temperature-inf": ("gpt", ["--temperature", "inf"]),
    "gpt-sample-tokens-negative": ("gpt", ["--sample-tokens", "-1"]),
    "t5-temperature-negative": ("t5", ["--temperature", "-1"]),
    "t5-fill-tokens-0": ("t5", ["--fill-tokens", "0"]),
    "bert-top-k-negative": ("bert", ["--top-k", "-1"]),
}


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("model", MODELS)
def test_bad_training_values(model, case, work, shared, capsys):
    argv = train_argv(model, work, shared, *MODEL_CASES[case](model))
    assert_refused(train.main, argv, capsys, [work, shared])


@pytest.mark.parametrize("case", LOOP_CASES)
def test_bad_loop_settings(case, work, shared, capsys):
    assert_refused(train.main, train_argv("gpt", work, shared, *LOOP_CASES[case]), capsys, [work, shared])


@pytest.mark.parametrize("case", DEMO_CASES)
def test_bad_demo_settings(case, work, shared, capsys):
    model, bad = DEMO_CASES[case]
    assert_refused(train.main, train_argv(model, work, shared, *bad), capsys, [work, shared])


def test_an_out_dir_another_live_run_holds(work, shared, capsys):
    """A lock naming a live process of this host (our parent) refuses the run, naming that process."""
    (work / "out" / train.LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    for extra in ([], ["--overwrite"]):
        assert_refused(train.main, train_argv("gpt", work, shared, *extra), capsys, [work, shared])
    # on another host no one can tell whether it still runs: refused too, saying how to clear it
    (work / "out" / train.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    assert_refused(train.main, train_argv("gpt", work, shared), capsys, [work, shared])


@pytest.mark.parametrize("where", ["file", "inside-a-directory"])
def test_data_that_is_neither_a_file_nor_a_directory(where, work, shared, capsys):
    """A FIFO would block the read forever: refused before it is opened."""
    corpus = work / "fifo-corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("To be, or not to be, that is the question. " * 40)
    os.mkfifo(corpus / "b.txt")
    data_path = corpus / "b.txt" if where == "file" else corpus
    assert_refused(train.main, train_argv("gpt", work, shared, "--data", str(data_path)), capsys, [work, shared])


@pytest.mark.parametrize("model", MODELS)
def test_out_dir_that_is_a_file(model, work, shared, capsys):
    (work / "taken").write_text("a file, not a directory\n")
    argv = train_argv(model, work, shared, "--out-dir", str(work / "taken"))
    assert_refused(train.main, argv, capsys, [work, shared])
    argv = train_argv(model, work, shared, "--out-dir", str(work / "taken" / "run"))  # a file on the way to it
    assert_refused(train.main, argv, capsys, [work, shared])


@pytest.mark.parametrize("model", MODELS)
def test_out_dir_that_is_read_only(model, work, shared, capsys, monkeypatch):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):
        # Running as root, permission bits do not stop a write. Answer as the kernel answers any other user, so that
        # what is tested is train.py's handling of a directory it may not write in.
        real_access = os.access
        denied = lambda path, mode, **kw: not (os.path.abspath(path) == str(locked) and mode & os.W_OK) and \
            real_access(path, mode, **kw)
        monkeypatch.setattr(os, "access", denied)
    try:
        for out in (locked, locked / "run"):
            assert_refused(train.main, train_argv(model, work, shared, "--out-dir", str(out)), capsys, [work, shared])
    finally:
        locked.chmod(0o755)


def test_out_dir_that_cannot_be_created_after_the_start_up_check(work, shared, capsys, monkeypatch):
    """What no check can foresee (a permission changed meanwhile, a full disk) still ends as one line."""
    real_makedirs, target = os.makedirs, str(work / "new")

    def makedirs(path, *a, **k):
        if os.path.abspath(path) == target:
            raise PermissionError(13, "Permission denied", path)
        return real_makedirs(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", makedirs)
    assert_refused(train.main, train_argv("gpt", work, shared, "--out-dir", target), capsys, [work, shared])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_this_machine_lacks(model, device, work, shared, capsys):
    if (torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()):
        pytest.skip(f"this machine has {device}")
    assert_refused(train.main, train_argv(model, work, shared, "--device", device), capsys, [work, shared])


# ----------------------------------------------------------------------------------------------------------------------
# Inference and the other commands


def ckpt(shared, model):
    return str(shared / model / "out" / "ckpt.pt")


INFERENCE_CASES = {
    "gpt-ckpt-of-bert": (gpt.main, lambda s: ["--ckpt", ckpt(s, "bert"), "--max-new-tokens", "2"]),
    "gpt-top-k-0": (gpt.main, lambda s: ["--ckpt", ckpt(s, "gpt"), "--top-k", "0", "--max-new-tokens", "2"]),
    "gpt-top-p-0": (gpt.main, lambda s: ["--ckpt", ckpt(s, "gpt"), "--top-p", "0", "--max-new-tokens", "2"]),
    "gpt-top-p-2": (gpt.main, lambda s: ["--ckpt", ckpt(s, "gpt"), "--top-p", "2", "--max-new-tokens", "2"]),
    "gpt-temperature-negative": (gpt.main, lambda s: ["--ckpt", ckpt(s, "gpt"), "--temperature", "-1",
                                                      "--max-new-tokens", "2"]),
    "t5-temperature-negative": (t5.main, lambda s: ["--ckpt", ckpt(s, "t5"), "--temperature", "-1",
                                                    "Thank you <X> me"]),
    "gpt-max-new-tokens-negative": (gpt.main, lambda s: ["--ckpt", ckpt(s, "gpt"), "--max-new-tokens", "-5"]),
    "gpt-device-cuda": (gpt.main, lambda s: ["--ckpt", ckpt(s, "gpt"), "--device", "cuda", "--max-new-tokens", "2"]),
    "t5-max-new-tokens-negative": (t5.main, lambda s: ["--ckpt", ckpt(s, "t5"), "--max-new-tokens", "-5",
                                                       "Thank you <X> me"]),
    "t5-ckpt-of-gpt": (t5.main, lambda s: ["--ckpt", ckpt(s, "gpt"), "Thank you <X> me"]),
    "bert-ckpt-of-gpt": (bert.main, lambda s: ["--ckpt", ckpt(s, "gpt"), "a [MASK] day"]),
    "electra-ckpt-of-bert": (electra.main, lambda s: ["--ckpt", ckpt(s, "bert"), "a fine day"]),
    "xlnet-ckpt-of-gpt": (xlnet.main, lambda s: ["fill", "--ckpt", ckpt(s, "gpt")]),
    "bpe-train-missing-file": (bpe.main, lambda s: ["--train", str(s / "missing.txt"), "--vocab-size", "300", "--out",
                                                    "tok.txt"]),
    "data-prepare-missing-path": (data.main, lambda s: ["prepare", "--data", str(s / "missing"), "--out", "prep"]),
    "data-prepare-commit-every-0": (data.main, lambda s: ["prepare", "--data", str(s / "corpus"), "--out", "prep",
                                                          "--commit-every", "0"]),
    "data-prepare-no-out": (data.main, lambda s: ["prepare", "--data", str(s / "corpus")]),
    "mtp-ckpt-of-bert": (mtp.main, lambda s: ["--ckpt", ckpt(s, "bert"), "--max-new-tokens", "2"]),
    "mtp-speculative-without-heads": (mtp.main, lambda s: ["--ckpt", ckpt(s, "gpt"), "--speculative",
                                                           "--max-new-tokens", "2"]),
    "experiments-unknown-variant": (experiments.main, lambda s: ["mtp", "--variants", "nine-heads"]),
    "experiments-extrapolate-unknown-scheme": (experiments.main, lambda s: ["extrapolate", "--schemes", "spiral"]),
    "positions-argument": (positions.main, lambda s: ["extrapolate"]),
    "bench-unknown-model": (bench.main, lambda s: ["models", "--models", "lstm"]),
    "assignment-unknown": (assignment.main, lambda s: ["make", "no-such-assignment", "--out", "handout"]),
}


@pytest.mark.parametrize("case", INFERENCE_CASES)
def test_bad_values_to_the_other_commands(case, work, shared, capsys):
    main, argv = INFERENCE_CASES[case]
    if case.endswith("device-cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_refused(main, argv(shared), capsys, [work, shared])
