"""Properties of t5.py a user relies on. It is T5 (v1.0 and v1.1 parity with transformers, both ways, with padding).
Both attention paths and the KV cache compute the same function. Positions and masks are where T5 puts them. Span
corruption is T5's preprocessor (T5's own test vectors and its invariants over thousands of draws), every other
objective does what it promises, and the whole thing trains, evaluates, resumes and fills spans through train.py."""

import json
import re
import sys
import types

import numpy as np
import pytest
import torch
import transformers  # the parity oracle; loads its T5 code on first use (the span tests alone need not wait for it)

import data
import t5
import train
from common import UsageError
from helpers import assert_paths_agree, assert_resumes, assert_scaled_close, exit_code, tiny_args
from positions import T5RelativeBias
from t5 import (DenoisingObjective, T5, T5Config, compute_input_and_target_lengths, noise_span_to_unique_sentinel,
                nonnoise_span_to_unique_sentinel, random_spans_helper, random_spans_noise_mask)

V = 61


def tiny(**kw):
    base = dict(vocab_size=V, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_decoder_layers=3, num_heads=3,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                inputs_length=24)
    return T5Config(**{**base, **kw})


def model_with(seed=0, **kw):
    torch.manual_seed(seed)
    return T5(tiny(**kw)).eval()


def batch(seed=1, B=3, S=9, T=7):
    """Encoder ids with padding in two rows, and labels with ignored tail positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 3:] = 0
    mask[2, 3:] = 0
    y = torch.randint(2, V, (B, T), generator=g)
    y[2, T - 2:] = -100
    return x, mask, y


class Tok:
    """A tokenizer with T5's special tokens on top of n ordinary ids, as data.py builds them."""

    def __init__(self, n=20):
        self.specials = {s: n + i for i, s in enumerate(data.special_tokens_of(t5))}
        self.n_vocab = n + len(self.specials)


# ----------------------------------------------------------------------------------------------------------------------
# Parity with transformers' T5ForConditionalGeneration (the released models' implementation)


def hf_directory(path, ff, tied, std=0.3, seed=0, decoder_layers=3):
    """A random T5ForConditionalGeneration, every weight re-drawn with a large std (at T5's init a convention error,
    e.g. a missing rescale, can hide in the noise), saved with save_pretrained."""
    torch.manual_seed(seed)
    hc = transformers.T5Config(vocab_size=V, d_model=16, d_kv=6, d_ff=24, num_layers=2,
                               num_decoder_layers=decoder_layers, num_heads=3, relative_attention_num_buckets=8,
                               relative_attention_max_distance=20, dropout_rate=0.0, feed_forward_proj=ff,
                               tie_word_embeddings=tied, decoder_start_token_id=0)
    hf = transformers.T5ForConditionalGeneration(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, std)
        if not tied:  # transformers 5 ties the head whatever the config says; a v1.1 model has its own
            hf.lm_head.weight = torch.nn.Parameter(torch.randn(V, 16) * std)
    hf.save_pretrained(path)
    return path


def assert_parity(ours, hf_path, attn_mask=True, what=""):
    hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_path).eval().double()
    ours = ours.double()
    x, mask, y = batch()
    mask = mask if attn_mask else None
    expect = hf(input_ids=x, attention_mask=mask, labels=y)
    logits, loss = ours(x, labels=y, attention_mask=mask)
    scale = expect.logits.abs().max()
    torch.testing.assert_close(logits / scale, expect.logits / scale, rtol=0, atol=1e-5,
                               msg=f"{what}: logits differ from transformers' beyond 1e-5 relative")
    torch.testing.assert_close(loss, expect.loss, rtol=1e-5, atol=0, msg=f"{what}: loss differs from transformers'")


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
@pytest.mark.parametrize("ff, tied", [("relu", True), ("gated-gelu", False)], ids=["v1.0", "v1.1"])
def test_from_pretrained_matches_transformers_with_padding_in_the_encoder_batch(tmp_path, ff, tied, attn):
    path = hf_directory(tmp_path / "hf", ff, tied)
    ours = T5.from_pretrained(path, attn=attn).eval()
    assert ours.config.feed_forward_proj == ff and ours.config.tie_word_embeddings == tied
    assert (ours.lm_head.weight is ours.shared.weight) == tied, "v1.0 ties the output layer, v1.1 does not"
    assert_parity(ours, path, what=f"{ff}/{attn}")


def test_v1_1_written_the_hub_way_and_v1_0_with_a_saved_head_load_the_same(tmp_path):
    # The hub's v1.1 configs: tie_word_embeddings false, no scale_decoder_outputs (transformers 5 writes true + false).
    path = hf_directory(tmp_path / "v11", "gated-gelu", tied=False)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["scale_decoder_outputs"] is False, "transformers changed again"
    cfg.pop("scale_decoder_outputs")
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    ours = T5.from_pretrained(path)
    assert not ours.config.tie_word_embeddings
    assert_parity(ours, path, what="hub-style v1.1")
    # v1.0 files that also store lm_head (= shared): still tied, still rescaled
    from safetensors.torch import load_file, save_file
    path = hf_directory(tmp_path / "v10", "relu", tied=True)
    sd = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in sd, "saved files omit the tied head"
    save_file({**sd, "lm_head.weight": sd["shared.weight"].clone()}, path / "model.safetensors")
    ours = T5.from_pretrained(path)
    assert ours.lm_head.weight is ours.shared.weight
    assert_parity(ours, path, what="v1.0 with a stored head")


