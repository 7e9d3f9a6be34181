"""
What pretraining is for, measured: fine-tune a pretrained model on a task of tasks.py and compare.

    python downstream.py helps --model gpt --init-from out/gpt/ckpt.pt     # pretrained vs random init
    python downstream.py peft --model bert --init-from out/bert/ckpt.pt    # full vs LoRA / adapters / prompt

  helps   for each labelled-set size (--sizes), fine-tune from the checkpoint and from a random init of
          the same architecture (--random-init), same steps, same batches, --seeds seeds each: test
          accuracy (mean and spread) against labelled examples, beside the majority class and a
          bag-of-words logistic regression -> assets/downstream_helps_<model>_<task>.png
          (the handbook's "does pretraining indeed help?", most of all with few labels). For a
          left-to-right LM, also the pretrained model prompted with --shots k labelled examples and
          trained on none (GPT-3's k-shot; finetune.Completion scores each label's word).
  peft    full fine-tuning, LoRA at each --ranks, adapters and a trained prompt, on --size examples:
          accuracy, trained parameters (the slide's #Param column), ms per step, and the memory the
          trained weights need besides the model (gradient + AdamW's two moments: 12 bytes each in fp32)
          -> assets/downstream_peft_<model>_<task>.png
Every run goes through train.py in-process, under --out-dir. The accuracy reported is on the test
plays at the evaluation best.pt keeps (lowest dev loss): the test set never chooses anything.
Tests: tests/test_finetune.py (tiny settings).
"""

import argparse
import os
import shlex
import time

import numpy as np
import torch

import finetune
import tasks
import train
from common import command, pyplot, require
from experiments import Parser, save

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")


