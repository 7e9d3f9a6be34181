"""Tests for positions.py: each scheme checked against its defining property, an independent naive computation, or
a reference implementation (transformers' T5 bucketing), two computations of one thing compared in float64 with a
tolerance scaled to their magnitude; then its experiments (experiments.py extrapolate and probe) on tiny budgets."""

import doctest
import math

import pytest
import torch

import experiments
import positions
import train
from positions import (
    ALiBi, LearnedAbsolute, ShawRelative, SinusoidalAbsolute, T5RelativeBias, alibi_bias, alibi_slopes,
    apply_rope, apply_rope_half_split, apply_rope_matrix, causal_mask, half_split_permutation,
    probe_absolute_position, rel_shift, relative_distances, relative_sinusoid, rope_matrix, shaw_attention,
    sinusoidal, t5_relative_bucket, transformer_xl_score,
)
from helpers import assert_paths_agree, assert_scaled_close, exit_code


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_docstring_worked_examples_are_true():
    result = doctest.testmod(positions, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10, "positions.py lost its worked examples"
    assert result.failed == 0, f"{result.failed} worked example(s) in positions.py docstrings print something else"


# ---------------------------------------------------------------------------- absolute


def test_sinusoidal_follows_vaswani_formula():
    n_pos, d = 50, 16
    pe = sinusoidal(n_pos, d)
    assert pe.shape == (n_pos, d), "sinusoidal(n_pos, dim) must return (n_pos, dim)"
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            w = 1.0 / 10000 ** (2 * i / d)
            assert math.isclose(pe[pos, 2 * i].item(), math.sin(pos * w), abs_tol=1e-5), \
                f"PE[{pos}, {2 * i}] is not sin(pos / 10000^(2i/d))"
            assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(pos * w), abs_tol=1e-5), \
                f"PE[{pos}, {2 * i + 1}] is not cos(pos / 10000^(2i/d))"
    mod = SinusoidalAbsolute(8, d)
    assert sum(p.numel() for p in mod.parameters()) == 0, "the sinusoid must have no parameters"
    assert torch.equal(mod(torch.arange(n_pos)), pe), "SinusoidalAbsolute must agree with sinusoidal, also past n_pos"


def test_sinusoid_linear_probe_recovers_absolute_position():
    mae_sin = probe_absolute_position(sinusoidal(1024, 768))
    assert mae_sin < 0.05, f"linear probe on the sinusoid should recover position (lecture: MAE 0.0), got {mae_sin:.3f}"
    # the probe must be able to fail: embeddings with no positional content give a large held-out error
    mae_rand = probe_absolute_position(torch.randn(1024, 768))
    assert mae_rand > 50, f"probe on random embeddings should be uninformative (MAE >> 0), got {mae_rand:.2f}"


def test_learned_absolute_is_gpt2_wpe_and_refuses_to_extrapolate():
    wpe = LearnedAbsolute(16, 8)
    assert isinstance(wpe, torch.nn.Embedding) and list(wpe.state_dict()) == ["weight"], \
        "LearnedAbsolute must be an nn.Embedding with a single 'weight' (GPT-2's wpe.weight key)"
    assert torch.equal(wpe(torch.arange(3)), wpe.weight[:3]), "LearnedAbsolute must look up row pos"
    assert abs(wpe.weight.std().item() - 0.02) < 0.01, "LearnedAbsolute starts at GPT-2's N(0, 0.02)"
    with pytest.raises(IndexError):  # no row 16; gpt.py turns this into a sentence before the lookup
        wpe(torch.arange(20))


def test_bad_dimensions_give_one_line_errors():
    with pytest.raises(ValueError, match="even"):
        sinusoidal(4, 7)
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(2, 5), torch.arange(2))
    with pytest.raises(ValueError, match="positive int"):
        alibi_slopes(0)


# ---------------------------------------------------------------------------- RoPE


def test_rope_elementwise_form_equals_matrix_form():
    x = torch.randn(2, 3, 10, 16, dtype=torch.float64)  # (B, H, T, hs)
    pos = torch.arange(5, 15)
    assert_scaled_close(apply_rope(x, pos), apply_rope_matrix(x, pos), "element-wise RoPE vs the matrix form")