@pytest.mark.parametrize("ff, tied", [("relu", True), ("gated-gelu", False)], ids=["v1.0", "v1.1"])
def test_export_hf_loads_in_transformers_and_round_trips_exactly(tmp_path, ff, tied):
    ours = model_with(feed_forward_proj=ff, tie_word_embeddings=tied, initializer_factor=3.0)
    ours.export_hf(tmp_path / "out")
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in saved) == (not tied), "a tied head is left out, an untied one is saved"
    assert_parity(T5.from_pretrained(tmp_path / "out"), tmp_path / "out", what="exported (ours reloaded)")
    assert_parity(model_with(feed_forward_proj=ff, tie_word_embeddings=tied, initializer_factor=3.0),
                  tmp_path / "out", what="exported")
    back = T5.from_pretrained(tmp_path / "out")
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), f"{name} changed in the round trip"


def test_greedy_decoding_matches_transformers_generate(tmp_path):
    # (transformers' generation cache breaks when the decoder has more layers than the encoder: equal depths here)
    path = hf_directory(tmp_path / "hf", "gated-gelu", tied=False, std=0.2, decoder_layers=2)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(path).eval().double()
    ours = T5.from_pretrained(path).eval().double()
    x, mask, _ = batch()
    expect = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = ours.generate(x, 6, attention_mask=mask, temperature=0.0)
    assert torch.equal(got, expect), f"greedy decoding differs: {got.tolist()} vs {expect.tolist()}"


def test_from_pretrained_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        T5.from_pretrained(tmp_path)
    path = hf_directory(tmp_path / "hf", "relu", tied=True)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "gated-silu"}))
    with pytest.raises(ValueError, match="neither T5 v1.0's relu nor v1.1's gated-gelu"):
        T5.from_pretrained(path)


def test_released_sizes_have_the_released_parameter_counts():
    for name in ("t5-small", "t5-v1_1-small", "t5-v1_1-base"):
        kw = {k: v for k, v in t5.PRESETS[name].items() if k in T5Config.__dataclass_fields__}
        with torch.device("meta"):
            ours = T5(T5Config(vocab_size=32128, **kw))
            sizes = {k: kw[k] for k in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj")}
            hf = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=32128, **sizes))
        expected = sum(p.numel() for p in hf.parameters()) + (0 if kw["tie_word_embeddings"] else 32128 * kw["d_model"])
        assert ours.num_params() == expected, f"{name}: {ours.num_params():,} parameters, released {expected:,}"


# ----------------------------------------------------------------------------------------------------------------------
# The model's own properties


def test_naive_and_sdpa_attention_agree_in_outputs_and_gradients():
    # float64, tolerance scaled to magnitude: at initializer_factor 2.0, fp32 gradients of magnitude 38 differ by 3e-5
    # between the two paths on some CPUs (rounding, not a bug)
    x, mask, y = batch()
    assert_paths_agree(lambda attn: model_with(attn=attn, initializer_factor=2.0).train(),
                       lambda m: m(x, labels=y, attention_mask=mask))


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_encoder_is_bidirectional_decoder_causal_and_padding_invisible(attn):
    m = model_with(attn=attn)
    x, mask, y = batch()
    dec_in = t5.shift_right(y, 0, 0)
    base = m.decode(dec_in, m.encode(x, mask), mask)
    changed = dec_in.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % V
    after = m.decode(changed, m.encode(x, mask), mask)
    assert torch.equal(base[:, :4], after[:, :4]), "a later decoder token changed an earlier decoder position"
    x2 = x.clone()
    x2[0, -1] = (x2[0, -1] + 1) % V
    assert not torch.allclose(m.encode(x, mask)[0, 0], m.encode(x2, mask)[0, 0]), \
        "the encoder's first position must see the last token (bidirectional)"
    x3 = x.clone()
    x3[mask == 0] = 5  # different padding tokens
    torch.testing.assert_close(m.decode(dec_in, m.encode(x3, mask), mask), base, msg="padding leaked into the output")


def test_position_bias_lives_in_the_first_layer_of_each_stack_only():
    m = model_with()
    tables = {n: mod for n, mod in m.named_modules() if isinstance(mod, T5RelativeBias)}
    assert set(tables) == {"encoder.block.0.self_attn.pos_bias", "decoder.block.0.self_attn.pos_bias"}, tables
    assert tables["encoder.block.0.self_attn.pos_bias"].bidirectional, "the encoder's buckets look both ways"
    assert not tables["decoder.block.0.self_attn.pos_bias"].bidirectional, "the decoder's buckets are causal"
    # (that every layer adds it, T5's way, is what the parity tests check)
    x, mask, y = batch()
    base, _ = m(x, labels=y, attention_mask=mask)
    with torch.no_grad():
        m.encoder.block[0].self_attn.pos_bias.relative_attention_bias.weight.zero_()
    assert not torch.allclose(m(x, labels=y, attention_mask=mask)[0], base), "the encoder's bias is unused"


