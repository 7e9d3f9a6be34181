"""
The readings' experiments on continued pretraining, at toy scale, one command each.

    python experiments.py continue            # pretrain on Shakespeare, continue on Milton: re-warm, replay, scratch
    python experiments.py continue --quick    # a 1-minute smoke run of the same grid

Papers
  - Gupta et al. 2023, "Continual Pre-Training of Large Language Models: How to (re)warm your model?" §3-4: re-warming
    the learning rate on new data first raises the loss on both the old and the new data, then helps on the new one;
    the higher the new peak lr, the better the adaptation and the more the forgetting.
  - Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train Large Language Models" §5-7:
    re-warm + re-decay, and replaying a small share of the old data (they find ~5% often enough) prevents most of the
    forgetting at little cost to the new data; "infinite" schedules (constant, then a cooldown) avoid re-warming.
  - Parmar et al. 2024, "Reuse, Don't Retrain": continuing a trained model beats training from scratch at equal compute.
  Slides (lecture 001): "Pretraining language models" (data and domain); handbook reading: domain adaptation.

What `continue` runs, each through train.py in-process (its CLI, its checkpoints, under out/experiments/continue):
  1. pretrain: a char GPT on Shakespeare, Milton evaluated all along but never trained on (weight 0), so one alphabet
     covers both and the plot shows Milton's loss before the switch;
  2. from that checkpoint (--init-from: weights only; fresh optimizer and schedule), --cont-iters steps on Milton:
     no re-warm (constant at the pretraining's final lr), re-warm to each --rewarm-lrs peak (warm-up then cosine to
     the floor), and each --replay share of Shakespeare at the largest re-warm peak;
  3. scratch: the same model trained on Milton alone from random weights for pretrain + continue steps (equal compute).
It prints a table of final val losses on both corpora (bits per byte too) and writes assets/continue_pretraining.png:
Shakespeare (upstream: forgetting) and Milton (downstream: adaptation) val loss against total steps.
"""

import argparse
import os
import shlex
import time

import train

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def _run(args, name, data, extra):
    """One train.py run; returns its metric rows."""
    # Every setting that shapes the result is spelled out, so the figures do not move when a preset is retuned.
    argv = ["--model", "gpt", "--preset", "char-cpu", "--n-layer", "4", "--n-head", "4", "--n-embd", "128",
            "--block-size", "64", "--batch-size", "32", "--dropout", "0", "--bias", "--attn", "sdpa", "--pos", "learned",
            "--weight-decay", "0.1", "--beta1", "0.9", "--beta2", "0.99", "--grad-clip", "1.0", "--schedule", "cosine",
            "--grad-accum", "1", "--tokenizer", "char", "--data", data,
            "--eval-tokens", str(args.eval_tokens), "--eval-train-tokens", "4096", "--min-lr", str(args.min_lr),
            "--sample-tokens", "0", "--out-dir", os.path.join(args.out_dir, name), "--overwrite", "--seed",
            str(args.seed), "--cache-dir", args.cache_dir, "--log-interval", "100", *extra]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    argv += shlex.split(args.train_args)  # last, so they win
    print(f"=== {name} ===", flush=True)
    return train.train(argv)


