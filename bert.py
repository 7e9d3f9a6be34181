"""
BERT, a bidirectional Transformer encoder pretrained by masked LM, and its family's objectives.

Papers
  - Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding".
    The model (§3, Fig. 2: token + segment + position embeddings). Masked LM with the 80/10/10 rule
    (§3.1 Task #1, App. C.2). Next sentence prediction (§3.1 Task #2). The recipe (App. A.2).
  - Liu et al. 2019, "RoBERTa" §4.1 (dynamic masking), §4.2 (FULL-SENTENCES packing without NSP).
  - Joshi et al. 2020, "SpanBERT" §3.1 (span masking: lengths ~ Geo(0.2) clipped at 10 words),
    §3.2 (span boundary objective), §3.3 (single segments, no NSP).
  - Lan et al. 2020, "ALBERT" §3.1: factorized embeddings, cross-layer parameter sharing,
    sentence-order prediction.
  - Turc et al. 2019, "Well-Read Students Learn Better": small BERTs (Tiny 2/128 ... Medium 8/512).
  - Vaswani et al. 2017 §3.2.1: scaled dot-product attention softmax(QK^T / sqrt(d_k)) V.
  Slides (lecture 001): "BERT", "Masked language models (MLMs)" (the "my dog is [MASK]" example),
  "RoBERTa" (dynamic masking, no NSP), "SpanBERT" (mask out spans),
  "ALBERT" (factorized embeddings, cross-layer sharing), "Bidirectional encoder models",
  "Transformers for pretraining: encoder only". ELECTRA ("Discriminative training") is electra.py,
  built from this file's encoder.

Faithful to Google's released BERT (github.com/google-research/bert, modeling.py).
Hence also to Hugging Face's BertForPreTraining, the oracle of tests/test_bert.py:
post-LayerNorm blocks (eps 1e-12), GELU in its exact erf form, learned absolute positions plus
token-type (segment) embeddings summed with the word embeddings, then normalised.
On top: a pooler (tanh dense on [CLS]); an MLM head (dense + GELU + LayerNorm, then the transposed
word embeddings plus a bias of its own); an NSP head on the pooled output (label 0 = IsNext).

Run
  python train.py --model bert                    # char BERT (MLM + NSP), Shakespeare, CPU, minutes
  python train.py --model bert --objective mlm    # RoBERTa: dynamic masking, full sentences, no NSP
  python train.py --model bert --objective span --span-boundary  # SpanBERT
  python train.py --model bert --objective sop    # ALBERT's sentence-order prediction
  # fill the masks, from a checkpoint or from a released model with its vocab.txt:
  python bert.py --ckpt out/bert/ckpt.pt "I come to bury Caesar, n[MASK]t to praise him."
  python bert.py --hf path/to/bert-base-uncased "my dog is [MASK]."

Legend
  B batch size, T sequence length, C hidden_size, E embedding_size (= C except ALBERT/ELECTRA),
  H heads, hs = C // H head size, V vocabulary size, L layers, N masked positions in a batch.
  input_ids, token_type_ids, attention_mask: (B, T). attention_mask 1 = real token, 0 = padding.
"""

import argparse
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UsageError, command, require
from hf_io import copy_weights, read_hf_dir, write_hf_dir

# ----------------------------------------------------------------------------------------------------------------------
# Config and presets

OBJECTIVES = ("mlm+nsp", "mlm", "span", "sop")


@dataclass
class BertConfig:
    vocab_size: int = 30522  # V: BERT's WordPiece vocabulary (train.py sets it from its tokenizer)
    hidden_size: int = 256  # C: width of every layer
    num_hidden_layers: int = 4  # L: Transformer layers
    num_attention_heads: int = 4  # H: heads per layer, each of size hidden_size / H
    intermediate_size: int = 1024  # feed-forward inner width (4C in every released BERT)
    max_position_embeddings: int = 512  # rows of the learned position table: the longest input
    type_vocab_size: int = 2  # segment (token type) embeddings: 0 = [CLS] A [SEP], 1 = B [SEP]
    embedding_size: int = 0  # E: embedding width; 0 = C (BERT). ALBERT's factorization: E < C
    share_layers: bool = False  # ALBERT's cross-layer sharing: one layer's weights, used L times
    hidden_dropout_prob: float = 0.1  # on embeddings and each sub-layer's output, as released
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention probabilities
    layer_norm_eps: float = 1e-12  # BERT's; every released checkpoint's LayerNorm uses it
    attn: str = "sdpa"  # naive: softmax(QK^T/sqrt(hs))V by hand | sdpa: fused kernel. Tested equal.
    objective: str = "mlm+nsp"  # mlm+nsp (BERT) | mlm (RoBERTa) | span (SpanBERT) | sop (ALBERT)
    max_seq_length: int = 128  # tokens per row, [CLS] and [SEP]s included; shorter rows padded
    mask_prob: float = 0.15  # share of a row's text tokens chosen for prediction (BERT §3.1)
    mask_token_prob: float = 0.8  # of the chosen: replaced by [MASK] ...
    random_token_prob: float = 0.1  # ... by a random token; the rest (0.1) stay unchanged
    short_seq_prob: float = 0.1  # mlm+nsp, sop: probability of a random shorter pair (as in BERT)
    span_p: float = 0.2  # span: span lengths in words ~ Geometric(span_p) ...
    span_max: int = 10  # ... clipped (renormalised) at span_max words: mean 3.8 (SpanBERT §3.1)
    span_boundary: bool = False  # span: add SpanBERT's span-boundary objective (SBO) to MLM
    static_masks: int = 0  # 0: dynamic masking (RoBERTa). K: BERT's static data, K masked copies of each row
    doc_sentences: bool = False  # mlm, span: RoBERTa's DOC-SENTENCES, a row never crosses into the next document
    pad_token_id: int = 0  # [PAD] (train.py sets the [SPECIAL] ids from the tokenizer)
    mask_token_id: int = -1  # [MASK]
    cls_token_id: int = -1  # [CLS]
    sep_token_id: int = -1  # [SEP]

    def __post_init__(self):
        L, H, C = self.num_hidden_layers, self.num_attention_heads, self.hidden_size
        require(L >= 1, f"--num-hidden-layers {L}: must be at least 1")
        require(H >= 1, f"--num-attention-heads {H}: must be at least 1")
        require(C % H == 0, f"--hidden-size {C}: must be divisible by --num-attention-heads {H}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            require(0 <= p < 1, f"--{name.replace('_', '-')} {p}: must be in [0, 1)")
        require(self.attn in ("naive", "sdpa"), f"--attn {self.attn!r}: must be naive or sdpa")
        require(self.objective in OBJECTIVES,
                f"unknown --objective {self.objective!r}; choose from: {', '.join(OBJECTIVES)}")
        require(not self.span_boundary or self.objective == "span",
                "--span-boundary is SpanBERT's objective: it needs --objective span")
        require(4 <= self.max_seq_length <= self.max_position_embeddings,
                f"--max-seq-length {self.max_seq_length}: must be at least 4 and at most "
                f"--max-position-embeddings {self.max_position_embeddings} "
                "(the rows of the position table)")
        require(0 < self.mask_prob < 1 and self.mask_token_prob >= 0 and self.random_token_prob >= 0
                and self.mask_token_prob + self.random_token_prob <= 1,
                "masking rates: need 0 < --mask-prob < 1 and "
                "--mask-token-prob + --random-token-prob <= 1")
        require(self.static_masks >= 0, f"--static-masks {self.static_masks}: 0 (dynamic) or the copies per row")
        require(not self.doc_sentences or self.objective in ("mlm", "span"),
                "--doc-sentences packs full lines: it needs --objective mlm or span")
        require(0 < self.span_p <= 1 and self.span_max >= 1,
                "span masking: need 0 < --span-p <= 1 and --span-max >= 1")

    @property
    def emb_size(self):
        """E, the embedding width actually used."""
        return self.embedding_size or self.hidden_size


Config = BertConfig

# A preset sets model sizes and, where a recipe goes with them, training settings.
# train.py applies each key to the config that declares it.
# BERT's recipe (Devlin et al. App. A.2): batch 256 sequences, 1M steps, Adam lr 1e-4, beta2 0.999,
# epsilon 1e-6, weight decay 0.01, 10k warm-up steps then linear decay, dropout 0.1,
# sequence length 128 for 90% of the steps and 512 for the rest.
# Vocabulary: BPE to 30,518 ids (with <|endoftext|>) + [CLS] [SEP] [MASK] [PAD] = BERT's 30,522.
_BERT_RECIPE = dict(objective="mlm+nsp", tokenizer="bpe", vocab_size=30518,
                    max_position_embeddings=512, max_seq_length=128, hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, lr=1e-4, min_lr=0.0, schedule="linear",
                    warmup_iters=10_000, max_iters=1_000_000, weight_decay=0.01, beta2=0.999,
                    adam_eps=1e-6, grad_clip=1.0, batch_size=64, tokens_per_step=256 * 128,
                    eval_interval=10_000)


def _size(layers, hidden):  # Turc et al.: L layers, H = hidden, A = H / 64 heads, FFN 4H
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 64,
                intermediate_size=4 * hidden)