def test_rope_matrix_is_block_diagonal_rotation():
    R = rope_matrix(torch.arange(4), 8)  # (T, d, d)
    eye = torch.eye(8).expand(4, 8, 8)
    assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-6), "R_m must be orthogonal (a rotation)"
    block = torch.block_diag(*[torch.ones(2, 2)] * 4).bool()
    assert (R[:, ~block] == 0).all(), "R_m must be zero outside its 2x2 diagonal blocks"
    assert torch.allclose(R[0], torch.eye(8)), "position 0 must not rotate"


def test_rope_score_depends_only_on_relative_offset():
    hs = 32
    q, k = torch.randn(hs, dtype=torch.float64), torch.randn(hs, dtype=torch.float64)
    rot = lambda x, m: apply_rope(x[None], torch.tensor([m]))[0]
    # The angles are float32 whatever x is (positions._angles), so a shift by c moves each by ~c * 2^-24 radians:
    # the tolerance is relative to |q| |k|, the largest a score can be.
    tol = 1e-5 * (q.norm() * k.norm()).item()
    for m, n in [(0, 0), (3, 7), (10, 2)]:
        ref = rot(q, m) @ rot(k, n)
        for c in (1, 17, 500):
            s = rot(q, m + c) @ rot(k, n + c)
            assert abs(s - ref) <= tol, \
                f"RoPE score q_{m}.k_{n} = {ref:.6f} changed to {s:.6f} when both shifted by {c}"
    # and it does depend on the offset (otherwise the property above would be vacuous)
    assert abs(rot(q, 0) @ rot(k, 1) - rot(q, 0) @ rot(k, 5)) > 100 * tol, "RoPE score ignores the offset"


def test_rope_preserves_norms():
    x = torch.randn(4, 64, 16, dtype=torch.float64)
    y = apply_rope(x, torch.arange(64))
    # cos and sin are float32 whatever x is (positions._angles): cos^2 + sin^2 = 1 only to ~1e-7
    assert_scaled_close(x.norm(dim=-1), y.norm(dim=-1), "RoPE must preserve vector norms (a rotation)", rel=1e-6)


def test_rope_half_split_is_interleaved_up_to_a_permutation():
    d = 12
    x = torch.randn(2, 7, d, dtype=torch.float64)
    pos = torch.arange(7)
    P = half_split_permutation(d)
    assert_scaled_close(apply_rope_half_split(x[..., P], pos), apply_rope(x, pos)[..., P],
                        "half-split RoPE on permuted coordinates vs interleaved RoPE, permuted")
    q, k = torch.randn(7, d, dtype=torch.float64), torch.randn(7, d, dtype=torch.float64)
    s_inter = apply_rope(q, pos) @ apply_rope(k, pos).T
    s_half = apply_rope_half_split(q[:, P], pos) @ apply_rope_half_split(k[:, P], pos).T
    assert_scaled_close(s_inter, s_half, "attention scores must not depend on the pair layout")
    assert not torch.allclose(apply_rope_half_split(x, pos), apply_rope(x, pos), atol=1e-3), \
        "the two layouts should differ on unpermuted input (else the permutation test proves nothing)"


def test_rope_with_kv_cache_offset_matches_full_sequence():
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    full = apply_rope(x, torch.arange(10))
    tail = apply_rope(x[:, 6:], torch.arange(6, 10))  # 6 tokens cached, 4 new ones
    assert_scaled_close(full[:, 6:], tail, "rotating new tokens at offset positions vs the full pass")


# ---------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_alibi_slopes_power_of_two_are_geometric(n):
    expected = torch.tensor([2.0 ** (-8.0 * h / n) for h in range(1, n + 1)])
    assert torch.allclose(alibi_slopes(n), expected), f"{n} heads: slopes must be 2^(-8h/n), h=1..{n}"


def test_alibi_slopes_for_8_heads_are_halves_to_1_over_256():
    assert alibi_slopes(8).tolist() == [1 / 2 ** h for h in range(1, 9)], "8 heads: slopes must be 1/2, ..., 1/256"


