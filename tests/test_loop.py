"""What train.py promises every objective, not only GPT's: a second objective (tests/toy_mlm.py: special tokens,
padding, -100 labels, its own metrics, state across steps) trains, evaluates and resumes exactly through the same
loop; runs stopped anywhere resume to the same losses and evaluations; the schedule keeps its horizon; accumulation
over unequal target counts is one big batch; evaluation has a size cap; a time budget fixes the step count; start-up
never pays for a CPU probe it does not need."""

import functools
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import data
import gpt
import train
from helpers import assert_resumes, assert_scaled_close, exit_code, interrupt_at, strip, tiny_args

gpt_args = functools.partial(tiny_args, "gpt")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(train.MODELS, "toy", "toy_mlm")


def toy_args(tmp_path, corpus, *extra):
    return tiny_args("toy", tmp_path, corpus, "--val-docs", "lear", *extra)


# ----------------------------------------------------------------------------------------------------------------------
# Resume, anywhere


@pytest.mark.parametrize("stop_at", [7, 10, 20])  # an ordinary step, an eval step, the last step
def test_a_run_stopped_at_any_step_resumes_to_the_same_losses_and_evaluations(tmp_path, corpus, stop_at):
    common = ("--max-iters", "20", "--eval-interval", "10", "--log-interval", "1", "--dropout", "0.1")
    straight = assert_resumes(train.train, lambda sub: gpt_args(tmp_path / sub, corpus, *common), stop_at)
    assert [r["step"] for r in straight if r["kind"] == "eval"] == [0, 10, 20]


def test_resume_with_more_steps_keeps_the_schedule_and_does_not_rewarm(tmp_path, corpus, capsys):
    train.train(gpt_args(tmp_path, corpus, "--max-iters", "20", "--log-interval", "1", "--lr", "1e-2",
                         "--min-lr", "1e-3", "--warmup-iters", "5"))
    capsys.readouterr()
    rows = train.train(gpt_args(tmp_path, corpus, "--resume", "--max-iters", "30", "--log-interval", "1"))
    assert "keeps its horizon" in capsys.readouterr().out, "resume must say what it does with the schedule"
    lrs = [r["lr"] for r in rows if r["kind"] == "train" and r["step"] > 20]
    assert lrs == [1e-3] * 10, "past the horizon of the run it continues, the lr stays at its floor"


def test_schedules_have_their_shapes():
    base = dict(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    cos, lin, rsqrt, const, wsd = (train.TrainConfig(schedule=s, **base) for s in train.SCHEDULES)
    for cfg in (cos, lin, rsqrt, const, wsd):
        assert train.lr_at(0, cfg) < train.lr_at(5, cfg) < train.lr_at(9, cfg) < 1.0 == train.lr_at(10, cfg), \
            f"{cfg.schedule}: warm-up must rise linearly to the peak"
    assert train.lr_at(60, cos) == pytest.approx(0.55) and train.lr_at(60, lin) == pytest.approx(0.55)
    assert train.lr_at(35, lin) == pytest.approx(1.0 - 0.9 * 0.25), "linear: a straight line to the floor"
    assert train.lr_at(35, cos) > train.lr_at(35, lin), "cosine decays slower than linear at first"
    assert train.lr_at(110, cos) == train.lr_at(110, lin) == 0.1 == train.lr_at(500, lin)
    assert train.lr_at(40, rsqrt) == pytest.approx(0.5) and train.lr_at(1000, rsqrt) == 0.1, "rsqrt: sqrt(10/40)"
    assert train.lr_at(1000, const) == 1.0
    # wsd with cooldown 0.2: the peak until step 90 (= 110 - 0.2 * 100), then a straight line to the floor at 110
    assert train.lr_at(50, wsd) == train.lr_at(89, wsd) == train.lr_at(90, wsd) == 1.0
    assert train.lr_at(100, wsd) == pytest.approx(0.55) and train.lr_at(110, wsd) == 0.1 == train.lr_at(300, wsd)


def test_position_tables_norm_gains_and_biases_are_not_decayed(capsys):
    model = gpt.GPT(gpt.GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8, pos="learned"))
    opt, line = train.make_optimizer(model, train.TrainConfig(), "cpu")
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "transformer.wpe.weight" not in names and "transformer.wte.weight" in names
    assert all(n.endswith("weight") and "ln" not in n for n in names), f"only weight matrices decay: {names}"
    assert "none on" in line and "wpe" in line
    t5 = gpt.GPT(gpt.GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8, pos="t5"))
    assert any("relative_attention_bias" in n for n in t5.no_weight_decay())