def test_t5_initialisation_and_no_biases():
    c = tiny(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=1, num_decoder_layers=1, vocab_size=500)
    torch.manual_seed(0)
    m = T5(c)
    expect = {"shared.weight": 1.0, "encoder.block.0.self_attn.q.weight": (64 * 16) ** -0.5,
              "encoder.block.0.self_attn.k.weight": 64 ** -0.5, "encoder.block.0.self_attn.o.weight": (4 * 16) ** -0.5,
              "encoder.block.0.ff.wi.weight": 64 ** -0.5, "encoder.block.0.ff.wo.weight": 128 ** -0.5}
    for name, std in expect.items():
        got = dict(m.named_parameters())[name].std().item()
        assert abs(got / std - 1) < 0.1, f"{name}: init std {got:.4f}, T5's is {std:.4f}"
    assert not any(isinstance(mod, torch.nn.Linear) and mod.bias is not None for mod in m.modules()), "T5 has no biases"


def test_rms_norm_accumulates_in_fp32_and_the_model_refuses_fp16():
    norm = t5.RMSNorm(8, 1e-6)
    x = torch.randn(4, 8) * 1e3
    torch.testing.assert_close(norm(x.bfloat16()), norm(x.bfloat16().float()),
                               msg="bf16 input must be normalised in fp32")
    assert norm(x.bfloat16()).dtype == torch.float32
    m = model_with()
    x, mask, y = batch()
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(UsageError, match="does not run in fp16"):
        m(x, labels=y, attention_mask=mask)


def test_decoder_inputs_default_to_the_labels_shifted_right_with_start_token_0():
    m = model_with()
    x, mask, y = batch()
    assert t5.shift_right(torch.tensor([[7, 8, -100]]), 0, 0).tolist() == [[0, 7, 8]]
    a, loss = m(x, labels=y, attention_mask=mask)
    b, none = m(x, decoder_input_ids=t5.shift_right(y, 0, 0), attention_mask=mask)
    assert torch.equal(a, b) and none is None, "labels -> shifted decoder inputs (start 0, -100 -> 0); no loss without"
    real = y != -100
    expect = torch.nn.functional.cross_entropy(a[real], y[real])
    torch.testing.assert_close(loss, expect, msg="the loss is the mean over labels that are not -100")


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=10)],
                         ids=["greedy", "sampled"])
def test_kv_cached_decoding_equals_decoding_without_the_cache(sampling):
    m = model_with(initializer_factor=2.0).double()  # float64: a near-tie between two tokens cannot flip with the CPU
    x, mask, _ = batch()
    outs = [m.generate(x, 12, attention_mask=mask, use_cache=c, generator=torch.Generator().manual_seed(5), **sampling)
            for c in (True, False)]
    assert torch.equal(*outs), f"cached and uncached decoding differ: {outs[0].tolist()} vs {outs[1].tolist()}"
    assert outs[0].shape == (3, 13) and (outs[0][:, 0] == 0).all()


def test_kv_cached_decoder_logits_equal_recomputed_ones():
    m = model_with(initializer_factor=2.0).double()
    x, mask, y = batch()
    dec_in = t5.shift_right(y, 0, 0)
    with torch.no_grad():
        enc = m.encode(x, mask)
        full = m.decode(dec_in, enc, mask)
        cache = t5.KVCache(m.config, 3, dec_in.size(1), "cpu", torch.float64)
        steps = torch.cat([m.decode(dec_in[:, t:t + 1], enc, mask, cache) for t in range(dec_in.size(1))], 1)
    assert cache.length == dec_in.size(1) and all(kv is not None for kv in cache.cross)
    assert_scaled_close(steps, full, "decoder logits one token at a time with the cache, and all at once")


def test_shared_encoder_decoder_reuses_every_layer_and_halves_the_parameters():
    plain = model_with(num_decoder_layers=0)
    shared = model_with(num_decoder_layers=0, share_encoder_decoder=True)
    for e, d in zip(shared.encoder.block, shared.decoder.block):
        assert d.self_attn is e.self_attn and d.ff is e.ff and d.self_attn_norm is e.self_attn_norm
    cross = sum(p.numel() for b in shared.decoder.block for p in [*b.cross_attn.parameters(),
                                                                  *b.cross_attn_norm.parameters()])
    stacks = lambda m: m.num_params() - m.shared.weight.numel()
    encoder = sum(p.numel() for p in shared.encoder.parameters())
    assert stacks(plain) == 2 * encoder + cross and stacks(shared) == encoder + cross, \
        "shared: the encoder's layers + the decoder's cross-attention (T5 Table 2: P instead of 2P)"
    x, mask, y = batch()
    _, loss = shared.train()(x, labels=y, attention_mask=mask)
    loss.backward()
    assert shared.encoder.block[1].ff.wo.weight.grad is not None
    with pytest.raises(ValueError, match="no encoder-decoder sharing"):
        shared.export_hf("unused")


