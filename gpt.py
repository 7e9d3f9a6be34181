"""
GPT-2: a decoder-only Transformer trained by next-token prediction, in one file.

Papers
  - Radford et al. 2018 (GPT-1) §3.1, eq. (1)-(2): a Transformer decoder as a left-to-right LM.
  - Radford et al. 2019 (GPT-2) §2.3: pre-LN blocks, a final LayerNorm,
    residual projections scaled by 1/sqrt(N) at init; context 1024, vocabulary 50,257.
  - Vaswani et al. 2017, "Attention Is All You Need" §3.2: softmax(QK^T / sqrt(d_k)) V per head.
  Slides (lecture 001): "Autoregressive decoder-only models / GPT", "GPT models",
    "GPT-2", "Learned encoding".

Faithful to OpenAI's released model (github.com/openai/gpt-2, src/model.py),
so to Hugging Face's GPT2LMHeadModel, the oracle of tests/test_gpt.py: same parameter names
(wte, wpe, h.0.attn.c_attn, ...), tanh GELU, LayerNorm eps 1e-5, lm_head tied to wte.
Two hooks serve other slides, in a few marked lines. `--pos` swaps wpe for another scheme
of positions.py, where the equations live. `prefix_len` makes the causal mask T5's prefix-LM
mask; `--prefix-lm` trains with it (NextTokenObjective.split_prefix). mtp.py builds
multi-token prediction and self-speculative decoding on this file.

Run
  python train.py --model gpt                             # char-level Shakespeare (CPU, ~4 minutes)
  python gpt.py --ckpt out/gpt/ckpt.pt --prompt "ROMEO:"  # sample from the checkpoint it wrote
  python gpt.py --hf path/to/gpt2 --prompt "Hello"        # sample from OpenAI's released weights

Legend
  B batch, T sequence length, C n_embd, H n_head, hs = C // H head size, V vocabulary, L n_layer.
  idx (B, T) token ids; logits (B, T, V); pos (T,) new tokens' positions; T_k keys (cached + new).
"""

import argparse
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UsageError, command, require
from hf_io import copy_weights, read_hf_dir, write_hf_dir
from positions import (ALiBi, LearnedAbsolute, ShawRelative, SinusoidalAbsolute, T5RelativeBias,
                       apply_rope, causal_mask, shaw_attention)

# ----------------------------------------------------------------------------------------------------------------------
# Config and presets

POS_SCHEMES = ("learned", "sinusoidal", "shaw", "t5", "alibi", "rope", "none")  # --pos; see Hooks


