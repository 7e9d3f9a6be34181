"""
One training loop for every model in this repository (MODELS below): each plugs into the same loop.

    python train.py --model gpt                  # char-level GPT, bundled Shakespeare, CPU, ~4 min
    python train.py --model gpt --help           # every flag, generated from the config dataclasses
    python train.py --model gpt --resume         # continue out/gpt from its checkpoint
    python train.py --model gpt --max-time 90s   # as good a model as 90 s of this machine allow
    # continue from a checkpoint, replaying a share of the old corpus:
    python train.py --model gpt --data milton:0.75,shakespeare:0.25 --init-from out/gpt/ckpt.pt
    # 4 GPUs:
    torchrun --standalone --nproc_per_node=4 train.py --model gpt --preset gpt2 --data PREPARED
    python train.py --model gpt --preset nanogpt-cpu --bench  # ms/step, tok/s, MFU; writes nothing

The file follows a run: configuration -> device and precision -> optimisation -> checkpoints ->
evaluation -> the time budget -> many processes -> setting a run up -> `loop` (one screen).
Data and tokenizers: data.py.
A model file plugs in with (optional ones marked ?):
  Config, PRESETS, DEFAULT_PRESET  architecture dataclass (a --flag per field); named sizes, recipes
  SPECIAL_TOKENS, TOKEN_IDS?       tokens the objective needs ([MASK], ...), above all ordinary ids;
                                   {config field: special token}: the fields the loop fills with ids
  Model(config)                    nn.Module: ?no_weight_decay(), ?flops_per_token(), ?num_params(),
                                   ?from_pretrained(path) (--init-from a Hugging Face directory)
  Objective(config, tokenizer)     turns token data into batches and scores them:
    raw_tokens_per_row, tokens_per_row   tokens a row draws / counts as processed (GPT: T + 1, T)
    train_batch(split, batch_size, generator) -> dict of tensors, rows first
    count_tokens(batch) -> tokens, for tokens/s
    eval_batches(split, batch_size) -> iterator of dicts, deterministic, covering `split`
    denominators(batch) -> {term: count}, what each loss term is averaged over, for a whole step
    loss(model, batch, denominators=None) -> (loss, dict of sums); summarize(sums) -> metrics
    ?describe() -> a line for the log
    ?state_dict(), ?load_state_dict(), ?reset(): state across steps (XLNet)
    Trap: loss() calls model(...) itself, never a submodule. Under torchrun `model` is the DDP
    wrapper, which syncs gradients only through its forward.
  Classifier?(model, task, labels, tokenizer)  --task: the paper's fine-tuning input layout and head
                                   (finetune.py: encode(a, b), forward(...) -> per-example loss, label)
  DemoConfig?, demo?(model, tokenizer, demo_config, device)  shown when a run ends (GPT: samples)
  DTYPES?                          the precisions the model trains in (T5: never fp16)
Slides (lecture 001): "Training recipe for LLMs" and "Pretraining language models".
Papers: Loshchilov & Hutter 2019 (AdamW) and 2017 (cosine, SGDR); Goyal et al. 2017 §2.2 (linear
warm-up); GPT-3 (Brown et al. 2020) §2.3 and App. B (the gpt2 preset); Devlin et al. 2019 App. A.2
(BERT's linear decay); Raffel et al. 2020 §3.1.2 (T5's inverse square root); Geiping & Goldstein
2023 "Cramming" §4 (a schedule fitted to a wall-clock budget).
"""

import argparse
import contextlib
import copy
import datetime
import functools
import importlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

import finetune
import tasks
from common import UsageError, command, pyplot, require
from data import DEFAULT_DATA, atomic_write_text, prepare_domains, special_tokens_of, tokenizer_from_identity

ROOT = os.path.dirname(os.path.abspath(__file__))
# --model name -> module. Adding a model = one line here and one file.
# gpt: gpt.py's GPT-2, through mtp.py. mtp.py adds the optional multi-token heads (--mtp-heads);
# without them it builds a plain gpt.GPT.
MODELS = {"gpt": "mtp", "bert": "bert", "electra": "electra", "t5": "t5", "xlnet": "xlnet", "llama": "llama",
          "maelm": "maelm", "unilm": "unilm", "t5lm": "t5lm"}

# ----------------------------------------------------------------------------------------------------------------------
# Configuration. Every field is a --flag (underscores become dashes).
# Presets and checkpoints fill the same fields.


def opt(default, help):
    return field(default=default, metadata={"help": help})


def cli_flag(name):
    """The --flag of a config field: cli_flag("max_iters") -> "--max-iters"."""
    return "--" + name.replace("_", "-")


SCHEDULES = ("cosine", "linear", "rsqrt", "constant", "wsd")
OPTIMIZERS = ("adamw", "adamw-scale", "muon")
TOKENIZERS = ("char", "gpt2", "bpe")


@dataclass
class TrainConfig:
    model: str = opt("gpt", f"which model file to train: {', '.join(MODELS)}")
    preset: str = opt("", "named size/recipe from the model file (default: its DEFAULT_PRESET)")
    data: str = opt("", "directory or glob of UTF-8 .txt files, one document each, or a "
                        "`python data.py prepare` directory, or a mixture such as "
                        "milton:0.75,shakespeare:0.25 (bundled corpora by name; every corpus named "
                        "is evaluated, weight 0 included) (default: bundled Shakespeare)")
    val_docs: str = opt("", "comma-separated document names to hold out (default: the bundled "
                            "held-out works, else every 10th document)")
    tokenizer: str = opt("char", "char | gpt2 | bpe")
    vocab_size: int = opt(1024, "vocabulary size to train when --tokenizer bpe "
                                "(the model's special tokens on top)")
    out_dir: str = opt("", "where ckpt.pt (the latest), best.pt (the lowest val loss), metrics.jsonl "
                           "and loss.png go (default: out/<model>)")
    cache_dir: str = opt(os.path.join(ROOT, "data", "cache"),
                         "where tokenised corpora, trained tokenizers and this machine's measured "
                         "peak FLOP/s are cached")
    device: str = opt("auto", "auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    dtype: str = opt("auto", "auto | bf16 | fp16 | fp32; auto = bf16 where the device does it "
                             "natively, else fp16 + GradScaler on CUDA, else fp32")
    compile: bool = opt(False, "torch.compile the model (slow start, faster steps on GPU)")
    batch_size: int = opt(16, "micro-batch: rows per forward/backward pass")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    tokens_per_step: int = opt(0, "tokens per optimizer step; "
                                  "grad_accum = this / (batch_size x tokens per row)")
    max_iters: int = opt(2000, "optimizer steps (with --max-time: at most this many; 0 = no cap)")
    max_time: str = opt("", "wall-clock budget for the whole run, e.g. 4m, 90s, 1h30m: the step "
                            "count is fixed from the measured step and eval times so the schedule "
                            "ends on time ('' or 0 = off; giving --max-iters alone turns a "
                            "preset's budget off)")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "floor of the decay")
    schedule: str = opt("cosine", "after warm-up: cosine | linear (decay to --min-lr at the "
                                  "horizon) | rsqrt (lr * sqrt(warmup / step), T5) | constant | "
                                  "wsd (constant, then a linear cooldown to --min-lr over the last "
                                  "--cooldown of the steps)")
    cooldown: float = opt(0.2, "wsd: the share of the steps after warm-up "
                               "spent decaying to --min-lr")
    warmup_iters: int = opt(100, "linear warm-up steps")
    lr_decay_iters: int = opt(0, "the decay's horizon: lr reaches --min-lr at this step (0 = "
                                 "max_iters, fixed when the run starts; a resumed run keeps it)")
    optimizer: str = opt("adamw", "adamw | adamw-scale (each tensor's step scaled by its RMS, "
                                  "Adafactor's relative step: how nanoT5 trains T5) | muon (Muon on the "
                                  "hidden weight matrices, AdamW on the rest)")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay, on weight matrices only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon (BERT and ELECTRA used 1e-6)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = opt(500, "evaluate, plot and checkpoint every N steps (and at the end)")
    eval_tokens: int = opt(1 << 20, "val tokens scored at each eval: the same leading slice of the "
                                    "val split each time (0 = all; the default scores the bundled "
                                    "held-out works in full)")
    eval_train_tokens: int = opt(0, "train tokens scored at each eval, in 32 slices spread over "
                                    "the whole train split (0 = as many as val)")
    eval_batch_size: int = opt(0, "rows per eval forward pass "
                                  "(0 = about 2K tokens, at least --batch-size)")
    divergence_evals: int = opt(3, "stop the run when the val loss is above the first evaluation's "
                                   "(not with --init-from), or above 2x the best so far, at this many "
                                   "evaluations in a row: "
                                   "it diverged; best.pt keeps the best weights (0 = never stop)")
    log_interval: int = opt(10, "print a training line every N steps")
    seed: int = opt(1337, "seeds the model init, the batch order and dropout")
    resume: bool = opt(False, "continue the run in --out-dir from its ckpt.pt (the latest checkpoint)")
    overwrite: bool = opt(False, "start a new run even if --out-dir already holds one")
    init_from: str = opt("", "start a new run (step 0, fresh optimizer and schedule) from these "
                             "weights: a ckpt.pt or best.pt of this repository or a Hugging Face "
                             "directory of the same model")
    task: str = opt("", "fine-tune on a downstream task instead of pretraining: genre | next-line "
                        "(tasks.py), usually --init-from a pretrained run; '' = pretrain")
    train_examples: int = opt(0, "--task: labelled training examples, the first N of the task's "
                                 "balanced order (0 = all)")
    random_init: bool = opt(False, "--task: --init-from's architecture and tokenizer, its weights "
                                   "drawn afresh: the 'no pretraining' baseline")
    peft: str = opt("none", "--task: none (every weight trained) | lora | adapter | prefix (a trained "
                            "prompt of input vectors); the pretrained weights frozen (finetune.py)")
    lora_r: int = opt(8, "--peft lora: rank r of each update B A")
    lora_alpha: float = opt(16.0, "--peft lora: the update is scaled by alpha / r")
    adapter_size: int = opt(16, "--peft adapter: bottleneck width m")
    prompt_tokens: int = opt(8, "--peft prefix: trained input vectors read before the text")
    lm_weight: float = opt(0.0, "--task with --model gpt: lambda of GPT-1's auxiliary LM loss "
                                "(L2 + lambda L1; GPT-1 used 0.5)")
    task_format: str = opt("classifier", "--task: classifier (the family paper's head) | completion "
                                         "(GPT-2's way: the label's word after a task token; gpt, mtp)")
    bench: bool = opt(False, "benchmark: time --bench-iters steps, print ms/step, tokens/s, MFU; "
                             "write nothing")
    bench_iters: int = opt(30, "timed steps for --bench (after 5 warm-up steps)")

    def __post_init__(self):
        """Values no run can use are refused where the config is built, naming the flag as typed."""
        for name, choices in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS),
                              ("tokenizer", TOKENIZERS)):
            value = getattr(self, name)
            require(value in choices,
                    f"unknown {cli_flag(name)} {value!r}; choose from: {', '.join(choices)}")
        for name in ("batch_size", "grad_accum", "eval_interval", "log_interval", "bench_iters",
                     "lora_r", "adapter_size", "prompt_tokens"):
            require(getattr(self, name) >= 1, f"{cli_flag(name)} {getattr(self, name)}: must be at least 1")
        for name in ("min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "adam_eps", "grad_clip",
                     "tokens_per_step", "eval_tokens", "eval_train_tokens", "eval_batch_size",
                     "divergence_evals"):
            value = getattr(self, name)  # nan fails every comparison: refused too
            require(0 <= value < math.inf, f"{cli_flag(name)} {value:g}: must be a number >= 0")
        require(0 < self.lr < math.inf, f"--lr {self.lr:g}: the learning rate must be a number > 0")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1,
                    f"{cli_flag(name)} {getattr(self, name):g}: must be in [0, 1)")
        require(0 <= self.cooldown <= 1, f"--cooldown {self.cooldown:g}: a share of the steps, in [0, 1]")
        require(self.task in ("", *tasks.TASKS), f"--task {self.task!r}: choose {' or '.join(tasks.TASKS)}")
        *others, last = finetune.PEFT
        require(self.peft in finetune.PEFT, f"--peft {self.peft!r}: choose {', '.join(others)} or {last}")
        require(self.task_format in finetune.TASK_FORMATS, f"--task-format {self.task_format!r}: choose "
                f"{' or '.join(finetune.TASK_FORMATS)}")
        require(self.train_examples >= 0, f"--train-examples {self.train_examples}: must be >= 0")
        require(0 <= self.lm_weight < math.inf, f"--lm-weight {self.lm_weight:g}: must be a number >= 0")
        tuning = (self.peft != "none", self.train_examples, self.random_init, self.lm_weight,
                  self.task_format != "classifier")
        require(self.task or not any(tuning),
                "--peft, --train-examples, --random-init, --lm-weight and --task-format fine-tune: give --task too")
        require(not self.random_init or self.init_from,
                "--random-init takes the architecture of --init-from: give --init-from too")
        budget = parse_duration(self.max_time)  # a malformed --max-time fails here, before reading
        require(self.max_iters >= (0 if budget else 1),
                "--max-iters must be at least 1 (0 = no cap is only meaningful with --max-time)")


