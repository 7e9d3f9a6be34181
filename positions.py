"""
positions.py -- every positional encoding from the lecture, one readable block each.

Attention is permutation invariant: without help, "dog bites man" and "man bites dog" look alike.
The lecture's "Positional embeddings" slides list the ways to put order back. Here is each of them,
with the equation it computes, in the slides' order:

  1. absolute, added to the token embeddings (slides "Positional encoding", "Learned encoding")
       sinusoidal            Vaswani et al. 2017, "Attention Is All You Need", §3.5
       LearnedAbsolute       GPT-2's `wpe` (Radford et al. 2019); cannot extrapolate past its table
       probe_absolute_position, probe_relative_order, cosine_similarity_matrix
                             the slide "What do position embeddings learn?" (Wang & Chen 2020):
                             its two probes and its heatmap
  2. relative, inside attention (slide "Relative encoding")
       ShawRelative          Shaw et al. 2018, §3: learned key/value vectors of the clipped distance
       shaw_attention        attention with both, naive or fused (gpt.py's --pos shaw)
       t5_relative_bucket,   Raffel et al. 2020 (T5), §2.1: one learned scalar per head per
       T5RelativeBias        log-spaced distance bucket: relative encoding as a bias b_ij
       alibi_slopes, ALiBi   Press et al. 2022, §3: a fixed per-head linear penalty on distance
                             (slides "Attention with Linear Biases")
  3. rotary (slides "Rotary encoding"; RoFormer, Su et al. 2021, §3.4)
       rope_matrix           the block-diagonal rotation R^d_{Θ,m} (first slide)
       apply_rope            the element-wise cos/sin form (second slide)
       apply_rope_half_split the GPT-NeoX / LLaMA-HF layout of the same rotation
  4. Transformer-XL's relative sinusoid (slides "Transformer-XL", "XLNet")
       relative_sinusoid, relative_distances, rel_shift, transformer_xl_score:
                             Dai et al. 2019, §3.3, A^rel and its terms (a)-(d); XLNet reuses it
  5. demo: what each scheme computes on a toy sequence

How a model uses them (gpt.py's `--pos`):
  - absolute schemes return (T, C) vectors, ADDED to the token embeddings before the first block;
  - ALiBi, T5 and Shaw's key term return a LOGIT BIAS, (H, Tq, Tk) or (B, H, Tq, Tk). Every bias here
    is added to the already scaled scores q.k/sqrt(hs). That is where sdpa adds a float attn_mask,
    so one bias serves the naive path and the sdpa path;
  - RoPE rotates q and k (never v) before the dot product;
  - every function takes explicit positions. With L tokens in a KV cache, pass
    q_pos = arange(L, L+T) and k_pos = arange(0, L+T).

Legend:  B batch, H heads, T sequence length (Tq queries, Tk keys), hs head size, C model width,
         d the width of an encoding, k Shaw's clipping distance, m a slope (ALiBi) or a position.

Run
  python positions.py                  # print each scheme on a toy sequence
  python experiments.py extrapolate    # a GPT per scheme, scored at 1x..8x its training length
  python experiments.py probe          # the probes and heatmap of a trained position table
Tests: tests/test_positions.py (the schemes, the experiments); tests/test_gpt_positions.py (in gpt.py).
"""

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import command, require

# -----------------------------------------------------------------------------
# helpers shared by several schemes


def _check_even(dim, who):
    if dim <= 0 or dim % 2 != 0:
        raise ValueError(f"{who}: dim must be a positive even number (sin/cos pairs), got {dim}")


def _inverse_frequencies(dim, base=10000.0):
    """The d/2 frequencies of the sinusoid, RoPE and Transformer-XL: base^(-2i/d), i = 0..d/2-1.

    RoPE's slide writes them 1-indexed: theta_i = 10000^(-2(i-1)/d), i = 1..d/2.
    The first turns once per 2*pi positions, the last once per ~2*pi*base positions.

    >>> _inverse_frequencies(4)
    tensor([1.0000, 0.0100])
    """
    _check_even(dim, "_inverse_frequencies")
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (d/2,)


def _angles(pos, dim, base=10000.0):
    """The angle m*theta_i for every position m and pair i: (T, d/2).
    Trap: always float32. bf16 cannot even hold the position: it rounds 2001 to 2000."""
    freqs = _inverse_frequencies(dim, base).to(pos.device)
    return pos.to(torch.float32)[:, None] * freqs[None, :]  # (T, d/2)


def causal_mask(q_pos, k_pos):
    """(Tq, Tk) bool, True where query i may attend to key j: k_pos[j] <= q_pos[i].

    Written with positions, not `torch.tril`, so it stays right with a KV cache: the Tq new queries
    sit at L..L+Tq-1 and the keys at 0..L+Tq-1, where tril would be wrong.

    >>> causal_mask(torch.tensor([2]), torch.arange(4))  # a new token at 2, three keys cached
    tensor([[ True,  True,  True, False]])
    """
    return k_pos[None, :] <= q_pos[:, None]  # (Tq, Tk)