@dataclass
class GPTConfig:
    block_size: int = 256  # training context T_max: wpe's rows, the KV cache's slots
    vocab_size: int = 50257  # V: train.py sets it from the tokenizer
    n_layer: int = 4  # L: Transformer blocks
    n_head: int = 4  # H: attention heads per block, each of size n_embd / n_head
    n_embd: int = 128  # C: width of the residual stream and of every embedding
    dropout: float = 0.0  # GPT-2 used 0.1; 0 suits short runs that never see a token twice
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5  # GPT-2's value, needed for parity with the released weights
    attn: str = "sdpa"  # naive: softmax(QK^T/sqrt(hs))V spelt out; sdpa: fused, tested equal
    pad_vocab_multiple: int = 1  # round wte's rows up (64: 50257 -> 50304): faster GPU matmuls
    pos: str = "learned"  # learned (GPT-2), sinusoidal, shaw, t5, alibi, rope, none: positions.py
    shaw_max_distance: int = 16  # Shaw et al.'s clipping distance k (§4.3: no gain beyond 2..4)
    t5_num_buckets: int = 32  # T5's defaults: 32 buckets, all for the past in a causal decoder ...
    t5_max_distance: int = 128  # ... the last one shared by every offset >= 128
    prefix_lm: bool = False  # T5's decoder-only prefix LM (§3.2.3): a random prefix read both ways, the rest predicted

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd",
                     "pad_vocab_multiple", "t5_num_buckets"):
            require(getattr(self, name) >= 1,
                    f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        require(0 <= self.dropout < 1, f"--dropout {self.dropout}: must be in [0, 1)")
        require(self.layer_norm_epsilon > 0,
                f"--layer-norm-epsilon {self.layer_norm_epsilon}: must be > 0")
        require(self.n_embd % self.n_head == 0,
                f"--n-embd {self.n_embd}: must be divisible by --n-head {self.n_head}")
        require(self.attn in ("naive", "sdpa"), f"--attn {self.attn}: must be naive or sdpa")
        require(self.pos in POS_SCHEMES, f"--pos {self.pos}: must be one of {', '.join(POS_SCHEMES)}")
        hs = self.n_embd // self.n_head
        require(self.pos != "rope" or hs % 2 == 0,
                f"--pos rope rotates pairs: head size {hs} must be even")
        require(self.pos != "sinusoidal" or self.n_embd % 2 == 0,
                "--pos sinusoidal needs an even --n-embd")
        require(self.shaw_max_distance >= 0,
                f"--shaw-max-distance {self.shaw_max_distance}: must be >= 0")
        require(self.t5_max_distance >= 1, f"--t5-max-distance {self.t5_max_distance}: must be >= 1")

    @property
    def padded_vocab_size(self):
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m


# Model sizes, with training settings where a recipe goes with them; train.py gives each
# key to the config that declares it. The gpt2* sizes are OpenAI's released models.
GPT2_RECIPE = dict(block_size=1024, tokenizer="gpt2", tokens_per_step=524288,
                   warmup_iters=715, max_iters=19073, weight_decay=0.1, beta2=0.95,
                   eval_interval=1000, pad_vocab_multiple=64)
PRESETS = {
    # The quick start: char-level Shakespeare in 4 minutes of any CPU (steps fit into max_time).
    # Tuned in fp32 on 2 cores: 64 chars x 32 rows beat 128 x 32, 128 x 16, 64 x 16 at equal time.
    # Naive attention is faster here (bf16 with AMX: 49 vs 76 ms/step; fp32: within 4%).
    "char-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, attn="naive",
                     tokenizer="char", batch_size=32, lr=3e-3, min_lr=3e-4, warmup_iters=100, max_iters=0,
                     max_time="4m", eval_interval=500, eval_train_tokens=65536, weight_decay=0.1, beta2=0.99),
    # nanoGPT's CPU recipe (shakespeare_char), for benchmarks: no biases, and fp32.
    # bf16's casts cost more than they save at 768 tokens a step (39 vs 30 ms/step).
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False,
                        dtype="fp32", tokenizer="char", batch_size=12, lr=1e-3, min_lr=1e-4,
                        warmup_iters=100, max_iters=2000, eval_interval=250, beta2=0.99),
    # The smallest GPT: for tests, and for trying flags in seconds.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0,
                 batch_size=4, max_iters=20, warmup_iters=5, eval_interval=10),
    # GPT-2 small (124M), GPT-3's 125M recipe. Table 2.1: lr 6e-4, 0.5M-token batches. App. B: beta2
    # 0.95, decay 0.1, 375M warm-up tokens = 715 steps, cosine to 10%. 19073 x 524288 = 10B tokens.
    "gpt2": dict(GPT2_RECIPE, n_layer=12, n_head=12, n_embd=768, dropout=0.0,
                 batch_size=16, lr=6e-4, min_lr=6e-5),
    # The larger GPT-2s: lr from GPT-3's nearest size. The micro-batches are a guess (only CPUs
    # were measured). Out of memory: lower --batch-size, and tokens_per_step accumulates more.
    "gpt2-medium": dict(GPT2_RECIPE, n_layer=24, n_head=16, n_embd=1024, batch_size=8, lr=3e-4, min_lr=3e-5),
    "gpt2-large": dict(GPT2_RECIPE, n_layer=36, n_head=20, n_embd=1280, batch_size=4, lr=2.5e-4, min_lr=2.5e-5),
    "gpt2-xl": dict(GPT2_RECIPE, n_layer=48, n_head=25, n_embd=1600, batch_size=2, lr=2e-4, min_lr=2e-5),
}
DEFAULT_PRESET = "char-cpu"

# ----------------------------------------------------------------------------------------------------------------------
# Hooks for other slides. GPT-2 itself is pos="learned" (wpe) and no prefix. The other schemes enter
#   added to the token embeddings: sinusoidal;  a logit bias for all layers: t5, alibi;
#   inside each attention: shaw (positions.shaw_attention), rope (rotates q and k);  nowhere: none.