def parse_duration(text):
    """'4m' -> 240.0, '1h30m' -> 5400.0, '90' or '90s' -> 90.0, '' or '0' -> 0.0 (no budget)."""
    text = str(text).strip().lower()
    if text in ("", "0"):
        return 0.0
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
    require(m and any(m.groups()),
            f"--max-time {text!r}: expected a duration such as 4m, 90s, 1h30m or 240")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return 3600 * h + 60 * mi + s


def model_module(name):
    require(name in MODELS, f"unknown --model {name!r}; choose from: {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name])


def derived(mod):
    """Model-config fields set from the tokenizer, never from a flag: vocab_size, and the ids of
    the special tokens its config names (TOKEN_IDS, e.g. {"pad_token_id": "[PAD]"} if it pads)."""
    return {"vocab_size", *getattr(mod, "TOKEN_IDS", {})}


def tokenizer_fields(mod, tokenizer):
    """{vocab_size: n, pad_token_id: ..., ...}: the derived fields' values for this tokenizer."""
    ids = {name: tokenizer.specials[token] for name, token in getattr(mod, "TOKEN_IDS", {}).items()}
    return {"vocab_size": tokenizer.n_vocab, **ids}


def config_groups(mod):
    """(title, dataclass, fields) per group of flags: the loop's, the model's, its demo's if any."""
    model_fields = [f for f in fields(mod.Config) if f.name not in derived(mod)]
    groups = [("training", TrainConfig, fields(TrainConfig)),
              (f"model ({mod.__name__}.Config)", mod.Config, model_fields)]
    if hasattr(mod, "DemoConfig"):
        groups.append((f"end-of-run demo ({mod.__name__}.DemoConfig)", mod.DemoConfig,
                       fields(mod.DemoConfig)))
    return groups


def field_comments(cls):
    """{field: its end-of-line comment} from a config class's source, base classes included. Model
    configs document each field with a comment, as nanoGPT does, not metadata: --help shows them."""
    # a base class's fields, then a subclass's
    sources = [inspect.getsource(c) for c in reversed(cls.__mro__[:-1])]
    found = (re.match(r"\s+(\w+):[^#]*#\s*(.*)", line)
             for source in sources for line in source.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def _usage_error(message):
    raise UsageError(f"{message} (see --help)")


def build_parser(mod, preset_name):
    """The CLI, generated from the config dataclasses: one typed --flag per field.
    --help shows the value a run will use: the preset's, where it sets one."""
    p = argparse.ArgumentParser(prog="train.py", allow_abbrev=False, description=(
        "Train a model of this repository. Flags left out come from the preset "
        f"({mod.__name__}: {preset_name}), then from the defaults; --help shows the values that "
        "apply to this --model/--preset."))
    p.error = _usage_error  # one line, exit 2, like every other bad input
    preset = mod.PRESETS.get(preset_name, {})
    for title, cls, fs in config_groups(mod):
        g = p.add_argument_group(title)
        comments, defaults = field_comments(cls), cls()
        for f in fs:
            value = preset.get(f.name, getattr(defaults, f.name))
            shown = f" [{value!r}{f' from preset {preset_name}' if f.name in preset else ''}]"
            help = (f.metadata.get("help", comments.get(f.name, ""))
                    + (shown if value not in ("", None) else ""))
            help = help.replace("%", "%%")  # argparse %-formats help texts
            if f.type is bool:
                g.add_argument(cli_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help)
            else:
                g.add_argument(cli_flag(f.name), dest=f.name, type=f.type, default=argparse.SUPPRESS,
                               help=help, metavar=f.name.upper())
    return p


@dataclass
class Settings:
    """What the command line asked for: the loop's config, the model file's configs (keyword
    dicts: vocab_size is known only with the tokenizer), and which keys the user typed."""
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
    require(preset_name in mod.PRESETS,
            f"unknown --preset {preset_name!r} for {known.model}; "
            f"choose from: {', '.join(mod.PRESETS)}")
    explicit = vars(build_parser(mod, preset_name).parse_args(argv))
    if "max_iters" in explicit and "max_time" not in explicit:
        explicit["max_time"] = ""  # an explicit step count asks for exactly that many: no budget
    groups = [{f.name for f in fs} for _, _, fs in config_groups(mod)]
    values = [{}, {}, {}]
    for key, value in {**mod.PRESETS[preset_name], **explicit}.items():
        where = [i for i, names in enumerate(groups) if key in names]
        require(where, f"preset {preset_name!r} sets unknown key {key!r}")
        values[where[0]][key] = value
    cfg = TrainConfig(**{**values[0], "preset": preset_name})
    refuse_conflicts(cfg, set(explicit))
    return Settings(cfg, values[1], values[2], set(explicit))


def refuse_conflicts(cfg, explicit):
    """Flags that ask for two different things: refused, rather than one of them silently ignored.
    Only typed flags count (a resumed run restores --init-from from its checkpoint, rightly)."""
    require(not (cfg.resume and cfg.overwrite),
            "--resume continues the run in --out-dir, --overwrite replaces it: give one of them")
    require(not (cfg.resume and cfg.init_from),
            "--resume continues from the run's own ckpt.pt, --init-from starts a new run from other "
            "weights: give one of them")
    require(not ({"tokens_per_step", "grad_accum"} <= explicit and cfg.tokens_per_step),
            "--tokens-per-step sets --grad-accum (tokens / (batch_size x tokens per row)): give one of them")


# ----------------------------------------------------------------------------------------------------------------------
# Device, precision, throughput. A CPU's dtypes are not all equal. With AVX512-BF16 or AMX,
# bf16 matmuls run several times faster than fp32. Without them (AVX2-only CPUs, most laptops),
# bf16 and fp16 are emulated, ~100-500x slower.


def pick_device(name):
    """auto: cuda > mps > cpu. A device this machine does not have is refused with one line."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    require(name.split(":")[0] in ("cpu", "cuda", "mps"),
            f"unknown --device {name!r}; choose from: auto, cpu, cuda, cuda:N, mps")
    require(not name.startswith("cuda") or torch.cuda.is_available(),
            f"--device {name}: CUDA is not available on this machine")
    require(name != "mps" or torch.backends.mps.is_available(),
            "--device mps: MPS is not available on this machine")
    return name


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device, dtype):
    """The mixed-precision context of every forward: autocast to bf16/fp16, or nothing for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=TORCH_DTYPES[dtype])


@functools.lru_cache(maxsize=None)
def cpu_slowdown(dtype):
    """How many times slower a 128^3 matmul is in `dtype` than in fp32 here (best of 3, a few ms):
    ~0.5 for bf16 with AMX, ~1 with AVX512-BF16, 100+ emulated. Measured, because the CPU flags say
    'native' even where the math library was told not to use them (ONEDNN_MAX_CPU_ISA)."""
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
    """auto: bf16 where the device does it natively, fp16 (+ GradScaler) on older GPUs, else fp32.
    An explicit bf16 or fp16 on a CPU that emulates it runs anyway, after a line on the cost."""
    kind = device.split(":")[0]
    if name != "auto":
        require(name in TORCH_DTYPES, f"unknown --dtype {name!r}; choose from: auto, bf16, fp16, fp32")
        if kind == "cpu" and not cpu_has_native(name):
            print(f"warning: --dtype {name}: this CPU has no native {name} matmuls (no "
                  f"AVX512-BF16/AMX); emulated they ran {cpu_slowdown(name):.0f}x slower than fp32 "
                  f"here, and the run will be about that much slower. --dtype fp32 (what auto "
                  f"picks on this CPU) avoids it.", file=sys.stderr)
        return name
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_has_native("bf16") else "fp32"
    return "fp32"  # mps: autocast support varies by macOS version; fp32 always works


# Dense bf16 tensor-core peaks (FLOP/s) from vendor datasheets, for MFU (PaLM App. B,
# Chowdhery et al. 2022). In order: the first key in the device's name wins ("H100 PCIe" first).
GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                 "L40S": 362e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12,
                 "T4": 65e12}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def peak_flops(device, dtype, cache_dir, measure=True, remeasure=False):
    """(FLOP/s or None, how it was obtained). A GPU: its datasheet (unknown: None, not a wrong MFU).
    A CPU: the best of 5 square matmuls of the first size taking 5 ms, cached per machine and dtype:
    MFU relative to what this CPU reaches. measure=False only reads the cache. remeasure=True
    (--bench) keeps the best seen: a quiet machine corrects a busy one. Not in emulated dtypes."""
    kind = device.split(":")[0]
    if kind == "cuda":
        name = torch.cuda.get_device_name(device)
        key = next((k for k in GPU_PEAK_BF16 if k in name), None)
        return ((GPU_PEAK_BF16[key], f"{name} datasheet dense bf16") if key
                else (None, f"{name}: peak unknown"))
    if kind != "cpu":
        return None, "peak unknown"
    if not cpu_has_native(dtype):
        return None, f"{dtype} is emulated on this CPU"
    isa = f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '')} {os.environ.get('ATEN_CPU_CAPABILITY', '')}"
    machine = (f"{_cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__} | "
               f"{dtype} | {isa}")
    path = os.path.join(cache_dir, "cpu_peak.json")
    cached = json.load(open(path)) if os.path.exists(path) else {}
    how = f"best {dtype} matmul on this CPU, measured once and cached in {path}"
    if machine in cached and not remeasure:
        return cached[machine], how
    if not measure:
        return None, "not measured yet"
    g = torch.Generator().manual_seed(0)  # not the global one: that would shift dropout's
    for n in (256, 512, 1024, 2048):
        a = torch.randn(n, n, generator=g).to(TORCH_DTYPES[dtype])
        best = float("inf")
        for _ in range(5):  # the fastest of several: the first pay for warm-up and clock ramp-up
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
    """(AdamW, a line on its groups): decoupled weight decay on weight matrices only. Biases, norm
    gains and no_weight_decay() (position tables) are not pulled toward 0: decaying them gives no
    "simpler" model, just another one (the convention since BERT's AdamWeightDecayOptimizer).
    --optimizer muon: Muon on the hidden matrices (muon_matrices), this AdamW on the rest."""
    hidden = muon_matrices(model) if cfg.optimizer == "muon" else set()
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and n not in skip and id(p) not in hidden]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and n not in skip)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw-scale":
        optimizer = AdamWScale(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
    else:
        # fused: one kernel updates every tensor (same maths: tests/test_train.py). On a CPU it is
        # ~3x faster than the per-tensor loop: it matters for small models, whose step is a few ms.
        fused = device.split(":")[0] in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, fused=fused or None)
    count = lambda ps: f"{len(ps)} tensors ({sum(p.numel() for p in ps):,} parameters)"
    skipped = ", " + ", ".join(sorted(skip)) if skip else ""
    line = f"weight decay {cfg.weight_decay} on {count(decay)}; none on {count(no_decay)}: biases, norm gains{skipped}"
    if hidden:
        muon = [p for _, p in named if id(p) in hidden]
        emulated = device.split(":")[0] == "cpu" and not cpu_has_native("bf16")  # see newton_schulz_in_fp32
        optimizer = MuonAdamW(torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95,
                                               nesterov=True, adjust_lr_fn="match_rms_adamw"), optimizer,
                              fp32_newton_schulz=emulated)
        line = (f"Muon on {count(muon)}: the hidden weight matrices, weight decay {cfg.weight_decay}"
                f"{' (Newton-Schulz in fp32: no native bf16 here)' if emulated else ''}; AdamW: {line}")
    return optimizer, line