def run_one(args, name, extra):
    """One fine-tuning run; (test accuracy at the lowest dev loss, ms per step, its rows)."""
    argv = ["--model", args.model, "--task", args.task, "--init-from", args.init_from,
            "--max-iters", str(args.iters), "--eval-interval", str(max(1, args.iters // args.evals)),
            "--warmup-iters", str(max(1, args.iters // 10)), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
            "--batch-size", str(args.batch_size), "--eval-tokens", "0", "--log-interval", str(max(1, args.iters // 10)),
            "--out-dir", os.path.join(args.out_dir, name), "--overwrite",
            # a few labelled examples overfit: the dev loss climbs while training's falls. That is no divergence;
            # the evaluation best.pt keeps (lowest dev loss) is the one reported.
            "--divergence-evals", "0", *extra, *shlex.split(args.train_args)]
    print(f"=== {name} ===", flush=True)
    rows = train.train(argv)
    evals = [r for r in rows if r["kind"] == "eval"]
    best = min(evals, key=lambda r: (r["val_loss"], r["step"]))
    ms = [r["ms"] for r in rows if r["kind"] == "train"]
    return best["test_acc"], float(np.mean(ms)) if ms else float("nan"), rows


def few_shot(model, tokenizer, task, family, test, k, seed=0):
    """GPT-3's few-shot prompting (Brown et al. 2020, §2; zero-shot when k = 0): k training examples
    with their answers, then the test example; the label whose word the model finds most likely
    (finetune.Completion), no gradient. -> (test accuracy or None, a line saying what was done):
    None when the demonstrations leave no room for the example in the model's context."""
    pool = task.train_set(None)  # k demonstrations: balanced, drawn per seed, the same for every test example
    picks = np.random.default_rng(seed).permutation(len(pool))
    demos, per_label = [], max(1, -(-k // len(task.labels)))
    for i in picks:
        if len(demos) == k:
            break
        if sum(d.label == pool[i].label for d in demos) < per_label:
            demos.append(pool[i])
    enc = lambda text: tokenizer.encode(text) if text else None
    shots = [(enc(d.a), enc(d.b), d.label) for d in demos]
    c = finetune.Completion(model, task.name, task.labels, tokenizer, family, shots)
    objective = finetune.TaskObjective(c, c.max_len, tokenizer.specials[family.PAD])
    room, T = objective.room[task.pair], model.config.block_size
    if room < 2:
        return None, f"{k}-shot: the demonstrations take {len(c.prompt_ids)} of the model's {T} positions: no room"
    correct = 0
    with torch.no_grad():
        for batch in objective.eval_batches(test, 64):
            _, pred = c(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["labels"])
            correct += int((pred == batch["labels"]).sum())
    return correct / len(test), f"{k}-shot: {len(c.prompt_ids)} prompt tokens leave {room} of {T} for the example"


def mean_std(xs):
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def helps(args):
    t0, task = time.time(), tasks.load_task(args.task)
    results = {}  # (size, "pretrained" | "random") -> [accuracy per seed]
    for n in args.sizes:
        for seed in range(args.seeds):
            for init, extra in (("pretrained", []), ("random", ["--random-init"])):
                acc, _, _ = run_one(args, f"{init}-{n}-seed{seed}",
                                    ["--train-examples", str(n), "--seed", str(1337 + seed), *extra])
                results.setdefault((n, init), []).append(acc)
    base = {n: tasks.baselines(task, n) for n in args.sizes}
    shots = {}  # k -> ([accuracy per seed], what the prompt left); a left-to-right LM only
    family = train.model_module(args.model).Classifier
    if getattr(family, "CAUSAL_LM", False) and args.shots:
        model, tokenizer, _ = train.load_for_inference(args.init_from, flag="--init-from", model=args.model)
        test = finetune.tokenize(task, tokenizer)["test"]
        for k in args.shots:
            runs = [few_shot(model, tokenizer, task, family, test, k, seed) for seed in range(args.seeds)]
            shots[k] = ([a for a, _ in runs if a is not None], runs[0][1])
    print(f"\n{args.model} on {args.task}: test accuracy ({len(task.test)} examples from "
          f"{', '.join(tasks.TEST_WORKS)}), {args.iters} steps per run, {args.seeds} seed(s), "
          f"{time.time() - t0:.0f} s in all")
    print(f"{'labelled':>9}  {'pretrained':>15}  {'random init':>15}  {'majority':>8}  {'bag of words':>12}")
    for n in args.sizes:
        (pm, ps), (rm, rs) = mean_std(results[(n, "pretrained")]), mean_std(results[(n, "random")])
        print(f"{n:>9,}  {pm:>8.1%} ± {ps:4.1%}  {rm:>8.1%} ± {rs:4.1%}  {base[n]['majority']:>8.1%}  "
              f"{base[n]['bow']:>12.1%}")
    for k, (accs, line) in shots.items():  # no labelled example trained: GPT-3's prompting
        m, s = mean_std(accs) if accs else (None, None)
        print(f"{'no gradient':>9}  " + (f"{m:>8.1%} ± {s:4.1%}" if accs else f"{'-':>15}") + f"  ({line})")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for init, style in (("pretrained", "o-"), ("random", "s--")):
        stats = [mean_std(results[(n, init)]) for n in args.sizes]
        ax.errorbar(args.sizes, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style, capsize=3,
                    label=f"{args.model}, {'pretrained' if init == 'pretrained' else 'random init'}")
    ax.plot(args.sizes, [base[n]["bow"] for n in args.sizes], ":", label="bag-of-words logistic regression")
    ax.axhline(base[args.sizes[0]]["majority"], color="gray", lw=0.8, label="majority class")
    for (k, (accs, _)), color in zip(shots.items(), ("tab:green", "tab:red", "tab:purple")):
        if accs:
            ax.axhline(np.mean(accs), color=color, ls="-.", lw=1, label=f"{k}-shot prompt, no training")
    ax.set(xscale="log", xlabel="labelled training examples", ylabel="test accuracy",
           title=f"Does pretraining help? {args.model}, --task {args.task}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, args.png or os.path.join(ASSETS, f"downstream_helps_{args.model}_{args.task}.png"), plt)
    return results, base, shots


def peft(args):
    t0 = time.time()
    width, P = args.adapter_size, args.prompt_tokens
    methods = [("full", "full", ["--peft", "none"])]  # (label, run directory, flags)
    methods += [(f"LoRA r={r}", f"lora{r}", ["--peft", "lora", "--lora-r", str(r), "--lora-alpha", str(2 * r)])
                for r in args.ranks]
    methods += [(f"adapter m={width}", f"adapter{width}", ["--peft", "adapter", "--adapter-size", str(width)]),
                (f"prompt P={P}", f"prompt{P}", ["--peft", "prefix", "--prompt-tokens", str(P)])]
    results = {}
    for label, name, extra in methods:
        accs, times = [], []
        for seed in range(args.seeds):
            acc, ms, _ = run_one(args, f"{name}-seed{seed}",
                                 ["--train-examples", str(args.size), "--seed", str(1337 + seed), *extra])
            accs.append(acc)
            times.append(ms)
        ckpt = train.load_checkpoint(os.path.join(args.out_dir, f"{name}-seed0", "ckpt.pt"))
        n_train = _trained(ckpt)
        results[label] = (accs, float(np.mean(times)), n_train, parameters_in(ckpt["model"]))
    print(f"\n{args.model} on {args.task}, {args.size:,} labelled examples, {args.iters} steps, {args.seeds} seed(s), "
          f"{time.time() - t0:.0f} s in all")
    print(f"{'method':>14}  {'test accuracy':>15}  {'trained parameters':>24}  {'ms/step':>7}  {'trained state':>13}")
    for label, (accs, ms, n, total) in results.items():
        m, s = mean_std(accs)
        print(f"{label:>14}  {m:>8.1%} ± {s:4.1%}  {n:>12,} ({n / total:6.2%})  {ms:>7.1f}  {12 * n / 2**20:>10.2f} MB")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (accs, _, n, _) in results.items():
        m, s = mean_std(accs)
        ax.errorbar([n], [m], yerr=[s], fmt="o", capsize=3, label=label)
    ax.set(xscale="log", xlabel="trained parameters", ylabel="test accuracy",
           title=f"Full vs parameter-efficient: {args.model}, --task {args.task}, {args.size:,} examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, args.png or os.path.join(ASSETS, f"downstream_peft_{args.model}_{args.task}.png"), plt)
    return results


def _trained(ckpt):
    """Trained parameters of a run: those AdamW kept moments for."""
    return sum(s["exp_avg"].numel() for s in ckpt["optimizer"]["state"].values())


def parameters_in(state):
    """Parameters of a checkpoint's model state, tied ones once (torch.save keeps them one storage)."""
    seen = {v.untyped_storage().data_ptr(): v.numel() for v in state.values()}
    return sum(seen.values())


@command
def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help in (("helps", "pretrained vs random init at several labelled-set sizes"),
                       ("peft", "full fine-tuning vs LoRA, adapters and a trained prompt")):
        q = sub.add_parser(name, help=help)  # a Parser too: errors are one line, exit 2
        q.add_argument("--model", default="gpt", choices=list(train.MODELS))
        q.add_argument("--init-from", required=True, help="the pretrained run's ckpt.pt (or a Hugging Face dir)")
        q.add_argument("--task", default="genre", choices=list(tasks.TASKS))
        q.add_argument("--iters", type=int, default=300, help="optimizer steps per run")
        q.add_argument("--evals", type=int, default=5, help="evaluations per run besides step 0")
        q.add_argument("--batch-size", type=int, default=32)
        q.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (the floor is a tenth)")
        q.add_argument("--seeds", type=int, default=3, help="runs per setting (mean and spread)")
        q.add_argument("--out-dir", default=os.path.join("out", "downstream", name))
        q.add_argument("--png", default="", help="the figure (default: assets/downstream_<command>_<model>_<task>.png)")
        q.add_argument("--train-args", default="", help="more train.py flags for every run, e.g. '--dtype fp32'")
        if name == "helps":
            q.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="labelled examples")
            q.add_argument("--shots", type=int, nargs="*", default=[0, 1], help="left-to-right LMs: the "
                           "pretrained model prompted with k examples, no training (GPT-3's k-shot)")
        else:
            q.add_argument("--size", type=int, default=1000, help="labelled examples")
            q.add_argument("--ranks", type=int, nargs="+", default=[2, 8], help="LoRA ranks")
            q.add_argument("--adapter-size", type=int, default=16)
            q.add_argument("--prompt-tokens", type=int, default=8)
    args = p.parse_args(argv)
    require(args.iters >= 1 and args.seeds >= 1 and args.evals >= 1, "--iters, --seeds and --evals must be >= 1")
    return helps(args) if args.command == "helps" else peft(args)


if __name__ == "__main__":
    main()