# ----------------------------------------------------------------------------------------------------------------------
# Per-token sums and accumulation


def test_ignored_targets_are_neither_scored_nor_counted_nor_read_from_the_byte_table():
    tok = data.CharTokenizer("abc")  # ids 0..2, <|endoftext|> 3
    obj = gpt.NextTokenObjective(gpt.GPTConfig(block_size=4, vocab_size=4, n_layer=1, n_head=1, n_embd=4), tok)
    model = gpt.GPT(gpt.GPTConfig(block_size=4, vocab_size=4, n_layer=1, n_head=1, n_embd=4))
    idx = torch.tensor([[0, 1, 2, 0]])
    targets = torch.tensor([[1, -100, -100, 2]])
    loss, stats = obj.loss(model, {"idx": idx, "targets": targets})
    assert int(stats["tokens"]) == 2 and int(stats["bytes"]) == 2, "a -100 target was counted or looked up"
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 3]], torch.tensor([1, 2]))
    torch.testing.assert_close(loss, expected, msg="the loss must be the mean over real targets only")


def test_accumulation_over_unequal_target_counts_equals_one_big_batch(tmp_path, corpus, toy, float64, monkeypatch):
    # toy_mlm masks a random share of each row and rows have random lengths: micro-batches hold different numbers of
    # targets. The step's loss must be sum / total count, not the mean of the micro-batch means. In float64: the
    # paths multiply matrices of other shapes, which fp32 kernels round differently on different CPUs.
    import toy_mlm
    real_init = toy_mlm.Model.__init__

    def init_without_dropout(model, config):  # dropout masks are drawn per micro-batch shape: compare the arithmetic
        real_init(model, config)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0

    monkeypatch.setattr(toy_mlm.Model, "__init__", init_without_dropout)

    def run(sub, batch, accum):
        rows = train.train(toy_args(tmp_path / sub, corpus, "--batch-size", str(batch), "--grad-accum", str(accum),
                                    "--max-iters", "4", "--log-interval", "1", "--eval-interval", "100",
                                    "--grad-clip", "0"))
        sd = torch.load(tmp_path / sub / "out" / "ckpt.pt", weights_only=True)["model"]
        return [r["loss"] for r in rows if r["kind"] == "train"], sd

    big_losses, big = run("big", 8, 1)
    acc_losses, acc = run("acc", 2, 4)
    # the logged loss is the objective's fp32 cross-entropy, summed per micro-batch: equal up to fp32 rounding
    assert_scaled_close(acc_losses, big_losses, "accumulated and big-batch losses", rel=1e-6)
    for k in big:
        assert_scaled_close(acc[k], big[k], f"{k} after 4 steps, accumulated and big batch")


# ----------------------------------------------------------------------------------------------------------------------
# A second objective through the same loop


