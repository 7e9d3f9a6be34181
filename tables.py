"""
The lecture's comparison tables in miniature: every row pretrained at equal compute on the same data, then
fine-tuned the same way, scored downstream, beside the figure the slide shows.

    python tables.py mae-lm                 # MAE-LM's Table 2 (Meng et al. 2024): what the encoder sees
    python tables.py unilm                  # GPT vs BERT vs UniLM (Dong et al. 2019, Table 5: GLUE)
    python tables.py electra | spanbert | roberta | albert | xlnet | t5-objectives | t5-rates | t5-architectures
    python tables.py mae-lm --max-time 1m   # equal wall time instead of equal FLOPs
    python tables.py mae-lm --quick         # 2 rows, 1 seed: does it run?
    python tables.py t5-architectures --rows denoising   # only the rows named so (here 5 of 10), and the baseline
    python tables.py t5-architectures --jobs 8 --train-args "--device cuda"   # a GPU, 8 runs at once: H200 2m30s

Each row: pretrain through train.py (its CLI, its checkpoint) for --flops training FLOPs (6 per weight
per token plus attention, each model's flops_per_token: the steps are chosen before the run, so every
row's FLOPs are equal to within half a step, and the result does not depend on how busy the machine
is), or for --max-time of wall clock (what a laptop user gets in that time); then fine-tune the
pretrained weights on --task with --examples labelled examples for --iters steps, exactly as
downstream.py does for every row; report the test accuracy at the lowest dev loss. --seeds seeds per
row (pretraining and fine-tuning both), mean and spread; a row whose mean is within the larger spread
of the first row's is marked a tie ("="). Nothing is tuned per row: every row gets its model's own
char-cpu preset and the same budget, task, steps and learning rates.
Each run's result is kept under --out-dir/runs, named by everything that decides it: a table stopped
halfway resumes where it stopped, and a row two tables share runs once (--fresh redoes them).
The slides' figures are GLUE averages of base-size models trained for days; ours are one small
task on characters after a minute. The question each table asks is the ranking, not the number.
Tests: tests/test_tables.py (--quick).
"""

import argparse
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from types import SimpleNamespace

import numpy as np
import torch

import downstream
import tasks
import train
from common import command, pyplot, require
from experiments import Parser, save

HERE = os.path.dirname(os.path.abspath(__file__))

# T5's two objectives of Table 2, spelt once: a row's run directory is named by its flags, so every table's row of
# one objective and architecture is the same run
T5_DENOISING = ["--objective", "replace-spans", "--noise-mask", "iid"]  # span corruption, i.i.d. noise (T5's baseline)
T5_LM = ["--objective", "prefix-lm", "--noise-density", "0.5"]  # the prefix LM objective: predict the text's rest

