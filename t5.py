"""
T5: an encoder-decoder Transformer pretrained by span corruption, and the denoising objectives the
lecture compares.

Papers
  - Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer" (T5).
    §2.1 the model: Vaswani et al.'s encoder-decoder. A simplified layer norm (a rescale only:
    RMSNorm) at every sub-block's input and after each stack. No biases. No 1/sqrt(d) in attention
    (folded into the init). A relative position bias (a learned scalar per head and log-spaced
    distance bucket), computed by each stack's first layer, reused by all its layers. Dropout 0.1.
    §3.1 the baseline: 15% of tokens corrupted i.i.d., each run of them one sentinel (§3.1.4),
    2^19 steps of 128 rows x 512 tokens, inverse sqrt lr. The released models: span corruption.
    §3.2 architectures (Table 2: encoder-decoder, "Enc-dec, shared", 6 layers, LM, prefix LM).
    §3.3 objectives: Table 3 (each one's inputs and targets), Table 4 (prefix LM, BERT-style,
    deshuffling), Table 5 (BERT-style, MASS-style, replace corrupted spans, drop corrupted
    tokens), Table 6 (corruption rate), Table 7 (span length). Tables 4-6 pick the corrupted
    tokens i.i.d.; Table 7 and T5's final objective pick spans. T5's released preprocessors
    (t5/data/preprocessors.py): iid_noise_mask, random_spans_helper, random_spans_noise_mask,
    noise_span_to_unique_sentinel, ... We keep their names.
  - T5 v1.1 (the released "t5-v1_1-*" checkpoints): a gated-GELU feed-forward layer (Shazeer 2020,
    "GLU Variants Improve Transformer", FFN_GEGLU). Output layer not tied to the embedding. No
    dropout in pretraining.
  - Lewis et al. 2020, "BART" §2.2: text infilling (span lengths ~ Poisson(3), each span -> ONE
    mask token, empty spans included) and sentence permutation. Song et al. 2019 ("MASS") and
    Devlin et al. 2019 ("BERT") name two of T5's rows.
  - Nawrot 2023, "nanoT5": T5 v1.1 pretrained on one GPU; the recipe of the v1.1 presets.
  Slides (lecture 001): "Encoder-Decoder pretraining"; "T5: Text to Text Transfer Transformer"
  (the separate / shared parameter figure, "Span corruption works best" with its <X> <Y> example,
  the corruption-type, corruption-rate and architecture tables); "BART: Denoising seq2seq training".

Run
  python train.py --model t5                 # a small T5 on Shakespeare's characters (CPU)
  python train.py --model t5 --objective bert-style --out-dir out/t5-bert   # another table row
  python t5.py --ckpt out/t5/ckpt.pt "Thank you <X> me to your party <Y> week."   # fill the spans
  python t5.py --hf path/to/t5-small "Thank you <X> me to your party <Y> week."   # a released T5
  (The prompt is the slide's example. --hf needs sentencepiece.)

Legend
  B batch, S encoder length (the corrupted inputs), T decoder length (the targets), C d_model,
  H num_heads, dk d_kv (head size; T5 keeps 64 at every size, so H * dk need not equal C), F d_ff,
  V vocabulary, R raw corpus tokens one row consumes, N noise (corrupted) tokens of a row.
"""

import argparse
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
from common import UsageError, command, require
from hf_io import copy_weights, read_hf_dir, write_hf_dir
from positions import T5RelativeBias, causal_mask

# ----------------------------------------------------------------------------------------------------------------------
# Special tokens. T5's sentinels are its vocabulary's top ids, counting DOWN: <extra_id_k> =
# vocab_size - 1 - k (noise_span_to_unique_sentinel). data.py puts SPECIAL_TOKENS above the
# ordinary ids in order, <extra_id_0> last. 100, as T5: a row needs one per corrupted span; the
# slide's harshest setting needs 64 (50% corruption of single tokens in 128 inputs). They cost a
# few percent of the CPU preset's compute. A released T5 has its own (ids 32000..32099, above its
# SentencePiece vocabulary).

N_SENTINELS = 100


def sentinel(k):
    """sentinel(0) -> "<extra_id_0>": the k-th sentinel's text, as T5's vocabulary spells it."""
    return f"<extra_id_{k}>"


SPECIAL_TOKENS = ("<pad>", "</s>") + tuple(sentinel(k) for k in reversed(range(N_SENTINELS)))
# train.py fills these ids
TOKEN_IDS = {"pad_token_id": "<pad>", "eos_token_id": "</s>", "decoder_start_token_id": "<pad>"}
DTYPES = ("bf16", "fp32")  # no fp16: T5's activations overflow it (presets); train.py refuses it

# The objectives (--objective). Each builds (encoder inputs, decoder targets) from R raw tokens.
# Examples: T5's Table 3 on "Thank you for inviting me to your party last week ." (<M>: mask).
# The noise (--noise-mask; auto = what T5's configs used for the row): i.i.d. (iid_noise_mask:
# each token on its own) in §3.3.1-3.3.3 (Tables 4-6) and T5's baseline; random spans of mean
# length 3 (random_spans_noise_mask) in §3.3.4's span corruption (Table 7), T5's final choice.
OBJECTIVES = {
    # Each noise span -> one unique sentinel; the targets: the spans, each after its sentinel.
    # auto: span corruption (§3.3.4, Table 3 "Random spans", Table 7; span.gin):
    #   "Thank you <X> to <Y> week ." -> "<X> for inviting me <Y> your party last <Z>"
    # --noise-mask iid: Table 5's starred "Replace corrupted spans" row (T5's baseline, §3.1.4;
    # iid_15_u_u.gin; Table 7's "Baseline (i.i.d.)"), each run of noise tokens one span; Table 6's rates:
    #   "Thank you <X> me to your party <Y> week ." -> "<X> for inviting <Y> last <Z>"
    "replace-spans": "random_spans_noise_mask, noise_span_to_unique_sentinel / nonnoise_span_to_unique_sentinel",
    # T5 §3.3.2 (Table 5, "Drop corrupted tokens"; iid_15_d_d.gin): i.i.d. noise; the corrupted
    # tokens leave the inputs and are the targets. "Thank you me to your party week ." -> "for inviting last"
    "drop-tokens": "iid_noise_mask, drop_noise_tokens / drop_nonnoise_tokens",
    # T5 §3.3.1 (Tables 4 and 5, "BERT-style"; iid_15_r10s90_f.gin): i.i.d. noise, 90% of it ->
    # <M>, 10% -> a random token. "Thank you <M> <M> me to your party apple week ." -> the original
    "bert-style": "iid_noise_mask, noise_token_to_random_token_or_sentinel / the original",
    # T5 §3.3.2 (Table 5, "MASS-style"; iid_15_m_f.gin): BERT-style without the random tokens.
    # "Thank you <M> <M> me to your party <M> week ."
    "mass-style": "iid_noise_mask, noise_token_to_sentinel / the original",
    # T5 §3.2.3 / §3.3.1, "prefix language modeling" (Table 2's "LM" rows, Table 4's first row):
    # the encoder reads a random-length prefix, the decoder continues it; the targets average
    # --noise-density of the row (T5's prefix_lm.gin: 0.5, any split point).
    # "Thank you for inviting" -> "me to your party last week ."
    "prefix-lm": "random_prefix_noise_mask: encoder = prefix, decoder = the rest",
    # BART §2.2: spans with Poisson(mean_noise_span_length) lengths, each -> ONE <M> (a length-0
    # span inserts one). Targets: the original. BART masks 30% (--noise-density 0.3), lambda 3.
    "text-infilling": "Poisson span lengths, one mask per span / the original",
    # BART §2.2: the sentences (here: lines, as data.py records them) shuffled -> the original.
    "sentence-permutation": "lines shuffled / the original",
}
FEED_FORWARD = ("relu", "gated-gelu")
NOISE_MASKS = ("auto", "iid", "spans")
MASKED = ("replace-spans", "drop-tokens", "bert-style", "mass-style")  # the objectives --noise-mask applies to

