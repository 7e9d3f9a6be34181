"""
Benchmarks, as commands that print figures (never as timed tests).

    python bench.py models  # every model's default preset, naive vs fused attention
    python bench.py models --models gpt --presets gpt2 --compile both --device cuda  # GPT-2 124M
    python bench.py attention --lengths 256,512,1024,2048  # naive vs fused, forward + backward

`models` runs train.py's own --bench (full steps: data, forward, backward, clipping, AdamW) per
combination, in one table: ms/step, tokens/s, MFU and, on CUDA, peak memory. `attention` times one
causal attention layer of gpt.py at growing lengths. The readable path materialises the (T, T) score
matrix (memory grows as T^2). The fused kernel (torch's scaled_dot_product_attention: FlashAttention
or memory-efficient attention on GPUs, no Triton) never does. MFU needs a known peak: GPUs from
train.GPU_PEAK_BF16 (unknown: none, no wrong MFU), CPUs from a measured matmul (train.peak_flops).
"""

import argparse
import contextlib
import io
import time

import torch

import train
from common import UsageError, command, require


def bench_models(args):
    rows = []
    for model in args.models.split(","):
        mod = train.model_module(model)
        presets = args.presets.split(",") if args.presets else [mod.DEFAULT_PRESET]
        for preset in presets:
            for attn in args.attn.split(","):
                for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
                    argv = ["--model", model, "--preset", preset, "--bench", "--bench-iters",
                            str(args.iters), "--device", args.device, "--attn", attn,
                            "--compile" if compiled else "--no-compile"]
                    argv += ["--dtype", args.dtype] if args.dtype else []
                    argv += ["--data", args.data] if args.data else []
                    argv += ["--cache-dir", args.cache_dir] if args.cache_dir else []
                    if torch.cuda.is_available():
                        torch.cuda.reset_peak_memory_stats()
                    quiet = io.StringIO()
                    try:
                        with contextlib.redirect_stdout(quiet):
                            result = train.train(argv)[0]
                    except UsageError as e:
                        print(f"{model}/{preset}/{attn}: skipped ({e})")
                        continue
                    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
                    rows.append((model, preset, attn, "on" if compiled else "off", result, mem))
                    print(_row(*rows[-1]), flush=True)
    return rows


def _row(model, preset, attn, compiled, r, mem):
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    return (f"{model:<8}{preset:<14}{attn:<7}{compiled:<9}{r['ms']:>10.1f}{r['tok_s']:>14,.0f}"
            f"{mfu:>8}{'n/a' if mem is None else f'{mem:.2f} GiB':>12}")


def bench_attention(args):
    """Forward + backward of one gpt.CausalSelfAttention, naive vs sdpa, per length -> rows."""
    import gpt

    try:
        lengths = [int(t) for t in args.lengths.split(",")]
    except ValueError:
        raise UsageError(f"--lengths {args.lengths!r}: expected sequence lengths such as "
                         f"256,512,1024") from None
    require(min(lengths) >= 1, f"--lengths {args.lengths}: every length must be at least 1")
    device = train.pick_device(args.device)
    dtype = train.pick_dtype(args.dtype or "auto", device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"one causal self-attention layer, batch {args.batch}, {args.n_head} heads, "
          f"width {args.n_embd}, {device} {dtype}; forward + backward")
    print(f"{'T':>6}{'naive ms':>11}{'fused ms':>11}{'speed-up':>10}{'naive mem':>12}{'fused mem':>12}")
    rows = []
    for T in lengths:
        cfg = gpt.GPTConfig(block_size=T, n_layer=1, n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)
        result = {}
        for attn in ("naive", "sdpa"):
            torch.manual_seed(0)
            layer = gpt.CausalSelfAttention(gpt.GPTConfig(**{**cfg.__dict__, "attn": attn}), 0).to(device)
            x = torch.randn(args.batch, T, args.n_embd, device=device, requires_grad=True)
            pos = torch.arange(T, device=device)
            autocast = train.autocast(device, dtype)

            def step():
                with autocast:
                    y = layer(x, pos)
                y.float().sum().backward()

            for _ in range(3):
                step()
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for _ in range(args.iters):
                step()
            sync()
            result[attn] = ((time.perf_counter() - t) * 1000 / args.iters,
                            torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
        (tn, mn), (tf, mf) = result["naive"], result["sdpa"]
        mem = lambda m: "n/a" if m is None else f"{m:.0f} MiB"
        print(f"{T:>6}{tn:>11.2f}{tf:>11.2f}{tn / tf:>9.1f}x{mem(mn):>12}{mem(mf):>12}", flush=True)
        rows.append((T, tn, tf, mn, mf))
    if not cuda:
        print("memory: measured on CUDA only (torch.cuda.max_memory_allocated)")
    return rows


def _usage_error(message):
    raise UsageError(f"{message} (see --help)")


@command
def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = _usage_error  # one line, exit 2, like every other bad input
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="train.py --bench for each model / preset / attention path / compile")
    m.add_argument("--models", default=",".join(train.MODELS), help="comma-separated --model names")
    m.add_argument("--presets", default="",
                   help="comma-separated presets (default: each model's DEFAULT_PRESET)")
    m.add_argument("--attn", default="naive,sdpa", help="attention paths to compare")
    m.add_argument("--compile", default="off", choices=["off", "on", "both"], help="torch.compile the model")
    m.add_argument("--iters", type=int, default=20,
                   help="timed steps per combination (after 5 warm-up steps)")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", default="", help="override the presets' precision")
    m.add_argument("--data", default="",
                   help="corpus (default: each preset's, i.e. the bundled Shakespeare)")
    m.add_argument("--cache-dir", default="", help="train.py's token cache (default: data/cache)")
    a = sub.add_parser("attention",
                       help="one attention layer: time and memory, naive vs fused, over lengths")
    m.error = a.error = _usage_error
    a.add_argument("--lengths", default="256,512,1024,2048")
    a.add_argument("--batch", type=int, default=8)
    a.add_argument("--n-head", type=int, default=12)
    a.add_argument("--n-embd", type=int, default=768)
    a.add_argument("--iters", type=int, default=10)
    a.add_argument("--device", default="auto")
    a.add_argument("--dtype", default="")
    args = p.parse_args(argv)
    require(args.iters >= 1, f"--iters {args.iters}: must be at least 1")
    if args.command == "models":
        print(f"{'model':<8}{'preset':<14}{'attn':<7}{'compile':<9}{'ms/step':>10}{'tokens/s':>14}{'MFU':>8}"
              f"{'peak mem':>12}")
        return bench_models(args)
    return bench_attention(args)


if __name__ == "__main__":
    main()