# name -> (title, what the slide's figure is, [(row as the slide names it, the slide's figure, --model, flags)])
TABLES = {
    "mae-lm": ("MAE-LM, Table 2 (Meng et al. 2024): ablations, GLUE average", "GLUE", [
        ("MAE-LM", 86.1, "maelm", []),
        ("enc. w. [MASK] (i.e., MLM)", 85.2, "maelm", ["--encoder-sees-mask", "--decoder-layers", "0"]),
        ("enc. w. [MASK] + dec.", 85.1, "maelm", ["--encoder-sees-mask"]),
        ("enc. w. [MASK], dec. resets [MASK]", 85.9, "maelm", ["--encoder-sees-mask", "--decoder-resets-mask"]),
        ("misaligned position encoding", 86.0, "maelm", ["--no-aligned-positions"]),
        ("shallower decoder (slide: 2 of 4 layers)", 85.8, "maelm", ["--decoder-layers", "1"]),
        ("deeper decoder (slide: 6 of 4 layers)", 84.8, "maelm", ["--decoder-layers", "3"]),
    ]),
    "unilm": ("UniLM v1 (Dong et al. 2019, Table 5): GLUE score, GPT vs BERT vs UniLM", "GLUE", [
        ("GPT", 72.8, "gpt", []),
        ("BERT", 80.5, "bert", []),
        ("UniLM", 80.8, "unilm", []),
    ]),
    "electra": ("ELECTRA (Clark et al. 2020, Table 1): Small models, GLUE dev", "GLUE", [
        ("BERT-Small (masked LM)", 75.1, "bert", ["--objective", "mlm"]),
        ("ELECTRA-Small", 79.9, "electra", []),
    ]),
    "spanbert": ("SpanBERT (Joshi et al. 2020, Table 2): MRQA, average F1", "F1", [
        ("Our BERT (pairs + NSP)", 78.6, "bert", []),
        ("Our BERT-1seq (no NSP)", 79.7, "bert", ["--objective", "mlm"]),
        ("SpanBERT (spans + SBO)", 81.5, "bert", ["--objective", "span", "--span-boundary"]),
    ]),
    # Table 1's dynamic row is Table 2's SEGMENT-PAIR (BERT's input, masks drawn afresh); static is BERT's own data,
    # 10 masked copies of each row. SENTENCE-PAIR (single sentences as segments) is left out: our lines are short.
    "roberta": ("RoBERTa (Liu et al. 2019, Tables 1-2): masking and input format, MNLI-m", "MNLI", [
        ("SEGMENT-PAIR (+ NSP), dynamic masking", 84.0, "bert", []),
        ("static masking (10 copies)", 84.3, "bert", ["--static-masks", "10"]),
        ("FULL-SENTENCES (no NSP)", 84.7, "bert", ["--objective", "mlm"]),
        ("DOC-SENTENCES (no NSP)", 84.7, "bert", ["--objective", "mlm", "--doc-sentences"]),
    ]),
    # The slide's parameter table (MNLI): base models of one shape, and ALBERT-xxlarge, wider (H = 4096) and shared,
    # above BERT-large with fewer parameters. Ours: the char-cpu BERT (H = 128, 4 layers); the last row shares one
    # layer of H = 256, about BERT's parameters (tested), and at equal FLOPs pays ~4x per token for it.
    "albert": ("ALBERT (Lan et al. 2020, Table 2): factorised embeddings, shared layers, BERT's parameters, MNLI",
               "MNLI", [
                   ("BERT-base", 84.5, "bert", ["--objective", "mlm"]),
                   ("factorised embeddings (E = 32)", None, "bert", ["--objective", "mlm", "--embedding-size", "32"]),
                   ("cross-layer sharing", None, "bert", ["--objective", "mlm", "--share-layers"]),
                   ("ALBERT-base (both + SOP)", 81.6, "bert", ["--objective", "sop", "--embedding-size", "32",
                                                               "--share-layers"]),
                   ("ALBERT wider, BERT's parameters (xxlarge)", 88.0, "bert", [
                       "--objective", "sop", "--embedding-size", "32", "--share-layers", "--hidden-size", "256",
                       "--intermediate-size", "1024"]),
               ]),
    "xlnet": ("XLNet vs BERT (RoBERTa's Table 2, base models), MNLI-m", "MNLI", [
        ("BERT-base", 84.3, "bert", []),
        ("XLNet-base", 85.8, "xlnet", []),
    ]),
    "t5-objectives": ("T5 (Raffel et al. 2020, Table 5): corruption types, i.i.d. noise, GLUE", "GLUE", [
        ("BERT-style", 82.96, "t5", ["--objective", "bert-style"]),
        ("MASS-style", 82.32, "t5", ["--objective", "mass-style"]),
        ("Replace corrupted spans", 83.28, "t5", T5_DENOISING),
        ("Drop corrupted tokens", 84.44, "t5", ["--objective", "drop-tokens"]),
    ]),
    # 15% is the default rate: that row keeps the objectives table's flags, so it is that row's runs, not a copy
    "t5-rates": ("T5 (Raffel et al. 2020, Table 6): corruption rates, GLUE", "GLUE", [
        (f"{rate}%", glue, "t5", [*T5_DENOISING, *(["--noise-density", str(rate / 100)] if rate != 15 else [])])
        for rate, glue in ((10, 82.82), (15, 83.28), (25, 83.00), (50, 81.27))
    ]),
    # The slide's ten rows: five architectures, each pretrained by denoising and by language modelling. The decoder-only
    # rows under denoising read T5's corrupted input then write its targets, in one stack (t5lm.py). Every row
    # fine-tunes on the first 128 characters of an example, as T5's rows all read 512 tokens: the encoder's
    # inputs_length, t5lm's (its classifier's cap) and GPT's block (its char-cpu preset's 64 would read half).
    "t5-architectures": ("T5 (Raffel et al. 2020, Table 2): architectures and objectives, GLUE", "GLUE", [
        ("Encoder-decoder, denoising", 83.28, "t5", T5_DENOISING),
        ("Enc-dec, shared, denoising", 82.81, "t5", [*T5_DENOISING, "--share-encoder-decoder"]),
        ("Enc-dec, half the layers, denoising", 80.88, "t5", [*T5_DENOISING, "--num-layers", "1"]),
        ("Language model, denoising", 74.70, "t5lm", ["--noise-mask", "iid"]),
        ("Prefix LM, denoising", 81.82, "t5lm", ["--noise-mask", "iid", "--prefix-lm"]),
        ("Encoder-decoder, LM (prefix)", 79.56, "t5", T5_LM),
        ("Enc-dec, shared, LM", 79.60, "t5", [*T5_LM, "--share-encoder-decoder"]),
        ("Enc-dec, half the layers, LM", 78.67, "t5", [*T5_LM, "--num-layers", "1"]),
        ("Language model, LM", 73.78, "gpt", ["--block-size", "128"]),
        ("Prefix LM, LM (one stack)", 79.68, "gpt", ["--block-size", "128", "--prefix-lm"]),
    ]),
}