# ----------------------------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class T5Config:
    vocab_size: int = 32128  # V, from the tokenizer (T5: 32,000 pieces + 100 sentinels, padded)
    d_model: int = 512  # C: residual stream and embedding width (defaults: t5-small's)
    d_kv: int = 64  # dk: size of one attention head; T5 keeps 64 at every size
    d_ff: int = 2048  # F: hidden width of the feed-forward layer
    num_layers: int = 6  # blocks in the encoder
    num_decoder_layers: int = 0  # blocks in the decoder (0 = as many as the encoder)
    num_heads: int = 8  # H: attention heads per layer
    relative_attention_num_buckets: int = 32  # T5's buckets (half per direction in the encoder) ...
    relative_attention_max_distance: int = 128  # ... the last bucket shared by every offset >= 128
    dropout_rate: float = 0.1  # T5 v1.0 pretrained with 0.1; v1.1 (and short CPU runs) with 0
    layer_norm_epsilon: float = 1e-6  # T5's RMSNorm epsilon
    feed_forward_proj: str = "relu"  # relu (v1.0) | gated-gelu (v1.1: tanh-gelu(x W_0) * x W_1)
    # v1.0: the output layer IS the embedding, after a d_model**-0.5 rescale. v1.1: no.
    tie_word_embeddings: bool = True
    initializer_factor: float = 1.0  # scales every init std (T5's; parity tests draw large weights)
    share_encoder_decoder: bool = False  # Table 2 "Enc-dec, shared": decoder reuses encoder layers
    attn: str = "sdpa"  # naive: softmax(QK^T + bias)V in full | sdpa: fused kernel; tested equal
    objective: str = field(default="replace-spans", metadata={"help": " | ".join(OBJECTIVES)})
    noise_density: float = 0.15  # corruption rate, share of tokens corrupted (T5: 0.15; BART: 0.3)
    mean_noise_span_length: float = 3.0  # T5: 3; 1 = single tokens; BART's Poisson lambda
    # The noise of replace-spans, drop-tokens, bert- and mass-style (T5's configs: i.i.d. for the last three)
    noise_mask: str = "auto"  # auto: T5's for the objective | iid: each token on its own | spans: random spans
    inputs_length: int = 512  # S, a row's encoder tokens; R follows (replace-spans: 512 -> 568)
    pad_token_id: int = 0  # set by train.py from the tokenizer; 0 is a released T5's <pad>
    eos_token_id: int = 1  # </s>, appended to inputs and targets; 1 in a released T5
    decoder_start_token_id: int = 0  # the decoder's first input; T5 uses <pad>

    def __post_init__(self):
        require(self.feed_forward_proj in FEED_FORWARD,
                f"--feed-forward-proj {self.feed_forward_proj!r}: must be one of {', '.join(FEED_FORWARD)}")
        require(self.attn in ("naive", "sdpa"), f"--attn {self.attn!r}: must be naive or sdpa")
        require(self.objective in OBJECTIVES,
                f"--objective {self.objective!r}: must be one of {', '.join(OBJECTIVES)}")
        require(0 <= self.dropout_rate < 1, f"--dropout-rate {self.dropout_rate}: must be in [0, 1)")
        require(self.num_layers >= 1, f"--num-layers {self.num_layers}: must be at least 1")
        require(self.num_decoder_layers >= 0, f"--num-decoder-layers {self.num_decoder_layers}: "
                f"must be >= 0 (0 = as many as the encoder)")
        require(self.num_heads >= 1, f"--num-heads {self.num_heads}: must be at least 1")
        require(0 < self.noise_density < 1, f"--noise-density {self.noise_density}: must lie in (0, 1)")
        require(self.noise_mask in NOISE_MASKS,
                f"--noise-mask {self.noise_mask!r}: must be one of {', '.join(NOISE_MASKS)}")
        require(self.noise_mask == "auto" or self.objective in MASKED,
                f"--noise-mask {self.noise_mask}: only for --objective {', '.join(MASKED)}")
        require(self.objective != "prefix-lm" or self.noise_density <= 0.5,  # as random_prefix_noise_mask
                f"--noise-density {self.noise_density}: prefix-lm predicts at most 0.5 of a row")
        require(self.mean_noise_span_length >= 1,
                f"--mean-noise-span-length {self.mean_noise_span_length}: must be at least 1")
        require(self.inputs_length >= 4, f"--inputs-length {self.inputs_length}: must be at least 4")
        require(not self.share_encoder_decoder or self.num_decoder_layers in (0, self.num_layers),
                "--share-encoder-decoder needs as many decoder layers as encoder layers")

    @property
    def n_decoder_layers(self):
        return self.num_decoder_layers or self.num_layers


# A preset sets model sizes and, with a recipe, training settings (train.py gives each key to the
# config declaring it). Never fp16: T5's activations overflow it (released models give inf/NaN;
# nanoT5 saw every fp16 run diverge). GPU presets pin bf16; train.py refuses fp16 (DTYPES).
PRESETS = {
    # The CPU default: Shakespeare's characters, span corruption. Rows of 141 raw -> 128 inputs + 29
    # targets, 32 rows. 2 + 2 layers of width 128 in T5's proportions (d_ff = 4 d_model, H x dk =
    # d_model); ReLU and a tied output layer, as v1.0. Dropout 0, no weight decay (nanoT5): a short
    # run never sees a token twice. Measured (README errata): fp32 is faster than bf16 at this size;
    # 2 + 2 layers beat 3 + 3 (the steps bind, not capacity).
    "char-cpu": dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4, dropout_rate=0.0,
                     inputs_length=128, tokenizer="char", batch_size=32, lr=3e-3, min_lr=3e-4,
                     warmup_iters=100, max_iters=1200, eval_interval=400, eval_tokens=100_000,
                     weight_decay=0.0, dtype="fp32"),
    # The smallest thing that still is a T5: for tests and for trying flags in seconds.
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                 inputs_length=32, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16, batch_size=4, max_iters=20, warmup_iters=5,
                 eval_interval=10, eval_tokens=4096),
    # T5-small (v1.0; 60M with T5's vocabulary), §3.1's baseline recipe as far as this loop goes,
    # with the released models' span corruption 512 / 114 (the baseline's: --noise-mask iid): 128
    # rows per step, 2^19 steps, inverse square-root decay after 10^4 warm-up steps, dropout 0.1.
    # T5's Adafactor scales a relative step (lr 0.01) by each weight's RMS; adamw-scale is Adam
    # scaled alike (train.AdamWScale). Not measured here (no GPU).
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, dropout_rate=0.1,
                     feed_forward_proj="relu", tie_word_embeddings=True, inputs_length=512,
                     tokenizer="gpt2", batch_size=32, tokens_per_step=128 * 626,
                     optimizer="adamw-scale", lr=1e-2, min_lr=1e-5, schedule="rsqrt",
                     warmup_iters=10000, max_iters=2**19, weight_decay=0.0, eval_interval=5000,
                     dtype="bf16"),
    # T5 v1.1 small and base, nanoT5's recipe: span corruption 512 / 114, 128 rows per step, 2^16
    # steps, 10^4 linear warm-up steps then cosine to 1e-5, no weight decay, clip 1.0, bf16, dropout
    # 0, AdamWScale at lr 2e-2 (nanoT5: plain AdamW diverges there). Not measured here (no GPU).
    "t5-v1_1-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                          dropout_rate=0.0, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False, inputs_length=512, tokenizer="gpt2",
                          batch_size=64, tokens_per_step=128 * 626, optimizer="adamw-scale",
                          lr=2e-2, min_lr=1e-5, schedule="cosine", warmup_iters=10000,
                          max_iters=2**16, weight_decay=0.0, grad_clip=1.0, eval_interval=2000,
                          dtype="bf16"),
    "t5-v1_1-base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                         dropout_rate=0.0, feed_forward_proj="gated-gelu",
                         tie_word_embeddings=False, inputs_length=512, tokenizer="gpt2",
                         batch_size=32, tokens_per_step=128 * 626, optimizer="adamw-scale", lr=2e-2,
                         min_lr=1e-5, schedule="cosine", warmup_iters=10000, max_iters=2**16,
                         weight_decay=0.0, grad_clip=1.0, eval_interval=2000, dtype="bf16"),
}
DEFAULT_PRESET = "char-cpu"

# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """T5's layer norm: x / sqrt(mean(x^2) + eps) * weight; no mean subtracted, no bias (Zhang &
    Sennrich 2019). Trap: mean(x^2) in at least fp32; in bf16 it loses x's small components."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        variance = x.pow(2).mean(-1, keepdim=True)  # (..., 1)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class FeedForward(nn.Module):
    """T5's position-wise feed-forward layer, with T5's names. relu (v1.0): wo(relu(wi x)).
    gated-gelu (v1.1, Shazeer 2020): wo(gelu(wi_0 x) * wi_1 x), the released models' tanh GELU."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):
        if self.gated:
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, L, F)
        else:
            h = F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class KVCache(gpt.KVCache):
    """gpt.py's cache for the decoder's self-attention (the tokens decoded so far), plus `cross`:
    per layer, the encoder output's keys and values. Fixed while decoding, so computed once, at
    the first step."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        n = config.n_decoder_layers
        super().__init__(n, (batch_size, config.num_heads, max_len, config.d_kv), device, dtype)
        self.cross = [None] * n