# ----------------------------------------------------------------------------------------------------------------------
# Span corruption: T5's preprocessors


def test_t5_test_vectors_for_sentinels_and_lengths():
    tokens, noise = torch.arange(10, 16), torch.tensor([0, 0, 1, 1, 0, 1]).bool()
    assert noise_span_to_unique_sentinel(tokens, noise, 1000).tolist() == [10, 11, 999, 14, 998]
    assert nonnoise_span_to_unique_sentinel(tokens, noise, 1000).tolist() == [999, 12, 13, 998, 15]
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    assert compute_input_and_target_lengths(64, 0.2, 2.0) == (70, 22)
    assert compute_input_and_target_lengths(64, 0.2, 1.0) == (63, 27), "T5's helper, not HF's copy (64, 27)"
    assert random_spans_helper(512, 0.15, 3.0, 0, 0)[0] > 568, "dropping tokens fits more raw tokens in 512 inputs"



def test_random_spans_noise_mask_at_density_zero_is_no_noise():
    # T5's test_random_spans_noise_mask_no_corruption: density 0 corrupts nothing; any other density at least one token
    assert not random_spans_noise_mask(32, 0.0, 2.0, torch.Generator().manual_seed(0)).any(), "density 0 made noise"
    assert t5.noise_counts(32, 0.0, 2.0) == (0, 0)
    assert int(random_spans_noise_mask(32, 0.001, 2.0, torch.Generator().manual_seed(0)).sum()) == 1


def test_random_spans_noise_mask_draws_every_mask_of_its_counts_equally_often():
    # 10 tokens at 0.3, mean span 1.5: 3 noise tokens in 2 spans, 7 kept in 2; 2 x 6 = 12 masks, each one in 12
    g, seen = torch.Generator().manual_seed(0), {}
    for _ in range(600):
        mask = random_spans_noise_mask(10, 0.3, 1.5, g)
        runs = spans(mask)
        assert [v for v, _ in runs] == [False, True, False, True], f"kept, noise, kept, noise: {mask.tolist()}"
        assert [n for v, n in runs if v] in ([1, 2], [2, 1]), "3 noise tokens in 2 non-empty spans"
        seen[tuple(mask.tolist())] = seen.get(tuple(mask.tolist()), 0) + 1
    assert len(seen) == 12 and all(23 < n < 77 for n in seen.values()), f"not uniform over the 12 masks: {seen}"

def test_iid_noise_mask_picks_each_token_on_its_own():
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([t5.iid_noise_mask(100, 0.15, g) for _ in range(400)])  # (rows, L)
    assert abs(masks.float().mean() - 0.15) < 0.006, "the share of noise tokens is the density (4 sigma)"
    after_noise = masks[:, 1:][masks[:, :-1]].float().mean()
    assert abs(after_noise - 0.15) < 0.03, f"a noise token makes its neighbour no likelier to be noise: {after_noise}"
    assert masks.sum(1).float().var() > 8, "the count varies from row to row (binomial variance 12.75)"

def spans(mask):
    """[(is_noise, length)] runs of a boolean mask."""
    runs, prev = [], None
    for v in mask.tolist():
        if v == prev:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
        prev = v
    return runs


def test_random_spans_noise_mask_invariants_over_thousands_of_draws():
    g = torch.Generator().manual_seed(0)
    for i in range(2000):
        length = 568 if i < 1000 else int(torch.randint(2, 200, (1,), generator=g))
        density, mean = (0.15, 3.0) if i < 1000 else (float(torch.rand(1, generator=g)) * 0.9 + 0.05, 1 + i % 5)
        noise = random_spans_noise_mask(length, density, mean, g)
        n_noise, n_spans = t5.noise_counts(length, density, mean)
        runs = spans(noise)
        assert int(noise.sum()) == n_noise == min(max(round(np.float32(length) * np.float32(density)), 1), length - 1)
        assert not runs[0][0] and runs[-1][0], "a mask starts with non-noise and ends with noise"
        assert sum(1 for v, _ in runs if v) == n_spans and all(n > 0 for _, n in runs), "fixed span count, none empty"
        if i < 1000:
            tokens = torch.arange(length) + 3
            inputs = noise_span_to_unique_sentinel(tokens, noise, 1000)
            targets = nonnoise_span_to_unique_sentinel(tokens, noise, 1000)
            assert (len(inputs) + 1, len(targets) + 1) == (512, 114), "568 raw tokens -> 512 inputs, 114 targets"
            assert merge(inputs, targets) == tokens.tolist(), "inputs and targets merged by sentinel != the original"