# each model's flag for "no end-of-run demo": its output is not the table's
NO_DEMO = {"gpt": ["--sample-tokens", "0"], "llama": ["--sample-tokens", "0"], "bert": ["--top-k", "0"],
           "maelm": ["--top-k", "0"], "unilm": ["--top-k", "0", "--max-new-tokens", "0"],
           "electra": ["--flag-text", ""], "t5": ["--fill", ""], "xlnet": ["--demo-text", ""], "t5lm": ["--fill", ""]}


def pretrain(args, model, flags, seed, out_dir):
    """One pretraining run through train.py at the table's budget. -> (its ckpt.pt, steps, training FLOPs)."""
    common = ["--model", model, "--seed", str(seed), "--out-dir", out_dir, "--overwrite", *flags, *NO_DEMO[model],
              *shlex.split(args.train_args)]
    run = train.setup(common)  # the model and its tokens per step, to size and count the run; nothing trains
    per_step = run.model.flops_per_token() * run.tokens_per_step
    train.release_lock(run.lock)
    if args.flops:  # the step count that spends the budget: every row's FLOPs equal to within one step
        planned = max(1, round(args.flops / per_step))
        budget = ["--max-iters", str(planned), "--max-time", "0"]
    else:
        planned, budget = 1, ["--max-time", args.max_time, "--max-iters", "0"]
    rows = train.train([*common, *budget])
    steps = max(r["step"] for r in rows)
    not_stopped(steps, planned, out_dir)
    return os.path.join(out_dir, "ckpt.pt"), steps, per_step * steps


def fine_tune(args, model, ckpt, seed, out_dir, extra=()):
    """downstream.py's run, the same for every row. -> test accuracy at the lowest dev loss."""
    ns = SimpleNamespace(model=model, task=args.task, init_from=ckpt, iters=args.iters, evals=args.evals,
                         lr=args.lr, batch_size=args.batch_size, out_dir=out_dir, train_args=args.train_args)
    acc, _, rows = downstream.run_one(ns, f"finetune-seed{seed}", ["--train-examples", str(args.examples),
                                                                   "--seed", str(1337 + seed), *extra])
    not_stopped(max(r["step"] for r in rows), args.iters, out_dir)
    return acc


def not_stopped(steps, planned, out_dir):
    """Ctrl-C or SIGTERM ends a train.py run early, saved, and it returns: its result must not enter the table."""
    if steps < planned:
        print(f"tables.py: stopped in {out_dir} at step {steps} of {planned}; nothing of this run is kept. "
              "The same command resumes at this run: the finished ones are kept.", file=sys.stderr)
        raise SystemExit(130)


