"""Helpers the test modules share; written once here so that every test file can stand alone (no test file imports
another). Three families:

- exit_code: what the shell would see from a command's main(argv).
- assert_scaled_close / assert_paths_agree: two numerical paths (naive vs fused attention, a cache vs recomputing,
  ...) compared in a way that does not depend on the CPU's kernels: in float64, with the tolerance scaled to the
  tensors' magnitude. Element-wise fp32 at a large init fails on CPUs whose kernels round differently (an EPYC's fp32
  gradients of magnitude 38 differed by 3e-5 between naive and sdpa: rounding, not a bug).
- tiny_args / interrupt_at / assert_resumes: a tiny training run of any model through train.py, and the
  "stop it anywhere, resume, get the same run" check.
"""

import os
import signal

import torch


def exit_code(main, argv):
    """The exit code of main(argv), as the shell would see it: 0 when it returns, else what it passed to sys.exit."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Two numerical paths that must compute the same thing


def assert_scaled_close(a, b, what, rel=1e-9):
    """max |a - b| <= rel * max(|a|, |b|): agreement relative to the tensors' magnitude, not element by element.
    rel=1e-9 suits float64 (rounding is ~1e-16 per operation); fp32 needs ~1e-5."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ"
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30) if a.numel() else 1.0
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= rel * scale, f"{what}: max difference {err:.3g} is {err / scale:.3g} of the largest magnitude " \
                               f"{scale:.3g} (allowed {rel:g})"


def assert_paths_agree(build, run, paths=("naive", "sdpa"), rel=1e-9, grads=True):
    """The same model computed two ways gives the same outputs and the same gradients, in float64.

    build(path) -> a model (seed it inside, so both paths get the same weights); run(model) -> (outputs, loss) with
    outputs a tensor or a tuple of tensors (loss may be None when grads=False). Every parameter's gradient is compared.
    """
    results = []
    for path in paths:
        model = build(path).double()
        outputs, loss = run(model)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        if grads:
            model.zero_grad(set_to_none=True)
            loss.backward()
        results.append((outputs, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_a, grad_a), (out_b, grad_b) = results
    name_a, name_b = paths
    for i, (x, y) in enumerate(zip(out_a, out_b)):
        assert_scaled_close(x, y, f"{name_a} and {name_b}: output {i}", rel)
    if grads:
        assert grad_a and grad_a.keys() == grad_b.keys(), f"{name_a} and {name_b}: different parameters got gradients"
        for n in grad_a:
            assert_scaled_close(grad_a[n], grad_b[n], f"{name_a} and {name_b}: gradient of {n}", rel)


# ----------------------------------------------------------------------------------------------------------------------
# Tiny runs through train.py, and resume

TINY_EXTRA = {  # what each model's tiny run needs besides the common flags (no demo output, a held-out play)
    "gpt": ("--sample-tokens", "0"),
    "bert": ("--val-docs", "lear"),
    "electra": ("--val-docs", "lear"),
    "t5": ("--fill", ""),
    "xlnet": ("--val-docs", "lear", "--demo-text", ""),
    "llama": ("--sample-tokens", "0"),
    "maelm": ("--val-docs", "lear"),
    "unilm": ("--val-docs", "lear", "--max-new-tokens", "0"),
    "t5lm": ("--fill", ""),
}


def tiny_args(model, tmp_path, corpus, *extra):
    """train.py's argv for a tiny fp32 run of `model` on the test corpus, writing under tmp_path (cache and out)."""
    preset = () if model not in TINY_EXTRA else ("--preset", "tiny")
    return ["--model", model, *preset, "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "out"), "--dtype", "fp32", *TINY_EXTRA.get(model, ()), *extra]


def interrupt_at(step_to_stop, sig=signal.SIGTERM):
    """An on_step hook that sends this process `sig` after step `step_to_stop`, as a scheduler or Ctrl-C would."""
    def hook(step, loss):
        if step == step_to_stop:
            os.kill(os.getpid(), sig)
    return hook


KEYS = ("step", "kind", "loss", "lr", "val_loss", "train_loss", "val_acc", "train_acc", "val_bpb")


def strip(rows, keys=KEYS):
    """The rows' step, losses and metrics: what must be identical between a resumed and an uninterrupted run."""
    return [{k: v for k, v in r.items() if k in keys} for r in rows]


def assert_resumes(train, args, stop_at, keys=KEYS):
    """args(sub) -> argv writing under sub. A run stopped by SIGTERM after step stop_at and resumed equals the
    uninterrupted run: every logged loss and evaluation, bit for bit. Returns the uninterrupted run's rows."""
    straight = train(args("a"))
    first = train(args("b"), on_step=interrupt_at(stop_at))
    assert first[-1]["step"] == stop_at, f"the run did not stop at step {stop_at}"
    resumed = train([*args("b"), "--resume"])
    assert strip(resumed, keys) == strip(straight, keys), \
        f"stopped at step {stop_at}: the resumed run differs (other batches, masks or losses, or an evaluation " \
        f"skipped or repeated)"
    return straight


# ----------------------------------------------------------------------------------------------------------------------
# BERT-family fixtures (test_bert.py and test_electra.py): weights large enough for parity tests to see a wrong
# convention, a padded batch, and how far a count lies from a binomial's mean


def sigmas(count, n, p):
    """How many binomial standard deviations `count` out of `n` lies from the expected n * p."""
    return abs(count - n * p) / max(1e-9, (n * p * (1 - p)) ** 0.5)


def redraw(model, std=0.3):
    """Every weight ~ N(0, std), LayerNorm gains 1 + N(0, std). At BERT's 0.02 every activation is tiny and a wrong GELU
    or a pre-LN block hides below 1e-5; at 0.3 fp32 rounding alone approaches 1e-5, so parity tests run in float64."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name or name.endswith("norm.weight"):
                p.copy_(1 + std * torch.randn_like(p))
            else:
                p.normal_(0.0, std)


def padded_inputs(V=61, T=24):
    """(input_ids, token_type_ids, attention_mask), each (3, T): two rows padded (one mostly), segment B from 9 on."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (3, T), generator=g)
    attention_mask = torch.ones(3, T, dtype=torch.long)
    attention_mask[1, 15:] = 0
    attention_mask[2, 4:] = 0
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, 9:] = 1
    return ids, token_type_ids, attention_mask
