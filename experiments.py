"""
The readings' experiments on continued pretraining and multi-token prediction, at toy scale, one command each.

    python experiments.py continue            # pretrain on Shakespeare, continue on Milton: re-warm, replay, scratch
    python experiments.py continue --quick    # a 1-minute smoke run of the same grid
    python experiments.py mtp                 # next-token vs multi-token prediction at equal compute

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

`mtp` (Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction"; DeepSeek-V3 §2.2;
the slides "Multi-token prediction"): trains gpt.py with 0, 1 or 3 extra heads, parallel or sequential, at equal
training FLOPs, and reports next-token val loss, bits per byte, each head's loss and self-speculative decoding.
"""

import argparse
import os
import shlex
import sys
import time

import numpy as np
import torch

import gpt
import train

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")


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


# ----------------------------------------------------------------------------------------------------------------------
# Multi-token prediction: does predicting more than one token help? `python experiments.py mtp` trains next-token
# prediction and multi-token prediction (mtp.py's heads on gpt.py) at equal training compute with train.py, on the
# bundled Shakespeare, and compares them.

MTP_VARIANTS = {  # name -> (mtp, mtp_heads); the number in the name is n, the tokens predicted at each position
    "next-token": ("parallel", 0),
    "parallel-2": ("parallel", 1), "parallel-4": ("parallel", 3),  # Gloeckle et al.'s heads
    "sequential-2": ("sequential", 1), "sequential-4": ("sequential", 3),  # DeepSeek-V3's modules (it uses n = 2)
}
DEEPSEEK_LAMBDA = 0.3  # DeepSeek-V3's MTP loss weight for its first 10T tokens (§4.2), 0.1 after


def mtp_weight_of(mtp, mtp_heads, override=0.0):
    """Each paper's own weight w of an extra head's loss: Gloeckle et al. sum all heads (w = 1); DeepSeek-V3 scales the
    mean of its D depths by lambda (eq. 25): w = lambda / D. mtp_weight_of("sequential", 3) -> 0.1"""
    if override:
        return override
    return 1.0 if mtp == "parallel" else DEEPSEEK_LAMBDA / mtp_heads