@pytest.mark.parametrize("n", [3, 5, 6, 7, 12, 20, 24])
def test_alibi_slopes_non_power_of_two_follow_the_paper(n):
    # Paper's rule, rewritten independently: P = largest power of two <= n; the P geometric slopes 2^(-8h/P), then
    # the odd-numbered terms 2^(-8(2j-1)/(2P)) = 2^(-4(2j-1)/P), j = 1..n-P, of the 2P sequence.
    P = 1 << (n.bit_length() - 1)
    expected = [2.0 ** (-8.0 * h / P) for h in range(1, P + 1)] + \
               [2.0 ** (-4.0 * (2 * j - 1) / P) for j in range(1, n - P + 1)]
    got = alibi_slopes(n)
    assert got.shape == (n,), f"{n} heads must get {n} slopes"
    assert torch.allclose(got, torch.tensor(expected)), f"{n} heads: slopes {got.tolist()} break the paper's rule"
    assert len(set(got.tolist())) == n, f"{n} heads: slopes must be distinct"


def test_alibi_bias_is_linear_distance_penalty_and_kv_cache_consistent():
    H, T = 4, 9
    pos = torch.arange(T)
    b = alibi_bias(H, pos, pos)
    m = alibi_slopes(H)
    assert b.shape == (H, T, T), "alibi_bias must be (H, Tq, Tk)"
    for h in range(H):
        for i in range(T):
            for j in range(i + 1):
                assert math.isclose(b[h, i, j].item(), -m[h].item() * (i - j), abs_tol=1e-6), \
                    f"ALiBi bias[{h},{i},{j}] must be -m_h * (i - j)"
    assert torch.equal(ALiBi(H)(pos, pos), b), "ALiBi module must equal alibi_bias"
    assert list(ALiBi(H).state_dict()) == [], "ALiBi has no parameters to save"
    step = alibi_bias(H, torch.tensor([T - 1]), pos)  # one decoding step after T-1 cached tokens
    assert torch.equal(step, b[:, -1:, :]), "a cached decode step must see the same bias as the full pass"


def test_causal_mask_uses_positions():
    m = causal_mask(torch.arange(3, 5), torch.arange(5))
    assert m.tolist() == [[True, True, True, True, False], [True] * 5], "causal mask wrong with a KV-cache offset"


# ---------------------------------------------------------------------------- T5


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20), (10, 7), (64, 300)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_t5_reference(num_buckets, max_distance, bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-600, 601)[:, None] + torch.tensor([0, 3])[None, :]  # both directions, 2-D input
    ours = t5_relative_bucket(rel, bidirectional, num_buckets, max_distance)
    ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                                max_distance=max_distance)
    bad = (ours != ref).nonzero()
    assert len(bad) == 0, (f"T5 buckets differ from T5's function (bidirectional={bidirectional}, "
                           f"num_buckets={num_buckets}, max_distance={max_distance}) at offsets "
                           f"{rel[tuple(bad.T)][:5].tolist()}")
    assert ours.min() >= 0 and ours.max() < num_buckets, "bucket ids must lie in [0, num_buckets)"


def test_t5_bias_looks_up_bucket_per_head_and_is_translation_invariant():
    H = 3
    mod = T5RelativeBias(H, num_buckets=16, max_distance=32, bidirectional=False)
    q_pos, k_pos = torch.arange(4, 9), torch.arange(9)
    b = mod(q_pos, k_pos)
    assert b.shape == (H, 5, 9), "T5RelativeBias must return (H, Tq, Tk)"
    W = mod.relative_attention_bias.weight  # (num_buckets, H)
    for i, qp in enumerate(q_pos.tolist()):
        for j, kp in enumerate(k_pos.tolist()):
            bucket = t5_relative_bucket(torch.tensor(kp - qp), False, 16, 32)
            assert torch.equal(b[:, i, j], W[bucket]), f"bias at (q={qp}, k={kp}) is not the row of its bucket"
    assert torch.equal(mod(q_pos + 100, k_pos + 100), b), "T5 bias must depend on k - q only"


# ---------------------------------------------------------------------------- Shaw


