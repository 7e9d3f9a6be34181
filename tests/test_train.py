"""Properties of train.py a user relies on: runs resume exactly, accumulation is a big batch, evaluation is complete and
deterministic, bad input fails clearly without damage. (The data and tokenizers: tests/test_data.py.)"""

import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import gpt
import train
from common import UsageError
from helpers import assert_scaled_close, exit_code, interrupt_at, strip, tiny_args

args = functools.partial(tiny_args, "gpt")  # argv of a tiny fp32 GPT run under tmp_path


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and the schedule


def test_eval_scores_every_target_of_the_split_exactly_once():
    split = data.Split("val", np.arange(103, dtype=np.uint16) % 11, np.array([0]), np.array([0]), ["x"], 103)
    obj = gpt.NextTokenObjective(gpt.GPTConfig(block_size=8, vocab_size=11), data.CharTokenizer("abcdefghij"))
    batches = list(obj.eval_batches(split, 5))
    targets = torch.cat([b["targets"].flatten() for b in batches])
    assert torch.equal(targets, torch.from_numpy(split.tokens[1:].astype(np.int64))), "targets skipped or repeated"
    for b in batches:
        assert torch.equal(b["targets"][:, :-1], b["idx"][:, 1:]), "targets are not inputs shifted by one"


def test_bits_per_byte_is_nats_per_byte_over_ln2():
    m = obj_sums = gpt.NextTokenObjective.summarize({"nll": 1000.0, "tokens": 400, "bytes": 800})
    assert m["loss"] == pytest.approx(2.5)
    assert obj_sums["bpb"] == pytest.approx(1000.0 / 800 / np.log(2))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = train.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000)
    assert train.lr_at(0, cfg) < train.lr_at(50, cfg) < train.lr_at(99, cfg) <= 1e-3
    assert train.lr_at(100, cfg) == pytest.approx(1e-3)
    assert train.lr_at(1050, cfg) == pytest.approx(5.5e-4)
    assert train.lr_at(2000, cfg) == pytest.approx(1e-4) and train.lr_at(5000, cfg) == pytest.approx(1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def test_a_run_writes_checkpoint_metrics_and_plot_and_learns(tmp_path, corpus):
    rows = train.train(args(tmp_path, corpus, "--max-iters", "60", "--eval-interval", "30", "--lr", "1e-2"))
    out = tmp_path / "out"
    assert {"ckpt.pt", "metrics.jsonl", "loss.png"} <= set(os.listdir(out)), "a run must leave its three files"
    assert not [f for f in os.listdir(out) if ".tmp" in f], "temporary files left behind"
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, "val loss did not fall"
    assert 0 < evals[-1]["val_bpb"] < 8
    on_disk = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert on_disk == rows
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # plain data only: no pickled objects
    assert ckpt["step"] == 60 and ckpt["tokenizer"]["kind"] == "char"
    assert {"model", "optimizer", "scaler", "rng", "model_config", "train_config", "data_key"} <= set(ckpt)


def test_interrupted_then_resumed_run_gives_the_same_losses(tmp_path, corpus):
    common = ("--max-iters", "30", "--eval-interval", "10", "--log-interval", "1", "--dropout", "0.1")
    straight = train.train(args(tmp_path / "a", corpus, *common))
    # a real Ctrl-C: the handler saves and stops
    first = train.train(args(tmp_path / "b", corpus, *common), on_step=interrupt_at(13, signal.SIGINT))
    assert first[-1]["step"] == 13 and torch.load(tmp_path / "b" / "out" / "ckpt.pt", weights_only=True)["step"] == 13
    resumed = train.train(args(tmp_path / "b", corpus, *common, "--resume"))
    assert strip(resumed) == strip(straight), "interrupt + resume diverged from the uninterrupted run"


def test_sigterm_saves_a_checkpoint_and_returns_cleanly(tmp_path, corpus, capsys):
    # SIGTERM: what a cluster scheduler sends before killing a job
    rows = train.train(args(tmp_path, corpus, "--max-iters", "50", "--eval-interval", "100"), on_step=interrupt_at(3))
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 3
    assert rows[-1]["step"] <= 3 and "--resume" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the loop must restore the previous signal handlers"


def test_resume_keeps_the_settings_the_run_was_started_with(tmp_path, corpus, capsys):
    train.train(args(tmp_path, corpus, "--max-iters", "4", "--lr", "0.02", "--warmup-iters", "0", "--log-interval", "1",
                     "--seed", "7", "--dtype", "fp32"))
    capsys.readouterr()
    resume = args(tmp_path, corpus, "--resume", "--max-iters", "6")  # only the longer schedule is new
    at = resume.index("--dtype")
    rows = train.train(resume[:at] + resume[at + 2:])  # no --dtype: the run's own must come back
    assert "device cpu fp32" in capsys.readouterr().out, "resume switched precision away from the run's --dtype"
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["train_config"]["lr"] == 0.02 and ckpt["train_config"]["seed"] == 7, "resume reverted to the preset"
    lrs = [r["lr"] for r in rows if r["kind"] == "train" and r["step"] > 4]
    assert lrs == [1e-4, 1e-4], "the longer resumed run must keep the cosine's horizon (4 steps) and its floor"


def test_gradient_accumulation_equals_one_big_batch(tmp_path, corpus, float64):
    # float64 weights: the two paths multiply matrices of other shapes, which fp32 kernels round differently per CPU
    def run(sub, batch, accum):
        rows = train.train(args(tmp_path / sub, corpus, "--batch-size", str(batch), "--grad-accum", str(accum),
                                "--max-iters", "5", "--log-interval", "1"))
        weights = torch.load(tmp_path / sub / "out" / "ckpt.pt", weights_only=True)["model"]
        return [r["loss"] for r in rows if r["kind"] == "train"], weights

    big_losses, big = run("big", 8, 1)
    acc_losses, acc = run("acc", 2, 4)
    assert all(w.dtype == torch.float64 for w in big.values() if w.is_floating_point()), "not trained in float64"
    # the logged loss is the objective's fp32 cross-entropy, summed per micro-batch: equal up to fp32 rounding
    assert_scaled_close(acc_losses, big_losses, "accumulated and big-batch losses", rel=1e-6)
    for k in big:
        assert_scaled_close(acc[k], big[k], f"{k} after 5 steps, accumulated and big batch")


def test_fused_adamw_matches_the_plain_per_tensor_implementation():
    # Compared on the optimizer alone, with random float64 gradients. (Through a GPT, the key part of c_attn.bias gets a
    # gradient that is 0 up to float noise -- softmax ignores a constant added to every key score -- and Adam turns
    # noise into full-size steps of random sign, so two correct implementations legitimately disagree there.)
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (37, 16), (16,)]
    a = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes])
    b = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone()) for p in a])
    initial = [p.detach().clone() for p in a]
    cfg = train.TrainConfig(lr=1e-2, weight_decay=0.1, beta2=0.95)
    fused, _ = train.make_optimizer(a, cfg, "cpu")
    assert fused.defaults["fused"], "the CPU optimizer is expected to be the fused one"
    groups = [{"params": [p for p in b if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in b if p.dim() < 2], "weight_decay": 0.0}]
    plain = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False, fused=False)
    for _ in range(10):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        for params, opt in ((a, fused), (b, plain)):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
    for i, (pa, pb) in enumerate(zip(a, b)):
        assert_scaled_close(pa, pb, f"fused and plain AdamW, parameter {i}")  # float64: kernel-independent
        assert (pa - initial[i]).abs().max() > 1e-3, f"parameter {i} was not updated"


