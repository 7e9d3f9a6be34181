"""llama.py is Llama: transformers' LlamaForCausalLM computes the same logits from the same weights (fp64, several
shapes: multi-head, grouped and multi-query attention, another rope_theta, tied and untied heads), loading and
exporting are exact inverses, greedy generation agrees; it is causal, its two attention paths agree, each modern
option changes what it names, and it trains through train.py."""

import pytest
import torch

import gpt
import llama
import train
from helpers import assert_paths_agree, assert_resumes, assert_scaled_close, exit_code, redraw, tiny_args

transformers = pytest.importorskip("transformers")

SHAPES = [  # (n_head, n_kv_head, rope_theta, tie_word_embeddings)
    (4, 4, 10000.0, False),  # multi-head, Llama 1
    (4, 2, 500000.0, False),  # grouped-query, Llama 3's base
    (4, 1, 10000.0, True),  # multi-query, tied as SmolLM
]


def hf_llama(H, K, theta, tie, seed=0, V=61, C=32, T=24):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=H, num_key_value_heads=K, max_position_embeddings=T,
                                   rope_theta=theta, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    redraw(model, std=0.3)  # large weights: a wrong norm, pairing or grouping cannot hide under rounding
    return model.double()


@pytest.mark.parametrize("H,K,theta,tie", SHAPES)
def test_from_pretrained_matches_transformers_llama_in_float64(tmp_path, H, K, theta, tie):
    hf = hf_llama(H, K, theta, tie)
    hf.save_pretrained(tmp_path / "hf")
    ours = llama.Llama.from_pretrained(str(tmp_path / "hf")).double().eval()
    assert (ours.config.kv_heads, ours.config.rope_theta, ours.config.tie_word_embeddings) == (K, theta, tie)
    idx = torch.randint(0, 61, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_scaled_close(ours(idx)[0], hf(idx).logits, f"logits, {H} heads / {K} KV heads, theta {theta:g}",
                            rel=1e-6)


@pytest.mark.parametrize("H,K,theta,tie", SHAPES)
def test_export_hf_round_trips_exactly_and_transformers_reads_the_same_function(tmp_path, H, K, theta, tie):
    torch.manual_seed(0)
    ours = llama.Llama(llama.LlamaConfig(block_size=24, vocab_size=61, n_layer=2, n_head=H, n_kv_head=K, n_embd=32,
                                         intermediate_size=40, rope_theta=theta,
                                         tie_word_embeddings=tie)).eval()
    redraw(ours, std=0.3)
    ours.export_hf(str(tmp_path / "hf"))  # fp32 files, as the model is: the round trip is exact
    back = llama.Llama.from_pretrained(str(tmp_path / "hf"))
    assert back.config == ours.config, "the exported config.json does not read back as the same config"
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), f"export -> from_pretrained changed {name}"
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).double().eval()
    ours.double()
    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_scaled_close(hf(idx).logits, ours(idx)[0], "transformers on our export", rel=1e-6)
        prompt = idx[:, :5]
        want = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 8, temperature=0.0), want), "greedy generation differs from transformers"


def test_from_pretrained_refuses_what_llama_py_does_not_build(tmp_path):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        rope_scaling={"rope_type": "linear", "factor": 2.0}))
    hf.save_pretrained(tmp_path / "scaled")
    with pytest.raises(Exception, match="rope_type 'linear'"):
        llama.Llama.from_pretrained(str(tmp_path / "scaled"))


def tiny(**kw):
    return llama.LlamaConfig(**{**dict(block_size=16, vocab_size=37, n_layer=2, n_head=4, n_kv_head=2, n_embd=32),
                                **kw})


