"""Multi-token prediction in mtp.py (slides "Multi-token prediction"): Gloeckle et al.'s parallel heads and
DeepSeek-V3's sequential modules on gpt.py's GPT-2. What a user relies on: the default is exactly plain GPT; every
head's targets are the right tokens; no head sees the token it predicts (and the sequential modules really read the
chain); the next-token loss is plain GPT's; speculative decoding gives exactly the greedy tokens; both attention paths
agree; the loop drives it through one forward call, as DistributedDataParallel requires; train.py's flags and
checkpoints; the command line."""

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpt
import mtp
import train
from gpt import GPT, KVCache, NextTokenObjective
from helpers import assert_paths_agree, exit_code, tiny_args
from mtp import MTPConfig, MultiTokenGPT, MultiTokenObjective, Objective, windows

V = 37
MODES = ["parallel", "sequential"]


class Tok:  # what NextTokenObjective reads from a tokenizer: bytes per token, for bits per byte
    token_bytes = torch.arange(V) % 3 + 1


class Split:
    def __init__(self, tokens):
        self.tokens = tokens


def config(**kw):
    base = dict(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return MTPConfig(**{**base, **kw})


def model_with(seed=0, **kw):
    torch.manual_seed(seed)
    return mtp.Model(config(**kw)).eval()


def random_text(n, seed=0):
    return np.random.RandomState(seed).randint(0, V, n).astype(np.uint16)


def test_the_default_is_plain_gpt_with_gpt2s_keys_and_windows():
    m = model_with()
    assert type(m) is GPT, "mtp_heads=0 must build gpt.py's GPT itself"
    assert not any(k.startswith("mtp") for k in m.state_dict()), "mtp_heads=0 must add no parameters"
    obj = Objective(m.config, Tok())
    assert type(obj) is NextTokenObjective
    assert obj.raw_tokens_per_row == 17 and obj.tokens_per_row == 16, "plain GPT rows draw T + 1 tokens"
    batch = obj.train_batch(Split(random_text(100)), 3, torch.Generator().manual_seed(0))
    assert batch["targets"].shape == (3, 16), "plain GPT targets stay (B, T)"
    assert set(obj.denominators(batch)) == {"nll"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("D", [1, 3])
def test_shapes_and_each_heads_targets_are_the_tokens_that_many_places_ahead(mode, D):
    m = model_with(mtp=mode, mtp_heads=D)
    obj = Objective(m.config, Tok())
    assert obj.raw_tokens_per_row == 16 + 1 + D, "a row must draw D more tokens for the extra heads' targets"
    text = np.arange(300) % 250  # token value = position (mod 250): offsets are visible in the values
    batch = obj.train_batch(Split(text), 4, torch.Generator().manual_seed(1))
    idx, targets = batch["idx"], batch["targets"]
    assert idx.shape == (4, 16) and targets.shape == (4, 1 + D, 16)
    for i in range(1 + D):
        assert torch.equal(targets[:, i], (idx + i + 1) % 250), f"head {i + 1}'s target is not the token {i + 1} ahead"
    logits, _ = m(idx % V, future=targets[:, :-1] % V)
    assert logits.shape == (4, 1 + D, 16, V)
    plain, _ = m(idx % V)
    assert plain.shape == (4, 16, V), "without future only the next-token head runs"
    torch.testing.assert_close(logits[:, 0], plain, msg="head 1 of the MTP forward is not the next-token forward")


def test_targets_past_the_end_of_the_text_are_ignored_and_every_heads_target_is_scored_once():
    D, T = 2, 16
    m = model_with(mtp_heads=D, mtp="sequential")
    obj = Objective(m.config, Tok())
    batch = windows(np.array([5, 6, 7, 8]), [1], 2, n_ahead=2)
    assert batch["targets"].tolist() == [[[7, 8], [8, -100]]], "the docstring's example"
    text = random_text(5 * T + 7)  # a partial last window: heads 2 and 3 run past the end there
    sums = {}
    with torch.no_grad():
        for b in obj.eval_batches(Split(text), 2):
            assert b["idx"].min() >= 0, "inputs never hold -100"
            _, stats = obj.loss(m, b)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + float(v)
    n = len(text)
    assert sums["tokens"] == n - 1, "the next-token head must score every target once"
    for i in range(2, D + 2):
        assert sums[f"tokens_head{i}"] == n - i, f"head {i} must score the token {i} ahead of every position once"
    metrics = obj.summarize(sums)
    assert set(metrics) == {"loss", "bpb", "head2_loss", "head3_loss"} and all(np.isfinite(list(metrics.values())))


@pytest.mark.parametrize("mode", MODES)
def test_no_head_sees_the_token_it_predicts(mode):
    """Head i (0-based; it predicts the token i + 1 places ahead of position t) may read tokens up to t (parallel) or
    up to t + i (sequential: depth i embeds token t + i). Changing the text from position s on must leave head i's
    prediction at t unchanged whenever its target t + i + 1 is at or past s; the sequential modules must change at
    t = s - i (they do read the chain)."""
    D, T = 3, 16
    torch.manual_seed(0)
    m = MultiTokenGPT(config(mtp=mode, mtp_heads=D)).double().eval()  # float64: rounding never looks like a dependence
    with torch.no_grad():  # larger weights: every dependence shows well above float noise
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    text = random_text(T + 1 + D, seed=2)

    def heads(text):
        b = windows(text, [0], T, 1 + D)
        return m(b["idx"], future=b["targets"][:, :-1])[0][0]  # (1 + D, T, V)

    base = heads(text)
    rng = np.random.RandomState(3)
    for s in range(1, T + D + 1):
        changed = text.copy()
        changed[s:] = (changed[s:] + rng.randint(1, V, len(changed) - s)) % V  # every token from s on differs
        new = heads(changed)
        for i in range(1 + D):
            for t in range(T):
                same = torch.allclose(base[i, t], new[i, t], atol=1e-6, rtol=0)
                reads_up_to = t if mode == "parallel" or i == 0 else t + i
                assert same == (reads_up_to < s), (
                    f"{mode} head {i + 1} at position {t} (reads up to token {reads_up_to}, predicts {t + i + 1}): "
                    f"changing tokens from {s} on {'did not change' if same else 'changed'} its prediction")


def test_parallel_heads_are_independent_and_sequential_modules_are_chained():
    for mode in MODES:
        m = model_with(mtp=mode, mtp_heads=2)
        b = windows(random_text(40), [0], 16, 3)
        before = m(b["idx"], future=b["targets"][:, :-1])[0]
        with torch.no_grad():
            for p in m.mtp[0].parameters():  # the head / module for the token 2 ahead
                p.add_(0.1)
        after = m(b["idx"], future=b["targets"][:, :-1])[0]
        assert torch.equal(before[:, 0], after[:, 0]), f"{mode}: an extra head changed the next-token head"
        assert not torch.allclose(before[:, 1], after[:, 1]), f"{mode}: head 2 ignores its own weights"
        chained = not torch.allclose(before[:, 2], after[:, 2])
        assert chained == (mode == "sequential"), (
            f"{mode}: head 3 {'depends' if chained else 'does not depend'} on head 2's module; parallel heads are "
            f"independent (Gloeckle et al.), sequential depth 2 reads depth 1's hidden state (DeepSeek-V3 eq. 21)")


def test_with_zero_extra_heads_the_loss_is_plain_next_token_cross_entropy():
    m = model_with().train()
    obj = Objective(m.config, Tok())
    b = obj.train_batch(Split(random_text(200)), 4, torch.Generator().manual_seed(4))
    b["targets"] = b["targets"].clone()  # a view of the same row as idx
    b["targets"][0, :5] = -100
    loss, stats = obj.loss(m, b)
    logits, _ = m(b["idx"])
    ref = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, ref, msg="n = 1 must be the plain LM loss")
    assert set(stats) == {"nll", "tokens", "bytes"} and int(stats["tokens"]) == 4 * 16 - 5


@pytest.mark.parametrize("mode", MODES)
def test_the_next_token_path_is_plain_gpt_and_loss_stays_the_next_token_loss(mode):
    plain = model_with(seed=5)
    multi = model_with(seed=6, mtp=mode, mtp_heads=2)
    missing, unexpected = multi.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mtp.") for k in missing), "only the heads are new"
    text = Split(random_text(16 * 5 + 3, seed=7))
    metrics = []
    for model in (plain, multi):
        obj, sums = Objective(model.config, Tok()), {}
        with torch.no_grad():
            for b in obj.eval_batches(text, 4):
                for k, v in obj.loss(model, b)[1].items():
                    sums[k] = sums.get(k, 0) + float(v)
        metrics.append(obj.summarize(sums))
    for key in ("loss", "bpb"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-6), f"'{key}' must be the next-token {key}"
    # mtp_weight 0: the total is the next-token loss, and the shared weights get exactly plain GPT's gradients
    multi.config.mtp_weight = 0.0
    obj_p, obj_m = Objective(plain.config, Tok()), MultiTokenObjective(multi.config, Tok())
    b = obj_m.train_batch(text, 3, torch.Generator().manual_seed(8))
    lp, _ = obj_p.loss(plain.train(), {"idx": b["idx"], "targets": b["targets"][:, 0]})
    lm, _ = obj_m.loss(multi.train(), b)
    torch.testing.assert_close(lm, lp, msg="with mtp_weight 0 the total must be the next-token loss")
    lp.backward()
    lm.backward()
    grads = dict(plain.named_parameters())
    for name, p in multi.named_parameters():
        if not name.startswith("mtp."):
            torch.testing.assert_close(p.grad, grads[name].grad, msg=f"gradient of {name} differs from plain GPT's")


def test_the_total_loss_is_next_token_plus_w_times_the_extra_heads():
    m = model_with(mtp_heads=2, mtp_weight=0.25)
    obj = Objective(m.config, Tok())
    b = obj.train_batch(Split(random_text(100)), 2, torch.Generator().manual_seed(9))
    total, stats = obj.loss(m, b)
    logits, loss = m(b["idx"], b["targets"], future=b["targets"][:, :-1])
    ce = [F.cross_entropy(logits[:, i].flatten(0, 1), b["targets"][:, i].flatten()) for i in range(3)]
    torch.testing.assert_close(total, ce[0] + 0.25 * (ce[1] + ce[2]), msg="loss = L_1 + w (L_2 + L_3)")
    torch.testing.assert_close(loss, total, msg="the forward's own loss uses the same weighting")


class ForwardOnly(torch.nn.Module):
    """What the objective may use under DistributedDataParallel: calls of the wrapped module's forward, nothing else."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_the_objective_uses_the_model_through_exactly_one_forward_call(mode):
    m = model_with(mtp=mode, mtp_heads=2).train()
    obj = Objective(m.config, Tok())
    b = obj.train_batch(Split(random_text(100)), 2, torch.Generator().manual_seed(10))
    wrapped = ForwardOnly(m)
    loss, _ = obj.loss(wrapped, b, obj.denominators(b))
    assert wrapped.calls == 1, f"objective.loss called the model {wrapped.calls} times; DDP needs exactly one forward"
    loss.backward()
    assert all(p.grad is not None for p in m.mtp.parameters()), "the extra heads got no gradient through forward"


@pytest.mark.parametrize("mode", MODES)
def test_naive_and_sdpa_attention_agree_for_every_head_in_outputs_and_gradients(mode):
    b = windows(random_text(60, seed=11), [0, 20], 16, 3)
    assert_paths_agree(lambda attn: model_with(mtp=mode, mtp_heads=2, attn=attn, pos="alibi").train(),
                       lambda m: m(b["idx"], b["targets"], future=b["targets"][:, :-1]))


@pytest.mark.parametrize("mode", MODES)
def test_generation_with_and_without_the_kv_cache_is_unchanged_by_mtp_heads(mode):
    m = model_with(seed=3, mtp=mode, mtp_heads=2)
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(6))
    a = m.generate(prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    b = m.generate(prompt, 20, temperature=1.0, top_k=5, use_cache=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b), "the KV cache changed the generated tokens of a model with MTP heads"
    cache = KVCache(2, (2, 2, 16, 8), "cpu", torch.float32)
    with pytest.raises(ValueError, match="without a KV cache"):
        m(prompt, cache=cache, future=torch.zeros(2, 2, 3, dtype=torch.long))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("D", [1, 3])
def test_speculative_decoding_gives_exactly_the_greedy_tokens(mode, D):
    # float64: greedy's argmax must not flip on a near-tie between a one-token pass and a block pass
    m = model_with(seed=12, mtp=mode, mtp_heads=D, pos="rope").double()
    prompt = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(13))
    stats = {}
    fast = m.speculative_generate(prompt, 25, stats)  # 29 > block_size 16: the window slides
    for use_cache in (True, False):
        greedy = m.generate(prompt, 25, temperature=0, use_cache=use_cache)
        assert torch.equal(fast, greedy), f"speculative decoding differs from greedy (use_cache={use_cache})"
    assert stats["drafted"] > 0, "the speculative path never drafted"


@pytest.mark.parametrize("mode", MODES)
def test_speculative_bookkeeping_with_perfect_and_with_wrong_drafts(mode, monkeypatch):
    """Drafts that are greedy's own tokens are all kept (1 + D tokens per pass); drafts wrong from the second on keep
    exactly one each pass. Either way the output is greedy's."""
    D = 3
    m = model_with(seed=14, mtp=mode, mtp_heads=D, block_size=32).double()
    prompt = torch.randint(0, V, (1, 3), generator=torch.Generator().manual_seed(15))
    greedy = m.generate(prompt, 12 + D + 1, temperature=0)
    for wrong_from, per_pass in ((None, 1 + D), (1, 2)):
        def oracle(z, x, text, pos, bias):
            P = z.size(1)
            d = greedy[:, P + 1:P + 1 + D].clone()
            if wrong_from is not None:
                d[:, wrong_from:] = (d[:, wrong_from:] + 1) % V
            return d
        monkeypatch.setattr(m, "draft", oracle)
        stats = {}
        out = m.speculative_generate(prompt, 12, stats)
        assert torch.equal(out, greedy[:, :15]), f"{mode}: not greedy's tokens with drafts wrong from {wrong_from}"
        assert stats["passes"] == 1 + 12 // per_pass, f"{mode}: {stats['passes']} passes for {per_pass} tokens each"
        kept = per_pass - 1
        assert stats["accepted"] == kept * (12 // per_pass) and stats["drafted"] == D * (12 // per_pass), stats
        assert stats["accepted_at"] == [12 // per_pass] * kept + [0] * (D - kept), stats


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos", ["learned", "t5"])
def test_drafts_are_what_the_training_forward_predicts_given_those_drafts(mode, pos):
    """draft() (the decoding path) and forward(future=...) (the training path) are the same heads. Fed the text,
    greedy's next token g and the drafts themselves as the tokens ahead, the forward's head k+1 at the last position
    picks draft k. Drafting from the first P positions of a longer pass (as decoding does after rejected drafts) is the
    same as drafting from a pass over those P tokens: T5's bias must be cut to the P x P corner."""
    D, P = 3, 10
    m = model_with(seed=16, mtp=mode, mtp_heads=D, pos=pos).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)  # larger weights: drafts that vary from head to head
        idx = torch.randint(0, V, (2, P + 4), generator=torch.Generator().manual_seed(17))
        z, x, pos_, bias = m.trunk(idx)  # a longer pass: P tokens, then 4 rejected ones
        idx = idx[:, :P]
        g = m.unembed(x)[:, P - 1:P].argmax(dim=-1)
        drafts = m.draft(z[:, :P], x[:, :P], torch.cat([idx, g], dim=1), pos_[:P], bias)  # (B, D)
        text = torch.cat([idx, g, drafts], dim=1)  # (B, P + 1 + D)
        future = torch.stack([text[:, k:k + P] for k in range(1, D + 1)], dim=1)  # (B, D, P): the token k ahead
        logits, _ = m(idx, future=future)
    assert torch.equal(logits[:, 1:, -1].argmax(dim=-1), drafts), f"{mode}: draft() disagrees with the forward's heads"


def test_speculative_decoding_is_greedy_only_and_gpt_py_knows_nothing_of_it():
    assert list(inspect.signature(MultiTokenGPT.speculative_generate).parameters) == \
        ["self", "idx", "max_new_tokens", "stats"], "speculative decoding verifies greedy choices: no sampling knobs"
    assert not hasattr(model_with(), "speculative_generate"), "a model without heads has nothing to draft with"
    assert not {"speculative", "stats"} & set(inspect.signature(GPT.generate).parameters)
    source = inspect.getsource(gpt)
    assert "import mtp" not in source and "mtp_heads" not in source, "gpt.py must not know about multi-token heads"


def test_flops_count_the_extra_heads_and_configs_reject_bad_values():
    plain, multi = model_with(), model_with(mtp_heads=2)
    head = sum(p.numel() for p in multi.mtp[0].parameters())
    c = plain.config
    extra = 2 * (6 * head + 6 * V * c.n_embd + 12 * c.block_size * c.n_embd)
    assert multi.flops_per_token() - plain.flops_per_token() == extra, "each head: its block, lm_head matmul, attention"
    for bad, match in ((dict(mtp="tree"), "--mtp tree: must be parallel or sequential"),
                       (dict(mtp_heads=-1), "--mtp-heads -1: must be >= 0"), (dict(mtp_weight=-1.0), "--mtp-weight"),
                       (dict(mtp_heads=1, n_layer=0), "--n-layer 0: must be >= 1")):
        with pytest.raises(ValueError, match=match):
            config(**bad)


def test_the_comparison_trains_through_the_loop_at_equal_compute_and_writes_its_table_and_figure(tmp_path, corpus,
                                                                                                    capsys):
    import experiments

    png = tmp_path / "mtp.png"
    results = experiments.main([
        "mtp", "--variants", "parallel-2,sequential-4", "--iters", "6", "--block-size", "16", "--batch-size", "2",
        "--evals", "1", "--eval-tokens", "256", "--prompts", "2", "--prompt-len", "4", "--data", str(corpus),
        "--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--png", str(png)])
    out = capsys.readouterr().out
    assert list(results) == ["next-token", "parallel-2", "sequential-4"], "the next-token baseline always runs first"
    base = results["next-token"]
    for name in ("parallel-2", "sequential-4"):
        r = results[name]
        assert r["steps"] < base["steps"], f"{name}: dearer steps must buy fewer of them at equal compute"
        assert r["train_flops"] == pytest.approx(base["train_flops"], rel=0.15), f"{name}: not equal compute"
        assert r["exact"] == "2/2", f"{name}: speculative decoding differed from greedy"
        assert 0 <= r["acceptance"] <= 1 and r["tokens_per_pass"] >= 1
    assert results["sequential-4"]["weight"] == pytest.approx(0.1), "DeepSeek-V3's lambda 0.3 over D = 3"
    assert "head4_loss" in results["sequential-4"] and "head2_loss" in results["parallel-2"]
    for name in results:
        assert any(line.startswith(name) for line in out.splitlines()), f"no table row for {name}"
    assert png.stat().st_size > 10_000, "the figure was not written"
    # and a checkpoint it wrote samples with --speculative from the command line, greedy and exact
    ckpt = str(tmp_path / "runs" / "parallel-2" / "ckpt.pt")
    mtp.main(["--ckpt", ckpt, "--prompt", "the ", "--max-new-tokens", "8", "--speculative"])
    fast = capsys.readouterr()
    mtp.main(["--ckpt", ckpt, "--prompt", "the ", "--max-new-tokens", "8"])
    assert fast.out == capsys.readouterr().out, "--speculative must print greedy decoding's text"
    gpt.main(["--ckpt", ckpt, "--prompt", "the ", "--max-new-tokens", "8", "--temperature", "0"])
    assert fast.out == capsys.readouterr().out, "gpt.py samples from an MTP checkpoint with its next-token head"
    assert "drafts kept" in fast.err
    # a plain GPT has nothing to draft with
    assert exit_code(mtp.main, ["--ckpt", str(tmp_path / "runs" / "next-token" / "ckpt.pt"), "--speculative"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtp.py: error:") and "--mtp-heads" in err and len(err.strip().splitlines()) == 1, err


def test_the_comparison_rejects_bad_input_with_one_line_and_exit_code_2(tmp_path, capsys):
    import experiments

    with pytest.raises(SystemExit) as e:
        experiments.main(["mtp", "--variants", "parallel-3", "--out-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "parallel-3" in err, err
    assert not (tmp_path / "runs").exists(), "nothing may be written on bad input"


def test_train_py_flags_checkpoints_resume_and_help(tmp_path, corpus, capsys):
    """The MTP flags stay train.py flags of --model gpt; a checkpoint keeps GPT-2's keys plus mtp.*, and the config
    fields mtp_heads / mtp / mtp_weight (the format written before mtp.py existed), and loads back and resumes."""
    args = tiny_args("gpt", tmp_path, corpus, "--mtp-heads", "2", "--mtp", "sequential", "--mtp-weight", "0.5",
                     "--eval-tokens", "256", "--eval-train-tokens", "256", "--max-iters", "4", "--eval-interval", "2")
    rows = train.train(args)
    assert "val_head3_loss" in rows[-1], f"the log must report every head: {sorted(rows[-1])}"
    model, _, ckpt = train.load_for_inference(str(tmp_path / "out" / "ckpt.pt"), model="gpt")
    assert isinstance(model, MultiTokenGPT) and model.config.mtp == "sequential" and model.config.mtp_weight == 0.5
    assert {"mtp_heads", "mtp", "mtp_weight"} <= set(ckpt["model_config"])
    assert any(k.startswith("mtp.1.hnorm") for k in ckpt["model"]) and "transformer.wpe.weight" in ckpt["model"]
    resumed = train.train([*args[:-4], "--max-iters", "6", "--eval-interval", "2", "--resume"])
    assert resumed[-1]["step"] == 6
    # a plain run: gpt.py's own GPT, and its checkpoint has no heads
    train.train(tiny_args("gpt", tmp_path / "plain", corpus, "--max-iters", "2", "--eval-tokens", "256"))
    model, _, ckpt = train.load_for_inference(str(tmp_path / "plain" / "out" / "ckpt.pt"), model="gpt")
    assert type(model) is GPT and not any(k.startswith("mtp") for k in ckpt["model"])
    capsys.readouterr()
    assert exit_code(train.main, ["--model", "gpt", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--mtp-heads MTP_HEADS D: extra future tokens" in text and "--n-layer N_LAYER L: Transformer blocks" in text
    # its own --out-dir: the default out/gpt is the working directory's, where a user's run may already be
    assert exit_code(train.main, ["--model", "gpt", "--mtp", "tree", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "--mtp tree: must be parallel or sequential" in capsys.readouterr().err


def test_mtp_py_refuses_bad_input_with_one_line(tmp_path, capsys):
    for argv, message in ((["--ckpt", str(tmp_path / "none.pt")], "no checkpoint"),
                          (["--hf", str(tmp_path)], "required: --ckpt"),
                          (["--ckpt", str(tmp_path / "none.pt"), "--max-new-tokens", "-5"], "--max-new-tokens -5")):
        assert exit_code(mtp.main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("mtp.py: error:") and message in err and len(err.strip().splitlines()) == 1, err