def run_row(args, model, flags, seed, random_init=False):
    """Pretrain and fine-tune one row for one seed, or read the result of the same run done before.
    A row is the same run wherever it appears (RoBERTa's first row is SpanBERT's first; T5's 15% row is in all three
    tables): its directory is named by everything that decides its result, so each such run is done once, and a
    table stopped halfway resumes at its first unfinished run. random_init: no pretraining, the same fine-tuning
    from a random initialisation of that row's model (the baseline every row must beat to have learned something).
    -> (test accuracy, pretraining steps, training FLOPs, seconds the run took or nan if not recorded)"""
    budget = {"flops": args.flops} if args.flops else {"max_time": args.max_time}
    decides = {"model": model, "flags": flags, "seed": seed, **budget, "train_args": args.train_args,
               **{k: getattr(args, k) for k in ("task", "examples", "iters", "evals", "lr", "batch_size")}}
    pretrained = run_dir(args, model, decides)
    if random_init:  # no budget decides it: one run per seed, whatever the table's budget
        decides = {**{k: v for k, v in decides.items() if k not in budget}, "random_init": True}
    out = run_dir(args, model, decides)
    done = os.path.join(out, "result.json")
    if os.path.exists(done) and not args.fresh:
        with open(done) as f:
            r = json.load(f)
        print(f"(done before: {done})", flush=True)
        return r["acc"], r["steps"], r["flops"], r.get("seconds", float("nan"))
    ckpt, t0 = os.path.join(pretrained, "pretrain", "ckpt.pt"), time.time()
    if random_init:  # the pretrained checkpoint only gives the architecture; --random-init redraws every weight
        require(os.path.exists(ckpt), f"{ckpt}: the row to re-initialise has not been pretrained")
        steps, flops = 0, 0.0
        acc = fine_tune(args, model, ckpt, seed, out, ["--random-init"])
    else:
        ckpt, steps, flops = pretrain(args, model, flags, 1337 + seed, os.path.dirname(ckpt))
        acc = fine_tune(args, model, ckpt, seed, out)
    seconds = round(time.time() - t0, 1)
    with open(done + ".tmp", "w") as f:  # written last and renamed: a killed run leaves no result behind
        json.dump({"acc": acc, "steps": steps, "flops": flops, "seconds": seconds, "run": decides}, f, indent=1)
    os.replace(done + ".tmp", done)
    return acc, steps, flops, seconds


def run_all(args, runs):
    """--jobs N: the same runs, N at once in worker processes, each writing its output to --out-dir/logs. One
    small model leaves a GPU mostly idle; a machine with many cores or a GPU does a table several times faster.
    The baselines start after the pretrained rows: they re-initialise the first row's checkpoint.
    runs: [(row, model, flags, seed, random_init)] -> {row: [run_row's result per seed]}"""
    done, ctx = {}, multiprocessing.get_context("spawn")  # spawn: a forked process cannot use CUDA
    threads = max(1, (os.cpu_count() or 1) // args.jobs)  # the cores shared out, not each worker taking them all
    pool = ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=torch.set_num_threads, initargs=(threads,))
    try:
        for phase in (False, True):
            todo = {pool.submit(run_logged, args, *run): run for run in runs if run[4] == phase}
            for future in as_completed(todo):
                name, _, _, seed, _ = todo[future]
                done[name, seed] = future.result()  # a run's error (or its stop: exit 130) ends the table here
                print(f"=== {name} (seed {seed}): {done[name, seed][0]:.1%} in {done[name, seed][3]:.0f} s",
                      flush=True)
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too: each saves and stops; none of them is kept
        print("tables.py: stopped; the finished runs are kept, the same command resumes", file=sys.stderr)
        raise SystemExit(130) from None
    finally:  # the runs not started yet are dropped; the running ones end before this returns
        pool.shutdown(cancel_futures=True)
    return {name: [done[name, s] for s in range(args.seeds)] for name in dict.fromkeys(r[0] for r in runs)}


def run_logged(args, name, model, flags, seed, random_init):
    """run_row in a worker process, its output in a file of its own (N runs' progress lines would interleave)."""
    os.makedirs(os.path.join(args.out_dir, "logs"), exist_ok=True)
    log = os.path.join(args.out_dir, "logs", f"{args.table}-{re.sub(r'[^A-Za-z0-9.]+', '-', name)}-seed{seed}.log")
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return run_row(args, model, flags, seed, random_init)