def test_fp16_trains_with_an_active_grad_scaler_saved_in_the_checkpoint(tmp_path, corpus):
    # the GPU fallback for cards without bf16; CPU autocast runs the same code path
    rows = train.train(args(tmp_path, corpus, "--dtype", "fp16", "--max-iters", "30", "--eval-interval", "30",
                            "--lr", "1e-2"))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, "fp16 training did not learn"
    scaler = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["scaler"]
    assert scaler.get("scale", 0) > 0, "the grad scaler must be enabled for fp16 and its state checkpointed"


def test_tokens_per_step_derives_grad_accum(tmp_path, corpus, capsys):
    train.train(args(tmp_path, corpus, "--batch-size", "2", "--tokens-per-step", "256", "--max-iters", "1"))
    assert "grad_accum 4 = 256" in capsys.readouterr().out


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    def poison(step, loss):
        if step == 6:
            ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
            assert ckpt["step"] == 4
            for p in poison.model_params:
                p.data.fill_(float("nan"))

    real_model = gpt.GPT

    class Spy(real_model):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            poison.model_params = list(self.parameters())

    gpt.Model = Spy
    try:
        with pytest.raises(UsageError, match="loss is nan at step 6.*last good checkpoint"):
            train.train(args(tmp_path, corpus, "--eval-interval", "4", "--max-iters", "20"), on_step=poison)
    finally:
        gpt.Model = real_model
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_gpt_py_samples_from_a_trained_checkpoint(tmp_path, corpus, capsys):
    train.train(args(tmp_path, corpus, "--max-iters", "2"))
    capsys.readouterr()
    cli = ["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--prompt", "HAMLET", "--max-new-tokens", "20"]
    gpt.main(cli)
    out = capsys.readouterr().out
    assert out.startswith("HAMLET") and len(out.rstrip("\n")) >= 26, "the sample must continue the prompt"
    gpt.main(cli)
    assert capsys.readouterr().out == out, "the same --seed must give the same sample"