def muon_matrices(model):
    """ids of the weights --optimizer muon gives torch.optim.Muon (Jordan et al. 2024): the hidden
    layers' matrices, as the recipes split them. Muon orthogonalises each matrix's momentum (5
    Newton-Schulz steps): every direction of the update gets the same size. That suits a matmul's
    weight, not a lookup table (embeddings), the output head, gains or biases: those keep AdamW.
    adjust_lr_fn="match_rms_adamw" (Liu et al. 2025, "Muon is scalable", §2.2) scales each update to
    AdamW's RMS (0.2 sqrt(max(A, B))): one --lr and one --weight-decay serve both optimizers."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {id(m.weight) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"
            and m.weight.requires_grad and id(m.weight) not in tables}


@contextlib.contextmanager
def newton_schulz_in_fp32():
    """Within it, torch.optim.Muon orthogonalises in fp32. Trap: torch's Newton-Schulz casts to bf16,
    fixed (`grad.bfloat16()`): right on a GPU or a CPU with native bf16, but a CPU without it (AVX2
    only, Apple) emulates bf16 matmuls. X X^T X at 128 x 352 took 4.5 ms in bf16 and 0.18 ms in fp32
    on an AMD EPYC Zen 4 restricted to AVX2, and a Muon step of the modern-cpu preset 750 ms, not ~100.
    Here the same iteration (torch's coefficients, steps and eps, passed through) runs in fp32.
    One step on X (m <= n rows after the transpose), A = X X^T: X <- a X + (b A + c A A) X."""
    muon_module = importlib.import_module("torch.optim._muon")
    bf16_version = muon_module._zeropower_via_newtonschulz

    def fp32_version(grad, ns_coefficients, ns_steps, eps):
        a, b, c = ns_coefficients
        tall = grad.size(0) > grad.size(1)
        X = grad.float().T if tall else grad.float()  # (m, n), m <= n: the Gram matrix is the small one
        X = X / X.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
        for _ in range(ns_steps):
            A = X @ X.T  # (m, m)
            X = a * X + (b * A + c * A @ A) @ X
        return X.T if tall else X

    muon_module._zeropower_via_newtonschulz = fp32_version
    try:
        yield
    finally:
        muon_module._zeropower_via_newtonschulz = bf16_version


class MuonAdamW:
    """Two optimizers as the loop's one: the schedule sets "lr" on every group of both, a step steps
    both, a checkpoint holds both states. fp32_newton_schulz: see newton_schulz_in_fp32."""

    def __init__(self, muon, adamw, fp32_newton_schulz=False):
        self.muon, self.adamw, self.fp32_newton_schulz = muon, adamw, fp32_newton_schulz

    @property
    def param_groups(self):
        # looked up each time: load_state_dict gives each optimizer new group dicts (a trap on resume)
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        with newton_schulz_in_fp32() if self.fp32_newton_schulz else contextlib.nullcontext():
            self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


class AdamWScale(torch.optim.Optimizer):
    """AdamW with each tensor's step times max(1e-3, RMS(tensor)): Adafactor's relative step size
    (Shazeer & Stern 2018, §8, "parameter scaling") on Adam, as nanoT5 trains T5 (T5: Adafactor).
    The lr becomes relative to each tensor's scale: an embedding of std 1 and a projection of std
    d^-0.5 move by the same share of themselves. RMS 1 gives exactly AdamW (tests/test_loop.py)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, min_rms=1e-3):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      min_rms=min_rms))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)  # Adam's moments, as in AdamW
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                rms = p.float().pow(2).mean().sqrt().clamp_min(group["min_rms"])  # no host sync
                step = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled (Loshchilov & Hutter)
                p.sub_((m / (v.sqrt() + group["eps"] * math.sqrt(1 - beta2 ** t))) * (step * rms).to(p.dtype))


