"""
GPT-2: a decoder-only Transformer trained by next-token prediction, in one file.

Papers
  - Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training" (GPT-1): a 12-layer Transformer
    decoder trained as a left-to-right language model, §3.1 eq. (1)-(2).
  - Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2) §2.3: LayerNorm moved to the input
    of each sub-block (pre-LN), an extra LayerNorm after the last block, residual projections initialised with a
    1/sqrt(N) scale (N residual layers), context 1024, vocabulary 50,257.
  - Vaswani et al. 2017, "Attention Is All You Need" §3.2.1: scaled dot-product attention softmax(QK^T / sqrt(d_k)) V.
  Slides (lecture 001): "Autoregressive decoder-only models / GPT", "GPT models", "GPT-2", "Positional embeddings /
  learned encoding".
  Positions: `--pos` swaps GPT-2's learned table for any scheme of positions.py (sinusoidal, Shaw, T5 bias, ALiBi, RoPE,
  or none); each scheme's equation and paper are there, this file only decides where each one enters the model.
  Multi-token prediction (slides "Multi-token prediction", both of them), off by default (`--mtp-heads 0`):
  - Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction" §2: a shared trunk f_s, n
    independent heads f_h_i (one Transformer layer each) and the shared unembedding f_u,
    P(x_t+i | x_t:1) = softmax(f_u(f_h_i(f_s(x_t:1)))), trained on the sum of the n heads' losses; at inference the
    next-token head alone, or the others as drafts for self-speculative decoding (their §3.2; Stern et al. 2018).
  - DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" §2.2, eq. (21)-(25): sequential MTP modules; depth k combines the
    previous depth's hidden state at position i with the embedding of token i+k, so every prediction keeps the causal
    chain. `--mtp sequential`.

Faithful to OpenAI's released model (github.com/openai/gpt-2, src/model.py) and therefore to Hugging Face's
GPT2LMHeadModel, which tests/test_gpt.py uses as an oracle: same parameter names (wte, wpe, h.i.ln_1, attn.c_attn, ...),
GELU with the tanh approximation, LayerNorm eps 1e-5, lm_head tied to wte and without a bias.

Run
  python train.py --model gpt                               # train a small char-level GPT on Shakespeare (CPU, minutes)
  python gpt.py --ckpt out/gpt/ckpt.pt --prompt "ROMEO:"    # sample from the checkpoint that run wrote
  python train.py --model gpt --pos rope                    # the same model with rotary positions instead of wpe
  python train.py --model gpt --mtp-heads 3                 # also predict 2, 3 and 4 tokens ahead (Gloeckle's n = 4)
  python experiments.py mtp                                 # next-token vs multi-token prediction at equal compute

Legend
  B batch size, T sequence length (time), C n_embd (channels), H n_head, hs = C // H head size, V vocabulary size,
  L n_layer. idx: (B, T) token ids. logits: (B, T, V). pos: (T,) absolute positions of the T new tokens; T_k keys.
  D mtp_heads, the extra tokens predicted at each position; n = 1 + D (Gloeckle's n: every token predicted, the next
  one included). Head i (i = 1..n) predicts the token i places ahead; DeepSeek's depth k = i - 1.
"""

import argparse
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_io import read_hf_dir, write_hf_dir
from positions import (ALiBi, LearnedAbsolute, ShawRelative, SinusoidalAbsolute, T5RelativeBias, apply_rope,
                       causal_mask)

# ----------------------------------------------------------------------------------------------------------------------
# Config and presets


# Where each positional scheme enters the model (equations in positions.py):
#   added to the token embeddings:  learned (GPT-2's wpe, the default), sinusoidal (Vaswani et al. §3.5)
#   a bias on the attention logits: t5 (learned per head and distance bucket), alibi (fixed -m_h * distance),
#                                   shaw (q_i . a^K_ij, plus a^V_ij added to the values; per layer)
#   a rotation of q and k:          rope
#   nothing at all:                 none (a causal decoder can still infer position from how much it can see)
POS_SCHEMES = ("learned", "sinusoidal", "shaw", "t5", "alibi", "rope", "none")
SINUSOID_SCALE = 0.01 * math.sqrt(2)  # the sinusoid's rms 1/sqrt(2) -> 0.01, GPT-2's wpe init std (see GPT.forward)


@dataclass
class GPTConfig:
    block_size: int = 256  # training context T_max: rows of the learned position table wpe, slots of the KV cache
    vocab_size: int = 50257  # the tokenizer's vocabulary (train.py overwrites it from the tokenizer it builds)
    n_layer: int = 4  # L: Transformer blocks
    n_head: int = 4  # H: attention heads per block, each of size n_embd / n_head
    n_embd: int = 128  # C: width of the residual stream and of every embedding
    dropout: float = 0.0  # GPT-2 used 0.1 at pretraining; 0 is better for short runs that never see a token twice
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5  # GPT-2's value; the released model computes LayerNorm with exactly this eps
    attn: str = "sdpa"  # "naive": softmax(QK^T/sqrt(hs))V written out; "sdpa": the fused kernel. Tests prove them equal.
    pad_vocab_multiple: int = 1  # round the embedding table up (e.g. 64 -> 50304 rows): faster matmuls on GPUs
    pos: str = "learned"  # learned (GPT-2) | sinusoidal | shaw | t5 | alibi | rope | none: see positions.py
    shaw_max_distance: int = 16  # Shaw et al.'s clipping distance k (their §4.3: no gain beyond k = 2..4; 16 is safe)
    t5_num_buckets: int = 32  # T5's defaults: 32 buckets, all for the past in a causal decoder ...
    t5_max_distance: int = 128  # ... the last one shared by every offset >= 128
    mtp_heads: int = 0  # D: extra future tokens predicted at each position (0 = plain GPT; Gloeckle's n = 1 + D)
    mtp: str = "parallel"  # parallel: Gloeckle et al.'s heads on one trunk | sequential: DeepSeek-V3's chained modules
    mtp_weight: float = 1.0  # w in loss = L_1 + w * (L_2 + ... + L_n): 1 is Gloeckle's plain sum; DeepSeek's lambda / D

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.attn not in ("naive", "sdpa"):
            raise ValueError(f"attn must be 'naive' or 'sdpa', got {self.attn!r}")
        if self.pos not in POS_SCHEMES:
            raise ValueError(f"pos must be one of {', '.join(POS_SCHEMES)}; got {self.pos!r}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos='rope' rotates pairs of coordinates: head size n_embd/n_head = "
                             f"{self.n_embd // self.n_head} must be even")
        if self.pos == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"pos='sinusoidal' needs an even n_embd (sin/cos pairs), got {self.n_embd}")
        if self.mtp not in ("parallel", "sequential"):
            raise ValueError(f"mtp must be 'parallel' or 'sequential', got {self.mtp!r}")
        if self.mtp_heads < 0:
            raise ValueError(f"mtp_heads must be >= 0 (extra tokens predicted), got {self.mtp_heads}")
        if self.mtp_heads and self.mtp == "parallel" and self.n_layer < 1:
            raise ValueError("mtp='parallel' makes the last block the next-token head: it needs n_layer >= 1")

    @property
    def padded_vocab_size(self):
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m


