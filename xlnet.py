"""
XLNet: permutation language modeling with two-stream attention and Transformer-XL memory.

Papers
  - Yang et al. 2019, "XLNet: Generalized Autoregressive Pretraining for Language Understanding":
      §2.2 permutation LM: maximise E_z [ sum_t log p(x_{z_t} | x_{z_<t}) ] over orders z (eq. 3).
           Only the order is permuted, never the sequence: every token keeps its position;
      §2.3 two-stream self-attention (eq. 4): a content stream h sees its own token, like any
           Transformer; a query stream g knows its position, never its own token. Both in every
           layer, sharing every weight. Partial prediction: only the last 1/K of each order (eq. 5);
      §2.4 Transformer-XL inside: relative positions, and segment recurrence with memory;
      §2.5 relative segment encodings (s_ij, b, the (q_i + b) . s_ij term).
  - Dai et al. 2019, "Transformer-XL": §3.1 the vanilla model (evaluated by a window sliding one
      token at a time), §3.2 segment-level recurrence (memory = the last segment's layer inputs,
      no gradient), §3.3 the relative score A^rel, terms (a)-(d), §4 the evaluation speed-up.
  Slides (lecture 001): "Transformer-XL" (the vanilla model, segment-level recurrence, each in its
  training and evaluation phase), "XLNet" (permutations; relative position embeddings; two-stream
  self-attention; "Split View of the Query Stream (Factorization order: 3 -> 2 -> 4 -> 1)").

Faithful to the released model (github.com/zihangdai/xlnet: modeling.py, data_utils.py) and to
Hugging Face's XLNetLMHeadModel, the oracle of tests/test_xlnet.py:
  - the same parameter names and shapes: q, k, v, o, r of shape (C, H, hs); r_w_bias, r_r_bias,
    r_s_bias, seg_embed per layer; mask_emb; lm_loss tied to word_embedding, with a bias;
  - post-LayerNorm, eps 1e-12, none on the embeddings; perm_mask as Hugging Face means it
    (1 = may not attend), target_mapping, mems;
  - the original data pipeline: targets in spans (_sample_mask), non-targets first in the order,
    the order permuted within blocks (_local_perm), the content stream fed the real tokens, and
    bi_data: half the rows read their stream backward, with negated relative distances.

Run
  python train.py --model xlnet          # permutation LM on char-level Shakespeare (CPU, minutes)
  python xlnet.py fill --ckpt out/xlnet/ckpt.pt --text "Friends, Romans"  # fill blanks in any order
  python experiments.py views            # which tokens each target may see, for one order
  python experiments.py two-phase        # Transformer-XL's evaluation: memory vs sliding window

Memory and the loop: the objective, not the model, keeps each batch row's memory between steps
(row i continues row i). Every checkpoint saves it with the rows' cursors, so a resumed run
continues exactly. Evaluation uses a separate objective, whose memory starts empty.

Legend
  B batch rows, T tokens per segment (qlen), M memory length (mlen), Tk = M + T keys (klen),
  R = Tk + T - 1 relative distances, P predictions per row (num_predict), C d_model, H n_head,
  hs = C // H head size, F d_inner, V vocabulary, L n_layer.
  rank[i]: position i's place in the factorization order (0 = first).
  perm_mask[b, i, j] = 1: position i may NOT attend to position j.
"""

import argparse
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UsageError, command, require
from hf_io import copy_weights, read_hf_dir, write_hf_dir
from positions import rel_shift, relative_distances, relative_sinusoid, transformer_xl_score

# ----------------------------------------------------------------------------------------------------------------------
# Config and presets

OBJECTIVES = ("plm", "lm")
ACTIVATIONS = {"gelu": lambda x: F.gelu(x),  # Hugging Face's "gelu": the exact erf form
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # tanh, as the original TF code
               "relu": F.relu}


@dataclass
class XLNetConfig:
    vocab_size: int = 32000  # V (train.py sets it from the tokenizer; released: 32,000)
    d_model: int = 128  # C: width of both streams
    n_layer: int = 4  # L: layers; both streams share each layer's attention and feed-forward
    n_head: int = 4  # H: heads; hs = d_model / n_head
    d_inner: int = 512  # F: feed-forward width (4C, as in the released models)
    ff_activation: str = "gelu"  # gelu (exact erf, HF's) | gelu_new (tanh, original TF code) | relu
    layer_norm_eps: float = 1e-12  # the released models' (TF's layer_norm default), not 1e-5
    dropout: float = 0.0  # embeddings, sinusoid, attention probabilities, outputs (released: 0.1)
    initializer_range: float = 0.02  # std of every weight at init
    mem_len: int = 64  # M: layer inputs of earlier segments kept as memory (0 = no memory)
    clamp_len: int = -1  # clip relative distances to +-clamp_len (-1 = none, as released)
    # bi_data (XLNet's flag): half of every training batch reads its stream backward, with negated
    # relative distances (the original data_utils.create_tfrecords, modeling.relative_positional_encoding).
    # The original pretrains with it (train.py's default True); its released configs, and Hugging
    # Face's default, say False, the value every inference forward wants. So False here, as in older
    # checkpoints, and True in the pretraining presets (plm-cpu, tiny, xlnet-base) as in the original.
    bi_data: bool = False
    attn: str = "naive"  # naive: the score as the equations; sdpa: the fused kernel. Tested equal.
    query_stream: str = "gather"  # gather: g at P targets (fast) | all: every position (released)
    seq_len: int = 64  # T: tokens per training segment; each batch row continues its own stream
    objective: str = "plm"  # plm: permutation LM (XLNet) | lm: left-to-right LM (Transformer-XL)
    partial_k: int = 6  # K (§2.3): predict the order's last seq_len // K (original: 85 of 512)
    perm_size: int = 0  # permute the order in blocks this long (original: 256); 0 = whole segment
    max_span: int = 5  # targets in spans of 1..max_span, P(n) ~ 1/n (_sample_mask's max_gram 5)
    mask_alpha: int = 6  # a span of n tokens sits in a context of mask_alpha * n (original: 6)
    pad_token_id: int = -1  # set by train.py: <pad>, for the short last segment of an evaluation
    mask_token_id: int = -1  # set by train.py: <mask>, for an unknown token; never attended to

    def __post_init__(self):
        # Messages name the field's train.py flag (n_layer -> --n-layer) and its value.
        def flag(name):
            value = getattr(self, name)
            return f"--{name.replace('_', '-')} " + (f"{value:g}" if isinstance(value, float)
                                                     else str(value))

        for name in ("d_model", "n_layer", "n_head", "d_inner", "max_span", "mask_alpha"):
            require(getattr(self, name) >= 1, f"{flag(name)}: must be >= 1")
        require(self.d_model % self.n_head == 0,
                f"{flag('d_model')}: must be divisible by {flag('n_head')}")
        require(0 <= self.dropout < 1, f"{flag('dropout')}: must be in [0, 1)")
        require(self.layer_norm_eps > 0, f"{flag('layer_norm_eps')}: must be > 0")
        require(self.initializer_range >= 0, f"{flag('initializer_range')}: must be >= 0 (a std)")
        require(self.attn in ("naive", "sdpa"), f"{flag('attn')}: choose naive or sdpa")
        require(self.query_stream in ("all", "gather"),
                f"{flag('query_stream')}: choose all or gather")
        require(self.objective in OBJECTIVES,
                f"{flag('objective')}: choose from {', '.join(OBJECTIVES)}")
        require(self.ff_activation in ACTIVATIONS,
                f"{flag('ff_activation')}: choose from {', '.join(ACTIVATIONS)}")
        require(self.mem_len >= 0, f"{flag('mem_len')}: must be >= 0 (0 = no memory)")
        require(self.seq_len >= 2, f"{flag('seq_len')}: must be >= 2")
        require(2 <= self.partial_k <= self.seq_len,
                f"{flag('partial_k')}: K must be in 2..{self.seq_len} (--seq-len): "
                f"seq_len // K targets per segment, at least one, "
                f"and at least one non-target for every target to see")
        require(self.perm_size >= 0 and not (self.perm_size and self.seq_len % self.perm_size),
                f"{flag('perm_size')}: must divide {flag('seq_len')}, the order being permuted "
                f"within blocks of --perm-size positions (0 = the whole segment)")

    @property
    def d_head(self):
        return self.d_model // self.n_head

    @property
    def num_predict(self):
        """P: targets per segment: every token for 'lm'; the order's last seq_len // K for 'plm'."""
        return self.seq_len if self.objective == "lm" else self.seq_len // self.partial_k