def test_bench_prints_throughput_and_writes_nothing(tmp_path, corpus, capsys):
    rows = train.train(args(tmp_path, corpus, "--bench", "--bench-iters", "3"))
    assert rows[0]["tok_s"] > 0 and "tokens/s" in capsys.readouterr().out
    assert not (tmp_path / "out").exists(), "--bench must not write a run directory"


def test_every_preset_sets_only_known_keys():
    for name in gpt.PRESETS:
        s = train.resolve_config(["--preset", name])
        gpt.GPTConfig(vocab_size=10, **s.model)
        gpt.DemoConfig(**s.demo)


def test_help_lists_the_documented_flags(capsys):
    assert exit_code(train.main, ["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--preset", "--data", "--tokenizer", "--out-dir", "--device", "--attn", "--block-size",
                 "--batch-size", "--grad-accum", "--max-iters", "--lr", "--warmup-iters", "--eval-interval", "--seed",
                 "--resume", "--compile", "--bench", "--tokens-per-step", "--n-layer", "--dropout"):
        assert flag in text, f"--help does not list {flag}"
    text = " ".join(text.split())  # argparse wraps lines at the terminal width
    assert "[32 from preset char-cpu]" in text, "--help must show the value the default run uses (the preset's)"
    model_section = text[text.index("model (mtp.Config):"):]  # --model gpt: gpt.py's GPTConfig + mtp.py's heads
    for f in gpt.GPTConfig.__dataclass_fields__:  # every model flag explains itself
        if f != "vocab_size":
            flag = f.replace("_", "-")
            m = re.search(rf"--{flag}(?:, --no-{flag}| {f.upper()}) (.*?)(?= --|$)", model_section)
            description = re.sub(r"\[[^\]]*\]\s*$", "", m.group(1)) if m else ""  # without the "[value]" suffix
            assert len(description.split()) > 2, f"--{flag} has no help text"


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing overwritten


@pytest.mark.parametrize("extra, message", [
    (["--model", "bart"], "unknown --model 'bart'"),
    (["--preset", "huge"], "unknown --preset 'huge'"),
    (["--tokenizer", "words"], "unknown --tokenizer 'words'"),
    (["--data", "/nonexistent/dir"], "no such directory"),
    (["--n-layers", "3"], "unrecognized arguments: --n-layers"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--resume"], "no checkpoint at"),
    (["--tokens-per-step", "100"], "not a multiple of batch_size x tokens per row"),
    (["--block-size", "100000"], "fewer than the 100,001 one row needs"),
    (["--max-time", "soon"], "--max-time 'soon': expected a duration"),
    (["--schedule", "step"], "unknown --schedule 'step'"),
    (["--init-from", "/nonexistent/ckpt.pt"], "--init-from: no checkpoint at"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--dtype", "fp8"], "unknown --dtype 'fp8'"),
])
def test_bad_input_gives_one_clear_line_and_exit_code_2(tmp_path, corpus, capsys, extra, message):
    assert exit_code(train.main, args(tmp_path, corpus, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, f"expected {message!r} in {err!r}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "a failed start must not create the run directory"


def test_resume_errors_leave_the_checkpoint_untouched(tmp_path, corpus, capsys):
    train.train(args(tmp_path, corpus, "--max-iters", "2"))
    ckpt = tmp_path / "out" / "ckpt.pt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    cases = [
        ([], "already holds a run"),  # a second start without --resume must not clobber the first run
        (["--resume", "--n-layer", "3"], "--n-layer 3 does not match the checkpoint's 2"),
        (["--resume", "--block-size", "64"], "larger than the checkpoint's position table (32 positions)"),
        (["--resume", "--tokenizer", "gpt2"], "--tokenizer 'gpt2' does not match"),
    ]
    for extra, message in cases:
        assert exit_code(train.main, args(tmp_path, corpus, *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest, "a refused start modified the checkpoint"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as after a crash outside our atomic save
    assert exit_code(train.main, args(tmp_path, corpus, "--resume")) == 2
    assert "may be corrupt" in capsys.readouterr().err


def test_command_line_errors_are_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(train.ROOT, "train.py"), "--model", "nope"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"train.py: error: unknown --model 'nope'; choose from: {', '.join(train.MODELS)}"