def merge(inputs, targets):
    """Rebuild the original: each sentinel of the inputs -> what follows the same sentinel in the targets."""
    fills, current = {}, None
    for t in targets.tolist():
        if t >= 900:
            current = t
            fills[t] = []
        else:
            fills[current].append(t)
    out = []
    for t in inputs.tolist():
        out += fills[t] if t >= 900 else [t]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Every objective keeps its promise


def objective(name, **kw):
    return DenoisingObjective(tiny(objective=name, vocab_size=Tok().n_vocab, pad_token_id=20, eos_token_id=21,
                                   decoder_start_token_id=20, **kw), Tok())


def corrupt(obj, seed, R=None, starts=(0,)):
    tokens = torch.arange(R or obj.raw_tokens_per_row) % 20  # ordinary ids only
    return tokens, *obj.corrupt(tokens, torch.Generator().manual_seed(seed), starts)


def test_sentinels_sit_at_the_top_of_every_tokenizer_counting_down(tmp_path, corpus):
    for kind in ("char", "gpt2"):
        cfg = train.TrainConfig(data=str(corpus), tokenizer=kind, cache_dir=str(tmp_path))
        tok, _, _ = data.prepare_data(cfg, data.special_tokens_of(t5))
        assert tok.specials["<extra_id_0>"] == tok.n_vocab - 1 and tok.specials["<extra_id_99>"] == tok.n_vocab - 100
        assert tok.encode("a<extra_id_1>") [-1] == tok.n_vocab - 2, "prompts may write sentinels as text"


def test_replace_spans_rows_have_t5s_lengths_and_merge_back():
    obj = objective("replace-spans")
    for seed in range(50):
        tokens, inputs, targets = corrupt(obj, seed)
        assert inputs[-1] == targets[-1] == 21, "EOS ends inputs and targets"
        assert (len(inputs), len(targets)) == (obj.inputs_length, obj.targets_length) and len(inputs) == 24
        shift = lambda t: torch.where(t > 21, t - obj.vocab_size + 1000, t)  # our sentinels -> T5's test numbering
        assert merge(shift(inputs[:-1]), shift(targets[:-1])) == tokens.tolist()


def test_drop_tokens_inputs_have_no_sentinel_and_targets_only_the_dropped_tokens():
    obj = objective("drop-tokens")
    for seed in range(50):
        tokens, inputs, targets = corrupt(obj, seed)
        noise = obj.noise_mask(len(tokens), torch.Generator().manual_seed(seed))  # the row's mask: corrupt's first draw
        assert inputs[:-1].tolist() == tokens[~noise].tolist() and targets[:-1].tolist() == tokens[noise].tolist()
        assert len(inputs) <= obj.inputs_length and len(targets) <= obj.targets_length


def test_bert_and_mass_style_corrupt_in_place_and_predict_the_whole_row():
    random_share = []
    for name in ("bert-style", "mass-style"):
        obj = objective(name, noise_density=0.5, mean_noise_span_length=1.0)
        for seed in range(100):
            tokens, inputs, targets = corrupt(obj, seed)
            assert torch.equal(targets[:-1], tokens), f"{name}: the target is the whole original row"
            assert len(inputs) == len(tokens) + 1, f"{name}: corrupted in place"
            changed = inputs[:-1] != tokens
            masked = inputs[:-1] == obj.mask_id
            noise = obj.noise_mask(len(tokens), torch.Generator().manual_seed(seed))
            if name == "mass-style":
                assert torch.equal(masked, noise) and torch.equal(changed, masked), "MASS: every noise token -> mask"
            else:
                assert not (masked & ~noise).any() and not (changed & ~noise).any(), "only noise tokens change"
                random_share += [int((noise & ~masked).sum()), int(noise.sum())]
    share = sum(random_share[::2]) / sum(random_share[1::2])
    assert 0.06 < share < 0.14, f"BERT-style: ~10% random tokens, got {share:.3f}"


def test_bert_style_random_tokens_are_ordinary_tokens_as_in_t5s_bert_run():
    # T5 draws from ids 3 .. vocabulary size - 1: all but pad, </s>, unk. Its BERT-style run's vocabulary had no extra
    # ids, so that is every ordinary piece; ours sit below <|endoftext|>, <pad>, </s> and the sentinels.
    obj = objective("bert-style")
    tokens, noise = torch.zeros(4000, dtype=torch.long), torch.ones(4000, dtype=torch.bool)
    out = t5.noise_token_to_random_token_or_sentinel(tokens, noise, obj.mask_id, obj.n_ordinary,
                                                     torch.Generator().manual_seed(0), random_prob=1.0)
    assert obj.n_ordinary == Tok().specials["<|endoftext|>"] == 20
    assert set(out.tolist()) == set(range(20)), "random tokens: every ordinary id, never a special or a sentinel"