class Attention(nn.Module):
    """Multi-head attention with T5's names (q, k, v, o; no biases): self-attention, or
    cross-attention given the encoder's output as `source`. Positions and masking come in one float
    `bias` added to the logits: T5's relative position bias, plus -inf at padding or future keys.

    T5 does not divide q.k by sqrt(dk). Its q is initialised sqrt(dk) smaller (T5._init_weights):
    the same function at init; a released checkpoint's q carries the factor. So the logits are
    q.k + bias, and sdpa gets scale=1.0 (its default would divide by sqrt(dk) a second time).
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.n_heads, self.d_kv, self.layer_idx, self.attn = config.num_heads, config.d_kv, layer_idx, config.attn
        self.dropout = config.dropout_rate
        self.attn_dropout = nn.Dropout(config.dropout_rate)  # on the attention probabilities, as T5

    def forward(self, x, bias=None, source=None, cache=None):
        """x (B, T, C) -> (B, T, C). bias: None or float (B or 1, H, T, T_k). source (B, S, C): for
        cross-attention. cache: a KVCache (decoder only)."""
        B, T, _ = x.shape

        def heads(t):  # (B, L, H*dk) -> (B, H, L, dk)
            return t.view(B, -1, self.n_heads, self.d_kv).transpose(1, 2)

        q = heads(self.q(x))
        if source is None:  # self-attention: k, v from these tokens (decoding: + the cached past)
            k, v = heads(self.k(x)), heads(self.v(x))
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, H, T_past + T, dk)
        elif cache is not None and cache.cross[self.layer_idx] is not None:
            k, v = cache.cross[self.layer_idx]  # the encoder output's k, v, from the first step
        else:  # cross-attention: queries from the decoder, k, v from the encoder's output
            k, v = heads(self.k(source)), heads(self.v(source))  # (B, H, S, dk)
            if cache is not None:
                cache.cross[self.layer_idx] = (k, v)
        if self.attn == "naive":
            att = q @ k.transpose(-2, -1)  # (B, H, T, T_k) raw logits: no 1/sqrt(dk) in T5
            if bias is not None:
                att = att + bias  # relative position bias, and -inf on padding / future keys
            wide = torch.promote_types(att.dtype, torch.float32)  # softmax in at least fp32, as T5
            att = F.softmax(att, dim=-1, dtype=wide).type_as(att)
            y = self.attn_dropout(att) @ v  # (B, H, T, dk)
        else:
            # Trap: under autocast the mask needs q's dtype; scale=1.0, or sdpa divides by sqrt(dk).
            mask = None if bias is None else bias.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_kv)  # heads side by side ...
        return self.o(y)  # ... then mixed


class Block(nn.Module):
    """One T5 layer, pre-norm: x + attn(norm(x)), [decoder: x + cross_attn(norm(x), encoder out)],
    x + ff(norm(x)). A stack's first block owns its relative position bias (T5 §2.1),
    `self_attn.pos_bias`: bidirectional buckets in the encoder, causal in the decoder; none in
    cross-attention."""

    def __init__(self, config, layer_idx, is_decoder):
        super().__init__()
        C, eps = config.d_model, config.layer_norm_epsilon
        self.self_attn_norm = RMSNorm(C, eps)
        self.self_attn = Attention(config, layer_idx)
        if layer_idx == 0:
            self.self_attn.pos_bias = T5RelativeBias(
                config.num_heads, config.relative_attention_num_buckets,
                config.relative_attention_max_distance, bidirectional=not is_decoder)
        if is_decoder:
            self.cross_attn_norm = RMSNorm(C, eps)
            self.cross_attn = Attention(config, layer_idx)
        self.ff_norm = RMSNorm(C, eps)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, bias, source=None, cross_bias=None, cache=None):
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), bias, cache=cache))
        if source is not None:
            x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), cross_bias, source=source,
                                                 cache=cache))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class Stack(nn.Module):
    """The encoder or the decoder: dropout, the blocks, a final RMSNorm, dropout (T5 §2.1)."""

    def __init__(self, config, is_decoder):
        super().__init__()
        n = config.n_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList([Block(config, i, is_decoder) for i in range(n)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def position_bias(self, q_pos, k_pos):
        """(H, T_q, T_k), once per forward from the first layer's table; every layer uses it."""
        return self.block[0].self_attn.pos_bias(q_pos, k_pos)

    def forward(self, x, bias, source=None, cross_bias=None, cache=None):
        x = self.dropout(x)
        for block in self.block:
            x = block(x, bias, source, cross_bias, cache)
        return self.dropout(self.final_layer_norm(x))


def padding_bias(attention_mask, dtype):
    """(B, S), 1 = token, 0 = padding -> (B, 1, 1, S): 0 where a key may be seen, -inf on padding.
    padding_bias(torch.tensor([[1, 1, 0]]), torch.float32) -> tensor([[[[0., 0., -inf]]]])"""
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(attention_mask == 0, float("-inf"))[:, None, None, :]


def shift_right(labels, start_id, pad_id):
    """The decoder's inputs: the targets shifted right behind a start token; -100 (ignored) -> pad.
    shift_right(torch.tensor([[7, 8, -100]]), 0, 0) -> tensor([[0, 7, 8]])"""
    shifted = torch.full_like(labels, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_id)


# ----------------------------------------------------------------------------------------------------------------------
# The model