def _naive_shaw(q, k, v, shaw, q_pos, k_pos, causal, allowed=None):
    """Shaw et al. eqs. 3-4 with explicit loops over (i, j); allowed (Tq, Tk) replaces the causal rule if given."""
    B, H, Tq, hs = q.shape
    Tk = k.shape[2]
    kk = shaw.max_distance
    aK = lambda i, j: shaw.w_K.weight[max(-kk, min(kk, int(k_pos[j] - q_pos[i]))) + kk]
    aV = lambda i, j: shaw.w_V.weight[max(-kk, min(kk, int(k_pos[j] - q_pos[i]))) + kk]
    e = torch.full((B, H, Tq, Tk), float("-inf"), dtype=q.dtype)
    key_term = torch.zeros(B, H, Tq, Tk, dtype=q.dtype)
    for i in range(Tq):
        for j in range(Tk):
            key_term[:, :, i, j] = q[:, :, i] @ aK(i, j) / math.sqrt(hs)
            visible = bool(allowed[i, j]) if allowed is not None else (not causal or k_pos[j] <= q_pos[i])
            if visible:
                e[:, :, i, j] = (q[:, :, i] * (k[:, :, j] + aK(i, j))).sum(-1) / math.sqrt(hs)
    alpha = torch.softmax(e, dim=-1)
    z = torch.zeros(B, H, Tq, hs, dtype=q.dtype)
    value_term = torch.zeros(B, H, Tq, hs, dtype=q.dtype)
    for i in range(Tq):
        for j in range(Tk):
            z[:, :, i] += alpha[:, :, i, j, None] * (v[:, :, j] + aV(i, j))
            value_term[:, :, i] += alpha[:, :, i, j, None] * aV(i, j)
    return key_term, value_term, alpha, z


def _qkv(B=2, H=3, Tq=6, Tk=6, hs=8):
    return (torch.randn(B, H, Tq, hs, dtype=torch.float64), torch.randn(B, H, Tk, hs, dtype=torch.float64),
            torch.randn(B, H, Tk, hs, dtype=torch.float64))


def test_shaw_key_and_value_terms_equal_naive_loop():
    shaw = ShawRelative(head_dim=8, max_distance=2).double()
    with torch.no_grad():  # make the relative vectors as large as the content so a wrong index shows
        shaw.w_K.weight.normal_()
        shaw.w_V.weight.normal_()
    q, k, v = _qkv(Tq=4, Tk=7)
    q_pos, k_pos = torch.arange(3, 7), torch.arange(7)  # 3 cached keys, 4 new queries
    key_ref, val_ref, alpha, _ = _naive_shaw(q, k, v, shaw, q_pos, k_pos, causal=True)
    assert_scaled_close(shaw.score_bias(q, q_pos, k_pos), key_ref, "Shaw key term vs q_i . a^K_ij / sqrt(hs)")
    assert_scaled_close(shaw.value_term(alpha, q_pos, k_pos), val_ref, "Shaw value term vs sum_j alpha_ij a^V_ij")


@pytest.mark.parametrize("use_sdpa", [False, True])
@pytest.mark.parametrize("values", [True, False])
def test_shaw_attention_both_paths_equal_naive_loop(use_sdpa, values):
    shaw = ShawRelative(head_dim=8, max_distance=3, values=values).double()
    with torch.no_grad():
        shaw.w_K.weight.normal_()
        if values:
            shaw.w_V.weight.normal_()
    q, k, v = _qkv(Tq=7, Tk=7)
    pos = torch.arange(7)
    if values:
        _, _, _, z_ref = _naive_shaw(q, k, v, shaw, pos, pos, causal=True)
    else:
        att = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(8) + shaw.score_bias(q, pos, pos))
                            .masked_fill(~causal_mask(pos, pos), float("-inf")), -1)
        z_ref = att @ v
    z = shaw_attention(q, k, v, shaw, pos, pos, causal=True, use_sdpa=use_sdpa)
    assert_scaled_close(z, z_ref, f"Shaw attention ({'sdpa' if use_sdpa else 'naive'} path, values={values}) vs "
                                  f"eqs. 3-4")
    # causality: changing the last token must not change earlier outputs
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 1.0
    v2[:, :, -1] += 1.0
    z2 = shaw_attention(q, k2, v2, shaw, pos, pos, causal=True, use_sdpa=use_sdpa)
    assert_scaled_close(z2[:, :, :-1], z[:, :, :-1], "Shaw attention leaks the future")