def lr_at(step, cfg):
    """Linear warm-up from 0 to lr over warmup_iters, then the schedule. Decaying ones reach min_lr
    at the horizon (lr_decay_iters or max_iters) and stay there. wsd holds the peak until its
    cooldown. A horizon of 0 (a budgeted run not yet timed) holds the peak. With lr=1e-3,
    min_lr=1e-4, warmup=100, horizon 2000, cosine: lr_at(50) = 5e-4, lr_at(1050) = 5.5e-4,
    lr_at(2000) = lr_at(5000) = 1e-4."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "rsqrt":  # T5: 1/sqrt(step) after warm-up, continuous with it; no horizon
        return max(cfg.min_lr, cfg.lr * math.sqrt(max(1, cfg.warmup_iters) / max(1, step)))
    horizon = cfg.lr_decay_iters or cfg.max_iters
    if not horizon:
        return cfg.lr
    if step >= horizon:
        return cfg.min_lr
    # warm-up, stable, decay (Hägele et al. 2024 §3; Ibrahim et al. 2024 §7.2's "infinite")
    if cfg.schedule == "wsd":
        decay_start = horizon - round(cfg.cooldown * (horizon - cfg.warmup_iters))
        if step < decay_start:
            return cfg.lr
        return cfg.lr + (cfg.min_lr - cfg.lr) * (step - decay_start) / max(1, horizon - decay_start)
    progress = (step - cfg.warmup_iters) / max(1, horizon - cfg.warmup_iters)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr + shape * (cfg.lr - cfg.min_lr)


def to_device(batch, device):
    """Move a batch; on CUDA via pinned memory: the copy is asynchronous, overlapping the step."""
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
    """One optimizer step on `batch` (batch_size * grad_accum rows): forward and backward per
    micro-batch, then clip and update. Returns the step's loss. Each loss term is averaged over the
    whole step: `denominators` counts its targets up front, each micro-batch's loss is its sum over
    that count. So accumulation is exactly one big batch, even when micro-batches hold different
    numbers of targets (MLM's random 15%, T5's padding). The loss is read back once (one host sync)
    and checked before the update: a NaN never reaches the weights. draw_next() prepares the next
    batch while the device is busy."""
    denominators = run.objective.denominators(batch)
    world = run.dist.world
    micro_batches = chunk(batch, run.cfg.grad_accum)
    share = len(micro_batches) // world  # torchrun: each process takes its own run of micro-batches
    mine = micro_batches[run.dist.rank * share:(run.dist.rank + 1) * share]
    loss_sum = torch.zeros((), device=run.device)
    for i, micro in enumerate(mine):
        # DDP all-reduces gradients after each backward unless told not to: only the last one syncs
        last = i == len(mine) - 1
        with contextlib.nullcontext() if last or world == 1 else run.train_model.no_sync():
            with run.autocast:
                loss, _ = run.objective.loss(run.train_model, to_device(micro, run.device), denominators)
            # each loss is already its share of the step; DDP averages over processes: scale back up
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
# Checkpoints: tensors, numbers, strings, lists, dicts only: torch.load(weights_only=True) reads
# them without running pickled code. Saved to a temp file, then renamed: a crash mid-save keeps
# the previous one.


def save_checkpoint(path, state):
    """torch.save to path + ".tmp", then rename. The file is fsynced before the rename and the
    directory after it: a power cut leaves the old checkpoint or the new one, never an empty file
    under the old name. OSError (a full disk, a permission) -> OSError, the .tmp removed."""
    write_durably(path, lambda f: torch.save(state, f))


def write_durably(path, write):
    """write(f) into path + ".tmp", fsync, rename over path, fsync the directory. Any failure raises
    OSError (torch.save wraps a failed write in a RuntimeError: its OSError is unwrapped) and
    leaves no .tmp behind; path is then what it was before."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else e.__context__
        raise cause if isinstance(cause, OSError) else OSError(str(e)) from None
    try:  # the rename itself is durable once the directory is synced (not possible on every OS)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def copy_durably(src, dst):
    with open(src, "rb") as f:
        write_durably(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def load_checkpoint(path, flag="--resume"):
    """The checkpoint at `path`; errors name the flag the user gave it with."""
    require(os.path.exists(path), f"{flag}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{flag}: {path} is not a readable checkpoint ({e.__class__.__name__}); "
                         f"it may be corrupt") from None
    require(isinstance(ckpt, dict) and {"model", "model_config", "tokenizer", "step"} <= set(ckpt),
            f"{flag}: {path} is not a checkpoint written by train.py")
    return ckpt


def saved_train_config(ckpt):
    """The TrainConfig a checkpoint's run had (keys of older versions that no field has are dropped)."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in known})


def load_for_inference(path, device="cpu", flag="--ckpt", model=None):
    """(model in eval mode, tokenizer, checkpoint dict) from a train.py checkpoint, for samplers.
    With `model` (e.g. "bert", or several: ("t5", "t5lm")), another --model's checkpoint is refused by one line
    naming both."""
    ckpt = load_checkpoint(path, flag)
    name, allowed = ckpt["train_config"]["model"], (model,) if isinstance(model, str) else tuple(model or ())
    require(not allowed or name in allowed,
            f"{flag} {path}: a checkpoint of --model {name}, not {' or '.join(allowed)}")
    mod = model_module(name)
    net, tokenizer = mod.Model(mod.Config(**ckpt["model_config"])), tokenizer_from_identity(ckpt["tokenizer"])
    if ckpt["train_config"].get("task"):  # a fine-tuned run: its classifier (and --peft) around the model
        cfg = saved_train_config(ckpt)
        net, _, _ = finetune.for_task(mod, net, cfg.task, tasks.TASKS[cfg.task][0], tokenizer, cfg)
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval(), tokenizer, ckpt


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation, logging, plotting


def eval_view(split, max_tokens, spread, min_piece=1):
    """The part of a split an eval scores, as a list of Splits. All of it if it fits in max_tokens.
    Else the leading max_tokens (val: the same slice every time), or with spread up to 32 equal
    slices (each >= min_piece tokens) at even offsets: the train estimate covers every document."""
    n = len(split.tokens)
    if not max_tokens or max_tokens >= n:
        return [split]
    if not spread:
        return [split.slice(0, max_tokens)]
    k = max(1, min(32, max_tokens // max(1, min_piece)))
    # they add up to max_tokens exactly
    sizes = [max_tokens * (i + 1) // k - max_tokens * i // k for i in range(k)]
    return [split.slice(i * n // k, i * n // k + size) for i, size in enumerate(sizes)]


def eval_rows(cfg, objective):
    """Rows per eval forward pass: --eval-batch-size, else about 2K tokens (at least a micro-batch).
    Bigger is not faster on a CPU: 256 x 64 chars scored the held-out plays in 7.6 s, 32 x 64 in
    5.9 s (the (B, H, T, T) scores stop fitting in cache)."""
    return cfg.eval_batch_size or max(cfg.batch_size, 2048 // objective.tokens_per_row)


@torch.no_grad()
def evaluate(model, objective, pieces, rows, device, autocast):
    """Score the model on every piece (eval_view), in a fixed order: the same numbers every run.
    A stateful objective (XLNet's memory) starts clean: reset() before the first batch."""
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
    """'1.2345 nats/tok 2.3456 bpb' for a language model (loss in nats per token). Others:
    '3.4567 loss 0.4567 acc', every metric by name (a loss may add terms: BERT's MLM + NSP)."""
    lm = "bpb" in metrics
    return " ".join(f"{v:.4f} {'nats/tok' if k == 'loss' and lm else k}" for k, v in metrics.items())


def plot_metrics(rows, path, title):
    """loss.png: train (per step and at evals) and val loss. Beside it, bits per byte where the
    objective reports it, else its other metrics (accuracies ...)."""
    plt = pyplot()
    tr = [r for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    extra = sorted({k[4:] for r in ev for k in r if k.startswith("val_") and k != "val_loss"})
    extra = ["bpb"] if "bpb" in extra else extra
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    if tr:
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], color="tab:blue", alpha=0.35,
                lw=1, label="train (batch)")
    if ev:
        steps = [r["step"] for r in ev]
        ax.plot(steps, [r["train_loss"] for r in ev], "o-", color="tab:blue", label="train (eval)")
        ax.plot(steps, [r["val_loss"] for r in ev], "o-", color="tab:orange", label="val (held out)")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    if extra:
        ax = axes[0][1]
        for i, name in enumerate(extra):
            for part, style in (("train", "o--"), ("val", "o-")):
                pts = [(r["step"], r[f"{part}_{name}"]) for r in ev if f"{part}_{name}" in r]
                # one metric: train and val in the loss panel's colours; several: one colour each
                color = ("tab:blue" if part == "train" else "tab:orange") if len(extra) == 1 else f"C{i}"
                ax.plot(*zip(*pts), style, color=color, label=f"{part} {name}")
        bpb = extra == ["bpb"]
        ax.set(xlabel="step", ylabel="bits per byte" if bpb else "",
               title="tokenizer-independent: bits per UTF-8 byte" if bpb else "metrics")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _metrics_to_resume(out_dir, step):
    """The rows of metrics.jsonl up to the checkpoint's step: what the resumed run starts from.
    A run killed outright (SIGKILL, a power cut) may have written rows past its last checkpoint,
    and half a row: both are dropped, with a line each, so the resumed log holds each step once."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f.read().split("\n"), 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            # only the last line can be half written; damage anywhere else is not ours to guess at
            require(i == lines[-1][0], f"--resume: {path} line {i} is not JSON; the file is damaged")
            print(f"{path}: dropped its torn last line (a write cut short by a kill)")
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) < len(rows):
        print(f"{path}: dropped {len(rows) - len(kept)} rows logged after the checkpoint's step {step} "
              f"(the resumed run logs those steps again)")
    return kept


# ----------------------------------------------------------------------------------------------------------------------
# A time budget (--max-time). The step count makes the schedule: warm-up, then decay to the floor
# at the last step. Stopping when time is up would cut the decay short. So the loop times a step
# and an eval on this machine, early, and fixes the step count that fits, as Cramming (Geiping &
# Goldstein 2023, §4) fits its schedule to a budget. It measures in warm-up, where the lr does not
# depend on the step count yet. The decision is printed and checkpointed: a resumed run keeps it.


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
        """The largest step count whose remaining steps and evals fit in the budget left."""
        times = sorted(self.step_times)
        per_step = times[len(times) // 2]  # median: a step slowed by the OS does not shrink the run
        left = (self.seconds - self.spent_before - elapsed) * self.MARGIN

        def cost(n):  # remaining steps + evals at multiples of eval_interval in (step, n], and at n
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
        return {"seconds": self.seconds, "spent": self.spent_before + elapsed,
                "eval_seconds": self.eval_seconds, "decided": self.decided}


# ----------------------------------------------------------------------------------------------------------------------
# Many processes: `torchrun --standalone --nproc_per_node=N train.py ...` (DistributedDataParallel;
# NCCL on GPUs, gloo on CPUs). Every process draws the same step batch from the same seeded
# generator, and trains on its own run of micro-batches (grad_accum / N of them). DDP sums the
# gradients. So the optimizer sees the same global batch whatever N is: one process reproduces a run
# of N (tests/test_ddp.py). Process 0 alone evaluates, logs, plots and checkpoints; the others wait.


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
        """Did any process raise each flag? One all-reduce under torchrun: all stop at one step."""
        if self.world == 1:
            return flags
        t = torch.tensor([float(f) for f in flags], device=run.device)
        torch.distributed.all_reduce(t)
        return tuple(bool(x > 0) for x in t.tolist())


def main_first(dist, build):
    """build() on process 0, then on the others, which find what it cached (tokens, a BPE
    vocabulary): two processes writing one cache file corrupt it. Process 0's error reaches the
    others, rather than leaving them waiting."""
    if dist.world == 1:
        return build()
    failed = [None]
    if dist.main:
        try:
            result = build()
        except Exception as e:
            failed = [str(e) if isinstance(e, UsageError)
                      else f"process 0 failed: {e.__class__.__name__}: {e}"]
            torch.distributed.broadcast_object_list(failed, src=0)
            raise
        torch.distributed.broadcast_object_list(failed, src=0)
        return result
    torch.distributed.broadcast_object_list(failed, src=0)
    require(failed[0] is None, failed[0])
    return build()


def init_distributed():
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: join the process group. Else: one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)


# ----------------------------------------------------------------------------------------------------------------------
# Setting up a run: one function per concern, in the order setup() calls them. Every input is
# checked before anything is written: settings and the output directory before the data is read
# (and cached), the data before the model.


@dataclass
class Run:
    """Everything a training run holds, built by setup(), advanced by loop()."""
    cfg: TrainConfig
    mod: object
    model_cfg: object
    demo_cfg: object
    tokenizer: object
    domains: list  # data.Domain: name, weight, splits {"train", "val"}; one unless --data mixes
    data_key: str
    device: str
    dtype: str
    model: torch.nn.Module
    train_model: torch.nn.Module  # what the loop calls: the model, compiled, in DDP
    objective: object  # draws training batches; keeps the state of a stateful objective
    eval_objective: object  # a second one, for evals: no state leaks between training and eval
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    batch_gen: torch.Generator  # owns the batch order: saved and restored with the run
    dist: Dist = field(default_factory=Dist)
    budget: Budget = None
    step: int = 0
    evaluated: bool = False  # has the eval at `step` run? (a run stopped at one resumes with it)
    rows: list = field(default_factory=list)
    ckpt_path: str = ""  # the latest checkpoint: what --resume reads
    best_path: str = ""  # the checkpoint of the lowest val loss (guard.best_step)
    guard: object = None  # the divergence guard (Guard), which also knows the best evaluation
    saved_step: int = None  # the step ckpt.pt holds, once this run has written or resumed one
    lock: str = ""  # the out-dir's lock file, once this process holds it
    t_start: float = 0.0  # when setup() began: budgets and logged times count from it (a stopwatch)
    next_batch: dict = None  # drawn while the previous step still runs
    resume_point: tuple = None  # (batch generator state, objective state) before next_batch's draw

    @property
    def splits(self):
        return self.domains[0].splits

    @property
    def tokens_per_step(self):
        return self.cfg.batch_size * self.cfg.grad_accum * self.objective.tokens_per_row


def setup(argv, dist=Dist()):
    """argv -> a Run for loop(): settings, data, model, objective, optimizer; a resumed state."""
    t_start = time.time()
    s = resolve_config(argv or [])
    cfg, mod = s.cfg, model_module(s.cfg.model)
    ckpt = open_out_dir(s, dist)
    init = weights_to_start_from(s, mod) if cfg.init_from and not cfg.resume else None
    device, dtype = pick_precision(cfg, mod, dist)
    check_model_config(s, mod)
    tokenizer, domains, data_key = read_data(s, mod, dist, ckpt, init)
    model_cfg, model = build_model(s, mod, tokenizer, device, init)
    if cfg.task:  # a classifier around the model, labelled examples as the splits
        model, objective, peft_line = fine_tuning(cfg, mod, model, tokenizer, domains, device)
        eval_objective = objective  # stateless
    else:
        objective, eval_objective = mod.Objective(model_cfg, tokenizer), mod.Objective(model_cfg, tokenizer)
    fit_batches(cfg, objective, domains, dist)
    optimizer, decay_line = make_optimizer(model, cfg, device)
    train_model = wrap_model(model, cfg, dist, device)
    run = Run(cfg=cfg, mod=mod, model_cfg=model_cfg, demo_cfg=None, tokenizer=tokenizer,
              domains=domains, data_key=data_key, device=device, dtype=dtype, model=model,
              objective=objective, train_model=train_model, eval_objective=eval_objective,
              optimizer=optimizer,
              scaler=torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "fp16"),
              autocast=autocast(device, dtype), batch_gen=torch.Generator().manual_seed(cfg.seed),
              dist=dist, ckpt_path=os.path.join(cfg.out_dir, "ckpt.pt"),
              best_path=os.path.join(cfg.out_dir, "best.pt"), t_start=t_start,
              guard=Guard(above_first=not cfg.init_from))
    run.demo_cfg = mod.DemoConfig(**s.demo) if hasattr(mod, "DemoConfig") and not cfg.task else None
    run.budget = plan_steps(cfg, ckpt)
    if ckpt:
        _restore_state(run, ckpt)
    describe(run, s, init, decay_line)
    if cfg.task:
        print(peft_line)
    return run


def open_out_dir(s, dist):
    """The checkpoint --resume continues (its settings restored into s), else None. Refuses to
    start over a run without --resume or --overwrite, and an --out-dir that cannot be written
    (--bench writes nothing there)."""
    cfg = s.cfg
    cfg.out_dir = cfg.out_dir or os.path.join("out", cfg.model)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.bench:
        require_writable_dir(cfg.out_dir, "--out-dir")
        if dist.main:  # the lock is taken when the run starts writing; a live one is refused now
            refuse_if_locked(cfg.out_dir)
    if cfg.resume:
        ckpt = load_checkpoint(path)
        _restore_settings(s, ckpt)
        return ckpt
    require(cfg.bench or cfg.overwrite or not os.path.exists(path),
            f"{cfg.out_dir} already holds a run (ckpt.pt); pass --resume to continue it, "
            "--overwrite to replace it, or --out-dir to start another")
    return None


# A lock on the out-dir: the file LOCK, holding the pid and host of the run writing there, made
# with O_EXCL (one of two runs started together gets it) and removed when the run ends. A run
# killed outright leaves it: stale when no process of that pid lives on this host, and taken over.
LOCK = "train.lock"


def _lock_owner(path):
    """{"pid", "host", "started"} of a lock file; None if absent or unreadable (torn by a kill)."""
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _lock_is_live(owner):
    """Whether the lock's process may still run. On another host no one can tell: assume it does."""
    if owner is None:
        return False
    if owner.get("host") != socket.gethostname():
        return True
    if owner["pid"] == os.getpid():
        return False  # an earlier run of this very process (a notebook) that did not get to release it
    try:
        os.kill(owner["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


def refuse_if_locked(out_dir):
    """Refuse, in one line naming the other process, an out-dir a live run holds."""
    path = os.path.join(out_dir, LOCK)
    owner = _lock_owner(path)
    if _lock_is_live(owner):
        gone = (" (if it has ended, delete the lock)" if owner.get("host") != socket.gethostname() else "")
        raise UsageError(f"--out-dir {out_dir} is in use by process {owner['pid']} on {owner.get('host')} "
                         f"(running since {owner.get('started', '?')}; lock {path}){gone}; wait for it "
                         f"to end or use another --out-dir")


def take_lock(out_dir):
    """Make the lock file (atomically: O_CREAT | O_EXCL); take over a stale one. Returns its path."""
    path = os.path.join(out_dir, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            refuse_if_locked(out_dir)
            owner = _lock_owner(path)
            print(f"{path}: taking over the lock of "
                  f"{'process %s, which is gone' % owner['pid'] if owner else 'a run that was killed'}")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.datetime.now().isoformat(" ", "seconds")}, f)
        return path
    raise UsageError(f"--out-dir {out_dir}: another run took its lock ({path}) meanwhile")


def release_lock(path):
    """Remove the lock if it is still this process's."""
    owner = _lock_owner(path) if path else None
    if owner and owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname():
        with contextlib.suppress(OSError):
            os.remove(path)


def require_writable_dir(path, flag):
    """A directory that exists or can be made, and can be written in: refused now, not by an
    OSError after the data is read. require_writable_dir("notes.txt/out", "--out-dir") ->
    "--out-dir notes.txt/out: notes.txt is a file, not a directory"."""
    first = os.path.abspath(path)
    # the deepest part of the path that exists: where a directory would be made
    while not os.path.exists(first):
        first = os.path.dirname(first)
    shown = os.path.relpath(first) if not os.path.isabs(path) else first
    require(os.path.isdir(first), f"{flag} {path}: {shown} is a file, not a directory")
    require(os.access(first, os.W_OK | os.X_OK), f"{flag} {path}: {shown} is not writable")


def _restore_settings(s, ckpt):
    """--resume continues with the run's own settings; only flags given now change them (say, a
    longer --max-iters). Falling back to the preset would silently change lr or schedule mid-run."""
    saved, saved_train = ckpt["model_config"], ckpt["train_config"]
    for key, value in s.model.items():
        if key in s.explicit and saved.get(key) != value:
            if key == "block_size" and value > saved[key]:
                raise UsageError(f"--block-size {value} is larger than the checkpoint's "
                                 f"position table ({saved[key]} positions)")
            raise UsageError(f"--resume: {cli_flag(key)} {value!r} does not match the checkpoint's "
                             f"{saved.get(key)!r}")
    for key in ("model", "tokenizer", "data", "val_docs", "vocab_size"):
        if key in s.explicit and getattr(s.cfg, key) != saved_train[key]:
            raise UsageError(f"--resume: {cli_flag(key)} {getattr(s.cfg, key)!r} does not match "
                             f"the checkpoint's {saved_train[key]!r}")
    for key, value in saved_train.items():
        if (key not in s.explicit and key not in ("resume", "overwrite", "bench", "out_dir")
                and hasattr(s.cfg, key)):
            setattr(s.cfg, key, value)
    s.cfg.__post_init__()  # the saved values and the new ones must make a valid run together
    s.model = {k: v for k, v in saved.items() if k not in derived(model_module(s.cfg.model))}
    s.demo = {**ckpt.get("demo_config", {}), **{k: v for k, v in s.demo.items() if k in s.explicit}}


@dataclass
class Init:
    """--init-from: the weights a new run starts from, and what they fix: the tokenizer (a ckpt.pt)
    or the vocabulary size (a Hugging Face directory)."""
    state: dict
    tokenizer: dict = None
    vocab_size: int = None


def weights_to_start_from(s, mod):
    """--init-from our ckpt.pt or a Hugging Face directory. The architecture comes from the
    weights (into s.model); flags may change what does not change a parameter's shape."""
    path, explicit = s.cfg.init_from, {k: v for k, v in s.model.items() if k in s.explicit}
    if os.path.isdir(path):
        require(hasattr(mod.Model, "from_pretrained"),
                f"--init-from {path}: {s.cfg.model} cannot read Hugging Face directories")
        try:
            hf = mod.Model.from_pretrained(path)
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"--init-from {path}: {e}") from None
        s.model = {**{k: v for k, v in asdict(hf.config).items() if k not in derived(mod)}, **explicit}
        return Init(hf.state_dict(), vocab_size=hf.config.vocab_size)
    ckpt = load_checkpoint(path, "--init-from")
    saved = ckpt["train_config"]
    require(saved["model"] == s.cfg.model,
            f"--init-from {path}: a {saved['model']} checkpoint, not {s.cfg.model}")
    require("tokenizer" not in s.explicit or s.cfg.tokenizer == saved["tokenizer"],
            f"--init-from: --tokenizer {s.cfg.tokenizer!r} does not match the checkpoint's "
            f"{saved['tokenizer']!r} (the weights belong to its ids)")
    s.cfg.tokenizer = saved["tokenizer"]
    s.model = {**{k: v for k, v in ckpt["model_config"].items() if k not in derived(mod)}, **explicit}
    return Init(ckpt["model"], tokenizer=ckpt["tokenizer"])


def pick_precision(cfg, mod, dist):
    """(device, dtype) of this process, from the run's --device and --dtype (restored on resume)."""
    device = pick_device(cfg.device)
    if dist.world > 1 and device == "cuda":
        device = f"cuda:{dist.local_rank}"
    dtype = pick_dtype(cfg.dtype, device)
    if dtype not in getattr(mod, "DTYPES", TORCH_DTYPES):
        auto = " (what --dtype auto picks here)" if cfg.dtype == "auto" else ""
        raise UsageError(f"{cfg.model} does not train in {dtype}{auto}; "
                         f"use --dtype {' or '.join(mod.DTYPES)}")
    return device, dtype


def check_model_config(s, mod):
    """The model file's own checks of its flags (its __post_init__), before any data is read."""
    try:
        mod.Config(vocab_size=1, **s.model)  # the real vocabulary size comes with the tokenizer
    except (TypeError, ValueError) as e:  # UsageError is a ValueError; TypeError: an unknown key
        raise UsageError(str(e)) from None


def read_data(s, mod, dist, ckpt, init):
    """(tokenizer, domains, data key). A resumed or initialised run keeps its tokenizer.
    Process 0 reads first."""
    known = ckpt["tokenizer"] if ckpt else init.tokenizer if init else None
    tokenizer, domains, key = main_first(dist, lambda: prepare_domains(s.cfg, special_tokens_of(mod), known))
    require(not ckpt or ckpt.get("data_key") in (None, key),
            "--resume: the corpus changed since the checkpoint was written (its files' contents differ)")
    if init and init.vocab_size is not None and init.vocab_size != tokenizer.n_vocab:
        raise UsageError(f"--init-from {s.cfg.init_from}: its vocabulary has {init.vocab_size:,} "
                         f"ids, --tokenizer {s.cfg.tokenizer} has {tokenizer.n_vocab:,} (with the "
                         f"model's special tokens)")
    return tokenizer, domains, key


def build_model(s, mod, tokenizer, device, init):
    """(model config, model): the same seeded init in every process, or --init-from's weights
    (not with --random-init). A model's adapt_state() may fit them first (GPT: a shorter position table)."""
    torch.manual_seed(s.cfg.seed)
    model_cfg = mod.Config(**tokenizer_fields(mod, tokenizer), **s.model)
    model = mod.Model(model_cfg).to(device)
    if init and not s.cfg.random_init:
        try:
            adapt = getattr(model, "adapt_state", lambda state, flag: state)
            model.load_state_dict(adapt(init.state, f"--init-from {s.cfg.init_from}"))
        except ValueError as e:
            raise UsageError(str(e)) from None
        except RuntimeError as e:
            lines = str(e).splitlines()
            raise UsageError(f"--init-from {s.cfg.init_from}: its weights do not fit this model "
                             f"({lines[1].strip() if len(lines) > 1 else e})") from None
    return model_cfg, model


def fine_tuning(cfg, mod, model, tokenizer, domains, device):
    """--task: (the family's Classifier around `model`, --peft applied; its objective; a line on the
    trained parameters). The task's labelled examples replace the corpus's splits: train, val (the dev
    works: best.pt), test (scored at every eval, never chosen on)."""
    task = tasks.load_task(cfg.task)
    domains[0].splits = finetune.tokenize(task, tokenizer, cfg.train_examples)
    classifier, objective, line = finetune.for_task(mod, model, task.name, task.labels, tokenizer, cfg)
    return classifier.to(device), objective, line


def fit_batches(cfg, objective, domains, dist):
    """The batch against the objective's rows: --tokens-per-step sets grad_accum; the processes
    split it evenly; every split holds a row; a stateful objective trains on one corpus."""
    if cfg.tokens_per_step:
        per_micro = cfg.batch_size * objective.tokens_per_row
        require(cfg.tokens_per_step % per_micro == 0,
                f"--tokens-per-step {cfg.tokens_per_step} is not a multiple of batch_size x "
                f"tokens per row = {cfg.batch_size} x {objective.tokens_per_row} = {per_micro}")
        cfg.grad_accum = cfg.tokens_per_step // per_micro
    require(cfg.grad_accum % dist.world == 0,
            f"grad_accum {cfg.grad_accum} does not split over {dist.world} processes: each "
            f"takes grad_accum / {dist.world} micro-batches of the same global batch")
    need = objective.raw_tokens_per_row
    for d in domains:
        for part, split in d.splits.items():
            where = f"{d.name}'s {part}" if len(domains) > 1 else f"the {part}"
            require(len(split.tokens) >= need,
                    f"{where} split has {len(split.tokens):,} tokens, fewer than the {need:,} "
                    f"one row needs; use a smaller --block-size or more data")
    require(len(domains) == 1 or not hasattr(objective, "state_dict"),
            f"--data {cfg.data}: {cfg.model}'s objective keeps per-row streams across steps; "
            f"it trains on one corpus at a time")


def wrap_model(model, cfg, dist, device):
    """What the loop calls: the model, compiled with --compile, and in DDP under torchrun."""
    train_model = torch.compile(model) if cfg.compile else model
    if dist.world > 1:
        ids = [dist.local_rank] if device.startswith("cuda") else None
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
        torch.manual_seed(cfg.seed + dist.rank)  # init was shared (above); dropout is per process
    return train_model


def plan_steps(cfg, ckpt):
    """The --max-time budget (with what a resumed run measured and decided), or None. Without a
    budget, the decay's horizon is fixed now and saved: a longer resumed run keeps it."""
    seconds = parse_duration(cfg.max_time)
    if seconds and not cfg.bench:
        saved = ckpt.get("budget", {}) if ckpt else {}
        budget = Budget(seconds, saved.get("spent", 0.0), saved.get("eval_seconds", 0.0),
                        saved.get("decided", 0))
        if budget.decided:
            cfg.max_iters = budget.decided
        return budget
    if not cfg.lr_decay_iters and not cfg.resume:
        cfg.lr_decay_iters = cfg.max_iters
    return None


def _restore_state(run, ckpt):
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.evaluated = ckpt["step"], ckpt.get("evaluated", True)
    rng = ckpt["rng"]
    ranks = rng.get("torch_ranks") or []
    torch.set_rng_state(ranks[run.dist.rank] if len(ranks) == run.dist.world > 1 else rng["torch"])
    run.batch_gen.set_state(rng["batch"])
    if run.device.startswith("cuda") and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    if ckpt.get("objective") is not None:
        run.objective.load_state_dict(ckpt["objective"])
    run.guard, run.saved_step = Guard(**ckpt.get("guard", {})), run.step
    run.rows = _metrics_to_resume(run.cfg.out_dir, run.step)
    cfg, horizon = run.cfg, run.cfg.lr_decay_iters
    note = ""
    if cfg.schedule in ("cosine", "linear", "wsd") and horizon and cfg.max_iters > horizon:
        note = f"; the {cfg.schedule} schedule keeps its horizon: lr reaches its floor " \
               f"{cfg.min_lr:g} at step {horizon} and stays there (to re-warm on purpose, start " \
               f"a new run with --init-from)"
    print(f"resuming at step {run.step} of {cfg.max_iters or '(budget not yet fixed)'}{note}")


def describe(run, s, init, decay_line):
    """The run's first lines: model, data, tokenizer, device and batch."""
    cfg, model, dist = run.cfg, run.model, run.dist
    n = model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())
    weights = f" | weights from {cfg.init_from}" if init else ""
    print(f"model {cfg.model} preset {cfg.preset}: {n / 1e6:.2f}M parameters | "
          f"{json.dumps(s.model)}{weights}")
    mixture = len(run.domains) > 1
    for d in run.domains:
        tr, va = d.splits["train"], d.splits["val"]
        names = ", ".join(va.doc_names[:6]) + (", ..." if len(va.doc_names) > 6 else "")
        where = f"{d.path} (weight {d.weight:.2f})" if mixture else cfg.data or DEFAULT_DATA
        if cfg.task:  # labelled examples (tasks.py), by play
            te = d.splits["test"]
            print(f"data --task {cfg.task} (tasks.py): train {len(tr):,} examples from {len(tr.doc_names)} plays | "
                  f"val {len(va):,} from {names} | test {len(te):,} from {', '.join(te.doc_names)}")
            continue
        print(f"data {where}: train {len(tr.doc_names)} docs {len(tr.tokens):,} tokens | "
              f"val {len(va.doc_names)} docs {len(va.tokens):,} tokens ({names})")
    line = f" | {run.objective.describe()}" if hasattr(run.objective, "describe") else ""
    print(f"tokenizer {cfg.tokenizer} ({run.tokenizer.n_vocab} ids){line}")
    print(f"device {run.device} {run.dtype}{' +compile' if cfg.compile else ''}"
          f"{f' x {dist.world} processes' if dist.world > 1 else ''} | tokens per step = "
          f"batch {cfg.batch_size} x {run.objective.tokens_per_row} per row x grad_accum "
          f"{cfg.grad_accum} = {run.tokens_per_step:,} | {decay_line}")