def test_t5s_four_rows_use_iid_noise_and_span_corruption_random_spans():
    # T5's gins: iid_15_r10s90_f (BERT-style), iid_15_m_f (MASS-style), iid_15_d_d (drop), span.gin (span corruption)
    R = 200
    for name, noise_mask in (("bert-style", "auto"), ("mass-style", "auto"), ("drop-tokens", "auto"),
                             ("replace-spans", "iid"), ("replace-spans", "auto"), ("bert-style", "spans")):
        obj = objective(name, inputs_length=R + 1, noise_mask=noise_mask)
        g = torch.Generator().manual_seed(0)
        masks = [obj.noise_mask(R, g) for _ in range(150)]
        counts = torch.stack([m.sum() for m in masks]).float()
        runs = [n for m in masks for v, n in spans(m) if v]
        if (name, noise_mask) in (("replace-spans", "auto"), ("bert-style", "spans")):
            assert counts.var() == 0 and abs(np.mean(runs) - 3) < 0.1, f"{name}: spans of mean length 3, 15% each row"
        else:
            assert counts.var() > 10 and abs(counts.mean() - 30) < 2, f"{name}: i.i.d. noise, ~15% of the row"
            assert abs(np.mean(runs) - 1 / 0.85) < 0.1, f"{name}: runs as i.i.d. noise makes them, mean 1/(1 - 0.15)"
    for kw, message in ((dict(noise_mask="poisson"), "--noise-mask 'poisson': must be one of auto, iid, spans"),
                        (dict(objective="prefix-lm", noise_mask="iid"), "--noise-mask iid: only for")):
        with pytest.raises(UsageError, match=re.escape(message)):
            tiny(**kw)


def test_iid_rows_are_never_cut_and_replace_spans_merges_back_as_t5s():
    obj = objective("replace-spans", noise_mask="iid", noise_density=0.5)
    assert (obj.raw_tokens_per_row, obj.inputs_length, obj.targets_length) == (23, 24, 24), "R = S - 1, T = S"
    rows, opened = [], 0
    for seed in range(100):
        tokens, inputs, targets = corrupt(obj, seed)
        # T5's sentinels: 999, 998, ... A row that starts with noise opens its targets with that span, before any
        # sentinel, and target sentinel k then holds the span of input sentinel k + 1 (iid_15_u_u did the same)
        first = obj.noise_mask(len(tokens), torch.Generator().manual_seed(seed))[0]
        shift = lambda t, by: torch.where(t > 21, t - obj.vocab_size + 1000 - by, t)  # noqa: E731
        spans_in_order = torch.cat([torch.tensor([999]), shift(targets[:-1], 1)]) if first else shift(targets[:-1], 0)
        assert merge(shift(inputs[:-1], 0), spans_in_order) == tokens.tolist()
        rows.append((inputs, targets))
        opened += int(first)
    assert 30 < opened < 70, "about half the rows start with noise at density 0.5"
    obj.collate(rows)  # every row fits
    worst = torch.arange(23) % 2 == 1  # alternating: 11 noise spans, 12 kept ones, the longest rows there are
    assert len(noise_span_to_unique_sentinel(torch.arange(23), worst, obj.vocab_size)) + 1 == obj.inputs_length
    assert len(nonnoise_span_to_unique_sentinel(torch.arange(23), worst, obj.vocab_size)) + 1 == obj.targets_length
    with pytest.raises(UsageError, match="more than the 100 sentinels"):
        objective("replace-spans", noise_mask="iid", inputs_length=512, noise_density=0.25)
    obj = objective("replace-spans", noise_mask="iid", inputs_length=512)  # T5's baseline, 15% of 511: accepted
    obj.n_sentinels = 2  # as if the vocabulary had two: a row that needs more is drawn again
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        used = torch.cat(obj.corrupt(torch.arange(12) % 20, g))
        assert (used[used > 21] >= obj.vocab_size - 2).all(), "a row used more sentinels than the vocabulary has"


def test_prefix_lm_splits_the_row_into_a_prefix_and_its_continuation():
    obj = objective("prefix-lm", noise_density=0.5)  # T5's prefix_lm.gin: any split point
    splits = set()
    for seed in range(200):
        tokens, inputs, targets = corrupt(obj, seed)
        assert torch.equal(torch.cat([inputs[:-1], targets[:-1]]), tokens)
        splits.add(len(inputs) - 1)
    assert min(splits) == 1 and max(splits) == obj.raw_tokens_per_row - 1, "the prefix has 1 .. R-1 tokens"


