"""Properties of gpt.py a user relies on: it is causal, both attention paths compute the same function, it is GPT-2
(parameter count, Hugging Face parity both ways), it learns, the KV cache changes nothing but speed, and its config
and command line refuse bad values with one line."""

import json
import os
import re

import pytest
import torch

import gpt
from gpt import GPT, GPTConfig, KVCache, PRESETS, sample_next
from helpers import assert_paths_agree, assert_scaled_close, exit_code


def tiny(**kw):
    base = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPTConfig(**{**base, **kw})


def model_with(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def cache_for(m, batch_size):
    c = m.config
    shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
    return KVCache(c.n_layer, shape, "cpu", m.lm_head.weight.dtype)


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_causal_future_tokens_never_change_earlier_logits(attn):
    m = model_with(attn=attn)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 37, (3, 16), generator=g)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t:] = torch.randint(0, 37, changed[:, t:].shape, generator=g)
        a, _ = m(idx)
        b, _ = m(changed)
        assert torch.equal(a[:, :t], b[:, :t]), f"{attn}: logits before position {t} changed when later tokens did"


def test_naive_and_sdpa_attention_agree_in_outputs_and_gradients():
    idx = torch.randint(0, 37, (4, 16), generator=torch.Generator().manual_seed(2))
    tgt = torch.randint(0, 37, (4, 16), generator=torch.Generator().manual_seed(3))
    assert_paths_agree(lambda attn: model_with(attn=attn).train(), lambda m: m(idx, tgt))


def test_naive_and_sdpa_agree_with_a_kv_cache_offset():
    # queries are the last positions of a longer key sequence: the mask must be aligned bottom-right in both paths
    idx = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(4))
    outs = []
    for attn in ("naive", "sdpa"):
        m = model_with(attn=attn).double()
        cache = cache_for(m, 2)
        m(idx[:, :7], cache=cache)
        outs.append(m(idx[:, 7:], cache=cache)[0])
    full, _ = model_with(attn="naive").double()(idx)
    assert_scaled_close(outs[0], outs[1], "naive and sdpa on a cached continuation")
    assert_scaled_close(outs[0], full[:, 7:], "cached prefix + chunk vs one full pass")


def test_lm_head_is_tied_to_the_token_embedding():
    m = model_with()
    assert m.lm_head.weight is m.transformer.wte.weight, "lm_head and wte are separate tensors"
    idx = torch.randint(0, 37, (2, 8))
    _, loss = m.train()(idx, idx)
    loss.backward()
    torch.optim.SGD(m.parameters(), lr=1.0).step()
    assert torch.equal(m.lm_head.weight, m.transformer.wte.weight), "tying broke after an optimizer step"
    assert "lm_head.weight" not in {n for n, _ in m.named_parameters()}, "the tied weight is counted twice"


def test_gpt2_preset_has_gpt2_small_parameter_count():
    keys = {k: v for k, v in PRESETS["gpt2"].items() if k in GPTConfig.__dataclass_fields__}
    keys["pad_vocab_multiple"] = 1  # the released model's 50,257 rows
    with torch.device("meta"):  # shapes only: no 500 MB allocation
        m = GPT(GPTConfig(vocab_size=50257, **keys))
    assert m.num_params() == 124_439_808, "GPT-2 small has 124,439,808 parameters (wte, wpe and 12 blocks)"


def test_residual_projections_use_the_scaled_init():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=100, n_layer=8, n_head=4, n_embd=256, block_size=64))
    expected = 0.02 / (2 * 8) ** 0.5
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - expected) / expected < 0.05, f"c_proj init std {std:.5f}; GPT-2: 0.02/sqrt(2L) = {expected:.5f}"
    assert abs(m.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001, "other weights should be N(0, 0.02)"


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = GPT(tiny(n_embd=32)).train()
    idx = torch.randint(0, 37, (4, 16), generator=torch.Generator().manual_seed(5))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, f"could not memorise one batch: loss {loss.item():.3f} (starts near ln 37 = 3.6)"


def test_loss_is_none_without_targets_and_ignores_minus_100():
    m = model_with()
    idx = torch.randint(0, 37, (2, 8))
    logits, loss = m(idx)
    assert loss is None and logits.shape == (2, 8, 37)
    tgt = idx.clone()
    tgt[:, :4] = -100
    _, l_masked = m(idx, tgt)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1), idx[:, 4:].flatten())
    torch.testing.assert_close(l_masked, ref, msg="targets of -100 must be ignored")


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=5), dict(top_p=0.9)])
def test_generation_with_and_without_kv_cache_gives_the_same_tokens(sampling):
    m = model_with(seed=3)
    prompt = torch.randint(0, 37, (2, 3), generator=torch.Generator().manual_seed(6))
    # 20 new tokens run past block_size=16, so the sliding-window fallback is exercised too
    a = m.generate(prompt, 20, use_cache=True, generator=torch.Generator().manual_seed(7), **sampling)
    b = m.generate(prompt, 20, use_cache=False, generator=torch.Generator().manual_seed(7), **sampling)
    assert a.shape == (2, 23)
    assert torch.equal(a, b), f"KV cache changed the generated tokens with {sampling}"