class T5(nn.Module):
    """T5ForConditionalGeneration: the shared embedding -> encoder; the shifted targets -> decoder,
    attending to the encoder output -> output layer. Names map 1:1 onto released ones (hf_name)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # encoder + decoder inputs
        self.encoder = Stack(config, is_decoder=False)
        self.decoder = Stack(config, is_decoder=True)
        if config.share_encoder_decoder:
            # "Enc-dec, shared" (T5 §3.2.2, Table 2; slide: "Can force sharing of parameters"). The
            # decoder's layers ARE the encoder's (self-attention, feed-forward, their norms, the
            # final norm); only cross-attention is its own. The position table too: bidirectional
            # buckets mean one offset in both stacks; the causal mask never uses the future half.
            for enc, dec in zip(self.encoder.block, self.decoder.block):
                dec.self_attn_norm, dec.self_attn = enc.self_attn_norm, enc.self_attn
                dec.ff_norm, dec.ff = enc.ff_norm, enc.ff
            self.decoder.final_layer_norm = self.encoder.final_layer_norm
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight  # v1.0: one matrix embeds and scores tokens
        self._init_weights()

    def _init_weights(self):
        """T5's init (Mesh TensorFlow's, as the released code and transformers do it), f =
        initializer_factor: embedding N(0, f); q N(0, f / sqrt(C dk)) (scaled attention's 1/sqrt(dk)
        lives here); k, v N(0, f/sqrt(C)); o N(0, f / sqrt(H dk)); wi N(0, f / sqrt(C)), wo N(0, f /
        sqrt(F)); position tables N(0, f / sqrt(C)); norms f. Each matrix's std is 1/sqrt(its
        fan-in), so activations keep unit scale through every layer."""
        c, f = self.config, self.config.initializer_factor

        def normal(w, std):
            nn.init.normal_(w, mean=0.0, std=f * std)

        normal(self.shared.weight, 1.0)
        if not c.tie_word_embeddings:
            normal(self.lm_head.weight, 1.0)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.constant_(m.weight, f)
            elif isinstance(m, Attention):
                normal(m.q.weight, (c.d_model * c.d_kv) ** -0.5)
                normal(m.k.weight, c.d_model ** -0.5)
                normal(m.v.weight, c.d_model ** -0.5)
                normal(m.o.weight, (c.num_heads * c.d_kv) ** -0.5)
            elif isinstance(m, FeedForward):
                for w in ([m.wi_0.weight, m.wi_1.weight] if m.gated else [m.wi.weight]):
                    normal(w, c.d_model ** -0.5)
                normal(m.wo.weight, c.d_ff ** -0.5)
            elif isinstance(m, T5RelativeBias):
                normal(m.relative_attention_bias.weight, c.d_model ** -0.5)

    def num_params(self):
        """Parameter count; tied and shared weights count once."""
        return sum(p.numel() for p in self.parameters())

    def no_weight_decay(self):
        """Besides norms (train.py skips them by shape), the relative position tables, as gpt.py."""
        return {f"{name}.relative_attention_bias.weight" for name, m in self.named_modules()
                if isinstance(m, T5RelativeBias)}

    def flops_per_token(self):
        """Training FLOPs per token the loop counts (encoder + decoder), at a row's nominal lengths:
        6 per weight a token passes (Kaplan et al. 2020 eq. 2.1), the output layer for decoder
        tokens. Plus attention scores and mixing, 12 x layers x keys x H dk (PaLM App. B):
        self-attention in both stacks; the decoder's cross-attention over the S encoder keys."""
        c = self.config
        _, S, T = row_lengths(c)
        inner = c.num_heads * c.d_kv
        enc_w = sum(p.numel() for p in self.encoder.parameters())
        dec_w = sum(p.numel() for p in self.decoder.parameters()) + c.vocab_size * c.d_model
        enc = 6 * enc_w + 12 * c.num_layers * S * inner
        dec = 6 * dec_w + 12 * c.n_decoder_layers * (T + S) * inner
        return (S * enc + T * dec) / (S + T)

    def _check_dtype(self, device_type):
        fp16 = self.shared.weight.dtype == torch.float16 or (
            torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16)
        require(not fp16, "T5 does not run in fp16: its activations overflow it (inf, then NaN); "
                "use --dtype bf16 or fp32")

    def encode(self, input_ids, attention_mask=None):
        """input_ids (B, S); attention_mask (B, S), 0 = padding -> the encoder output (B, S, C)."""
        self._check_dtype(input_ids.device.type)
        pos = torch.arange(input_ids.size(1), device=input_ids.device)
        bias = self.encoder.position_bias(pos, pos)[None]  # (1, H, S, S): bidirectional buckets
        if attention_mask is not None:  # no token attends to padding
            bias = bias + padding_bias(attention_mask, bias.dtype)  # (B, H, S, S)
        return self.encoder(self.shared(input_ids), bias)

    def decode(self, decoder_input_ids, encoder_out, attention_mask=None, cache=None):
        """decoder_input_ids (B, T) -> logits (B, T, V), attending to encoder_out (B, S, C) except
        its padding. With a cache: the next T tokens after the cache.length already decoded."""
        T, device = decoder_input_ids.size(1), decoder_input_ids.device
        past = cache.length if cache is not None else 0
        pos = torch.arange(past, past + T, device=device)  # (T,) positions of the new tokens
        k_pos = torch.arange(past + T, device=device)  # (T_k,) every position so far
        bias = self.decoder.position_bias(pos, k_pos)  # (H, T, T_k), causal (future -> bucket 0)
        bias = bias.masked_fill(~causal_mask(pos, k_pos), float("-inf"))[None]  # future -> -inf
        cross_bias = None if attention_mask is None else padding_bias(attention_mask, bias.dtype)  # (B, 1, 1, S)
        x = self.decoder(self.shared(decoder_input_ids), bias, encoder_out, cross_bias, cache)  # (B, T, C)
        if cache is not None:
            cache.length += T
        if self.config.tie_word_embeddings:
            # v1.0 (Mesh TensorFlow): with the embedding as output layer, decoder outputs are first
            # scaled by d_model**-0.5. The embedding has std 1: raw logits would have std sqrt(C).
            x = x * self.config.d_model ** -0.5
        return self.lm_head(x)

    def forward(self, input_ids, decoder_input_ids=None, labels=None, attention_mask=None):
        """-> logits (B, T, V), loss (mean cross-entropy over labels != -100; None without labels).
        decoder_input_ids default to shift_right(labels), as T5 trains."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        logits = self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)
        loss = None
        if labels is not None:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # >= fp32, as T5
            loss = F.cross_entropy(wide.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, attention_mask=None, temperature=0.0, top_k=None,
                 top_p=None, use_cache=True, generator=None):
        """Encode input_ids (B, S) once, then decode up to max_new_tokens after the start token:
        (B, 1 + n) ids. temperature 0 is greedy. Rows past </s> continue with <pad>; decoding stops
        when all are. use_cache: each step runs the decoder on the newest token only, against cached
        keys and values (the encoder's computed once); else each step re-runs it on every token."""
        was_training = self.training
        self.eval()
        c, B, device = self.config, input_ids.size(0), input_ids.device
        encoder_out = self.encode(input_ids, attention_mask)
        out = torch.full((B, 1), c.decoder_start_token_id, dtype=torch.long, device=device)
        cache = KVCache(c, B, max_new_tokens + 1, device, encoder_out.dtype) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = self.decode(out[:, -1:] if use_cache else out, encoder_out, attention_mask, cache)
            next_id = gpt.sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B, 1)
            next_id = next_id.masked_fill(done[:, None], c.pad_token_id)
            out = torch.cat((out, next_id), dim=1)
            done |= next_id[:, 0] == c.eos_token_id
            if done.all():
                break
        self.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------------------------------
    # Hugging Face format (both ways): T5ForConditionalGeneration, as released (t5-*, t5-v1_1-*).

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a T5ForConditionalGeneration directory (config.json + model.safetensors or
        pytorch_model.bin), v1.0 or v1.1, without transformers. overrides: e.g. attn="naive",
        dropout_rate=0.0.

        config.json gives the version: feed_forward_proj, and whether the output layer is the
        embedding. Trap: that has two spellings. Hub v1.1 configs: tie_word_embeddings: false.
        transformers 5: tie_word_embeddings: true, scale_decoder_outputs: false, and a separate
        lm_head.weight. Both mean a head of its own, no d_model**-0.5 rescale. A v1.0 file may omit
        lm_head.weight (it is the embedding)."""
        hf, sd = read_hf_dir(path)
        if hf.get("model_type", "t5") != "t5":
            raise ValueError(f"{path}: model_type {hf.get('model_type')!r} is not t5")
        ff = hf.get("feed_forward_proj", "relu")
        if ff not in FEED_FORWARD:
            raise ValueError(f"{path}: feed_forward_proj {ff!r} is neither T5 v1.0's relu nor v1.1's gated-gelu")
        scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
        if "shared.weight" not in sd:
            raise KeyError(f"{path}: missing weight 'shared.weight'")
        head = sd.get("lm_head.weight")
        if scaled and head is not None and not torch.equal(head, sd["shared.weight"]):
            raise ValueError(f"{path}: an output layer of its own with T5 v1.0's d_model**-0.5 "
                             f"rescale is neither T5 v1.0 nor v1.1")
        fields = {**{k: hf[k] for k in HF_REQUIRED}, **{k: hf.get(k, v) for k, v in HF_OPTIONAL.items()}}
        fields.update(num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
                      feed_forward_proj=ff, tie_word_embeddings=scaled,
                      decoder_start_token_id=hf.get("decoder_start_token_id",
                                                    fields["pad_token_id"]))
        model = cls(T5Config(**{**fields, **overrides}))
        if model.config.tie_word_embeddings:  # lm_head.weight IS shared.weight: nothing to load
            copy_weights(model, sd, path, name=hf_name, skip=("lm_head.",))
        else:  # untied, unscaled; a file may still store the head as the embedding (saved once)
            copy_weights(model, {"lm_head.weight": sd["shared.weight"], **sd}, path, name=hf_name)
        return model

    def export_hf(self, path):
        """Write a directory T5ForConditionalGeneration.from_pretrained(path) loads (config.json +
        model.safetensors). A tied output layer is left out, as in transformers (it re-ties it)."""
        c = self.config
        if c.share_encoder_decoder:
            raise ValueError("export_hf: the HF T5 format has no encoder-decoder sharing (its "
                             "decoder buckets positions causally); this model was built with "
                             "share_encoder_decoder=True")
        names = (*HF_REQUIRED, *HF_OPTIONAL, "feed_forward_proj", "tie_word_embeddings", "decoder_start_token_id")
        hf_config = dict(architectures=["T5ForConditionalGeneration"], model_type="t5",
                         **{k: getattr(c, k) for k in names}, num_decoder_layers=c.n_decoder_layers,
                         is_encoder_decoder=True, use_cache=True)
        sd = {hf_name(name): w.float() for name, w in self.state_dict().items()
              if not (name == "lm_head.weight" and c.tie_word_embeddings)}
        write_hf_dir(path, hf_config, sd)


# The config.json fields that are ours under the same name: required ones, then ones with a default.
HF_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
HF_OPTIONAL = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                   layer_norm_epsilon=1e-6, initializer_factor=1.0, pad_token_id=0, eos_token_id=1)


def hf_name(name):
    """Our parameter name -> the released checkpoint's (T5ForConditionalGeneration's), whose block
    is a list of sub-layers: 0 self-attention, (decoder) 1 cross-attention, then feed-forward.
    hf_name("decoder.block.3.cross_attn.q.weight")
        -> "decoder.block.3.layer.1.EncDecAttention.q.weight"
    hf_name("encoder.block.0.self_attn.pos_bias.relative_attention_bias.weight")
        -> "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" """
    m = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.(\w+?)\.(.+)", name)
    if not m:
        return name  # shared.weight, lm_head.weight, {encoder,decoder}.final_layer_norm.weight
    stack, i, part, rest = m.groups()
    ff = 2 if stack == "decoder" else 1
    where = {"self_attn_norm": "layer.0.layer_norm", "self_attn": "layer.0.SelfAttention",
             "cross_attn_norm": "layer.1.layer_norm", "cross_attn": "layer.1.EncDecAttention",
             "ff_norm": f"layer.{ff}.layer_norm", "ff": f"layer.{ff}.DenseReluDense"}[part]
    return f"{stack}.block.{i}.{where}.{rest.replace('pos_bias.', '')}"


# ----------------------------------------------------------------------------------------------------------------------
# Span corruption exactly as T5's preprocessors (t5/data/preprocessors.py) compute it, names
# included. Tokens are 1-D LongTensors. Randomness comes from a torch.Generator (the loop's, so a
# resumed run corrupts the same way).


def noise_counts(length, noise_density, mean_noise_span_length):
    """(noise tokens, noise spans) of a row, as random_spans_noise_mask fixes them. Noise:
    round(length x density), in [1, length - 1]; none at density 0. Spans: round(noise / mean span
    length), >= 1. In float32, half to even, as TF. Added: at most as many spans as non-noise
    tokens (each noise span follows one). T5's code fails there (over half noise in single tokens); we cap.
    noise_counts(568, 0.15, 3.0) -> (85, 28)"""
    if noise_density == 0:
        return 0, 0
    length = max(length, 2)
    num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length))), 1)
    return num_noise, min(num_spans, length - num_noise)


def _random_segmentation(num_items, num_segments, generator):
    """(num_segments,) lengths: num_items split into non-empty runs, every split equally likely.
    _random_segmentation(5, 2, g) -> e.g. tensor([1, 4])"""
    first_in_segment = torch.zeros(num_items, dtype=torch.long)
    cuts = torch.randperm(num_items - 1, generator=generator)[:num_segments - 1]
    first_in_segment[1 + cuts] = 1  # segment starts
    segment_id = first_in_segment.cumsum(0)  # (num_items,)
    return torch.bincount(segment_id, minlength=num_segments)


def iid_noise_mask(length, noise_density=0.15, generator=None):
    """T5's i.i.d. noise (iid_noise_mask; §3.3.1-3.3.3 and its baseline): (length,) bools, each
    token True with probability noise_density on its own. The count varies from row to row, and
    neighbours join into spans only by chance (mean run 1 / (1 - density)).
    iid_noise_mask(10, 0.3) -> e.g. [F T F F F T T F F F]"""
    return torch.rand(length, generator=generator) < noise_density


def random_spans_noise_mask(length, noise_density=0.15, mean_noise_span_length=3.0, generator=None):
    """T5's noise mask (§3.3.4, "span corruption"): (length,) bools, True = corrupted. Counts from
    noise_counts. Non-noise and noise spans alternate, from non-noise to noise, none empty; subject
    to that, every mask is equally likely. Density 0: no noise at all (T5 returns early too).
    random_spans_noise_mask(10, 0.3, 1.5) -> e.g. [F F F T F F F F T T]: 3 noise tokens, 2 spans"""
    if noise_density == 0:
        return torch.zeros(length, dtype=torch.bool)
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    padded = max(length, 2)  # T5: a 1-token row is treated as 2 long, then cut back
    noise_lengths = _random_segmentation(num_noise, num_spans, generator)
    nonnoise_lengths = _random_segmentation(padded - num_noise, num_spans, generator)
    # (2 * spans,) span lengths, non-noise first
    interleaved = torch.stack([nonnoise_lengths, noise_lengths], dim=1).flatten()
    span_start_indicator = torch.zeros(padded, dtype=torch.long)
    span_start_indicator[interleaved.cumsum(0)[:-1]] = 1
    span_num = span_start_indicator.cumsum(0)  # which span each token is in: 0, 1, 2, ...
    return (span_num % 2 == 1)[:length]  # odd spans are noise


def random_prefix_noise_mask(length, noise_density=0.5, generator=None):
    """T5's prefix LM split (random_prefix_noise_mask): (length,) bools, True on a prefix of P tokens
    (T5 calls the prefix the noise: it becomes the inputs, the rest the targets). P is uniform on
    [round((1 - 2 density)(length - 1)), length - 1], at least 1, so the targets average about
    density x length. At 0.5 (T5's prefix_lm.gin) every split point is equally likely; above, T5 refuses.
    random_prefix_noise_mask(6, 0.5) -> e.g. [T T F F F F]"""
    top = length - 1  # at least one target token
    low = min(top, max(1, int(np.round(np.float32(1 - 2 * noise_density) * np.float32(top)))))
    prefix = int(torch.randint(low, top + 1, (1,), generator=generator))
    return torch.arange(length) < prefix


def sentinels_needed(noise_mask):
    """Unique sentinels a row's span corruption takes: one per noise run (inputs), one per kept run
    (targets), the larger. sentinels_needed(tensor([F, T, T, F, T])) -> 2"""
    runs = int((noise_mask[1:] != noise_mask[:-1]).sum()) + 1  # runs of either kind, alternating
    return (runs + 1) // 2


def noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size):
    """Each noise run -> one sentinel, counting down from vocab_size - 1; the rest of it is dropped.
    noise_span_to_unique_sentinel(tensor([10, 11, 12, 13, 14, 15]),
                                  tensor([0, 0, 1, 1, 0, 1]).bool(), 1000)
        -> tensor([10, 11, 999, 14, 998])"""
    prev_is_noise = F.pad(noise_mask[:-1], (1, 0))  # (L,) was the previous token noise?
    first_noise = noise_mask & ~prev_is_noise
    subsequent_noise = noise_mask & prev_is_noise
    sentinels = vocab_size - first_noise.long().cumsum(0)  # (L,) vocab_size - 1, - 2, ... per span
    return torch.where(first_noise, sentinels, tokens)[~subsequent_noise]


def nonnoise_span_to_unique_sentinel(tokens, noise_mask, vocab_size):
    """Span corruption's targets: the same, roles swapped, so the kept text becomes the sentinels.
    nonnoise_span_to_unique_sentinel(tensor([10, 11, 12, 13, 14, 15]),
                                     tensor([0, 0, 1, 1, 0, 1]).bool(), 1000)
        -> tensor([999, 12, 13, 998, 15])"""
    return noise_span_to_unique_sentinel(tokens, ~noise_mask, vocab_size)


def random_spans_helper(inputs_length, noise_density, mean_noise_span_length,
                        extra_tokens_per_span_inputs, extra_tokens_per_span_targets):
    """T5's length arithmetic -> (R, targets length): the largest raw length R whose corrupted
    inputs (kept tokens, extra tokens per span, EOS) fit in inputs_length, and the targets' length.
    Trap: Hugging Face's copy (run_t5_mlm_flax.py) starts one token higher and can return an R
    whose inputs are one too long: (64, 0.2, 1.0) gives (64, 27) there, 65 inputs; T5's (63, 27)."""
    def lengths(tokens_length):
        num_noise = int(round(tokens_length * noise_density))  # half to even, as T5's helper
        num_spans = int(round(num_noise / mean_noise_span_length))
        return (tokens_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1,
                num_noise + num_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        # T5's "minor hack": targets no longer than inputs
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def compute_input_and_target_lengths(inputs_length, noise_density, mean_noise_span_length):
    """(raw tokens to draw, targets length) for span corruption, one sentinel per span each side.
    compute_input_and_target_lengths(512, 0.15, 3.0) -> (568, 114): T5's and nanoT5's rows."""
    return random_spans_helper(inputs_length, noise_density, mean_noise_span_length, 1, 1)


def noise_token_to_random_token_or_sentinel(tokens, noise_mask, mask_id, n_ordinary, generator, random_prob=0.1):
    """BERT-style corruption as T5 does it: each noise token -> a random ordinary token with
    probability random_prob, else the mask token (T5's mask is its vocabulary's top id). No "keep
    unchanged" share, unlike BERT's 80/10/10. The random tokens: T5's noise_token_to_random_token
    draws ids 3 .. vocabulary size - 1, all but pad, </s>, unk. In its BERT-style run
    (iid_15_r10s90_f.gin) the vocabulary had no extra ids, so that is every ordinary piece. Ours
    are ids 0 .. n_ordinary - 1, below every special (data.py), so we draw those (errata).
    noise_token_to_random_token_or_sentinel(tensor([5, 6, 7]), tensor([False, True, True]), 99, 20, g)
        -> e.g. tensor([5, 99, 99]), or tensor([5, 13, 99]) one time in ten"""
    use_random = torch.rand(tokens.shape, generator=generator) < random_prob
    random_tokens = torch.randint(n_ordinary, tokens.shape, generator=generator)
    return torch.where(noise_mask, torch.where(use_random, random_tokens, mask_id), tokens)


def infill(tokens, span_lengths, span_here, mask_id):
    """Lay out BART's text infilling. Walk the row: at each True of span_here a span begins (emit
    ONE mask, skip its length; length 0 inserts a mask, removes nothing); at each False copy the
    next kept token. span_here has (kept tokens + spans) entries.
    infill(tensor([1, 2, 3, 4]), tensor([0, 2]), tensor([False, True, False, True]), 9)
        -> tensor([1, 9, 2, 9])"""
    consumed = torch.ones(len(span_here), dtype=torch.long)
    consumed[span_here] = span_lengths  # each span swallows its length, each kept token one
    source = consumed.cumsum(0) - consumed  # (len,) where in `tokens` each entry starts
    return torch.where(span_here, torch.tensor(mask_id), tokens[source.clamp(max=len(tokens) - 1)])


def text_infilling(tokens, noise_density, poisson_lambda, mask_id, generator):
    """BART §2.2 -> (inputs, noise mask). Span lengths ~ Poisson(poisson_lambda), drawn until they
    cover N = round(density x R) tokens (the last cut to fit: BART trims to its masking budget), at
    uniform random places. Zero-length spans insert; at most N spans are kept, so the inputs never
    outgrow the row. In tokens; BART's released code masks whole words (and rounds N up)."""
    R = len(tokens)
    num_noise = int(np.round(np.float32(R) * np.float32(noise_density)))
    lengths, total = [], 0
    while total < num_noise:
        draw = int(torch.poisson(torch.tensor([float(poisson_lambda)]), generator=generator))
        lengths.append(min(draw, num_noise - total))
        total += lengths[-1]
    lengths = torch.tensor(lengths, dtype=torch.long)
    if len(lengths) > max(num_noise, 1):  # too many: drop the empty spans that do not fit
        room = num_noise - int((lengths > 0).sum())
        lengths = lengths[(lengths > 0) | (torch.cumsum((lengths == 0).long(), 0) <= room)]
    slots = R - num_noise + len(lengths)  # kept tokens + one mask per span
    span_here = torch.zeros(slots, dtype=torch.bool)
    span_here[torch.randperm(slots, generator=generator)[:len(lengths)]] = True
    inputs = infill(tokens, lengths, span_here, mask_id)
    noise = torch.zeros(R, dtype=torch.bool)
    consumed = torch.ones(slots, dtype=torch.long)
    consumed[span_here] = lengths
    for start, n in zip((consumed.cumsum(0) - consumed)[span_here].tolist(), lengths.tolist()):
        noise[start:start + n] = True
    return inputs, noise


def sentence_permutation(tokens, sentence_starts, generator):
    """BART §2.2: the row's sentences, shuffled. sentence_starts: their first tokens (0 first).
    sentence_permutation(tensor([1, 2, 3, 4, 5]), [0, 2, 3], g) -> e.g. tensor([3, 1, 2, 4, 5])"""
    bounds = list(sentence_starts) + [len(tokens)]
    pieces = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat([pieces[i] for i in torch.randperm(len(pieces), generator=generator).tolist()])


def noise_pattern(config):
    """"iid" or "spans" for the objectives with a noise mask (None for the others): --noise-mask, or
    with auto what T5's configs used. noise_pattern(T5Config(objective="bert-style")) -> 'iid'"""
    if config.objective not in MASKED:
        return None
    if config.noise_mask != "auto":
        return config.noise_mask
    return "spans" if config.objective == "replace-spans" else "iid"


def row_lengths(config):
    """(R raw tokens a row draws, S encoder length, T decoder length) for config.objective at
    config.inputs_length. Span corruption and drop-tokens with span noise follow T5's arithmetic
    (extra tokens per span each side: 1 with sentinels, 0 dropping). The rest read R = S - 1 (+
    EOS), as T5's split_tokens_to_inputs_length; no row is longer than S either side. i.i.d. rows
    vary in length, so T = S: T5's configs cut the targets at a fixed length instead (errata).
    row_lengths(T5Config()) -> (568, 512, 114)"""
    L, d, m = config.inputs_length, config.noise_density, config.mean_noise_span_length
    if config.objective not in ("replace-spans", "drop-tokens") or noise_pattern(config) == "iid":
        return L - 1, L, L
    extra = 1 if config.objective == "replace-spans" else 0
    R, _ = random_spans_helper(L, d, m, extra, extra)
    # Trap: T5's helper ignores the mask's one-span floor, which bites in short rows with long spans
    # (e.g. 32 inputs, mean span 10). T5's pipeline then truncates its inputs; we draw fewer tokens.
    while True:
        num_noise, num_spans = noise_counts(R, d, m)
        if R - num_noise + num_spans * extra + 1 <= L:
            return R, L, num_noise + num_spans * extra + 1
        R -= 1


# ----------------------------------------------------------------------------------------------------------------------
# The objective: a row of R raw tokens -> (encoder inputs, decoder targets), each ending with
# </s>, padded into a batch. train.py calls these methods (its docstring lists them).

EVAL_SEED = 1234  # eval's own generator, seeded afresh each time: the same noise at every eval


class DenoisingObjective:
    """T5's objectives (and BART's two) through one interface. A batch: input_ids, attention_mask
    (B, S) for the encoder; decoder_input_ids (B, T) = labels shifted right; labels (B, T), -100 on
    padding. Metrics: loss (nats per target token), acc (share of targets exactly right, argmax).
    Tokens counted: real encoder + decoder tokens; "per row" in train.py's log is S + T."""

    def __init__(self, config, tokenizer):
        self.config, self.objective = config, config.objective
        missing = [s for s in (sentinel(0), "<pad>", "</s>") if s not in tokenizer.specials]
        require(not missing, f"t5: the tokenizer lacks the special tokens {missing}")
        self.vocab_size = tokenizer.specials[sentinel(0)] + 1  # sentinel k = vocab_size - 1 - k
        self.n_sentinels = sum(1 for s in tokenizer.specials if s.startswith("<extra_id_"))
        self.n_ordinary = min(tokenizer.specials.values())  # BERT-style draws random tokens below
        self.mask_id = self.vocab_size - 1  # sentinel 0: T5's BERT/MASS mask; ours for BART
        self.pad, self.eos, self.start = config.pad_token_id, config.eos_token_id, config.decoder_start_token_id
        self.raw_tokens_per_row, self.inputs_length, self.targets_length = row_lengths(config)
        self.tokens_per_row = self.inputs_length + self.targets_length
        self.noise = noise_pattern(config)
        R, d = self.raw_tokens_per_row, config.noise_density
        if self.objective == "replace-spans" and self.noise == "spans":
            _, spans = noise_counts(R, d, config.mean_noise_span_length)
            require(spans <= self.n_sentinels, f"t5: a row of {R} tokens at --noise-density {d} and "
                    f"--mean-noise-span-length {config.mean_noise_span_length} has {spans} spans, more "
                    f"than the {self.n_sentinels} sentinels of the vocabulary")
        elif self.objective == "replace-spans":
            # i.i.d. noise: a row of R tokens has about R d (1 - d) + 1 runs of each kind, spread at
            # most the square root of that. A row that needs more sentinels than there are is drawn
            # again (noise_mask); refused unless 4 spreads still fit (then < 1 row in 30,000 is).
            spans = R * d * (1 - d) + 1
            require(spans + 4 * spans ** 0.5 <= self.n_sentinels, f"t5: a row of {R} tokens with "
                    f"i.i.d. noise at --noise-density {d} has about {spans:.0f} spans: too many rows need "
                    f"more than the {self.n_sentinels} sentinels of the vocabulary")

    def rows(self, inputs="encoder", targets="decoder"):
        """What one row is made of, its two parts named (t5lm.py joins them: "input", "target")."""
        c = self.config
        noise = ("i.i.d. noise" if self.noise == "iid" else "noise") + f" {c.noise_density:g}"
        if self.noise == "spans" or self.objective == "text-infilling":
            noise += f", mean span {c.mean_noise_span_length:g}"
        most = "at most " if self.noise == "iid" else ""
        return (f"t5 rows ({self.objective}, {noise}): {self.raw_tokens_per_row} raw tokens -> {most}"
                f"{self.inputs_length} {inputs} + {self.targets_length} {targets} tokens")

    def describe(self):
        """The line train.py prints at start-up."""
        return f"{self.rows()}; 'per row' counts both ({self.tokens_per_row})"

    # -- one row -------------------------------------------------------------------------------------------------------

    def corrupt(self, tokens, generator, sentence_starts=(0,)):
        """tokens (R,) -> (encoder inputs, decoder targets), both ending with </s>."""
        c, eos, kind = self.config, torch.tensor([self.eos]), self.objective
        if kind == "prefix-lm":  # T5: inputs = drop_nonnoise_tokens, targets = drop_noise_tokens
            prefix = random_prefix_noise_mask(len(tokens), c.noise_density, generator)
            inputs, targets = tokens[prefix], tokens[~prefix]
        elif kind == "sentence-permutation":
            inputs, targets = sentence_permutation(tokens, sentence_starts, generator), tokens
        elif kind == "text-infilling":
            inputs, _ = text_infilling(tokens, c.noise_density, c.mean_noise_span_length, self.mask_id, generator)
            targets = tokens
        else:
            noise = self.noise_mask(len(tokens), generator)
            if kind == "replace-spans":
                inputs = noise_span_to_unique_sentinel(tokens, noise, self.vocab_size)
                targets = nonnoise_span_to_unique_sentinel(tokens, noise, self.vocab_size)
            elif kind == "drop-tokens":
                inputs, targets = tokens[~noise], tokens[noise]
            elif kind == "bert-style":
                inputs = noise_token_to_random_token_or_sentinel(tokens, noise, self.mask_id,
                                                                 self.n_ordinary, generator)
                targets = tokens
            else:  # mass-style
                inputs, targets = torch.where(noise, self.mask_id, tokens), tokens
        return torch.cat([inputs, eos]), torch.cat([targets, eos])

    def noise_mask(self, length, generator):
        """The row's noise: iid_noise_mask or random_spans_noise_mask (noise_pattern). Trap: T5's
        noise_span_to_unique_sentinel counts down from the top id without a floor, so an i.i.d. row
        with over 100 spans (iid_25_u_u, iid_50_u_u at 512 inputs) took ordinary pieces as
        sentinels. Below ours sit </s> and <pad>: such a row is drawn again."""
        c = self.config
        if self.noise == "spans":
            return random_spans_noise_mask(length, c.noise_density, c.mean_noise_span_length, generator)
        noise = iid_noise_mask(length, c.noise_density, generator)
        while self.objective == "replace-spans" and sentinels_needed(noise) > self.n_sentinels:
            noise = iid_noise_mask(length, c.noise_density, generator)
        return noise

    def _row(self, split, start, end, generator):
        tokens = torch.from_numpy(np.asarray(split.tokens[start:end], dtype=np.int64))
        starts = (0,)
        if self.objective == "sentence-permutation":  # lines starting in the row (data.py's)
            ls = split.line_starts
            inside = ls[np.searchsorted(ls, start, side="right"):np.searchsorted(ls, end, side="left")]
            starts = (0, *(np.asarray(inside, dtype=np.int64) - start).tolist())
        return self.corrupt(tokens, generator, starts)

    def collate(self, rows):
        """[(inputs, targets)] -> the batch dict, padded to S and T."""
        B, S, T = len(rows), self.inputs_length, self.targets_length
        input_ids = torch.full((B, S), self.pad, dtype=torch.long)
        attention_mask = torch.zeros(B, S, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        for i, (inputs, targets) in enumerate(rows):
            if len(inputs) > S or len(targets) > T:
                raise ValueError(f"t5: a row has {len(inputs)} inputs / {len(targets)} targets; "
                                 f"room for {S} / {T}")
            input_ids[i, :len(inputs)] = inputs
            attention_mask[i, :len(inputs)] = 1
            labels[i, :len(targets)] = targets
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "decoder_input_ids": shift_right(labels, self.start, self.pad), "labels": labels}

    # -- what the loop calls -------------------------------------------------------------------------------------------

    def train_batch(self, split, batch_size, generator):
        """batch_size rows of R consecutive tokens at random places of the split (they may cross
        documents, as T5's packed rows do), each corrupted with `generator`."""
        R = self.raw_tokens_per_row
        starts = torch.randint(len(split.tokens) - R + 1, (batch_size,), generator=generator).tolist()
        return self.collate([self._row(split, s, s + R, generator) for s in starts])

    def eval_batches(self, split, batch_size):
        """Every token of the split once: consecutive rows of R tokens from its start, the last one
        shorter, corrupted by a generator seeded here: every eval scores the same corruption."""
        g = torch.Generator().manual_seed(EVAL_SEED)
        n, R = len(split.tokens), self.raw_tokens_per_row
        rows = []
        for s in range(0, n, R):
            if min(s + R, n) - s < 2:
                continue  # a 1-token tail: nothing to corrupt
            rows.append(self._row(split, s, min(s + R, n), g))
            if len(rows) == batch_size:
                yield self.collate(rows)
                rows = []
        if rows:
            yield self.collate(rows)

    @staticmethod
    def count_tokens(batch):
        return int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())

    @staticmethod
    def denominators(batch):
        """The loss is averaged over the real targets of the whole step."""
        return {"nll": int((batch["labels"] != -100).sum())}

    def loss(self, model, batch, denominators=None):
        """(summed target log-loss / denominators["nll"], sums to aggregate over an evaluation)."""
        denominators = denominators or self.denominators(batch)
        logits, _ = model(batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"],
                          attention_mask=batch["attention_mask"])
        labels = batch["labels"]
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        real = labels != -100
        correct = (logits.argmax(-1) == labels)[real].sum()
        return nll / max(1, denominators["nll"]), {"nll": nll.detach(), "targets": real.sum(), "correct": correct}

    @staticmethod
    def summarize(sums):
        return {"loss": float(sums["nll"]) / float(sums["targets"]),
                "acc": float(sums["correct"]) / float(sums["targets"])}


Model, Config, Objective = T5, T5Config, DenoisingObjective  # what train.py's registry looks up


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning (train.py --task, finetune.py): text to text, no new layer


class Classifier(nn.Module):
    """T5's way (Raffel et al. 2020, §2.4): every task is text to text. The input names the task and its
    fields as T5 feeds GLUE ("genre sentence: ...", "next-line sentence1: ... sentence2: ..."), the
    target is the label's word and </s>, trained with pretraining's own cross-entropy (per example: the
    mean over its target tokens). No new parameter. Prediction: greedy decoding; an output that is no
    label's word counts as wrong (§2.4). forward(...) -> (loss (B,), label (B,), -1 = no label)."""
    LORA = ("*.q", "*.v")  # in every attention: encoder, decoder, cross
    ADAPTER = ("*.o", "*.wo")  # each sublayer's output, before the residual sum
    EMBEDDING = "shared"  # prompt ids appear in encoder inputs only
    PROMPT_AT = 0
    PAD = "<pad>"

    def __init__(self, model, task, labels, tokenizer):
        super().__init__()
        c = model.config
        self.pretrained, self.labels, self.max_len, self.eos = model, labels, c.inputs_length, c.eos_token_id
        self.fields = [tokenizer.encode(f"{task} {name}: ") for name in ("sentence", "sentence1")]
        self.second = tokenizer.encode(" sentence2: ")
        words = [tokenizer.encode(w) + [c.eos_token_id] for w in labels]
        L = max(map(len, words))
        self.register_buffer("targets", torch.tensor([w + [-100] * (L - len(w)) for w in words]),
                             persistent=False)  # (n_labels, L), -100 after </s>

    def encode(self, a, b=None):
        """The task's text, tokens of the fields' names included, then </s>; one segment."""
        ids = [*self.fields[0], *a] if b is None else [*self.fields[1], *a, *self.second, *b]
        return ids + [self.eos], [0] * (len(ids) + 1)

    def forward(self, input_ids, token_type_ids, attention_mask, labels):
        m, c = self.pretrained, self.pretrained.config
        enc = m.encode(input_ids, attention_mask)  # (B, S, C)
        target = self.targets[labels]  # (B, L)
        logits = m.decode(shift_right(target, c.decoder_start_token_id, c.pad_token_id), enc, attention_mask)
        nll = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
        loss = nll.sum(1) / (target != -100).sum(1)  # (B,)
        if self.training:  # teacher forcing: right if every target token is the argmax
            out = logits.argmax(-1).masked_fill(target == -100, -100)  # (B, L)
        else:  # greedy decoding, L tokens
            out = torch.full_like(target[:, :1], c.decoder_start_token_id)
            for _ in range(target.size(1)):
                out = torch.cat([out, m.decode(out, enc, attention_mask)[:, -1:].argmax(-1)], 1)
            out = out[:, 1:]
        # a label is predicted when the output matches its word up to and including </s>
        known = self.targets != -100  # (n_labels, L)
        match = ((out[:, None] == self.targets[None]) | ~known[None]).all(-1)  # (B, n_labels)
        return loss, torch.where(match.any(-1), match.int().argmax(-1), -1)


# ----------------------------------------------------------------------------------------------------------------------
# Filling spans: the slide's example, and what a run shows when it ends.
# "<X>", "<Y>", ... in a prompt are the slide's placeholders. In order, they become sentinels 0, 1,
# ... ("<extra_id_0>" works too). The model decodes "<extra_id_0> span <extra_id_1> span ...".

PLACEHOLDER = re.compile(r"<[A-Z]>|<extra_id_\d+>")


def to_sentinels(text):
    """The prompt as the tokenizer reads it, and the placeholders as the user wrote them:
    to_sentinels("Thank you <X> me to your party <Y> week.")
        -> ("Thank you <extra_id_0> me to your party <extra_id_1> week.", ["<X>", "<Y>"])"""
    found = PLACEHOLDER.findall(text)
    counter = iter(range(len(found)))
    return PLACEHOLDER.sub(lambda m: sentinel(next(counter)), text), found


@torch.no_grad()
def fill_spans(model, tokenizer, text, max_new_tokens=32, temperature=0.0, top_k=None, generator=None):
    """Encode text (with placeholders) + </s>; decode greedily or sampled. -> (filled text,
    {placeholder: fill}, raw decoded text). UsageError: no placeholder, or too long for the rows."""
    c = model.config
    prompt, names = to_sentinels(text)
    require(names, f"no span to fill in {text!r}: mark each with <X>, <Y>, ... (or <extra_id_0>, ...)")
    sentinel_ids = [tokenizer.specials.get(sentinel(k)) for k in range(len(names))]
    require(None not in sentinel_ids, f"{len(names)} spans to fill; the vocabulary has sentinels for fewer")
    ids = tokenizer.encode(prompt) + [c.eos_token_id]
    require(len(ids) <= c.inputs_length, f"the prompt is {len(ids)} tokens long; this model's "
            f"inputs are at most {c.inputs_length}")
    prompt = torch.tensor([ids], device=next(model.parameters()).device)
    write = getattr(model, "write_targets", None)  # t5lm.py's one stack writes the targets after its input
    out = (write(prompt, max_new_tokens, temperature, top_k, generator) if write else
           model.generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)[0, 1:])
    out = out.tolist()
    fills, current = {}, None
    by_id = {i: k for k, i in enumerate(sentinel_ids)}
    all_sentinels = {i for s, i in tokenizer.specials.items() if s.startswith("<extra_id_")}
    for i in out:
        if i == c.eos_token_id or i == c.pad_token_id:
            break
        if i in all_sentinels:
            current = by_id.get(i)  # beyond the prompt's sentinels: what follows fills no span
        elif current is not None:
            fills.setdefault(current, []).append(i)
    spans = [tokenizer.decode(fills.get(k, [])) for k in range(len(names))]
    counter = iter(spans)
    filled = PLACEHOLDER.sub(lambda m: f"[{next(counter)}]", text)
    raw = tokenizer.decode([i for i in out if i not in (c.eos_token_id, c.pad_token_id)])
    return filled, dict(zip(names, spans)), raw


