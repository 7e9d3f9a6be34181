"""gpt.py's `--pos` option: every positional scheme of positions.py inside the real model. For each scheme a user relies
on the same guarantees as for GPT-2 itself: it learns, it is causal, the naive and fused attention paths are the same
function, the KV cache changes nothing but speed. Plus: what may run past block_size, what the GPT-2 formats refuse,
the train.py flag, and the relative-order probe. (The experiments that train these GPTs are tested in
test_positions.py, beside experiments.py's runners.) CPU, seeded, tiny configs."""


import pytest
import torch

import positions
import train
from gpt import GPT, GPTConfig, KVCache, POS_SCHEMES
from helpers import assert_paths_agree, assert_scaled_close


def tiny(pos, **kw):
    base = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16, dropout=0.0, pos=pos,
                shaw_max_distance=3, t5_num_buckets=8, t5_max_distance=12)  # small enough that clipping/buckets matter
    return GPTConfig(**{**base, **kw})


def model_with(pos, seed=0, **kw):
    torch.manual_seed(seed)
    m = GPT(tiny(pos, **kw)).eval()
    with torch.no_grad():  # position parameters start near 0; make them large enough that a wrong index shows
        for name, p in m.named_parameters():
            if "relative_attention_bias" in name or "w_K" in name or "w_V" in name:
                p.normal_(0.0, 0.5)
    return m


def cache_for(m, batch_size):
    c = m.config
    shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
    return KVCache(c.n_layer, shape, "cpu", m.lm_head.weight.dtype)


def batch(seed, B=3, T=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 37, (B, T), generator=g), torch.randint(0, 37, (B, T), generator=g)


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
@pytest.mark.parametrize("pos", POS_SCHEMES)
def test_every_scheme_trains_a_tiny_gpt(pos, attn):
    torch.manual_seed(0)
    m = GPT(tiny(pos, attn=attn)).train()
    idx, _ = batch(1, B=4, T=17)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], \
        f"pos={pos} attn={attn}: loss went {losses[0]:.3f} -> {losses[-1]:.3f} in 30 steps"


@pytest.mark.parametrize("pos", POS_SCHEMES)
def test_naive_and_sdpa_agree_in_outputs_and_gradients(pos):
    idx, tgt = batch(2)
    assert_paths_agree(lambda attn: model_with(pos, attn=attn).train(), lambda m: m(idx, tgt))
    m = model_with(pos)
    m(idx, tgt)[1].backward()
    assert all(p.grad is not None for p in m.parameters()), f"pos={pos}: a parameter gets no gradient"


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
@pytest.mark.parametrize("pos", POS_SCHEMES)
def test_every_scheme_stays_causal(pos, attn):
    m = model_with(pos, attn=attn)
    idx, _ = batch(3)
    a, _ = m(idx)
    for t in (1, 9):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1) % 37
        b, _ = m(changed)
        assert torch.equal(a[:, :t], b[:, :t]), \
            f"pos={pos} {attn}: logits before position {t} changed with later tokens"
        assert not torch.equal(a[:, t:], b[:, t:]), "the change must be visible at and after it (else vacuous)"


@pytest.mark.parametrize("pos", POS_SCHEMES)
def test_kv_cache_prefix_plus_chunk_equals_one_pass_in_both_paths(pos):
    idx, _ = batch(4, B=2, T=12)
    full, _ = model_with(pos, attn="naive").double()(idx)
    for attn in ("naive", "sdpa"):
        m = model_with(pos, attn=attn).double()
        cache = cache_for(m, 2)
        m(idx[:, :7], cache=cache)
        chunk, _ = m(idx[:, 7:], cache=cache)  # 5 queries at positions 7..11 against 12 keys
        assert_scaled_close(chunk, full[:, 7:], f"pos={pos} {attn}: cached prefix + chunk vs one pass")


@pytest.mark.parametrize("pos", POS_SCHEMES)
def test_generation_with_and_without_kv_cache_gives_the_same_tokens(pos):
    m = model_with(pos, seed=3)
    prompt, _ = batch(6, B=2, T=3)
    # 20 new tokens run past block_size=16, so the sliding-window fallback is exercised too
    a = m.generate(prompt, 20, temperature=1.0, use_cache=True, generator=torch.Generator().manual_seed(7))
    b = m.generate(prompt, 20, temperature=1.0, use_cache=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b), f"pos={pos}: the KV cache changed the generated tokens"


