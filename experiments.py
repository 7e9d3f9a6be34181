"""
The readings' experiments at toy scale, one subcommand each. Every run trains through train.py,
in-process (its flags, its checkpoints): a figure here is what the loop computes. The models, and
the computations their slides show, stay in the model files. This file holds the orchestration:
which runs, which table, which figure (under assets/).

  python experiments.py continue      continued pretraining: re-warm, replay, scratch
                                      (Gupta et al. 2023 §3-4; Ibrahim et al. 2024 §5-7)
                                      -> continue_pretraining.png
  python experiments.py mtp           next-token vs multi-token prediction at equal compute
                                      (Gloeckle et al. 2024; DeepSeek-V3 §2.2) -> mtp_compare.png
  python experiments.py extrapolate   ALiBi's Figure 1 in miniature (Press et al. 2022): a GPT per
                                      --pos, scored at 1x..8x its training length
                                      -> positions_extrapolation.png
  python experiments.py probe         "What do position embeddings learn?" (Wang & Chen 2020): the
                                      cosine heatmap and the two probes -> positions_cosine.png
  python experiments.py views         XLNet's "Split View of the Query Stream" (3 -> 2 -> 4 -> 1)
                                      from the model's own masks -> xlnet_order_views.png
  python experiments.py two-phase     Transformer-XL's evaluation: memory vs the vanilla sliding
                                      window (Dai et al. 2019 §3.1-3.2, §4) -> a table
--help lists each one's flags; continue and extrapolate have --quick, a smoke run in minutes.
Tests (tiny settings): tests/test_continue.py, test_mtp.py, test_positions.py, test_xlnet.py.

`mtp` (Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction";
slides "Multi-token prediction"): gpt.py with 0, 1 or 3 extra heads, parallel or sequential.
"""

import argparse
import dataclasses
import os
import shlex
import sys
import time

import numpy as np
import torch