# A preset sets model sizes and, where a recipe goes with them, training settings (train.py applies each key to whichever
# config declares it and rejects any other key). The gpt2* sizes are OpenAI's released models.
PRESETS = {
    # The quick start: char-level Shakespeare on any laptop CPU in about 4 minutes (README "Quick start"), a time budget
    # rather than a step count: the loop measures its steps and fixes how many fit in max_time, so the cosine ends on
    # time on a slow or a fast CPU. Tuned in fp32 on 2 cores without native bf16 (README errata): at the same wall time,
    # 64-character windows x 32 rows (2,048 tokens a step) beat 128 x 32, 128 x 16 and 64 x 16 in val loss: more
    # steps of fewer tokens, and a quarter of the attention cost of 128-character windows. The readable attention path
    # is the faster one in CPU bf16 here (49 vs 76 ms/step with AMX), and within 4% of the fused kernel in fp32.
    "char-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, attn="naive",
                     tokenizer="char", batch_size=32, lr=3e-3, min_lr=3e-4, warmup_iters=100, max_iters=0,
                     max_time="4m", eval_interval=500, eval_train_tokens=65536, weight_decay=0.1, beta2=0.99),
    # nanoGPT's published CPU recipe (shakespeare_char, README "baby GPT on a CPU"), for side-by-side benchmarks.
    # Its model has no biases (nanoGPT's default bias=False) and it trains in fp32: at 768 tokens per step the bf16
    # autocast casts cost more than the tiny matmuls save (measured: 39 ms/step in bf16, 30 in fp32).
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False, dtype="fp32",
                        tokenizer="char", batch_size=12, lr=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000,
                        eval_interval=250, beta2=0.99),
    # The smallest thing that still is a GPT: for tests and for trying flags in seconds.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0,
                 batch_size=4, max_iters=20, warmup_iters=5, eval_interval=10),
    # GPT-2 small (124M). Training recipe as in the GPT-3 paper's Table 2.1 row for 125M (lr 6e-4, 0.5M-token batches)
    # and its App. B (Adam beta2 0.95, weight decay 0.1, warm-up over 375M tokens = 715 steps, cosine decay to 10%),
    # which is what single-GPU GPT-2 reproductions use. 19,073 steps x 524,288 tokens = 10B tokens.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, tokenizer="gpt2",
                 batch_size=16, tokens_per_step=524288, lr=6e-4, min_lr=6e-5, warmup_iters=715, max_iters=19073,
                 weight_decay=0.1, beta2=0.95, eval_interval=1000, pad_vocab_multiple=64),
    # The larger GPT-2s: the same recipe with GPT-3 Table 2.1's lr for the nearest size (350M, 760M, 1.3B rows). The
    # micro-batch halves with each size: a guess, not measured (this project has only run on CPUs). If memory runs
    # out, lower --batch-size; tokens_per_step keeps the optimizer's batch at 0.5M tokens by accumulating more.
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, tokenizer="gpt2", lr=3e-4, min_lr=3e-5,
                        batch_size=8, tokens_per_step=524288, warmup_iters=715, max_iters=19073, eval_interval=1000,
                        weight_decay=0.1, beta2=0.95, pad_vocab_multiple=64),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, tokenizer="gpt2", lr=2.5e-4, min_lr=2.5e-5,
                       batch_size=4, tokens_per_step=524288, warmup_iters=715, max_iters=19073, eval_interval=1000,
                       weight_decay=0.1, beta2=0.95, pad_vocab_multiple=64),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, tokenizer="gpt2", lr=2e-4, min_lr=2e-5,
                    batch_size=2, tokens_per_step=524288, warmup_iters=715, max_iters=19073, eval_interval=1000,
                    weight_decay=0.1, beta2=0.95, pad_vocab_multiple=64),
}
DEFAULT_PRESET = "char-cpu"

# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