@pytest.mark.parametrize("option", [{}, {"qk_norm": True}, {"mlp": "relu2"}, {"logit_softcap": 5.0}])
def test_causal_and_both_attention_paths_agree_with_every_option(option):
    idx = torch.randint(0, 37, (3, 16), generator=torch.Generator().manual_seed(3))
    tgt = torch.randint(0, 37, (3, 16), generator=torch.Generator().manual_seed(4))

    def build(attn):
        torch.manual_seed(0)
        return llama.Llama(tiny(attn=attn, **option)).train()

    assert_paths_agree(build, lambda m: m(idx, tgt))
    m = build("sdpa").eval()
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 37
    assert torch.equal(m(idx)[0][:, :9], m(changed)[0][:, :9]), f"{option}: a later token changed an earlier logit"


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_the_kv_cache_holds_k_heads_and_changes_nothing_but_speed(attn):
    torch.manual_seed(0)
    m = llama.Llama(tiny(attn=attn, qk_norm=True)).double().eval()  # GQA: 4 query heads share 2 key/value heads
    redraw(m, std=0.3)
    idx = torch.randint(0, 37, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(idx)[0]
        cache = gpt.KVCache(2, (2, 2, 16, 8), "cpu", torch.float64)  # (B, K, block_size, hs): K = 2 heads, not 4
        parts = [m(idx[:, :7], cache=cache)[0]] + [m(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 16)]
    assert_scaled_close(torch.cat(parts, 1), full, f"{attn}: a prefix then one token at a time vs one pass")
    prompt = idx[:, :5]
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 5}):  # 5 + 20 tokens: past block_size too
        a = m.generate(prompt, 20, use_cache=True, generator=torch.Generator().manual_seed(7), **kw)
        b = m.generate(prompt, 20, use_cache=False, generator=torch.Generator().manual_seed(7), **kw)
        assert torch.equal(a, b), f"{attn}: the KV cache changed the generated tokens with {kw}"


def test_each_option_builds_what_it_names():
    torch.manual_seed(0)
    base = llama.Llama(tiny())
    assert base.lm_head.weight is not base.model.embed_tokens.weight, "Llama's head is untied"
    assert base.config.ffn == 96 and base.model.layers[0].mlp.gate_proj.out_features == 96, "2/3 of 4C, to 32"
    assert base.model.layers[0].self_attn.k_proj.out_features == 16, "2 KV heads of size 8"
    assert not any(p.ndim == 1 and "norm" not in n for n, p in base.named_parameters()), "Llama has no biases"
    relu2 = llama.Llama(tiny(mlp="relu2")).model.layers[0].mlp
    assert relu2.gate_proj is None and relu2.up_proj.out_features == 128, "relu2: no gate, width 4C"
    capped = llama.Llama(tiny(logit_softcap=2.0))
    idx = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        capped.lm_head.weight.mul_(100)
        logits = capped(idx)[0]
        capped.config.logit_softcap = 0.0
        raw = capped(idx)[0]
    assert raw.abs().max() > 10 and logits.abs().max() <= 2.0, "soft-capped logits stay inside [-cap, cap]"
    assert torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0)), "the cap is not cap * tanh(logits / cap)"
    assert llama.LlamaConfig(n_embd=4096, multiple_of=256).ffn == 11008, "LLaMA 7B's feed-forward width"


def test_rmsnorm_is_the_worked_example():
    out = llama.RMSNorm(4, eps=0.0)(torch.tensor([3.0, 4.0, 0.0, 0.0]))
    assert torch.allclose(out, torch.tensor([1.2, 1.6, 0.0, 0.0])), out


def test_train_py_model_llama_learns_and_samples(tmp_path, corpus, capsys):
    rows = train.train(tiny_args("llama", tmp_path, corpus, "--max-iters", "30", "--eval-interval", "30",
                                 "--lr", "3e-3", "--n-kv-head", "2", "--qk-norm"))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, "30 steps of training did not lower the val loss"
    capsys.readouterr()
    assert exit_code(llama.main, ["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--max-new-tokens", "20"]) == 0
    assert len(capsys.readouterr().out) > 20
    assert exit_code(train.main, tiny_args("llama", tmp_path / "x", corpus, "--n-kv-head", "3")) == 2
    err = capsys.readouterr().err
    assert "must be a multiple of --n-kv-head 3" in err and len(err.strip().splitlines()) == 1, err