# ----------------------------------------------------------------------------------------------------------------------
# The loop, and what it calls, in the order it calls them


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C / SIGTERM: the loop finishes its step, saves and returns; a second aborts at once."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        print(f"\n{stop['signal']}: finishing this step, then saving a checkpoint "
              "(press again to abort)", flush=True)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def loop(run, on_step=None):
    """Evaluate and checkpoint when due, take one optimizer step, log; until max_iters or a stop
    signal. Returns the metric rows. on_step(step, loss) is called after every step."""
    cfg = run.cfg
    start_writing(run)
    meter = Meter(run)
    with stop_on_signals() as stop:
        while True:
            if (run.step % cfg.eval_interval == 0 or run.step == cfg.max_iters) and not run.evaluated:
                eval_and_checkpoint(run, meter)
            if cfg.max_iters and run.step >= cfg.max_iters:
                break
            loss, lr = train_step(run, meter)
            if run.step % cfg.log_interval == 0 or run.step == cfg.max_iters:
                log_step(run, loss, lr, meter)
            if on_step is not None:
                on_step(run.step, loss)
            if agree_to_stop(run, stop):
                return stopped(run)
    return finished(run)


def start_writing(run):
    """The first batch is drawn before anything is written: an objective that cannot draw from
    this data says so first. Then process 0 makes the run directory and writes the metrics so
    far (a resumed run's)."""
    draw_next(run)
    if not run.dist.main:
        return
    rows = "".join(json.dumps(r) + "\n" for r in run.rows)
    try:
        os.makedirs(run.cfg.out_dir, exist_ok=True)
        run.lock = take_lock(run.cfg.out_dir)
        if run.saved_step is None:  # a new run (--overwrite): an older run's best.pt is not this one's
            with contextlib.suppress(FileNotFoundError):
                os.remove(run.best_path)
        atomic_write_text(os.path.join(run.cfg.out_dir, "metrics.jsonl"), rows)
    except OSError as e:  # checked at start-up (require_writable_dir); a full disk, say, ends here
        raise UsageError(f"--out-dir {run.cfg.out_dir}: cannot write there ({e.strerror or e})") from None