# -----------------------------------------------------------------------------
# 1. absolute position embeddings: a vector per position, added to the token embedding


def sinusoidal(n_pos, dim, base=10000.0):
    """Vaswani et al. 2017 §3.5, fixed and parameter-free:

        PE[pos, 2i]   = sin(pos / base^(2i/d))
        PE[pos, 2i+1] = cos(pos / base^(2i/d))

    Each pair of dimensions is a clock turning at its own speed. So PE[pos + c] is a fixed rotation
    of PE[pos], a linear function of it: the paper hoped attention would pick up offsets that way.
    It is also why a linear probe reads the position back (the slide's MAE 0.0 for "sinusoid").
    Returns (n_pos, dim): even dims sin, odd dims cos (interleaved, as in the paper).

    >>> sinusoidal(2, 4)  # position 0: sin 0 = 0, cos 0 = 1; position 1, frequencies 1 and 1/100
    tensor([[0.0000, 1.0000, 0.0000, 1.0000],
            [0.8415, 0.5403, 0.0100, 0.9999]])
    """
    if n_pos < 0:
        raise ValueError(f"sinusoidal: n_pos must be >= 0, got {n_pos}")
    _check_even(dim, "sinusoidal")
    return _sinusoid_at(torch.arange(n_pos), dim, base)


def _sinusoid_at(pos, dim, base=10000.0):
    ang = _angles(pos, dim, base)  # (T, d/2)
    pe = torch.empty(len(pos), dim, device=pos.device)
    pe[:, 0::2] = torch.sin(ang)
    pe[:, 1::2] = torch.cos(ang)
    return pe  # (T, d)


class SinusoidalAbsolute(nn.Module):
    """The sinusoid as a module, like LearnedAbsolute: forward(pos (T,)) -> (T, dim).

    No parameters, no buffer: each call recomputes the formula (T*dim sines, nothing next to a
    block). So it is defined at every position: nothing to outgrow at 4x the training length.
    """

    def __init__(self, n_pos, dim, base=10000.0):
        super().__init__()
        _check_even(dim, "SinusoidalAbsolute")
        self.n_pos, self.dim, self.base = n_pos, dim, base  # n_pos: only to match LearnedAbsolute

    def forward(self, pos):
        return _sinusoid_at(pos, self.dim, self.base)  # (T, dim)


class LearnedAbsolute(nn.Embedding):
    """A learned vector per position (GPT-2's `wpe`, BERT's position embeddings): P[pos] is free.

    An nn.Embedding, so a GPT's `wpe` keeps GPT-2's key `wpe.weight` and loads its checkpoints.
    The slide's trade-off: flexible, but n_pos*dim more parameters and no vector at all for a
    position >= n_pos: it cannot extrapolate. The caller says so in words (gpt.py's GPT.forward,
    before any lookup). A check here, on the data, would force a host sync and break
    torch.compile. Called with a position >= n_pos, nn.Embedding raises its own IndexError.

    >>> LearnedAbsolute(4, 2)(torch.arange(3)).shape
    torch.Size([3, 2])
    """

    def reset_parameters(self):
        # N(0, 0.02), GPT-2's initializer_range. Done here, not after __init__, this draws as many
        # random values as a plain nn.Embedding: a seeded GPT gets the same weights either way.
        nn.init.normal_(self.weight, mean=0.0, std=0.02)