def test_padded_vocabulary_slots_are_never_predicted_or_sampled():
    m = model_with(pad_vocab_multiple=64)
    assert m.transformer.wte.weight.shape[0] == 64 and m.config.vocab_size == 37
    with torch.no_grad():
        m.transformer.wte.weight[37:] = 10.0  # make the padding rows maximally attractive
    logits, _ = m(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape[-1] == 37, "logits must cover only the real vocabulary"
    g = torch.Generator().manual_seed(0)
    out = m.generate(torch.zeros(1, 1, dtype=torch.long), 30, temperature=2.0, generator=g)
    assert out.max().item() < 37, "sampled a padding id"


def test_sample_next_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sample_next(torch.tensor([[0.0, 5.0, 1.0]]), temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    k = {sample_next(logits, top_k=2, generator=g).item() for _ in range(300)}
    assert k == {0, 1}, f"top_k=2 sampled {k}"
    p = {sample_next(logits, top_p=0.7, generator=g).item() for _ in range(300)}
    assert p == {0, 1}, f"top_p=0.7 keeps the 0.5 and 0.3 tokens (0.5 < 0.7), sampled {p}"
    p = {sample_next(logits, top_p=0.5, generator=g).item() for _ in range(100)}
    assert p == {0}, f"top_p=0.5 is reached by the first token alone, sampled {p}"


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face parity. Weights are re-drawn with std 0.3: at GPT-2's 0.02 every activation is tiny and a wrong GELU,
# LayerNorm eps or a missing transpose hides below 1e-5.

import transformers  # noqa: E402  (a test requirement: the oracle for parity)


def hf_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=24, vocab_size=101,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def test_from_pretrained_matches_transformers_gpt2_logits(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, 101, (3, 24), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = hf.double()(idx).logits  # float64 on both sides: what differs is the model, not the CPU's rounding
    for attn in ("naive", "sdpa"):
        ours = GPT.from_pretrained(str(tmp_path / "hf"), attn=attn).eval().double()
        got, _ = ours(idx)
        assert_scaled_close(got, ref, f"logits vs GPT2LMHeadModel ({attn})")


def test_from_pretrained_reads_pytorch_model_bin_in_openais_layout(tmp_path):
    # OpenAI's original upload: pytorch_model.bin, keys without the "transformer." prefix, plus old mask buffers
    hf = hf_model(seed=1)
    d = tmp_path / "bin"
    hf.save_pretrained(d)
    os.remove(d / "model.safetensors")
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(24, 24)).view(1, 1, 24, 24)
    torch.save(sd, d / "pytorch_model.bin")
    idx = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        ref = hf.double()(idx).logits
    got, _ = GPT.from_pretrained(str(d)).eval().double()(idx)
    assert_scaled_close(got, ref, "logits after a pytorch_model.bin load vs GPT2LMHeadModel")


def test_export_hf_round_trips_through_transformers(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=20, vocab_size=53, n_layer=2, n_head=2, n_embd=16, pad_vocab_multiple=64)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3)
    ours.export_hf(str(tmp_path / "export"))
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["vocab_size"] == 53, "the export must hold the real vocabulary, not the padded one"
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "export")).eval()
    back_model = GPT.from_pretrained(str(tmp_path / "export")).eval()
    for name, w in back_model.state_dict().items():  # every weight comes back bit for bit (the padding rows aside)
        orig = ours.state_dict()[name]
        torch.testing.assert_close(w, orig[: w.size(0)] if name.endswith("wte.weight") or name == "lm_head.weight"
                                   else orig, atol=0, rtol=0, msg=f"export -> from_pretrained changed {name}")
    idx = torch.randint(0, 53, (2, 20))
    ref, _ = ours.double()(idx)
    with torch.no_grad():
        got = hf.double()(idx).logits
    assert_scaled_close(got, ref, "transformers reading our export")
    assert_scaled_close(back_model.double()(idx)[0], ref, "export -> from_pretrained")