PRESETS = {
    # The quick start (README path 7): a char-level BERT learns Shakespeare with MLM + NSP,
    # on a laptop CPU, in a few minutes. Sentence pairs are runs of the plays' lines.
    # Dropout 0: a short run never sees a token twice. lr 1e-3, warm-up 100, decaying to 1e-4.
    # Not tuned further (BERT's 1e-4 is tuned for 1M steps at batch 256).
    "char-cpu": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=128, max_seq_length=128,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn="naive",
                     tokenizer="char", batch_size=32, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                     max_iters=2000, eval_interval=500, eval_tokens=131072, weight_decay=0.01,
                     beta2=0.99),
    # The smallest thing that still is a BERT: for tests and for trying flags in seconds.
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, max_seq_length=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, batch_size=8, max_iters=20, warmup_iters=5,
                 eval_interval=10, eval_tokens=4096, lr=1e-3, fill_text="lend me your [MASK]ars"),
    # The small BERTs of Turc et al. 2019 (released as google/bert_uncased_L-{L}_H-{H}_A-{H/64}).
    # Their release notes: the standard BERT recipe. These run it (phase 1, length 128).
    "bert-tiny": dict(_BERT_RECIPE, **_size(2, 128)),
    "bert-mini": dict(_BERT_RECIPE, **_size(4, 256)),
    "bert-small": dict(_BERT_RECIPE, **_size(4, 512)),
    "bert-medium": dict(_BERT_RECIPE, **_size(8, 512)),
    # BERT-base (110M) with the original recipe. Phase 1: length 128 for the first 900k of 1M steps.
    # The linear decay spans the full 1M: phase 1 ends at lr 1e-4 * (1 - 890k/990k) = 1.01e-5.
    # Phase 2: the last 100k steps at length 512 (256 x 512 tokens per step), decaying on to 0.
    # Like BERT's run_pretraining.py --init_checkpoint: weights carry over, optimizer starts afresh:
    #   python train.py --model bert --preset bert-base --init-from out/bert-base/ckpt.pt
    #     --out-dir out/bert-base-512 --max-seq-length 512 --batch-size 16 --tokens-per-step 131072
    #     --max-iters 100000 --lr-decay-iters 100000 --warmup-iters 0 --lr 1.0101e-5
    # (--resume cannot: a resumed run refuses a model setting that differs from its checkpoint's.)
    "bert-base": dict(_BERT_RECIPE, **_size(12, 768), max_iters=900_000,
                      lr_decay_iters=1_000_000, out_dir="out/bert-base"),
}
DEFAULT_PRESET = "char-cpu"

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")  # added above the ordinary ids (data.py)
TOKEN_IDS = {"pad_token_id": "[PAD]", "mask_token_id": "[MASK]", "cls_token_id": "[CLS]",
             "sep_token_id": "[SEP]"}

# ----------------------------------------------------------------------------------------------------------------------
# Building blocks (slide "BERT": a Transformer encoder. Input representation: Devlin et al. Fig. 2)


class Embeddings(nn.Module):
    """Word + learned absolute position + token type (segment A/B), summed; LayerNorm; dropout.
    (B, T) -> (B, T, E) (Devlin et al. Fig. 2). ALBERT and ELECTRA make E < C and project up."""

    def __init__(self, config):
        super().__init__()
        E = config.emb_size
        self.word_embeddings = nn.Embedding(config.vocab_size, E)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, E)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, E)
        self.LayerNorm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids=None):
        """position_ids (B, T): each token's own position (maelm.py's encoder reads a row with
        gaps); None: 0..T-1."""
        T, rows = input_ids.size(1), self.position_embeddings.num_embeddings
        if T > rows:
            raise ValueError(f"sequence of {T} tokens is longer than "
                             f"max_position_embeddings={rows} (the learned position "
                             f"table has no more rows)")
        pos = torch.arange(T, device=input_ids.device) if position_ids is None else position_ids  # (T,) or (B, T)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(pos)
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(x))  # (B, T, E)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the whole sequence, both directions (no causal mask:
    slide "Bidirectional encoder models"). Padding keys are masked out.
    BERT's names: query, key, value, then dense mixes the heads."""

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.n_head, self.attn = config.num_attention_heads, config.attn
        self.dropout_p = config.attention_probs_dropout_prob
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.dense = nn.Linear(C, C)
        self.attn_dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, x, keep):
        """x (B, T, C) -> (B, T, C). keep: None, or (B, 1, 1, T) bool: True at real-token keys."""
        B, T, C = x.size()
        # (B, T, C) -> (B, H, T, hs): every head attends independently over its own hs-dim slice
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        if self.attn == "naive":
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T) scaled
            if keep is not None:
                att = att.masked_fill(~keep, float("-inf"))  # no query looks at padding
            att = self.attn_dropout(F.softmax(att, dim=-1))  # each row: a distribution on real keys
            y = att @ v  # (B, H, T, hs)
        else:  # the same maths in one kernel; attn_mask True means "may attend", like `keep`
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                               dropout_p=self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.dense(y)


class Layer(nn.Module):
    """Post-LN Transformer layer (Vaswani et al., BERT): x = LN(x + attn(x)); x = LN(x + FFN(x)).
    Trap: GPT-2 moved LayerNorm before each sub-layer (pre-LN). BERT normalises after the residual
    sum: the stream itself is normalised. BERT weights in a pre-LN block run, and give garbage."""

    def __init__(self, config):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(C, eps=eps)
        self.intermediate = nn.Linear(C, config.intermediate_size)
        # Trap: which GELU. The released checkpoints were trained with Google's modeling.py as first
        # published: the exact erf form x * Phi(x) (nn.GELU's default; Hugging Face's "gelu", the name
        # the released configs give). Later versions of modeling.py compute the tanh approximation,
        # GPT-2's. The parity test fails with tanh.
        self.gelu = nn.GELU()
        self.output = nn.Linear(config.intermediate_size, C)
        self.output_norm = nn.LayerNorm(C, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, keep):
        x = self.attention_norm(x + self.dropout(self.attention(x, keep)))
        return self.output_norm(x + self.dropout(self.output(self.gelu(self.intermediate(x)))))