@functools.lru_cache
def baselines(task, examples):
    """tasks.baselines (a bag-of-words fit: ~20 s), once per process: --curve prints a table per budget."""
    return tasks.baselines(tasks.load_task(task), examples)


def run_dir(args, model, decides):
    key = hashlib.sha1(json.dumps(decides, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(args.out_dir, "runs", f"{model}-{key}-seed{decides['seed']}")


def table(args, plot=True):
    title, metric, rows = TABLES[args.table]
    # the baseline: the first row's model fine-tuned the same way from random weights. A row no better than it has
    # learned nothing from pretraining that this task can use.
    _, _, model, flags = rows[0]
    rows = rows[:2] if args.quick else [r for r in rows if picked(args.rows, r[0])]
    rows = [*rows, (f"no pretraining ({model}, random init)", None, model, flags)]
    runs = [(name, model, flags, seed, name == rows[-1][0]) for name, _, model, flags in rows
            for seed in range(args.seeds)]
    t0 = time.time()
    if args.jobs > 1:
        results = run_all(args, runs)
    else:  # one after another, in this process: the baselines last, after the first row's checkpoint exists
        results = {}
        for name, model, flags, seed, random_init in runs:
            print(f"=== {name} (seed {seed}) ===", flush=True)
            results.setdefault(name, []).append(run_row(args, model, flags, seed, random_init))
    budget = f"{args.flops:.2g} training FLOPs" if args.flops else f"{args.max_time} of pretraining"
    print(f"\n{title}\nours: {budget} per row, then {args.iters} fine-tuning steps on {args.examples:,} "
          f"examples of --task {args.task}; test accuracy, {args.seeds} seed(s), {time.time() - t0:.0f} s in all")
    took = [r[3] for runs in results.values() for r in runs]  # what the table costs from scratch, kept runs too
    untimed = sum(np.isnan(took))
    print(f"from scratch: {np.nansum(took) / 60:.1f} min of runs" + (f" and {untimed} untimed" if untimed else ""))
    print(f"{'row':<42} {metric:>6} {'ours':>15} {'':1} {'steps':>6} {'TFLOPs':>7}")
    first = None
    for name, slide, _, _ in rows:
        accs = [r[0] for r in results[name]]
        m, s = downstream.mean_std(accs)
        first = first or (m, s)
        tie = "=" if first != (m, s) and abs(m - first[0]) <= max(s, first[1]) else ""
        steps, flops = np.mean([r[1] for r in results[name]]), np.mean([r[2] for r in results[name]])
        shown = f"{slide:>6.1f}" if slide is not None else f"{'-':>6}"  # a row the slide has no figure for
        print(f"{name:<42} {shown} {m:>8.1%} ± {s:4.1%} {tie:1} {steps:>6.0f} {flops / 1e12:>7.1f}")
    base = baselines(args.task, args.examples)
    print(f"{'majority class':<42} {'':>6} {base['majority']:>8.1%}\n{'bag of words':<42} {'':>6} {base['bow']:>8.1%}")
    if plot:
        plot_table(args, rows, results, base, budget)
    return results


def picked(texts, name):
    """--rows: a row is run if its name contains one of the texts (any case); no texts: every row.
    picked(["denoising"], "Prefix LM, denoising") -> True"""
    return not texts or any(text.lower() in name.lower() for text in texts)


def plot_table(args, rows, results, base, budget):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r[0] for r in rows]
    stats = [downstream.mean_std([r[0] for r in results[n]]) for n in names]
    ax.errorbar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], fmt="o", capsize=3,
                label="ours (test accuracy)")
    ax.axhline(base["majority"], color="gray", lw=0.8, label="majority class")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=7)
    ax.set(ylabel=f"--task {args.task} test accuracy", title=f"{args.table}: {budget} per row")
    ax.legend(fontsize=8)
    fig.tight_layout()
    some = "_some-rows" if args.rows else ""  # a part of the table never overwrites the whole table's figure
    save(fig, args.png or os.path.join(HERE, "assets", f"table_{args.table}{some}.png"), plt)


