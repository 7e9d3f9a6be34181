"""What xlnet.py promises: parity with transformers' XLNetLMHeadModel (two segments with memory, perm_mask,
target_mapping, token types, padding) in float64, and planted convention errors fail it; export round-trips; the fused
and fast paths equal the readable ones; no target ever sees its own token or a later one in its order; perm_mask follows
the rank rule; the content stream sees itself and the query stream does not; about 1/K of the tokens are targets, in
spans; memory is the previous segment's layer inputs, detached, per row; evaluation starts from empty memory; training
resumes exactly through train.py; Transformer-XL's memory equals recomputation when nothing falls out of it; the
experiments (experiments.py views, two-phase) and the fill command run. Two computations of one thing are compared in
float64, with tolerances scaled to their magnitude (tests/helpers.py)."""

import json

import numpy as np
import pytest
import torch

import experiments
import train
import xlnet
from positions import rel_shift, relative_distances, relative_sinusoid
from xlnet import XLNet, XLNetConfig, permutation_mask, sample_order, sample_targets

from helpers import assert_paths_agree, assert_resumes, assert_scaled_close, exit_code, tiny_args


def small_config(**kw):
    base = dict(vocab_size=53, d_model=32, n_layer=2, n_head=4, d_inner=64, mem_len=6, seq_len=12, partial_k=4,
                dropout=0.0, pad_token_id=51, mask_token_id=52)
    return XLNetConfig(**{**base, **kw})