class Encoder(nn.Module):
    """Embeddings -> (projection E -> C when E != C) -> L layers: (B, T) ids -> (B, T, C) states.
    ALBERT's cross-layer sharing (slide "ALBERT"): one Layer applied num_hidden_layers times.
    Parameters do not grow with depth; compute does. electra.py builds its generator and
    discriminator from this class, both with the same `embeddings` (ELECTRA §3.2 shares them)."""

    def __init__(self, config, embeddings=None):
        super().__init__()
        self.config = config
        self.embeddings = embeddings if embeddings is not None else Embeddings(config)
        if config.emb_size != config.hidden_size:
            # ALBERT §3.1 "factorized embedding parameterization": V x E + E x C, not V x C.
            # The name is ELECTRA's (ALBERT calls it embedding_hidden_mapping_in).
            self.embeddings_project = nn.Linear(config.emb_size, config.hidden_size)
        n_distinct = 1 if config.share_layers else config.num_hidden_layers
        self.layer = nn.ModuleList([Layer(config) for _ in range(n_distinct)])

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # one segment: every token is sentence A
        if attention_mask is None:
            keep = None
        elif attention_mask.dim() == 3:  # (B, T, T): which keys each query may read (unilm.py's masks)
            keep = attention_mask.bool()[:, None]  # (B, 1, T, T)
        else:  # (B, T): real tokens, which every query may read
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, E)
        if hasattr(self, "embeddings_project"):
            x = self.embeddings_project(x)  # (B, T, C)
        for i in range(self.config.num_hidden_layers):
            x = self.layer[i % len(self.layer)](x, keep)  # shared: the same module every time
        return x


class MLMHead(nn.Module):
    """Masked-LM head: dense C -> E, GELU, LayerNorm, then the transposed word embedding matrix
    (E -> V) plus an output bias of its own. BERT's cls.predictions; ELECTRA's generator head is the
    same. The decoder is tied (Press & Wolf 2017, as in BERT): it IS the input embedding matrix,
    passed in at every call. One tensor, two uses, no copy that could drift."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.emb_size)
        self.gelu = nn.GELU()
        self.LayerNorm = nn.LayerNorm(config.emb_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h, word_embeddings):
        """h (..., C), word_embeddings (V, E) -> logits (..., V)."""
        return self.LayerNorm(self.gelu(self.dense(h))) @ word_embeddings.t() + self.bias


class SpanBoundaryHead(nn.Module):
    """SpanBERT §3.2: predict each token x_i of a masked span (x_s .. x_e) from the two tokens just
    outside it and x_i's position in the span: y_i = f(x_{s-1}, x_{e+1}, p_{i-s+1}).
    f = two layers of Linear, GELU, LayerNorm, scored against the tied word embeddings + own bias.
    Span-level meaning thus collects at the boundaries, where span selection (QA) reads it."""

    def __init__(self, config):
        super().__init__()
        C, E, eps = config.hidden_size, config.emb_size, config.layer_norm_eps
        # p_1, p_2, ...: the offset in the span
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, C)
        self.dense1, self.norm1 = nn.Linear(3 * C, C), nn.LayerNorm(C, eps=eps)
        self.dense2, self.norm2 = nn.Linear(C, E), nn.LayerNorm(E, eps=eps)
        self.gelu = nn.GELU()
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, left, right, offset, word_embeddings):
        """left, right (N, C): hidden states of x_{s-1} and x_{e+1}. offset (N,) = i - s.
        word_embeddings (V, E). Returns (N, V) logits."""
        h = torch.cat([left, right, self.position_embeddings(offset)], dim=-1)  # (N, 3C)
        h = self.norm1(self.gelu(self.dense1(h)))  # (N, C)
        h = self.norm2(self.gelu(self.dense2(h)))  # (N, E)
        return h @ word_embeddings.t() + self.bias


def init_bert_weights(module):
    """BERT's initialisation as Hugging Face's BertPreTrainedModel does it (initializer_range 0.02):
    every weight matrix and embedding ~ N(0, 0.02), biases 0, LayerNorm gain 1 and bias 0. Google's
    modeling.py draws a truncated normal instead (create_initializer: cut at 2 std, so its spread is
    0.88 x 0.02); we keep Hugging Face's, which ELECTRA's generator and discriminator share (errata)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------------
# The model