class KVCache:
    """Keys and values of the tokens seen so far, one pair of (B, H, block_size, hs) buffers per layer.

    Preallocated so that appending a token writes in place instead of concatenating (which would copy the whole past at
    every step and make sampling quadratic again). `length` counts the filled positions.
    """

    def __init__(self, n_layer, shape, device, dtype):  # shape (B, H, T_max, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0

    def update(self, layer, k, v):
        """Append k, v (B, H, T_new, hs) to `layer` and return that layer's keys and values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.k[layer].size(2):
            raise ValueError(f"the KV cache holds block_size={self.k[layer].size(2)} positions; {end} do not fit")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def prefix_lm_mask(q_pos, k_pos, prefix_len):
    """(B, 1, Tq, Tk) bools, True where key j is visible to query i in row b: the causal mask, plus every key inside the
    row's prefix (positions < prefix_len[b]). So the prefix attends to itself bidirectionally (an encoder over the
    inputs) and every later token sees the whole prefix and its own past (a decoder): T5's "prefix LM" masking
    (Raffel et al. 2020, §3.2.1 and Figure 3), one stack of parameters, as UniLM's seq2seq mask.
    prefix_lm_mask(torch.arange(3), torch.arange(3), torch.tensor([2]))[0, 0] ->
        [[True, True, False], [True, True, False], [True, True, True]]"""
    visible_prefix = k_pos[None, None, :] < prefix_len.reshape(-1, 1, 1)  # (B, 1, Tk)
    return (causal_mask(q_pos, k_pos)[None] | visible_prefix)[:, None]  # (B, 1, Tq, Tk)


def attention_mask(q_pos, k_pos, prefix_len=None):
    """GPT's causal mask (Tq, Tk), or with prefix_len the prefix LM's (B, 1, Tq, Tk)."""
    return causal_mask(q_pos, k_pos) if prefix_len is None else prefix_lm_mask(q_pos, k_pos, prefix_len)


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention (Vaswani et al. §3.2.2), GPT-2 names: c_attn makes q, k, v; c_proj mixes heads.

    Positions enter here for three schemes: rope rotates q and k, shaw adds its own per-layer logit bias and value
    term, and t5/alibi arrive as a ready-made logit bias that GPT.forward computes once for all layers.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.attn, self.layer_idx = config.n_head, config.attn, layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual = True  # marks the projections that get GPT-2's scaled init (see GPT._init_weights)
        self.attn_dropout = nn.Dropout(config.dropout)  # on the attention probabilities, as in GPT-2
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.rope = config.pos == "rope"
        # Shaw et al. learn a^K, a^V in every layer (shared by the heads); its bias depends on q, so it cannot be
        # computed once for the whole model the way T5's and ALiBi's can.
        hs = config.n_embd // config.n_head
        self.shaw = ShawRelative(hs, config.shaw_max_distance) if config.pos == "shaw" else None

    def forward(self, x, pos, bias=None, cache=None, prefix_len=None):
        """x (B, T, C); pos (T,) absolute positions of these tokens; bias None or (H, T, T_k), added to the scaled
        logits (T5, ALiBi); cache a KVCache or None; prefix_len None or (B,) (see prefix_lm_mask). Returns (B, T, C)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # (B, T, C) -> (B, H, T, hs): every head attends independently over its own hs-dim slice
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            # Rotate BEFORE caching: a cached key keeps the rotation of the position it was computed at, and
            # q_m . k_n then depends on m - n only (RoFormer §3.4). Values are never rotated.
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, T_past + T, hs)
        T_k = k.size(2)
        k_pos = torch.arange(T_k, device=x.device)  # keys are every position so far: the cached past, then these T
        if self.shaw is not None:
            bias = self.shaw.score_bias(q, pos, k_pos)  # (B, H, T, T_k) = q_i . a^K_ij / sqrt(hs)

        if self.attn == "naive":
            # The readable path: the equation, step by step.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T_k) scaled scores
            if bias is not None:
                att = att + bias  # relative position, as a bias on the logits
            allowed = attention_mask(pos, k_pos, prefix_len)  # (T, T_k) or (B, 1, T, T_k): True where j is visible
            att = att.masked_fill(~allowed, float("-inf"))  # no peeking at the future
            att = F.softmax(att, dim=-1)  # each row: a distribution over the keys this query may see
            att = self.attn_dropout(att)
            y = att @ v  # (B, H, T, hs) probability-weighted sum of values
        else:
            # The fused path: same maths in one kernel (FlashAttention / memory-efficient on CUDA, a fused CPU kernel),
            # never materialising the (T, T_k) matrix. is_causal aligns the mask top-left, which is only right when
            # queries and keys are the same positions; with a cache we pass the bottom-right-aligned mask explicitly.
            # A position bias goes in as a float attn_mask, which sdpa adds to the scaled scores: the bias and the
            # causal mask become one (.., T, T_k) tensor, -inf in the future. (This materialises (T, T_k) after all;
            # the kernel still avoids storing the probabilities.) Trap: under autocast the mask must be in q's dtype.
            if bias is None and T == T_k and prefix_len is None:
                mask = None  # the kernel's own causal masking: the fastest case, and the one training hits
            else:
                mask = attention_mask(pos, k_pos, prefix_len)  # (T, T_k) or (B, 1, T, T_k): True where j is visible
                if bias is not None:
                    mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
            if self.shaw is not None and self.shaw.values:
                # sdpa never returns the probabilities, and Shaw's value term needs them (positions.ShawRelative):
                # recompute them once from the same logits. Trap: with dropout this draws its own mask, independent
                # of the kernel's -- the same model in expectation, not the same sample as the naive path.
                att = self.attn_dropout(F.softmax(q @ k.transpose(-2, -1) / math.sqrt(k.size(-1)) + mask, dim=-1))
        if self.shaw is not None and self.shaw.values:
            y = y + self.shaw.value_term(att, pos, k_pos)  # (B, H, T, hs): sum_j alpha_ij a^V_ij (Shaw eq. 3)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> 4C -> C with GELU (tanh approximation, as in GPT-2's released code)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # Trap: nn.GELU() defaults to the exact erf form; GPT-2 used 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))).
        # The difference is ~1e-3 per activation, invisible at init std 0.02 but not against the released weights.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN Transformer block (GPT-2 §2.3): x + attn(ln_1(x)), then x + mlp(ln_2(x)). The residual stream itself is
    never normalised, which is what lets deep stacks train without warm-up tricks that post-LN needed."""

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


class MTPModule(nn.Module):
    """DeepSeek-V3's multi-token prediction module at depth k (§2.2, eq. 21-22; the second "Multi-token prediction"
    slide): h'_i = M_k [RMSNorm(h^(k-1)_i); RMSNorm(Emb(t_(i+k)))], then h^k = TRM_k(h'), one Transformer block.

    h^(k-1) is the previous depth's hidden state (depth 0: the main model's last block, before its final norm) and
    t_(i+k) the true token k places after position i, embedded with the shared embedding. So the prediction of token
    i+k+1 at depth k sees exactly the tokens up to i+k: the causal chain of next-token prediction, one step further per
    depth. No position vector is added to the embedding: h^(k-1) already carries the position.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        C = config.n_embd
        self.hnorm = nn.RMSNorm(C, eps=config.layer_norm_epsilon)  # RMSNorm(h^(k-1)_i)
        self.enorm = nn.RMSNorm(C, eps=config.layer_norm_epsilon)  # RMSNorm(Emb(t_(i+k)))
        self.proj = nn.Linear(2 * C, C, bias=False)  # M_k, a (C, 2C) matrix
        self.block = Block(config, layer_idx)  # TRM_k
        # The shared output head is our tied lm_head; like the main model's, it needs a final norm in front (pre-LN
        # blocks leave the residual stream unnormalised). DeepSeek-V3's released modules have a norm of their own there.
        self.ln_f = nn.LayerNorm(C, eps=config.layer_norm_epsilon, bias=config.bias)

    def forward(self, h_prev, emb, pos, bias=None):
        """h_prev (B, T, C): depth k-1's hidden states; emb (B, T, C): embeddings of the tokens k ahead -> h^k."""
        # Trap: eq. (21) puts h first; the engines that load DeepSeek-V3's released MTP weights (vLLM, SGLang: eh_proj)
        # concatenate the embedding first. The same model up to a permutation of M_k's columns; we follow the paper.
        # Trap: autocast has no rule for RMSNorm (it has one for LayerNorm), so a bf16 h_prev would meet fp32 gains:
        # a slow unfused path and a warning. Normalise in the gains' dtype; the projection is autocast as usual.
        h_prev, emb = h_prev.to(self.hnorm.weight.dtype), emb.to(self.enorm.weight.dtype)
        h = self.proj(torch.cat([self.hnorm(h_prev), self.enorm(emb)], dim=-1))  # (B, T, 2C) -> (B, T, C)
        return self.block(h, pos, bias)