def test_a_second_objective_trains_evaluates_and_resumes_exactly_through_the_same_loop(tmp_path, corpus, toy, capsys):
    common = ("--max-iters", "16", "--eval-interval", "8", "--log-interval", "1")
    straight = train.train(toy_args(tmp_path / "a", corpus, *common))
    out = capsys.readouterr().out
    evals = [r for r in straight if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert {"val_loss", "val_acc", "train_acc"} <= set(evals[0]) and "val_bpb" not in evals[0], \
        "metrics are the objective's own"
    assert "acc" in out and "bpb" not in out
    assert evals[-1]["val_loss"] < evals[0]["val_loss"], "the toy objective did not learn"
    assert (tmp_path / "a" / "out" / "loss.png").exists()

    first = train.train(toy_args(tmp_path / "b", corpus, *common), on_step=interrupt_at(5))
    ckpt = torch.load(tmp_path / "b" / "out" / "ckpt.pt", weights_only=True)
    assert len(ckpt["objective"]["cursors"]) == 4, "the objective's state must be in the checkpoint"
    assert ckpt["model_config"]["pad_token_id"] == data.tokenizer_from_identity(ckpt["tokenizer"]).specials[
        "[PAD]"], "TOKEN_IDS fields come from the tokenizer"
    resumed = train.train(toy_args(tmp_path / "b", corpus, *common, "--resume"))
    assert strip(resumed) == strip(straight), "the stateful objective did not resume exactly"
    assert first[-1]["step"] == 5


def test_evaluation_state_never_leaks_into_training(tmp_path, corpus, toy):
    # The same run with evaluations every 4 steps or only at the end trains on exactly the same batches.
    few = train.train(toy_args(tmp_path / "a", corpus, "--max-iters", "12", "--eval-interval", "12", "--log-interval",
                               "1"))
    many = train.train(toy_args(tmp_path / "b", corpus, "--max-iters", "12", "--eval-interval", "4", "--log-interval",
                                "1"))
    loss = lambda rows: [r["loss"] for r in rows if r["kind"] == "train"]
    assert loss(few) == loss(many), "evaluating changed what training saw"


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation size


def test_eval_tokens_scores_a_leading_val_slice_and_a_train_estimate_spread_over_every_document():
    split = data.Split("train", np.arange(10_000), np.array([0, 5000]), np.array([0]), ["a", "b"], 10_000)
    assert train.eval_view(split, 0, spread=False) == [split] and train.eval_view(split, 20_000, spread=True) == [split]
    (val,) = train.eval_view(split, 1000, spread=False)
    assert val.tokens.tolist() == list(range(1000)), "val must be the same leading slice every time"
    pieces = train.eval_view(split, 3200, spread=True, min_piece=33)
    assert len(pieces) == 32 and sum(len(p.tokens) for p in pieces) == 3200
    firsts = [int(p.tokens[0]) for p in pieces]
    assert firsts[0] == 0 and firsts[-1] > 9000 and firsts == sorted(firsts), "the train estimate must span the split"
    assert len(train.eval_view(split, 640, spread=True, min_piece=100)) == 6, "pieces shorter than a row are merged"


def test_eval_tokens_caps_what_an_evaluation_reads(tmp_path, corpus, capsys):
    calls = []
    real = gpt.NextTokenObjective.eval_batches

    def spy(self, split, batch_size):
        calls.append(len(split.tokens))
        return real(self, split, batch_size)

    gpt.NextTokenObjective.eval_batches = spy
    try:
        train.train(gpt_args(tmp_path, corpus, "--max-iters", "1", "--eval-tokens", "500", "--eval-train-tokens",
                             "640"))
    finally:
        gpt.NextTokenObjective.eval_batches = real
    per_eval = calls[:len(calls) // 2]
    assert per_eval[0] == 500 and sum(per_eval[1:]) == 640, f"eval read {per_eval}"


# ----------------------------------------------------------------------------------------------------------------------
# The time budget


@pytest.fixture
def fake_clock(monkeypatch):
    """train.py's clock, made deterministic: a step takes exactly 10 ms and an evaluation 50 ms, whatever the machine
    and its load, and nothing else takes time. The budget's decisions are then the same on every machine."""
    clock = types.SimpleNamespace(t=1000.0)
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock.t, perf_counter=lambda: clock.t))
    step, run_eval = train.optimizer_step, train.run_eval

    def timed_step(*a, **k):
        out = step(*a, **k)
        clock.t += 0.010
        return out

    def timed_eval(*a, **k):
        run_eval(*a, **k)
        clock.t += 0.050

    monkeypatch.setattr(train, "optimizer_step", timed_step)
    monkeypatch.setattr(train, "run_eval", timed_eval)
    return clock