# Trap: the sinusoid's rms, 1/sqrt(2), is 35x a token embedding's at init. Added as is, it swamps
# the tokens: training stalls (char Shakespeare, 100 steps: loss 3.45, learned 2.60). Vaswani et al.
# §3.4 scale tokens up by sqrt(C); we scale it to wpe's init rms, 0.01: only learnability differs.
SINUSOID_SCALE = 0.01 * math.sqrt(2)


def position_modules(c):
    """{wpe: added to the token embeddings} or {pos_bias: one logit bias for every layer}, or {}."""
    if c.pos in ("learned", "sinusoidal"):  # GPT-2's learned wpe.weight, or a fixed sinusoid
        return {"wpe": (LearnedAbsolute if c.pos == "learned" else SinusoidalAbsolute)(c.block_size, c.n_embd)}
    if c.pos == "t5":  # bidirectional=False: a causal decoder spends no buckets on the future
        return {"pos_bias": T5RelativeBias(c.n_head, c.t5_num_buckets, c.t5_max_distance,
                                           bidirectional=False)}
    return {"pos_bias": ALiBi(c.n_head)} if c.pos == "alibi" else {}


def prefix_lm_mask(q_pos, k_pos, prefix_len=None):
    """True where key j is visible to query i. Without prefix_len: GPT's causal mask (Tq, Tk).
    With prefix_len (B,): the prefix LM's (B, 1, Tq, Tk). Row b's first prefix_len[b] positions
    also see each other both ways: an encoder, then a decoder (Raffel et al. 2020 §3.2.1, Fig. 3).
    prefix_lm_mask(torch.arange(3), torch.arange(3), torch.tensor([2]))[0, 0] ->
        [[True, True, False], [True, True, False], [True, True, True]]"""
    if prefix_len is None:
        return causal_mask(q_pos, k_pos)  # (Tq, Tk)
    in_prefix = k_pos[None, None, :] < prefix_len.reshape(-1, 1, 1)  # (B, 1, Tk)
    return (causal_mask(q_pos, k_pos)[None] | in_prefix)[:, None]  # (B, 1, Tq, Tk)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


class KVCache:
    """Keys and values so far: per layer, a k and a v buffer of `shape` (B, H, T_max, hs).
    Preallocated, written in place: concatenating would copy the whole past at every step.
    `length` counts the filled positions. t5.py's decoder uses the same class."""

    def __init__(self, n_layer, shape, device, dtype):
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0

    def update(self, layer, k, v):
        """Append k, v (B, H, T_new, hs) to `layer`; return that layer's keys and values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.k[layer].size(2):
            raise ValueError(f"the KV cache holds {self.k[layer].size(2)} positions; {end} do not fit")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention (Vaswani et al. §3.2.2).
    c_attn makes q, k, v; c_proj mixes the heads."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.attn, self.layer_idx = config.n_head, config.attn, layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual = True  # gets GPT-2's scaled init (GPT._init_weights)
        self.attn_dropout = nn.Dropout(config.dropout)  # on the attention probabilities (GPT-2)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.rope = config.pos == "rope"  # hooks: rope here, shaw below
        hs = config.n_embd // config.n_head
        self.shaw = ShawRelative(hs, config.shaw_max_distance) if config.pos == "shaw" else None

    def forward(self, x, pos, bias=None, cache=None, prefix_len=None):
        """x (B, T, C) -> (B, T, C). pos (T,). bias: None or (H, T, T_k), added to the scaled
        scores (t5, alibi). cache: a KVCache or None. prefix_len: None or (B,) (prefix_lm_mask)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # (B, T, C) -> (B, H, T, hs): each head attends over its own hs-dim slice
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            # Rotate before caching: a cached key keeps its position's rotation (RoFormer §3.4).
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, T_past + T, hs)
        T_k = k.size(2)
        k_pos = torch.arange(T_k, device=x.device)  # the keys: the cached past, then these T

        if self.shaw is not None:
            y = shaw_attention(q, k, v, self.shaw, pos, k_pos, use_sdpa=self.attn == "sdpa",
                               allowed=prefix_lm_mask(pos, k_pos, prefix_len),
                               dropout=self.attn_dropout)
        elif self.attn == "naive":  # the readable path: the equation, step by step
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # scores (B, H, T, T_k)
            if bias is not None:
                att = att + bias  # relative positions, as a bias on the scores
            allowed = prefix_lm_mask(pos, k_pos, prefix_len)  # True where key j is visible
            att = att.masked_fill(~allowed, float("-inf"))  # no peeking at the future
            att = F.softmax(att, dim=-1)  # each row: a distribution over the visible keys
            att = self.attn_dropout(att)
            y = att @ v  # (B, H, T, hs) probability-weighted sum of the values
        else:  # fused: the same maths in one kernel that never stores the probabilities
            # Trap: is_causal aligns its mask top-left: right only when q and k share positions.
            # A cache, bias or prefix needs an explicit mask (any bias merged in, in q's dtype).
            mask = None  # the kernel's own causal mask: the fastest case, and training's
            if bias is not None or T != T_k or prefix_len is not None:
                mask = prefix_lm_mask(pos, k_pos, prefix_len)
                if bias is not None:
                    mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # the heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> 4C -> C with GPT-2's tanh GELU."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # Trap: nn.GELU() is the exact erf form; GPT-2 used the tanh approximation.
        # They differ by ~1e-3: invisible at init, not against the released weights.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN block (GPT-2 §2.3): x + attn(ln_1(x)), then x + mlp(ln_2(x)). The residual stream
    itself is never normalised, so deep stacks train without post-LN's warm-up tricks."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, pos, bias=None, cache=None, prefix_len=None):
        x = x + self.attn(self.ln_1(x), pos, bias, cache, prefix_len)
        x = x + self.mlp(self.ln_2(x))
        return x