import gpt
import positions
import train
import xlnet
from common import UsageError, command, pyplot, require

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")
CACHE = os.path.join(HERE, "data", "cache")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one line, exit code 2 (common.command), like any."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def save(fig, png, plt):
    """Write a figure (its directory created) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"wrote {png}")


# ----------------------------------------------------------------------------------------------------------------------
# continue: pretrain on Shakespeare, continue on Milton (slides "Pretraining language models")
#
#   - Gupta et al. 2023, "Continual Pre-Training of Large Language Models: How to (re)warm your
#     model?" §3-4: re-warming the lr on new data first raises the loss on old and new data,
#     then helps on the new. The higher the new peak, the more adaptation and forgetting.
#   - Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train Large Language
#     Models" §5-7: re-warm + re-decay. Replaying a small share of the old data (~5% is often
#     enough) prevents most forgetting. "Infinite" schedules avoid re-warming.
#   - Parmar et al. 2024, "Reuse, Don't Retrain": continuing beats scratch at equal compute.
#
# The runs, under out/experiments/continue:
#   1. pretrain: a char GPT on Shakespeare. Milton is evaluated all along, never trained on
#      (weight 0): one alphabet covers both, and the plot shows Milton's loss before the switch;
#   2. from that checkpoint (--init-from: weights only), --cont-iters steps on Milton: no re-warm
#      (constant at the final lr), a re-warm to each --rewarm-lrs peak (warm-up, then cosine),
#      and each --replay share of Shakespeare at the largest peak;
#   3. scratch: the same model on Milton alone, pretrain + continue steps (equal compute).
# Printed: final val losses on both corpora (and bits per byte). Plotted: Shakespeare (upstream:
# forgetting) and Milton (downstream: adaptation) val loss against total steps.


def _run(args, name, data, extra):
    """One train.py run; returns its metric rows."""
    # Every setting that shapes the result is spelled out: retuning a preset moves no figure.
    argv = ["--model", "gpt", "--preset", "char-cpu", "--n-layer", "4", "--n-head", "4",
            "--n-embd", "128", "--block-size", "64", "--batch-size", "32", "--dropout", "0",
            "--bias", "--attn", "sdpa", "--pos", "learned", "--weight-decay", "0.1",
            "--beta1", "0.9", "--beta2", "0.99", "--grad-clip", "1.0", "--schedule", "cosine",
            "--grad-accum", "1", "--tokenizer", "char", "--data", data,
            "--eval-tokens", str(args.eval_tokens), "--eval-train-tokens", "4096",
            "--min-lr", str(args.min_lr), "--sample-tokens", "0",
            "--out-dir", os.path.join(args.out_dir, name), "--overwrite", "--seed", str(args.seed),
            "--cache-dir", args.cache_dir, "--log-interval", "100", *extra]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    argv += shlex.split(args.train_args)  # last, so they win
    print(f"=== {name} ===", flush=True)
    return train.train(argv)


def continue_pretraining(args):
    if args.quick:
        args.pre_iters, args.cont_iters, args.eval_tokens = 60, 30, 4096
    require(min(args.pre_iters, args.cont_iters) >= 10 and args.rewarm_lrs
            and all(0 < r < 1 for r in args.replay), "--pre-iters and --cont-iters must be >= 10, "
            "--rewarm-lrs non-empty, --replay shares in (0, 1)")
    up, down = args.upstream, args.downstream
    t0 = time.time()
    every = str(max(1, args.cont_iters // args.evals))
    names = {up: os.path.basename(os.path.normpath(up)), down: os.path.basename(os.path.normpath(down))}
    pre = _run(args, "pretrain", f"{up}:1,{down}:0",
               ["--max-iters", str(args.pre_iters), "--lr", str(args.lr),
                "--warmup-iters", str(args.pre_iters // 10),
                "--eval-interval", str(max(1, args.pre_iters // args.evals))])
    ckpt = os.path.join(args.out_dir, "pretrain", "ckpt.pt")
    cont = ["--init-from", ckpt, "--max-iters", str(args.cont_iters), "--eval-interval", every]
    warm = str(max(1, args.cont_iters // 10))
    runs = {"no re-warm": _run(args, "no-rewarm", f"{down}:1,{up}:0", [
        *cont, "--schedule", "constant", "--lr", str(args.min_lr), "--warmup-iters", "0"])}
    for lr in args.rewarm_lrs:
        runs[f"re-warm to {lr:g}"] = _run(args, f"rewarm-{lr:g}", f"{down}:1,{up}:0",
                                          [*cont, "--lr", str(lr), "--warmup-iters", warm])
    top = max(args.rewarm_lrs)
    for share in args.replay:
        runs[f"re-warm {top:g} + {share:.0%} replay"] = _run(
            args, f"replay-{share:g}", f"{down}:{1 - share},{up}:{share}",
            [*cont, "--lr", str(top), "--warmup-iters", warm])
    total = args.pre_iters + args.cont_iters
    scratch = _run(args, "scratch", f"{down}:1,{up}:0",
                   ["--max-iters", str(total), "--lr", str(args.lr), "--warmup-iters", str(total // 10),
                    "--eval-interval", str(max(1, total // args.evals))])
    _table(pre, runs, scratch, names[up], names[down], time.time() - t0)
    _plot(pre, runs, scratch, names[up], names[down], args)
    return pre, runs, scratch


def _final(rows):
    return [r for r in rows if r["kind"] == "eval"][-1]


def _table(pre, runs, scratch, up, down, seconds):
    p = _final(pre)
    print(f"\nval loss (nats/char) and bits per byte, final evaluation of each run "
          f"({seconds / 60:.1f} min in all)")
    head = f"{'run':<28}{up + ' (upstream)':>24}{down + ' (downstream)':>26}"
    print(head + "\n" + "-" * len(head))

    def line(name, r):
        print(f"{name:<28}{r[f'val_{up}_loss']:>12.4f} ({r[f'val_{up}_bpb']:.3f} bpb)"
              f"{r[f'val_{down}_loss']:>14.4f} ({r[f'val_{down}_bpb']:.3f} bpb)")

    line("pretrained (start)", p)
    for name, rows in runs.items():
        line(name, _final(rows))
    line("scratch on milton (equal)", _final(scratch))
    print("upstream rising = forgetting; downstream falling = adaptation. 'equal': the scratch run "
          "has the steps of pretraining + continuing.")


def _plot(pre, runs, scratch, up, down, args):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    offset = args.pre_iters
    evals = lambda rows: [r for r in rows if r["kind"] == "eval"]
    for ax, corpus, title in ((axes[0], up, "upstream: forgetting"),
                              (axes[1], down, "downstream: adaptation")):
        key = f"val_{corpus}_loss"
        ax.plot([r["step"] for r in evals(pre)], [r[key] for r in evals(pre)], "k-", lw=2, label="pretrain")
        for i, (name, rows) in enumerate(runs.items()):
            ax.plot([offset + r["step"] for r in evals(rows)], [r[key] for r in evals(rows)],
                    "o-", ms=3, color=f"C{i}", label=name)
        ax.plot([r["step"] for r in evals(scratch)], [r[key] for r in evals(scratch)],
                "--", color="gray", label=f"scratch on {down}")
        ax.axvline(offset, color="gray", lw=0.8, ls=":")
        ax.set(xlabel="total steps (pretrain, then continue)",
               ylabel=f"{corpus} val loss (nats/char)", title=f"{corpus}: {title}")
        ax.grid(alpha=0.3)
        ax.set_xlim(offset * 0.5, offset + args.cont_iters * 1.02)
        # y range of what is shown; the continued runs count steps from the switch
        shown = [r[key] for rows in [pre, scratch, *runs.values()] for r in evals(rows)
                 if r["step"] + (0 if rows is pre or rows is scratch else offset) >= offset * 0.5]
        ax.set_ylim(min(shown) - 0.02, max(shown) + 0.02)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"continued pretraining, char GPT 4x128: {args.pre_iters} steps on {up}, "
                 f"then {args.cont_iters} on {down}")
    fig.tight_layout()
    save(fig, args.png, plt)


def continue_flags(c):
    c.add_argument("--upstream", default="shakespeare",
                   help="the corpus pretrained on (bundled name or directory)")
    c.add_argument("--downstream", default="milton",
                   help="the corpus continued on (bundled name or directory)")
    c.add_argument("--pre-iters", type=int, default=1500, help="pretraining steps on Shakespeare")
    c.add_argument("--cont-iters", type=int, default=500, help="continued-pretraining steps on Milton")
    c.add_argument("--lr", type=float, default=3e-3, help="pretraining (and scratch) peak lr")
    c.add_argument("--min-lr", type=float, default=3e-4,
                   help="every schedule's floor; 'no re-warm' continues at it")
    floats = lambda s: [float(x) for x in s.split(",")]
    c.add_argument("--rewarm-lrs", type=floats, default=[1e-3, 3e-3],
                   help="peaks to re-warm to (comma-separated)")
    c.add_argument("--replay", type=floats, default=[0.05, 0.25], help="shares of Shakespeare "
                   "replayed, at the largest re-warm peak (comma-separated)")
    c.add_argument("--eval-tokens", type=int, default=32768,
                   help="val characters scored per corpus at each eval")
    c.add_argument("--evals", type=int, default=8, help="evaluations per run (the points of each curve)")
    c.add_argument("--dtype", default="", help="override the precision (default: auto)")
    c.add_argument("--train-args", default="", help="more train.py flags for every run, e.g. \"--n-layer 2\"")
    c.add_argument("--seed", type=int, default=1337)
    c.add_argument("--quick", action="store_true", help="a smoke run: 60 + 30 steps, 4K eval tokens")
    c.add_argument("--out-dir", default=os.path.join("out", "experiments", "continue"))
    c.add_argument("--cache-dir", default=CACHE)
    c.add_argument("--png", default=os.path.join(ASSETS, "continue_pretraining.png"))


# ----------------------------------------------------------------------------------------------------------------------
# extrapolate and probe: positional encodings in a trained GPT (positions.py, gpt.py's --pos)
#
#   extrapolate: Press et al. 2022's Figure 1 in miniature. The same GPT is trained with each
#                scheme on windows of --block-size, then scores held-out text in windows of 1x,
#                2x, 4x, 8x that length (their evaluation too). A scheme extrapolates if its loss
#                does not blow up past the training length. ~15 min on a CPU; --quick: ~2 min.
#   probe:       the slide "What do position embeddings learn?" (Wang & Chen 2020): the heatmap
#                of a learned position table, and positions.py's two probes on it, on the
#                sinusoid of its shape, on an untrained table, and on any GPT-2 given with --hf.
#                ~10 min on a CPU (training the GPT; --ckpt skips that).

EXTRAPOLATION_SCHEMES = ("learned", "sinusoidal", "shaw", "t5", "alibi", "rope", "none")


def _train_gpt(args, scheme, out_dir, extra=()):
    """Train a char-level GPT with train.py in-process (its CLI flags, its checkpoint).
    Returns (train.open_run of the result: model, splits, evaluate(), training seconds)."""
    # Every setting that shapes the result is spelled out: retuning a preset moves no figure.
    argv = ["--model", "gpt", "--preset", "nanogpt-cpu", "--n-layer", "4", "--n-head", "4",
            "--n-embd", "128", "--dropout", "0", "--bias", "--attn", "sdpa", "--dtype", "auto",
            "--tokenizer", "char", "--weight-decay", "0.1", "--beta2", "0.99", "--pos", scheme,
            "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
            "--max-iters", str(args.iters), "--eval-interval", str(args.iters),
            "--warmup-iters", str(max(1, args.iters // 10)), "--lr", "3e-3", "--min-lr", "3e-4",
            "--eval-train-tokens", "4096", "--log-interval", str(max(1, args.iters // 4)),
            "--seed", str(args.seed), "--out-dir", out_dir, "--overwrite", "--sample-tokens", "0",
            "--cache-dir", args.cache_dir, *extra]
    if args.data:
        argv += ["--data", args.data]
    else:  # one held-out play, not three: train.py scores val twice per run, and we run seven
        argv += ["--val-docs", "julius_caesar"]
    t0 = time.time()
    train.train(argv)
    seconds = time.time() - t0
    return train.open_run(os.path.join(out_dir, "ckpt.pt")), seconds


def _check_training_flags(args):
    require(args.iters >= 1 and args.block_size >= 2 and args.batch_size >= 1,
            "--iters, --batch-size must be >= 1 and --block-size >= 2")


def extrapolate(args):
    """Train one GPT per scheme, score it at each multiple of the training length.
    Returns {scheme: {multiple: loss, or None where the scheme cannot run}}."""
    if args.quick:
        args.iters, args.eval_tokens, args.schemes = 20, 8192, "learned,alibi,rope"
    _check_training_flags(args)
    schemes = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in schemes if s not in EXTRAPOLATION_SCHEMES]
    require(schemes and not unknown,
            f"--schemes: unknown {unknown}; choose from {','.join(EXTRAPOLATION_SCHEMES)}")
    try:
        mults = [int(m) for m in args.multiples.split(",")]
    except ValueError:
        raise UsageError(f"--multiples {args.multiples!r}: expected integers, e.g. 1,2,4,8") from None
    require(min(mults) >= 1, "--multiples must be >= 1")
    results, seconds = {}, {}
    for scheme in schemes:
        print(f"=== {scheme}: training {args.iters} steps on windows of {args.block_size} ===", flush=True)
        run, seconds[scheme] = _train_gpt(args, scheme, os.path.join(args.out_dir, scheme))
        results[scheme] = {}
        for m in mults:
            # The same model on longer windows: only the objective's window changes.
            # gpt.py allows T > block_size for every scheme without a position table.
            longer = dataclasses.replace(run.model.config, block_size=m * args.block_size)
            objective = gpt.NextTokenObjective(longer, run.tokenizer)
            try:
                loss = run.evaluate(objective, "val", args.eval_tokens)["loss"]
            except ValueError:  # learned absolute: no row for position block_size (gpt.py says so)
                loss = None
            results[scheme][m] = loss
    _print_extrapolation(results, seconds, args)
    _plot_extrapolation(results, args)
    return results


def _print_extrapolation(results, seconds, args):
    mults = list(next(iter(results.values())))
    head = (f"{'pos':<11}" + "".join(f"{f'{m}x ({m * args.block_size})':>12}" for m in mults)
            + f"{'train s':>10}")
    print(f"\nval loss (nats/char) on the first {args.eval_tokens:,} held-out characters, "
          f"windows of each length")
    print(head + "\n" + "-" * len(head))
    for scheme, row in results.items():
        cells = "".join(f"{'n/a':>12}" if v is None else f"{v:>12.4f}" for v in row.values())
        print(f"{scheme:<11}{cells}{seconds[scheme]:>10.0f}")
    if any(v is None for row in results.values() for v in row.values()):
        print(f"n/a: learned absolute has no position rows past {args.block_size - 1}: "
              f"it cannot run on longer windows")


def _plot_extrapolation(results, args):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for scheme, row in results.items():
        xs = [m * args.block_size for m, v in row.items() if v is not None]
        ax.plot(xs, [v for v in row.values() if v is not None], "o-", label=scheme)
    ax.axvline(args.block_size, color="gray", ls="--", lw=1)
    ax.annotate("training length", (args.block_size, ax.get_ylim()[1]), xytext=(4, -12),
                textcoords="offset points", color="gray", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="evaluation window (tokens)", ylabel="val loss (nats/token)",
           title=f"Extrapolation: trained on {args.block_size}-token windows ({args.iters} steps each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, args.png, plt)


def probe(args):
    """Wang & Chen 2020's two probes (the slide's table) on a position table we trained, on the
    sinusoid and an untrained table of its shape, and on every GPT-2 directory given with --hf.
    Returns [(name, absolute MAE, relative error rate)]; writes the cosine-similarity heatmaps."""
    _check_training_flags(args)
    hf_tables = []  # read first: a bad --hf fails before any training
    for path in args.hf:
        try:
            wpe = gpt.GPT.from_pretrained(path).transformer.wpe.weight.detach()[:512]
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"--hf {path}: {e}") from None
        hf_tables.append((f"hf: {path} ({wpe.shape[0]}x{wpe.shape[1]})", wpe))
    if args.ckpt:
        model, _, _ = train.load_for_inference(args.ckpt, flag="--ckpt", model="gpt")
        how = f"{args.ckpt}"
        require(model.config.pos == "learned",
                f"--ckpt {args.ckpt} was trained with --pos {model.config.pos}: "
                f"it has no table of position embeddings to probe")
    else:
        print(f"=== training a learned-absolute GPT, {args.iters} steps "
              f"on windows of {args.block_size} ===", flush=True)
        run, seconds = _train_gpt(args, "learned", args.out_dir)
        model = run.model
        how = f"char GPT, {args.iters} steps, {seconds:.0f} s"
    ours = model.transformer.wpe.weight.detach()[:512]  # the paper probes the first 512 positions
    n, d = ours.shape
    tables = [(f"ours: learned ({how})", ours)]
    torch.manual_seed(args.seed)
    tables.append((f"untrained N(0, 0.01) ({n}x{d})", 0.01 * torch.randn(n, d)))  # training's start
    tables.append((f"sinusoid ({n}x{d})", positions.sinusoidal(n, d)))
    tables += hf_tables

    rows = [(name, positions.probe_absolute_position(e, seed=args.seed),
             positions.probe_relative_order(e, seed=args.seed)) for name, e in tables]
    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{'position table':<{width}}{'absolute MAE':>14}{'relative error':>16}")
    print("-" * (width + 30))
    for name, mae, err in rows:
        print(f"{name:<{width}}{mae:>14.2f}{err:>15.2%}")
    print("lecture (Wang & Chen 2020, 512 positions, d=768): GPT-2 1.03 / 1.56%, "
          "RoBERTa 6.06 / 7.23%, BERT 34.14 / 19.72%, sinusoid 0.0 / 5.08%")
    _plot_cosine([t for t in tables if not t[0].startswith("untrained")], args.png)
    return rows


def _plot_cosine(tables, png):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4), squeeze=False)
    for ax, (name, emb) in zip(axes[0], tables):
        im = ax.imshow(positions.cosine_similarity_matrix(emb).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set(title=name if len(name) < 40 else name[:37] + "...", xlabel="position", ylabel="position")
        ax.title.set_fontsize(9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    save(fig, png, plt)


def training_flags(q, iters, block_size, batch_size, out_dir, png):
    """The flags extrapolate and probe share: the GPT they train, and where its files go."""
    q.add_argument("--iters", type=int, default=iters, help=f"training steps per model (default {iters})")
    q.add_argument("--block-size", type=int, default=block_size,
                   help=f"training window (default {block_size})")
    q.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"windows per step (default {batch_size})")
    q.add_argument("--data", default="", help="corpus directory (default: the bundled Shakespeare)")
    q.add_argument("--seed", type=int, default=1337)
    q.add_argument("--out-dir", default=out_dir, help=f"checkpoints go here (default {out_dir})")
    q.add_argument("--cache-dir", default=CACHE, help="train.py's token cache")
    q.add_argument("--png", default=os.path.join(ASSETS, png), help=f"figure path (default assets/{png})")


def extrapolate_flags(e):
    training_flags(e, 1000, 64, 12, os.path.join("out", "positions", "extrapolate"),
                   "positions_extrapolation.png")
    e.add_argument("--schemes", default=",".join(EXTRAPOLATION_SCHEMES), help="comma-separated --pos values")
    e.add_argument("--multiples", default="1,2,4,8", help="evaluation lengths as multiples of --block-size")
    e.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens scored at each length")
    e.add_argument("--quick", action="store_true",
                   help="a 2-minute smoke run: 20 steps, 3 schemes, 8K eval tokens")


def probe_flags(r):
    training_flags(r, 1500, 256, 8, os.path.join("out", "positions", "probe"), "positions_cosine.png")
    r.add_argument("--ckpt", default="",
                   help="probe this train.py checkpoint (pos=learned) instead of training one")
    r.add_argument("--hf", action="append", default=[], metavar="DIR", help="also probe a Hugging "
                   "Face GPT-2 directory (repeatable), e.g. real GPT-2 weights")


# ----------------------------------------------------------------------------------------------------------------------
# views and two-phase: XLNet's and Transformer-XL's slides, from xlnet.py's masks and evaluations
#
#   views:     the slide "Split View of the Query Stream (Factorization order: 3 -> 2 -> 4 -> 1)":
#              for one order, what each prediction may see (xlnet.query_views: the model's own
#              masks, not drawn by hand); then one order the objective samples on a held-out line.
#   two-phase: the slides "Transformer-XL": scoring a left-to-right LM on a long text.
#                vanilla model: a window of the last W tokens slides by one token per prediction,
#                  all recomputed: W token computations per token (xlnet.eval_sliding_window);
#                with memory: T tokens at a time. Earlier segments' layer inputs stay in memory
#                  (M of them), attended to, not recomputed: ~1 computation per token, a context
#                  of M to M + T - 1 tokens, more through memory's memory (xlnet.eval_with_memory).
#              Both use the same XLNet in the identity order (g at t predicts x_t from x_<t).


def held_out_line():
    with open(os.path.join(HERE, "data", "shakespeare", "julius_caesar.txt")) as f:
        text = f.read()
    start = text.index("Friends, Romans, countrymen")
    return text[start:text.index("\n", text.index("\n", start) + 1)]  # two lines of verse


def slide_views():
    """The slide's example as text: four tokens, memory, order 3 -> 2 -> 4 -> 1, all predicted."""
    order = [3, 2, 4, 1]  # 1-based positions, as on the slide
    rank = torch.tensor([order.index(p) for p in range(1, 5)])
    mask_g, mask_h = xlnet.query_views(rank, torch.ones(4, dtype=torch.bool), mlen=1)
    names = ["mem", "x1", "x2", "x3", "x4"]
    lines = ["The slide's order 3 -> 2 -> 4 -> 1 (every token predicted, one memory slot):"]
    for p in order:
        g = [names[j] for j in range(5) if not mask_g[p - 1, j]]
        h = [names[j] for j in range(5) if not mask_h[p - 1, j]]
        lines.append(f"  position-{p} view: query g{p} predicts x{p} from {', '.join(g):<16} "
                     f"content h{p} sees {', '.join(h)}")
    return lines, (rank, mask_g)