def redraw(model, std=0.3, seed=0):
    """Weights re-drawn at a large std: at the init std 0.02 every activation is tiny and convention errors hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def random_plm_inputs(B, T, P, vocab, seed, dtype=torch.float32):
    """A batch as the objective builds it: (ids, token types, perm_mask, target_mapping, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    types = torch.randint(0, 2, (B, T), generator=g)
    pm, tm = torch.zeros(B, T, T, dtype=dtype), torch.zeros(B, P, T, dtype=dtype)
    for b in range(B):
        is_target = sample_targets(T, P, g, max_span=3, alpha=3)
        pm[b] = permutation_mask(sample_order(T, T, g), is_target).to(dtype)
        where = is_target.nonzero()[:, 0]
        tm[b, torch.arange(P), where] = 1
    tm[-1, -1] = 0  # one empty prediction row (the original pads num_predict this way)
    am = torch.ones(B, T, dtype=torch.long)
    am[-1, -2:] = 0  # and some padding
    return ids, types, pm, tm, am


# ----------------------------------------------------------------------------------------------------------------------
# Parity with transformers' XLNetLMHeadModel (the oracle), float64 for both models


@pytest.fixture(scope="module")
def transformers():
    """The oracle (a test requirement), imported only by the tests that use it: ~3 s of imports that the others, and
    the xlnet-permutation assignment built from them, do without."""
    import transformers
    return transformers


@pytest.fixture
def hf_float64(monkeypatch, transformers):
    """transformers' XLNet builds its relative encoding in float32 whatever the model's dtype, which fails in float64;
    the patch casts it, values unchanged."""
    from transformers.models.xlnet import modeling_xlnet
    real = modeling_xlnet.XLNetModel.relative_positional_encoding
    monkeypatch.setattr(modeling_xlnet.XLNetModel, "relative_positional_encoding",
                        lambda self, *a, **k: real(self, *a, **k).to(self.dtype))


@pytest.fixture
def hf_dir(tmp_path, hf_float64, transformers):
    """A random XLNetLMHeadModel, weights at std 0.3, saved as transformers saves it."""
    torch.manual_seed(0)
    cfg = transformers.XLNetConfig(vocab_size=53, d_model=32, n_layer=2, n_head=4, d_inner=64, mem_len=6, dropout=0.0)
    hf = redraw(transformers.XLNetLMHeadModel(cfg).eval())
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", hf


# Parity in float64 with one float32 input on each side by design: the relative sinusoid (ours: positions._angles,
# always float32; transformers': float32, cast by hf_float64). The two differ by ~1e-7 in the sinusoid, ~5e-9 in the
# outputs; a convention error is off by > 1e-3 (test_planted_convention_errors_fail_parity).
PARITY = 1e-7


def two_segments(model_call, segments):
    """Run two consecutive segments, the second with the first's memory: [(logits, mems), (logits, mems)]."""
    out, mems = [], None
    for seg in segments:
        logits, mems = model_call(seg, mems)
        out.append((logits, mems))
    return out


def test_matches_transformers_over_two_segments_with_memory_in_every_path(hf_dir):
    path, hf = hf_dir
    hf = hf.double()
    segments = [random_plm_inputs(3, 8, 3, 53, seed) for seed in (1, 2)]

    def hf_call(seg, mems):
        ids, types, pm, tm, am = seg
        r = hf(ids, token_type_ids=types, perm_mask=pm.double(), target_mapping=tm.double(), attention_mask=am.double(),
               mems=mems, use_mems=True)
        return r.logits, r.mems

    with torch.no_grad():
        ref = two_segments(hf_call, segments)
        ref_h = hf(segments[0][0], token_type_ids=segments[0][1]).logits  # no target_mapping: the content stream
    for attn in ("naive", "sdpa"):
        for query_stream in ("all", "gather"):
            ours = XLNet.from_pretrained(str(path), attn=attn, query_stream=query_stream).double().eval()

            def our_call(seg, mems):
                ids, types, pm, tm, am = seg
                return ours(ids, token_type_ids=types, perm_mask=pm, target_mapping=tm.double(), mems=mems,
                            attention_mask=am)

            with torch.no_grad():
                got = two_segments(our_call, segments)
            path_name = f"{attn}, query_stream={query_stream}"
            for s, ((g_logits, g_mems), (r_logits, r_mems)) in enumerate(zip(got, ref)):
                assert_scaled_close(g_logits, r_logits, f"segment {s + 1} logits vs XLNetLMHeadModel ({path_name})",
                                    PARITY)
                for layer, (a, b) in enumerate(zip(g_mems, r_mems)):
                    assert_scaled_close(a, b.transpose(0, 1), f"segment {s + 1} memory of layer {layer} ({path_name})",
                                        PARITY)
            with torch.no_grad():
                got_h, _ = ours(segments[0][0], token_type_ids=segments[0][1])
            assert_scaled_close(got_h, ref_h, f"content-stream logits, no target_mapping ({path_name})", PARITY)


@pytest.mark.parametrize("mistake", ["flipped distance sign", "interleaved sin/cos"])
def test_planted_convention_errors_fail_parity(hf_dir, monkeypatch, mistake):
    # The test above must be able to fail: the two classic mistakes of a relative sinusoid are caught by a wide margin.
    path, hf = hf_dir
    hf = hf.double()
    if mistake == "flipped distance sign":
        wrong = lambda q, k, d, c=-1: relative_sinusoid(-relative_distances(q, k, bidirectional=True), d)
    else:
        wrong = lambda q, k, d, c=-1: torch.stack(  # sin, cos, sin, cos, ... (positions.sinusoidal's layout)
            relative_sinusoid(relative_distances(q, k, bidirectional=True), d).view(-1, 2, d // 2).unbind(1),
            dim=-1).reshape(-1, d)
    ids, types, pm, tm, am = random_plm_inputs(2, 8, 3, 53, seed=3)
    ours = XLNet.from_pretrained(str(path)).double().eval()
    with torch.no_grad():
        ref = hf(ids, perm_mask=pm.double(), target_mapping=tm.double()).logits
        right, _ = ours(ids, perm_mask=pm, target_mapping=tm.double())
        monkeypatch.setattr(xlnet, "relative_encoding", wrong)
        bad, _ = ours(ids, perm_mask=pm, target_mapping=tm.double())
    scale = ref.abs().max()
    assert (right - ref).abs().max() / scale < 1e-8, "the unmodified model must match"
    assert (bad - ref).abs().max() / scale > 1e-3, f"a {mistake} went unnoticed by the parity comparison"


def test_bi_data_matches_transformers_with_the_second_half_of_the_batch_backward(tmp_path, hf_float64, transformers):
    # XLNet's pretraining default (the original's bi_data=True): rows B/2.. read negated relative distances. Hugging
    # Face's flag does the same; from_pretrained takes it from the config. Two segments with memory, clamp_len < klen.
    torch.manual_seed(0)
    cfg = transformers.XLNetConfig(vocab_size=53, d_model=32, n_layer=2, n_head=4, d_inner=64, mem_len=6, dropout=0.0,
                                   bi_data=True, clamp_len=5)
    hf = redraw(transformers.XLNetLMHeadModel(cfg).eval())
    hf.save_pretrained(tmp_path / "hf")
    hf = hf.double()
    segments = [random_plm_inputs(4, 8, 3, 53, seed) for seed in (1, 2)]
    with torch.no_grad():
        ref = two_segments(lambda s, m: (lambda r: (r.logits, r.mems))(hf(
            s[0], token_type_ids=s[1], perm_mask=s[2].double(), target_mapping=s[3].double(), attention_mask=s[4],
            mems=m, use_mems=True)), segments)
    for attn, query_stream in (("naive", "all"), ("sdpa", "gather")):
        ours = XLNet.from_pretrained(str(tmp_path / "hf"), attn=attn, query_stream=query_stream).double().eval()
        assert ours.config.bi_data, "from_pretrained must read bi_data from the config"
        with torch.no_grad():
            got = two_segments(lambda s, m: ours(s[0], s[1], s[2], s[3].double(), m, s[4]), segments)
            forward_only = two_segments(lambda s, m: ours(s[0], s[1], s[2], s[3].double(), m, s[4], bi_data=False),
                                        segments)
        for s, ((g, g_mems), (r, r_mems)) in enumerate(zip(got, ref)):
            assert_scaled_close(g, r, f"segment {s + 1} logits vs XLNetLMHeadModel, bi_data ({attn}, {query_stream})",
                                PARITY)
            for layer, (a, b) in enumerate(zip(g_mems, r_mems)):
                assert_scaled_close(a, b.transpose(0, 1), f"segment {s + 1} memory of layer {layer}, bi_data", PARITY)
        # the first half reads forward, the second half does not: the comparison above is not vacuous
        for s, ((g, _), (f, _)) in enumerate(zip(got, forward_only)):
            assert_scaled_close(g[:2], f[:2], f"segment {s + 1}: bi_data changed the forward rows (the first half)")
            assert (g[2:] - f[2:]).abs().max() > 1e-3 * f.abs().max(), \
                f"segment {s + 1}: the backward rows (the second half) read the forward distances"


def test_a_backward_row_reads_its_reversed_text_at_the_texts_own_distances():
    # Negating the distances of a row that holds its text reversed gives back the text's own distances: with no
    # memory, the reversed row (tokens, perm_mask and target_mapping flipped) predicts exactly as the forward row.
    torch.manual_seed(0)
    model = redraw(XLNet(small_config(bi_data=True)), std=0.3).double().eval()
    ids, types, pm, tm, am = random_plm_inputs(1, 8, 3, 53, seed=5, dtype=torch.float64)
    both = lambda fwd, bwd: torch.cat([fwd, bwd])
    with torch.no_grad():
        logits, _ = model(both(ids, ids.flip(1)), both(types, types.flip(1)), both(pm, pm.flip(1, 2)),
                          both(tm, tm.flip(2)))
    assert_scaled_close(logits[1], logits[0], "the reversed row with negated distances vs the forward row")


def test_export_round_trips_through_transformers(tmp_path, hf_float64, transformers):
    torch.manual_seed(0)
    ours = redraw(XLNet(small_config(vocab_size=41, pad_token_id=40))).double().eval()
    ours.export_hf(str(tmp_path / "export"))
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["model_type"] == "xlnet" and cfg["vocab_size"] == 41 and cfg["mem_len"] == 6
    hf = transformers.XLNetLMHeadModel.from_pretrained(str(tmp_path / "export")).double().eval()
    segments = [random_plm_inputs(2, 8, 2, 41, seed, dtype=torch.float64) for seed in (4, 5)]
    with torch.no_grad():
        got = two_segments(lambda s, m: ours(s[0], s[1], s[2], s[3], m, s[4]), segments)
        ref = two_segments(lambda s, m: (lambda r: (r.logits, r.mems))(hf(
            s[0], token_type_ids=s[1], perm_mask=s[2], target_mapping=s[3], mems=m, attention_mask=s[4],
            use_mems=True)), segments)
        for (g, _), (r, _) in zip(got, ref):
            assert_scaled_close(r, g, "transformers' logits from our export vs ours", PARITY)
        back = XLNet.from_pretrained(str(tmp_path / "export")).double().eval()
        again = two_segments(lambda s, m: back(s[0], s[1], s[2], s[3], m, s[4]), segments)
    for (a, _), (b, _) in zip(again, got):
        assert torch.equal(a, b), "export -> from_pretrained is not the identity"


def test_from_pretrained_refuses_other_checkpoints(tmp_path, transformers):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=8))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="not XLNet"):
        XLNet.from_pretrained(str(tmp_path / "gpt2"))
    cfg = transformers.XLNetConfig(vocab_size=11, d_model=8, n_layer=1, n_head=2, d_inner=16, attn_type="uni")
    transformers.XLNetLMHeadModel(cfg).save_pretrained(tmp_path / "uni")
    with pytest.raises(ValueError, match="attn_type"):
        XLNet.from_pretrained(str(tmp_path / "uni"))