def test_schemes_without_a_table_run_past_block_size_and_learned_says_why_not():
    idx, _ = batch(5, B=1, T=40)  # 2.5x block_size
    for pos in POS_SCHEMES:
        m = model_with(pos)
        if pos == "learned":
            with pytest.raises(ValueError, match="cannot extrapolate"):
                m(idx)
            continue
        logits, _ = m(idx)
        assert logits.shape == (1, 40, 37) and torch.isfinite(logits).all(), f"pos={pos}: no finite logits at 2.5x"
        m.double()
        assert_scaled_close(m(idx)[0][:, :16], m(idx[:, :16])[0],
                            f"pos={pos}: a longer input changed the logits of the first 16 positions")
    m = model_with("rope")
    with pytest.raises(ValueError, match="KV cache"):  # the cache is preallocated for block_size positions
        m(idx, cache=cache_for(m, 1))


def test_position_parameters_live_where_each_scheme_puts_them():
    keys = {pos: set(GPT(tiny(pos)).state_dict()) for pos in POS_SCHEMES}
    base = keys["none"]
    assert keys["learned"] - base == {"transformer.wpe.weight"}, "learned adds exactly GPT-2's wpe.weight"
    assert keys["sinusoidal"] == keys["alibi"] == keys["rope"] == base, "sinusoid, ALiBi and RoPE have no parameters"
    assert keys["t5"] - base == {"transformer.pos_bias.relative_attention_bias.weight"}, "T5: one table for all layers"
    shaw_keys = {f"transformer.h.{i}.attn.shaw.{w}.weight" for i in range(2) for w in ("w_K", "w_V")}
    assert keys["shaw"] - base == shaw_keys, "Shaw: a^K and a^V tables in every layer"
    t5 = GPT(tiny("t5")).transformer.pos_bias.relative_attention_bias.weight
    assert t5.shape == (8, 2), "T5's table is (num_buckets, n_head)"


def test_gpt2_formats_refuse_other_schemes(tmp_path):
    with pytest.raises(ValueError, match="learned absolute"):
        GPT(tiny("rope")).export_hf(str(tmp_path / "x"))
    assert not (tmp_path / "x").exists(), "a refused export must write nothing"
    with pytest.raises(ValueError, match="learned absolute"):
        GPT.from_pretrained(str(tmp_path), pos="alibi")
    with pytest.raises(ValueError, match="--pos xpos: must be one of"):
        GPTConfig(pos="xpos")
    with pytest.raises(ValueError, match="even"):
        GPTConfig(n_embd=18, n_head=6, pos="rope")


# ----------------------------------------------------------------------------------------------------------------------
# train.py and the experiments, on tiny budgets


def test_train_py_has_a_pos_flag_and_checkpoints_remember_it(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    train.train(["--model", "gpt", "--preset", "tiny", "--pos", "alibi", "--data", str(corpus), "--cache-dir",
                 str(tmp_path / "cache"), "--out-dir", str(out), "--sample-tokens", "0", "--max-iters", "4"])
    model, _, ckpt = train.load_for_inference(str(out / "ckpt.pt"))
    assert ckpt["model_config"]["pos"] == "alibi" and model.config.pos == "alibi", "--pos alibi was not recorded"
    code = None
    try:
        train.main(["--model", "gpt", "--preset", "tiny", "--pos", "bogus", "--data", str(corpus), "--out-dir",
                    str(tmp_path / "bad"), "--cache-dir", str(tmp_path / "cache")])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "--pos bogus: must be one of" in err and len(err.strip().splitlines()) == 1, err


def test_relative_order_probe_separates_ordered_embeddings_from_noise():
    err_sin = positions.probe_relative_order(positions.sinusoidal(512, 768))
    err_rand = positions.probe_relative_order(torch.randn(512, 16))  # few dims: cannot memorise 512 positions
    assert err_sin < 0.15, f"the sinusoid encodes order linearly; probe error {err_sin:.3f} (lecture: 5.08%)"
    assert 0.4 < err_rand < 0.6, f"random embeddings carry no order: error should be near chance, got {err_rand:.3f}"
    ramp = torch.arange(512.0)[:, None] * torch.tensor([[1.0, -0.5]]) / 512  # position written in two coordinates
    assert positions.probe_relative_order(ramp) < 0.03, "a linear position code must be (almost) perfectly ordered"