def _folds(n, folds, seed):
    """Seeded k-fold split of range(n): [(train index, test index)], each item tested once."""
    if not 2 <= folds <= n:
        raise ValueError(f"need 2 <= folds <= {n} items, got folds={folds}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = perm.tensor_split(folds)
    return [(torch.cat(parts[:k] + parts[k + 1:]), parts[k]) for k in range(folds)]


def probe_absolute_position(emb, folds=5, seed=0):
    """How much absolute position a table of position embeddings carries, as one number.

    Wang & Chen 2020, "What do position embeddings learn?", the slide's "Absolute" table (sinusoid
    0.0, GPT-2 1.03, RoBERTa 6.06, BERT 34.14): a least-squares linear regression from emb[p] to p,
    rounded to whole positions; the held-out mean absolute error. They probe the first 512
    positions (the caller slices). emb: (n_pos, d).
    5-fold cross-validation over positions (seeded), as in the paper: a table cannot score 0 by
    recalling the positions it was fitted on. With d + 1 > the training positions, lstsq returns
    the minimum-norm solution, as the paper's solver does. Float64, with an intercept.

    >>> round(probe_absolute_position(sinusoidal(512, 128)), 2)
    0.0
    """
    n_pos = emb.shape[0]
    X = torch.cat([emb.detach().to(torch.float64).cpu(), torch.ones(n_pos, 1, dtype=torch.float64)], dim=1)
    y = torch.arange(n_pos, dtype=torch.float64)
    err = torch.zeros(n_pos, dtype=torch.float64)
    for tr, te in _folds(n_pos, folds, seed):
        w = torch.linalg.lstsq(X[tr], y[tr, None], driver="gelsd").solution  # (d+1, 1)
        err[te] = (X[te] @ w).squeeze(1).round().sub(y[te]).abs()
    return err.mean().item()


def probe_relative_order(emb, n_pairs=None, folds=5, seed=0, l2=1.0):
    """How well a LINEAR classifier reads the order of two positions from their embeddings.

    Wang & Chen 2020's relative probe, the slide's "Relative" table (GPT-2 1.56%, sinusoid 5.08%,
    RoBERTa 7.23%, BERT 19.72%; chance is 50%): the held-out error rate of an L2-regularised
    logistic regression on [emb[i]; emb[j]] predicting "i < j".
    The paper's protocol: n_pairs = n_pos random pairs of distinct positions (seeded), 5-fold
    cross-validation, loss = sum of log-losses + l2 * ||w||^2 / 2 (scikit-learn's default C = 1;
    intercept not penalised). Few pairs and no feature scaling keep even the sinusoid above 0%.
    Trap: test pairs mostly reuse positions seen in training. So n_pos random vectors in d >= n_pos
    dimensions (independent: they can encode any function of position) score well below chance.
    Compare with a random table of the same shape, not with 50%.

    Solved exactly by Newton's method in float64. With fewer training pairs than features, the
    optimal w lies in the span of the training rows (the penalty only grows outside it). An SVD
    rotates onto that span first: an (n_train, n_train) problem instead of (2d, 2d).

    >>> probe_relative_order(torch.arange(64.)[:, None]) < 0.05  # position written in one coordinate
    True
    """
    n_pos = emb.shape[0]
    n_pairs = n_pairs or n_pos
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(n_pos, (2, 4 * n_pairs), generator=g)
    keep = (i != j).nonzero().squeeze(1)[:n_pairs]  # distinct pairs: "i < j" means nothing for i == j
    i, j = i[keep], j[keep]
    E = emb.detach().to(torch.float64).cpu()
    X, y = torch.cat([E[i], E[j]], dim=1), (i < j).to(torch.float64)  # (n_pairs, 2d), (n_pairs,)
    wrong = 0
    for tr, te in _folds(len(y), folds, seed):
        U, S, Vh = torch.linalg.svd(X[tr], full_matrices=False)  # X_tr = U S Vh; w = Vh^T beta
        ones = lambda n: torch.ones(n, 1, dtype=torch.float64)  # the intercept's column
        Z_tr = torch.cat([U * S, ones(len(tr))], dim=1)  # (n_tr, r + 1)
        Z_te = torch.cat([X[te] @ Vh.T, ones(len(te))], dim=1)
        reg = torch.full((Z_tr.shape[1],), l2, dtype=torch.float64)
        reg[-1] = 0.0  # no penalty on the intercept

        def objective(b):
            log_loss = F.binary_cross_entropy_with_logits(Z_tr @ b, y[tr], reduction="sum")
            return log_loss + 0.5 * (reg * b * b).sum()

        b = torch.zeros(Z_tr.shape[1], dtype=torch.float64)
        for _ in range(100):
            p = torch.sigmoid(Z_tr @ b)
            grad = Z_tr.T @ (p - y[tr]) + reg * b
            hess = (Z_tr.T * (p * (1 - p))) @ Z_tr + torch.diag(reg)
            hess = hess + 1e-12 * torch.eye(len(b), dtype=torch.float64)
            step, t = torch.linalg.solve(hess, grad), 1.0
            while objective(b - t * step) > objective(b) and t > 1e-8:  # backtracking: never worse
                t /= 2
            b = b - t * step
            if (t * step).abs().max() < 1e-10:
                break
        wrong += ((Z_te @ b > 0).to(torch.float64) != y[te]).sum().item()
    return wrong / len(y)


def cosine_similarity_matrix(emb):
    """(n, n) cosine similarity between every pair of rows: the slide's position-embedding heatmap.
    cosine_similarity_matrix(torch.tensor([[1., 0.], [1., 1.]]))[0, 1] -> 0.7071"""
    e = F.normalize(emb.detach().float(), dim=-1)
    return e @ e.T


# -----------------------------------------------------------------------------
# 2a. Shaw et al. 2018: learned relative key and value vectors


class ShawRelative(nn.Module):
    """Relation-aware self-attention with relative positions (Shaw et al. 2018, §3.1-3.2, eqs. 3-4):

        e_ij = q_i . (k_j + a^K_ij) / sqrt(hs)          (eq. 4: the key sees the relative position)
        z_i  = sum_j alpha_ij (v_j + a^V_ij)            (eq. 3: so does the value)
        a^K_ij = w^K_{clip(j - i, -k, k)},   a^V_ij = w^V_{clip(j - i, -k, k)}

    w^K, w^V: 2k+1 learned vectors of size hs, shared by the heads of a layer (as in the paper).
    Every offset beyond k is "far": the model tells apart nearby positions only, which is also why
    it runs on sequences longer than it was trained on. The slide: f_k(x_n, n) = W_k(x_n + p~^k_r).

    The two relative terms, split off from ordinary attention (the paper's §3.3):
        score_bias(q, q_pos, k_pos)   -> (B, H, Tq, Tk) = q_i . a^K_ij / sqrt(hs), ALREADY SCALED:
                                         a logit bias (naive path) or sdpa's float attn_mask;
        value_term(att, q_pos, k_pos) -> (B, H, Tq, hs) = sum_j alpha_ij a^V_ij, added to att @ v.
    Both work per distance bucket, never per (i, j, hs): q @ w^K^T gives each query's 2k+1 key
    terms, a gather places them; alpha is summed per bucket (scatter_add) before touching w^V.

    sdpa and the value term: the fused kernel never returns the probabilities alpha, and the value
    term weights alpha by a vector that depends on (i, j). It is not alpha @ V for any one V, so no
    extra sdpa call computes it. shaw_attention therefore passes the key term as attn_mask, lets
    the kernel compute the content, and recomputes alpha (one softmax over the same logits) for the
    value term only. Both paths stay one model, at the price of one more (B, H, Tq, Tk) matrix (the
    dense attn_mask costs one anyway). values=False is the keys-only variant, fully fused (Shaw et
    al.'s §4.3 ablation suggests a^K alone may suffice).

    >>> ShawRelative.relative_index(torch.arange(4), torch.arange(4), 2)  # clip(j - i, -2, 2) + 2
    tensor([[2, 3, 4, 4],
            [1, 2, 3, 4],
            [0, 1, 2, 3],
            [0, 0, 1, 2]])
    """

    def __init__(self, head_dim, max_distance, values=True):
        super().__init__()
        if max_distance < 0:
            raise ValueError(f"ShawRelative: max_distance (k) must be >= 0, got {max_distance}")
        self.head_dim, self.max_distance, self.values = head_dim, max_distance, values
        self.w_K = nn.Embedding(2 * max_distance + 1, head_dim)  # row r holds w^K_{r - k}
        nn.init.normal_(self.w_K.weight, std=0.02)
        if values:
            self.w_V = nn.Embedding(2 * max_distance + 1, head_dim)
            nn.init.normal_(self.w_V.weight, std=0.02)

    @staticmethod
    def relative_index(q_pos, k_pos, max_distance):
        """Row of w^K / w^V used by pair (i, j): clip(k_pos[j] - q_pos[i], -k, k) + k, shape (Tq, Tk)."""
        rel = k_pos[None, :] - q_pos[:, None]  # (Tq, Tk), positive = key after query
        return rel.clamp(-max_distance, max_distance) + max_distance

    def score_bias(self, q, q_pos, k_pos):
        """q: (B, H, Tq, hs) -> (B, H, Tq, Tk) = q_i . a^K_ij / sqrt(hs), added to the scaled logits."""
        B, H, Tq, hs = q.shape
        idx = self.relative_index(q_pos, k_pos, self.max_distance)  # (Tq, Tk)
        per_bucket = q @ self.w_K.weight.T  # (B, H, Tq, 2k+1): q_i . w^K_r for every bucket r
        bias = per_bucket.gather(-1, idx.expand(B, H, Tq, idx.shape[1]))  # (B, H, Tq, Tk)
        return bias / math.sqrt(hs)

    def value_term(self, att, q_pos, k_pos):
        """att: (B, H, Tq, Tk) attention probabilities (zeros where masked).
        Returns (B, H, Tq, hs) = sum_j alpha_ij a^V_ij."""
        if not self.values:
            raise ValueError("ShawRelative(values=False) has no value embeddings; skip value_term")
        idx = self.relative_index(q_pos, k_pos, self.max_distance).expand_as(att)  # (B, H, Tq, Tk)
        mass = att.new_zeros(*att.shape[:-1], 2 * self.max_distance + 1)  # (B, H, Tq, 2k+1)
        mass.scatter_add_(-1, idx, att)  # attention mass each query puts on each clipped distance
        return mass @ self.w_V.weight  # (B, H, Tq, hs)


def shaw_attention(q, k, v, shaw, q_pos, k_pos, causal=True, use_sdpa=False, allowed=None, dropout=None):
    """Multi-head attention with Shaw's relative positions, naive or fused (gpt.py's --pos shaw).

    naive:  att = softmax(q k^T / sqrt(hs) + bias + mask);  y = att @ v + value_term(att)
    sdpa:   y = sdpa(q, k, v, attn_mask=bias + mask)       (content + key term, fused)
            + value_term(softmax(same logits))             (alpha recomputed: see ShawRelative)
    q: (B, H, Tq, hs); k, v: (B, H, Tk, hs). Returns (B, H, Tq, hs).
    allowed: bool, True where query i may see key j, (Tq, Tk) or (B, 1, Tq, Tk) (a prefix LM's).
    Default: causal_mask(q_pos, k_pos), or every key if causal=False. Elsewhere the mask is -inf.
    dropout: the attention's nn.Dropout, or None. Trap: on the sdpa path the recomputed alpha draws
    its own dropout mask, not the kernel's: the same model in expectation, not the same sample.
    """
    hs = q.shape[-1]
    bias = shaw.score_bias(q, q_pos, k_pos).to(q.dtype)  # (B, H, Tq, Tk), already / sqrt(hs)
    if allowed is None and causal:
        allowed = causal_mask(q_pos, k_pos)
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    drop = dropout if dropout is not None else nn.Identity()
    if use_sdpa:
        p = dropout.p if dropout is not None and dropout.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # mask added after scaling
        if shaw.values:
            att = drop(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hs) + bias, dim=-1))
    else:
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, H, Tq, Tk)
        att = drop(torch.softmax(scores + bias, dim=-1))
        y = att @ v
    if shaw.values:
        y = y + shaw.value_term(att, q_pos, k_pos)  # (B, H, Tq, hs): sum_j alpha_ij a^V_ij (eq. 3)
    return y