# A held-out line (Julius Caesar, a val play), then the slide's example.
FILL_TEXTS = "Friends, Romans, countrymen, <X> me your ears;|Thank you <X> me to your party <Y> week."


@dataclass
class DemoConfig:
    fill: str = FILL_TEXTS  # texts the run fills at its end ('|' between texts; '' = none)
    fill_tokens: int = 24  # most tokens decoded for each text
    temperature: float = 0.0  # 0 = greedy decoding

    def __post_init__(self):
        require(0 <= self.temperature < math.inf,
                f"--temperature {self.temperature}: must be a number >= 0 (0 = greedy)")
        require(self.fill_tokens >= 1, f"--fill-tokens {self.fill_tokens}: must be at least 1")


def demo(model, tokenizer, cfg, device, seed=1337):
    """Print each text of cfg.fill with its spans filled by the model."""
    texts = [t for t in cfg.fill.split("|") if t.strip()]
    if not texts:
        return
    g = torch.Generator(device=device).manual_seed(seed)
    print("-" * 80)
    for text in texts:
        try:
            filled, _, raw = fill_spans(model, tokenizer, text, cfg.fill_tokens, cfg.temperature, generator=g)
        except UsageError as e:
            print(f"{text}\n  (not filled: {e})")
            continue
        print(f"input : {text}\noutput: {raw!r}\nfilled: {filled}\n")
    print("-" * 80)