def test_a_time_budget_fixes_the_step_count_records_it_and_decays_to_the_floor_by_then(tmp_path, corpus, capsys,
                                                                                     fake_clock):
    rows = train.train(gpt_args(tmp_path, corpus, "--max-time", "1s", "--max-iters", "0", "--warmup-iters", "60",
                                "--log-interval", "1", "--eval-interval", "100000", "--lr", "1e-2", "--min-lr", "1e-3"))
    out = capsys.readouterr().out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    n = ckpt["budget"]["decided"]
    # decided after 3 untimed + 50 timed steps, 0.58 s in (the step-0 eval included): 97% of the 0.42 s left, less the
    # final eval's 0.05 s, is 35 steps of 10 ms
    assert n == 53 + 35 and ckpt["step"] == n and ckpt["train_config"]["max_iters"] == n, "decision not recorded"
    assert f"-> {n} steps" in out
    assert ckpt["budget"]["spent"] <= 1.0, f"the run took {ckpt['budget']['spent']:.2f}s of its 1s budget"
    lrs = [r["lr"] for r in rows if r["kind"] == "train"]
    cfg = train.TrainConfig(**ckpt["train_config"])
    assert train.lr_at(n, cfg) == 1e-3 and lrs[-1] == pytest.approx(1e-3, rel=0.05), "no decay to the floor by the end"
    assert lrs[-1] < lrs[75] < lrs[59], "the lr must decay over the budgeted steps"


def test_a_budgeted_run_resumes_with_its_decision_and_the_same_losses(tmp_path, corpus, fake_clock):
    common = ("--max-time", "1s", "--max-iters", "0", "--warmup-iters", "60", "--log-interval", "1", "--eval-interval",
              "100000", "--dropout", "0.1")
    first = train.train(gpt_args(tmp_path / "a", corpus, *common), on_step=interrupt_at(70))
    ckpt = torch.load(tmp_path / "a" / "out" / "ckpt.pt", weights_only=True)
    n = ckpt["budget"]["decided"]
    assert ckpt["step"] == 70 and n > 70, "the decision is made within warm-up, before step 70"
    resumed = train.train(gpt_args(tmp_path / "a", corpus, *common, "--resume"))
    assert resumed[-1]["step"] == n, "the resumed run must keep the step count it decided"
    # the same run with the step count given up front is the uninterrupted reference
    straight = train.train(gpt_args(tmp_path / "b", corpus, *common[2:], "--max-iters", str(n)))
    assert strip(resumed) == strip(straight), "interrupt + resume of a budgeted run is not exact"
    assert first[-1]["step"] == 70


def test_an_explicit_step_count_turns_a_presets_budget_off():
    s = train.resolve_config(["--model", "gpt", "--max-time", "4m"])
    assert train.parse_duration(s.cfg.max_time) == 240
    s = train.resolve_config(["--model", "gpt", "--max-iters", "123"])
    assert s.cfg.max_time == "" and s.cfg.max_iters == 123
    assert train.parse_duration("1h30m") == 5400 and train.parse_duration("90") == 90


def test_budget_arithmetic_counts_the_evaluations_it_will_run():
    cfg = train.TrainConfig(eval_interval=100, max_iters=0, max_time="100s")
    b = train.Budget(seconds=100.0, eval_seconds=5.0, step_times=[0.1] * 20)
    b.decide(step=20, elapsed=10.0, cfg=cfg)
    n, left = b.decided, 90.0 * train.Budget.MARGIN
    evals = n // 100 - 0 + (n % 100 != 0)
    assert (n - 20) * 0.1 + evals * 5.0 <= left < (n + 1 - 20) * 0.1 + (evals + 1) * 5.0


# ----------------------------------------------------------------------------------------------------------------------
# Start-up cost and precision on CPUs without native bf16