# ----------------------------------------------------------------------------------------------------------------------
# Fast paths equal the readable ones


@pytest.mark.parametrize("fast", [dict(attn="sdpa"), dict(query_stream="gather"),
                                  dict(attn="sdpa", query_stream="gather")])
def test_fused_and_gathered_paths_equal_the_readable_one_in_outputs_and_gradients(fast):
    torch.manual_seed(0)
    weights = redraw(XLNet(small_config()), std=0.1).state_dict()
    configs = {"readable": dict(attn="naive", query_stream="all"),
               "fast": {"attn": "naive", "query_stream": "all", **fast}}

    def build(path):
        model = XLNet(small_config(**configs[path]))
        model.load_state_dict(weights)
        return model

    ids, types, pm, tm, am = random_plm_inputs(3, 8, 3, 53, seed=7, dtype=torch.float64)
    mems = [torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2)]

    def run(model):
        logits, new_mems = model(ids, types, pm, tm, mems, am)
        weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)
        return (logits, *new_mems), (logits * weights).sum()

    assert_paths_agree(build, run, paths=("readable", "fast"))


def test_gather_shift_of_the_positions_in_order_is_rel_shift():
    x = torch.randn(2, 3, 5, 5 + 7 - 1)  # (B, H, qlen 5, R) with klen 7
    in_order = torch.arange(5).expand(2, 5)
    assert torch.equal(xlnet.gather_shift(x, in_order, 7), rel_shift(x, 7)), "gather_shift must generalise rel_shift"
    assert xlnet.gather_shift(torch.tensor([[[[0., 1, 2, 3]]]]), torch.tensor([[0]]), 3).tolist() == [[[[1., 2, 3]]]]