# ----------------------------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            **position_modules(config),  # wpe for GPT-2
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017, GPT-2): the output projection IS the token embedding.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # OpenAI's model.py: N(0, 0.02), wpe N(0, 0.01), biases 0, and no other rule. The residual
        # scaling is from the paper's text (GPT-2 §2.3: the weights of residual layers are scaled by
        # 1/sqrt(N), N the number of residual layers), so the stream's variance does not grow with
        # depth. Reading N as 2L (attention and MLP each add to the stream) and scaling c_proj is
        # the convention of Hugging Face's GPT2PreTrainedModel and of nanoGPT, which we follow.
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):  # also T5's and Shaw's tables
            is_wpe = module is getattr(self.transformer, "wpe", None)
            nn.init.normal_(module.weight, mean=0.0, std=0.01 if is_wpe else 0.02)

    def num_params(self, non_embedding=False):
        """Parameters, tied ones once. non_embedding drops wte (lm_head's matmul) and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            n -= sum(p.numel() for p in self.transformer.wpe.parameters()) if "wpe" in self.transformer else 0
        return n

    def no_weight_decay(self):
        """Position tables: decay pulls them to "no position". train.py skips biases and gains."""
        tables = (LearnedAbsolute, T5RelativeBias, ShawRelative)
        return {f"{m_name}.{p_name}" for m_name, m in self.named_modules() if isinstance(m, tables)
                for p_name, _ in m.named_parameters()}

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight, lm_head's matmul included (Kaplan et al. 2020,
        eq. 2.1), plus 12 L T C for the attention scores and mixing (PaLM, App. B)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 6 * c.padded_vocab_size * c.n_embd + \
            12 * c.n_layer * c.block_size * c.n_embd

    def forward(self, idx, targets=None, cache=None, prefix_len=None):
        """idx (B, T) -> (logits (B, T, V), mean cross-entropy against targets (B, T) or None).
        Targets of -100 are ignored."""
        x, pos, bias = self.embed(idx, cache)
        for block in self.transformer.h:
            x = block(x, pos, bias, cache, prefix_len)
        if cache is not None:
            cache.length += idx.size(1)
        logits = self.unembed(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def embed(self, idx, cache=None):
        """What the blocks read: (x (B, T, C), pos (T,), bias None or (H, T, T_k))."""
        T, past, c = idx.size(1), cache.length if cache is not None else 0, self.config
        # Only a learned table has a last row: the other schemes run at any length without a cache.
        if past + T > c.block_size and (c.pos == "learned" or cache is not None):
            why = ("learned absolute positions cannot extrapolate" if c.pos == "learned"
                   else "the KV cache has no room")
            raise ValueError(
                f"sequence of {past + T} tokens is longer than block_size={c.block_size} ({why})")
        pos = torch.arange(past, past + T, device=idx.device)  # (T,), continuing after the cache
        x = self.transformer.wte(idx)  # (B, T, C)
        if c.pos == "learned":
            x = x + self.transformer.wpe(pos)  # GPT-2: a learned (T, C) vector per position
        elif c.pos == "sinusoidal":  # hook
            x = x + SINUSOID_SCALE * self.transformer.wpe(pos)
        bias = None
        if "pos_bias" in self.transformer:  # hook: t5 and alibi, computed once for all layers
            bias = self.transformer.pos_bias(pos, torch.arange(past + T, device=idx.device))
        return self.transformer.drop(x), pos, bias

    def unembed(self, x):
        """ln_f, then lm_head: (B, T, C) -> (B, T, V). Padding rows are never predicted."""
        return self.lm_head(self.transformer.ln_f(x))[..., :self.config.vocab_size]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, generator=None):
        """idx (B, T) plus max_new_tokens sampled tokens (sample_next). With use_cache the prompt
        is encoded once; each new token then attends to the cached keys and values.
        Trap: once the text outgrows block_size, the window slides and every position in it
        shifts: the cache is stale. From then on each step re-encodes the last block_size tokens."""
        was_training, c = self.training, self.config
        self.eval()
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= c.block_size:
                if cache is None:  # prefill: the whole prompt at once
                    shape = (idx.size(0), c.n_head, c.block_size, c.n_embd // c.n_head)
                    cache = KVCache(c.n_layer, shape, idx.device, self.lm_head.weight.dtype)
                    logits, _ = self(idx, cache=cache)
                else:  # decode: the newest token only
                    logits, _ = self(idx[:, -1:], cache=cache)
            else:
                logits, _ = self(idx[:, -c.block_size:])
            next_id = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        self.train(was_training)
        return idx

    # HF's files keep OpenAI's layout: c_attn, c_proj, c_fc are "Conv1D", weight (in, out), the
    # transpose of nn.Linear's. Trap: the square c_proj loads untransposed all the same: garbage.
    CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """A GPT2LMHeadModel directory or a hub name ("gpt2"). overrides: e.g. attn="naive"."""
        if overrides.get("pos", "learned") != "learned":
            raise ValueError(f"from_pretrained: GPT-2 checkpoints have learned absolute positions "
                             f"(wpe); pos={overrides['pos']!r} would leave them unused")
        hf, weights = read_hf_dir(path)
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{path}: activation {hf['activation_function']!r} is not GPT-2's tanh GELU")
        model = cls(GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                              n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                              dropout=0.0, bias=True,
                              layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), **overrides))
        weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
        wte, ours = weights.get("wte.weight"), model.transformer.wte.weight.detach()
        if wte is not None and len(wte) < len(ours):  # padded vocab: extra rows keep their init
            weights["wte.weight"] = torch.cat([wte, ours[len(wte):]])
        copy_weights(model, weights, path, name=lambda k: k.removeprefix("transformer."),
                     skip=("lm_head.",),
                     convert=lambda k, w: w.t() if k.endswith(cls.CONV1D) else w)
        return model

    def adapt_state(self, state, flag="load"):
        """A checkpoint's weights for this model when only its context is shorter: the learned position
        table cut to block_size rows (nanoGPT's crop_block_size), the first rows kept as they were. A
        longer context is refused: learned positions have no rows to extrapolate with."""
        wpe, rows = state.get("transformer.wpe.weight"), self.config.block_size
        if wpe is None or self.config.pos != "learned" or len(wpe) == rows:
            return state
        if len(wpe) < rows:
            raise ValueError(f"{flag}: --block-size {rows} is longer than its position table ({len(wpe)} rows); "
                             f"learned positions cannot extrapolate")
        return {**state, "transformer.wpe.weight": wpe[:rows]}

    def export_hf(self, path):
        """The inverse of from_pretrained: a directory that transformers' GPT2LMHeadModel reads."""
        c = self.config
        if c.pos != "learned":
            raise ValueError(f"export_hf: the HF GPT-2 format has learned absolute positions (wpe) "
                             f"only; this model uses pos={c.pos!r}")
        if not c.bias:
            raise ValueError("the HF GPT-2 format has biases everywhere; "
                             "this model was built with bias=False")
        config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size,
                      n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd,
                      n_layer=c.n_layer, n_head=c.n_head, n_inner=None,
                      activation_function="gelu_new", resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                      attn_pdrop=c.dropout, layer_norm_epsilon=c.layer_norm_epsilon,
                      initializer_range=0.02, scale_attn_weights=True, tie_word_embeddings=True,
                      bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1)
        weights = {}
        for name, w in self.state_dict().items():
            if name.startswith("transformer."):  # not lm_head (HF re-ties it) nor subclass extras
                w = w.t() if name.endswith(self.CONV1D) else w
                weights[name] = (w[:c.vocab_size] if name == "transformer.wte.weight" else w).float()
        write_hf_dir(path, config, weights)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B, 1) ids. Temperature (0: greedy), then top-k, then top-p on the rest:
    nucleus sampling (Holtzman et al. 2020), the smallest set of tokens whose probability reaches p.
    sample_next(torch.tensor([[0., 5., 1.]]), temperature=0) -> tensor([[1]])"""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # those above reach p; never the first
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


# ----------------------------------------------------------------------------------------------------------------------
# The objective: next-token prediction (GPT-1 eq. 1), in the methods train.py's docstring lists

SPECIAL_TOKENS = ()  # none but <|endoftext|>, which train.py puts between documents for every model


class NextTokenObjective:
    """Windows of tokens, targets shifted by one. Windows may cross documents: the end-of-text
    token between them teaches where a work ends. Reports bits per byte: tokenizer-independent."""

    def __init__(self, config, tokenizer):
        self.block_size = config.block_size
        self.token_bytes = tokenizer.token_bytes  # (V,) UTF-8 length of each token
        self.raw_tokens_per_row = config.block_size + 1  # T inputs and T targets share T - 1 tokens
        self.tokens_per_row = config.block_size
        self.prefix_lm = getattr(config, "prefix_lm", False)

    def train_batch(self, split, batch_size, generator):
        """batch_size random windows of split.tokens (a 1-D numpy array)."""
        starts = torch.randint(len(split.tokens) - self.raw_tokens_per_row + 1, (batch_size,),
                               generator=generator)
        batch = self.windows(split.tokens, starts.tolist(), self.block_size)
        return self.split_prefix(batch, generator) if self.prefix_lm else batch

    def eval_batches(self, split, batch_size):
        """Every target of the split once, in order: whole windows, then a partial last one."""
        T, n = self.block_size, len(split.tokens) - 1  # n targets: tokens[1:]
        starts = list(range(0, n - T + 1, T))
        rows = [(starts[i:i + batch_size], T) for i in range(0, len(starts), batch_size)]
        if n > len(starts) * T:
            rows.append(([len(starts) * T], n - len(starts) * T))
        g = torch.Generator().manual_seed(1234)  # the prefix LM's evaluation splits: the same every time
        for some, length in rows:
            batch = self.windows(split.tokens, some, length)
            yield self.split_prefix(batch, g) if self.prefix_lm and length > 1 else batch

    @staticmethod
    def split_prefix(batch, generator):
        """T5's prefix LM in one stack (§3.2.3; Table 2's "Prefix LM" rows): row b's first P_b tokens are
        its input, which every position reads both ways (gpt.prefix_lm_mask); the model predicts the
        rest. P_b is uniform on 1..T-1, every split point alike, as T5's random_prefix_noise_mask at
        0.5. A target inside the prefix would be visible to its own position: it is dropped (-100).
        idx [[5, 6, 7, 8]], targets [[6, 7, 8, 9]], P = 2 -> targets [[-100, 7, 8, 9]], prefix_len [2]"""
        idx, targets = batch["idx"], batch["targets"]
        B, T = idx.shape
        prefix_len = torch.randint(1, T, (B,), generator=generator)  # (B,)
        inside = torch.arange(T)[None, :] < prefix_len[:, None] - 1  # (B, T): target t is token t + 1
        return {"idx": idx, "targets": targets.masked_fill(inside, -100), "prefix_len": prefix_len}

    def windows(self, tokens, starts, T):
        """windows(np.array([5, 6, 7, 8]), [0], 2) -> idx [[5, 6]], targets [[6, 7]]"""
        rows = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64))  # (B, T + 1)
        return {"idx": rows[:, :-1], "targets": rows[:, 1:]}

    @staticmethod
    def count_tokens(batch):
        return batch["idx"].numel()

    @staticmethod
    def denominators(batch):
        return {"nll": int((batch["targets"] != -100).sum())}  # the step's real targets (not -100)

    def loss(self, model, batch, denominators=None):
        """(summed log-loss / denominator, sums). Default denominator: this batch's real targets."""
        denominators = denominators or self.denominators(batch)
        prefix = {"prefix_len": batch["prefix_len"]} if "prefix_len" in batch else {}  # --prefix-lm only
        logits, _ = model(batch["idx"], **prefix)
        targets = batch["targets"]
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="sum")
        return nll / max(1, denominators["nll"]), self.sums(nll, targets)

    def sums(self, nll, targets):
        real = targets != -100
        return dict(nll=nll.detach(), tokens=real.sum(),
                    bytes=self.token_bytes.to(targets.device)[targets[real]].sum())

    @staticmethod
    def summarize(sums):
        """Loss in nats per token, and bits per byte."""
        return {"loss": float(sums["nll"]) / float(sums["tokens"]),
                "bpb": float(sums["nll"]) / (math.log(2) * float(sums["bytes"]))}