class BERT(nn.Module):
    """The encoder, BERT's two pretraining heads, and SpanBERT's boundary head if span_boundary."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        # tanh(W h_[CLS] + b): the sequence summary
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlm = MLMHead(config)
        self.nsp = nn.Linear(config.hidden_size, 2)  # 0 = IsNext (B follows A), 1 = NotNext
        if config.span_boundary:
            self.sbo = SpanBoundaryHead(config)
        self.apply(init_bert_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, masked_positions=None,
                spans=None):
        """-> (mlm_logits, nsp_logits): (B, T, V) and (B, 2).

        masked_positions (B, T) bool: MLM logits only there, (N, V) in row-major order, as BERT's
        training code gathers them (V logits everywhere would be wasted on the 85% never scored).
        spans (left, right, offset), each (N,), per masked position: x_{s-1}'s and x_{e+1}'s
        positions and i - s, for the span-boundary objective. Third output: (N, V) SBO logits."""
        h = self.encoder(input_ids, token_type_ids, attention_mask)  # (B, T, C)
        wte = self.encoder.embeddings.word_embeddings.weight  # (V, E): also the MLM decoder (tied)
        pooled = torch.tanh(self.pooler(h[:, 0]))  # (B, C): from the hidden state of [CLS]
        nsp_logits = self.nsp(pooled)  # (B, 2)
        if masked_positions is None:
            return self.mlm(h, wte), nsp_logits
        mlm_logits = self.mlm(h[masked_positions], wte)  # (N, V)
        if spans is None:
            return mlm_logits, nsp_logits
        rows = masked_positions.nonzero()[:, 0]  # (N,) the row of each masked position
        left, right, offset = spans
        return mlm_logits, nsp_logits, self.sbo(h[rows, left], h[rows, right], offset, wte)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied and shared weights count once

    def no_weight_decay(self):
        """None beyond biases and LayerNorm gains (train.py skips them by shape). BERT's
        AdamWeightDecayOptimizer excludes only LayerNorm and bias: all embedding tables decay."""
        return set()

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward). 6 per weight every token passes
        (Kaplan et al. 2020, eq. 2.1; a shared layer counts once per use). Attention scores and
        mixing: 12 * L * T * C (PaLM App. B). The MLM head runs on mask_prob of the tokens only."""
        c = self.config
        per_layer = sum(p.numel() for p in self.encoder.layer[0].parameters())
        dense = per_layer * c.num_hidden_layers + (c.emb_size * c.hidden_size if c.emb_size != c.hidden_size else 0)
        head = c.hidden_size * c.emb_size + c.emb_size * c.vocab_size
        return (6 * dense + 6 * c.mask_prob * head
                + 12 * c.num_hidden_layers * c.max_seq_length * c.hidden_size)

    # ------------------------------------------------------------------------------------------------------------------
    # Hugging Face format: BertForPreTraining (Google's and Turc et al.'s released BERTs).

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a BertForPreTraining directory without transformers (config.json + model.safetensors
        or pytorch_model.bin). overrides: shape-keeping BertConfig fields (attn="naive", ...)."""
        hf, sd = read_bert_dir(path)
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {hf['model_type']!r}, not bert")
        fields = config_from_hf(hf, path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                **overrides)
        model = cls(BertConfig(**fields))
        if "cls.predictions.bias" not in sd and "cls.predictions.decoder.bias" in sd:
            # older uploads keep the bias there
            sd["cls.predictions.bias"] = sd["cls.predictions.decoder.bias"]
        # the format has no SBO head: it keeps its init
        copy_weights(model, sd, path, name=hf_name, skip=("sbo.",))
        return model

    def export_hf(self, path):
        """Write a directory that transformers' BertForPreTraining.from_pretrained(path) loads, same
        logits. The format has no span-boundary head (pretraining only; SpanBERT omits it too)."""
        c = self.config
        if c.share_layers or c.emb_size != c.hidden_size:
            raise ValueError("export_hf: BertForPreTraining has neither ALBERT's shared layers nor "
                             "a factorized embedding (share_layers / embedding_size); "
                             "this model uses them")
        sd = {hf_name(k): v.float() for k, v in self.named_parameters() if not k.startswith("sbo.")}
        write_hf_dir(path, hf_encoder_config(c, "BertForPreTraining", "bert"), sd)


Model = BERT

# Our names -> released ones. In a layer (prefix "bert.encoder.layer.{i}."): BertLayer's modules.
HF_LAYER = {
    "attention.query": "attention.self.query", "attention.key": "attention.self.key",
    "attention.value": "attention.self.value", "attention.dense": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
    "output": "output.dense", "output_norm": "output.LayerNorm",
}
HF_HEADS = {"pooler.": "bert.pooler.dense.", "mlm.dense.": "cls.predictions.transform.dense.",
            "mlm.LayerNorm.": "cls.predictions.transform.LayerNorm.",
            "mlm.bias": "cls.predictions.bias", "nsp.": "cls.seq_relationship."}


def hf_name(name, prefix="bert.", heads=HF_HEADS):
    """Our parameter name -> the released checkpoint's. BertForPreTraining's, or ElectraFor*'s with
    prefix "electra." and ELECTRA's heads. Encoder names gain the prefix (and BertLayer's module
    names); heads are looked up.
    hf_name("encoder.layer.0.attention_norm.weight") -> "bert.encoder.layer.0.attention.output.LayerNorm.weight"
    hf_name("mlm.bias") -> "cls.predictions.bias" """
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        i, module, param = m.groups()
        return f"{prefix}encoder.layer.{i}.{HF_LAYER[module]}.{param}"
    if name.startswith("encoder."):  # embeddings.*, embeddings_project.*: same names, prefixed
        return prefix + name.removeprefix("encoder.")
    ours = next((k for k in heads if name.startswith(k)), "")
    return heads.get(ours, "") + name.removeprefix(ours)


def read_bert_dir(path):
    """hf_io.read_hf_dir; older uploads' TensorFlow names LayerNorm.gamma/beta become weight/bias.
    "bert.embeddings.LayerNorm.gamma" -> "bert.embeddings.LayerNorm.weight"
    (a file holding both keeps its weight)"""
    hf, sd = read_hf_dir(path)
    old = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
    renamed = {re.sub(r"LayerNorm\.(gamma|beta)$", lambda m: old[m.group(0)], k): v
               for k, v in sd.items()}
    return hf, {**renamed, **sd}  # a modern name present in the file wins


# The config.json fields that are ours under the same name: required ones, then ones with a default.
HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings")
HF_OPTIONAL = dict(type_vocab_size=2, layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
                   attention_probs_dropout_prob=0.1)


def config_from_hf(hf, path, **overrides):
    """Our config fields from a transformers config.json (BERT's or ELECTRA's).
    Refuses a model we do not compute."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: activation {hf['hidden_act']!r} is not BERT's exact (erf) GELU")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: position_embedding_type {hf['position_embedding_type']!r}; "
                         f"only BERT's learned absolute positions are implemented")
    fields = {**{k: hf[k] for k in HF_REQUIRED}, **{k: hf.get(k, v) for k, v in HF_OPTIONAL.items()}}
    fields.update(pad_token_id=hf.get("pad_token_id") or 0, max_seq_length=min(128, hf["max_position_embeddings"]))
    return {**fields, **overrides}


def hf_encoder_config(c, architecture, model_type):
    """The config.json fields every BERT-family export shares."""
    return dict(architectures=[architecture], model_type=model_type,
                **{k: getattr(c, k) for k in HF_REQUIRED},
                **{k: getattr(c, k) for k in HF_OPTIONAL},
                hidden_act="gelu", initializer_range=0.02, pad_token_id=max(0, c.pad_token_id),
                position_embedding_type="absolute", tie_word_embeddings=True)


# ----------------------------------------------------------------------------------------------------------------------
# The data: sentence pairs and packed rows, cut from the corpus's documents and lines (slides
# "Masked language models", "RoBERTa", "SpanBERT", "ALBERT"). A "sentence" is, as in BERT §3.1, any
# span of contiguous text; here, a run of the corpus's lines (the plays' verse lines). Every random
# choice draws from the `generator` the loop passes in: a resumed run draws the same rows and masks.


class SplitIndex:
    """Where the lines and documents of one data.Split are. <|endoftext|> sits between documents
    as a one-token line (data.py). Dropped here, it never lands inside a segment as text: a document
    boundary is a boundary. A document's lines are consecutive: a run of lines is one slice."""

    def __init__(self, split, eot_id):
        self.tokens = split.tokens
        starts = np.asarray(split.line_starts, dtype=np.int64)
        ends = np.append(starts[1:], len(split.tokens)).astype(np.int64)
        eot = (ends - starts == 1) & (np.asarray(split.tokens[starts], dtype=np.int64) == eot_id)
        self.starts, self.ends = starts[~eot], ends[~eot]  # line i is tokens[starts[i]:ends[i]]
        self.n_lines = len(self.starts)
        doc_starts = np.asarray(split.doc_starts, dtype=np.int64)
        # (n_lines,) the document of each line
        self.doc = np.searchsorted(doc_starts, self.starts, side="right") - 1
        self.docs = np.unique(self.doc)  # the documents that have text in this split
        self.doc_first = np.searchsorted(self.doc, self.docs, side="left")  # first line of each
        self.doc_end = np.searchsorted(self.doc, self.docs, side="right")  # one past its last line
        self.cum = np.concatenate([[0], np.cumsum(self.ends - self.starts)])  # tokens before line i

    def doc_index(self, line):
        """Index into self.docs of the document that holds `line`."""
        return int(np.searchsorted(self.docs, self.doc[line]))

    def run(self, i, budget):
        """(i, j): lines i..j-1, until they hold at least `budget` tokens or the document ends.
        The line crossing the budget is included, as in BERT's create_pretraining_data; truncation
        trims it later. With lines of 40, 30, 50 tokens in one document: run(0, 60) -> (0, 2)."""
        end = self.doc_end[self.doc_index(i)]
        j = int(np.searchsorted(self.cum, self.cum[i] + budget, side="left"))
        return i, int(min(max(j, i + 1), end))

    def text(self, i, j):
        """Token ids of lines i..j-1 (one document): a 1-D int64 array."""
        return np.asarray(self.tokens[self.starts[i]:self.ends[j - 1]], dtype=np.int64)