# ----------------------------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))  # token embeddings
        if config.pos == "learned":  # GPT-2: a learned vector per position (slide "Learned encoding"), key wpe.weight
            parts["wpe"] = LearnedAbsolute(config.block_size, config.n_embd)
        elif config.pos == "sinusoidal":  # the fixed sinusoid (slide "Positional encoding"): no parameters
            parts["wpe"] = SinusoidalAbsolute(config.block_size, config.n_embd)
        elif config.pos == "t5":
            # One table for the whole model, as in T5 (its first layer computes the bias and every layer reuses it),
            # so the (H, T, T_k) bias is also computed once per forward instead of once per layer.
            # bidirectional=False: a causal decoder spends no buckets on the masked future (T5's decoder does this).
            parts["pos_bias"] = T5RelativeBias(config.n_head, config.t5_num_buckets, config.t5_max_distance,
                                               bidirectional=False)
        elif config.pos == "alibi":  # fixed slopes, no parameters; the same bias in every layer (ALiBi §3)
            parts["pos_bias"] = ALiBi(config.n_head)
        parts.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),  # GPT-2's extra final LN
        )
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as in GPT-2: the output projection IS the input embedding matrix, so a token's
        # logit is the dot product of the final hidden state with that token's embedding. One tensor, two uses.
        self.lm_head.weight = self.transformer.wte.weight
        if config.mtp_heads:
            # Multi-token prediction: the extra heads, one block each, numbered after the model's own blocks. A plain
            # GPT has no `mtp` at all: its state-dict keys are GPT-2's.
            # parallel (Gloeckle et al. §2): the last block h[L-1] is head 1, the next-token head f_h_1, and these are
            #   f_h_2 .. f_h_n, each reading the trunk f_s = h[0..L-2]; all share f_u = ln_f + lm_head.
            # sequential (DeepSeek-V3 §2.2): the whole model is the main model; module k reads depth k-1's states.
            make = Block if config.mtp == "parallel" else MTPModule
            self.mtp = nn.ModuleList([make(config, config.n_layer + k) for k in range(config.mtp_heads)])
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # OpenAI's model.py: weights ~ N(0, 0.02), wpe ~ N(0, 0.01), biases 0, LayerNorm gain 1. GPT-2 §2.3: the projections
        # that write into the residual stream are scaled by 1/sqrt(N), N = 2 * n_layer of them (one per attn, one per
        # MLP), so the stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):  # also T5's bias table and Shaw's w^K, w^V: N(0, 0.02)
            is_wpe = module is getattr(self.transformer, "wpe", None)
            nn.init.normal_(module.weight, mean=0.0, std=0.01 if is_wpe else 0.02)

    def num_params(self, non_embedding=False):
        """Parameter count; tied weights count once. non_embedding drops wpe (and wte, whose matmul cost is in lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            wpe = getattr(self.transformer, "wpe", None)
            n -= self.transformer.wte.weight.numel() + (sum(p.numel() for p in wpe.parameters()) if wpe is not None else 0)
        return n

    def no_weight_decay(self):
        """Parameters AdamW must not decay besides biases and LayerNorm gains (which train.py skips by shape): the
        position tables. Decay pulls a learned position vector toward 0, i.e. toward "no position"."""
        tables = (LearnedAbsolute, T5RelativeBias, ShawRelative)
        return {f"{m_name}.{p_name}" for m_name, m in self.named_modules() if isinstance(m, tables)
                for p_name, _ in m.named_parameters()}

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6 per weight (Kaplan et al. 2020, eq. 2.1, with the lm_head
        matmul counted and wpe's lookup not) plus the attention scores and mixing, 12 * L * T * C (PaLM, App. B).
        Multi-token prediction adds its D blocks (in num_params, one more attention each) and D more lm_head matmuls."""
        c = self.config
        heads, blocks = 1 + c.mtp_heads, c.n_layer + c.mtp_heads
        return 6 * self.num_params(non_embedding=True) + 6 * heads * c.padded_vocab_size * c.n_embd + \
            12 * blocks * c.block_size * c.n_embd

    def forward(self, idx, targets=None, cache=None, future=None, prefix_len=None):
        """idx (B, T) token ids -> logits (B, T, V); with targets (B, T) also the mean cross-entropy (-100 = ignore).
        prefix_len (B,) makes the model a prefix LM (T5 §3.2.1, the "Prefix LM" rows of its Table 2): the first
        prefix_len[b] positions of row b see each other both ways, the rest stay causal (prefix_lm_mask). None: GPT.

        Multi-token prediction (mtp_heads = D > 0): with future (B, D, T), future[:, k-1, t] the token k places after
        position t (-100 past the end of the text), every head runs and logits are (B, 1 + D, T, V): [:, i] predicts
        the token i + 1 places ahead, [:, 0] is the next-token head. The sequential modules read `future` (depth k
        embeds the token k ahead: teacher forcing); the parallel heads never do. targets are then (B, 1 + D, T) and the
        loss is L_1 + mtp_weight * (L_2 + ... + L_n), each a mean. Without `future` only the next-token head runs: that
        is inference, with or without a KV cache, exactly as in a plain GPT.
        """
        if future is not None and prefix_len is not None:
            raise ValueError("multi-token heads with a prefix-LM mask: not supported (the heads are causal)")
        z, x, pos, bias = self.hidden_states(idx, cache, prefix_len)
        logits = self.unembed(x)  # (B, T, V)
        if future is not None:
            if not self.config.mtp_heads:
                raise ValueError("future tokens are for multi-token prediction; this model has mtp_heads=0")
            if cache is not None:
                raise ValueError("the multi-token heads are for training and drafting; they run without a KV cache")
            logits = torch.stack([logits, *self.mtp_logits(z, x, future, pos, bias)], dim=1)  # (B, 1 + D, T, V)
        loss = None
        if targets is not None:
            ce = lambda lg, tg: F.cross_entropy(lg.float().flatten(0, 1), tg.flatten(), ignore_index=-100)
            loss = ce(logits, targets) if future is None else \
                ce(logits[:, 0], targets[:, 0]) + self.config.mtp_weight * sum(
                    ce(logits[:, i], targets[:, i]) for i in range(1, logits.size(1)))
        return logits, loss

    def hidden_states(self, idx, cache=None, prefix_len=None):
        """The residual stream of idx (B, T), for the heads to read: (z, x, pos, bias).
        x (B, T, C) leaves the last block (before ln_f); z (B, T, C) enters it, i.e. the output of the shared trunk f_s
        of parallel multi-token prediction (whose next-token head f_h_1 is that last block). pos (T,) and bias
        (T5/ALiBi's (H, T, T_k) or None) are what the heads' own attention needs."""
        B, T = idx.size()
        past = cache.length if cache is not None else 0
        # Only the learned table has a last row. Every other scheme is a formula of the position (or of the distance),
        # so without a cache the model runs on any length -- which is how positions.py's extrapolation experiment
        # evaluates at 2x..8x the training length. The KV cache is preallocated for block_size positions.
        if past + T > self.config.block_size and (self.config.pos == "learned" or cache is not None):
            why = (f"the learned position table has no row for position {self.config.block_size}: learned absolute "
                   f"positions cannot extrapolate" if self.config.pos == "learned" else "the KV cache has no room")
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size={self.config.block_size} ({why})")
        pos = torch.arange(past, past + T, device=idx.device)  # (T,) absolute positions, continuing after the cache
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)  # GPT-2: add a learned (T, C) vector per position
        elif self.config.pos == "sinusoidal":
            # Trap: the sinusoid has rms 1/sqrt(2) per coordinate, 35x a token embedding at GPT-2's init (0.02), so
            # added as is, the tokens become a 3% ripple on the position signal and training stalls near the unigram
            # loss (measured, char Shakespeare, same settings: train loss 3.45 after 100 steps where learned has 2.60).
            # Vaswani et al. §3.4 balance the two by scaling the embeddings by sqrt(C) (with a 1/sqrt(C) init we do
            # not have); we scale the sinusoid instead, to the rms of GPT-2's learned table at init (0.01), so
            # "learned vs sinusoidal" differ in learnability only.
            x = x + SINUSOID_SCALE * self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        bias = None
        if "pos_bias" in self.transformer:  # T5 / ALiBi: one (H, T, T_k) bias, computed once and shared by all layers
            bias = self.transformer.pos_bias(pos, torch.arange(past + T, device=idx.device))
        z = x  # ends as the input of the last block (the embeddings if there is no block)
        for block in self.transformer.h:
            z, x = x, block(x, pos, bias, cache, prefix_len)
        if cache is not None:
            cache.length += T
        return z, x, pos, bias

    def unembed(self, x, norm=None):
        """f_u: a final norm (ln_f unless given), then the output projection tied to wte: (B, T, C) -> (B, T, V)."""
        logits = self.lm_head((norm or self.transformer.ln_f)(x))  # (B, T, V_padded)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # padding rows are never predicted, trained on or sampled
        return logits

    def mtp_logits(self, z, x, future, pos, bias):
        """The D extra heads' logits: a list of (B, T, V), [k-1] for the token k + 1 places ahead (slides "Multi-token
        prediction"). z, x, pos, bias from hidden_states; future (B, D, T) as in forward."""
        if self.config.mtp == "parallel":
            # Gloeckle et al. §2: P(x_t+i | x_t:1) = softmax(f_u(f_h_i(f_s(x_t:1)))). Each head is its own Transformer
            # layer on the trunk's states z, so at position t it sees x_1..x_t only, like the next-token head.
            return [self.unembed(head(z, pos, bias)) for head in self.mtp]
        out, h = [], x  # h^0: the main model's last hidden state, before ln_f (DeepSeek-V3 eq. 21)
        for k, module in enumerate(self.mtp, start=1):
            # Depth k at position t embeds the true token t + k (DeepSeek-V3 eq. 21) and predicts token t + k + 1.
            # Trap: past the end of the text there is no token t + k (-100). Embed id 0 there instead: the targets of
            # those positions are past the end too (-100, never scored), and causal attention keeps whatever it embeds
            # from reaching any earlier position, at this depth or a deeper one.
            emb = self.transformer.wte(future[:, k - 1].clamp(min=0))  # (B, T, C)
            h = module(h, emb, pos, bias)  # h^k (B, T, C)
            out.append(self.unembed(h, module.ln_f))
        return out

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, generator=None,
                 speculative=False, stats=None):
        """Append max_new_tokens sampled tokens to idx (B, T) and return (B, T + max_new_tokens).

        temperature 0 is greedy decoding; top_k keeps the k most likely tokens; top_p keeps the smallest set whose
        probability reaches p (nucleus sampling, Holtzman et al. 2020). With use_cache the prompt is encoded once and each
        new token costs one position of attention against cached keys/values, instead of re-running the whole window.
        Trap: once the text outgrows block_size the window slides and every token's position in it shifts, so the
        cached keys are stale (also for relative schemes: the hidden states of the kept tokens were computed while they
        could still see the tokens that fell out). From then on each step re-encodes the last block_size tokens,
        exactly as without cache.
        speculative (greedy only, a model with mtp_heads > 0): self-speculative decoding, see speculative_greedy; the
        same tokens as greedy decoding. stats: a dict it fills with its counts (passes, drafted, accepted, ...).
        """
        if speculative:
            if temperature != 0:
                raise ValueError("speculative decoding here verifies greedy choices: it needs temperature=0")
            return self.speculative_greedy(idx, max_new_tokens, stats)
        was_training = self.training
        self.eval()
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= self.config.block_size:
                if cache is None:  # prefill: the whole prompt at once
                    c = self.config
                    cache = KVCache(c.n_layer, (idx.size(0), c.n_head, c.block_size, c.n_embd // c.n_head),
                                    idx.device, self.lm_head.weight.dtype)
                    logits, _ = self(idx, cache=cache)
                else:  # decode: only the newest token
                    logits, _ = self(idx[:, -1:], cache=cache)
            else:
                logits, _ = self(idx[:, -self.config.block_size:])
            next_id = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        self.train(was_training)
        return idx

    @torch.no_grad()
    def speculative_greedy(self, idx, max_new_tokens, stats=None):
        """Greedy decoding that drafts with the multi-token heads and verifies with the next-token head: exactly the
        tokens of generate(temperature=0), in fewer passes of the model wherever the drafts are right (Gloeckle et al.
        §3.2, self-speculative decoding; the verification is Stern et al. 2018's blockwise parallel decoding).

        Each pass feeds the text plus a block [g, d_2, ..., d_n]: g is greedy's next token (known from the last pass),
        d_i the head-i draft of the token i places ahead. The pass gives greedy's choice after every block token: draft
        d_i stands if greedy chose it after the block tokens before it and every earlier draft stood (the longest
        agreeing prefix is kept). The same pass gives greedy's token after the last kept one (the next g, for free) and
        the hidden states the heads draft the next block from. So a pass adds 1 + (drafts kept) tokens; plain greedy
        decoding adds 1. Rows of a batch move together: a step keeps the fewest drafts any row agrees on (still exact).

        Every pass recomputes the window (no KV cache: a cache would have to roll back rejected drafts, and the
        sequential modules' states lag k positions behind the text). Once text + block outgrow block_size it steps as
        plain greedy decoding does: one token per pass, on the last block_size tokens.
        stats (optional dict) accumulates passes, drafted, accepted, and drafted_at / accepted_at: per draft position
        (d_2 .. d_n), how often it was checked (every earlier draft stood) and how often it stood.
        """
        D, T_max = self.config.mtp_heads, self.config.block_size
        if not D:
            raise ValueError("speculative decoding drafts with the multi-token heads; this model has mtp_heads=0")
        was_training = self.training
        self.eval()
        st = stats if stats is not None else {}
        for key, zero in (("passes", 0), ("drafted", 0), ("accepted", 0), ("drafted_at", [0] * D),
                          ("accepted_at", [0] * D)):
            st.setdefault(key, zero)
        end = idx.size(1) + max_new_tokens
        block = None  # (B, 1 + D): greedy's next token g, then the drafts of the D tokens after it
        while idx.size(1) < end:
            if idx.size(1) + 1 + D > T_max:  # no room for a block: plain greedy steps from here (sliding window)
                logits, _ = self(idx[:, -T_max:])
                idx = torch.cat([idx, logits[:, -1:].argmax(dim=-1)], dim=1)
                st["passes"] += 1
                continue
            n = idx.size(1)
            text = idx if block is None else torch.cat([idx, block], dim=1)  # (B, n) at the start, else (B, n + 1 + D)
            z, x, pos, bias = self.hidden_states(text)
            greedy = self.unembed(x).argmax(dim=-1)  # (B, len(text)): greedy's choice of the token after each position
            st["passes"] += 1
            if block is not None:
                # block[:, j] (j >= 1) was drafted for the position after block[:, j-1]; greedy chose greedy[:, n+j-1]
                stood = (block[:, 1:] == greedy[:, n:n + D]).long().cumprod(dim=1)  # (B, D): 1 up to the first miss
                kept = int(stood.sum(dim=1).min())
                idx = torch.cat([idx, block[:, :1 + kept]], dim=1)  # g always stands: it was greedy's own choice
                st["drafted"] += D
                st["accepted"] += kept
                for j in range(min(kept + 1, D)):
                    st["drafted_at"][j] += 1
                    st["accepted_at"][j] += int(j < kept)
            p = idx.size(1)  # tokens kept so far; greedy's choice after the last of them comes free with this pass
            g = greedy[:, p - 1:p]  # (B, 1)
            block = torch.cat([g, self.draft(z[:, :p], x[:, :p], torch.cat([idx, g], dim=1), pos[:p], bias)], dim=1)
        self.train(was_training)
        return idx[:, :end]

    def draft(self, z, x, text, pos, bias):
        """The extra heads' greedy guesses for the D tokens after text's last token, from the last of P positions:
        (B, D). z, x (B, P, C): hidden_states of text[:, :P]; text (B, P + 1) ends with greedy's next token g; pos,
        bias: hidden_states' for at least P positions."""
        P = z.size(1)
        if bias is not None:
            bias = bias[..., :P, :P]  # T5/ALiBi: the (H, P, P) corner for these positions
        if self.config.mtp == "parallel":
            # head i at the last position drafts the token i places ahead; it attends to all P positions, so runs on all
            return torch.cat([self.unembed(head(z, pos, bias)[:, -1:]).argmax(dim=-1) for head in self.mtp], dim=1)
        h = x
        for k, module in enumerate(self.mtp, start=1):
            # depth k embeds the token k places after each position: the text, then g, then the drafts made so far
            h = module(h, self.transformer.wte(text[:, k:k + P]), pos, bias)  # (B, P, C)
            text = torch.cat([text, self.unembed(h[:, -1:], module.ln_f).argmax(dim=-1)], dim=1)
        return text[:, P + 1:]

    # ------------------------------------------------------------------------------------------------------------------
    # Hugging Face format: load OpenAI's GPT-2 (or any GPT2LMHeadModel directory) and write ours back out.
    # HF keeps OpenAI's TensorFlow layout: c_attn/c_proj/c_fc are "Conv1D" with weight (in, out), the transpose of
    # nn.Linear's (out, in). Getting this wrong still loads (square c_proj) and silently gives garbage.

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a GPT2LMHeadModel checkpoint directory (config.json + model.safetensors or pytorch_model.bin), or a hub
        name such as "gpt2" when huggingface_hub is installed and online. overrides: e.g. attn="naive", dropout=0.1."""
        if overrides.get("pos", "learned") != "learned":
            raise ValueError(f"from_pretrained: GPT-2 checkpoints have learned absolute positions (wpe); "
                             f"pos={overrides['pos']!r} would leave them unused")
        hf, sd = read_hf_dir(path)
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{path}: activation {hf['activation_function']!r} is not GPT-2's tanh GELU")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                           dropout=0.0, bias=True, **overrides)
        model = cls(config)
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        with torch.no_grad():
            for name, param in model.state_dict().items():
                if name == "lm_head.weight":
                    continue  # tied to wte
                if name.startswith("mtp."):
                    continue  # multi-token heads asked for with mtp_heads=...: GPT-2 has none; they keep their init
                key = name.removeprefix("transformer.")
                if key not in sd:
                    raise KeyError(f"{path}: missing weight {key!r}")
                w = sd[key]
                if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                    w = w.t()  # Conv1D (in, out) -> Linear (out, in)
                if name == "transformer.wte.weight":
                    param[: w.size(0)].copy_(w)  # padded rows (if any) keep their init; they are never used
                    continue
                if w.shape != param.shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(w.shape)}, expected {tuple(param.shape)}")
                param.copy_(w)
        return model

    def export_hf(self, path):
        """Write a directory that transformers' GPT2LMHeadModel.from_pretrained(path) loads (config.json +
        model.safetensors). The inverse of from_pretrained. Multi-token heads are left out: inference uses the
        next-token model alone (both papers discard the extra heads there), and GPT-2's format has no place for them."""
        c = self.config
        if c.pos != "learned":
            raise ValueError(f"export_hf: the HF GPT-2 format has learned absolute positions (wpe) only; this model "
                             f"uses pos={c.pos!r}")
        if not c.bias:
            raise ValueError("the HF GPT-2 format has biases everywhere; this model was built with bias=False")
        hf_config = dict(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size, n_positions=c.block_size,
            n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_inner=None,
            activation_function="gelu_new", resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            layer_norm_epsilon=c.layer_norm_epsilon, initializer_range=0.02, scale_attn_weights=True,
            tie_word_embeddings=True, bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1,
        )
        sd = {}
        for name, w in self.state_dict().items():
            if name == "lm_head.weight" or name.startswith("mtp."):
                continue  # tied: HF re-ties it from wte; the multi-token heads (see above)
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                w = w.t()
            if name == "transformer.wte.weight":
                w = w[: c.vocab_size]
            sd[name] = w.float()
        write_hf_dir(path, hf_config, sd)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, V): (B, 1) ids.

    Order matters and follows common practice: temperature first, then top-k, then top-p on what is left.
    sample_next(torch.tensor([[0., 5., 1.]]), temperature=0) -> tensor([[1]])
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token if the tokens ranked above it already reach top_p; the most likely token always survives
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ----------------------------------------------------------------------------------------------------------------------
# The objective: next-token prediction (GPT-1 eq. 1, L = sum_t log P(u_t | u_<t)). train.py calls these methods; every
# model file provides the same ones for its own objective (train.py's docstring lists them).