def test_prefix_lm_predicts_about_the_noise_density_as_t5s_random_prefix_noise_mask():
    g = torch.Generator().manual_seed(0)
    for density, L in ((0.5, 10), (0.3, 41), (0.15, 101)):
        low = max(1, round((1 - 2 * density) * (L - 1)))  # T5: the prefix is uniform on low .. L - 1
        masks = torch.stack([t5.random_prefix_noise_mask(L, density, g) for _ in range(1500)])
        assert masks[:, 0].all() and not masks[:, -1].any(), "T5's test: the first token is input, the last a target"
        prefixes = masks.sum(1)
        assert set(prefixes.tolist()) == set(range(low, L)) and torch.equal(masks, torch.arange(L) < prefixes[:, None])
        targets = L - prefixes.float().mean()
        assert abs(targets - (L + 1 - low) / 2) < 0.15 * (L - low) / 3 ** 0.5 and abs(targets / L - density) < 0.02
    obj = objective("prefix-lm", inputs_length=101)  # at the default 15%: 100 raw tokens, 16 targets on average
    shares = [len(corrupt(obj, seed)[2]) - 1 for seed in range(200)]
    assert abs(np.mean(shares) / obj.raw_tokens_per_row - 0.15) < 0.03, "the targets are ~15% of the row"
    with pytest.raises(UsageError, match="at most 0.5"):
        tiny(objective="prefix-lm", noise_density=0.6)


def test_text_infilling_one_mask_per_span_and_an_empty_span_inserts_one():
    M = 99
    assert t5.infill(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2]), torch.tensor([False, True, False, True]),
                     M).tolist() == [1, M, 2, M], "a length-0 span inserts a mask; a length-2 span becomes one mask"
    obj = objective("text-infilling", noise_density=0.3)
    g = torch.Generator().manual_seed(0)
    saw_empty = False
    for _ in range(300):
        tokens = torch.arange(60) % 20
        inputs, noise = t5.text_infilling(tokens, 0.3, 3.0, obj.mask_id, g)
        n_masks = int((inputs == obj.mask_id).sum())
        assert int(noise.sum()) == 18, "30% of 60 tokens are covered by spans"
        assert inputs[inputs != obj.mask_id].tolist() == tokens[~noise].tolist(), "kept tokens stay, in order"
        assert len(inputs) == 60 - 18 + n_masks <= 60
        runs = sum(1 for v, _ in spans(noise) if v)
        saw_empty |= n_masks > runs  # more masks than noise runs: an empty span (or two spans side by side)
    assert saw_empty, "Poisson(3) gives empty spans (p = e^-3 each); 300 rows must show some"
    tokens, inputs, targets = corrupt(obj, 3)
    assert torch.equal(targets[:-1], tokens), "BART reconstructs the whole row"


def test_sentence_permutation_shuffles_whole_lines():
    obj = objective("sentence-permutation")
    tokens = torch.arange(23) % 20
    starts = (0, 5, 9, 17)
    orders = set()
    for seed in range(30):
        _, inputs, targets = corrupt(obj, seed, R=23, starts=starts)
        pieces = [tuple(tokens[a:b].tolist()) for a, b in zip(starts, starts[1:] + (23,))]
        got, at = [], 0
        while at < 23:  # the inputs must be the pieces in some order
            piece = next(p for p in pieces if tuple(inputs[at:at + len(p)].tolist()) == p and p not in got)
            got.append(piece)
            at += len(piece)
        assert sorted(got) == sorted(pieces) and torch.equal(targets[:-1], tokens)
        orders.add(tuple(got))
    assert len(orders) > 5, "the order is random"


def test_too_many_spans_for_the_sentinels_is_a_clear_error():
    with pytest.raises(UsageError, match="more than the 100 sentinels"):
        objective("replace-spans", inputs_length=512, noise_density=0.5, mean_noise_span_length=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Batches, evaluation, and the loop


def test_batches_padding_counts_and_denominators():
    obj = objective("prefix-lm")
    split = data.Split("x", np.arange(500, dtype=np.uint16) % 20, np.array([0]), np.array([0]), ["x"], 500)
    b = obj.train_batch(split, 6, torch.Generator().manual_seed(0))
    assert b["input_ids"].shape == (6, obj.inputs_length) and b["labels"].shape == (6, obj.targets_length)
    assert torch.equal(b["decoder_input_ids"], t5.shift_right(b["labels"], 20, 20))
    padding = b["input_ids"][b["attention_mask"] == 0]
    assert torch.equal(padding, torch.full_like(padding, 20))
    assert obj.count_tokens(b) == int(b["attention_mask"].sum() + (b["labels"] != -100).sum())
    assert obj.denominators(b) == {"nll": int((b["labels"] != -100).sum())}
    again = obj.train_batch(split, 6, torch.Generator().manual_seed(0))
    assert all(torch.equal(b[k], again[k]) for k in b), "batches come from the generator only"


def test_eval_batches_are_deterministic_and_cover_the_split():
    obj = objective("replace-spans")
    split = data.Split("x", np.arange(1000, dtype=np.uint16) % 20, np.array([0]), np.array([0]), ["x"], 1000)
    first, second = list(obj.eval_batches(split, 8)), list(obj.eval_batches(split, 8))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second) for k in a), "the same corruption every eval"
    n_noise = sum(int(((b["labels"] >= 0) & (b["labels"] < 20)).sum()) for b in first)
    kept = sum(int((b["input_ids"] < 20).sum()) for b in first)
    assert kept + n_noise == 1000, "every token of the split is in exactly one row, kept or as a target"