def truncate_pair(a, b, max_tokens, generator):
    """BERT's truncate_seq_pair: while the pair is too long, drop a token from the longer side (B on
    a tie), from its front or back at random (so neither end is always the one cut). -> new (a, b).
    truncate_pair(list(range(5)), [9, 9], 5, g) -> ([0, 1, 2], [9, 9]) if both draws say "back"."""
    excess = len(a) + len(b) - max_tokens
    if excess <= 0:
        return a, b
    a_lo, a_hi, b_lo, b_hi = 0, len(a), 0, len(b)
    for front in (torch.rand(excess, generator=generator) < 0.5).tolist():
        if a_hi - a_lo > b_hi - b_lo:
            a_lo, a_hi = (a_lo + 1, a_hi) if front else (a_lo, a_hi - 1)
        else:
            b_lo, b_hi = (b_lo + 1, b_hi) if front else (b_lo, b_hi - 1)
    return a[a_lo:a_hi], b[b_lo:b_hi]


def merge_spans(spans):
    """SpanBERT's merge_intervals on half-open (start, end) spans: sorted, and any two that overlap
    or touch become one. merge_spans([(5, 7), (0, 2), (2, 3), (6, 9)]) -> [(0, 3), (5, 9)]"""
    merged = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def rounded_share(n_tokens, p):
    """BERT's count of masked positions (create_masked_lm_predictions): round(p x n), at least 1.
    ELECTRA's pretrain_helpers.mask counts the same way. rounded_share(tensor([3, 128]), 0.15) -> tensor([1, 19])"""
    return (n_tokens.double() * p).round().long().clamp(min=1)


def span_length_law(p, max_len):
    """P(length = 1..max_len) of SpanBERT's span lengths: Geometric(p) on 1..max_len, renormalised.
    span_length_law(0.2, 10) -> tensor([0.224, 0.179, 0.143, ...]), mean 3.8 (SpanBERT §3.1)."""
    law = torch.tensor([p * (1 - p) ** (n - 1) for n in range(1, max_len + 1)], dtype=torch.float64)
    return law / law.sum()


EVAL_SEED = 1234  # evaluation's masks and pairs (its own generator: training is untouched)
STATIC_SEED = 12345  # --static-masks: the seed of BERT's create_pretraining_data.py (its random_seed flag)