def test_a_short_run_never_measures_the_cpu_peak(tmp_path, corpus, monkeypatch):
    calls = []
    real = train.peak_flops
    monkeypatch.setattr(train, "peak_flops", lambda *a, **k: calls.append(k.get("measure", True)) or real(*a, **k))
    train.train(gpt_args(tmp_path, corpus, "--max-iters", "20"))
    assert calls and not any(calls), "a 20-step run must not time a matmul at start-up"
    assert not (tmp_path / "cache" / "cpu_peak.json").exists()


def test_subnormal_floats_are_flushed_during_a_run_and_only_then(tmp_path, corpus):
    if not torch.set_flush_denormal(False):  # returns whether this CPU can flush (x86 with SSE3, ARM64)
        pytest.skip("this CPU cannot flush subnormals")
    tiny = lambda: (torch.tensor([1e-30]) * torch.tensor([1e-10])).item()  # 1e-40: subnormal in fp32
    seen = []
    train.train(gpt_args(tmp_path, corpus, "--max-iters", "2"), on_step=lambda step, loss: seen.append(tiny()))
    assert seen == [0.0, 0.0], "subnormals must be flushed to zero while a run trains (they slow CPU steps 2x)"
    assert tiny() > 0, "train() must leave the process's float behaviour as it found it"


def test_bench_measures_the_peak_once_and_caches_it_per_machine(tmp_path, corpus, monkeypatch, capsys):
    train.train(gpt_args(tmp_path, corpus, "--bench", "--bench-iters", "2"))
    cached = json.loads((tmp_path / "cache" / "cpu_peak.json").read_text())
    assert len(cached) == 1 and list(cached.values())[0] > 1e9
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda *a: pytest.fail("measured the peak again"), raising=False)
    peak, how = train.peak_flops("cpu", "fp32", str(tmp_path / "cache"))
    assert peak == list(cached.values())[0] and "cached" in how


def test_emulated_dtypes_say_what_they_cost_and_auto_avoids_them(monkeypatch, capsys):
    monkeypatch.setattr(train, "cpu_has_native", lambda dtype: dtype == "fp32")
    monkeypatch.setattr(train, "cpu_slowdown", lambda dtype: 250.0)
    assert train.pick_dtype("auto", "cpu") == "fp32"
    assert train.pick_dtype("bf16", "cpu") == "bf16"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "250x slower" in err and "--dtype fp32" in err
    assert train.peak_flops("cpu", "bf16", "/nonexistent")[0] is None, "no peak is ever measured in an emulated dtype"


def test_the_dtype_check_costs_milliseconds_even_where_bf16_is_emulated():
    import time
    train.cpu_slowdown.cache_clear()
    t = time.perf_counter()
    ratio = train.cpu_slowdown("bf16")
    assert ratio > 0 and time.perf_counter() - t < 2.0


# ----------------------------------------------------------------------------------------------------------------------
# Starting from weights, and the entry points' errors


def test_init_from_loads_the_weights_and_nothing_else(tmp_path, corpus):
    train.train(gpt_args(tmp_path / "a", corpus, "--max-iters", "10", "--lr", "1e-2"))
    src = tmp_path / "a" / "out" / "ckpt.pt"
    rows = train.train(gpt_args(tmp_path / "b", corpus, "--init-from", str(src), "--max-iters", "5", "--log-interval",
                                "1", "--lr", "1e-3", "--warmup-iters", "5"))
    first_eval = rows[0]
    old = torch.load(src, weights_only=True)
    old_last = [json.loads(x) for x in (tmp_path / "a" / "out" / "metrics.jsonl").read_text().splitlines()][-1]
    assert first_eval["kind"] == "eval" and first_eval["step"] == 0
    assert first_eval["val_loss"] == pytest.approx(old_last["val_loss"], abs=1e-6), "the weights were not loaded"
    assert [r["lr"] for r in rows if r["kind"] == "train"][0] == pytest.approx(1e-3 / 6), "the schedule must restart"
    new = torch.load(tmp_path / "b" / "out" / "ckpt.pt", weights_only=True)
    assert new["step"] == 5 and new["train_config"]["init_from"] == str(src)
    assert max(s["step"] for s in new["optimizer"]["state"].values()) == 5, "the optimizer must start fresh"
    assert old["tokenizer"] == new["tokenizer"]