# A preset sets model sizes, and training settings where a recipe goes with them (train.py gives
# each key to the config that declares it). Measured on this project's 2-core CPU (README "XLNet").
PRESETS = {
    # The CPU default: char-level Shakespeare; segments of 64, memory 64 (each sees the one before).
    # K = 6: 10 targets per segment, in spans, the last 10 of a random order. 32 x 64 = 2,048 chars
    # a step: 16 stretches of text, each read forward by one row and backward by another (bi_data).
    # Naive attention: at this size the fused kernel gains nothing on a CPU (see gpt.py).
    "plm-cpu": dict(d_model=128, n_layer=4, n_head=4, d_inner=512, seq_len=64, mem_len=64,
                    partial_k=6, bi_data=True, dropout=0.0, attn="naive", tokenizer="char", batch_size=32,
                    lr=2e-3, min_lr=2e-4, warmup_iters=100, max_iters=2000, eval_interval=500,
                    eval_tokens=65536, weight_decay=0.01, beta2=0.99),
    # Transformer-XL's training phase, same model: left to right, every token a target, memory kept.
    # `python experiments.py two-phase` trains it: fewer steps, as it measures evaluation only.
    "txl-cpu": dict(d_model=128, n_layer=4, n_head=4, d_inner=512, seq_len=64, mem_len=64,
                    objective="lm", dropout=0.0, attn="naive", tokenizer="char", batch_size=32,
                    lr=2e-3, min_lr=2e-4, warmup_iters=100, max_iters=800, eval_interval=400,
                    eval_tokens=32768, weight_decay=0.01, beta2=0.99),
    # The smallest XLNet: for tests, and for trying flags in seconds.
    "tiny": dict(d_model=32, n_layer=2, n_head=2, d_inner=64, seq_len=16, mem_len=16, partial_k=4,
                 bi_data=True, dropout=0.0, batch_size=4, max_iters=20, warmup_iters=5, eval_interval=10,
                 eval_tokens=2048, lr=3e-3),
    # XLNet-Base sizes (xlnet-base-cased: 12 layers, 768 wide, 12 heads, 3072 inner), and the
    # paper's pretraining settings where they carry over. Table 7: sequence 512, memory 384, K = 6,
    # dropout 0.1, weight decay 0.01, linear decay; the original permutes in 256-position blocks
    # and pretrains with bi_data.
    # Batch: BERT-Base's 256 x 512 tokens (the paper's XLNet-Base comparison uses BERT's data and
    # budget). lr, steps: a single-GPU guess (only CPUs were run). Bring your own corpus (--data).
    "xlnet-base": dict(d_model=768, n_layer=12, n_head=12, d_inner=3072, seq_len=512, mem_len=384,
                       partial_k=6, perm_size=256, bi_data=True, dropout=0.1, attn="sdpa", tokenizer="gpt2",
                       batch_size=16, tokens_per_step=131072, lr=4e-4, min_lr=4e-5,
                       schedule="linear", warmup_iters=10000, max_iters=500000, eval_interval=5000,
                       weight_decay=0.01, beta2=0.999),
}
DEFAULT_PRESET = "plm-cpu"

# <pad> fills an evaluation's short last segment; <mask> stands for an unknown token (the demo's
# blanks). Both get ids above the tokenizer's own. Neither is ever attended to: perm_mask hides
# every target's token, attention_mask every pad: the content stream never sees a <mask> (tested).
SPECIAL_TOKENS = ("<pad>", "<mask>")
TOKEN_IDS = {"pad_token_id": "<pad>", "mask_token_id": "<mask>"}  # config fields train.py fills in

# The score of a masked (query, key) pair, as in the released code (score - 1e30 * mask). Not -inf:
# a query that may see nothing then gets a uniform average, not NaN. That leaks everything, so the
# objective never builds one (every target sees a non-target or the memory). fp16 cannot hold 1e30.
MASKED = -1e30
MASKED_FP16 = -65500.0

# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


def heads(x, w):
    """x (B, T, C) @ w (C, H, hs) (released layout) -> (B, H, T, hs): all heads in one matmul."""
    return torch.einsum("btc,chd->bhtd", x, w)


def relative_encoding(qlen, klen, d_model, clamp_len=-1, backward=False):
    """(R, C) [sin | cos] sinusoids of distances klen-1 ... -(qlen-1) (positions.relative_sinusoid).

    XLNet is bidirectional. Query i of the segment, at absolute position mlen + i, is at distance
    mlen + i - j from key j: from klen-1 (the oldest memory, from the last query) down to -(qlen-1)
    (the last key, from the first query). The released code lists one more distance, klen, that no
    pair uses (its rel_shift drops it; positions.rel_shift pads instead). clamp_len > 0 clips them.
    backward: the distances negated, for bi_data's backward rows (the original's bwd_pos_seq). Such
    a row holds its text reversed, so -(i - j) is the distance in the text: memory, before the
    segment in the row, is later text, at negative distances.
    relative_encoding(2, 3, 4) -> the sinusoids of [2, 1, 0, -1], shape (4, 4);
    relative_encoding(2, 3, 4, backward=True) -> those of [-2, -1, 0, 1]
    """
    d = relative_distances(qlen, klen, bidirectional=True)  # (R,)
    if backward:
        d = -d
    if clamp_len > 0:
        d = d.clamp(-clamp_len, clamp_len)
    return relative_sinusoid(d, d_model)  # (R, C), float32


def attention_masks(perm_mask, attention_mask, mlen):
    """(mask_h, mask_g): (B, T, mlen + T) bool, True where a query may NOT attend to a key.
    (None, None) if nothing is masked: without a perm_mask every position sees every position.

    The query stream g obeys perm_mask and the padding exactly. The content stream h also always
    sees itself (XLNet eq. 4: h_{z_t} attends to z_<=t, g_{z_t} to z_<t). Memory is never masked:
    it is every position's past. With mlen = 0, T = 2, perm_mask = [[1, 0], [1, 1]] (both targets,
    position 1 first in the order): mask_g = [[1, 0], [1, 1]], mask_h = [[0, 0], [1, 0]].
    """
    data_mask = None
    if attention_mask is not None:
        data_mask = (attention_mask == 0)[:, None, :]  # (B, 1, T): every query ignores pad keys
    if perm_mask is not None:
        pm = perm_mask > 0  # (B, T, T)
        data_mask = pm if data_mask is None else data_mask | pm
    if data_mask is None:
        return None, None
    B, T = data_mask.size(0), data_mask.size(-1)
    # (B, T, Tk): memory columns first, all visible
    mask_g = F.pad(data_mask.expand(B, T, T), (mlen, 0), value=False)
    self_key = torch.eye(T, dtype=torch.bool, device=mask_g.device)
    mask_h = mask_g & ~F.pad(self_key, (mlen, 0), value=False)  # ... and h sees itself
    return mask_h, mask_g