def draw_next(run):
    """Draw the next step's rows, first noting what a checkpoint needs to redraw them on resume."""
    state = run.objective.state_dict() if hasattr(run.objective, "state_dict") else None
    run.resume_point = (run.batch_gen.get_state(), copy.deepcopy(state))
    run.next_batch = draw_train_batch(run, run.cfg.batch_size * run.cfg.grad_accum)


def draw_train_batch(run, rows):
    """One step's rows from the objective, all from the loop's generator. With a mixture: each row's
    corpus first (multinomial with the mixture's weights), then each corpus's rows, stacked."""
    if len(run.domains) == 1:
        return run.objective.train_batch(run.splits["train"], rows, run.batch_gen)
    weights = torch.tensor([d.weight for d in run.domains])
    picks = torch.multinomial(weights, rows, replacement=True, generator=run.batch_gen)
    counts = torch.bincount(picks, minlength=len(run.domains)).tolist()
    parts = [run.objective.train_batch(d.splits["train"], n, run.batch_gen)
             for d, n in zip(run.domains, counts) if n]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class Meter:
    """What the log line reports: each step's seconds and tokens since the last line, and their
    wall-clock time (evals excluded from tokens/s). Also when loss.png was last drawn."""

    def __init__(self, run):
        self.steps, self.since, self.last_plot = [], time.time(), time.time()
        self.flops = getattr(run.model, "flops_per_token", lambda: None)()
        self.peak = None  # the device's peak FLOP/s, for MFU: looked up at the first log line