def continue_pretraining(args):
    up, down = args.upstream, args.downstream
    t0 = time.time()
    every = str(max(1, args.cont_iters // args.evals))
    names = {up: os.path.basename(os.path.normpath(up)), down: os.path.basename(os.path.normpath(down))}
    pre = _run(args, "pretrain", f"{up}:1,{down}:0",
               ["--max-iters", str(args.pre_iters), "--lr", str(args.lr), "--warmup-iters", str(args.pre_iters // 10),
                "--eval-interval", str(max(1, args.pre_iters // args.evals))])
    ckpt = os.path.join(args.out_dir, "pretrain", "ckpt.pt")
    cont = ["--init-from", ckpt, "--max-iters", str(args.cont_iters), "--eval-interval", every]
    warm = str(max(1, args.cont_iters // 10))
    runs = {"no re-warm": _run(args, "no-rewarm", f"{down}:1,{up}:0",
                               [*cont, "--schedule", "constant", "--lr", str(args.min_lr), "--warmup-iters", "0"])}
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
    print(f"\nval loss (nats/char) and bits per byte, final evaluation of each run ({seconds / 60:.1f} min in all)")
    head = f"{'run':<28}{up + ' (upstream)':>24}{down + ' (downstream)':>26}"
    print(head + "\n" + "-" * len(head))
    line = lambda name, r: print(f"{name:<28}{r[f'val_{up}_loss']:>12.4f} ({r[f'val_{up}_bpb']:.3f} bpb)"
                                 f"{r[f'val_{down}_loss']:>14.4f} ({r[f'val_{down}_bpb']:.3f} bpb)")
    line("pretrained (start)", p)
    for name, rows in runs.items():
        line(name, _final(rows))
    line("scratch on milton (equal)", _final(scratch))
    print("upstream rising = forgetting; downstream falling = adaptation. 'equal': the scratch run has the steps of "
          "pretraining + continuing.")


def _plot(pre, runs, scratch, up, down, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    offset = args.pre_iters
    for ax, corpus, title in ((axes[0], up, "upstream: forgetting"), (axes[1], down, "downstream: adaptation")):
        ev = [r for r in pre if r["kind"] == "eval"]
        ax.plot([r["step"] for r in ev], [r[f"val_{corpus}_loss"] for r in ev], "k-", lw=2, label="pretrain")
        for i, (name, rows) in enumerate(runs.items()):
            ev = [r for r in rows if r["kind"] == "eval"]
            ax.plot([offset + r["step"] for r in ev], [r[f"val_{corpus}_loss"] for r in ev], "o-", ms=3,
                    color=f"C{i}", label=name)
        ev = [r for r in scratch if r["kind"] == "eval"]
        ax.plot([r["step"] for r in ev], [r[f"val_{corpus}_loss"] for r in ev], "--", color="gray",
                label=f"scratch on {down}")
        ax.axvline(offset, color="gray", lw=0.8, ls=":")
        ax.set(xlabel="total steps (pretrain, then continue)", ylabel=f"{corpus} val loss (nats/char)",
               title=f"{corpus}: {title}")
        ax.grid(alpha=0.3)
        ax.set_xlim(offset * 0.5, offset + args.cont_iters * 1.02)
        shown = [r[f"val_{corpus}_loss"] for rows in [pre, scratch, *runs.values()] for r in rows
                 if r["kind"] == "eval" and r["step"] + (offset if rows is not pre and rows is not scratch else 0)
                 >= offset * 0.5]
        ax.set_ylim(min(shown) - 0.02, max(shown) + 0.02)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"continued pretraining, char GPT 4x128: {args.pre_iters} steps on {up}, then {args.cont_iters} on "
                 f"{down}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    fig.savefig(args.png, dpi=100)
    plt.close(fig)
    print(f"wrote {args.png}")


def main(argv=None):
    p = argparse.ArgumentParser(description="The readings' experiments on continued pretraining (toy scale, CPU).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("continue", help="pretrain on Shakespeare, continue on Milton: re-warm, replay, scratch")
    c.add_argument("--upstream", default="shakespeare", help="the corpus pretrained on (bundled name or directory)")
    c.add_argument("--downstream", default="milton", help="the corpus continued on (bundled name or directory)")
    c.add_argument("--pre-iters", type=int, default=1500, help="pretraining steps on Shakespeare")
    c.add_argument("--cont-iters", type=int, default=500, help="continued-pretraining steps on Milton")
    c.add_argument("--lr", type=float, default=3e-3, help="pretraining (and scratch) peak lr")
    c.add_argument("--min-lr", type=float, default=3e-4, help="every schedule's floor; 'no re-warm' continues at it")
    c.add_argument("--rewarm-lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-3, 3e-3],
                   help="peaks to re-warm to (comma-separated)")
    c.add_argument("--replay", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.25],
                   help="shares of Shakespeare replayed, at the largest re-warm peak (comma-separated)")
    c.add_argument("--eval-tokens", type=int, default=32768, help="val characters scored per corpus at each eval")
    c.add_argument("--evals", type=int, default=8, help="evaluations per run (the points of each curve)")
    c.add_argument("--dtype", default="", help="override the precision (default: auto)")
    c.add_argument("--train-args", default="", help="more train.py flags for every run, e.g. \"--n-layer 2\"")
    c.add_argument("--seed", type=int, default=1337)
    c.add_argument("--quick", action="store_true", help="a smoke run: 60 + 30 steps, 4K eval tokens")
    c.add_argument("--out-dir", default=os.path.join("out", "experiments", "continue"))
    c.add_argument("--cache-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cache"))
    c.add_argument("--png", default=os.path.join(ASSETS, "continue_pretraining.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.pre_iters, args.cont_iters, args.eval_tokens = 60, 30, 4096
    if min(args.pre_iters, args.cont_iters) < 10 or not args.rewarm_lrs or not all(0 < r < 1 for r in args.replay):
        p.error("--pre-iters and --cont-iters must be >= 10, --rewarm-lrs non-empty, --replay shares in (0, 1)")
    try:
        return continue_pretraining(args)
    except train.UsageError as e:
        raise SystemExit(f"experiments.py: error: {e}")


if __name__ == "__main__":
    main()
