"""
One training loop for every model in this repository (MODELS below): each plugs into the same loop.

    python train.py --model gpt                      # char-level GPT on the bundled Shakespeare, CPU, about 4 minutes
    python train.py --model gpt --help               # every flag, generated from the config dataclasses
    python train.py --model gpt --resume             # continue out/gpt from its checkpoint
    python train.py --model gpt --max-time 90s       # as good a model as 90 seconds of this machine allow
    python train.py --model gpt --data milton:0.75,shakespeare:0.25 --init-from out/gpt/ckpt.pt   # continue, replay
    torchrun --standalone --nproc_per_node=4 train.py --model gpt --preset gpt2 --data PREPARED   # 4 GPUs
    python train.py --model gpt --preset nanogpt-cpu --bench   # ms/step, tokens/s, MFU; writes nothing

The file follows the order of a run: configuration -> (tokenizer and data: data.py) -> device and precision ->
optimisation -> checkpoints -> evaluation -> the time budget -> many processes -> setting a run up -> the loop itself
(`loop`, one screen) -> the end-of-run demo.

What the loop owns, the same for every objective: the device and precision, tokenizers (with each model's special
tokens), reading the corpus and splitting it by document, batching, AdamW, the learning-rate schedule, gradient
accumulation and clipping, a time budget, evaluation, logging, checkpoints and resume.
What a model file owns, looked up in MODELS (nothing else here is model-specific):
  Config          a dataclass of the architecture's settings                     (each field becomes a --flag)
  PRESETS         named sizes and recipes, and DEFAULT_PRESET                     (--preset; keys may set any config)
  SPECIAL_TOKENS  token strings the objective needs ([CLS], [MASK], ...), added above every tokenizer's ordinary ids
  TOKEN_IDS       optional {config field: special token}: config fields the loop fills with those tokens' ids
  Model           the nn.Module, built from a Config. Optional: no_weight_decay() -> parameter names,
                  flops_per_token(), num_params(), from_pretrained(path) for --init-from a Hugging Face directory
  Objective       built as Objective(model_config, tokenizer); turns token data into batches and scores them:
                    raw_tokens_per_row     raw tokens one training row draws from the stream (GPT: block_size + 1)
                    tokens_per_row         tokens a row counts as processed (GPT: block_size): --tokens-per-step
                    count_tokens(batch)    tokens processed by a batch (real tokens only), for tokens/s
                    train_batch(split, batch_size, generator) -> dict of tensors   (rows first; the loop's generator)
                    eval_batches(split, batch_size) -> iterator of dicts          (deterministic; covers `split`)
                    denominators(batch) -> {term: count}   the counts each loss term is averaged over, for a whole step
                    loss(model, batch, denominators=None) -> (loss, dict of sums)  summarize(sums) -> named metrics
                    (loss() calls model(...) itself, once per micro-batch, never a submodule or method: under torchrun
                    `model` is the DistributedDataParallel wrapper, which syncs gradients only through its forward)
                  Optional, for objectives with state across steps (XLNet's memory): state_dict(), load_state_dict(),
                  and reset(), which the loop calls at the start of every evaluation on a separate eval instance.
  DemoConfig, demo(model, tokenizer, demo_config, device)   optional: what the run shows when it ends (GPT samples)
  DTYPES          optional: the precisions the model trains in (T5: never fp16); others are refused at start-up
  Objective.describe() -> str   optional: one line the log prints about what a row is
Slides (lecture 001): "Training recipe for LLMs" and "Pretraining language models" (model, data, objective, details).
Papers for the optimisation recipe: Loshchilov & Hutter 2019 (AdamW), Loshchilov & Hutter 2017 (cosine schedule, SGDR),
Goyal et al. 2017 §2.2 (linear warm-up), GPT-3 (Brown et al. 2020) §2.3 and App. B (the settings the gpt2 preset uses),
Devlin et al. 2019 App. A.2 (BERT's linear decay), Raffel et al. 2020 §3.1.2 (T5's inverse square root), Geiping &
Goldstein 2023 "Cramming" §4 (a schedule fitted to a wall-clock budget).
"""

import argparse
import contextlib
import copy
import functools
import importlib
import inspect
import json
import math
import os
import platform
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from data import (DEFAULT_DATA, UsageError, atomic_write_text, prepare_domains, special_tokens_of,
                  tokenizer_from_identity)

ROOT = os.path.dirname(os.path.abspath(__file__))
# --model name -> module. Adding a model = one line here and one file. gpt: gpt.py's GPT-2, through mtp.py, which adds
# the optional multi-token heads (--mtp-heads) and builds a plain gpt.GPT without them.
MODELS = {"gpt": "mtp", "bert": "bert", "electra": "electra", "t5": "t5", "xlnet": "xlnet"}

# ----------------------------------------------------------------------------------------------------------------------
# Configuration. Every field is a --flag (underscores become dashes); presets and checkpoints fill the same fields.


def opt(default, help):
    return field(default=default, metadata={"help": help})


SCHEDULES = ("cosine", "linear", "rsqrt", "constant", "wsd")


@dataclass
class TrainConfig:
    model: str = opt("gpt", f"which model file to train: {', '.join(MODELS)}")
    preset: str = opt("", "named size/recipe from the model file (default: its DEFAULT_PRESET)")
    data: str = opt("", "directory or glob of UTF-8 .txt files, one document each, or a `python data.py prepare` "
                        "directory, or a mixture such as milton:0.75,shakespeare:0.25 (bundled corpora by name; "
                        "every corpus named is evaluated, weight 0 included) (default: bundled Shakespeare)")
    val_docs: str = opt("", "comma-separated document names to hold out (default: the bundled held-out works, "
                            "else every 10th document)")
    tokenizer: str = opt("char", "char | gpt2 | bpe")
    vocab_size: int = opt(1024, "vocabulary size to train when --tokenizer bpe (the model's special tokens come on top)")
    out_dir: str = opt("", "where ckpt.pt, metrics.jsonl and loss.png go (default: out/<model>)")
    cache_dir: str = opt(os.path.join(ROOT, "data", "cache"), "where tokenised corpora, trained tokenizers and this "
                                                              "machine's measured peak FLOP/s are cached")
    device: str = opt("auto", "auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    dtype: str = opt("auto", "auto | bf16 | fp16 | fp32; auto = bf16 where the device does it natively, "
                             "else fp16 + GradScaler on CUDA, else fp32")
    compile: bool = opt(False, "torch.compile the model (slow start, faster steps on GPU)")
    batch_size: int = opt(16, "micro-batch: rows per forward/backward pass")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    tokens_per_step: int = opt(0, "tokens per optimizer step; if set, grad_accum = this / (batch_size * tokens per row)")
    max_iters: int = opt(2000, "optimizer steps (with --max-time: at most this many; 0 = no cap)")
    max_time: str = opt("", "wall-clock budget for the whole run, e.g. 4m, 90s, 1h30m: the step count is fixed from "
                            "the measured step and eval times so the schedule ends on time ('' or 0 = off; giving "
                            "--max-iters alone turns a preset's budget off)")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "floor of the decay")
    schedule: str = opt("cosine", "after warm-up: cosine | linear (decay to --min-lr at the horizon) | rsqrt "
                                  "(lr * sqrt(warmup / step), T5) | constant | wsd (constant, then a linear cooldown "
                                  "to --min-lr over the last --cooldown of the steps)")
    cooldown: float = opt(0.2, "wsd: the share of the steps after warm-up spent decaying to --min-lr")
    warmup_iters: int = opt(100, "linear warm-up steps")
    lr_decay_iters: int = opt(0, "the decay's horizon: lr reaches --min-lr at this step (0 = max_iters, fixed when the "
                                 "run starts; a resumed run keeps it)")
    optimizer: str = opt("adamw", "adamw | adamw-scale (each tensor's step scaled by its RMS, Adafactor's relative "
                                  "step: how nanoT5 trains T5)")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay, on weight matrices only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon (BERT and ELECTRA used 1e-6)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = opt(500, "evaluate, plot and checkpoint every N steps (and at the end)")
    eval_tokens: int = opt(1 << 20, "val tokens scored at each eval: the same leading slice of the val split every time "
                                    "(0 = all; the default scores the bundled held-out works in full)")
    eval_train_tokens: int = opt(0, "train tokens scored at each eval, in 32 slices spread over the whole train split "
                                    "(0 = as many as val)")
    eval_batch_size: int = opt(0, "rows per eval forward pass (0 = about 2K tokens, at least --batch-size)")
    log_interval: int = opt(10, "print a training line every N steps")
    seed: int = opt(1337, "seeds the model init, the batch order and dropout")
    resume: bool = opt(False, "continue the run in --out-dir from its ckpt.pt")
    overwrite: bool = opt(False, "start a new run even if --out-dir already holds one")
    init_from: str = opt("", "start a new run (step 0, fresh optimizer and schedule) from these weights: a ckpt.pt of "
                             "this repository or a Hugging Face directory of the same model")
    bench: bool = opt(False, "benchmark: time --bench-iters steps, print ms/step, tokens/s, MFU; write nothing")
    bench_iters: int = opt(30, "timed steps for --bench (after 5 warm-up steps)")