# -----------------------------------------------------------------------------
# 2b. T5: one learned scalar per head per (log-spaced) distance bucket


def t5_relative_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's bucketing of relative positions (Raffel et al. 2020 §2.1; the released T5 code's).

    relative_position = key position - query position (negative: the key is in the past).
    Its size n is mapped to a bucket:
      - bidirectional: half of the buckets for keys before the query, half (offset by
        num_buckets/2) for keys after it. Causal: the future is clamped to 0, all buckets serve the past;
      - of a direction's B buckets, the first B/2 are exact (n = 0, 1, ..., B/2 - 1);
      - the rest are log-spaced, capped at B - 1 (every n >= max_distance shares the last):
        bucket = B/2 + floor(log(n / (B/2)) / log(max_distance / (B/2)) * (B - B/2)).
    Fine near the query, coarse far away: 1 and 2 tokens back differ, 100 and 110 do not.
    Trap: bidirectional puts keys AFTER the query in the upper half (the sign of key - query).

    >>> t5_relative_bucket(torch.tensor([-3, -1, 0, 1, 3, 20, 200]))  # 16 per side, 8 of them exact
    tensor([ 3,  1,  0, 17, 19, 26, 31])
    >>> t5_relative_bucket(torch.tensor([-3, -20, -200, 5]), bidirectional=False)  # 32 buckets, future -> 0
    tensor([ 3, 17, 31,  0])
    """
    if num_buckets < (4 if bidirectional else 2) or max_distance < 1:
        raise ValueError(f"t5_relative_bucket: need num_buckets >= {4 if bidirectional else 2} and "
                         f"max_distance >= 1, got {num_buckets}, {max_distance}")
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets  # keys after the query: upper half
        n = relative_position.abs()
    else:
        n = (-relative_position).clamp(min=0)  # distance into the past; the future collapses onto 0
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # Log-spaced buckets. The clamp only guards log(0) in lanes that is_small discards. The float32
    # operations are T5's, in T5's order: an offset on a bucket boundary rounds as in T5.
    n_large = n.clamp(min=max_exact).float()
    large = max_exact + (torch.log(n_large / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, n, large)


class T5RelativeBias(nn.Module):
    """T5's learned relative attention bias: bias[h, i, j] = b[bucket(k_pos[j] - q_pos[i]), h].

    The "Relative encoding" slide's last step, a scalar bias instead of vectors:
    q_m.k_n = x_m^T W_q^T W_k x_n + b_ij, with b_ij a function of the bucketed offset only.
    T5 computes it once, in the first layer, and reuses it in all layers.
    T5 does not scale q.k by 1/sqrt(hs) (its init absorbs it). Here, like every bias in this file,
    it is added to the scaled logits. A causal decoder (T5's too) uses bidirectional=False: no
    bucket is wasted on the masked future. The table's name is T5's: `relative_attention_bias`.

    forward(q_pos (Tq,), k_pos (Tk,)) -> (H, Tq, Tk).
    """

    def __init__(self, n_heads, num_buckets=32, max_distance=128, bidirectional=True):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bidirectional = bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)
        nn.init.normal_(self.relative_attention_bias.weight, std=0.02)

    def forward(self, q_pos, k_pos):
        rel = k_pos[None, :] - q_pos[:, None]  # (Tq, Tk)
        buckets = t5_relative_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)  # (Tq, Tk, H) -> (H, Tq, Tk)


# -----------------------------------------------------------------------------
# 2c. ALiBi: no position embeddings at all, a fixed linear penalty on distance


def alibi_slopes(n_heads):
    """ALiBi's per-head slopes m (Press et al. 2022 §3).

    n a power of two: the geometric sequence with start and ratio 2^(-8/n): m_h = 2^(-8h/n).
    Otherwise (the rule of the paper's code): the slopes of P, the power of two below n, then the
    remaining n - P heads take every other slope of the 2P sequence: its odd terms
    2^(-8(2j-1)/(2P)), which interleave with the first list.
    A large slope makes a head look locally, a small one almost globally.

    >>> alibi_slopes(8) * 256  # 1/2, 1/4, ..., 1/256
    tensor([128.,  64.,  32.,  16.,   8.,   4.,   2.,   1.])
    >>> alibi_slopes(6)  # 4 heads' slopes, then 2^-1, 2^-3 from the 8-head sequence
    tensor([0.2500, 0.0625, 0.0156, 0.0039, 0.5000, 0.1250])
    """
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"alibi_slopes: n_heads must be a positive int, got {n_heads!r}")

    def geometric(n):  # n a power of two
        start = 2.0 ** (-8.0 / n)
        return [start ** h for h in range(1, n + 1)]

    P = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = geometric(P) + geometric(2 * P)[0::2][: n_heads - P]
    return torch.tensor(slopes, dtype=torch.float32)  # (H,)


def _linear_bias(slopes, q_pos, k_pos):
    neg_dist = -(q_pos[:, None] - k_pos[None, :]).abs()  # (Tq, Tk): j - i for past keys; ints: no -0.0
    return slopes[:, None, None] * neg_dist.to(slopes.dtype)  # (H, Tq, Tk)


def alibi_bias(n_heads, q_pos, k_pos):
    """ALiBi's bias, (H, Tq, Tk): bias[h, i, j] = -m_h * (q_pos[i] - k_pos[j]) for past keys.

    The slide's figure: query i's scores get m * [-(i-1), ..., -2, -1, 0] added. A key after the
    query gets -m_h * |i - j| (the symmetric extension). A causal model masks those keys: this
    bias is NOT that mask.

    >>> alibi_bias(2, torch.arange(3), torch.arange(3))[0]  # slope 1/16
    tensor([[ 0.0000, -0.0625, -0.1250],
            [-0.0625,  0.0000, -0.0625],
            [-0.1250, -0.0625,  0.0000]])
    """
    return _linear_bias(alibi_slopes(n_heads).to(q_pos.device), q_pos, k_pos)


class ALiBi(nn.Module):
    """alibi_bias as a module: forward(q_pos (Tq,), k_pos (Tk,)) -> (H, Tq, Tk). The slopes are a
    non-persistent buffer: they follow .to(device) but stay out of the state dict (no parameters)."""

    def __init__(self, n_heads):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def forward(self, q_pos, k_pos):
        return _linear_bias(self.slopes, q_pos, k_pos)


# -----------------------------------------------------------------------------
# 3. RoPE: rotate q and k by an angle proportional to the position


def rope_matrix(pos, dim, base=10000.0):
    """The slide's R^d_{Θ,m}: for each position m a (dim, dim) block-diagonal matrix, whose i-th
    2x2 block is [[cos m theta_i, -sin m theta_i], [sin m theta_i, cos m theta_i]].
    theta_i = base^(-2(i-1)/d). Returns (T, dim, dim). For teaching: dim^2 per position, where
    apply_rope costs dim.

    Why it encodes relative position (RoFormer §3.4): R_m is a rotation, so R_m^T R_n = R_{n-m},
    and (R_m q) . (R_n k) = q^T R_{n-m} k depends on n - m only. The slide:
    f_q(x_m, m) . f_k(x_n, n) = g(x_m, x_n, m-n).

    >>> rope_matrix(torch.tensor([1]), 2)[0]  # one pair, theta_1 = 1, position 1
    tensor([[ 0.5403, -0.8415],
            [ 0.8415,  0.5403]])
    """
    _check_even(dim, "rope_matrix")
    ang = _angles(pos, dim, base)  # (T, d/2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    R = torch.zeros(len(pos), dim, dim, device=pos.device)
    i = torch.arange(0, dim, 2, device=pos.device)  # first row/column of each 2x2 block
    R[:, i, i], R[:, i, i + 1] = cos, -sin
    R[:, i + 1, i], R[:, i + 1, i + 1] = sin, cos
    return R  # (T, d, d)


def apply_rope_matrix(x, pos, base=10000.0):
    """x: (..., T, dim) -> R_{pos[t]} x[..., t, :] for every t, as matrix-vector products."""
    R = rope_matrix(pos, x.shape[-1], base).to(x.dtype)  # (T, d, d)
    return torch.einsum("tij,...tj->...ti", R, x)


def apply_rope(x, pos, base=10000.0):
    """RoPE in the element-wise form of the second RoPE slide: no matrix, two products and a sum.
    The pairs are interleaved, (x1, x2), (x3, x4), ...:

        R x = x * [cos m theta_1, cos m theta_1, cos m theta_2, cos m theta_2, ...]
            + [-x2, x1, -x4, x3, ...] * [sin m theta_1, sin m theta_1, sin m theta_2, ...]

    x: (..., T, head_dim), e.g. q or k, (B, H, T, hs); pos: (T,) the positions of those T rows
    (with a KV cache: arange(L, L + T)). Apply it to q and k after the projection, never to v.
    A rotation keeps norms: RoPE changes which keys a query prefers, not the size of anything.

    >>> apply_rope(torch.tensor([[1., 0.]]), torch.tensor([1]))  # (1, 0) rotated by 1 radian
    tensor([[0.5403, 0.8415]])
    """
    _check_even(x.shape[-1], "apply_rope")
    ang = _angles(pos, x.shape[-1], base)  # (T, d/2)
    cos = torch.cos(ang).repeat_interleave(2, dim=-1).to(x.dtype)  # (T, d): c1 c1 c2 c2 ...
    sin = torch.sin(ang).repeat_interleave(2, dim=-1).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # odd and even coordinates of the slide (1-indexed)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)  # (..., T, d): -x2, x1, -x4, x3, ...
    return x * cos + rotated * sin


def apply_rope_half_split(x, pos, base=10000.0):
    """The same rotation in the GPT-NeoX / LLaMA (Hugging Face) layout: pair i is (x_i, x_{i+d/2}),
    not (x_{2i-1}, x_{2i}). "rotate_half" = [-x_back, x_front] rotates the second half into the first.

    Same frequencies, same angles: only which coordinates form a pair differs. Hence, with
    P = half_split_permutation(d):
        apply_rope_half_split(x[..., P], pos) == apply_rope(x, pos)[..., P]
    Permuting q and k together leaves q.k unchanged: the scores are identical once the output rows
    of W_q and W_k are permuted by P. Trap: weights trained in one layout, loaded into code using
    the other without that permutation, silently scramble positions (hence the permutation of
    W_q, W_k in LLaMA's conversion scripts).

    >>> half_split_permutation(6)
    tensor([0, 2, 4, 1, 3, 5])
    """
    d = x.shape[-1]
    _check_even(d, "apply_rope_half_split")
    ang = _angles(pos, d, base)  # (T, d/2)
    cos = torch.cos(ang).repeat(1, 2).to(x.dtype)  # (T, d): c1 c2 ... c1 c2 ...
    sin = torch.sin(ang).repeat(1, 2).to(x.dtype)
    front, back = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-back, front), dim=-1) * sin


def half_split_permutation(dim):
    """P with x_half = x_interleaved[..., P]: the pairs' first coordinates, then their second ones."""
    _check_even(dim, "half_split_permutation")
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))


# -----------------------------------------------------------------------------
# 4. Transformer-XL's relative sinusoid (Dai et al. 2019 §3.3); XLNet (Yang et al. 2019) reuses it
#
#   A^rel_ij = q_i . k_j           (a) content: E_xi^T W_q^T W_kE E_xj
#            + q_i . r_{i-j}       (b) content-dependent position bias: E_xi^T W_q^T W_kR R_{i-j}
#            + u . k_j             (c) global content bias
#            + v . r_{i-j}         (d) global position bias
#
# R_{i-j} is a fixed sinusoid of the DISTANCE i - j, never of a position: the previous segment's
# memory is reused without renumbering. r = W_kR R is its projection (per head); u, v are learned
# vectors in the query's place where its position used to be. Computed naively, (b)+(d) needs an
# r per (i, j) pair. Instead: (q_i + v) . r_d for every query and every distance d of a list, a
# (qlen, rlen) matrix; then `rel_shift` slides row i so that column j lands on distance i - j.


def relative_distances(qlen, klen, bidirectional=False):
    """Distances the relative sinusoid is evaluated at, in Transformer-XL's descending order.

    The queries are the last qlen of the klen keys (the first mlen = klen - qlen: the memory).
    Causal (Transformer-XL, XLNet attn_type='uni'): klen-1, ..., 1, 0 (rlen = klen).
    Bidirectional (XLNet attn_type='bi', keys after the query too): klen-1, ..., 0, ..., -(qlen-1)
    (rlen = klen + qlen - 1). XLNet's own list starts at klen, a distance no pair uses.

    >>> relative_distances(2, 3), relative_distances(2, 3, bidirectional=True)
    (tensor([2, 1, 0]), tensor([ 2,  1,  0, -1]))
    """
    if not 0 < qlen <= klen:
        raise ValueError(f"relative_distances: need 0 < qlen <= klen, got qlen={qlen}, klen={klen}")
    end = -qlen if bidirectional else -1
    return torch.arange(klen - 1, end, -1)


def relative_sinusoid(distances, dim, base=10000.0):
    """R_d for each distance d: Vaswani's sinusoid at d, laid out [sin ... | cos ...] as in
    Transformer-XL's and XLNet's code, not interleaved like `sinusoidal`. Only their checkpoints
    care (W_kR's input columns follow the layout). Returns (rlen, dim).

    >>> relative_sinusoid(torch.tensor([1, 0]), 4)
    tensor([[0.8415, 0.0100, 0.5403, 0.9999],
            [0.0000, 0.0000, 1.0000, 1.0000]])
    """
    _check_even(dim, "relative_sinusoid")
    ang = _angles(distances, dim, base)  # (rlen, d/2)
    return torch.cat((torch.sin(ang), torch.cos(ang)), dim=-1)


def rel_shift(x, klen):
    """x[..., i, m], query i's score against distance entry m -> out[..., i, j], its score against
    key j's distance: out[i, j] = x[i, j + qlen - 1 - i] (row i slides left by qlen - 1 - i).

    The released code's trick, with no gather: pad a zero column on the left, read the
    (qlen, rlen + 1) buffer as (rlen + 1, qlen), drop its first row, read it as (qlen, rlen).
    Row i moves by one more element than row i - 1: the slide. Keep the first klen columns.
    Trap: causal (rlen = klen), the entries of future keys j > mlen + i are garbage (wrapped
    values or the zero pad): the causal mask comes after the shift.

    >>> x = torch.tensor([[0., 1, 2], [10, 11, 12]])  # qlen 2, klen 3: distances [2, 1, 0]
    >>> rel_shift(x, 3)  # query 0 (at 1): key 0 -> x[0, 1]; key 1 -> x[0, 2]; key 2: future
    tensor([[ 1.,  2.,  0.],
            [10., 11., 12.]])
    """
    *lead, qlen, rlen = x.shape
    x = F.pad(x, (1, 0))  # (..., qlen, rlen + 1)
    x = x.reshape(*lead, rlen + 1, qlen)[..., 1:, :]  # the memory read as (rlen + 1, qlen); drop row 0
    return x.reshape(*lead, qlen, rlen)[..., :klen]  # (..., qlen, klen)


def transformer_xl_score(q, k, r, u, v):
    """The four-term relative attention score A^rel of Transformer-XL §3.3, unscaled and unmasked.

    q: (B, H, qlen, hs)  W_q x for the current segment
    k: (B, H, klen, hs)  W_kE x over [memory; segment]
    r: (H, rlen, hs)     W_kR R, R = relative_sinusoid(relative_distances(qlen, klen, bidir), C)
    u, v: (H, hs)        the learned global biases of terms (c) and (d)
    Returns (B, H, qlen, klen) = (a)+(c) + rel_shift((b)+(d)). As in the paper's code, the caller
    scales by 1/sqrt(hs), masks (also the causal case's garbage future entries), and softmaxes.
    """
    ac = (q + u[:, None, :]) @ k.transpose(-2, -1)  # (B, H, qlen, klen): terms (a) + (c)
    bd = (q + v[:, None, :]) @ r.transpose(-2, -1)  # (B, H, qlen, rlen): terms (b) + (d), per distance
    return ac + rel_shift(bd, k.shape[-2])


# -----------------------------------------------------------------------------
# 5. a look at each scheme: `python positions.py` (the experiments: experiments.py extrapolate, probe)


def demo(T=6, n_heads=4):
    """Print what each scheme computes on a toy sequence of T positions."""
    torch.set_printoptions(precision=3, sci_mode=False, linewidth=120)
    pos = torch.arange(T)
    print("sinusoidal(T, 8): row = position, even cols sin, odd cols cos\n", sinusoidal(T, 8))
    mae = probe_absolute_position(sinusoidal(512, 768))
    print("linear-probe MAE of sinusoidal(512, 768):", round(mae, 4))
    print(f"alibi_slopes({n_heads}):", alibi_slopes(n_heads))
    print("ALiBi bias of head 0 (rows = queries; a causal model sees the lower triangle)\n",
          alibi_bias(n_heads, pos, pos)[0])
    rel = torch.arange(-T + 1, T)
    print("offset (key - query):        ", rel.tolist())
    print("T5 bucket, bidirectional:    ", t5_relative_bucket(rel).tolist())
    print("T5 bucket, causal:           ", t5_relative_bucket(rel, bidirectional=False).tolist())
    far = torch.tensor([-8, -12, -16, -32, -64, -127, -128, -1000])
    print("far offsets", far.tolist(), "-> causal buckets", t5_relative_bucket(far, False).tolist())
    print("Shaw clipped-distance index (k=2): row = query, col = key\n",
          ShawRelative.relative_index(pos, pos, 2))
    torch.manual_seed(0)
    q, k = torch.randn(1, 8), torch.randn(1, 8)
    for m, n in [(0, 3), (5, 8), (100, 103)]:
        s = (apply_rope(q, torch.tensor([m])) @ apply_rope(k, torch.tensor([n])).T).item()
        print(f"RoPE score q at {m:3d}, k at {n:3d} (offset {n - m}): {s:.5f}")
    print("Transformer-XL distances, qlen 3 klen 5:", relative_distances(3, 5).tolist(),
          " bidirectional:", relative_distances(3, 5, True).tolist())


@command
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    require(argv in ([], ["demo"]), f"{' '.join(argv)}: positions.py only prints its demo. The experiments: "
                                    f"`python experiments.py extrapolate`, `python experiments.py probe`")
    demo()


if __name__ == "__main__":
    main()