@pytest.mark.parametrize("values", [True, False])
def test_shaw_attention_naive_and_sdpa_agree_in_outputs_and_gradients(values):
    pos = torch.arange(7)

    def build(path):
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.shaw = ShawRelative(head_dim=8, max_distance=3, values=values)
        with torch.no_grad():  # relative vectors as large as the content
            for p in model.shaw.parameters():
                p.normal_()
        model.qkv = torch.nn.Parameter(torch.randn(3, 2, 3, 7, 8))  # q, k, v: (B, H, T, hs) each
        model.use_sdpa = path == "sdpa"
        return model

    def run(model):
        q, k, v = model.qkv
        y = shaw_attention(q, k, v, model.shaw, pos, pos, use_sdpa=model.use_sdpa)
        return y, (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()

    assert_paths_agree(build, run)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_shaw_attention_takes_any_mask_such_as_a_prefix_lms(use_sdpa):
    shaw = ShawRelative(head_dim=8, max_distance=2).double()
    with torch.no_grad():
        shaw.w_K.weight.normal_()
        shaw.w_V.weight.normal_()
    q, k, v = _qkv(Tq=6, Tk=6)
    pos = torch.arange(6)
    allowed = causal_mask(pos, pos) | (pos[None, :] < 3)  # the first 3 tokens (a prefix) are seen by every query
    _, _, _, z_ref = _naive_shaw(q, k, v, shaw, pos, pos, causal=True, allowed=allowed)
    z = shaw_attention(q, k, v, shaw, pos, pos, use_sdpa=use_sdpa, allowed=allowed)
    assert_scaled_close(z, z_ref, f"Shaw attention with a prefix-LM mask ({'sdpa' if use_sdpa else 'naive'})")
    off = torch.nn.Dropout(0.5).eval()  # a model in eval mode: its dropout changes nothing
    z_eval = shaw_attention(q, k, v, shaw, pos, pos, use_sdpa=use_sdpa, allowed=allowed, dropout=off)
    assert torch.equal(z_eval, z), "attention dropout in eval mode must be the identity"


# ---------------------------------------------------------------------------- Transformer-XL


@pytest.mark.parametrize("qlen,klen,bidirectional", [(4, 4, False), (3, 7, False), (4, 4, True), (3, 6, True)])
def test_rel_shift_puts_distance_i_minus_j_in_column_j(qlen, klen, bidirectional):
    mlen = klen - qlen
    dist = relative_distances(qlen, klen, bidirectional)  # (rlen,)
    x = torch.randn(2, qlen, len(dist))
    out = rel_shift(x, klen)
    assert out.shape == (2, qlen, klen), "rel_shift must return (..., qlen, klen)"
    for i in range(qlen):
        for j in range(klen):
            d = mlen + i - j  # query i sits at absolute position mlen + i
            if not bidirectional and d < 0:
                continue  # future key: garbage by design, masked by the caller
            m = (dist == d).nonzero().item()
            assert torch.equal(out[:, i, j], x[:, i, m]), f"rel_shift put the wrong distance at (i={i}, j={j})"


@pytest.mark.parametrize("qlen,mlen,bidirectional", [(5, 0, False), (4, 3, False), (4, 2, True)])
def test_transformer_xl_score_equals_four_term_double_loop(qlen, mlen, bidirectional):
    B, H, hs, C = 2, 2, 4, 16
    klen = qlen + mlen
    q = torch.randn(B, H, qlen, hs, dtype=torch.float64)
    k = torch.randn(B, H, klen, hs, dtype=torch.float64)
    u, v = torch.randn(H, hs, dtype=torch.float64), torch.randn(H, hs, dtype=torch.float64)
    W_kR = torch.randn(C, H * hs, dtype=torch.float64)
    R = relative_sinusoid(relative_distances(qlen, klen, bidirectional), C).double()  # (rlen, C)
    r = (R @ W_kR).view(-1, H, hs).transpose(0, 1)  # (H, rlen, hs)
    score = transformer_xl_score(q, k, r, u, v)
    assert score.shape == (B, H, qlen, klen)
    checked = 0
    for i in range(qlen):
        for j in range(klen):
            d = mlen + i - j
            if not bidirectional and d < 0:
                continue
            r_d = (relative_sinusoid(torch.tensor([d]), C).double() @ W_kR).view(H, hs)  # W_kR R_{i-j}
            a = (q[:, :, i] * k[:, :, j]).sum(-1)
            b = (q[:, :, i] * r_d).sum(-1)
            c = (u * k[:, :, j]).sum(-1)
            dd = (v * r_d).sum(-1)
            assert_scaled_close(score[:, :, i, j], a + b + c + dd,
                                f"Transformer-XL score at (i={i}, j={j}, distance {d}) vs (a)+(b)+(c)+(d)")
            checked += 1
    assert checked >= qlen, "no pairs were checked"


def test_relative_sinusoid_is_sinusoid_in_sin_then_cos_layout():
    d = 10
    dist = torch.arange(6)
    P = half_split_permutation(d)  # interleaved -> [evens | odds] = [sin | cos]
    assert torch.allclose(relative_sinusoid(dist, d), sinusoidal(6, d)[:, P]), \
        "relative_sinusoid must be the Vaswani sinusoid with all sines first, then all cosines"


# ----------------------------------------------------------------------------------------------------------------------
# positions.py's command line, and its experiments (experiments.py extrapolate, probe) on tiny budgets


def test_positions_prints_its_demo_and_points_to_the_experiments(capsys):
    positions.main([])
    assert "alibi_slopes(4)" in capsys.readouterr().out
    assert exit_code(positions.main, ["extrapolate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("positions.py: error:") and "experiments.py extrapolate" in err and len(err.splitlines()) == 1


def test_extrapolation_experiment_runs_end_to_end(tmp_path, corpus, capsys):
    rows = experiments.main(["extrapolate", "--schemes", "learned,alibi", "--iters", "3", "--block-size", "16",
                             "--multiples", "1,2", "--eval-tokens", "256", "--data", str(corpus), "--out-dir",
                             str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--png",
                             str(tmp_path / "extrapolation.png")])
    printed = capsys.readouterr().out
    assert (tmp_path / "extrapolation.png").stat().st_size > 0, "the figure was not written"
    assert rows["learned"][2] is None and "n/a" in printed, "learned absolute at 2x must be reported as n/a"
    assert all(v is not None and 0 < v < 10 for v in rows["alibi"].values()), f"ALiBi losses missing: {rows}"


def test_probe_experiment_reads_a_train_py_checkpoint_and_an_hf_directory(tmp_path, corpus, capsys):
    import transformers

    out = tmp_path / "out"
    train.train(["--model", "gpt", "--preset", "tiny", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                 "--out-dir", str(out), "--sample-tokens", "0", "--max-iters", "2"])
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64,
                                                              vocab_size=50))
    hf.save_pretrained(tmp_path / "hf")
    table = experiments.main(["probe", "--ckpt", str(out / "ckpt.pt"), "--hf", str(tmp_path / "hf"),
                              "--png", str(tmp_path / "cos.png")])
    printed = capsys.readouterr().out
    assert (tmp_path / "cos.png").stat().st_size > 0, "the cosine-similarity figure was not written"
    names = [name for name, _, _ in table]
    assert len(names) == 4 and names[0].startswith("ours") and "untrained" in names[1] and "sinusoid" in names[2] \
        and names[3].startswith("hf:"), f"expected rows ours, untrained, sinusoid, hf; got {names}"
    sin_mae = next(mae for name, mae, _ in table if "sinusoid" in name)
    assert sin_mae < 0.05, f"the sinusoid row should have MAE ~0, got {sin_mae}"
    assert "MAE" in printed and "error" in printed, "the table must be printed"


def test_experiments_refuse_bad_input_in_one_line_and_write_nothing(tmp_path, corpus, capsys):
    train.train(["--model", "gpt", "--preset", "tiny", "--pos", "alibi", "--data", str(corpus), "--cache-dir",
                 str(tmp_path / "cache"), "--out-dir", str(tmp_path / "alibi"), "--sample-tokens", "0",
                 "--max-iters", "1"])
    capsys.readouterr()
    where = ["--out-dir", str(tmp_path / "runs"), "--png", str(tmp_path / "fig.png"), "--data", str(corpus),
             "--cache-dir", str(tmp_path / "cache2")]
    cases = [(["extrapolate", "--schemes", "learned,bogus"], "--schemes"),
             (["extrapolate", "--multiples", "1,x"], "--multiples"),
             (["extrapolate", "--multiples", "0,1"], "--multiples"),
             (["extrapolate", "--iters", "0"], "--iters"),
             (["probe", "--block-size", "1"], "--block-size"),
             (["probe", "--ckpt", str(tmp_path / "alibi" / "ckpt.pt")], "--pos alibi"),
             (["probe", "--ckpt", str(tmp_path / "missing.pt")], "no checkpoint"),
             (["probe", "--hf", str(tmp_path / "nothing")], "--hf"),
             (["extrapolate", "--iters", "two"], "--iters")]
    for argv, word in cases:
        code = exit_code(experiments.main, argv + where)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("experiments.py: error:") and word in err and len(err.splitlines()) == 1, \
            (argv, err)
        assert not (tmp_path / "runs").exists() and not (tmp_path / "fig.png").exists(), f"{argv}: wrote something"