def text_views(text, partial_k=6, seed=0):
    """One order the objective samples for a line of text: its targets in order, and what each sees
    ('_' hidden, '?' predicted). Returns (lines, (chars, rank, is_target, mask_g, targets))."""
    g = torch.Generator().manual_seed(seed)
    is_target = xlnet.sample_targets(len(text), len(text) // partial_k, g)
    rank = xlnet.sample_order(len(text), len(text), g)
    mask_g, _ = xlnet.query_views(rank, is_target)
    targets = sorted(is_target.nonzero()[:, 0].tolist(), key=lambda i: int(rank[i]))
    lines = [f"A line of a held-out play, K = {partial_k}: {len(targets)} targets of {len(text)} "
             f"characters, in spans; the other characters are context that every target sees.",
             f"  order of the targets: {' -> '.join(f'{text[i]!r}@{i}' for i in targets)}"]
    for step, i in enumerate(targets, 1):
        seen = "".join("?" if j == i else ("_" if mask_g[i, j] else ("¶" if text[j] == "\n" else text[j]))
                       for j in range(len(text)))
        lines.append(f"  {step:>2}. {text[i]!r:>5}@{i:<3} sees: {seen}")
    return lines, (list(text), rank, is_target, mask_g, targets)


def plot_views(slide, real, path):
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    # hidden, visible, predicted, memory
    colors = ListedColormap(["#d9d9d9", "#74c476", "#fd8d3c", "#6baed6"])
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1, 4]})
    rank, mask_g = slide
    order = rank.argsort().tolist()
    grid = np.array([[3 if j == 0 and not mask_g[i, j] else 2 if j == i + 1 else
                      0 if mask_g[i, j] else 1 for j in range(5)] for i in order])
    ax = axes[0]
    ax.imshow(grid, cmap=colors, vmin=0, vmax=3)
    ax.set_xticks(range(5), ["mem", "x1", "x2", "x3", "x4"])
    ax.set_yticks(range(4), [f"position-{i + 1} view" for i in order])
    ax.set_title("the slide: order 3 -> 2 -> 4 -> 1\n(query streams; blue = memory)", fontsize=10)
    chars, rank, is_target, mask_g, targets = real
    grid = np.array([[2 if j == i else 0 if mask_g[i, j] else 1 for j in range(len(chars))] for i in targets])
    ax = axes[1]
    ax.imshow(grid, cmap=colors, vmin=0, vmax=3, aspect="auto")
    ax.set_xticks(range(len(chars)),
                  ["\\n" if c == "\n" else "␣" if c == " " else c for c in chars], fontsize=7)
    ax.set_yticks(range(len(targets)), [f"{n}. {chars[i]!r}@{i}" for n, i in enumerate(targets, 1)], fontsize=8)
    ax.set_title("one sampled order on a held-out line: rows = the targets in factorization order\n"
                 "green = what its query stream may read, orange = the token it predicts, "
                 "grey = hidden", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def views(args):
    require(2 <= args.k <= 40, f"--k {args.k}: K must be in 2..40 (a line of 89 characters)")
    slide_lines, slide = slide_views()
    real_lines, real = text_views(held_out_line(), partial_k=args.k, seed=args.seed)
    print("\n".join(slide_lines + [""] + real_lines))
    plot_views(slide, real, args.png)
    print(f"wrote {args.png}")


def two_phase(model, tokens, rows=8, seg_len=None, mem_len=None):
    """Both evaluations on the same held-out tokens; prints the table, returns the results.
    The window spans memory's longest direct reach (mem_len + seg_len): it never sees less."""
    model.eval()
    seg_len = seg_len or model.config.seq_len
    if mem_len is not None:
        model.config.mem_len = mem_len
    M = model.config.mem_len
    window = M + seg_len
    # warm-up: the first calls allocate
    xlnet.eval_with_memory(model, tokens[:rows * 2 * seg_len], rows, seg_len)
    xlnet.eval_sliding_window(model, tokens[:rows * 4], rows, window)
    phases = ((f"with memory (T={seg_len}, M={M})", f"{M}..{M + seg_len - 1} + recurrence",
               lambda: xlnet.eval_with_memory(model, tokens, rows, seg_len)),
              (f"sliding window (W={window})", f"{window - 1}",
               lambda: xlnet.eval_sliding_window(model, tokens, rows, window)))
    results = []
    for name, context, run in phases:
        nll, count, seconds = run()
        results.append({"name": name, "context": context, "loss": nll / count,
                        "ms_per_token": 1000 * seconds / count, "tokens": count})
    print(f"{'evaluation':<28} {'context (tokens)':<20} {'loss (nats/tok)':>15} {'ms/token':>9} {'tokens':>7}")
    for r in results:
        print(f"{r['name']:<28} {r['context']:<20} {r['loss']:>15.4f} "
              f"{r['ms_per_token']:>9.3f} {r['tokens']:>7}")
    print(f"memory is {results[1]['ms_per_token'] / results[0]['ms_per_token']:.0f}x cheaper per token; loss "
          f"{results[0]['loss'] - results[1]['loss']:+.4f} nats/token against the window")
    return results


def run_two_phase(args):
    """Train Transformer-XL's training phase (train.py --preset txl-cpu) unless --ckpt is given.
    Then run both evaluation phases on the held-out text."""
    require(args.rows >= 1 and args.tokens >= 2 * args.rows,
            f"--tokens {args.tokens} / --rows {args.rows}: need at least 2 tokens per row")
    require(args.seq_len >= 0 and (args.mem_len is None or args.mem_len >= 1),
            "--seq-len must be >= 1 and --mem-len >= 1 (memory is what is measured)")
    path = args.ckpt
    if not path:
        out = os.path.join("out", "xlnet-txl")
        path = os.path.join(out, "ckpt.pt")
        if os.path.exists(path):
            print(f"using {path} (remove it, or pass --ckpt, to evaluate another model)")
        else:
            print(f"training Transformer-XL's train phase first: "
                  f"python train.py --model xlnet --preset txl-cpu --out-dir {out}")
            train.train(["--model", "xlnet", "--preset", "txl-cpu", "--out-dir", out, "--demo-text", ""])
    run = train.open_run(path, model="xlnet", flag="--ckpt")
    model = run.model.float()
    tokens = run.splits["val"].tokens[:args.tokens]
    print(f"{path}: {run.cfg.preset} ({model.config.objective}), held-out text: "
          f"the first {len(tokens):,} tokens of {', '.join(run.splits['val'].doc_names)}; "
          f"{args.rows} streams side by side; fp32 on {run.device}")
    return two_phase(model, tokens, args.rows, args.seq_len, args.mem_len)


def views_flags(v):
    v.add_argument("--k", type=int, default=6, help="K: predict the last 1/K of the order")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--png", default=os.path.join(ASSETS, "xlnet_order_views.png"))


def two_phase_flags(t):
    t.add_argument("--ckpt", default="", help="an xlnet checkpoint (default: train --preset "
                                              "txl-cpu into out/xlnet-txl first, or reuse it)")
    t.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score")
    t.add_argument("--rows", type=int, default=8, help="streams evaluated side by side")
    t.add_argument("--seq-len", type=int, default=0, help="segment length with memory (default: the model's)")
    t.add_argument("--mem-len", type=int, default=None, help="memory length (default: the model's)")


# ----------------------------------------------------------------------------------------------------------------------
# mtp: does predicting more than one token help? Next-token vs multi-token prediction (mtp.py's
# heads on gpt.py), trained with train.py at equal compute on the bundled Shakespeare.

MTP_VARIANTS = {  # name -> (mtp, mtp_heads); the name's number n: tokens predicted per position
    "next-token": ("parallel", 0),
    "parallel-2": ("parallel", 1), "parallel-4": ("parallel", 3),  # Gloeckle et al.'s heads
    # DeepSeek-V3's modules (it uses n = 2)
    "sequential-2": ("sequential", 1), "sequential-4": ("sequential", 3),
}
DEEPSEEK_LAMBDA = 0.3  # DeepSeek-V3's MTP loss weight for its first 10T tokens (§4.2), 0.1 after


def mtp_weight_of(mtp, mtp_heads, override=0.0):
    """Each paper's own weight w of an extra head's loss. Gloeckle et al. sum all heads (w = 1).
    DeepSeek-V3 scales the mean of its D depths by lambda (eq. 25): w = lambda / D.
    mtp_weight_of("sequential", 3) -> 0.1"""
    if override:
        return override
    return 1.0 if mtp == "parallel" else DEEPSEEK_LAMBDA / mtp_heads


def mtp_compare(args):
    """Train each variant with train.py (in-process, flags spelled out). Report next-token val loss
    and bits per byte, each head's val loss, and the drafts self-speculative decoding keeps.
    Returns {variant: results}.

    Equal compute (--equal flops, the default): one model, batch, schedule shape and training
    FLOPs for all. MTP's extra heads make a step dearer (flops_per_token counts them), so a
    variant trains iters * F_next / F_variant steps: fewer tokens, the same compute. Inference
    costs the same: the next-token path is the same L-block GPT. --equal steps gives every run
    the same steps and tokens, as in DeepSeek-V3's ablation (§4.5.1): MTP costs more compute.
    """
    import mtp  # train.py's "gpt": GPT-2 plus the heads, and self-speculative decoding
    from common import require

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in MTP_VARIANTS]
    require(variants and not unknown, f"--variants: unknown {','.join(unknown) or '(none)'}; "
            f"choose from {','.join(MTP_VARIANTS)}")
    require(args.equal in ("flops", "steps"), f"--equal {args.equal!r}: choose flops or steps")
    require(min(args.iters, args.batch_size, args.prompt_len, args.evals) >= 1 and args.block_size >= 2,
            "--iters, --batch-size, --prompt-len, --evals must be >= 1 and --block-size >= 2")
    require(args.prompt_len < args.block_size, f"--prompt-len {args.prompt_len} leaves no room "
            f"to generate in --block-size {args.block_size}")
    # the baseline first: it fixes the budget
    variants = ["next-token"] + [v for v in variants if v != "next-token"]
    results, flops_next = {}, None
    for name in variants:
        kind, heads = MTP_VARIANTS[name]
        weight = mtp_weight_of(kind, heads, args.mtp_weight) if heads else 0.0
        if flops_next is None:
            steps = args.iters
        else:
            config = mtp.Config(**{**results["next-token"]["config"], "mtp": kind, "mtp_heads": heads})
            with torch.device("meta"):  # shapes only, for flops_per_token
                flops = mtp.Model(config).flops_per_token()
            steps = args.iters if args.equal == "steps" else max(1, round(args.iters * flops_next / flops))
        print(f"=== {name}: {steps} steps ===", flush=True)
        out_dir = os.path.join(args.out_dir, name)
        argv = ["--model", "gpt", "--preset", "char-cpu", "--n-layer", "4", "--n-head", "4",
                "--n-embd", "128", "--dropout", "0", "--bias", "--attn", "naive", "--pos",
                "learned", "--dtype", "auto", "--tokenizer", "char", "--block-size",
                str(args.block_size), "--batch-size", str(args.batch_size), "--grad-accum", "1",
                "--max-iters", str(steps), "--eval-interval", str(max(1, steps // args.evals)),
                "--warmup-iters", str(max(1, steps // 10)), "--lr", "3e-3", "--min-lr", "3e-4",
                "--schedule", "cosine", "--weight-decay", "0.1", "--beta2", "0.99", "--eval-tokens",
                str(args.eval_tokens), "--eval-train-tokens", str(min(4096, args.eval_tokens)),
                "--log-interval", str(max(1, steps // 4)), "--seed", str(args.seed), "--out-dir",
                out_dir, "--overwrite", "--sample-tokens", "0", "--cache-dir", args.cache_dir,
                "--mtp", kind, "--mtp-heads", str(heads), "--mtp-weight", str(weight or 1.0)]
        if args.data:
            argv += ["--data", args.data]
        rows = train.train(argv)
        run = train.open_run(os.path.join(out_dir, "ckpt.pt"))
        flops = run.model.flops_per_token()
        flops_next = flops_next or flops
        tokens_per_step = args.batch_size * args.block_size
        evals = [r for r in rows if r["kind"] == "eval"]
        results[name] = dict(
            config=vars(run.model.config).copy(), n=1 + heads, weight=weight, steps=steps,
            train_flops=steps * tokens_per_step * flops,
            curve=[(r["step"] * tokens_per_step * flops, r["val_loss"]) for r in evals],
            **{k.removeprefix("val_"): v for k, v in evals[-1].items() if k.startswith("val_")})
        if heads:
            results[name].update(mtp.speculate(run.model, run.splits["val"].tokens, args.prompts,
                                               args.prompt_len, args.block_size - args.prompt_len))
    print_mtp_table(results, args)
    plot_mtp(results, args)
    return results


def print_mtp_table(results, args):
    heads = max(r["n"] for r in results.values())
    what = "training FLOPs" if args.equal == "flops" else "steps"
    print(f"\nnext-token vs multi-token prediction at equal {what}: batches of {args.batch_size} x "
          f"{args.block_size} characters; val = the first {args.eval_tokens:,} held-out characters; "
          f"speculative decoding from {args.prompts} val prompts of {args.prompt_len} characters")
    head = (f"{'variant':<14}{'n':>3}{'w':>6}{'steps':>7}{'TFLOP':>7}{'val loss':>10}{'val bpb':>9}"
            + "".join(f"{f'head{i}':>8}" for i in range(2, heads + 1))
            + f"{'accept':>8}{'tok/pass':>10}{'exact':>7}")
    print(head + "\n" + "-" * len(head))
    for name, r in results.items():
        cells = "".join(f"{r[f'head{i}_loss']:>8.4f}" if f"head{i}_loss" in r else f"{'-':>8}"
                        for i in range(2, heads + 1))
        spec = (f"{r['acceptance']:>8.1%}{r['tokens_per_pass']:>10.2f}{r['exact']:>7}"
                if "acceptance" in r else f"{'-':>8}{1:>10.2f}{'-':>7}")
        weight = f"{r['weight']:.2f}" if r["weight"] else "-"
        print(f"{name:<14}{r['n']:>3}{weight:>6}{r['steps']:>7}{r['train_flops'] / 1e12:>7.2f}"
              f"{r['loss']:>10.4f}{r['bpb']:>9.4f}{cells}{spec}")
    print("val loss / bpb: the next-token head alone (what inference uses); "
          "headi: its loss on the token i places ahead; accept: drafts kept; "
          "tok/pass: tokens per forward pass; exact: outputs equal to greedy decoding")


def plot_mtp(results, args):
    from common import pyplot

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    color = {name: f"C{i}" for i, name in enumerate(results)}  # a variant's colour in both panels
    for name, r in results.items():
        xs, ys = zip(*[(f / 1e12, v) for f, v in r["curve"] if f > 0])
        ax.plot(xs, ys, "o-", color=color[name], label=f"{name} ({r['steps']} steps)")
    ax.set(xlabel="training compute (TFLOP)", ylabel="next-token val loss (nats/char)",
           title=f"next-token loss at equal {'compute' if args.equal == 'flops' else 'steps'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    spec = {name: r for name, r in results.items() if "acceptance_at" in r}
    width = 0.8 / max(1, len(spec))
    for j, (name, r) in enumerate(spec.items()):
        at = r["acceptance_at"]
        bx.bar([i + 2 + (j - (len(spec) - 1) / 2) * width for i in range(len(at))], at, width,
               color=color[name],
               label=f"{name}: {r['acceptance']:.0%} kept, {r['tokens_per_pass']:.2f} tokens/pass")
    bx.set(xlabel="draft of the token i places ahead", ylabel="kept, when every earlier draft was",
           title="self-speculative decoding (greedy, exact)", ylim=(0, 1))
    bx.set_xticks(range(2, 2 + max([len(r["acceptance_at"]) for r in spec.values()], default=0)))
    bx.grid(alpha=0.3, axis="y")
    bx.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    fig.savefig(args.png, dpi=100)
    plt.close(fig)
    print(f"wrote {args.png}")


@command
def main(argv=None):
    p = Parser(description="The readings' experiments at toy scale (CPU), one subcommand each.")
    sub = p.add_subparsers(dest="command", required=True)
    continue_flags(sub.add_parser("continue", help="pretrain on Shakespeare, continue on Milton: "
                                                   "re-warm, replay, scratch"))
    m = sub.add_parser("mtp", help="next-token vs multi-token prediction at equal training compute")
    m.add_argument("--variants", default=",".join(MTP_VARIANTS),
                   help="comma-separated, from: " + ", ".join(MTP_VARIANTS))
    m.add_argument("--iters", type=int, default=1000,
                   help="the next-token run's steps; the others get equal compute")
    m.add_argument("--equal", default="flops",
                   help="flops (fewer steps for dearer MTP steps) | steps (the same steps)")
    m.add_argument("--block-size", type=int, default=64, help="training window (characters)")
    m.add_argument("--batch-size", type=int, default=32, help="windows per step")
    m.add_argument("--mtp-weight", type=float, default=0.0, help="w for every variant (default: "
                   "each paper's own: 1 for parallel heads, 0.3 / D for sequential modules)")
    m.add_argument("--evals", type=int, default=4, help="evaluations per run, besides the one at step 0")
    m.add_argument("--eval-tokens", type=int, default=65536,
                   help="held-out characters scored at each evaluation")
    m.add_argument("--prompts", type=int, default=8, help="val prompts for speculative decoding")
    m.add_argument("--prompt-len", type=int, default=16,
                   help="characters per prompt; generation fills the window")
    m.add_argument("--data", default="", help="corpus directory (default: the bundled Shakespeare)")
    m.add_argument("--seed", type=int, default=1337)
    m.add_argument("--out-dir", default=os.path.join("out", "mtp"), help="one run directory per variant here")
    m.add_argument("--cache-dir", default=os.path.join(HERE, "data", "cache"), help="train.py's token cache")
    m.add_argument("--png", default=os.path.join(ASSETS, "mtp_compare.png"), help="the figure")
    extrapolate_flags(sub.add_parser(
        "extrapolate", help="train one GPT per --pos, evaluate at 1x..8x the training length"))
    probe_flags(sub.add_parser("probe", help="cosine heatmap + linear probes of learned position "
                                             "embeddings vs the sinusoid"))
    views_flags(sub.add_parser("views", help="XLNet: which tokens each target may see, for one "
                                             "factorization order (text + PNG)"))
    two_phase_flags(sub.add_parser("two-phase", help="Transformer-XL's evaluation with memory vs "
                                                     "the vanilla sliding window"))
    args = p.parse_args(argv)
    if args.command == "mtp":
        try:
            return mtp_compare(args)
        except train.UsageError as e:
            print(f"experiments.py: error: {e}", file=sys.stderr)
            raise SystemExit(2)
    runners = {"continue": continue_pretraining, "extrapolate": extrapolate, "probe": probe,
               "views": views, "two-phase": run_two_phase}
    return runners[args.command](args)


if __name__ == "__main__":
    main()