def segment_matrix(token_type_ids, mlen):
    """(B, T, mlen + T) bool: True where query i and key j are in DIFFERENT segments. Only
    same/different matters (XLNet §2.5: s_ij = s+ or s-). Memory is segment 0, as released.
    With token types [0, 1] and one memory slot: [[F, F, T], [T, T, F]]."""
    cat = F.pad(token_type_ids, (mlen, 0), value=0)  # (B, Tk)
    return token_type_ids[:, :, None] != cat[:, None, :]


def gather_shift(x, q_pos, klen):
    """rel_shift for queries at any positions.

    x (B, H, P, R): P queries' scores against distances klen-1 ... -(qlen-1) (R = klen + qlen - 1);
    q_pos (B, P): each query's position in the segment. Returns (B, H, P, klen), the score against
    key j's distance mlen + q_pos[p] - j: out[..., p, j] = x[..., p, j + qlen - 1 - q_pos[p]].
    With q_pos = 0 .. qlen-1 it is positions.rel_shift (tested).
    Example: qlen 2, klen 3 (one memory slot), distances [2, 1, 0, -1]. A query at position 0 is at
    distances 1, 0, -1 from keys 0, 1, 2: x = [[0, 1, 2, 3]] -> [[1, 2, 3]].
    """
    B, H, P, R = x.shape
    qlen = R - klen + 1
    idx = (torch.arange(klen, device=x.device)[None, None, :]
           + (qlen - 1 - q_pos)[:, :, None])  # (B, P, klen)
    return x.gather(-1, idx[:, None].expand(B, H, P, klen))


@dataclass
class QueryRows:
    """The query stream's fast path: for each of the P predictions, its position and mask rows."""
    pos: torch.Tensor  # (B, P) position of each prediction (0 for an empty target_mapping row)
    present: torch.Tensor  # (B, P) 1.0, or 0.0 for an empty row (it reads nothing, as released)
    mask: torch.Tensor  # (B, P, Tk) bool or None: the query stream's mask at those positions
    seg: torch.Tensor  # (B, P, Tk) bool or None: segment_matrix at those positions


def query_rows(target_mapping, mask_g, seg_mat):
    """QueryRows from a target_mapping whose rows are one-hot (or empty), else None.
    A row that mixes positions needs the released formulation (query_stream "all")."""
    tm = target_mapping
    if not (bool(((tm == 0) | (tm == 1)).all()) and bool((tm.sum(-1) <= 1).all())):
        return None
    pos = tm.argmax(-1)  # (B, P)
    rows = lambda m: None if m is None else m.gather(1, pos[:, :, None].expand(-1, -1, m.size(-1)))  # (B, P, Tk)
    return QueryRows(pos, tm.sum(-1), rows(mask_g), rows(seg_mat))