def test_from_pretrained_missing_directory_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(dict(n_positions=8, vocab_size=10, n_layer=1, n_head=1,
                                                                        n_embd=4)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(str(tmp_path / "empty"))


def test_from_pretrained_refuses_a_missing_weight_and_a_wrong_shape(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    path = tmp_path / "hf" / "model.safetensors"
    save_file({k: v for k, v in weights.items() if "h.1.mlp.c_fc.weight" not in k}, path)
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.weight"):
        GPT.from_pretrained(str(tmp_path / "hf"))
    weights["transformer.h.0.ln_1.weight"] = torch.ones(31)
    save_file(weights, path)
    with pytest.raises(ValueError, match="h.0.ln_1.weight has shape"):
        GPT.from_pretrained(str(tmp_path / "hf"))


# ----------------------------------------------------------------------------------------------------------------------
# Bad values: the config names the flag; the command line prints one line and exits with code 2, writing nothing


@pytest.mark.parametrize("bad, message", [
    (dict(dropout=2.0), "--dropout 2.0: must be in [0, 1)"), (dict(dropout=-0.1), "--dropout -0.1"),
    (dict(n_layer=0), "--n-layer 0: must be >= 1"), (dict(n_head=0), "--n-head 0"), (dict(n_embd=0), "--n-embd 0"),
    (dict(block_size=0), "--block-size 0"), (dict(vocab_size=0), "--vocab-size 0"),
    (dict(n_embd=30, n_head=4), "divisible by --n-head 4"), (dict(attn="flash"), "--attn flash"),
    (dict(pos="xpos"), "--pos xpos: must be one of"), (dict(pad_vocab_multiple=0), "--pad-vocab-multiple 0"),
    (dict(layer_norm_epsilon=0.0), "--layer-norm-epsilon"), (dict(shaw_max_distance=-1), "--shaw-max-distance -1"),
])
def test_config_refuses_bad_values_naming_the_flag(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GPTConfig(**bad)


@pytest.fixture
def hf_dir(tmp_path):
    hf_model().save_pretrained(tmp_path / "hf")
    return str(tmp_path / "hf")


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "--top-k 0: must be >= 1"), (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p 1.5"), (["--max-new-tokens", "-5"], "--max-new-tokens -5: must be >= 0"),
    (["--temperature", "-1"], "--temperature -1.0: must be a number >= 0"),
    (["--top-k", "many"], "--top-k: invalid int"),
])
def test_cli_refuses_bad_sampling_values_with_one_line(flags, message, hf_dir, capsys):
    assert exit_code(gpt.main, ["--hf", hf_dir, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt.py: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_refuses_a_missing_directory_another_models_checkpoint_and_a_missing_device(tmp_path, capsys):
    import train

    assert exit_code(gpt.main, ["--hf", str(tmp_path / "nowhere")]) == 2
    assert "--hf" in capsys.readouterr().err
    assert exit_code(gpt.main, ["--ckpt", str(tmp_path / "nowhere.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    torch.manual_seed(0)
    bert_ckpt = tmp_path / "bert.pt"  # what train.py writes, reduced to what load_for_inference reads first
    torch.save({"model": {}, "model_config": {}, "tokenizer": {}, "step": 1, "train_config": {"model": "bert"}},
               bert_ckpt)
    assert exit_code(gpt.main, ["--ckpt", str(bert_ckpt)]) == 2
    err = capsys.readouterr().err
    assert "--model bert, not gpt" in err and len(err.strip().splitlines()) == 1, err
    if not torch.cuda.is_available():
        assert exit_code(gpt.main, ["--ckpt", str(bert_ckpt), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert train.pick_device("cpu") == "cpu"
    assert sorted(os.listdir(tmp_path)) == ["bert.pt"], "a refused command must write nothing"