class PretrainingObjective:
    """BERT's objectives, each a value of config.objective (train.py's Objective interface):

      mlm+nsp  BERT (Devlin et al. §3.1): [CLS] A [SEP] B [SEP] from one document. B continues A
               half the time, else from another document. Masked LM + next-sentence prediction.
      mlm      RoBERTa (Liu et al. §4.1-4.2): full lines packed into [CLS] ... [SEP] up to the row
               length, across documents (an extra [SEP] marks a boundary). Masked LM only.
      span     SpanBERT (Joshi et al. §3): rows as mlm; whole-word spans masked; optional SBO loss.
      sop      ALBERT (Lan et al. §3.1): two consecutive segments, swapped in half the rows;
               sentence-order prediction.

    Masking is dynamic (RoBERTa §4.1): drawn with the row, so the same text gets a new mask every
    time; --static-masks K is the static baseline of RoBERTa's Table 1 (train_batch). Special tokens
    are never chosen. Labels are -100 except at the chosen positions.
    """

    def __init__(self, config, tokenizer):
        self.config = c = config
        self.kind = c.objective
        self.pairs = c.objective in ("mlm+nsp", "sop")
        self.cls_id, self.sep_id = c.cls_token_id, c.sep_token_id
        self.mask_id, self.pad_id = c.mask_token_id, c.pad_token_id
        self.eot_id = tokenizer.eot_id
        special = torch.zeros(c.vocab_size, dtype=torch.bool)
        special[list(tokenizer.specials.values())] = True
        self.special = special  # (V,) never chosen
        self.ordinary = (~special).nonzero()[:, 0]  # (V_o,) the ids that are not special
        # The 10% random tokens. BERT's and ALBERT's create_masked_lm_predictions draw from the whole
        # vocab.txt, [CLS] [SEP] [MASK] included; RoBERTa (fairseq's MaskTokensDataset), SpanBERT and
        # ELECTRA's generator never put a special token there.
        self.replacements = torch.arange(c.vocab_size) if self.pairs else self.ordinary
        self.raw_tokens_per_row = self.tokens_per_row = c.max_seq_length
        if self.kind == "span":
            # A token starts a word if special or if its text starts with whitespace (" the" in BPE,
            # " " for characters). SpanBERT counts spans in words; no masked span ends mid-word.
            starts = [True if special[i] else tokenizer.decode([i])[:1].isspace()
                      for i in range(c.vocab_size)]
            self.word_start = torch.tensor(starts)
            self.span_law = span_length_law(c.span_p, c.span_max)
        self._index = (None, None)

    def index(self, split):
        if self._index[0] is not split:
            self._index = (split, SplitIndex(split, self.eot_id))
        return self._index[1]

    # --- sentence pairs (mlm+nsp, sop) ---

    def _pair(self, ix, i, g, training):
        """One pair from line i: (a, b, label, line where the next pair may start).
        None if the text from line i is a single token (no pair can be cut from it)."""
        c = self.config
        max_tokens = c.max_seq_length - 3  # room for [CLS] A [SEP] B [SEP]
        r = torch.rand(2, generator=g).tolist()
        target = max_tokens
        if r[0] < c.short_seq_prob:  # BERT: short inputs at fine-tuning are then no surprise
            target = int(torch.randint(2, max_tokens + 1, (1,), generator=g))
        i, j = ix.run(i, target)
        text = ix.text(i, j)
        if len(text) < 2:
            return None
        one_line = j - i < 2
        if one_line and self.kind == "sop" and training and len(ix.docs) < 2:
            # no other document to draw B from (ALBERT's corpora always had one): cut the line at a token
            k, cut, one_line = j, int(torch.randint(1, len(text), (1,), generator=g)), False
        elif one_line:  # one line fills the budget: it is A, and B must come from elsewhere (below)
            k, cut = j, len(text)
        else:  # A = lines i..k-1, B = lines k..j-1: split at a random line boundary
            k = int(torch.randint(i + 1, j, (1,), generator=g))
            cut = int(ix.starts[k] - ix.starts[i])
        a, b = text[:cut], text[cut:]
        # BERT's and ALBERT's create_instances_from_document: a chunk of one segment always makes a
        # pair whose B starts in another document (label 1), also for SOP; else 50/50.
        flip, next_line = one_line or r[1] < 0.5, j
        if flip and (one_line or self.kind == "mlm+nsp"):
            other = self._elsewhere(ix, i, j, g, training)
            if other is None:  # only in a small evaluation slice: no segment far enough away
                if one_line:
                    return None
                flip = False  # this row is an IsNext row
            else:
                o, m = ix.run(other[0], max(1, target - len(a)))
                b = ix.text(o, m)
                next_line = k  # B's unused lines start the next pair (BERT puts them back too)
        elif flip:  # sop
            a, b = b, a  # ALBERT: the same two segments in the wrong order, swapped BEFORE truncation
        a, b = truncate_pair(a, b, max_tokens, g)
        return a, b, int(flip), next_line

    def _elsewhere(self, ix, i, j, g, training):
        """A line to start an NSP negative's B at: in another document (BERT). Training needs two
        documents; an evaluation slice may hold one (train.py scores slices of the train split).
        Then: a line at least two rows of tokens from the pair, else any outside it, else None."""
        if len(ix.docs) >= 2:
            d = ix.doc_index(i)
            other = int(torch.randint(len(ix.docs) - 1, (1,), generator=g))
            other += other >= d  # uniform over the other documents
            lo, hi = int(ix.doc_first[other]), int(ix.doc_end[other])
            return int(torch.randint(lo, hi, (1,), generator=g)), other
        require(not training, f"--objective {self.kind}: next-sentence prediction draws its "
                f"negatives from another document, and the training split has only one; give "
                f"--data a directory with several .txt files, or use --objective mlm or sop")
        gap = 2 * self.config.max_seq_length
        near_lo = int(np.searchsorted(ix.cum, ix.cum[i] - gap, side="right"))
        near_hi = int(np.searchsorted(ix.cum, ix.cum[j] + gap, side="left"))
        for lo, hi in ((near_lo, near_hi), (i, j)):
            n_out = lo + (ix.n_lines - hi)
            if n_out > 0:
                pick = int(torch.randint(n_out, (1,), generator=g))
                return (pick if pick < lo else hi + pick - lo), None
        return None

    def _pair_rows(self, ix, starts, g, training):
        rows = []
        for i in starts:
            pair = None
            while pair is None:
                pair = self._pair(ix, i, g, training)
                i = int(torch.randint(ix.n_lines, (1,), generator=g)) if pair is None else i
            rows.append(pair[:3])
        return rows

    # --- packed rows (mlm, span) ---

    def _packed(self, ix, line, offset=0):
        """RoBERTa's FULL-SENTENCES: whole lines from `line` on, packed until the next would not fit
        in max_seq_length - 2 tokens. Crossing into the next document puts a [SEP] between them;
        DOC-SENTENCES (--doc-sentences) ends the row there instead, shorter (RoBERTa grew its batch to
        make up the tokens; we pad). An over-long line is cut.
        -> (ids, next line, offset in it): where the next row resumes."""
        budget, parts, n, prev = self.config.max_seq_length - 2, [], 0, None
        while line < ix.n_lines:
            sep = int(prev is not None and ix.doc[line] != ix.doc[prev])
            if sep and self.config.doc_sentences:
                break
            s, e = int(ix.starts[line]) + offset, int(ix.ends[line])
            if n + sep + e - s > budget:
                if not parts:  # longer than a row: take what fits; the rest starts the next row
                    return np.asarray(ix.tokens[s:s + budget], dtype=np.int64), line, offset + budget
                break
            if sep:
                parts.append(np.array([self.sep_id]))
            parts.append(np.asarray(ix.tokens[s:e], dtype=np.int64))
            n, prev, line, offset = n + sep + e - s, line, line + 1, 0
        return np.concatenate(parts), line, 0

    # --- masking ---

    def _rows_to_batch(self, rows, g):
        """rows: list of (a, b, label) pairs or of single 1-D arrays -> the padded, masked batch."""
        T, B = self.config.max_seq_length, len(rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((B, T), dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for r, row in enumerate(rows):
            if self.pairs:
                a, b, _ = row
                ids = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]])
                token_type_ids[r, len(a) + 2:len(ids)] = 1  # B and its [SEP] are segment 1
            else:
                ids = np.concatenate([[self.cls_id], row, [self.sep_id]])
            input_ids[r, :len(ids)] = torch.from_numpy(ids.astype(np.int64))
            attention_mask[r, :len(ids)] = 1
        batch = {"input_ids": input_ids, "token_type_ids": token_type_ids,
                 "attention_mask": attention_mask}
        if self.kind == "span":
            batch.update(self._mask_spans(input_ids, attention_mask, g))
        else:
            batch["input_ids"], batch["labels"] = self.mask_tokens(input_ids, attention_mask, g)
        if self.pairs:
            batch["next_sentence_label"] = torch.tensor([row[2] for row in rows], dtype=torch.long)
        return batch

    def candidates(self, input_ids, attention_mask):
        """(B, T) bool, the choosable positions: text tokens, never [CLS] [SEP] [PAD] [MASK] EOT."""
        return attention_mask.bool() & ~self.special[input_ids]

    def mask_count(self, candidates, attention_mask, g):
        """(B,) positions to choose per row, as the paper the objective is named after counts them.
        BERT and ALBERT (create_masked_lm_predictions): round(mask_prob x the row's tokens, [CLS]
        and [SEP] counted), at least 1. RoBERTa (fairseq's MaskTokensDataset): int(mask_prob x n +
        U[0,1)), random and unbiased, here over the n text tokens (fairseq counts <s> and </s>, and
        may choose them). Never more than the candidates. A row of [CLS] + 126 text tokens + [SEP]
        at 0.15: BERT chooses 19; RoBERTa 18 (one time in nine) or 19."""
        p, n = self.config.mask_prob, candidates.sum(1)  # (B,)
        if self.pairs:
            k = rounded_share(attention_mask.sum(1), p)  # (B,)
        else:
            k = (n * p + torch.rand(n.shape, generator=g)).floor().long()  # (B,)
        return torch.minimum(k, n)

    @staticmethod
    def choose(candidates, k, g):
        """(B, T) bool: in each row, k[row] of its candidate positions, uniformly without replacement."""
        # non-candidates sort last
        score = torch.rand(candidates.shape, generator=g).masked_fill(~candidates, 2.0)
        rank = score.argsort(dim=1).argsort(dim=1)  # (B, T): places in a random order of the row
        return rank < k[:, None]

    def mask_tokens(self, input_ids, attention_mask, g):
        """BERT's masked LM (§3.1, slide "Masked language models"): choose mask_prob of the text
        tokens (mask_count). Of those, mask_token_prob become [MASK], random_token_prob a random
        token (self.replacements), the rest stay. The model cannot tell which unmasked tokens it
        will be asked about: it must represent each.
        -> (masked input_ids, labels): the original token if chosen, else -100."""
        candidates = self.candidates(input_ids, attention_mask)
        chosen = self.choose(candidates, self.mask_count(candidates, attention_mask, g), g)
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        u = torch.rand(input_ids.shape, generator=g)
        c = self.config
        to_mask = chosen & (u < c.mask_token_prob)
        to_random = chosen & (u >= c.mask_token_prob) & (u < c.mask_token_prob + c.random_token_prob)
        random_ids = self.replacements[torch.randint(len(self.replacements), input_ids.shape, generator=g)]
        out = torch.where(to_mask, torch.full_like(input_ids, self.mask_id), input_ids)
        return torch.where(to_random, random_ids, out), labels

    def span_lengths(self, n, g):
        """(n,) span lengths in words ~ span_length_law (SpanBERT: Geo(0.2) clipped to 1..10)."""
        return torch.multinomial(self.span_law, n, replacement=True, generator=g) + 1

    def _mask_spans(self, input_ids, attention_mask, g):
        """SpanBERT §3.1, as its masking.py (PairWithSpanMaskingScheme, span_masking): until
        ceil(mask_prob x the row's text tokens) are chosen, draw a length L in words (clipped
        geometric law) and a uniform anchor token not yet chosen; choose the L whole words from
        the anchor's word on (over chosen tokens too), the last one cut at the budget. Then merge
        the spans that overlap or touch (merge_intervals), so every span is bounded by tokens that
        stay visible. The 80/10/10 rule applies per merged span (all [MASK], random, or unchanged).
        Spans never cross a special token (our rows hold [CLS] and [SEP]; SpanBERT masked a bare
        block). Span-boundary targets (sbo_target) only where both boundaries are text, as
        SpanBERT gives none to a span at the block's edge: never [CLS], [SEP] or a masked token."""
        c, (B, T) = self.config, input_ids.shape
        cand = self.candidates(input_ids, attention_mask)
        starts = self.word_start[input_ids] | ~torch.cat([torch.zeros(B, 1, dtype=torch.bool), cand[:, :-1]], 1)
        out, labels = input_ids.clone(), torch.full_like(input_ids, -100)
        left, right, offset = (torch.zeros_like(input_ids) for _ in range(3))
        sbo_target = torch.zeros(B, T, dtype=torch.bool)
        for r in range(B):
            pos = cand[r].nonzero()[:, 0].tolist()
            budget = math.ceil(len(pos) * c.mask_prob)
            cand_r, start_r, masked, spans, total = cand[r].tolist(), starts[r].tolist(), [False] * T, [], 0
            while total < budget:
                lengths = self.span_lengths(32, g).tolist()
                anchors = torch.randint(len(pos), (32,), generator=g).tolist()
                for length, anchor in zip(lengths, anchors):
                    if total >= budget:
                        break
                    s = pos[anchor]
                    if masked[s]:
                        continue  # SpanBERT draws again
                    while not start_r[s]:
                        s -= 1  # back to the start of the anchor's word
                    e, words = s, 0
                    while e < T and cand_r[e] and total < budget:
                        words += e == s or start_r[e]
                        if words > length:
                            break
                        total += not masked[e]
                        masked[e], e = True, e + 1
                    spans.append((s, e))
            spans = merge_spans(spans)
            how = torch.rand(len(spans), generator=g).tolist()
            for (s, e), u in zip(spans, how):
                labels[r, s:e] = input_ids[r, s:e]
                if u < c.mask_token_prob:
                    out[r, s:e] = self.mask_id
                elif u < c.mask_token_prob + c.random_token_prob:
                    out[r, s:e] = self.replacements[torch.randint(len(self.replacements), (e - s,), generator=g)]
                left[r, s:e], right[r, s:e], offset[r, s:e] = s - 1, e, torch.arange(e - s)
                sbo_target[r, s:e] = cand_r[s - 1] and cand_r[e]  # trap: [CLS] at 0 and [SEP] last keep both in range
        batch = {"input_ids": out, "labels": labels}
        if c.span_boundary:
            batch.update(span_left=left, span_right=right, span_offset=offset, sbo_target=sbo_target)
        return batch

    # --- train.py's interface ---

    def train_batch(self, split, batch_size, generator):
        """batch_size rows, each from a line drawn uniformly from the split, masked afresh.
        --static-masks K: BERT's own data (create_pretraining_data.py, dupe_factor = 10), RoBERTa's
        "static" row: each line's row is built and masked once per copy, k = 0..K-1, and every later
        draw of that copy is the same row, pair and mask. The loop's generator draws the line and k;
        the row comes from a generator seeded by (line, k) alone."""
        ix = self.index(split)
        require(ix.n_lines > 0, "the training split holds no text lines")
        starts = torch.randint(ix.n_lines, (batch_size,), generator=generator).tolist()
        K = self.config.static_masks
        if not K:
            return self._rows_at(ix, starts, generator)
        copies = torch.randint(K, (batch_size,), generator=generator).tolist()
        rows = [self._rows_at(ix, [i], torch.Generator().manual_seed(STATIC_SEED + i * K + k))
                for i, k in zip(starts, copies)]
        return {key: torch.cat([r[key] for r in rows]) for key in rows[0]}

    def _rows_at(self, ix, starts, g):
        """The batch of rows starting at these lines, pairs and masks drawn from g."""
        if self.pairs:
            rows = self._pair_rows(ix, starts, g, training=True)
        else:
            rows = [self._packed(ix, i)[0] for i in starts]
        return self._rows_to_batch(rows, g)

    def eval_batches(self, split, batch_size):
        """The whole split, in order: every line once (pairs: as A or B; packed: every token once).
        Masks and pairs come from a generator seeded here: the same rows, same masks every time."""
        ix, g = self.index(split), torch.Generator().manual_seed(EVAL_SEED)
        rows, line, offset = [], 0, 0
        while line < ix.n_lines:
            if self.pairs:
                pair = self._pair(ix, line, g, training=False)
                if pair is None:
                    line += 1
                    continue
                rows.append(pair[:3])
                line = max(pair[3], line + 1)
            else:
                ids, line, offset = self._packed(ix, line, offset)
                rows.append(ids)
            if len(rows) == batch_size:
                yield self._rows_to_batch(rows, g)
                rows = []
        if rows:
            yield self._rows_to_batch(rows, g)

    @staticmethod
    def count_tokens(batch):
        return int(batch["attention_mask"].sum())  # real tokens: padding is not work done on text

    def denominators(self, batch):
        """Each loss term's count over the step: masked positions (MLM), span-boundary targets (SBO),
        rows (NSP/SOP)."""
        den = {"mlm": int((batch["labels"] != -100).sum())}
        if "sbo_target" in batch:
            den["sbo"] = int(batch["sbo_target"].sum())
        if self.pairs:
            den["pair"] = batch["input_ids"].size(0)
        return den

    def loss(self, model, batch, denominators=None):
        """(loss, sums). loss: MLM mean over masked positions [+ NSP/SOP mean over rows]
        [+ SBO mean over its targets], added unweighted, as in BERT and SpanBERT."""
        den = denominators or self.denominators(batch)
        labels = batch["labels"]
        chosen = labels != -100
        spans = None
        if self.config.span_boundary:
            spans = (batch["span_left"][chosen], batch["span_right"][chosen],
                     batch["span_offset"][chosen])
        out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                    masked_positions=chosen, spans=spans)
        target = labels[chosen]  # (N,)
        mlm_nll = F.cross_entropy(out[0].float(), target, reduction="sum")
        loss = mlm_nll / max(1, den["mlm"])
        stats = {"mlm_nll": mlm_nll.detach(), "masked": chosen.sum(),
                 "mlm_correct": (out[0].argmax(-1) == target).sum()}
        if self.pairs:
            y = batch["next_sentence_label"]
            pair_nll = F.cross_entropy(out[1].float(), y, reduction="sum")
            loss = loss + pair_nll / max(1, den["pair"])
            stats.update(pair_nll=pair_nll.detach(), rows=torch.tensor(y.numel()),
                         pair_correct=(out[1].argmax(-1) == y).sum())
        if spans is not None:  # only the spans with two visible text boundaries (sbo_target)
            ok = batch["sbo_target"][chosen]  # (N,)
            sbo_nll = F.cross_entropy(out[2].float()[ok], target[ok], reduction="sum")
            loss = loss + sbo_nll / max(1, den["sbo"])
            stats.update(sbo_nll=sbo_nll.detach(), sbo_targets=ok.sum(),
                         sbo_correct=(out[2].argmax(-1) == target)[ok].sum())
        return loss, stats

    def summarize(self, sums):
        """loss (the sum of the terms' means, as minimised), then each term and its accuracy."""
        masked = max(1.0, float(sums["masked"]))
        m = {"mlm_loss": float(sums["mlm_nll"]) / masked, "mlm_acc": float(sums["mlm_correct"]) / masked}
        if self.pairs:
            name = "nsp" if self.kind == "mlm+nsp" else "sop"
            rows = max(1.0, float(sums["rows"]))
            m[f"{name}_loss"] = float(sums["pair_nll"]) / rows
            m[f"{name}_acc"] = float(sums["pair_correct"]) / rows
        if "sbo_nll" in sums:
            n_sbo = max(1.0, float(sums["sbo_targets"]))
            m.update(sbo_loss=float(sums["sbo_nll"]) / n_sbo, sbo_acc=float(sums["sbo_correct"]) / n_sbo)
        return {"loss": sum(v for k, v in m.items() if k.endswith("_loss")), **m}