Model, Config, Objective = GPT, GPTConfig, NextTokenObjective  # train.py's gpt, via mtp.py


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning (train.py --task, finetune.py): GPT-1's way


class Classifier(nn.Module):
    """GPT-1 (Radford et al. 2018, §3.2-3.3): the text between a start and an extract token (a pair:
    A, a delimiter, B), the last block's state at the extract token, one new linear layer W_y:
    P(y | x) = softmax(h_l^m W_y). With lm_weight = lambda, the language-modeling loss on the same text
    is added: L3 = L2 + lambda * L1 (GPT-1: lambda = 0.5). GPT-1 learned three new tokens for start,
    delimiter and extract; our tokenizers have one special token, <|endoftext|>, which plays all three.
    forward(...) -> (per-example loss (B,), predicted label (B,)): finetune.TaskObjective's interface."""
    LORA = ("*.attn.c_attn",)  # q, k, v in one matrix: LoRA adapts all three (Hu et al. tried W_q, W_v)
    ADAPTER = ("*.attn.c_proj", "*.mlp.c_proj")  # each sublayer's output, before the residual sum
    EMBEDDING = "transformer.wte"  # the table a trained prompt (--peft prefix) extends
    PROMPT_AT = 0  # the prompt is read first
    PAD = "<|endoftext|>"  # right padding: a causal model never reads it from a real token
    CAUSAL_LM = True  # a left-to-right LM: --task-format completion (finetune.Completion) applies

    def __init__(self, model, task, labels, tokenizer, lm_weight=0.0):
        super().__init__()
        self.pretrained, self.labels, self.lm_weight = model, labels, lm_weight
        self.max_len, self.eot = model.config.block_size, tokenizer.specials["<|endoftext|>"]
        self.dropout = nn.Dropout(model.config.dropout)
        self.head = nn.Linear(model.config.n_embd, len(labels))  # W_y
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def encode(self, a, b=None):
        """(ids, segment ids): start A (delim B) extract. encode([7, 8], [9]) -> ([e, 7, 8, e, 9, e], [0] * 6)"""
        ids = [self.eot, *a, *([self.eot, *b] if b is not None else []), self.eot]
        return ids, [0] * len(ids)

    def forward(self, input_ids, token_type_ids, attention_mask, labels):
        m, B = self.pretrained, input_ids.size(0)
        # a prefix LM reads its whole input both ways, as T5 fine-tunes it (the text is the prefix)
        prefix = attention_mask.sum(1) if m.config.prefix_lm else None  # (B,) or None
        x, pos, bias = m.embed(input_ids)
        for block in m.transformer.h:
            x = block(x, pos, bias, None, prefix)
        h = m.transformer.ln_f(x)  # (B, T, C)
        last = attention_mask.sum(1) - 1  # (B,) the extract token: the last real one
        logits = self.head(self.dropout(h[torch.arange(B), last]))  # (B, n_labels)
        loss = F.cross_entropy(logits.float(), labels, reduction="none")  # (B,) L2, per example
        if self.lm_weight:  # L1: next-token loss over the example's real tokens
            targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (B, T-1)
            lm = m.lm_head(h[:, :-1])[..., :m.config.vocab_size]  # (B, T-1, V)
            nll = F.cross_entropy(lm.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
            loss = loss + self.lm_weight * nll.sum(1) / attention_mask[:, 1:].sum(1).clamp(min=1)
        return loss, logits.argmax(-1)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling: at the end of a run (train.py calls demo), and from the command line


@dataclass
class DemoConfig:
    prompt: str = "\n"  # text the end-of-run sample continues
    sample_tokens: int = 500  # tokens sampled at the end of a run (0 = no sample)
    temperature: float = 0.8  # sampling temperature (0 = greedy)
    top_k: int = 0  # sample from the k most likely tokens only (0 = all)

    def __post_init__(self):
        require(0 <= self.temperature < math.inf,
                f"--temperature {self.temperature}: must be a number >= 0 (0 = greedy)")
        require(self.top_k >= 0, f"--top-k {self.top_k}: must be >= 0 (0 = every token)")
        require(self.sample_tokens >= 0, f"--sample-tokens {self.sample_tokens}: must be >= 0 (0 = no sample)")


def demo(model, tokenizer, cfg, device, seed=1337):
    """Print a sample that continues cfg.prompt: what the model has learned, in its own words."""
    if cfg.sample_tokens <= 0:
        return
    prompt = torch.tensor([tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(prompt, cfg.sample_tokens, cfg.temperature, cfg.top_k or None, generator=g)
    print("-" * 80 + "\n" + tokenizer.decode(out[0].tolist()) + "\n" + "-" * 80)


def _refuse(message):
    raise UsageError(f"{message} (see --help)")


def parser(description, hf=True):
    """Flags of the gpt.py and mtp.py samplers. Bad input: one line, exit 2 (common.command)."""
    p = argparse.ArgumentParser(description=description)
    p.error = _refuse
    src = p.add_mutually_exclusive_group(required=True) if hf else p
    src.add_argument("--ckpt", required=not hf, help="a train.py checkpoint, e.g. out/gpt/ckpt.pt")
    if hf:
        src.add_argument("--hf",
                         help="a GPT2LMHeadModel directory; text goes through GPT-2's tokenizer")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    return p


def load(args):
    """(model, tokenizer, prompt ids (1, T)) from --ckpt (a train.py run of --model gpt) or --hf."""
    import data  # the tokenizers
    import train  # checkpoints and devices, as for every model

    require(args.max_new_tokens >= 0, f"--max-new-tokens {args.max_new_tokens}: must be >= 0")
    device = train.pick_device(args.device)
    if args.ckpt:
        model, tokenizer, _ = train.load_for_inference(args.ckpt, device, "--ckpt", model="gpt")
    else:
        require(os.path.isdir(args.hf), f"--hf {args.hf}: no such directory")
        try:
            model, tokenizer = GPT.from_pretrained(args.hf).to(device).eval(), data.gpt2_tokenizer()
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"--hf {args.hf}: {e}") from None
    return model, tokenizer, torch.tensor([tokenizer.encode(args.prompt) or [tokenizer.eot_id]],
                                          device=device)


@command
def main(argv=None):
    p = parser("Sample from a GPT: a train.py checkpoint, "
               "or a Hugging Face GPT-2 such as OpenAI's weights.")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set reaching probability p")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    require(0 <= args.temperature < math.inf, f"--temperature {args.temperature}: must be a number >= 0 (0 = greedy)")
    require(args.top_k is None or args.top_k >= 1,
            f"--top-k {args.top_k}: must be >= 1 (leave it out for all)")
    require(args.top_p is None or 0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1]")
    model, tokenizer, idx = load(args)
    g = torch.Generator(device=idx.device).manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator=g)
    print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