PLOT_EVERY = 60  # min seconds between loss.png redraws at evals (each ~1 s); also at the end


def eval_and_checkpoint(run, meter):
    """The eval at this step (process 0), a checkpoint (also best.pt when the val loss is the
    lowest yet), and loss.png now and then. Stops a diverged run. The first eval tells the budget
    what an eval costs."""
    t = time.time()
    best, before = False, copy.copy(run.guard)
    if run.dist.main:
        run_eval(run)
        best = run.guard.update(run.step, run.rows[-1]["val_loss"])  # the row run_eval logged
    run.evaluated = True
    checkpoint(run, best, before)
    diverged = run.dist.main and run.guard.diverged(run.cfg.divergence_evals)
    if run.dist.main and (diverged or run.step == run.cfg.max_iters
                          or time.time() - meter.last_plot > PLOT_EVERY):
        plot(run)
        meter.last_plot = time.time()
    run.dist.barrier()
    if run.dist.any(run, diverged)[0]:
        raise UsageError(diverged_message(run))
    if run.budget and not run.budget.eval_seconds:
        run.budget.eval_seconds = time.time() - t
    meter.since += time.time() - t


def diverged_message(run):
    """The one line a diverged run stops with. Every process raises it; only process 0 knows the losses."""
    g, n = run.guard, run.cfg.divergence_evals
    if g.best is None:
        return (f"no evaluation of this run had a finite val loss ({n} in a row): the run diverged; stopping at "
                f"step {run.step}, no best.pt. Try a lower --lr")
    rule = (f"above the first evaluation's ({g.first:.4f}) or 2x the best" if g.above_first else "above 2x the best")
    return (f"the val loss has been {rule} ({g.best:.4f}, step {g.best_step}) at {n} evaluations in a row, "
            f"{g.last:.4f} at step {run.step}: the run diverged; stopping. {run.best_path} holds the weights of "
            f"step {g.best_step}; {run.ckpt_path} (step {run.step}) is what --resume reads. Try a lower --lr "
            f"(--divergence-evals 0 turns this check off)")


@dataclass
class Guard:
    """The best evaluation so far (what best.pt holds) and the divergence rule of
    --divergence-evals N: stop when the val loss is above the first evaluation's, or above
    FACTOR x the best, at N evaluations in a row. A learning run never climbs back above its first
    loss: the quick starts' val losses fall at every eval. A diverged one does: a GPT at --lr 3
    went from 4.46 to 3.46 nats/token by step 20, then to 30-257 at every later eval, without a NaN.
    Trap: a run from pretrained weights (--init-from) may rise above its first loss and come back (re-warming
    took Milton from 1.88 to 2.02 nats, docs/08): there only the 2x rule holds.
    Saved in every checkpoint: a resumed run counts on where it stopped."""
    above_first: bool = True  # the first rule applies (False for --init-from)
    first: float = None  # the val loss of the run's first evaluation (step 0)
    best: float = None
    best_step: int = None
    last: float = None
    bad: int = 0  # evaluations in a row above the limit

    FACTOR = 2.0

    def update(self, step, loss):
        """Record an evaluation's val loss; True if it is the best yet."""
        finite = math.isfinite(loss)
        if self.first is None and finite:
            self.first = loss
        new_best = finite and (self.best is None or loss < self.best)
        if new_best:
            self.best, self.best_step = loss, step
        self.last = loss
        above = not finite or (self.above_first and loss > self.first) or loss > self.FACTOR * self.best
        self.bad = self.bad + 1 if above else 0
        return new_best

    def diverged(self, patience):
        return patience > 0 and self.bad >= patience


def run_eval(run):
    """Val and a train estimate (eval_view) of every corpus: one metrics row, one line on stdout.
    With a mixture, each corpus gets val_<name>_<metric> (and train_<name>_... if trained on), and
    val_<metric> / train_<metric> are the averages weighted as the mixture is."""
    t, cfg, domains = time.time(), run.cfg, run.domains
    rows, min_piece = eval_rows(cfg, run.objective), run.objective.raw_tokens_per_row
    score = lambda pieces: evaluate(run.model, run.eval_objective, pieces, rows, run.device, run.autocast)
    results = {}  # corpus -> (train metrics, or None for a corpus of weight 0; val metrics)
    for d in domains:
        val_view = eval_view(d.splits["val"], cfg.eval_tokens, spread=False, min_piece=min_piece)
        train_tokens = cfg.eval_train_tokens or sum(len(p.tokens) for p in val_view)
        train_view = eval_view(d.splits["train"], train_tokens, spread=True, min_piece=min_piece)
        val = score(val_view)
        results[d.name] = (score(train_view) if d.weight > 0 else None, val)
    first = results[domains[0].name]
    test = {}
    if len(domains) == 1:
        tr, val = first
        line = f"train {fmt_metrics(tr)} | val {fmt_metrics(val)}"
        if "test" in domains[0].splits:  # a task's test set: reported, never chosen on
            test = score(eval_view(domains[0].splits["test"], 0, spread=False))
            line += f" | test {fmt_metrics(test)}"
    else:
        mix = lambda i: {k: sum(d.weight * results[d.name][i][k] for d in domains if d.weight > 0)
                         for k in first[1]}
        tr, val = mix(0), mix(1)
        for d in domains:
            tr.update({f"{d.name}_{k}": v for k, v in (results[d.name][0] or {}).items()})
            val.update({f"{d.name}_{k}": v for k, v in results[d.name][1].items()})
        per_corpus = " | ".join(f"val {d.name} {fmt_metrics(results[d.name][1])}" for d in domains)
        line = "train " + fmt_metrics({k: v for k, v in tr.items() if k in first[1]}) + " | " + per_corpus
    seconds = time.time() - t
    log_row(run, {"kind": "eval", "step": run.step, **{f"train_{k}": v for k, v in tr.items()},
                  **{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()},
                  "time": run_time(run)})
    print(f"eval step {run.step}: {line} ({seconds:.1f}s)", flush=True)
    return val


def checkpoint(run, best=False, before=None):
    """Every process calls it (dropout's random state is per process); process 0 writes ckpt.pt,
    and with best=True first best.pt, then a copy of it as ckpt.pt: best.pt is never older than
    what ckpt.pt's guard says it holds. A failed write stops every process with one line saying
    which checkpoints are intact (`before`: the guard before this eval)."""
    ranks = None
    if run.dist.world > 1:
        ranks = [None] * run.dist.world
        torch.distributed.all_gather_object(ranks, torch.get_rng_state())
    error = None
    if run.dist.main:
        error = _write_checkpoints(run, ranks, best, before or run.guard)
    if run.dist.any(run, error is not None)[0]:
        raise error or UsageError("process 0 could not write its checkpoint")