Objective = PretrainingObjective

# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning (train.py --task, finetune.py): BERT's way


class Classifier(nn.Module):
    """BERT (Devlin et al. 2019, §3.2 and §4.1, Fig. 4): [CLS] A [SEP] (B [SEP]), segment 0 for A and
    its [SEP], 1 for B and its; the final state of [CLS] through the pooler (tanh(W h + b), trained
    by NSP), dropout 0.1, and one new layer W (K x H): log softmax(C W^T). The MLM and NSP heads are
    not used (frozen: they count as no trained parameter). forward(...) -> (loss (B,), label (B,))."""
    LORA = ("*.attention.query", "*.attention.value")  # W_q, W_v: Hu et al.'s choice (§7.1)
    ADAPTER = ("*.attention.dense", "*.layer.*.output")  # each sublayer's output, before the residual sum
    EMBEDDING = "encoder.embeddings.word_embeddings"
    PROMPT_AT = 1  # after [CLS], whose state the head reads
    PAD = "[PAD]"

    def __init__(self, model, task, labels, tokenizer):
        super().__init__()
        self.pretrained, self.labels, self.max_len = model, labels, model.config.max_seq_length
        self.cls, self.sep = tokenizer.specials["[CLS]"], tokenizer.specials["[SEP]"]
        for head in (model.mlm, model.nsp, getattr(model, "sbo", None)):
            if head is not None:
                head.requires_grad_(False)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(model.config.hidden_size, len(labels))  # W
        init_bert_weights(self.classifier)

    def encode(self, a, b=None):
        """encode([7, 8], [9]) -> ([CLS, 7, 8, SEP, 9, SEP], [0, 0, 0, 0, 1, 1])"""
        ids, types = [self.cls, *a, self.sep], [0] * (len(a) + 2)
        if b is not None:
            ids, types = ids + [*b, self.sep], types + [1] * (len(b) + 1)
        return ids, types

    def forward(self, input_ids, token_type_ids, attention_mask, labels):
        m = self.pretrained
        h = m.encoder(input_ids, token_type_ids, attention_mask)  # (B, T, C)
        pooled = torch.tanh(m.pooler(h[:, 0]))  # (B, C)
        logits = self.classifier(self.dropout(pooled))  # (B, n_labels)
        return F.cross_entropy(logits.float(), labels, reduction="none"), logits.argmax(-1)