def curve(args):
    """The table at each of --curve's budgets, and one plot: downstream accuracy against pretraining FLOPs per row
    (the ELECTRA paper's Fig. 1 question: which objective turns compute into a better encoder sooner)."""
    by_budget = {}
    for flops in args.curve:
        args.flops = flops
        by_budget[flops] = table(args, plot=False)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in by_budget[args.curve[0]]:
        stats = [downstream.mean_std([r[0] for r in by_budget[f][name]]) for f in args.curve]
        ax.errorbar(args.curve, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=name)
    base = baselines(args.task, args.examples)
    ax.axhline(base["majority"], color="gray", lw=0.8, label="majority class")
    ax.set(xscale="log", xlabel="pretraining FLOPs per row", ylabel=f"--task {args.task} test accuracy",
           title=f"{args.table}: downstream accuracy against pretraining compute ({args.seeds} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, args.png or os.path.join(HERE, "assets", f"table_{args.table}_curve.png"), plt)
    return by_budget


@command
def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=list(TABLES))
    # 1.5e13: 2 to 3 minutes of pretraining per row on 2 cores of a Zen 4 (a char BERT: 657 steps of 4,096 tokens)
    p.add_argument("--flops", type=float, default=1.5e13, help="training FLOPs per row (equal compute)")
    p.add_argument("--max-time", default="", help="instead: wall-clock pretraining per row, e.g. 1m (equal time)")
    p.add_argument("--curve", default="", help="several --flops budgets, e.g. 5e12,1.5e13,4.5e13: the table at each "
                                               "and a plot of accuracy against FLOPs")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--task", default="genre", choices=list(tasks.TASKS))
    # 10,000: path 12 measured pretraining help every family but T5 there (2 to 5 points on genre) and no family at
    # 1,000, where pretrained and random inits tie: a table at 1,000 compares noise. The cost is the same (200 steps).
    p.add_argument("--examples", type=int, default=10000, help="labelled examples to fine-tune on")
    p.add_argument("--iters", type=int, default=200, help="fine-tuning steps per row")
    p.add_argument("--evals", type=int, default=4, help="fine-tuning evaluations besides step 0")
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning peak learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes (a GPU or many cores; "
                                                       "2 cores gain nothing)")
    p.add_argument("--rows", nargs="+", default=[], metavar="TEXT",
                   help="only the rows whose name contains one of these texts (and the baseline), e.g. "
                        "--rows 'Language model' denoising")
    p.add_argument("--quick", action="store_true", help="the first 2 rows, 1 seed: a smoke run")
    p.add_argument("--out-dir", default=os.path.join("out", "tables"))
    p.add_argument("--fresh", action="store_true", help="redo runs whose results --out-dir already holds")
    p.add_argument("--png", default="", help="the figure (default: assets/table_<table>.png)")
    p.add_argument("--train-args", default="", help="more train.py flags for every run (pretraining and "
                                                    "fine-tuning), e.g. '--preset tiny --dtype fp32'")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = 1
    require(not (args.quick and args.rows), "--quick runs the first 2 rows: give it or --rows, not both")
    names = [name for name, _, _, _ in TABLES[args.table][2]]
    for text in args.rows:
        require(any(picked([text], n) for n in names),
                f"--rows {text!r}: no row of {args.table} is named so; its rows: {'; '.join(names)}")
    require(min(args.seeds, args.iters, args.examples, args.jobs) >= 1, "--seeds, --iters, --examples, --jobs: >= 1")
    if args.max_time:
        require(train.parse_duration(args.max_time) > 0, f"--max-time {args.max_time}: give a positive duration")
        args.flops = 0.0  # the wall-clock budget replaces the FLOPs one
    require(args.flops > 0 or args.max_time, "give a positive --flops or --max-time")
    if args.curve:
        try:
            args.curve = sorted({float(f) for f in args.curve.split(",")})
        except ValueError:
            args.curve = []
        require(args.curve and args.curve[0] > 0 and not args.max_time,
                "--curve: positive FLOPs budgets separated by commas, e.g. 5e12,1.5e13 (not with --max-time)")
        return curve(args)
    return table(args)


if __name__ == "__main__":
    main()