def model_module(name):
    if name not in MODELS:
        raise UsageError(f"unknown --model {name!r}; choose from: {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name])


def derived(mod):
    """Model-config fields set from the tokenizer, never from a flag: vocab_size, and the ids of the model's special
    tokens that its config names (TOKEN_IDS, e.g. {"pad_token_id": "[PAD]"} for a model that pads)."""
    return {"vocab_size", *getattr(mod, "TOKEN_IDS", {})}


def tokenizer_fields(mod, tokenizer):
    """{vocab_size: n, pad_token_id: ..., ...}: the derived fields' values for this tokenizer."""
    return {"vocab_size": tokenizer.n_vocab,
            **{name: tokenizer.specials[token] for name, token in getattr(mod, "TOKEN_IDS", {}).items()}}


def config_groups(mod):
    """(title, dataclass, fields) for each group of flags: the loop's, the model's, and the model file's demo, if any."""
    groups = [("training", TrainConfig, fields(TrainConfig)),
              (f"model ({mod.__name__}.Config)", mod.Config, [f for f in fields(mod.Config) if f.name not in derived(mod)])]
    if hasattr(mod, "DemoConfig"):
        groups.append((f"end-of-run demo ({mod.__name__}.DemoConfig)", mod.DemoConfig, fields(mod.DemoConfig)))
    return groups


def field_comments(cls):
    """{field: its end-of-line comment} from a config class's source. Model configs document each field with a comment,
    as nanoGPT does, rather than with metadata; --help shows those comments."""
    sources = [inspect.getsource(c) for c in reversed(cls.__mro__[:-1])]  # a base class's fields, then a subclass's
    found = (re.match(r"\s+(\w+):[^#]*#\s*(.*)", line) for source in sources for line in source.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def build_parser(mod, preset_name):
    """The CLI, generated from the config dataclasses: one typed --flag per field. --help shows the value a run will
    use, i.e. the preset's where it sets one."""
    p = argparse.ArgumentParser(prog="train.py", allow_abbrev=False, description=(
        f"Train a model of this repository. Flags left out come from the preset ({mod.__name__}: {preset_name}), "
        "then from the defaults; --help shows the values that apply to this --model/--preset."))
    p.error = lambda message: _fail(f"{message} (see --help)")
    preset = mod.PRESETS.get(preset_name, {})
    for title, cls, fs in config_groups(mod):
        g = p.add_argument_group(title)
        comments, defaults = field_comments(cls), cls()
        for f in fs:
            flag = "--" + f.name.replace("_", "-")
            value = preset.get(f.name, getattr(defaults, f.name))
            where = f" from preset {preset_name}" if f.name in preset else ""
            help = f.metadata.get("help", comments.get(f.name, "")) + (f" [{value!r}{where}]" if value not in ("", None) else "")
            help = help.replace("%", "%%")  # argparse %-formats help texts
            if f.type is bool:
                g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help)
            else:
                g.add_argument(flag, dest=f.name, type=f.type, default=argparse.SUPPRESS, help=help,
                               metavar=f.name.upper())
    return p


def _fail(message):
    raise UsageError(message)


@dataclass
class Settings:
    """What the command line asked for: the loop's config, the model file's configs (as keyword dicts: the model's
    vocab_size is only known once the tokenizer is), and which keys the user typed."""
    cfg: TrainConfig
    model: dict
    demo: dict
    explicit: set


def resolve_config(argv):
    """argv -> Settings. Precedence: flags > preset > defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="gpt")
    pre.add_argument("--preset", default="")
    known, _ = pre.parse_known_args(argv)
    mod = model_module(known.model)
    preset_name = known.preset or mod.DEFAULT_PRESET
    if preset_name not in mod.PRESETS:
        raise UsageError(f"unknown --preset {preset_name!r} for {known.model}; choose from: {', '.join(mod.PRESETS)}")
    explicit = vars(build_parser(mod, preset_name).parse_args(argv))
    if "max_iters" in explicit and "max_time" not in explicit:
        explicit["max_time"] = ""  # an explicit step count is a request for exactly that many steps: no budget
    groups = [{f.name for f in fs} for _, _, fs in config_groups(mod)]
    values = [{}, {}, {}]
    for key, value in {**mod.PRESETS[preset_name], **explicit}.items():
        where = [i for i, names in enumerate(groups) if key in names]
        if not where:
            raise UsageError(f"preset {preset_name!r} sets unknown key {key!r}")
        values[where[0]][key] = value
    cfg = TrainConfig(**values[0])
    cfg.preset = preset_name
    parse_duration(cfg.max_time)  # a malformed --max-time fails here, before anything is read or written
    return Settings(cfg, values[1], values[2], set(explicit))


def parse_duration(text):
    """'4m' -> 240.0, '1h30m' -> 5400.0, '90' or '90s' -> 90.0, '' or '0' -> 0.0 (no budget)."""
    text = str(text).strip().lower()
    if text in ("", "0"):
        return 0.0
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
    if not m or not any(m.groups()):
        raise UsageError(f"--max-time {text!r}: expected a duration such as 4m, 90s, 1h30m or 240")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return 3600 * h + 60 * mi + s


# ----------------------------------------------------------------------------------------------------------------------
# Device, precision, throughput. A CPU's dtypes are not all equal: with AVX512-BF16 or AMX, bf16 matmuls run several
# times faster than fp32; without them (AVX2-only CPUs, most laptops), bf16 and fp16 are emulated and ~100-500x slower.


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown --device {name!r}; choose from: auto, cpu, cuda, cuda:N, mps")
    return name


@functools.lru_cache(maxsize=None)
def cpu_slowdown(dtype):
    """How many times slower a 128^3 matmul is in `dtype` than in fp32 on this CPU (best of 3; a few ms at most, even
    where the dtype is emulated). ~0.5 with AMX for bf16, ~1 with AVX512-BF16, 100+ where it is emulated. The flags
    alone can say 'native' where the math library was told not to use them (ONEDNN_MAX_CPU_ISA), so we measure."""
    def best(dt):
        a = torch.ones(128, 128, dtype=dt)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t)
        return min(times)
    return best(TORCH_DTYPES[dtype]) / best(torch.float32)


def cpu_has_native(dtype):
    if dtype == "fp32":
        return True
    flags = {"bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
             "fp16": ("_is_amx_fp16_supported", "_is_avx512_fp16_supported")}[dtype]
    return any(getattr(torch.cpu, f, lambda: False)() for f in flags) and cpu_slowdown(dtype) < 4


def pick_dtype(name, device):
    """auto: bf16 where the device does it natively, fp16 (+ GradScaler) on older GPUs, else fp32. An explicit bf16/fp16
    on a CPU that only emulates it runs anyway, after one line saying what it costs."""
    kind = device.split(":")[0]
    if name != "auto":
        if name not in ("bf16", "fp16", "fp32"):
            raise UsageError(f"unknown --dtype {name!r}; choose from: auto, bf16, fp16, fp32")
        if kind == "cpu" and not cpu_has_native(name):
            print(f"warning: --dtype {name}: this CPU has no native {name} matmuls (no AVX512-BF16/AMX); emulated they "
                  f"ran {cpu_slowdown(name):.0f}x slower than fp32 here, and the run will be about that much slower. "
                  f"--dtype fp32 (what auto picks on this CPU) avoids it.", file=sys.stderr)
        return name
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_has_native("bf16") else "fp32"
    return "fp32"  # mps: autocast support varies by macOS version; fp32 always works


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for MFU (Chowdhery et al. 2022, PaLM App. B).
# Checked in this order: the first key found in the device's name wins ("H100 PCIe" before "H100").
GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                 "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def peak_flops(device, dtype, cache_dir, measure=True, remeasure=False):
    """(FLOP/s or None, how it was obtained). GPUs: the datasheet; an unknown GPU gets None (no MFU rather than a wrong
    one). CPUs have no datasheet number that means anything, so we time the best case ourselves, once per machine and
    dtype, and cache it in cache_dir: the best of 5 square matmuls of the first size (256 ... 2048) that takes 5 ms, i.e.
    MFU is relative to what this CPU actually reaches. measure=False only reads the cache; remeasure=True (--bench)
    measures again and keeps the best ever seen, so a probe that ran on a busy machine is corrected by a quiet one.
    Never in an emulated dtype."""
    kind = device.split(":")[0]
    if kind == "cuda":
        name = torch.cuda.get_device_name(device)
        key = next((k for k in GPU_PEAK_BF16 if k in name), None)
        return (GPU_PEAK_BF16[key], f"{name} datasheet dense bf16") if key else (None, f"{name}: peak unknown")
    if kind != "cpu":
        return None, "peak unknown"
    if not cpu_has_native(dtype):
        return None, f"{dtype} is emulated on this CPU"
    machine = f"{_cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__} | {dtype} | " \
              f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '')} {os.environ.get('ATEN_CPU_CAPABILITY', '')}"
    path = os.path.join(cache_dir, "cpu_peak.json")
    cached = json.load(open(path)) if os.path.exists(path) else {}
    how = f"best {dtype} matmul on this CPU, measured once and cached in {path}"
    if machine in cached and not remeasure:
        return cached[machine], how
    if not measure:
        return None, "not measured yet"
    g = torch.Generator().manual_seed(0)  # its own generator: drawing from the global one would shift dropout's stream
    for n in (256, 512, 1024, 2048):
        a = torch.randn(n, n, generator=g).to(TORCH_DTYPES[dtype])
        best = float("inf")
        for _ in range(5):  # the fastest of several: the first ones pay for warm-up and clock ramp-up
            t = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t)
        if best > 5e-3:
            break
    cached[machine] = max(2 * n**3 / best, cached.get(machine, 0.0))
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write_text(path, json.dumps(cached, indent=1))
    return cached[machine], how


# ----------------------------------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(model, cfg, device):
    """AdamW with decoupled weight decay on weight matrices only. Biases, norm gains and position tables (whatever the
    model lists in no_weight_decay()) are not decayed: pulling them toward 0 is not a "simpler" model, just a different
    one (the convention since BERT's AdamWeightDecayOptimizer). Returns (optimizer, one line describing the groups)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and n not in skip]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and n not in skip)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel updates every tensor (same maths, tests/test_train.py checks it); on CPU it is ~3x faster than
    # the per-tensor loop, which matters for small models whose step is a few ms.
    if cfg.optimizer == "adamw-scale":
        optimizer = AdamWScale(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    else:
        fused = device.split(":")[0] in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                      fused=fused or None)
    count = lambda ps: f"{len(ps)} tensors ({sum(p.numel() for p in ps):,} parameters)"
    return optimizer, (f"weight decay {cfg.weight_decay} on {count(decay)}; none on {count(no_decay)}: biases, norm "
                       f"gains{', ' + ', '.join(sorted(skip)) if skip else ''}")


class AdamWScale(torch.optim.Optimizer):
    """AdamW whose step for each tensor is multiplied by max(1e-3, RMS(tensor)): Adafactor's relative step size
    (Shazeer & Stern 2018, §8, "parameter scaling") on top of Adam, which is how nanoT5 trains T5 (T5 itself used
    Adafactor). The lr becomes relative to each tensor's own scale: an embedding of std 1 and a projection of std
    d^-0.5 move by the same fraction of themselves. With RMS 1 it is exactly AdamW (tests/test_loop.py)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, min_rms=1e-3):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_rms=min_rms))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)  # Adam's moments, as in AdamW
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                rms = p.float().pow(2).mean().sqrt().clamp_min(group["min_rms"])  # a tensor: no host sync per tensor
                step = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay (Loshchilov & Hutter)
                p.sub_((m / (v.sqrt() + group["eps"] * math.sqrt(1 - beta2 ** t))) * (step * rms).to(p.dtype))


def lr_at(step, cfg):
    """Linear warm-up from 0 to lr over warmup_iters, then the schedule; the decaying ones reach min_lr at the horizon
    (lr_decay_iters, or max_iters) and stay there; wsd holds the peak until its cooldown. A horizon of 0 (a budgeted run that has not measured its speed yet)
    holds the peak. With lr=1e-3, min_lr=1e-4, warmup=100, horizon 2000, cosine:
    lr_at(50) = 5e-4, lr_at(1050) = 5.5e-4, lr_at(2000) = lr_at(5000) = 1e-4."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "rsqrt":  # T5: 1/sqrt(step) after warm-up, continuous at the end of warm-up; no horizon
        return max(cfg.min_lr, cfg.lr * math.sqrt(max(1, cfg.warmup_iters) / max(1, step)))
    horizon = cfg.lr_decay_iters or cfg.max_iters
    if not horizon:
        return cfg.lr
    if step >= horizon:
        return cfg.min_lr
    if cfg.schedule == "wsd":  # warm-up, stable, decay (Hägele et al. 2024 §3; Ibrahim et al. 2024 §7.2's "infinite")
        decay_start = horizon - round(cfg.cooldown * (horizon - cfg.warmup_iters))
        if step < decay_start:
            return cfg.lr
        return cfg.lr + (cfg.min_lr - cfg.lr) * (step - decay_start) / max(1, horizon - decay_start)
    progress = (step - cfg.warmup_iters) / max(1, horizon - cfg.warmup_iters)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr + shape * (cfg.lr - cfg.min_lr)


def to_device(batch, device):
    """Move a batch; on CUDA through pinned memory, so the copy is asynchronous and overlaps the running step."""
    cuda = device.startswith("cuda")
    return {k: (v.pin_memory() if cuda else v).to(device, non_blocking=cuda) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def chunk(batch, n):
    """Split a step's batch (leading dim B * n) into n micro-batches."""
    parts = {k: v.chunk(n) for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


class NonFiniteLoss(Exception):
    pass


def optimizer_step(run, batch, draw_next=None):
    """One optimizer step on `batch` (batch_size * grad_accum rows): forward and backward per micro-batch, then clip and
    update. Returns the step's loss.

    Each loss term is averaged over the whole step, not per micro-batch: `denominators` counts the step's targets once,
    up front, and each micro-batch's loss is its sum divided by that count. Accumulation is then exactly one big batch,
    also when micro-batches hold different numbers of targets (MLM's random 15%, T5's padding), where the mean of the
    micro-batch means would be wrong. The loss is read back once per step (one host sync) and checked before the update,
    so a NaN never reaches the weights. draw_next() prepares the next batch while the device is still busy."""
    denominators = run.objective.denominators(batch)
    world = run.dist.world
    micro_batches = chunk(batch, run.cfg.grad_accum)
    share = len(micro_batches) // world  # under torchrun each process takes its own run of micro-batches
    mine = micro_batches[run.dist.rank * share:(run.dist.rank + 1) * share]
    loss_sum = torch.zeros((), device=run.device)
    for i, micro in enumerate(mine):
        # DDP all-reduces the gradients after every backward unless told not to: only the last micro-batch syncs
        last = i == len(mine) - 1
        with contextlib.nullcontext() if last or world == 1 else run.train_model.no_sync():
            with run.autocast:
                loss, _ = run.objective.loss(run.train_model, to_device(micro, run.device), denominators)
            # DDP averages the processes' gradients; each loss is already its share of the whole step: scale back up
            run.scaler.scale(loss * world).backward()
        loss_sum = loss_sum + loss.detach().float()
    if draw_next is not None:
        draw_next()
    if world > 1:
        torch.distributed.all_reduce(loss_sum)  # the step's loss: the sum of every process's shares
    step_loss = float(loss_sum)
    if not math.isfinite(step_loss):
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss is {step_loss}")
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: plain data only (tensors, numbers, strings, lists, dicts), so torch.load(weights_only=True) can read them
# without running any pickled code; written to a temp file and renamed, so a crash mid-save keeps the previous one.


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, flag="--resume"):
    """The checkpoint at `path`; errors name the flag the user gave it with."""
    if not os.path.exists(path):
        raise UsageError(f"{flag}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{flag}: {path} is not a readable checkpoint ({e.__class__.__name__}); it may be corrupt") \
            from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "tokenizer", "step"} <= set(ckpt):
        raise UsageError(f"{flag}: {path} is not a checkpoint written by train.py")
    return ckpt


def load_for_inference(path, device="cpu", flag="--ckpt", model=None):
    """(model in eval mode, tokenizer, checkpoint dict) from a train.py checkpoint: what the model files' samplers use.
    With `model` (e.g. "bert"), a checkpoint of another --model is refused with one line naming both."""
    ckpt = load_checkpoint(path, flag)
    name = ckpt["train_config"]["model"]
    if model and name != model:
        raise UsageError(f"{flag} {path}: a checkpoint of --model {name}, not {model}")
    mod = model_module(name)
    model = mod.Model(mod.Config(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tokenizer_from_identity(ckpt["tokenizer"]), ckpt


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation, logging, plotting


def eval_view(split, max_tokens, spread, min_piece=1):
    """The part of a split an eval scores, as a list of Splits. All of it when it fits in max_tokens; otherwise the
    leading max_tokens (val: the same slice every time), or, with spread, up to 32 equal slices (each at least
    min_piece tokens) at evenly spaced offsets, so the train estimate covers every document, not only the first ones."""
    n = len(split.tokens)
    if not max_tokens or max_tokens >= n:
        return [split]
    if not spread:
        return [split.slice(0, max_tokens)]
    k = max(1, min(32, max_tokens // max(1, min_piece)))
    sizes = [max_tokens * (i + 1) // k - max_tokens * i // k for i in range(k)]  # they add up to max_tokens exactly
    return [split.slice(i * n // k, i * n // k + size) for i, size in enumerate(sizes)]


def eval_rows(cfg, objective):
    """Rows per eval forward pass: --eval-batch-size, else about 2K tokens (at least a training micro-batch). Bigger is
    not faster on a CPU: 256 x 64 characters scored the held-out plays in 7.6 s, 32 x 64 in 5.9 s (fp32, AVX2; the
    (B, H, T, T) scores stop fitting in cache)."""
    return cfg.eval_batch_size or max(cfg.batch_size, 2048 // objective.tokens_per_row)


@torch.no_grad()
def evaluate(model, objective, pieces, rows, device, autocast):
    """Score the model on every piece (eval_view), in a fixed order: the same numbers on every run. A stateful objective
    (XLNet's memory) starts from a clean state: reset() before the first batch."""
    model.eval()
    if hasattr(objective, "reset"):
        objective.reset()
    sums = {}
    for piece in pieces:
        for batch in objective.eval_batches(piece, rows):
            with autocast:
                _, stats = objective.loss(model, to_device(batch, device))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + (v.item() if torch.is_tensor(v) else v)
    model.train()
    return objective.summarize(sums)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_metrics(metrics):
    """'1.2345 nats/tok 2.3456 bpb' for a language model (its loss is nats per token); '3.4567 loss 0.4567 acc' for
    others, whose loss may add several terms (BERT's MLM + NSP): every metric by its name."""
    lm = "bpb" in metrics
    return " ".join(f"{v:.4f} {'nats/tok' if k == 'loss' and lm else k}" for k, v in metrics.items())


def plot_metrics(rows, path, title):
    """loss.png: train (per step and at evals) and val loss; beside it bits per byte where the objective reports it, else
    the objective's other metrics (accuracies ...)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    extra = sorted({k[4:] for r in ev for k in r if k.startswith("val_") and k != "val_loss"})
    extra = ["bpb"] if "bpb" in extra else extra
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    if tr:
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], color="tab:blue", alpha=0.35, lw=1,
                label="train (batch)")
    if ev:
        ax.plot([r["step"] for r in ev], [r["train_loss"] for r in ev], "o-", color="tab:blue", label="train (eval)")
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", color="tab:orange", label="val (held out)")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    if extra:
        ax = axes[0][1]
        for i, name in enumerate(extra):
            for part, style in (("train", "o--"), ("val", "o-")):
                pts = [(r["step"], r[f"{part}_{name}"]) for r in ev if f"{part}_{name}" in r]
                # one metric: train and val in the loss panel's colours; several: a colour per metric
                color = ("tab:blue" if part == "train" else "tab:orange") if len(extra) == 1 else f"C{i}"
                ax.plot(*zip(*pts), style, color=color, label=f"{part} {name}")
        ax.set(xlabel="step", ylabel="bits per byte" if extra == ["bpb"] else "",
               title="tokenizer-independent: bits per UTF-8 byte" if extra == ["bpb"] else "metrics")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------------------
# A time budget (--max-time). The step count is what makes a schedule: warm-up, then decay to the floor at the last
# step. So rather than stopping a run when time is up (which would cut the decay short), the loop measures how long a
# step and an evaluation take on this machine, early, and fixes the step count that fits, as Cramming (Geiping &
# Goldstein 2023, §4) fits its schedule to a budget. It measures inside warm-up, where the learning rate does not depend
# on the step count yet; the decision is printed and saved in the checkpoint, so a resumed run keeps it.


@dataclass
class Budget:
    seconds: float  # the whole run's budget, start-up included
    spent_before: float = 0.0  # seconds spent by the run before this process resumed it
    eval_seconds: float = 0.0  # how long an evaluation took (the one at step 0)
    decided: int = 0  # the step count, once fixed
    step_times: list = field(default_factory=list)

    WARM_UP_STEPS = 3  # the first steps of a process are slower (allocations, caches); not timed
    MARGIN = 0.97  # plan for 97% of what is left: step times drift by a few percent over a run

    def ready(self):
        """Enough steps timed: at least 10, and 2 seconds' worth or 50 of them."""
        n, total = len(self.step_times), sum(self.step_times)
        return not self.decided and n >= 10 and (total >= 2.0 or n >= 50)

    def decide(self, step, elapsed, cfg):
        """The largest step count whose remaining steps and evaluations fit in what is left of the budget."""
        times = sorted(self.step_times)
        per_step = times[len(times) // 2]  # the median: one step slowed by the OS does not shrink the run
        left = (self.seconds - self.spent_before - elapsed) * self.MARGIN

        def cost(n):  # remaining steps + the evaluations at multiples of eval_interval in (step, n], and at n
            evals = n // cfg.eval_interval - step // cfg.eval_interval + (n % cfg.eval_interval != 0)
            return (n - step) * per_step + evals * self.eval_seconds

        n = step + max(0, int(left / per_step))
        while n > step and cost(n) > left:
            n -= max(1, int((cost(n) - left) / per_step / 2))
        if cfg.max_iters:
            n = min(n, cfg.max_iters)
        self.decided = max(n, step)
        return per_step

    def state(self, elapsed):
        return {"seconds": self.seconds, "spent": self.spent_before + elapsed, "eval_seconds": self.eval_seconds,
                "decided": self.decided}


# ----------------------------------------------------------------------------------------------------------------------
# Many processes: `torchrun --standalone --nproc_per_node=N train.py ...` (DistributedDataParallel; NCCL on GPUs, gloo on
# CPUs). Every process draws the same step batch from the same seeded generator and trains on its own run of
# micro-batches (grad_accum / N of them); DDP sums the gradients. So the optimizer sees the same global batch whatever N
# is, and one process reproduces a run of N (tests/test_ddp.py). Process 0 alone evaluates, logs, plots and checkpoints;
# the others wait at a barrier.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, run, *flags):
        """Whether any process raised each flag (one small all-reduce under torchrun): all stop at the same step."""
        if self.world == 1:
            return flags
        t = torch.tensor([float(f) for f in flags], device=run.device)
        torch.distributed.all_reduce(t)
        return tuple(bool(x > 0) for x in t.tolist())


def main_first(dist, build):
    """build() on process 0, then on the others, which then find what it cached (the token cache, a trained BPE
    vocabulary): two processes writing the same cache files at once corrupt them. An error on process 0 reaches every
    other process as the same UsageError instead of leaving them waiting."""
    if dist.world == 1:
        return build()
    failed = [None]
    if dist.main:
        try:
            result = build()
        except Exception as e:
            failed = [str(e) if isinstance(e, UsageError) else f"process 0 failed: {e.__class__.__name__}: {e}"]
            torch.distributed.broadcast_object_list(failed, src=0)
            raise
        torch.distributed.broadcast_object_list(failed, src=0)
        return result
    torch.distributed.broadcast_object_list(failed, src=0)
    if failed[0] is not None:
        raise UsageError(failed[0])
    return build()


def init_distributed():
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; join the process group. Without them: one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)


# ----------------------------------------------------------------------------------------------------------------------
# Setting up a run: everything that can be wrong with the input is checked before anything is written.


@dataclass
class Run:
    """Everything a training run holds, built by setup(), advanced by loop()."""
    cfg: TrainConfig
    mod: object
    model_cfg: object
    demo_cfg: object
    tokenizer: object
    domains: list  # data.Domain: name, weight, splits {"train", "val"}; one unless --data names a mixture
    data_key: str
    device: str
    dtype: str
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, or its torch.compile wrapper
    objective: object  # draws training batches; keeps the state of a stateful objective
    eval_objective: object  # a second instance for evaluation: state never leaks between training and evaluation
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    batch_gen: torch.Generator  # owns the batch order: saved and restored with the run
    dist: Dist = field(default_factory=Dist)
    budget: Budget = None
    step: int = 0
    evaluated: bool = False  # has the eval at `step` run? (a run stopped on an eval step resumes with it)
    rows: list = field(default_factory=list)
    ckpt_path: str = ""
    resumed: dict = None  # the checkpoint resumed from
    t_start: float = 0.0  # when setup() began: budgets and logged times count from there, as a stopwatch would
    next_batch: dict = None  # drawn while the previous step still runs
    resume_point: tuple = None  # (batch generator state, objective state) from before next_batch was drawn

    @property
    def splits(self):
        return self.domains[0].splits

    @property
    def tokens_per_step(self):
        return self.cfg.batch_size * self.cfg.grad_accum * self.objective.tokens_per_row


def _restore_settings(s, ckpt):
    """--resume: the run continues with the settings it was started with; only flags given now change them (a longer
    --max-iters, say). Falling back to the preset instead would silently change lr or schedule mid-run."""
    saved = ckpt["model_config"]
    for key, value in s.model.items():
        if key in s.explicit and saved.get(key) != value:
            if key == "block_size" and value > saved[key]:
                raise UsageError(f"--block-size {value} is larger than the checkpoint's position table "
                                 f"({saved[key]} positions)")
            raise UsageError(f"--resume: --{key.replace('_', '-')} {value!r} does not match the checkpoint's "
                             f"{saved.get(key)!r}")
    saved_train = ckpt["train_config"]
    for key in ("model", "tokenizer", "data", "val_docs", "vocab_size"):
        if key in s.explicit and getattr(s.cfg, key) != saved_train[key]:
            raise UsageError(f"--resume: --{key.replace('_', '-')} {getattr(s.cfg, key)!r} does not match the "
                             f"checkpoint's {saved_train[key]!r}")
    for key, value in saved_train.items():
        if key not in s.explicit and key not in ("resume", "overwrite", "bench", "out_dir") and hasattr(s.cfg, key):
            setattr(s.cfg, key, value)
    s.model = {k: v for k, v in saved.items() if k not in derived(model_module(s.cfg.model))}
    s.demo = {**ckpt.get("demo_config", {}), **{k: v for k, v in s.demo.items() if k in s.explicit}}


def _weights_to_start_from(s, mod):
    """--init-from: (model config kwargs, state dict, tokenizer identity or None) from our ckpt.pt or a Hugging Face
    directory. The architecture comes from the weights; flags may change what does not change a parameter's shape."""
    path = s.cfg.init_from
    if os.path.isdir(path):
        if not hasattr(mod.Model, "from_pretrained"):
            raise UsageError(f"--init-from {path}: {s.cfg.model} cannot read Hugging Face directories")
        try:
            hf = mod.Model.from_pretrained(path)
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"--init-from {path}: {e}") from None
        return {k: v for k, v in asdict(hf.config).items() if k not in derived(mod)}, hf.state_dict(), None, \
            hf.config.vocab_size
    ckpt = load_checkpoint(path, "--init-from")
    if ckpt["train_config"]["model"] != s.cfg.model:
        raise UsageError(f"--init-from {path}: a {ckpt['train_config']['model']} checkpoint, not {s.cfg.model}")
    if "tokenizer" in s.explicit and s.cfg.tokenizer != ckpt["train_config"]["tokenizer"]:
        raise UsageError(f"--init-from: --tokenizer {s.cfg.tokenizer!r} does not match the checkpoint's "
                         f"{ckpt['train_config']['tokenizer']!r} (the weights belong to its ids)")
    s.cfg.tokenizer = ckpt["train_config"]["tokenizer"]
    return {k: v for k, v in ckpt["model_config"].items() if k not in derived(mod)}, ckpt["model"], ckpt["tokenizer"], \
        None


def setup(argv, dist=Dist()):
    """Resolve the settings, check them, read the data and build the model, objective and optimizer; restore a resumed
    run's state. Nothing is written to the run directory here."""
    t_start = time.time()
    s = resolve_config(argv or [])
    cfg, mod = s.cfg, model_module(s.cfg.model)
    cfg.out_dir = cfg.out_dir or os.path.join("out", cfg.model)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    ckpt = init = None
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        _restore_settings(s, ckpt)
    elif os.path.exists(ckpt_path) and not cfg.bench and not cfg.overwrite:
        raise UsageError(f"{cfg.out_dir} already holds a run (ckpt.pt); pass --resume to continue it, --overwrite to "
                         f"replace it, or --out-dir to start another")
    if cfg.init_from and not cfg.resume:
        init_kwargs, init_state, init_tok, init_vocab = _weights_to_start_from(s, mod)
        s.model = {**init_kwargs, **{k: v for k, v in s.model.items() if k in s.explicit}}
        init = (init_state, init_vocab)
    device = pick_device(cfg.device)  # after a resume has restored the run's own --device/--dtype
    if dist.world > 1 and device == "cuda":
        device = f"cuda:{dist.local_rank}"
    dtype = pick_dtype(cfg.dtype, device)
    if dtype not in getattr(mod, "DTYPES", TORCH_DTYPES):
        raise UsageError(f"{cfg.model} does not train in {dtype}{' (what --dtype auto picks here)' if cfg.dtype == 'auto' else ''}; "
                         f"use --dtype {' or '.join(mod.DTYPES)}")
    if cfg.schedule not in SCHEDULES:
        raise UsageError(f"unknown --schedule {cfg.schedule!r}; choose from: {', '.join(SCHEDULES)}")
    for name in ("batch_size", "grad_accum", "eval_interval", "log_interval"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    budget_s = parse_duration(cfg.max_time)
    if cfg.max_iters < (0 if budget_s else 1):
        raise UsageError("--max-iters must be at least 1 (0 = no cap is only meaningful with --max-time)")
    try:
        mod.Config(vocab_size=1, **s.model)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None

    tok_ident = ckpt["tokenizer"] if ckpt else (init_tok if init else None)
    tokenizer, domains, data_key = main_first(dist, lambda: prepare_domains(cfg, special_tokens_of(mod), tok_ident))
    if ckpt and ckpt.get("data_key") not in (None, data_key):
        raise UsageError("--resume: the corpus changed since the checkpoint was written (its files' contents differ)")
    if init and init[1] is not None and init[1] != tokenizer.n_vocab:
        raise UsageError(f"--init-from {cfg.init_from}: its vocabulary has {init[1]:,} ids, --tokenizer {cfg.tokenizer} "
                         f"has {tokenizer.n_vocab:,} (with the model's special tokens)")

    torch.manual_seed(cfg.seed)
    model_cfg = mod.Config(**tokenizer_fields(mod, tokenizer), **s.model)
    model = mod.Model(model_cfg).to(device)
    if init:
        try:
            model.load_state_dict(init[0])
        except RuntimeError as e:
            raise UsageError(f"--init-from {cfg.init_from}: its weights do not fit this model "
                             f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    objective, eval_objective = mod.Objective(model_cfg, tokenizer), mod.Objective(model_cfg, tokenizer)
    if cfg.optimizer not in ("adamw", "adamw-scale"):
        raise UsageError(f"unknown --optimizer {cfg.optimizer!r}; choose from: adamw, adamw-scale")
    if cfg.tokens_per_step:
        per_micro = cfg.batch_size * objective.tokens_per_row
        if cfg.tokens_per_step % per_micro:
            raise UsageError(f"--tokens-per-step {cfg.tokens_per_step} is not a multiple of batch_size x tokens per row "
                             f"= {cfg.batch_size} x {objective.tokens_per_row} = {per_micro}")
        cfg.grad_accum = cfg.tokens_per_step // per_micro
    if cfg.grad_accum % dist.world:
        raise UsageError(f"grad_accum {cfg.grad_accum} does not split over {dist.world} processes: each takes "
                         f"grad_accum / {dist.world} micro-batches of the same global batch")
    for d in domains:
        for part, split in d.splits.items():
            if len(split.tokens) < objective.raw_tokens_per_row:
                where = f"{d.name}'s {part}" if len(domains) > 1 else f"the {part}"
                raise UsageError(f"{where} split has {len(split.tokens):,} tokens, fewer than the "
                                 f"{objective.raw_tokens_per_row:,} one row needs; use a smaller --block-size or more "
                                 f"data")
    if len(domains) > 1 and hasattr(objective, "state_dict"):
        raise UsageError(f"--data {cfg.data}: {cfg.model}'s objective keeps per-row streams across steps; it trains on "
                         f"one corpus at a time")
    optimizer, decay_line = make_optimizer(model, cfg, device)
    kind = device.split(":")[0]
    train_model = torch.compile(model) if cfg.compile else model
    if dist.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[dist.local_rank]
                                                                if kind == "cuda" else None)
        torch.manual_seed(cfg.seed + dist.rank)  # the same init everywhere (above), but each process its own dropout
    run = Run(cfg=cfg, mod=mod, model_cfg=model_cfg, demo_cfg=mod.DemoConfig(**s.demo) if hasattr(mod, "DemoConfig")
              else None, tokenizer=tokenizer, domains=domains, data_key=data_key, device=device, dtype=dtype, model=model,
              train_model=train_model, objective=objective, dist=dist,
              eval_objective=eval_objective, optimizer=optimizer,
              scaler=torch.amp.GradScaler(kind, enabled=(dtype == "fp16")),
              autocast=torch.autocast(kind, dtype=TORCH_DTYPES[dtype]) if dtype != "fp32" else contextlib.nullcontext(),
              batch_gen=torch.Generator().manual_seed(cfg.seed), ckpt_path=ckpt_path, resumed=ckpt, t_start=t_start)
    if budget_s and not cfg.bench:
        spent = ckpt.get("budget", {}) if ckpt else {}
        run.budget = Budget(budget_s, spent_before=spent.get("spent", 0.0), eval_seconds=spent.get("eval_seconds", 0.0),
                            decided=spent.get("decided", 0))
        if run.budget.decided:
            cfg.max_iters = run.budget.decided
    elif not cfg.lr_decay_iters and not cfg.resume:
        cfg.lr_decay_iters = cfg.max_iters  # the horizon is fixed now and saved: a longer resumed run keeps it
    if ckpt:
        _restore_state(run, ckpt)
    print(f"model {cfg.model} preset {cfg.preset}: {_num_params(model) / 1e6:.2f}M parameters | {json.dumps(s.model)}"
          + (f" | weights from {cfg.init_from}" if init else ""))
    for d in domains:
        tr, va = d.splits["train"], d.splits["val"]
        print(f"data {d.path if len(domains) > 1 else cfg.data or DEFAULT_DATA}"
              f"{f' (weight {d.weight:.2f})' if len(domains) > 1 else ''}: train {len(tr.doc_names)} docs "
              f"{len(tr.tokens):,} tokens | val {len(va.doc_names)} docs {len(va.tokens):,} tokens "
              f"({', '.join(va.doc_names[:6])}{', ...' if len(va.doc_names) > 6 else ''})")
    print(f"tokenizer {cfg.tokenizer} ({tokenizer.n_vocab} ids)"
          + (f" | {objective.describe()}" if hasattr(objective, "describe") else ""))
    print(f"device {device} {dtype}{' +compile' if cfg.compile else ''}"
          f"{f' x {dist.world} processes' if dist.world > 1 else ''} | tokens per step = batch {cfg.batch_size} x "
          f"{objective.tokens_per_row} per row x grad_accum {cfg.grad_accum} = {run.tokens_per_step:,} | {decay_line}")
    return run


def _num_params(model):
    return model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())


def _restore_state(run, ckpt):
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.evaluated = ckpt["step"], ckpt.get("evaluated", True)
    ranks = ckpt["rng"].get("torch_ranks") or []
    torch.set_rng_state(ranks[run.dist.rank] if len(ranks) == run.dist.world > 1 else ckpt["rng"]["torch"])
    run.batch_gen.set_state(ckpt["rng"]["batch"])
    if run.device.startswith("cuda") and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
    if ckpt.get("objective") is not None:
        run.objective.load_state_dict(ckpt["objective"])
    run.rows = [r for r in _read_metrics(run.cfg.out_dir) if r["step"] <= run.step]
    cfg, horizon = run.cfg, run.cfg.lr_decay_iters
    note = ""
    if cfg.schedule in ("cosine", "linear", "wsd") and horizon and cfg.max_iters > horizon:
        note = (f"; the {cfg.schedule} schedule keeps its horizon: lr reaches its floor {cfg.min_lr:g} at step {horizon} "
                f"and stays there (to re-warm on purpose, start a new run with --init-from)")
    print(f"resuming at step {run.step} of {cfg.max_iters or '(budget not yet fixed)'}{note}")


# ----------------------------------------------------------------------------------------------------------------------
# Evaluating and checkpointing a run


def run_eval(run):
    """Val and a train estimate (eval_view) of every corpus: one metrics row and a line on stdout. With a mixture, each
    corpus gets val_<name>_<metric> (and train_<name>_... if it is trained on), and val_<metric> / train_<metric> are
    the averages weighted as the mixture is."""
    t = time.time()
    cfg = run.cfg
    rows = eval_rows(cfg, run.objective)
    min_piece = run.objective.raw_tokens_per_row
    score = lambda pieces: evaluate(run.model, run.eval_objective, pieces, rows, run.device, run.autocast)
    results = {}
    for d in run.domains:
        val_view = eval_view(d.splits["val"], cfg.eval_tokens, spread=False, min_piece=min_piece)
        train_tokens = cfg.eval_train_tokens or sum(len(p.tokens) for p in val_view)
        train_view = eval_view(d.splits["train"], train_tokens, spread=True, min_piece=min_piece)
        val = score(val_view)
        results[d.name] = (score(train_view) if d.weight > 0 else None, val)
    if len(run.domains) == 1:
        tr, val = results[run.domains[0].name]
        line = f"train {fmt_metrics(tr)} | val {fmt_metrics(val)}"
    else:
        mix = lambda i: {k: sum(d.weight * results[d.name][i][k] for d in run.domains if d.weight > 0)
                         for k in results[run.domains[0].name][1]}
        tr, val = mix(0), mix(1)
        for d in run.domains:
            tr.update({f"{d.name}_{k}": v for k, v in (results[d.name][0] or {}).items()})
            val.update({f"{d.name}_{k}": v for k, v in results[d.name][1].items()})
        line = "train " + fmt_metrics({k: v for k, v in tr.items() if k in results[run.domains[0].name][1]}) + " | " + \
            " | ".join(f"val {d.name} {fmt_metrics(results[d.name][1])}" for d in run.domains)
    seconds = time.time() - t
    log_row(run, {"kind": "eval", "step": run.step, **{f"train_{k}": v for k, v in tr.items()},
                  **{f"val_{k}": v for k, v in val.items()}, "time": run_time(run)})
    print(f"eval step {run.step}: {line} ({seconds:.1f}s)", flush=True)


def checkpoint(run):
    """Every process calls it (dropout's random state is per process); process 0 writes."""
    cuda = run.device.startswith("cuda")
    ranks = None
    if run.dist.world > 1:
        ranks = [None] * run.dist.world
        torch.distributed.all_gather_object(ranks, torch.get_rng_state())
    if not run.dist.main:
        return
    save_checkpoint(run.ckpt_path, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "step": run.step, "evaluated": run.evaluated, "model_config": asdict(run.model_cfg),
        "train_config": asdict(run.cfg), "demo_config": asdict(run.demo_cfg) if run.demo_cfg else {},
        "tokenizer": run.tokenizer.identity(), "data_key": run.data_key,
        "rng": {"torch": torch.get_rng_state(), "torch_ranks": ranks, "batch": run.resume_point[0],
                "cuda": torch.cuda.get_rng_state(run.device) if cuda else None},
        "objective": run.resume_point[1],
        "budget": run.budget.state(run_time(run)) if run.budget else {},
    })


def log_row(run, row):
    run.rows.append(row)
    if not run.dist.main:
        return
    with open(os.path.join(run.cfg.out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def run_time(run):
    return time.time() - run.t_start


def draw_train_batch(run, rows):
    """One step's rows from the objective, all drawn from the loop's generator. With a mixture, each row's corpus is
    drawn first (multinomial with the mixture's weights), then each corpus's rows, then they are stacked."""
    if len(run.domains) == 1:
        return run.objective.train_batch(run.splits["train"], rows, run.batch_gen)
    weights = torch.tensor([d.weight for d in run.domains])
    counts = torch.bincount(torch.multinomial(weights, rows, replacement=True, generator=run.batch_gen),
                            minlength=len(run.domains)).tolist()
    parts = [run.objective.train_batch(d.splits["train"], n, run.batch_gen) for d, n in zip(run.domains, counts) if n]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------------------------------------------------
# The loop


class Interrupted(Exception):
    pass


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C / SIGTERM set a flag; the loop finishes its step, saves and returns. A second one aborts at once."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        print(f"\n{stop['signal']}: finishing this step, then saving a checkpoint (press again to abort)", flush=True)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def loop(run, on_step=None):
    """Evaluate when due, then one optimizer step, until max_iters. Returns the metric rows."""
    cfg, main = run.cfg, run.dist.main
    stateful = hasattr(run.objective, "state_dict")

    def draw_next():  # the next step's batch, and what a checkpoint must save to draw it again after a resume
        run.resume_point = (run.batch_gen.get_state(), copy.deepcopy(run.objective.state_dict()) if stateful else None)
        run.next_batch = draw_train_batch(run, cfg.batch_size * cfg.grad_accum)

    draw_next()  # first: an objective that cannot draw from this data says so before anything is written
    if main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        atomic_write_text(os.path.join(cfg.out_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in run.rows))
    peak, flops = None, getattr(run.model, "flops_per_token", lambda: None)()
    timed, t_log, last_plot = [], time.time(), time.time()
    with stop_on_signals() as stop:
        try:
            while True:
                if (run.step % cfg.eval_interval == 0 or run.step == cfg.max_iters) and not run.evaluated:
                    t_eval = time.time()
                    if main:
                        run_eval(run)
                    run.evaluated = True
                    checkpoint(run)
                    if main and (run.step == cfg.max_iters or time.time() - last_plot > PLOT_EVERY):
                        plot(run)
                        last_plot = time.time()
                    run.dist.barrier()
                    if run.budget and not run.budget.eval_seconds:
                        run.budget.eval_seconds = time.time() - t_eval
                    t_log += time.time() - t_eval  # evals do not count toward tokens/s
                if cfg.max_iters and run.step >= cfg.max_iters:
                    break

                lr = lr_at(run.step, cfg)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                t = time.perf_counter()
                batch, tokens = run.next_batch, run.objective.count_tokens(run.next_batch)
                try:
                    loss = optimizer_step(run, batch, draw_next)
                except NonFiniteLoss as e:
                    raise NonFiniteLoss(f"{e} at step {run.step}") from None
                run.step, run.evaluated = run.step + 1, False
                timed.append((time.perf_counter() - t, tokens))
                budget_ready = False
                if run.budget and not run.budget.decided:
                    if run.step > Budget.WARM_UP_STEPS:
                        run.budget.step_times.append(timed[-1][0])
                    budget_ready = main and run.budget.ready()  # process 0 decides for all

                if run.step % cfg.log_interval == 0 or run.step == cfg.max_iters:
                    wall = time.time() - t_log
                    if peak is None and flops:
                        peak = _peak_for_mfu(run, timed)
                    log_step(run, loss, lr, timed, peak, flops, wall)
                    timed, t_log = [], time.time()
                if on_step is not None:
                    on_step(run.step, loss)
                stop_now, budget_ready = run.dist.any(run, stop["signal"] is not None, budget_ready)
                if budget_ready:
                    decide_budget(run)
                if stop_now:
                    raise Interrupted
        except Interrupted:
            checkpoint(run)
            if main:
                plot(run)
            print(f"stopped at step {run.step}; checkpoint saved to {run.ckpt_path}; continue with: python train.py "
                  f"--model {cfg.model} --out-dir {cfg.out_dir} --resume")
            return run.rows
        except NonFiniteLoss as e:
            kept = f"the last good checkpoint ({run.ckpt_path}) is kept" if os.path.exists(run.ckpt_path) else \
                "no checkpoint yet"
            raise UsageError(f"{e}; stopping. {kept}. Try a lower --lr or --grad-clip") from None

    print(f"done: {run.step} steps in {fmt_time(run_time(run))}; wrote {run.ckpt_path}, "
          f"{os.path.join(cfg.out_dir, 'metrics.jsonl')}, {os.path.join(cfg.out_dir, 'loss.png')}")
    if run.demo_cfg is not None and main:
        run.mod.demo(run.model, run.tokenizer, run.demo_cfg, run.device)
    return run.rows


PLOT_EVERY = 60  # seconds: loss.png is redrawn at an eval at most this often (a drawing costs ~1 s), and at the end


def plot(run):
    plot_metrics(run.rows, os.path.join(run.cfg.out_dir, "loss.png"), f"{run.cfg.model} / {run.cfg.preset}")


def decide_budget(run):
    cfg, b = run.cfg, run.budget
    per_step = b.decide(run.step, run_time(run), cfg) if run.dist.main else 0.0
    if run.dist.world > 1:
        decided = [b.decided]
        torch.distributed.broadcast_object_list(decided, src=0)
        b.decided = decided[0]
    cfg.max_iters = b.decided
    if not cfg.lr_decay_iters:
        cfg.lr_decay_iters = b.decided
    print(f"budget {fmt_time(b.seconds)}: {per_step * 1000:.0f} ms/step (median of {len(b.step_times)}) and "
          f"{b.eval_seconds:.1f}s per eval -> {b.decided} steps; the {cfg.schedule} schedule reaches its floor at step "
          f"{cfg.lr_decay_iters}", flush=True)


def _peak_for_mfu(run, timed):
    """The device's peak for MFU, 0 if unknown. On a CPU it is measured (~0.1 s, then cached per machine) only for a run
    planned to last a minute or more; a short run (a test, a trial) never pays for it."""
    per_step = sum(t for t, _ in timed) / len(timed)
    planned = per_step * run.cfg.max_iters if run.cfg.max_iters else parse_duration(run.cfg.max_time)
    peak, how = peak_flops(run.device, run.dtype, run.cfg.cache_dir, measure=planned >= 60 and run.dist.main)
    if peak:
        print(f"MFU is relative to {peak / 1e12:.2f} TFLOP/s ({how})")
    return peak or 0


def log_step(run, loss, lr, timed, peak, flops, wall):
    cfg = run.cfg
    ms = 1000 * sum(t for t, _ in timed) / len(timed)
    tok_s = sum(n for _, n in timed) / max(1e-9, wall)
    mfu = flops * tok_s / (peak * run.dist.world) if peak and flops else None
    log_row(run, {"kind": "train", "step": run.step, "loss": loss, "lr": lr, "tok_s": tok_s, "ms": ms, "mfu": mfu,
                  "time": run_time(run)})
    left = (cfg.max_iters - run.step) * ms / 1000 if cfg.max_iters else None
    print(f"step {run.step}/{cfg.max_iters or '?'} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
          f"{ms:.0f} ms/step | MFU {'n/a' if mfu is None else f'{mfu:.1%}'} | "
          f"ETA {'?' if left is None else fmt_time(left)}", flush=True)


def bench(run):
    """Time full optimizer steps (data, forward, backward, clip, AdamW) after a warm-up; nothing is written."""
    cfg = run.cfg
    draw = lambda: draw_train_batch(run, cfg.batch_size * cfg.grad_accum)
    sync = torch.cuda.synchronize if run.device.startswith("cuda") else (lambda: None)
    for _ in range(5):
        optimizer_step(run, draw())
    sync()
    tokens, t = 0, time.perf_counter()
    for _ in range(cfg.bench_iters):
        batch = draw()
        tokens += run.objective.count_tokens(batch)
        optimizer_step(run, batch)
    sync()
    seconds = time.perf_counter() - t
    ms, tok_s = seconds * 1000 / cfg.bench_iters, tokens / seconds
    peak, how = peak_flops(run.device, run.dtype, cfg.cache_dir, remeasure=run.dist.main)
    flops = getattr(run.model, "flops_per_token", lambda: None)()
    mfu = flops * tok_s / peak if peak and flops else None
    print(f"bench: {ms:.1f} ms/step | {tok_s:,.0f} tokens/s | MFU {'n/a' if mfu is None else f'{mfu:.1%}'} "
          f"({how}) | {cfg.bench_iters} steps of {run.tokens_per_step:,} tokens")
    return [{"kind": "bench", "ms": ms, "tok_s": tok_s, "mfu": mfu}]


def train(argv=None, on_step=None):
    """Run training as `python train.py argv...` would. on_step(step, loss) is called after every optimizer step (tests
    and notebooks use it to watch or interrupt a run). Returns the list of metric rows."""
    dist = init_distributed()
    if not dist.main:
        sys.stdout = open(os.devnull, "w")  # one log: process 0's (errors still reach stderr)
    # Subnormal floats (magnitudes below ~1e-38 in fp32) take a slow path in x86 CPUs' arithmetic. Training makes some
    # values that small (sharpened attention probabilities, their gradients): the T5 quick start's fp32 steps went
    # from ~125 to ~277 ms between steps 300 and 550, and one step on its final checkpoint took 330 ms with subnormals,
    # 130 ms with them flushed to zero (README errata). Flushing changes nothing of any size; CPU only, undone on return.
    flush = torch.set_flush_denormal(True)
    try:
        run = setup(argv, dist)
        return bench(run) if run.cfg.bench else loop(run, on_step)
    finally:
        if flush:
            torch.set_flush_denormal(False)
        if dist.world > 1:
            # Leaving the group is best effort: after an error, another process may already have gone, and gloo then
            # raises "connection closed" here, which would hide the error that actually stopped the run.
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# A finished run, for experiments and notebooks: its model, data and evaluation, in the run's own device and precision.


@dataclass
class FinishedRun:
    model: torch.nn.Module
    tokenizer: object
    corpora: dict  # {corpus name: {"train": Split, "val": Split}}: one, or each corpus of a mixture
    cfg: TrainConfig
    device: str
    autocast: object

    @property
    def splits(self):
        return next(iter(self.corpora.values()))

    def evaluate(self, objective, part="val", max_tokens=None, corpus=None):
        """Metrics of `objective` (e.g. the run's own, with other settings) on the leading max_tokens of a split (of
        `corpus`, by default the first)."""
        rows = eval_rows(self.cfg, objective)
        split = (self.corpora[corpus] if corpus else self.splits)[part]
        view = eval_view(split, max_tokens, spread=part == "train", min_piece=objective.raw_tokens_per_row)
        return evaluate(self.model, objective, view, rows, self.device, self.autocast)


def open_run(ckpt_path, model=None, flag="open_run"):
    """The run that wrote ckpt_path: model in eval mode on the run's device, tokenizer, splits, and evaluate(). `model`
    and `flag` as in load_for_inference."""
    model, tokenizer, ckpt = load_for_inference(ckpt_path, flag=flag, model=model)
    cfg = TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in {f.name for f in fields(TrainConfig)}})
    _, domains, _ = prepare_domains(cfg, list(tokenizer.specials), ckpt["tokenizer"])
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    autocast = torch.autocast(device.split(":")[0], dtype=TORCH_DTYPES[dtype]) if dtype != "fp32" \
        else contextlib.nullcontext()
    return FinishedRun(model.to(device), tokenizer, {d.name: d.splits for d in domains}, cfg, device, autocast)


def main(argv=None):
    try:
        train(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike; one says so
            print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