# ----------------------------------------------------------------------------------------------------------------------
# Demo: what a run shows when it ends (train.py calls demo()).
# Filling masks from a checkpoint or a released model.

# char-level default: a letter masked in three common words of an unseen play (Julius Caesar)
FILL_TEXT = ("Friends, Romans, countrymen, lend me y[MASK]ur ears; "
             "I come to bury Caesar, n[MASK]t to praise h[MASK]m.")


@dataclass
class DemoConfig:
    fill_text: str = FILL_TEXT  # the sentence whose [MASK]s the run fills at its end
    top_k: int = 5  # candidates shown per [MASK] (0 = no demo)

    def __post_init__(self):
        require(self.top_k >= 0, f"--top-k {self.top_k}: must be >= 0 (0 = no demo)")


def with_cls_sep(tokenizer, ids, max_len, what="sentence"):
    """(1, T) tensor [CLS] ids [SEP], BERT's input format. Refused beyond max_len positions.
    with_cls_sep(tok, [7, 8], 64) -> tensor([[cls, 7, 8, sep]])"""
    row = torch.tensor([[tokenizer.specials["[CLS]"], *ids, tokenizer.specials["[SEP]"]]])
    require(row.size(1) <= max_len,
            f"the {what} is {row.size(1)} tokens with [CLS] and [SEP]; "
            f"this model reads at most {max_len}")
    return row


@torch.no_grad()
def fill_masks(model, tokenizer, text, top_k, device="cpu"):
    """Predict every [MASK] in `text` in one pass, as BERT does (each independently of the others).
    -> (the text with each mask replaced by its best candidate,
        [[(candidate, probability), ...] per mask])."""
    mask_id = tokenizer.specials["[MASK]"]
    ids = tokenizer.encode(text)
    require(mask_id in ids,
            "the sentence has no [MASK] to fill (write [MASK] where a token should be predicted)")
    row = with_cls_sep(tokenizer, ids, model.config.max_position_embeddings).to(device)
    was_training = model.training
    model.eval()
    logits, _ = model(row)
    model.train(was_training)
    probs = logits[0, 1:-1].float().softmax(-1)  # (len(ids), V)
    probs[:, list(tokenizer.specials.values())] = 0  # a [MASK] is text: never [SEP] or [PAD]
    filled, candidates = list(ids), []
    for t in [t for t, i in enumerate(ids) if i == mask_id]:
        top = probs[t].topk(top_k)
        candidates.append([(tokenizer.decode([i]), p)
                           for p, i in zip(top.values.tolist(), top.indices.tolist())])
        filled[t] = top.indices[0].item()
    return tokenizer.decode(filled), candidates


def print_fill(text, filled, candidates):
    print(text)
    for n, cands in enumerate(candidates, 1):
        print(f"  [MASK] {n}: " + " | ".join(f"{c!r} {p:.3f}" for c, p in cands))
    print(f"  filled: {filled}")


def demo(model, tokenizer, cfg, device):
    """Fill the masks of cfg.fill_text: what the model has learned, in its own words."""
    if cfg.top_k <= 0:
        return
    try:
        filled, candidates = fill_masks(model, tokenizer, cfg.fill_text, cfg.top_k, device)
    except UsageError as e:  # e.g. too long for a small model's position table; the run is fine
        print(f"demo skipped: {e} (--fill-text sets the sentence)")
        return
    print("-" * 80)
    print_fill(cfg.fill_text, filled, candidates)
    print("-" * 80)


@command
def main(argv=None):
    p = argparse.ArgumentParser(description=(
        "Fill every [MASK] in a sentence with a BERT: a checkpoint written by train.py (--ckpt) "
        "or a Hugging Face BertForPreTraining directory with its vocab.txt (--hf)."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="path to ckpt.pt (e.g. out/bert/ckpt.pt)")
    src.add_argument("--hf", help="a BertForPreTraining directory: config.json, model.safetensors "
                                  "or pytorch_model.bin, and vocab.txt (read by bpe.WordPiece)")
    p.add_argument("text", help='a sentence with one or more [MASK], e.g. "my dog is [MASK]."')
    p.add_argument("--top-k", type=int, default=5, help="candidates to show per [MASK]")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    require(args.top_k >= 1, f"--top-k {args.top_k}: must be at least 1")
    import bpe
    import train

    device = train.pick_device(args.device)
    if args.ckpt:
        model, tokenizer, _ = train.load_for_inference(args.ckpt, device, flag="--ckpt", model="bert")
    else:
        vocab = os.path.join(args.hf, "vocab.txt")
        require(os.path.exists(vocab),
                f"--hf {args.hf}: no vocab.txt (BERT's WordPiece vocabulary) in the directory")
        try:
            model = BERT.from_pretrained(args.hf).to(device)
            tokenizer = bpe.WordPiece.from_vocab_file(vocab)
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"--hf {args.hf}: {e}") from None
        missing = [s for s in ("[CLS]", "[SEP]", "[MASK]") if s not in tokenizer.specials]
        require(not missing, f"--hf {args.hf}: vocab.txt lacks {', '.join(missing)}")
    print_fill(args.text, *fill_masks(model, tokenizer, args.text, args.top_k, device))


if __name__ == "__main__":
    main()