def test_trains_through_the_loop_and_resumes_to_the_same_losses(tmp_path, corpus):
    common = ("--max-iters", "12", "--eval-interval", "6", "--log-interval", "1", "--lr", "3e-3",
              "--eval-tokens", "1024")
    straight = assert_resumes(train.train, lambda sub: tiny_args("t5", tmp_path / sub, corpus, *common), stop_at=7)
    losses = [r["loss"] for r in straight if r["kind"] == "train"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, f"the loss must fall: {losses}"
    assert "val_acc" in straight[-1] and "val_bpb" not in straight[-1]


@pytest.mark.parametrize("name", ["drop-tokens", "bert-style", "mass-style", "prefix-lm", "text-infilling",
                                  "sentence-permutation"])
def test_every_objective_trains_through_the_loop(tmp_path, corpus, name):
    short = ("--max-iters", "4", "--eval-interval", "4", "--lr", "1e-2", "--warmup-iters", "1", "--eval-tokens", "1024")
    rows = train.train(tiny_args("t5", tmp_path, corpus, "--objective", name, *short))
    assert np.isfinite(rows[-1]["val_loss"]) and rows[-1]["val_loss"] < rows[0]["val_loss"], name


def test_fill_spans_from_a_checkpoint_and_bad_input(tmp_path, corpus, capsys):
    train.train(tiny_args("t5", tmp_path, corpus, "--max-iters", "2", "--inputs-length", "48", "--eval-tokens", "512"))
    ckpt = str(tmp_path / "out" / "ckpt.pt")
    capsys.readouterr()
    assert exit_code(t5.main, ["--ckpt", ckpt, "Thank you <X> me to your party <Y> week."]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("Thank you [") and "] week." in out and "<X> = " in out
    for argv, message in ((["Thank you for inviting me."], "no span to fill"),
                          (["Thank you <X> me to your party <Y> last week and the week before."], "at most 48"),
                          (["<X>", "--top-k", "0"], "--top-k 0: must be at least 1"),
                          (["<X>", "--max-new-tokens", "-5"], "--max-new-tokens -5: must be at least 1"),
                          (["<X>", "--temperature", "-1"], "--temperature -1.0: must be a number >= 0"),
                          (["<X>", "--device", "nonsense"], "unknown --device")):
        assert exit_code(t5.main, ["--ckpt", ckpt, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    train.train(tiny_args("gpt", tmp_path / "g", corpus, "--max-iters", "1"))
    assert exit_code(t5.main, ["--ckpt", str(tmp_path / "g" / "out" / "ckpt.pt"), "<X>"]) == 2
    assert "a checkpoint of --model gpt, not t5" in capsys.readouterr().err


def test_bad_settings_stop_before_anything_is_written(tmp_path, corpus, capsys):
    for extra, message in ((["--noise-density", "1.5"], "--noise-density 1.5: must lie in (0, 1)"),
                           (["--noise-density", "0"], "must lie in (0, 1)"),
                           (["--objective", "deshuffle"], "--objective 'deshuffle': must be one of"),
                           (["--feed-forward-proj", "swiglu"], "--feed-forward-proj 'swiglu': must be one of"),
                           (["--dropout-rate", "2"], "--dropout-rate 2.0: must be in [0, 1)"),
                           (["--num-layers", "0"], "--num-layers 0: must be at least 1"),
                           (["--num-heads", "0"], "--num-heads 0: must be at least 1")):
        assert exit_code(train.main, tiny_args("t5", tmp_path, corpus, *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


def test_help_lists_every_t5_flag(capsys):
    assert exit_code(train.main, ["--model", "t5", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"--{f.replace('_', '-')}" in out for f in T5Config.__dataclass_fields__
               if f not in train.derived(t5)), "every config field is a flag, and --help renders"
    assert "--fill" in out and "text-infilling" in out


def test_hf_path_names_the_missing_package_or_reads_t5s_vocabulary(tmp_path, capsys, monkeypatch):
    path = hf_directory(tmp_path / "hf", "relu", tied=True)
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    assert exit_code(t5.main, ["--hf", str(path), "a <X> b"]) == 2
    err = capsys.readouterr().err
    assert "'sentencepiece'" in err and len(err.strip().splitlines()) == 1, err

    class FakeProcessor:  # a 40-piece vocabulary: one piece per letter
        def __init__(self, model_file):
            pass

        get_piece_size, pad_id, eos_id = (lambda self: 40), (lambda self: 0), (lambda self: 1)
        encode = lambda self, text: [3 + (ord(ch) % 30) for ch in text]
        decode = lambda self, ids: "".join(chr(ord("a") + i % 26) for i in ids)

    monkeypatch.setitem(sys.modules, "sentencepiece", types.SimpleNamespace(SentencePieceProcessor=FakeProcessor))
    tok = t5.SentencePieceT5Tokenizer("unused", n_extra=21)
    assert tok.encode("a<extra_id_0>b<extra_id_20>") == [3 + 97 % 30, 60, 3 + 98 % 30, 40], "sentinels count down"
    assert tok.decode([3, 60, 4]) == "d<extra_id_0>e"