class RelativeAttention(nn.Module):
    """Two-stream relative multi-head attention, post-LayerNorm (the released `rel_attn` block).

    The score of query i against key j sums three terms. In each, a learned per-head bias vector
    stands where the query's position would have been (Transformer-XL §3.3, XLNet §2.5):
        content   (q_i + r_w_bias) . k_j                  terms (a) + (c) of A^rel
        position  (q_i + r_r_bias) . W_r R_{i-j}          terms (b) + (d): R, i-j's sinusoid
        segment   (q_i + r_s_bias) . seg_embed[s_ij]      s_ij = same or different segment
    scaled by 1/sqrt(hs). Both streams share the weights, and the keys and values: those of the
    content stream h and the memory. So g only ever reads content, never another query.
    """

    def __init__(self, config):
        super().__init__()
        C, H, hs = config.d_model, config.n_head, config.d_head
        self.n_head, self.attn, self.scale = H, config.attn, 1.0 / math.sqrt(hs)
        # the released layout (C, H, hs): q_head = einsum("ibh,hnd->ibnd", x, q) in the original
        self.q, self.k, self.v, self.o, self.r = (nn.Parameter(torch.empty(C, H, hs)) for _ in range(5))
        self.r_w_bias = nn.Parameter(torch.empty(H, hs))  # content bias, "u" of Transformer-XL
        self.r_r_bias = nn.Parameter(torch.empty(H, hs))  # position bias, "v" of Transformer-XL
        self.r_s_bias = nn.Parameter(torch.empty(H, hs))  # segment bias, "b" of XLNet §2.5
        self.seg_embed = nn.Parameter(torch.empty(2, H, hs))  # s+ (same segment), s- (different)
        self.layer_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.p_drop = config.dropout

    def segment_score(self, q, seg_mat):
        """(B, H, T, Tk): (q_i + r_s_bias) . seg_embed[s_ij], whichever of the two s_ij picks."""
        both = torch.einsum("bhtd,shd->bhts", q + self.r_s_bias[:, None, :], self.seg_embed)  # (B, H, T, 2)
        return torch.where(seg_mat[:, None], both[..., 1:], both[..., :1])

    def attend(self, q, k, v, r, seg_mat, mask, q_pos=None):
        """q (B, H, Tq, hs); k, v (B, H, Tk, hs); r (H, R, hs) = W_r R; seg_mat, mask (B, Tq, Tk)
        bool or None. The queries are the T positions in order or, with q_pos (B, Tq), at those
        positions (the query stream's fast path). Returns (B, H, Tq, hs)."""
        Tk = k.size(-2)
        position = (lambda x: rel_shift(x, Tk)) if q_pos is None else (lambda x: gather_shift(x, q_pos, Tk))
        if self.attn == "naive":
            # The readable path: the score as the equations, then masked softmax.
            if q_pos is None:  # content + position, (B, H, T, Tk)
                score = transformer_xl_score(q, k, r, self.r_w_bias, self.r_r_bias)
            else:  # the same two terms, (B, H, Tq, Tk)
                score = ((q + self.r_w_bias[:, None, :]) @ k.transpose(-2, -1)
                         + position((q + self.r_r_bias[:, None, :]) @ r.transpose(-2, -1)))
            if seg_mat is not None:
                score = score + self.segment_score(q, seg_mat)
            score = score * self.scale
            if mask is not None:
                score = score.masked_fill(mask[:, None],
                                          MASKED_FP16 if score.dtype == torch.float16 else MASKED)
            prob = self.dropout(F.softmax(score, dim=-1))  # (B, H, Tq, Tk)
            return prob @ v
        # The fused path: sdpa computes softmax(q'.k * scale + bias) v. The content term is a plain
        # dot product, with q' = q + r_w_bias. The position and segment terms depend on (i, j) via
        # i - j and s_ij, not a key vector: they are the float bias, as in the naive path.
        # That materialises (Tq, Tk); the kernel still never stores the probabilities.
        # Trap: under autocast, q + r_w_bias is promoted to fp32; sdpa wants one dtype for all.
        bias = position((q + self.r_r_bias[:, None, :]) @ r.transpose(-2, -1))  # (B, H, Tq, Tk)
        if seg_mat is not None:
            bias = bias + self.segment_score(q, seg_mat)
        bias = bias * self.scale
        if mask is not None:
            bias = bias.masked_fill(mask[:, None],
                                    MASKED_FP16 if k.dtype == torch.float16 else MASKED)
        q_content = (q + self.r_w_bias[:, None, :]).to(k.dtype)
        return F.scaled_dot_product_attention(q_content, k, v, attn_mask=bias.to(k.dtype),
                                              dropout_p=self.p_drop if self.training else 0.0)

    def post_attention(self, x, y):
        """Heads back to C, dropout, residual, then LayerNorm (post-LN, as released)."""
        return self.layer_norm(x + self.dropout(torch.einsum("bhtd,chd->btc", y, self.o)))

    def forward(self, h, g, mask_h, mask_g, r, seg_mat=None, mems=None, target_mapping=None,
                queries=None):
        """h (B, T, C) content stream; g (B, P, C) query stream or None; r (R, C) relative sinusoid,
        or (2, R, C) with bi_data (forward, backward distances);
        mems (B, M, C) or None; target_mapping (B, P, T): prediction p sits where its row is 1;
        queries: QueryRows for the fast path, or None. Returns (h', g')."""
        cat = h if mems is None else torch.cat([mems, h], dim=1)  # (B, Tk, C), memory first
        k, v = heads(cat, self.k), heads(cat, self.v)  # (B, H, Tk, hs): from content only
        r = torch.einsum("...rc,chd->...hrd", r, self.r)  # (H, R, hs): W_r R per distance, for the batch
        if r.dim() == 4:  # bi_data: (2, H, R, hs), forward then backward: the first half of the rows
            r = r.repeat_interleave(h.size(0) // 2, dim=0)  # reads the one, the second the other: (B, H, R, hs)
        h_out = self.post_attention(h, self.attend(heads(h, self.q), k, v, r, seg_mat, mask_h))
        if g is None:
            return h_out, None
        q_g = heads(g, self.q)  # (B, H, P, hs)
        if queries is not None:  # fast path: attend only at the P target positions
            y_g = self.attend(q_g, k, v, r, queries.seg, queries.mask, q_pos=queries.pos)
            y_g = y_g * queries.present[:, None, :, None]  # (B, H, P, hs); empty rows read nothing
        else:  # the released formulation: move each prediction's query to its position ...
            q_g = torch.einsum("bpt,bhpd->bhtd", target_mapping, q_g)  # (B, H, T, hs)
            y_g = self.attend(q_g, k, v, r, seg_mat, mask_g)  # ... attend there, with its mask ...
            y_g = torch.einsum("bpt,bhtd->bhpd", target_mapping, y_g)  # ... and back: (B, H, P, hs)
        return h_out, self.post_attention(g, y_g)


class FeedForward(nn.Module):
    """Position-wise C -> F -> C, GELU, dropout, residual, post-LN (the released `ff` block)."""

    def __init__(self, config):
        super().__init__()
        self.layer_1 = nn.Linear(config.d_model, config.d_inner)
        self.layer_2 = nn.Linear(config.d_inner, config.d_model)
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        # Trap: the original TF code computes GELU's tanh approximation; Hugging Face's config says
        # "gelu" and computes the exact erf form (~1e-3 apart). We read it as Hugging Face does.
        self.act = ACTIVATIONS[config.ff_activation]

    def forward(self, x):
        y = self.dropout(self.act(self.layer_1(x)))
        return self.layer_norm(x + self.dropout(self.layer_2(y)))


class Layer(nn.Module):
    """One XLNet layer: two-stream attention, then the same feed-forward applied to each stream."""

    def __init__(self, config):
        super().__init__()
        self.rel_attn = RelativeAttention(config)
        self.ff = FeedForward(config)

    def forward(self, h, g, mask_h, mask_g, r, seg_mat=None, mems=None, target_mapping=None,
                queries=None):
        h, g = self.rel_attn(h, g, mask_h, mask_g, r, seg_mat, mems, target_mapping, queries)
        return self.ff(h), (self.ff(g) if g is not None else None)


# ----------------------------------------------------------------------------------------------------------------------
# The model


class XLNetModel(nn.Module):
    """The stack without the output layer (Hugging Face's `transformer.` prefix).

    The word embedding: no position embedding, no LayerNorm (positions enter every layer's
    attention as relative distances). mask_emb, where the query stream starts: XLNet §2.3's
    trainable w, the same for every target, so g knows nothing but, through the distances, its
    position. Then L layers, and the memory."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.word_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.mask_emb = nn.Parameter(torch.empty(1, 1, config.d_model))
        self.layer = nn.ModuleList([Layer(config) for _ in range(config.n_layer)])
        self.dropout = nn.Dropout(config.dropout)

    def cache_mem(self, h, prev):
        """What the next segment attends to: the last mem_len layer inputs of [memory; segment],
        detached (Transformer-XL §3.2: SG(h_{tau-1}), no gradient into the past).
        (B, M, C), or None (mem_len 0). mem_len 3, memory [a, b], h = [c, d] -> [b, c, d]."""
        if not self.config.mem_len:
            return None
        cat = h if prev is None else torch.cat([prev, h], dim=1)
        return cat[:, -self.config.mem_len:].detach()

    def forward(self, input_ids, token_type_ids=None, perm_mask=None, target_mapping=None,
                mems=None, attention_mask=None, bi_data=None):
        """(output, new_mems). output: (B, P, C) from the query stream given target_mapping, else
        (B, T, C) from the content stream. new_mems: (B, M, C) per layer, or None (mem_len 0).
        bi_data (None: config.bi_data): the second half of the rows reads backward (XLNet.forward)."""
        B, T = input_ids.shape
        bi_data = self.config.bi_data if bi_data is None else bi_data
        if bi_data and B % 2:
            raise ValueError(f"bi_data: {B} rows; the first half reads forward, the second half backward, "
                             "so it needs an even number (bi_data=False reads every row forward)")
        mlen = mems[0].size(1) if mems is not None else 0
        mask_h, mask_g = attention_masks(perm_mask, attention_mask, mlen)
        seg_mat = segment_matrix(token_type_ids, mlen) if token_type_ids is not None else None
        h = self.dropout(self.word_embedding(input_ids))  # (B, T, C): real tokens, never <mask>
        g = queries = None
        if target_mapping is not None:  # query stream: one row per prediction, all starting from w
            g = self.dropout(self.mask_emb.expand(B, target_mapping.size(1), -1))  # (B, P, C)
            if self.config.query_stream == "gather":
                queries = query_rows(target_mapping, mask_g, seg_mat)  # None unless one-hot
        r = relative_encoding(T, mlen + T, self.config.d_model, self.config.clamp_len)  # (R, C)
        if bi_data:  # (2, R, C): the backward rows' distances negated (modeling.relative_positional_encoding)
            r = torch.stack([r, relative_encoding(T, mlen + T, self.config.d_model, self.config.clamp_len,
                                                  backward=True)])
        r = self.dropout(r.to(device=h.device, dtype=h.dtype))
        new_mems = [] if self.config.mem_len else None
        for i, layer in enumerate(self.layer):
            mem = mems[i] if mems is not None else None
            if new_mems is not None:
                new_mems.append(self.cache_mem(h, mem))  # each layer's INPUT is remembered
            h, g = layer(h, g, mask_h, mask_g, r, seg_mat, mem, target_mapping, queries)
        return self.dropout(g if g is not None else h), new_mems


class XLNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = XLNetModel(config)
        self.lm_loss = nn.Linear(config.d_model, config.vocab_size)  # released name, with a bias
        self.lm_loss.weight = self.transformer.word_embedding.weight  # tied: logit h . e(t) + b(t)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # The released models: every weight ~ N(0, initializer_range), with the three bias vectors,
        # seg_embed and mask_emb; Linear biases 0, LayerNorm gain 1.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RelativeAttention):
            for p in (module.q, module.k, module.v, module.o, module.r,
                      module.r_w_bias, module.r_r_bias, module.r_s_bias, module.seg_embed):
                nn.init.normal_(p, 0.0, std)
        elif isinstance(module, XLNetModel):
            nn.init.normal_(module.mask_emb, 0.0, std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied embedding counts once

    def no_weight_decay(self):
        """Each layer's three attention bias vectors. The original optimizer skips every "bias" and
        "LayerNorm"; train.py skips vectors itself, so only these 2-D biases need naming."""
        return {n for n, _ in self.named_parameters()
                if n.endswith(("r_w_bias", "r_r_bias", "r_s_bias"))}

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward = 3 forwards), an estimate for MFU.

        Per layer and token:
          - content stream: q, o on T rows; k, v on the Tk rows of memory + segment; feed-forward;
          - the query stream: q, o and feed-forward on P/T of the rows; W_r on R/T rows;
          - attention, per query row: scores (Tk), positions (R), mixing (Tk); T rows for h, P for g
            (T with query_stream "all", as released).
        Plus the output layer on the predictions."""
        c = self.config
        T, Tk = c.seq_len, c.seq_len + c.mem_len
        R, P, C = Tk + T - 1, c.num_predict, c.d_model
        g_rows = P if c.query_stream == "gather" else T
        per_layer = (2 * C * C + 2 * C * C * Tk / T + 2 * C * c.d_inner
                     + P / T * (2 * C * C + 2 * C * c.d_inner)
                     + R / T * C * C + (1 + g_rows / T) * (2 * Tk + R) * C)
        return 3 * 2 * (c.n_layer * per_layer + P / T * c.vocab_size * C)

    def forward(self, input_ids, token_type_ids=None, perm_mask=None, target_mapping=None,
                mems=None, attention_mask=None, bi_data=None):
        """logits, mems = model(input_ids (B, T), ...).

        token_type_ids (B, T): segment ids (only same/different matters).
        perm_mask (B, T, T): 1 where position i may not attend to j (Hugging Face's meaning).
        target_mapping (B, P, T): one-hot rows; prediction p is the token where row p is 1. Then the
          logits are (B, P, V), from the query stream; else (B, T, V), from the content stream.
        mems: what the previous segment returned (a detached (B, M, C) per layer), or None.
        attention_mask (B, T): 1 for real tokens, 0 for padding.
        bi_data (None: config.bi_data, as Hugging Face's flag): rows B/2 .. B-1 hold their text
          reversed and read negated relative distances. The model only negates the distances; the
          caller reverses the tokens (PermutationLMObjective does). Inference passes False.
        Returns the new mems too (None if mem_len is 0).
        """
        out, new_mems = self.transformer(input_ids, token_type_ids, perm_mask, target_mapping, mems,
                                         attention_mask, bi_data)
        return self.lm_loss(out), new_mems

    # ------------------------------------------------------------------------------------------------------------------
    # Hugging Face format: our parameter names ARE XLNetLMHeadModel's: loading is a checked copy.
    # Its memory is (M, B, C), time first as in TF; ours is (B, M, C), like all else here.

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load an XLNetLMHeadModel directory (e.g. xlnet-base-cased) without transformers.
        overrides: any XLNetConfig field, e.g. mem_len=384, attn="sdpa"."""
        hf, sd = read_hf_dir(path)
        if hf.get("model_type", "xlnet") != "xlnet":
            raise ValueError(f"{path}: a {hf.get('model_type')!r} checkpoint, not XLNet")
        for key, ok in (("attn_type", "bi"), ("same_length", False)):
            if hf.get(key, ok) != ok:
                raise ValueError(f"{path}: {key}={hf[key]!r} is not supported here "
                                 f"(the released models use {ok!r})")
        if hf.get("reuse_len"):
            raise ValueError(f"{path}: reuse_len={hf['reuse_len']} is not supported "
                             "(memory keeps whole segments)")
        config = XLNetConfig(**{**dict(
            vocab_size=hf["vocab_size"], d_model=hf["d_model"],
            n_layer=hf["n_layer"], n_head=hf["n_head"], d_inner=hf["d_inner"],
            ff_activation=hf.get("ff_activation", "gelu"),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=0.0,
            initializer_range=hf.get("initializer_range", 0.02), mem_len=hf.get("mem_len") or 0,
            clamp_len=hf.get("clamp_len", -1), bi_data=bool(hf.get("bi_data", False)),
            pad_token_id=-1 if hf.get("pad_token_id") is None else hf["pad_token_id"]), **overrides})
        model = cls(config)
        copy_weights(model, sd, path, skip=("lm_loss.weight",))  # tied to word_embedding
        return model

    def export_hf(self, path):
        """Write what transformers' XLNetLMHeadModel.from_pretrained(path) loads: from_pretrained's
        inverse. mem_len 0 (no memory) becomes null, read by Hugging Face as "keep everything"."""
        c = self.config
        hf_config = dict(
            architectures=["XLNetLMHeadModel"], model_type="xlnet", vocab_size=c.vocab_size,
            d_model=c.d_model, n_layer=c.n_layer, n_head=c.n_head, d_head=c.d_head,
            d_inner=c.d_inner, ff_activation=c.ff_activation, untie_r=True, attn_type="bi",
            initializer_range=c.initializer_range, layer_norm_eps=c.layer_norm_eps,
            # bi_data: how the pretraining batches were laid out, not part of the weights; the released
            # configs say False, which every inference forward wants (an odd batch fails with True).
            dropout=c.dropout, mem_len=c.mem_len or None, reuse_len=None, bi_data=False,
            clamp_len=c.clamp_len, same_length=False, tie_word_embeddings=True, use_mems_eval=True,
            use_mems_train=False,
            **({"pad_token_id": c.pad_token_id} if c.pad_token_id >= 0 else {}),
        )
        write_hf_dir(path, hf_config,
                     {k: v.float() for k, v in self.state_dict().items() if k != "lm_loss.weight"})


# ----------------------------------------------------------------------------------------------------------------------
# The objective: permutation LM with partial prediction (XLNet §2.2-2.3), built as the original
# data pipeline does (data_utils.py: _sample_mask, _local_perm), on consecutive segments of one
# stream per batch row.
#
# First the targets (the tokens to predict), in spans. Then an order with every non-target before
# every target: the targets are "the last 1/K of the order" (§2.3, eq. 5), and the non-targets are
# the context x_{z<=c} every target sees. Among the targets the order is random. The non-targets
# see each other: the original ranks them all -1. They are never predicted, so their mutual order
# does not matter, and seeing all the context enriches what the targets read.


def sample_targets(length, num_predict, generator, max_span=5, alpha=6):
    """(length,) bool, num_predict True: positions to predict, in spans (the original _sample_mask).

    Walk left to right: draw a span length n in 1..max_span with P(n) ~ 1/n; reserve a context of
    alpha * n tokens; put the span at a random offset in it (never ending on the last token, as in
    the original); move past the context. Stop at num_predict. A walk that ends short adds single
    random positions. alpha = 6: about one token in six is a target, i.e. K = 6.
    The original aligns each span's start to a word piece, but its loop then counts tokens (it tests
    seg[beg] where seg[end] was meant): a span is n tokens, as here.
    sample_targets(12, 2, g) -> e.g. tensor([F, F, F, T, T, F, F, F, F, F, F, F]) (a span of 2)
    """
    mask = torch.zeros(length, dtype=torch.bool)
    p = 1.0 / torch.arange(1, max_span + 1, dtype=torch.float)  # P(n) ~ 1/n: mostly short spans
    count = cur = 0
    while cur < length and count < num_predict:
        n = min(int(torch.multinomial(p, 1, generator=generator)) + 1, num_predict - count)
        context = n * alpha
        left = int(torch.randint(context, (1,), generator=generator))
        beg = cur + left
        if beg + n >= length:
            break
        mask[beg:beg + n] = True
        count += n
        cur = beg + n + context - left
    while count < num_predict:
        i = int(torch.randint(length, (1,), generator=generator))
        if not mask[i]:
            mask[i] = True
            count += 1
    return mask


def sample_order(length, perm_size, generator):
    """rank (length,): each position's place in a random order, permuted within blocks of perm_size
    positions (the original _local_perm). The blocks keep their order and share one shuffle;
    perm_size = length is one uniformly random order.
    With perm_size 2 and the shuffle [1, 0]: sample_order(4, 2, g) -> [1, 0, 3, 2]."""
    shuffle = torch.randperm(perm_size, generator=generator)  # (perm_size,)
    blocks = torch.arange(length).view(-1, perm_size)  # (n_blocks, perm_size): block b's ranks
    return blocks[:, shuffle].reshape(-1)  # position (b, o) gets rank b * perm_size + shuffle[o]


def permutation_mask(rank, is_target):
    """perm_mask (T, T) bool from an order and its targets. Every non-target comes first (rank -1);
    position i may NOT attend to position j iff j is a target that does not come before i.

    So a target sees every non-target and the targets before it, not itself (in its query stream;
    the content stream sees itself anyway). A non-target sees every non-target and no target.
    Targets at positions 0 and 2, rank[2] < rank[0]:
    permutation_mask(tensor([1, 3, 0]), tensor([T, F, T])) -> [[1, 0, 0], [1, 0, 1], [1, 0, 1]]
    (position 0 sees 1 and 2; 1 sees neither target; 2 sees only 1)
    """
    r = torch.where(is_target, rank, -1)
    return is_target[None, :] & (r[None, :] >= r[:, None])


class PermutationLMObjective:
    """Consecutive segments, one stream per row, scored by the permutation LM loss on the targets.

    State, in every checkpoint (a resumed run continues exactly): where each row's stream goes on
    (`cursors`) and each row's memory (`mems`: per row, one (M, C) tensor per layer). Row i at step
    t+1 continues row i at step t and reads only its own memory. Gradient accumulation splits a
    step's rows into micro-batches; the batch carries the row ids ("rows"), so each micro-batch
    finds its rows' memory. Evaluation runs on another instance, whose memory starts empty at every
    eval_batches() call (and at reset()).

    objective "lm" is Transformer-XL's training phase in XLNet's terms: the identity order, every
    token a target. The query stream at t predicts x_t from x_<t and the memory. Position 0 of a
    row's first segment has nothing to see: it is not predicted.

    bi_data (the original create_tfrecords): rows come in pairs. Row 2k reads stretch k of the text
    forward; row 2k+1 reads the same stretch reversed, from its end (so its memory is the text that
    follows it), and its targets are sampled in text order (_sample_mask's reverse). The model takes
    the forward rows first and the backward ones second, the original's layout: forward() reorders
    each micro-batch, and the pairs keep every even-sized micro-batch half and half. Evaluation
    reads forward only, as a model is used; the training loss averages both directions.
    """

    EVAL_SEED = 1234  # evaluation's own generator: the same targets and orders every time

    def __init__(self, config, tokenizer=None):
        self.config = config
        self.T = config.seq_len
        self.raw_tokens_per_row = self.tokens_per_row = config.seq_len
        self.perm_size = config.perm_size or config.seq_len
        self.cursors = None  # per row: where its stream continues
        self.mems = None  # per row: None (no memory yet) or a list of n_layer (M, C) tensors

    # -- state -----------------------------------------------------------------------------------------------------

    def state_dict(self):
        return {"cursors": self.cursors, "mems": self.mems}

    def load_state_dict(self, state):
        self.cursors, self.mems = state["cursors"], state["mems"]

    def reset(self):
        self.cursors = self.mems = None

    def has_memory(self, row):
        return self.config.mem_len > 0 and self.mems is not None and self.mems[row] is not None

    def memory(self, rows, device):
        """These rows' memory, as the model takes it: n_layer tensors (len(rows), M, C), or None."""
        if not self.has_memory(rows[0]):
            return None
        return [torch.stack([self.mems[r][layer] for r in rows]).to(device)
                for layer in range(self.config.n_layer)]

    def remember(self, rows, new_mems):
        if new_mems is None:
            return
        for i, r in enumerate(rows):
            self.mems[r] = [m[i] for m in new_mems]

    # -- batches ---------------------------------------------------------------------------------------------------

    def sample(self, length, has_memory, generator, backward=False):
        """(rank, is_target) for one segment of `length` real tokens."""
        if self.config.objective == "lm":
            is_target = torch.ones(length, dtype=torch.bool)
            is_target[0] = has_memory  # a stream's first token has no context to be predicted from
            return torch.arange(length), is_target
        c = self.config
        is_target = sample_targets(length, length // c.partial_k, generator, c.max_span, c.mask_alpha)
        if backward:  # the spans were walked in text order: flip them onto the reversed row
            is_target = is_target.flip(0)
        return sample_order(length, self.perm_size if length % self.perm_size == 0 else length,
                            generator), is_target

    def make_batch(self, segments, rows, has_memory, generator, backward=None):
        """Rows of token ids (<= T long; shorter ones padded) -> the model's inputs and targets.

        input_ids (B, T): the real tokens (the content stream never sees a <mask>);
        attention_mask (B, T); perm_mask (B, T, T) bool; target_mapping (B, P, T);
        target_ids (B, P), -100 where a row has < P targets; rows (B,): the rows' memory ids;
        backward (B,) bool: the rows whose segment is reversed text (bi_data; None: none)."""
        B, T, P = len(segments), self.T, self.config.num_predict
        backward = [False] * B if backward is None else backward
        batch = {"rows": torch.tensor(rows, dtype=torch.long),
                 "backward": torch.tensor(backward, dtype=torch.bool),
                 "input_ids": torch.full((B, T), max(self.config.pad_token_id, 0),
                                         dtype=torch.long),  # pads masked
                 "attention_mask": torch.zeros(B, T, dtype=torch.long),
                 "perm_mask": torch.zeros(B, T, T, dtype=torch.bool),
                 "target_mapping": torch.zeros(B, P, T),
                 "target_ids": torch.full((B, P), -100, dtype=torch.long)}
        for b, seg in enumerate(segments):
            ids = torch.from_numpy(np.array(seg, dtype=np.int64))  # a copy: a reversed view has negative strides
            n = len(ids)
            batch["input_ids"][b, :n] = ids
            batch["attention_mask"][b, :n] = 1
            rank, is_target = self.sample(n, has_memory[b], generator, backward[b])
            batch["perm_mask"][b, :n, :n] = permutation_mask(rank, is_target)
            where = is_target.nonzero()[:, 0]  # (P_b,) target positions, left to right, as released
            batch["target_mapping"][b, torch.arange(len(where)), where] = 1.0
            batch["target_ids"][b, :len(where)] = ids[where]
        return batch

    def train_batch(self, split, batch_size, generator):
        """The next segment of each row's stream. The first call spreads the rows evenly over the
        split from a random offset (the original's batchify: row i reads its part of the corpus).
        A stream that reaches the split's end starts over. With bi_data, row 2k+1 reads the
        reversed split (its cursor counts from the split's end), starting where part k ends.
        bi_data, 8 tokens, 2 rows, offset 0: row 0 reads [0 1 2 ...], row 1 [7 6 5 ...]."""
        n, T, bi = len(split.tokens), self.T, self.config.bi_data
        backward = [bi and i % 2 == 1 for i in range(batch_size)]
        if self.cursors is None:
            require(not bi or batch_size % 2 == 0,
                    f"--bi-data: {batch_size} rows per step (--batch-size x --grad-accum); each stretch "
                    "of text is read forward by one row and backward by the next, so it must be even")
            offset = int(torch.randint(n, (1,), generator=generator))
            parts = batch_size // 2 if bi else batch_size
            starts = [(offset + i * n // parts) % n for i in range(parts + 1)]  # part k: starts[k] to starts[k+1]
            self.cursors = ([c for k in range(parts) for c in (starts[k], (n - starts[k + 1]) % n)] if bi
                            else starts[:-1])
            self.mems = [None] * batch_size
        if len(self.cursors) != batch_size:
            raise UsageError(f"this run reads {len(self.cursors)} streams "
                             "(batch_size x grad_accum), each with its own memory; "
                             f"it cannot continue with {batch_size} rows per step")
        segments = []
        for i in range(batch_size):
            tokens = split.tokens[::-1] if backward[i] else split.tokens  # a view, nothing copied
            if self.cursors[i] + T > n:
                self.cursors[i] = 0
            segments.append(tokens[self.cursors[i]:self.cursors[i] + T])
            self.cursors[i] += T
        rows = list(range(batch_size))
        return self.make_batch(segments, rows, [self.has_memory(i) for i in rows], generator, backward)

    def eval_batches(self, split, batch_size):
        """Every token of `split` once, as consecutive segments (Transformer-XL's evaluation phase).

        The split is cut into up to batch_size parts, one per row, each read segment by segment with
        its memory, which starts empty. A fixed seed draws the targets and orders: the same batches
        every time. The last segment is padded."""
        T, n = self.T, len(split.tokens)
        n_seg = -(-n // T)
        rows = min(batch_size, n_seg)
        per_row = -(-n_seg // rows)  # segments per row; the last row may have fewer
        self.mems = [None] * rows  # a new text: no memory
        g = torch.Generator().manual_seed(self.EVAL_SEED)
        for s in range(per_row):
            active = [r for r in range(rows) if r * per_row + s < min((r + 1) * per_row, n_seg)]
            segments = [split.tokens[(r * per_row + s) * T:(r * per_row + s + 1) * T] for r in active]
            yield self.make_batch(segments, active, [self.has_memory(r) for r in active], g)

    # -- scoring ---------------------------------------------------------------------------------------------------

    @staticmethod
    def count_tokens(batch):
        return int(batch["attention_mask"].sum())

    @staticmethod
    def denominators(batch):
        """The loss is averaged over the predicted tokens of the whole step."""
        return {"plm": int((batch["target_ids"] != -100).sum())}

    def forward(self, model, batch):
        """Logits (B, P, V) of the targets, reading and then updating the rows' memory. With
        backward rows (bi_data) the model gets the forward rows first, the backward ones second."""
        backward = batch["backward"]
        bi = bool(backward.any())
        if bi:
            require(2 * int(backward.sum()) == len(backward),
                    f"--bi-data: a micro-batch of {len(backward)} rows is not half forward, half backward: "
                    "use an even --batch-size")
            order = torch.argsort(backward.long(), stable=True)  # (B,): forward rows, then backward
            batch = {k: v[order] for k, v in batch.items()}
        rows = batch["rows"].tolist()
        mems = self.memory(rows, batch["input_ids"].device)
        logits, new_mems = model(batch["input_ids"], perm_mask=batch["perm_mask"],
                                 target_mapping=batch["target_mapping"], mems=mems,
                                 attention_mask=batch["attention_mask"], bi_data=bi)
        self.remember(rows, new_mems)
        return logits[order.argsort()] if bi else logits  # (B, P, V) in the batch's row order

    def loss(self, model, batch, denominators=None):
        """(sum of -log p(target | what its order lets it see) / denominators["plm"], eval sums)."""
        denominators = denominators or self.denominators(batch)
        logits = self.forward(model, batch)
        labels = batch["target_ids"]
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                              reduction="sum")
        real = labels != -100
        correct = (logits.argmax(-1) == labels)[real].sum()
        return nll / max(1, denominators["plm"]), {"nll": nll.detach(), "targets": real.sum(),
                                                   "correct": correct}

    @staticmethod
    def summarize(sums):
        """loss in nats per predicted token; acc: how often the most likely token is right."""
        n = max(1.0, float(sums["targets"]))
        return {"loss": float(sums["nll"]) / n, "acc": float(sums["correct"]) / n}


Model, Config, Objective = XLNet, XLNetConfig, PermutationLMObjective  # for train.py's registry


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning (train.py --task, finetune.py): XLNetForSequenceClassification's way


class Classifier(nn.Module):
    """As the released XLNetForSequenceClassification: A <sep> (B <sep>) <cls>, the <cls> LAST (the
    original run_classifier.py), segment 0 for A, 1 for B, 2 for <cls>; the content stream's final
    state at <cls> through the summary (dense C -> C, tanh, dropout), then a linear layer. Every
    row reads forward, no memory, no permutation. Our tokenizers have no <sep> or <cls>:
    <|endoftext|> plays both. Trap: the attention weights are (C, H, hs) tensors, not nn.Linear, so
    LoRA and adapters reach the feed-forward layers only here (finetune.py wraps Linear layers).
    forward(...) -> (per-example loss (B,), predicted label (B,))."""
    LORA = ("*.ff.layer_1", "*.ff.layer_2")
    ADAPTER = ("*.ff.layer_2",)
    EMBEDDING = "transformer.word_embedding"
    PROMPT_AT = 0
    PAD = "<pad>"

    def __init__(self, model, task, labels, tokenizer):
        super().__init__()
        c = model.config
        self.pretrained, self.labels, self.max_len = model, labels, c.seq_len
        self.eot = tokenizer.specials["<|endoftext|>"]
        self.summary = nn.Linear(c.d_model, c.d_model)  # sequence_summary.summary
        self.dropout = nn.Dropout(0.1)  # summary_last_dropout
        self.logits_proj = nn.Linear(c.d_model, len(labels))
        for lin in (self.summary, self.logits_proj):
            nn.init.normal_(lin.weight, 0.0, c.initializer_range)
            nn.init.zeros_(lin.bias)

    def encode(self, a, b=None):
        """encode([7, 8], [9]) -> ([7, 8, e, 9, e, e], [0, 0, 0, 1, 1, 2])"""
        ids, types = [*a, self.eot], [0] * (len(a) + 1)
        if b is not None:
            ids, types = ids + [*b, self.eot], types + [1] * (len(b) + 1)
        return ids + [self.eot], types + [2]

    def forward(self, input_ids, token_type_ids, attention_mask, labels):
        h, _ = self.pretrained.transformer(input_ids, token_type_ids, attention_mask=attention_mask,
                                           bi_data=False)  # (B, T, C), content stream
        last = attention_mask.sum(1) - 1  # (B,) <cls>: right padding, so the last real token
        x = self.dropout(torch.tanh(self.summary(h[torch.arange(h.size(0)), last])))  # (B, C)
        logits = self.logits_proj(x)  # (B, n_labels)
        return F.cross_entropy(logits.float(), labels, reduction="none"), logits.argmax(-1)


# ----------------------------------------------------------------------------------------------------------------------
# Transformer-XL's two evaluation phases (slides "Transformer-XL"), which `python experiments.py
# two-phase` measures. Both use the XLNet in the identity order (g at t predicts x_t from x_<t).
#   vanilla model: a window of the last W tokens slides by one token per prediction, all of it
#                  recomputed each time: W token computations per predicted token;
#   with memory:   the text is read T tokens at a time; each layer's inputs of earlier segments stay
#                  in memory (M of them), attended, not recomputed: about one computation per token.


def split_streams(tokens, rows):
    """The text cut into `rows` equal contiguous streams, (rows, n // rows); the rest dropped."""
    n = len(tokens) // rows
    return torch.from_numpy(np.asarray(tokens[:n * rows], dtype=np.int64)).view(rows, n)


@torch.no_grad()
def eval_with_memory(model, tokens, rows, seg_len):
    """Transformer-XL's evaluation phase: each stream read seg_len tokens at a time, its memory
    carried over (mem_len: the model's). Every token but each stream's first is predicted.
    Returns (sum of nll, predictions, seconds spent in the model)."""
    cfg = XLNetConfig(**{**model.config.__dict__, "seq_len": seg_len, "objective": "lm"})
    objective = PermutationLMObjective(cfg)
    streams = split_streams(tokens, rows)
    objective.mems = [None] * rows
    nll, count, seconds = 0.0, 0, 0.0
    for s in range(0, streams.size(1), seg_len):  # a short last segment is padded, the pads masked
        batch = objective.make_batch(list(streams[:, s:s + seg_len].numpy()), list(range(rows)),
                                     [objective.has_memory(r) for r in range(rows)], None)
        t = time.perf_counter()
        logits = objective.forward(model, batch)
        seconds += time.perf_counter() - t
        nll += float(F.cross_entropy(logits.flatten(0, 1), batch["target_ids"].flatten(),
                                     ignore_index=-100, reduction="sum"))
        count += int((batch["target_ids"] != -100).sum())
    return nll, count, seconds


@torch.no_grad()
def eval_sliding_window(model, tokens, rows, window):
    """The vanilla model's evaluation phase: for every token but each stream's first, one forward
    pass over the (up to) `window` tokens ending at it, predicting only it; the `rows` streams run
    as one batch. Early windows are left-padded (pads masked; relative distances ignore the offset).
    Returns (sum of nll, predictions, seconds spent in the model)."""
    streams = split_streams(tokens, rows)
    n = streams.size(1)
    is_target = torch.ones(window, dtype=torch.bool)
    is_target[0] = False
    # causal
    perm_mask = permutation_mask(torch.arange(window), is_target).expand(rows, window, window)
    target_mapping = torch.zeros(rows, 1, window)
    target_mapping[:, 0, -1] = 1.0  # predict the last token of each window
    pad = max(model.config.pad_token_id, 0)
    nll, count, seconds = 0.0, 0, 0.0
    for t in range(1, n):
        lo = max(0, t + 1 - window)
        # (rows, window), right-aligned
        ids = F.pad(streams[:, lo:t + 1], (window - (t + 1 - lo), 0), value=pad)
        attention_mask = (torch.arange(window) >= window - (t + 1 - lo)).long().expand(rows, window)
        start = time.perf_counter()
        logits, _ = model(ids, perm_mask=perm_mask, target_mapping=target_mapping,
                          attention_mask=attention_mask, bi_data=False)
        seconds += time.perf_counter() - start
        nll += float(F.cross_entropy(logits[:, 0], streams[:, t], reduction="sum"))
        count += rows
    return nll, count, seconds


# ----------------------------------------------------------------------------------------------------------------------
# The order views (slide "Split View of the Query Stream (Factorization order: 3 -> 2 -> 4 -> 1)"):
# for one order, what each prediction may see, from the model's own masks (attention_masks).
# `python experiments.py views` draws them.


def query_views(rank, is_target, mlen=0):
    """(mask_g, mask_h) for one sequence: (T, mlen + T) bool, True = hidden from query / content."""
    mask_h, mask_g = attention_masks(permutation_mask(rank, is_target)[None], None, mlen)
    return mask_g[0], mask_h[0]


# ----------------------------------------------------------------------------------------------------------------------
# Demo: what a run shows when it ends (train.py calls demo()). XLNet fills the blanks of a held-out
# line one at a time, in a random order, each seeing the context and the blanks filled before it.
# The order is a factorization order: this is eq. 3's product for one z, decoded greedily.


DEMO_TEXT = ("Friends, Romans, countrymen, lend me your ears;\n"
             "I come to bury Caesar, not to praise him.")


@dataclass
class DemoConfig:
    demo_text: str = DEMO_TEXT  # text the end-of-run demo fills blanks in (held-out Julius Caesar)
    demo_seed: int = 0  # which blanks and which order the demo draws


@torch.no_grad()
def fill_blanks(model, ids, seed=0):
    """Blank the tokens the objective would predict in ids (a list), then fill them greedily, one at
    a time, in a sampled order (left to right for objective "lm").
    Returns (is_target, the order of the target positions, the filled ids)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    if c.objective == "lm":
        rank, is_target = torch.arange(n), torch.ones(n, dtype=torch.bool)
        is_target[0] = False
    else:
        is_target = sample_targets(n, max(1, n // c.partial_k), g, c.max_span, c.mask_alpha)
        rank = sample_order(n, n, g)
    order = sorted(is_target.nonzero()[:, 0].tolist(), key=lambda i: int(rank[i]))
    device = next(model.parameters()).device
    x = torch.tensor(ids, device=device)
    # A placeholder: perm_mask hides it from every query that is not past it.
    x[is_target] = max(c.mask_token_id, 0)
    perm_mask = permutation_mask(rank, is_target).to(device)[None]
    was_training = model.training
    model.eval()
    for i in order:
        target_mapping = torch.zeros(1, 1, n, device=device)
        target_mapping[0, 0, i] = 1.0
        logits, _ = model(x[None], perm_mask=perm_mask, target_mapping=target_mapping, bi_data=False)
        x[i] = logits[0, 0].argmax()
    model.train(was_training)
    return is_target, order, x.tolist()


def demo(model, tokenizer, cfg, device):
    try:
        ids = tokenizer.encode(cfg.demo_text)
    except Exception as e:  # e.g. a char the vocabulary lacks: say so; never fail a finished run
        print(f"demo skipped: {e}")
        return
    if len(ids) < 2:
        return
    is_target, order, filled = fill_blanks(model, ids, cfg.demo_seed)
    show = lambda seq: tokenizer.decode(seq).replace("\n", " / ")
    right = sum(filled[i] == ids[i] for i in order)
    how = "left to right" if model.config.objective == "lm" else "in a random order"
    print("-" * 80)
    print(f"XLNet fills {len(order)} blanks of a held-out line one at a time, {how}, "
          f"each seeing the context and the blanks filled before it:")
    print("  blanks : " + "".join("_" * len(tokenizer.decode([t])) if is_target[i] else tokenizer.decode([t])
                                  for i, t in enumerate(ids)).replace("\n", " / "))
    print("  filled : " + show(filled))
    print("  truth  : " + show(ids))
    print(f"  {right}/{len(order)} blanks right; "
          f"order of the blanks: {' -> '.join(str(i) for i in order[:24])}"
          f"{' ...' if len(order) > 24 else ''}")
    print("-" * 80)


# ----------------------------------------------------------------------------------------------------------------------
# Command line: fill blanks with a trained checkpoint. The pictures and experiments: experiments.py.


@command
def main(argv=None):
    p = argparse.ArgumentParser(prog="xlnet.py", description=(
        "Fill the blanks of a text in a random order with an XLNet checkpoint written by train.py "
        "--model xlnet. The pictures and experiments: python experiments.py views | two-phase."))
    p.error = lambda message: require(False, f"{message} (see --help)")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fill",
                       help="fill blanks of a text in a random order with a trained checkpoint")
    f.error = p.error
    f.add_argument("--ckpt", default=os.path.join("out", "xlnet", "ckpt.pt"))
    f.add_argument("--text", default=DEMO_TEXT)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    import train  # the checkpoint format, shared by every model

    device = train.pick_device(args.device)
    model, tokenizer, _ = train.load_for_inference(args.ckpt, device, flag="--ckpt", model="xlnet")
    demo(model, tokenizer, DemoConfig(args.text, args.seed), device)


if __name__ == "__main__":
    main()