def test_init_from_a_hugging_face_directory_and_gpt_py_samples_from_one(tmp_path, corpus, capsys):
    import transformers
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32))
    hf.save_pretrained(tmp_path / "hf")
    rows = train.train(gpt_args(tmp_path, corpus, "--init-from", str(tmp_path / "hf"), "--tokenizer", "gpt2",
                                "--max-iters", "2"))
    assert rows[-1]["step"] == 2
    capsys.readouterr()
    assert exit_code(gpt.main, ["--hf", str(tmp_path / "hf"), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    assert exit_code(train.main, gpt_args(tmp_path / "x", corpus, "--init-from", str(tmp_path / "hf"))) == 2
    assert "its vocabulary has 50,257 ids, --tokenizer char has" in capsys.readouterr().err


def test_gpt_py_errors_name_the_flag_and_exit_2(tmp_path):
    for argv, flag in ((["--ckpt", str(tmp_path / "missing.pt")], "--ckpt"), (["--hf", str(tmp_path)], "--hf")):
        r = subprocess.run([sys.executable, os.path.join(train.ROOT, "gpt.py"), *argv], capture_output=True, text=True,
                           cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"gpt.py: error: {flag}") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_adamw_scale_is_adamw_with_each_tensors_step_scaled_by_its_rms():
    # float64 parameters; AdamWScale measures the RMS in fp32 (one rounding, ~6e-8 of a step): rel 1e-6 of the weights
    f64 = dict(dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, generator=g, **f64) * 0.05  # RMS ~0.05: steps 20x smaller than AdamW's
    tiny = torch.full((8,), 1e-5, **f64)  # RMS below the floor: scaled by 1e-3
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(tiny.clone())
    scaled = train.AdamWScale([a, b], lr=1e-2, betas=(0.9, 0.99))
    grads = [torch.randn(16, 8, generator=g, **f64), torch.randn(8, generator=g, **f64)]
    a.grad, b.grad = grads[0].clone(), grads[1].clone()
    scaled.step()
    for p0, p, rms, grad in ((w, a, w.pow(2).mean().sqrt(), grads[0]), (tiny, b, 1e-3, grads[1])):
        ref = torch.nn.Parameter(p0.clone())
        plain = torch.optim.AdamW([ref], lr=1e-2 * float(rms), betas=(0.9, 0.99), weight_decay=0.0)
        ref.grad = grad.clone()
        plain.step()
        assert (p - p0).abs().max() > 0.5 * 1e-2 * float(rms), "the parameter did not move by about lr x RMS"
        assert_scaled_close(p, ref, "the first step must be AdamW's with lr x max(1e-3, RMS)", rel=1e-6)
    one = torch.nn.Parameter(torch.ones(4, **f64))  # RMS exactly 1: AdamW itself, step after step, with weight decay
    ref = torch.nn.Parameter(torch.ones(4, **f64))
    s1 = train.AdamWScale([one], lr=1e-2, weight_decay=0.1)
    s2 = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    one.grad = ref.grad = torch.tensor([1e-3, -1e-3, 1e-3, -1e-3], **f64)  # tiny steps keep the RMS at ~1
    s1.step()
    s2.step()
    assert_scaled_close(one - 1, ref - 1, "AdamWScale at RMS 1 and AdamW: the step", rel=1e-6)


def test_a_model_that_refuses_a_dtype_is_stopped_before_anything_is_written(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setattr(train.model_module("gpt"), "DTYPES", ("bf16", "fp32"), raising=False)
    assert exit_code(train.main, gpt_args(tmp_path, corpus, "--dtype", "fp16")) == 2
    assert "gpt does not train in fp16; use --dtype bf16 or fp32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