def test_muon_takes_the_hidden_matrices_adamw_the_rest_and_a_muon_run_resumes_exactly(tmp_path, corpus):
    run = train.setup(tiny_args("llama", tmp_path / "setup", corpus, "--optimizer", "muon"))
    names = {id(p): n for n, p in run.model.named_parameters()}
    muon = {names[id(p)] for g in run.optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in run.optimizer.adamw.param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == set(names.values()), "every parameter has exactly one optimizer"
    hidden = {n for n in names.values() if n.endswith("_proj.weight")}
    assert muon == hidden, f"Muon must take the hidden matrices: {muon}"
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= adamw, "embeddings and the head stay with AdamW"
    args = lambda sub: tiny_args("llama", tmp_path / sub, corpus, "--optimizer", "muon", "--max-iters", "6",
                                 "--eval-interval", "3", "--log-interval", "1")
    assert_resumes(train.train, args, stop_at=3)


def test_muon_newton_schulz_in_fp32_is_torchs_iteration_and_is_used_where_bf16_is_emulated(tmp_path, corpus,
                                                                                           monkeypatch):
    import importlib

    muon_module = importlib.import_module("torch.optim._muon")
    torch_version = muon_module._zeropower_via_newtonschulz
    coeffs, steps, eps = (3.4445, -4.7750, 2.0315), 5, 1e-7
    torch.manual_seed(0)
    for shape in ((8, 20), (20, 8)):  # wide and tall: the tall one is transposed and back
        G = torch.randn(shape)
        with train.newton_schulz_in_fp32():
            ours = muon_module._zeropower_via_newtonschulz(G, coeffs, steps, eps)
        assert ours.dtype == torch.float32 and ours.shape == G.shape
        bf16 = torch_version(G, coeffs, steps, eps).float()
        err = ((ours - bf16).norm() / bf16.norm()).item()
        assert err < 0.03, f"fp32 Newton-Schulz differs from torch's bf16 one by {err:.3f} (more than bf16 rounding)"
        # a wrong step (say c for b) moves the singular values far more than bf16 rounding does
        sv = torch.linalg.svdvals(ours)
        assert 0.5 < sv.min() and sv.max() < 1.5, f"orthogonalised: singular values near 1, got {sv}"
    assert muon_module._zeropower_via_newtonschulz is torch_version, "torch's own function is back after the block"
    monkeypatch.setattr(train, "cpu_has_native", lambda dtype: dtype == "fp32")  # a CPU without native bf16
    run = train.setup(tiny_args("llama", tmp_path / "x", corpus, "--optimizer", "muon", "--dtype", "fp32"))
    assert run.optimizer.fp32_newton_schulz, "no native bf16: Muon must orthogonalise in fp32"
    seen = []
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: seen.append(self.shape) or self.to(
        torch.bfloat16))
    run.model(torch.zeros(2, 8, dtype=torch.long))[0].sum().backward()
    run.optimizer.step()
    assert not seen, f"torch's bf16 Newton-Schulz ran on {seen} on a CPU that emulates bf16"


def test_the_modern_ablation_runs_gpt2_llama_and_muon_and_writes_its_table_and_figure(tmp_path, corpus, capsys):
    import modern

    results = modern.main(["--quick", "--out-dir", str(tmp_path / "runs"), "--png", str(tmp_path / "m.png"),
                           "--train-args", f"--preset tiny --data {corpus} --cache-dir {tmp_path / 'cache'} "
                                           "--dtype fp32"])
    assert list(results) == ["GPT-2", "+ RMSNorm, SwiGLU", "+ Muon"]
    assert all(0 < bpb < 10 and steps == 20 for runs in results.values() for bpb, _, _, steps in runs)
    out = capsys.readouterr().out
    assert "val bits per byte on the held-out plays, 20 steps each" in out and (tmp_path / "m.png").exists()
    tied, untied = results["+ RMSNorm, SwiGLU"][0][2], results["+ Muon"][0][2]
    assert untied > tied, "the untied rows carry a head matrix of their own"