def _write_checkpoints(run, ranks, best, before):
    """Process 0's part of checkpoint(): None, or the UsageError that says what failed."""
    cuda = torch.cuda.get_rng_state(run.device) if run.device.startswith("cuda") else None
    state = {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(), "step": run.step, "evaluated": run.evaluated,
        "model_config": asdict(run.model_cfg), "train_config": asdict(run.cfg),
        "demo_config": asdict(run.demo_cfg) if run.demo_cfg else {},
        "tokenizer": run.tokenizer.identity(), "data_key": run.data_key,
        "rng": {"torch": torch.get_rng_state(), "torch_ranks": ranks, "batch": run.resume_point[0],
                "cuda": cuda},
        "objective": run.resume_point[1],
        "budget": run.budget.state(run_time(run)) if run.budget else {},
        "guard": asdict(run.guard),
    }
    path = run.best_path if best else run.ckpt_path
    try:
        save_checkpoint(path, state)
        if best:
            copy_durably(run.best_path, run.ckpt_path)
        run.saved_step = run.step
        return None
    except OSError as e:
        reason = e.strerror or str(e) or e.__class__.__name__
        return UsageError(f"cannot write {path} at step {run.step} ({reason}); the partial "
                          f"{os.path.basename(path)}.tmp was removed. {kept(run, before)}")


def kept(run, guard):
    """What the out-dir holds that a user can rely on, in words: the checkpoint --resume reads and
    best.pt. Every message that says something is kept says it through this."""
    latest = (f"the last good checkpoint {run.ckpt_path} (step {run.saved_step}) is intact: --resume "
              f"continues from it"
              if run.saved_step is not None else "no checkpoint of this run was written yet")
    best = (f"; {run.best_path} holds step {guard.best_step} (val loss {guard.best:.4f})"
            if guard.best_step is not None else "")
    return latest + best


def plot(run):
    plot_metrics(run.rows, os.path.join(run.cfg.out_dir, "loss.png"),
                 f"{run.cfg.model} / {run.cfg.preset}")


def train_step(run, meter):
    """One optimizer step at the schedule's lr; returns (loss, lr). Its time goes to the meter, and
    to the budget while that is measuring."""
    lr = lr_at(run.step, run.cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    t = time.perf_counter()
    batch = run.next_batch
    tokens = run.objective.count_tokens(batch)
    try:
        loss = optimizer_step(run, batch, lambda: draw_next(run))
    except NonFiniteLoss as e:
        raise UsageError(f"{e} at step {run.step}; stopping. {kept(run, run.guard)}. "
                         f"Try a lower --lr or --grad-clip") from None
    run.step, run.evaluated = run.step + 1, False
    meter.steps.append((time.perf_counter() - t, tokens))
    if run.budget and not run.budget.decided and run.step > Budget.WARM_UP_STEPS:
        run.budget.step_times.append(meter.steps[-1][0])
    return loss, lr


def log_step(run, loss, lr, meter):
    """A metrics row and a line: loss, lr, tokens/s, ms/step, MFU and the time left."""
    cfg, steps = run.cfg, meter.steps
    wall = time.time() - meter.since
    if meter.peak is None and meter.flops:
        meter.peak = _peak_for_mfu(run, steps)
    ms = 1000 * sum(t for t, _ in steps) / len(steps)
    tok_s = sum(n for _, n in steps) / max(1e-9, wall)
    mfu = meter.flops * tok_s / (meter.peak * run.dist.world) if meter.peak and meter.flops else None
    log_row(run, {"kind": "train", "step": run.step, "loss": loss, "lr": lr, "tok_s": tok_s,
                  "ms": ms, "mfu": mfu, "time": run_time(run)})
    left = (cfg.max_iters - run.step) * ms / 1000 if cfg.max_iters else None
    print(f"step {run.step}/{cfg.max_iters or '?'} | loss {loss:.4f} | lr {lr:.2e} | "
          f"{tok_s:,.0f} tok/s | {ms:.0f} ms/step | MFU {'n/a' if mfu is None else f'{mfu:.1%}'} | "
          f"ETA {'?' if left is None else fmt_time(left)}", flush=True)
    meter.steps, meter.since = [], time.time()


def _peak_for_mfu(run, steps):
    """The device's peak for MFU, 0 if unknown. On a CPU it is measured (~0.1 s, then cached per
    machine) only for runs planned to last a minute or more: a test or a trial never pays."""
    per_step = sum(t for t, _ in steps) / len(steps)
    planned = per_step * run.cfg.max_iters if run.cfg.max_iters else parse_duration(run.cfg.max_time)
    peak, how = peak_flops(run.device, run.dtype, run.cfg.cache_dir,
                           measure=planned >= 60 and run.dist.main)
    if peak:
        print(f"MFU is relative to {peak / 1e12:.2f} TFLOP/s ({how})")
    return peak or 0


def log_row(run, row):
    run.rows.append(row)
    if run.dist.main:
        with open(os.path.join(run.cfg.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def run_time(run):
    return time.time() - run.t_start


def agree_to_stop(run, stop):
    """Whether to stop now, the same answer in every process (one small all-reduce under torchrun).
    Process 0 also decides the budget for all, once it has timed enough steps."""
    b = run.budget
    ready = bool(b and not b.decided and run.dist.main and b.ready())
    stop_now, ready = run.dist.any(run, stop["signal"] is not None, ready)
    if ready:
        decide_budget(run)
    return stop_now


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
    print(f"budget {fmt_time(b.seconds)}: {per_step * 1000:.0f} ms/step (median of "
          f"{len(b.step_times)}) and {b.eval_seconds:.1f}s per eval -> {b.decided} steps; the "
          f"{cfg.schedule} schedule reaches its floor at step {cfg.lr_decay_iters}", flush=True)


def stopped(run):
    """After Ctrl-C or SIGTERM: save, draw, and say how to continue."""
    checkpoint(run)
    if run.dist.main:
        plot(run)
    print(f"stopped at step {run.step}; checkpoint saved to {run.ckpt_path}; continue with: "
          f"python train.py --model {run.cfg.model} --out-dir {run.cfg.out_dir} --resume")
    return run.rows


def finished(run):
    """The demo, then the last line: where the run's files are, and which checkpoint is which."""
    if run.demo_cfg is not None and run.dist.main:
        run.mod.demo(run.model, run.tokenizer, run.demo_cfg, run.device)
    out, g = run.cfg.out_dir, run.guard
    best = (f"{run.best_path} (step {g.best_step}, the lowest val loss {g.best:.4f})"
            if g.best_step is not None else "no best.pt (no evaluation had a finite val loss)")
    print(f"done: {run.step} steps in {fmt_time(run_time(run))}; wrote {run.ckpt_path} (step "
          f"{run.step}, the latest: --resume continues it), {best}, "
          f"{os.path.join(out, 'metrics.jsonl')}, {os.path.join(out, 'loss.png')}")
    return run.rows


def bench(run):
    """Time full steps (data, forward, backward, clip, AdamW) after a warm-up; writes nothing."""
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
    print(f"bench: {ms:.1f} ms/step | {tok_s:,.0f} tokens/s | "
          f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'} ({how}) | {cfg.bench_iters} steps of "
          f"{run.tokens_per_step:,} tokens")
    return [{"kind": "bench", "ms": ms, "tok_s": tok_s, "mfu": mfu}]


def train(argv=None, on_step=None):
    """Run training as `python train.py argv...` would. on_step(step, loss) is called after every
    optimizer step (tests and notebooks watch or interrupt a run with it). Returns metric rows."""
    dist = init_distributed()
    if not dist.main:
        sys.stdout = open(os.devnull, "w")  # one log: process 0's (errors still reach stderr)
    # Subnormals (fp32 below ~1e-38) take a slow path on x86 CPUs. Training makes some (sharpened
    # attention probabilities, their gradients): the T5 quick start's fp32 steps went from ~125 to
    # ~277 ms between steps 300 and 550. A step on its final checkpoint took 330 ms with subnormals,
    # 130 ms flushed to zero (README errata). Flushing changes nothing sizeable. CPU only, undone.
    flush = torch.set_flush_denormal(True)
    run = None
    try:
        run = setup(argv, dist)
        result = bench(run) if run.cfg.bench else loop(run, on_step)
        # every process reaches the end before the group is torn down: a process that leaves
        # while another is still in its last collective can make gloo abort the other at exit
        dist.barrier()
        return result
    finally:
        if run is not None:
            release_lock(run.lock)
            # DDP's reducer holds the process group: free it first, so the group's threads stop inside
            # destroy_process_group below, not whenever the last reference goes
            run = None
        if flush:
            torch.set_flush_denormal(False)
        if dist.world > 1:
            # Leaving the group is best effort: after an error another process may be gone, and
            # gloo then raises "connection closed" here, hiding the error that stopped the run.
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# A finished run, for experiments and notebooks: model, data, evaluation; its device and precision.


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
        """Metrics of `objective` (e.g. the run's own, other settings) on the leading max_tokens
        of a split (of `corpus`, by default the first)."""
        rows = eval_rows(self.cfg, objective)
        split = (self.corpora[corpus] if corpus else self.splits)[part]
        view = eval_view(split, max_tokens, spread=part == "train",
                         min_piece=objective.raw_tokens_per_row)
        return evaluate(self.model, objective, view, rows, self.device, self.autocast)


def open_run(ckpt_path, model=None, flag="open_run"):
    """The run that wrote ckpt_path: model in eval mode on the run's device, tokenizer, splits,
    and evaluate(). `model` and `flag` as in load_for_inference."""
    net, tokenizer, ckpt = load_for_inference(ckpt_path, flag=flag, model=model)
    cfg = saved_train_config(ckpt)
    _, domains, _ = prepare_domains(cfg, list(tokenizer.specials), ckpt["tokenizer"])
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    corpora = {d.name: d.splits for d in domains}
    if cfg.task:  # a fine-tuned run: its labelled examples (train, val, test) as it trained on them
        corpora = {cfg.task: finetune.tokenize(tasks.load_task(cfg.task), tokenizer, cfg.train_examples)}
    return FinishedRun(net.to(device), tokenizer, corpora, cfg, device, autocast(device, dtype))


@command
def main(argv=None):
    train(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