def mtp_compare(args):
    """Train each variant with train.py (in-process, its flags spelled out), then report next-token val loss and bits
    per byte, each head's val loss, and how many drafts self-speculative decoding keeps. Returns {variant: results}.

    Equal compute (--equal flops, the default): every run has the same model, batch and schedule shape, and the same
    training FLOPs. MTP's extra heads make its steps dearer (flops_per_token counts them), so a variant trains
    iters * F_next / F_variant steps: fewer tokens, the same compute. What inference costs is equal anyway: the
    next-token path is the same L-block GPT. --equal steps gives every run the same steps and tokens instead, as in
    DeepSeek-V3's ablation (§4.5.1), where MTP costs more training compute.
    """
    import mtp  # train.py's "gpt": GPT-2 plus the heads, and self-speculative decoding
    from common import require

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in MTP_VARIANTS]
    require(variants and not unknown,
            f"--variants: unknown {','.join(unknown) or '(none)'}; choose from {','.join(MTP_VARIANTS)}")
    require(args.equal in ("flops", "steps"), f"--equal {args.equal!r}: choose flops or steps")
    require(min(args.iters, args.batch_size, args.prompt_len, args.evals) >= 1 and args.block_size >= 2,
            "--iters, --batch-size, --prompt-len, --evals must be >= 1 and --block-size >= 2")
    require(args.prompt_len < args.block_size,
            f"--prompt-len {args.prompt_len} leaves no room to generate in --block-size {args.block_size}")
    variants = ["next-token"] + [v for v in variants if v != "next-token"]  # the baseline first: it fixes the budget
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
        argv = ["--model", "gpt", "--preset", "char-cpu", "--n-layer", "4", "--n-head", "4", "--n-embd", "128",
                "--dropout", "0", "--bias", "--attn", "naive", "--pos", "learned", "--dtype", "auto", "--tokenizer",
                "char", "--block-size", str(args.block_size), "--batch-size", str(args.batch_size), "--grad-accum", "1",
                "--max-iters", str(steps), "--eval-interval", str(max(1, steps // args.evals)),
                "--warmup-iters", str(max(1, steps // 10)), "--lr", "3e-3", "--min-lr", "3e-4", "--schedule", "cosine",
                "--weight-decay", "0.1", "--beta2", "0.99", "--eval-tokens", str(args.eval_tokens),
                "--eval-train-tokens", str(min(4096, args.eval_tokens)), "--log-interval", str(max(1, steps // 4)),
                "--seed", str(args.seed),
                "--out-dir", out_dir, "--overwrite", "--sample-tokens", "0", "--cache-dir", args.cache_dir,
                "--mtp", kind, "--mtp-heads", str(heads), "--mtp-weight", str(weight or 1.0)]
        if args.data:
            argv += ["--data", args.data]
        rows = train.train(argv)
        run = train.open_run(os.path.join(out_dir, "ckpt.pt"))
        flops = run.model.flops_per_token()
        flops_next = flops_next or flops
        tokens_per_step = args.batch_size * args.block_size
        evals = [r for r in rows if r["kind"] == "eval"]
        results[name] = dict(config=vars(run.model.config).copy(), n=1 + heads, weight=weight, steps=steps,
                             train_flops=steps * tokens_per_step * flops,
                             curve=[(r["step"] * tokens_per_step * flops, r["val_loss"]) for r in evals],
                             **{k.removeprefix("val_"): v for k, v in evals[-1].items() if k.startswith("val_")})
        if heads:
            results[name].update(mtp.speculate(run.model, run.splits["val"].tokens, args.prompts, args.prompt_len,
                                               args.block_size - args.prompt_len))
    print_mtp_table(results, args)
    plot_mtp(results, args)
    return results


def print_mtp_table(results, args):
    heads = max(r["n"] for r in results.values())
    what = "training FLOPs" if args.equal == "flops" else "steps"
    print(f"\nnext-token vs multi-token prediction at equal {what}: batches of {args.batch_size} x {args.block_size} "
          f"characters; val = the first {args.eval_tokens:,} held-out characters; speculative decoding from "
          f"{args.prompts} val prompts of {args.prompt_len} characters")
    head = (f"{'variant':<14}{'n':>3}{'w':>6}{'steps':>7}{'TFLOP':>7}{'val loss':>10}{'val bpb':>9}"
            + "".join(f"{f'head{i}':>8}" for i in range(2, heads + 1)) + f"{'accept':>8}{'tok/pass':>10}{'exact':>7}")
    print(head + "\n" + "-" * len(head))
    for name, r in results.items():
        cells = "".join(f"{r[f'head{i}_loss']:>8.4f}" if f"head{i}_loss" in r else f"{'-':>8}"
                        for i in range(2, heads + 1))
        spec = f"{r['acceptance']:>8.1%}{r['tokens_per_pass']:>10.2f}{r['exact']:>7}" if "acceptance" in r else \
            f"{'-':>8}{1:>10.2f}{'-':>7}"
        weight = f"{r['weight']:.2f}" if r["weight"] else "-"
        print(f"{name:<14}{r['n']:>3}{weight:>6}{r['steps']:>7}{r['train_flops'] / 1e12:>7.2f}"
              f"{r['loss']:>10.4f}{r['bpb']:>9.4f}{cells}{spec}")
    print("val loss / bpb: the next-token head alone (what inference uses); headi: its loss on the token i places "
          "ahead; accept: drafts kept; tok/pass: tokens per forward pass; exact: outputs equal to greedy decoding")


def plot_mtp(results, args):
    from common import pyplot

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    color = {name: f"C{i}" for i, name in enumerate(results)}  # one colour per variant in both panels
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
        bx.bar([i + 2 + (j - (len(spec) - 1) / 2) * width for i in range(len(at))], at, width, color=color[name],
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
    m = sub.add_parser("mtp", help="next-token vs multi-token prediction at equal training compute")
    m.add_argument("--variants", default=",".join(MTP_VARIANTS),
                   help="comma-separated, from: " + ", ".join(MTP_VARIANTS))
    m.add_argument("--iters", type=int, default=1000, help="the next-token run's steps; the others get equal compute")
    m.add_argument("--equal", default="flops", help="flops (fewer steps for dearer MTP steps) | steps (the same steps)")
    m.add_argument("--block-size", type=int, default=64, help="training window (characters)")
    m.add_argument("--batch-size", type=int, default=32, help="windows per step")
    m.add_argument("--mtp-weight", type=float, default=0.0, help="w for every variant (default: each paper's own: "
                   "1 for parallel heads, 0.3 / D for sequential modules)")
    m.add_argument("--evals", type=int, default=4, help="evaluations per run, besides the one at step 0")
    m.add_argument("--eval-tokens", type=int, default=65536, help="held-out characters scored at each evaluation")
    m.add_argument("--prompts", type=int, default=8, help="val prompts for speculative decoding")
    m.add_argument("--prompt-len", type=int, default=16, help="characters per prompt; generation fills the window")
    m.add_argument("--data", default="", help="corpus directory (default: the bundled Shakespeare)")
    m.add_argument("--seed", type=int, default=1337)
    m.add_argument("--out-dir", default=os.path.join("out", "mtp"), help="one run directory per variant here")
    m.add_argument("--cache-dir", default=os.path.join(HERE, "data", "cache"), help="train.py's token cache")
    m.add_argument("--png", default=os.path.join(ASSETS, "mtp_compare.png"), help="the figure")
    args = p.parse_args(argv)
    if args.command == "mtp":
        try:
            return mtp_compare(args)
        except train.UsageError as e:
            print(f"experiments.py: error: {e}", file=sys.stderr)
            raise SystemExit(2)
    if args.quick:
        args.pre_iters, args.cont_iters, args.eval_tokens = 60, 30, 4096
    if min(args.pre_iters, args.cont_iters) < 10 or not args.rewarm_lrs or not all(0 < r < 1 for r in args.replay):
        p.error("--pre-iters and --cont-iters must be >= 10, --rewarm-lrs non-empty, --replay shares in (0, 1)")
    try:
        return continue_pretraining(args)
    except train.UsageError as e:
        print(f"experiments.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