SPECIAL_TOKENS = ()  # GPT needs no token beyond <|endoftext|>, which train.py puts between documents for every model


class NextTokenObjective:
    """Turns a token stream into (idx, targets) windows shifted by one, and scores the model on them.

    Windows may cross document boundaries: documents are joined with an end-of-text token, so the model learns where a
    work ends instead of being told. Reports bits per byte, which does not depend on the tokenizer. A target of -100 is
    ignored (not scored, not counted), as in F.cross_entropy.

    Multi-token prediction (mtp_heads = D > 0; slide "Multi-token prediction"): each row draws D more tokens, targets
    become (B, n, T) with n = 1 + D (row i - 1: the token i places ahead, -100 past the end of the text), and the loss
    is L_1 + mtp_weight * (L_2 + ... + L_n), each L_i the mean over head i's real targets. With mtp_weight = 1 that is
    Gloeckle et al.'s L_n (§2), the plain sum over the n heads; DeepSeek-V3 weights its MTP losses by lambda / D
    (eq. 25). The metrics keep "loss" and "bpb" for the next token alone, so every run compares with a plain GPT, and
    add head2_loss .. headn_loss.
    """

    def __init__(self, config, tokenizer):
        self.block_size = config.block_size
        self.n_ahead = 1 + config.mtp_heads  # n: tokens predicted at every position, the next one included
        self.mtp_weight = config.mtp_weight
        self.token_bytes = tokenizer.token_bytes  # (V,) UTF-8 length of each token, for bits per byte
        # T inputs; head n's last target is T + n tokens in. Plain GPT: T + 1 (inputs and targets share all but one)
        self.raw_tokens_per_row = config.block_size + self.n_ahead
        self.tokens_per_row = config.block_size

    def train_batch(self, split, batch_size, generator):
        """batch_size random windows from split.tokens (a 1-D numpy array), positions drawn from `generator`."""
        starts = torch.randint(len(split.tokens) - self.raw_tokens_per_row + 1, (batch_size,), generator=generator)
        return self._windows(split.tokens, starts.tolist(), self.block_size, self.n_ahead)

    def eval_batches(self, split, batch_size):
        """Every target of the split exactly once, in order: consecutive non-overlapping windows (deterministic).
        (Every next-token target; head i scores the token i places after each of those positions that has one.)"""
        T, n = self.block_size, len(split.tokens) - 1  # n targets: tokens[1:]
        starts = list(range(0, n - T + 1, T))
        for i in range(0, len(starts), batch_size):
            yield self._windows(split.tokens, starts[i:i + batch_size], T, self.n_ahead)
        tail = n - len(starts) * T  # the last partial window, so no target is skipped
        if tail > 0:
            yield self._windows(split.tokens, [len(starts) * T], tail, self.n_ahead)

    @staticmethod
    def _windows(tokens, starts, T, n_ahead=1):
        """Rows of T inputs and their targets: the token after each input, or with n_ahead = n > 1, (B, n, T): row
        i - 1 holds the token i places after each input, -100 where the text has ended.
        _windows(np.array([5, 6, 7, 8]), [0], 2) -> idx [[5, 6]], targets [[6, 7]]
        _windows(np.array([5, 6, 7, 8]), [1], 2, n_ahead=2) -> idx [[6, 7]], targets [[[7, 8], [8, -100]]]"""
        rows = np.full((len(starts), T + n_ahead), -100, dtype=np.int64)  # (B, T + n)
        for r, s in enumerate(starts):
            piece = tokens[s:s + T + n_ahead]
            rows[r, :len(piece)] = piece
        rows = torch.from_numpy(rows)
        if n_ahead == 1:
            return {"idx": rows[:, :-1], "targets": rows[:, 1:]}
        return {"idx": rows[:, :T], "targets": torch.stack([rows[:, i:i + T] for i in range(1, n_ahead + 1)], dim=1)}

    @staticmethod
    def count_tokens(batch):
        return batch["idx"].numel()

    @staticmethod
    def _terms(targets):
        """(targets as (B, n, T), the name of each head's loss term): "nll" for the next token, as in a plain GPT."""
        heads = targets if targets.dim() == 3 else targets[:, None]
        return heads, ["nll"] + [f"nll_head{i}" for i in range(2, heads.size(1) + 1)]

    @classmethod
    def denominators(cls, batch):
        """What each loss term is averaged over: the real targets (not -100) of the whole batch, per head."""
        heads, names = cls._terms(batch["targets"])
        return {name: int((heads[:, i] != -100).sum()) for i, name in enumerate(names)}

    def loss(self, model, batch, denominators=None):
        """(the loss: each head's sum of target log-losses / its denominator, weighted; dict of sums to aggregate over
        an evaluation). Without denominators, the means over this batch's real targets."""
        denominators = denominators or self.denominators(batch)
        heads, names = self._terms(batch["targets"])
        if len(names) == 1:
            logits, _ = model(batch["idx"])
            logits = logits[:, None]  # (B, 1, T, V)
        else:
            # One call of the model's forward runs every head (DistributedDataParallel syncs gradients through the
            # wrapped module's forward only). The sequential modules read heads 1..D's targets: the true tokens ahead.
            logits, _ = model(batch["idx"], future=heads[:, :-1])  # (B, n, T, V)
        total, stats = 0.0, {}
        for i, name in enumerate(names):
            targets = heads[:, i]  # (B, T)
            nll = F.cross_entropy(logits[:, i].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                  reduction="sum")
            total = total + (1.0 if i == 0 else self.mtp_weight) * nll / max(1, denominators[name])
            stats[name] = nll.detach()
            if i:
                stats[f"tokens_head{i + 1}"] = (targets != -100).sum()
        targets = heads[:, 0]
        real = targets != -100
        stats.update(tokens=real.sum(), bytes=self.token_bytes.to(targets.device)[targets[real]].sum())  # not with -100
        return total, stats

    @staticmethod
    def summarize(sums):
        """Named metrics from summed stats: next-token loss in nats/token and bits per byte; with multi-token prediction
        also head i's loss (nats/token) on the token i places ahead."""
        metrics = {"loss": float(sums["nll"]) / float(sums["tokens"]),
                   "bpb": float(sums["nll"]) / (math.log(2) * float(sums["bytes"]))}
        for i in sorted(int(k.removeprefix("nll_head")) for k in sums if k.startswith("nll_head")):
            metrics[f"head{i}_loss"] = float(sums[f"nll_head{i}"]) / float(sums[f"tokens_head{i}"])
        return metrics


