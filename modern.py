"""
What changed since GPT-2, measured: GPT-2 -> Llama -> the 2024-2026 additions, one change per row.

    python modern.py                      # 7 rows x 3 seeds, 600 steps each, on the bundled plays
    python modern.py --max-time 4m        # every row the same wall time instead of the same steps
    python modern.py --quick              # 3 rows x 1 seed x 20 steps: does it run?

Each row adds one change to the row above (the order: cheapest to explain first, the optimizer last, as
it changes no architecture), trains through train.py with the same data, seed and batches, and is
scored on the held-out plays in bits per byte (lower is better):
  GPT-2               gpt.py as released (learned positions, LayerNorm, GELU MLP, biases, tied head)
  + no biases         Llama, PaLM: biases removed from every Linear and LayerNorm (--no-bias)
  + RoPE              rotary positions instead of the learned table (--pos rope; positions.py)
  + RMSNorm, SwiGLU   llama.py with a tied head: the Llama block (Touvron et al. 2023 §2.2)
  + untied head       llama.py as Llama: lm_head its own matrix
  + QK-norm           RMSNorm on queries and keys (OLMo 2, Qwen3): --qk-norm
  + Muon              torch.optim.Muon on the hidden matrices (--optimizer muon; train.py)
Same steps (default): the same tokens in every row; ms/step says what each change costs. Same wall
time (--max-time): what a laptop user gets in that time. Mean and spread over --seeds; a difference
smaller than the spread is a tie. -> a table, and assets/modern_ablation.png
Tests: tests/test_llama.py (a --quick run).
"""

import argparse
import os
import shlex
import time

import numpy as np

import train
from common import command, pyplot, require
from downstream import parameters_in
from experiments import Parser, save

HERE = os.path.dirname(os.path.abspath(__file__))

ROWS = [  # (name, --model, flags): each row is the one above plus one change
    ("GPT-2", "gpt", []),
    ("+ no biases", "gpt", ["--no-bias"]),
    ("+ RoPE", "gpt", ["--no-bias", "--pos", "rope"]),
    ("+ RMSNorm, SwiGLU", "llama", ["--tie-word-embeddings"]),
    ("+ untied head", "llama", []),
    ("+ QK-norm", "llama", ["--qk-norm"]),
    ("+ Muon", "llama", ["--qk-norm", "--optimizer", "muon"]),
]


def run_row(args, model, flags, seed, out_dir):
    """One training run; (val bits per byte at the end, ms per step, parameters)."""
    budget = ["--max-time", args.max_time, "--max-iters", "0"] if args.max_time else ["--max-iters", str(args.iters)]
    argv = ["--model", model, *budget, "--seed", str(seed), "--out-dir", out_dir, "--overwrite",
            "--sample-tokens", "0", "--eval-interval", str(args.eval_interval), *flags, *shlex.split(args.train_args)]
    rows = train.train(argv)
    last = [r for r in rows if r["kind"] == "eval"][-1]
    ms = [r["ms"] for r in rows if r["kind"] == "train"]
    n = parameters_in(train.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model"])
    return last["val_bpb"], float(np.median(ms)), n, last["step"]


def ablation(args):
    t0, rows = time.time(), [ROWS[0], ROWS[3], ROWS[6]] if args.quick else ROWS
    results = {}
    for name, model, flags in rows:
        for seed in range(args.seeds):
            print(f"=== {name} (seed {seed}) ===", flush=True)
            out = os.path.join(args.out_dir, f"row{len(results)}-seed{seed}")
            results.setdefault(name, []).append(run_row(args, model, flags, 1337 + seed, out))
    budget = f"{args.max_time} each" if args.max_time else f"{args.iters} steps each"
    print(f"\nval bits per byte on the held-out plays, {budget}, {args.seeds} seed(s), {time.time() - t0:.0f} s in all")
    print(f"{'row':<20} {'val bpb':>15} {'steps':>6} {'ms/step':>8} {'parameters':>11}")
    for name, runs in results.items():
        bpb = [r[0] for r in runs]
        s = float(np.std(bpb, ddof=1)) if len(bpb) > 1 else 0.0
        print(f"{name:<20} {np.mean(bpb):>8.3f} ± {s:.3f} {runs[0][3]:>6} {np.mean([r[1] for r in runs]):>8.1f} "
              f"{runs[0][2]:>11,}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results)
    means = [np.mean([r[0] for r in results[n]]) for n in names]
    spreads = [np.std([r[0] for r in results[n]], ddof=1) if args.seeds > 1 else 0 for n in names]
    ax.errorbar(range(len(names)), means, yerr=spreads, fmt="o-", capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set(ylabel="val bits per byte (held-out plays)", title=f"GPT-2 -> a modern decoder, {budget}")
    fig.tight_layout()
    save(fig, args.png, plt)
    return results


@command
def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=600, help="optimizer steps per run (the same tokens in every row)")
    p.add_argument("--max-time", default="", help="instead: the same wall time per run, e.g. 4m")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-interval", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="GPT-2, Llama, + Muon; 1 seed, 20 steps: a smoke run")
    p.add_argument("--out-dir", default=os.path.join("out", "modern"))
    p.add_argument("--png", default=os.path.join(HERE, "assets", "modern_ablation.png"))
    p.add_argument("--train-args", default="", help="more train.py flags for every run, e.g. '--dtype fp32'")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.seeds, args.max_time, args.eval_interval = 20, 1, "", 10
    require(args.iters >= 1 and args.seeds >= 1, "--iters and --seeds must be >= 1")
    return ablation(args)


if __name__ == "__main__":
    main()