class SentencePieceT5Tokenizer:
    """A released T5's vocabulary: spiece.model (32,000 pieces; needs the optional sentencepiece)
    and 100 sentinels above, <extra_id_0> = 32099 counting down, as in transformers' T5Tokenizer."""

    def __init__(self, path, n_extra=100):
        try:
            import sentencepiece
        except ImportError:
            raise UsageError("reading a released T5's vocabulary (spiece.model) needs the optional "
                             "package 'sentencepiece' (pip install sentencepiece)") from None
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        n = self.sp.get_piece_size()
        self.specials = {sentinel(k): n + n_extra - 1 - k for k in range(n_extra)}
        self.specials.update({"<pad>": self.sp.pad_id(), "</s>": self.sp.eos_id()})
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials if s.startswith("<extra")) + ")")
        self.n_vocab = n + n_extra

    def encode(self, text):
        ids = []
        for part in self._split.split(text):
            ids += [self.specials[part]] if part in self.specials else (self.sp.encode(part) if part else [])
        return ids

    def decode(self, ids):
        names = {i: s for s, i in self.specials.items() if s.startswith("<extra")}
        out, run = [], []
        for i in ids:
            if i in names:
                out += [self.sp.decode(run), names[i]]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])


@command
def main(argv=None):
    p = argparse.ArgumentParser(
        description="Fill the spans of a text with a T5: a checkpoint written by train.py (--ckpt, --model t5 or t5lm) "
                    "or a Hugging Face T5ForConditionalGeneration directory (--hf). Mark the spans "
                    "with <X>, <Y>, ... as the slide does.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="path to ckpt.pt (e.g. out/t5/ckpt.pt)")
    src.add_argument("--hf", help="a T5ForConditionalGeneration directory with its spiece.model "
                                  "(needs sentencepiece)")
    p.add_argument("text", help='e.g. "Thank you <X> me to your party <Y> week."')
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    require(args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    require(0 <= args.temperature < math.inf, f"--temperature {args.temperature}: must be a number >= 0 (0 = greedy)")
    require(args.top_k is None or args.top_k >= 1, f"--top-k {args.top_k}: must be at least 1")
    import train  # the checkpoint format and the device check, shared by every model

    device = train.pick_device(args.device)
    if args.ckpt:
        # t5lm.py's one stack fills spans too (T5LM.write_targets)
        model, tokenizer, _ = train.load_for_inference(args.ckpt, device=device, flag="--ckpt", model=("t5", "t5lm"))
    else:
        tokenizer = SentencePieceT5Tokenizer(os.path.join(args.hf, "spiece.model"))
        try:
            model = T5.from_pretrained(args.hf, inputs_length=100_000).to(device).eval()
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"--hf {args.hf}: {e}") from None
    g = torch.Generator(device=device).manual_seed(args.seed)
    filled, fills, raw = fill_spans(model, tokenizer, args.text, args.max_new_tokens,
                                    args.temperature, args.top_k, g)
    print(f"decoded: {raw!r}")
    for name, text in fills.items():
        print(f"{name} = {text!r}")
    print(filled)


if __name__ == "__main__":
    main()