Model, Config, Objective = GPT, GPTConfig, NextTokenObjective  # what train.py's registry looks up


# ----------------------------------------------------------------------------------------------------------------------
# Demo: what a run shows when it ends (train.py calls demo()), and sampling from a checkpoint or a released model.


@dataclass
class DemoConfig:
    prompt: str = "\n"  # text the end-of-run sample continues
    sample_tokens: int = 500  # tokens sampled at the end of a run (0 = no sample)
    temperature: float = 0.8  # sampling temperature (0 = greedy)
    top_k: int = 0  # sample from the k most likely tokens only (0 = all)


def demo(model, tokenizer, cfg, device, seed=1337):
    """Print a sample that continues cfg.prompt: what the model has learned, in its own words."""
    if cfg.sample_tokens <= 0:
        return
    prompt = tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(torch.tensor([prompt], device=device), cfg.sample_tokens, temperature=cfg.temperature,
                         top_k=cfg.top_k or None, generator=g)
    print("-" * 80 + "\n" + tokenizer.decode(out[0].tolist()) + "\n" + "-" * 80)


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from a GPT: a checkpoint written by train.py (--ckpt) or a Hugging "
                                            "Face GPT-2 directory such as OpenAI's released weights (--hf).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="path to ckpt.pt (e.g. out/gpt/ckpt.pt)")
    src.add_argument("--hf", help="a GPT2LMHeadModel directory (config.json + model.safetensors or pytorch_model.bin); "
                                  "text goes through GPT-2's tokenizer")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--speculative", action="store_true", help="greedy decoding that drafts with the multi-token "
                   "heads (a checkpoint trained with --mtp-heads): the same text, fewer passes")
    argv = sys.argv[1:] if argv is None else argv
    import data  # the tokenizers
    import train  # the checkpoint format, shared by every model

    args = p.parse_args(argv)
    try:
        if args.ckpt:
            model, tokenizer, _ = train.load_for_inference(args.ckpt, device=args.device, flag="--ckpt")
        else:
            try:
                model = GPT.from_pretrained(args.hf).to(args.device).eval()
            except (OSError, KeyError, ValueError) as e:
                raise train.UsageError(f"--hf {args.hf}: {e}") from None
            tokenizer = data.gpt2_tokenizer()
        ids = tokenizer.encode(args.prompt)
    except train.UsageError as e:
        print(f"gpt.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    idx = torch.tensor([ids or [tokenizer.eot_id]], dtype=torch.long, device=args.device)
    if args.speculative and not getattr(model.config, "mtp_heads", 0):
        print("gpt.py: error: --speculative drafts with multi-token heads; this model has none (train with "
              "--mtp-heads N)", file=sys.stderr)
        sys.exit(2)
    stats = {}
    out = model.generate(idx, args.max_new_tokens, temperature=0 if args.speculative else args.temperature,
                         top_k=args.top_k, top_p=args.top_p, generator=g, speculative=args.speculative, stats=stats)
    print(tokenizer.decode(out[0].tolist()))
    if args.speculative:
        print(f"speculative greedy: {stats['accepted']}/{stats['drafted']} drafts kept, {args.max_new_tokens} tokens "
              f"in {stats['passes']} passes", file=sys.stderr)


if __name__ == "__main__":
    main()