# ----------------------------------------------------------------------------------------------------------------------
# The permutation objective's properties


def test_no_target_ever_sees_its_own_token_or_a_later_one_for_many_random_orders():
    torch.manual_seed(0)
    T, P, V = 12, 4, 53
    g = torch.Generator().manual_seed(11)
    for trial in range(20):
        cfg = small_config(attn=("naive", "sdpa")[trial % 2], query_stream=("gather", "all")[trial // 2 % 2])
        model = redraw(XLNet(cfg), std=0.2, seed=trial).double().eval()
        ids = torch.randint(0, V, (T,), generator=g)
        is_target = sample_targets(T, P, g, max_span=3, alpha=2)
        rank = sample_order(T, T if trial % 3 else 4, g)  # also the original's blockwise permutation
        pm = permutation_mask(rank, is_target)
        where = is_target.nonzero()[:, 0]
        tm = torch.zeros(1, P, T, dtype=torch.float64)
        tm[0, torch.arange(P), where] = 1
        mems = [torch.randn(1, 3, 32, generator=g, dtype=torch.float64) for _ in range(2)]
        # row p of the batch: the sequence with target p's own token and every token after it in the order re-drawn;
        # row P + p: with the tokens every target may see (the non-targets) re-drawn instead -- that must matter
        rows = []
        for i in where.tolist():
            hidden = is_target & (torch.where(is_target, rank, -1) >= rank[i])
            assert hidden[i], "a target must be hidden from itself"
            changed = ids.clone()
            changed[hidden] = (ids[hidden] + torch.randint(1, V, (int(hidden.sum()),), generator=g)) % V
            rows.append(changed)
        for _ in where:
            changed = ids.clone()
            changed[~is_target] = (ids[~is_target] + 1) % V
            rows.append(changed)
        batch = torch.stack([ids] + rows)  # (1 + 2P, T)
        n = len(batch)
        with torch.no_grad():
            logits, _ = model(batch, perm_mask=pm.expand(n, T, T), target_mapping=tm.expand(n, P, T),
                              mems=[m.expand(n, 3, 32) for m in mems])
        for p in range(P):
            assert_scaled_close(logits[1 + p, p], logits[0, p],
                                f"order {trial}: target {p} saw its own token or a later one ({cfg.attn}, "
                                f"{cfg.query_stream})")
            assert (logits[1 + P + p, p] - logits[0, p]).abs().max() > 1e-4, \
                f"order {trial}: target {p} ignores a token it may see: the test would pass vacuously"


def test_perm_mask_follows_the_rank_rule():
    # i may not attend j  <=>  j is a target and j does not come before i in the order (non-targets come first)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        T = int(torch.randint(2, 14, (1,), generator=g))
        rank = torch.randperm(T, generator=g)
        is_target = torch.rand(T, generator=g) < 0.4
        pm = permutation_mask(rank, is_target)
        for i in range(T):
            for j in range(T):
                before = (not is_target[j]) or (is_target[i] and rank[j] < rank[i])
                assert bool(pm[i, j]) == (not before), f"perm_mask[{i}, {j}] breaks the rank rule (targets " \
                                                       f"{is_target.tolist()}, ranks {rank.tolist()})"
    ex = permutation_mask(torch.tensor([1, 3, 0]), torch.tensor([True, False, True]))
    assert ex.long().tolist() == [[1, 0, 0], [1, 0, 1], [1, 0, 1]], "the docstring's example"


def test_the_content_stream_sees_itself_and_the_query_stream_does_not():
    rank, is_target = torch.tensor([2, 0, 1, 3]), torch.tensor([True, False, True, True])
    mask_h, mask_g = xlnet.attention_masks(permutation_mask(rank, is_target)[None], None, mlen=2)
    assert not mask_h[0, :, 2:].diagonal().any(), "h must always see its own position"
    assert mask_g[0, :, 2:].diagonal()[is_target].all(), "g must never see the token it predicts"
    assert not mask_h[0, :, :2].any() and not mask_g[0, :, :2].any(), "memory is visible to everyone"
    # and in the model: the content stream's output at a target changes with its own token, the query stream's does not
    torch.manual_seed(0)
    model = redraw(XLNet(small_config()), std=0.3).double().eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    other = ids.clone()
    other[0, 0] = 9  # the token of target 0
    pm = permutation_mask(rank, is_target)[None]
    tm = torch.tensor([[[1.0, 0, 0, 0]]], dtype=torch.float64)
    with torch.no_grad():
        h_a, _ = model(ids, perm_mask=pm)
        h_b, _ = model(other, perm_mask=pm)
        g_a, _ = model(ids, perm_mask=pm, target_mapping=tm)
        g_b, _ = model(other, perm_mask=pm, target_mapping=tm)
    assert (h_a[0, 0] - h_b[0, 0]).abs().max() > 1e-3, "the content stream must see its own token"
    assert_scaled_close(g_a, g_b, "the query stream saw the token it predicts")


def test_about_one_in_k_tokens_are_targets_in_spans_and_orders_are_permutations():
    g = torch.Generator().manual_seed(0)
    T, K = 64, 6
    masks = torch.stack([sample_targets(T, T // K, g) for _ in range(300)])
    assert (masks.sum(1) == T // K).all(), "every segment must have exactly seq_len // K targets (num_predict)"
    starts = masks & ~torch.cat([torch.zeros(300, 1, dtype=torch.bool), masks[:, :-1]], 1)
    mean_span = masks.sum().item() / starts.sum().item()
    assert 1.5 < mean_span < 3.5, f"targets must come in spans (mean length {mean_span:.2f})"
    per_position = masks.float().mean(0)
    assert per_position[:-1].min() > 0.02, "every position (but the last) must sometimes be a target"
    for perm_size in (64, 16):
        rank = sample_order(T, perm_size, g)
        assert sorted(rank.tolist()) == list(range(T)), "an order is a permutation of the positions"
        blocks = rank.view(-1, perm_size)
        assert (blocks.min(1).values == torch.arange(0, T, perm_size)).all(), "blocks keep their order"
        assert len({tuple((b - b.min()).tolist()) for b in blocks}) == 1, "every block is shuffled the same way"
    assert sample_order(4, 2, torch.Generator().manual_seed(0)).tolist() in ([0, 1, 2, 3], [1, 0, 3, 2])


def test_memory_is_the_previous_segments_layer_inputs_detached_and_trimmed_to_mem_len():
    torch.manual_seed(0)
    model = redraw(XLNet(small_config(mem_len=10)), std=0.1)  # train mode, parameters require grad
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for layer in
             model.transformer.layer]
    seg1, seg2 = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    _, mems1 = model(seg1)
    first = list(inputs)
    inputs.clear()
    _, mems2 = model(seg2, mems=mems1)
    for h in hooks:
        h.remove()
    for layer in range(2):
        assert mems1[layer].grad_fn is None and not mems1[layer].requires_grad, "memory must be detached"
        torch.testing.assert_close(mems1[layer], first[layer].detach(), rtol=0, atol=0,
                                   msg=f"memory of layer {layer} is not its input on the previous segment")
        expected = torch.cat([first[layer], inputs[layer]], dim=1)[:, -10:].detach()
        torch.testing.assert_close(mems2[layer], expected, rtol=0, atol=0,
                                   msg=f"layer {layer}: memory must be the last mem_len inputs of [memory; segment]")
    assert XLNet(small_config(mem_len=0))(seg1)[1] is None, "mem_len 0 means no memory"


class Stream:
    def __init__(self, tokens):
        self.tokens = np.asarray(tokens, dtype=np.uint16)


def test_memory_is_kept_per_row_and_never_crosses_rows():
    torch.manual_seed(0)
    cfg = small_config(seq_len=8, mem_len=8)
    model = redraw(XLNet(cfg), std=0.1).eval()
    text = np.random.default_rng(0).integers(0, 50, 400)
    other = text.copy()
    other[200:] = (other[200:] + 7) % 50  # row 1's stream (it starts at 200) differs, row 0's does not
    logits = []
    for tokens in (text, other):
        objective = xlnet.PermutationLMObjective(cfg)
        g = torch.Generator().manual_seed(0)
        objective.cursors = [0, 200]
        objective.mems = [None, None]
        with torch.no_grad():
            for _ in range(3):
                batch = objective.train_batch(Stream(tokens), 2, g)
                assert (batch["input_ids"] != cfg.mask_token_id).all(), "the content stream must never see <mask>"
                step = objective.forward(model, batch)
        logits.append(step)
        assert len(objective.mems) == 2 and all(m is not None for m in objective.mems)
    torch.testing.assert_close(logits[1][0], logits[0][0], rtol=0, atol=0, msg="row 1's stream reached row 0")
    assert (logits[1][1] - logits[0][1]).abs().max() > 1e-4, "row 1's own stream must matter to it"


def test_bi_data_rows_read_each_stretch_forward_and_backward_and_the_model_gets_them_in_halves():
    # The original create_tfrecords: half the rows read the stream reversed, from its end, so a backward row's memory
    # is the text that follows it; _sample_mask(reverse=True) walks its spans in text order.
    cfg = small_config(seq_len=8, mem_len=8, bi_data=True)
    objective, text, g = xlnet.PermutationLMObjective(cfg), np.arange(4000), torch.Generator().manual_seed(0)
    steps = [objective.train_batch(Stream(text), 4, g) for _ in range(2)]
    ids = [b["input_ids"] for b in steps]
    assert steps[0]["backward"].tolist() == [False, True, False, True], "rows 1 and 3 must read backward"
    start = int(ids[0][2, 0])  # where stretch 1 begins, i.e. stretch 0 ends
    assert ids[0][1].tolist() == text[start - 8:start][::-1].tolist(), "row 1 must read stretch 0 backward from its end"
    assert ids[0][0].tolist() + ids[1][0].tolist() == text[int(ids[0][0, 0]):][:16].tolist(), "row 0 reads forward"
    assert ids[1][1].tolist() == text[start - 16:start - 8][::-1].tolist(), \
        "row 1's next segment must be the text before its last one: its memory is the text that follows"
    a, b = (objective.sample(16, False, torch.Generator().manual_seed(3), backward) for backward in (False, True))
    assert torch.equal(b[1], a[1].flip(0)), "a backward row's targets must be sampled in text order, then flipped"
    # the model gets the forward rows first (the original's layout), the logits come back in the batch's order
    seen = []

    def model(input_ids, bi_data, **kw):
        seen.append((input_ids[:, 0].tolist(), bi_data))
        return input_ids[:, None, :1].double().expand(-1, cfg.num_predict, 1), None

    logits = objective.forward(model, steps[0])
    assert seen == [(ids[0][[0, 2, 1, 3], 0].tolist(), True)], f"the model got rows {seen}, not forward then backward"
    assert logits[:, 0, 0].tolist() == ids[0][:, 0].tolist(), "the logits must come back in the batch's row order"
    assert not any(b["backward"].any() for b in objective.eval_batches(Stream(text[:100]), 4)), "eval reads forward"
    with pytest.raises(train.UsageError, match="--bi-data"):
        xlnet.PermutationLMObjective(cfg).train_batch(Stream(text), 3, g)
    assert all(xlnet.PRESETS[p]["bi_data"] for p in ("plm-cpu", "tiny", "xlnet-base")), \
        "the pretraining presets must follow the original's default (the train.py tests run the tiny one)"
    assert not XLNetConfig().bi_data and not xlnet.PRESETS["txl-cpu"].get("bi_data"), "inference reads forward"


def test_evaluation_covers_the_split_once_starts_from_empty_memory_and_repeats_itself():
    cfg = small_config(seq_len=8, mem_len=8)
    objective = xlnet.PermutationLMObjective(cfg)
    objective.mems = [["training memory"]] * 3  # state left over from somewhere else must not be used
    split = Stream(np.arange(101) % 50)
    batches = list(objective.eval_batches(split, 4))
    assert batches[0]["rows"].tolist() == [0, 1, 2, 3]
    got = {}
    for b in batches:
        for row, ids, am in zip(b["rows"].tolist(), b["input_ids"], b["attention_mask"]):
            got.setdefault(row, []).extend(ids[am == 1].tolist())
    assert sum(got.values(), []) == split.tokens.tolist(), "every token once, each row a contiguous stretch in order"
    assert sum(int((b["attention_mask"] == 0).sum()) for b in batches) == 3, "the short last segment is padded"
    again = list(xlnet.PermutationLMObjective(cfg).eval_batches(split, 4))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a), "evaluation must be deterministic"
    # empty memory at the start of every call, then memory for the following segments
    model = XLNet(cfg).eval()
    seen = []
    real = model.forward
    model.forward = lambda *a, **k: seen.append(k.get("mems") is None) or real(*a, **k)
    with torch.no_grad():
        for _ in range(2):
            for b in objective.eval_batches(split, 4):
                objective.loss(model, b)
    per_call = len(batches)
    assert seen == ([True] + [False] * (per_call - 1)) * 2, f"memory use per eval batch: {seen}"


# ----------------------------------------------------------------------------------------------------------------------
# Through train.py


def xl_args(tmp_path, corpus, *extra):
    return tiny_args("xlnet", tmp_path, corpus, *extra)


def test_trains_and_resumes_exactly_with_its_memory_through_train_py(tmp_path, corpus, capsys):
    common = ("--max-iters", "16", "--eval-interval", "8", "--log-interval", "1", "--dropout", "0.1")
    # stopped after step 5 and resumed with the saved memory: the uninterrupted run's losses
    straight = assert_resumes(train.train, lambda sub: xl_args(tmp_path / sub, corpus, *common), stop_at=5)
    evals = [r for r in straight if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 8, 16] and {"val_loss", "val_acc"} <= set(evals[0])
    assert "val_bpb" not in evals[0], "a permutation LM reports its own metrics, not bits per byte"
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, "the tiny XLNet did not learn"
    run = train.open_run(str(tmp_path / "a" / "out" / "ckpt.pt"))
    fresh = run.evaluate(xlnet.PermutationLMObjective(run.model.config), "val", 2048)
    assert fresh["loss"] == pytest.approx(evals[-1]["val_loss"], abs=1e-6), \
        "the evaluation after training must equal one by a fresh objective: no training memory in it"
    ckpt = torch.load(tmp_path / "b" / "out" / "ckpt.pt", weights_only=True)
    state = ckpt["objective"]
    assert len(state["cursors"]) == 4 and all(m is not None and len(m) == 2 for m in state["mems"]), \
        "the checkpoint must hold every row's cursor and memory"


def test_accumulation_keeps_each_rows_memory_and_evaluation_never_touches_training(tmp_path, corpus):
    def losses(sub, *extra):
        rows = train.train(xl_args(tmp_path / sub, corpus, "--max-iters", "6", "--log-interval", "1",
                                   "--grad-clip", "0", *extra))
        return [r["loss"] for r in rows if r["kind"] == "train"]
    big = losses("big", "--batch-size", "4", "--eval-interval", "100")
    accumulated = losses("acc", "--batch-size", "2", "--grad-accum", "2", "--eval-interval", "100")
    assert accumulated == pytest.approx(big, abs=1e-5), "micro-batches must find their own rows' memory"
    evaluated = losses("ev", "--batch-size", "4", "--eval-interval", "2")
    assert evaluated == big, "evaluating (with its own memory) changed what training saw"


def test_bad_input_fails_in_one_line_with_exit_2_and_writes_nothing(tmp_path, corpus, capsys):
    cases = [(("--mem-len", "-1"), "--mem-len -1"), (("--partial-k", "1"), "--partial-k 1"),
             (("--partial-k", "17"), "--partial-k 17"), (("--seq-len", "30", "--perm-size", "8"), "--perm-size 8"),
             (("--objective", "mlm"), "--objective mlm"), (("--n-layer", "0"), "--n-layer 0: must be >= 1"),
             (("--dropout", "2"), "--dropout 2: must be in [0, 1)"), (("--n-head", "3"), "--n-head 3"),
             (("--d-inner", "0"), "--d-inner 0")]
    for extra, word in cases:
        code = exit_code(train.main, xl_args(tmp_path, corpus, *extra))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and word in err, (extra, err)
        assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists(), f"{extra}: something was written"


def test_two_phase_memory_equals_recomputation_when_nothing_falls_out_of_it(capsys):
    # Transformer-XL's claim in its exact form: with a memory that holds the whole past, reading segment by segment
    # gives the same predictions as recomputing the full context for every token, at a fraction of the cost.
    torch.manual_seed(0)
    model = redraw(XLNet(small_config(seq_len=8, mem_len=16, objective="lm")), std=0.1).double().eval()
    tokens = np.random.default_rng(1).integers(0, 50, 48)  # 2 streams of 24 = 3 segments each
    results = experiments.two_phase(model, tokens, rows=2)
    out = capsys.readouterr().out
    assert "with memory" in out and "sliding window" in out and "cheaper" in out
    memory, window = results
    assert memory["tokens"] == window["tokens"] == 46
    assert_scaled_close(memory["loss"], window["loss"], "full memory vs full recomputation (mean loss)")


def test_two_phase_and_fill_commands_on_a_checkpoint_and_bad_checkpoints(tmp_path, corpus, capsys):
    train.train(xl_args(tmp_path, corpus, "--max-iters", "2", "--eval-interval", "2"))
    ckpt = str(tmp_path / "out" / "ckpt.pt")
    capsys.readouterr()
    assert exit_code(experiments.main, ["two-phase", "--ckpt", ckpt, "--tokens", "96", "--rows", "2"]) == 0
    assert "sliding window (W=32)" in capsys.readouterr().out
    assert exit_code(xlnet.main, ["fill", "--ckpt", ckpt, "--text", "To be, or not to be"]) == 0
    assert "truth  : To be, or not to be" in capsys.readouterr().out
    train.train(tiny_args("gpt", tmp_path / "gpt", corpus, "--max-iters", "1"))
    capsys.readouterr()
    gpt_ckpt = str(tmp_path / "gpt" / "out" / "ckpt.pt")
    refused = "a checkpoint of --model gpt, not xlnet"
    cases = [(experiments.main, ["two-phase", "--ckpt", gpt_ckpt], "experiments.py", refused),
             (experiments.main, ["two-phase", "--ckpt", ckpt, "--mem-len", "0"], "experiments.py", "--mem-len"),
             (experiments.main, ["two-phase", "--ckpt", ckpt, "--rows", "0"], "experiments.py", "--rows"),
             (experiments.main, ["views", "--k", "1"], "experiments.py", "--k 1"),
             (xlnet.main, ["fill", "--ckpt", gpt_ckpt], "xlnet.py", refused),
             (xlnet.main, ["fill", "--ckpt", str(tmp_path / "missing.pt")], "xlnet.py", "no checkpoint at"),
             (xlnet.main, ["fill", "--ckpt", ckpt, "--seed", "x"], "xlnet.py", "--seed"),
             (xlnet.main, ["views"], "xlnet.py", "views")]
    if not torch.cuda.is_available():
        cases.append((xlnet.main, ["fill", "--ckpt", ckpt, "--device", "cuda"], "xlnet.py", "--device cuda"))
    for main, argv, prog, msg in cases:
        code = exit_code(main, argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"{prog}: error:") and msg in err and len(err.splitlines()) == 1, \
            (argv, err)


def test_views_show_the_slides_order_and_write_the_png(tmp_path, capsys):
    experiments.main(["views", "--png", str(tmp_path / "views.png")])
    out = capsys.readouterr().out
    assert "position-3 view: query g3 predicts x3 from mem " in out
    assert "position-2 view: query g2 predicts x2 from mem, x3 " in out
    assert "position-1 view: query g1 predicts x1 from mem, x2, x3, x4 " in out, "the slide's last view"
    assert (tmp_path / "views.png").stat().st_size > 10_000


def test_demo_fills_the_blanks_in_the_sampled_order_and_leaves_the_context_alone():
    torch.manual_seed(0)
    model = XLNet(small_config())
    ids = list(range(30))
    is_target, order, filled = xlnet.fill_blanks(model, ids, seed=3)
    assert sorted(order) == is_target.nonzero()[:, 0].tolist() and len(order) == 30 // 4
    assert [filled[i] for i in range(30) if not is_target[i]] == [i for i in range(30) if not is_target[i]]
    lm = XLNet(small_config(objective="lm"))
    _, order, _ = xlnet.fill_blanks(lm, ids)
    assert order == list(range(1, 30)), "objective 'lm' fills left to right"


def test_xlnet_base_preset_has_the_released_models_size(transformers):
    keys = {k: v for k, v in xlnet.PRESETS["xlnet-base"].items() if k in XLNetConfig.__dataclass_fields__}
    with torch.device("meta"):
        ours = XLNet(XLNetConfig(vocab_size=32000, **keys)).num_params()
        hf = transformers.XLNetLMHeadModel(transformers.XLNetConfig(vocab_size=32000, d_model=768, n_layer=12,
                                                                    n_head=12, d_inner=3072)).num_parameters()
    assert ours == hf == 116_750_336, f"xlnet-base: {ours:,} parameters, xlnet-base-cased has {hf:,}"
