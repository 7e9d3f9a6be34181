"""What electra.py promises: its generator and discriminator are transformers' ElectraForMaskedLM and
ElectraForPreTraining (parity both ways, ELECTRA-Small's sizes), they share one set of embedding parameters, the
discriminator's labels are "masked AND changed", no gradient of the discriminator's loss reaches the generator through
the sample, the sample is a categorical draw from the generator, and train.py --model electra trains, evaluates the
same way every time, resumes exactly and shows the flagged tokens at the end."""

import pytest
import torch
import transformers

import bert
import data
import electra
import train
from helpers import (assert_resumes, assert_scaled_close, exit_code, padded_inputs, redraw, sigmas,
                     tiny_args)


def assert_rel(got, ref, what):
    assert_scaled_close(got, ref, what, rel=1e-5)  # float64 on both sides: 1e-5 of the largest logit


def hf_pair(seed=0, V=61, T=24, E=24, C=64, gen_heads=1, gen_ffn=64):
    """An ElectraForMaskedLM + ElectraForPreTraining pair as ELECTRA trains them: the generator 1/4 of the
    discriminator (ELECTRA's rule: FFN 4x hidden, one head per 64), the same embeddings, std-0.3 weights."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, embedding_size=E, num_hidden_layers=2, max_position_embeddings=T, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
    gen = transformers.ElectraForMaskedLM(transformers.ElectraConfig(hidden_size=C // 4, num_attention_heads=gen_heads,
                                                                     intermediate_size=gen_ffn, **kw)).eval()
    disc = transformers.ElectraForPreTraining(transformers.ElectraConfig(hidden_size=C, num_attention_heads=4,
                                                                         intermediate_size=96, **kw)).eval()
    redraw(gen)
    redraw(disc)
    with torch.no_grad():
        for p, q in zip(gen.electra.embeddings.parameters(), disc.electra.embeddings.parameters()):
            q.copy_(p)
    return gen, disc


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_from_pretrained_matches_transformers_generator_and_discriminator_with_padding(tmp_path, attn):
    gen, disc = hf_pair()
    gen.save_pretrained(tmp_path / "gen")
    disc.save_pretrained(tmp_path / "disc")
    ids, tt, am = padded_inputs()
    ours = electra.ELECTRA.from_pretrained(str(tmp_path / "gen"), str(tmp_path / "disc"), attn=attn).double().eval()
    assert ours.config.generator_size == 0.25
    with torch.no_grad():
        ref_g = gen.double()(input_ids=ids, token_type_ids=tt, attention_mask=am).logits
        ref_d = disc.double()(input_ids=ids, token_type_ids=tt, attention_mask=am).logits
        got_g, got_d = ours.generator(ids, tt, am), ours.discriminator(ids, tt, am)
    assert got_g.shape == (3, 24, 61) and got_d.shape == (3, 24)
    assert_rel(got_g, ref_g, f"generator logits ({attn})")
    assert_rel(got_d, ref_d, f"discriminator logits ({attn})")


def test_a_generator_off_electras_shape_rule_loads_as_its_own_config_json_says(tmp_path):
    gen, disc = hf_pair(gen_heads=2, gen_ffn=40)  # the rule would give 1 head and FFN 64 at width 16
    gen.save_pretrained(tmp_path / "gen")
    disc.save_pretrained(tmp_path / "disc")
    ids, tt, am = padded_inputs()
    ours = electra.ELECTRA.from_pretrained(str(tmp_path / "gen"), str(tmp_path / "disc")).double().eval()
    g = ours.config.generator_config()
    assert (g.num_attention_heads, g.intermediate_size) == (2, 40), "the generator's config.json was not followed"
    with torch.no_grad():
        ref = gen.double()(input_ids=ids, token_type_ids=tt, attention_mask=am).logits
        assert_rel(ours.generator(ids, tt, am), ref, "generator logits (2 heads, FFN 40)")
    ours.export_hf(str(tmp_path / "again"))
    back = transformers.ElectraConfig.from_pretrained(str(tmp_path / "again" / "generator"))
    assert (back.num_attention_heads, back.intermediate_size) == (2, 40), "the export lost the generator's shape"


def test_export_hf_round_trips_through_transformers(tmp_path):
    torch.manual_seed(0)
    ours = electra.ELECTRA(electra.ElectraConfig(vocab_size=53, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=48, embedding_size=16,
                                                 max_position_embeddings=20, max_seq_length=20)).eval()
    redraw(ours)
    ours.export_hf(str(tmp_path / "gen"), str(tmp_path / "disc"))
    gen = transformers.ElectraForMaskedLM.from_pretrained(str(tmp_path / "gen")).eval().double()
    disc = transformers.ElectraForPreTraining.from_pretrained(str(tmp_path / "disc")).eval().double()
    ids, tt, am = padded_inputs(V=53, T=20)
    ours = ours.double()
    with torch.no_grad():
        assert_rel(gen(input_ids=ids, token_type_ids=tt, attention_mask=am).logits, ours.generator(ids, tt, am),
                   "transformers reads our generator differently")
        assert_rel(disc(input_ids=ids, token_type_ids=tt, attention_mask=am).logits, ours.discriminator(ids, tt, am),
                   "transformers reads our discriminator differently")
    back = electra.ELECTRA.from_pretrained(str(tmp_path / "gen"), str(tmp_path / "disc")).double()
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), f"export -> from_pretrained changed {name}"
    ours.export_hf(str(tmp_path / "both"))  # one directory, generator/ and discriminator/ in it: what --init-from reads
    assert electra.ELECTRA.from_pretrained(str(tmp_path / "both")).config == back.config
    with pytest.raises(FileNotFoundError, match="generator/ and discriminator/"):
        electra.ELECTRA.from_pretrained(str(tmp_path / "gen"))


def test_from_pretrained_refuses_a_pair_that_does_not_share_its_embeddings(tmp_path):
    gen, disc = hf_pair()
    with torch.no_grad():
        disc.electra.embeddings.position_embeddings.weight[3] += 1.0
    gen.save_pretrained(tmp_path / "gen")
    disc.save_pretrained(tmp_path / "disc")
    with pytest.raises(ValueError, match="position_embeddings.*not trained together"):
        electra.ELECTRA.from_pretrained(str(tmp_path / "gen"), str(tmp_path / "disc"))


def preset_config(name):
    keys = {k: v for k, v in electra.PRESETS[name].items()
            if k in electra.ElectraConfig.__dataclass_fields__ and k != "vocab_size"}
    return electra.ElectraConfig(vocab_size=30522, **keys)


def test_electra_small_presets_are_the_papers_small_and_the_released_small_plus_plus():
    sizes = lambda c: (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers)
    paper, released = preset_config("electra-small"), preset_config("electra-small++")
    assert sizes(paper.generator_config()) == (64, 256, 1, 12), "the paper's Small: a generator 1/4 as wide (Table 6)"
    # google/electra-small-generator's config.json: hidden 256, FFN 1024, 4 heads, 12 layers, embeddings 128
    assert sizes(released.generator_config()) == (256, 1024, 4, 12), \
        "the released Small (Small++): a generator as wide as the discriminator"
    assert sizes(released.discriminator_config()) == sizes(paper.discriminator_config()) == (256, 1024, 4, 12)
    assert released.embedding_size == paper.embedding_size == 128
    assert electra.PRESETS["electra-small++"]["max_iters"] == 4_000_000, "the released Small trained for 4M steps"


def test_electra_small_discriminator_has_the_released_parameter_count():
    cfg = preset_config("electra-small")
    with torch.device("meta"):
        ours = electra.ELECTRA(cfg)
        hf = transformers.ElectraForPreTraining(transformers.ElectraConfig(
            vocab_size=30522, embedding_size=128, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
            intermediate_size=1024))
    n_disc = sum(p.numel() for p in ours.discriminator.parameters())
    assert n_disc == sum(p.numel() for p in hf.parameters()) == 13_549_057, "ELECTRA-Small's discriminator: 13.5M"


# ----------------------------------------------------------------------------------------------------------------------
# The method


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = electra.ElectraConfig(**{**dict(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, embedding_size=16, max_position_embeddings=16,
                                          max_seq_length=16, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0), **kw})
    return electra.ELECTRA(cfg)


def test_generator_and_discriminator_share_every_embedding_parameter_and_nothing_else():
    m = tiny_model()
    g, d = m.generator.encoder, m.discriminator.encoder
    assert g.embeddings is d.embeddings
    for (name, p), (_, q) in zip(g.embeddings.named_parameters(), d.embeddings.named_parameters()):
        assert p is q, f"{name} is two tensors"
    assert g.embeddings_project.weight.shape == (8, 16) and d.embeddings_project.weight.shape == (32, 16), \
        "each network projects the shared E=16 embeddings to its own width"
    shared = {id(p) for p in g.parameters()} & {id(p) for p in d.parameters()}
    assert shared == {id(p) for p in g.embeddings.parameters()}, "only the embeddings may be shared"
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert m.num_params() == count(m.generator) + count(m.discriminator) - count(g.embeddings), \
        "the shared embeddings must count once"


def test_replaced_means_masked_and_changed():
    m = tiny_model().eval()
    ids = torch.full((2, 16), 5)
    labels = torch.full((2, 16), -100)
    chosen = torch.zeros(2, 16, dtype=torch.bool)
    chosen[:, [2, 5, 9]] = True
    labels[chosen] = 5
    masked = ids.masked_fill(chosen, 3)  # 3 plays [MASK]
    with torch.no_grad():
        m.generator.head.bias[5] = 1e4  # the generator is sure of the original token: every sample equals it
        _, _, replaced, corrupted = m(masked, labels)
        assert not replaced.any() and torch.equal(corrupted, ids), "a sample equal to the original is not replaced"
        m.generator.head.bias[5], m.generator.head.bias[7] = 0.0, 1e4  # now it always samples 7
        _, _, replaced, corrupted = m(masked, labels)
    assert torch.equal(replaced, chosen), "a masked position whose sample differs is replaced"
    assert torch.equal(corrupted, ids.masked_fill(chosen, 7)), "the discriminator reads the original with the samples"


def test_the_discriminator_loss_sends_no_gradient_into_the_generator_through_the_sample():
    m = tiny_model().train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 26, (4, 16), generator=g)
    labels = torch.where(torch.rand(4, 16, generator=g) < 0.3, ids, -100)
    _, disc_logits, replaced, _ = m(ids.masked_fill(labels != -100, 27), labels)
    torch.nn.functional.binary_cross_entropy_with_logits(disc_logits, replaced.float()).backward()
    own = [n for n, p in m.generator.named_parameters() if not n.startswith("encoder.embeddings.")]
    leaked = [n for n in own if dict(m.generator.named_parameters())[n].grad is not None]
    assert own and not leaked, f"the discriminator's loss reached the generator: {leaked}"
    assert m.generator.encoder.embeddings.word_embeddings.weight.grad is not None, \
        "the shared embeddings do learn from the discriminator"
    assert all(p.grad is not None for p in m.discriminator.parameters())


def test_the_loss_is_the_mean_mlm_loss_plus_50_times_the_mean_bce_over_real_tokens_never_padding():
    m = tiny_model().double().eval()

    class Specials:  # the objective reads only the special ids of a tokenizer here
        specials, eot_id = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[MASK]": 3}, 2

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 30, (3, 16), generator=g)
    real = torch.ones(3, 16, dtype=torch.long)
    real[2, 10:] = 0  # the last row ends in padding
    labels = torch.where((torch.rand(3, 16, generator=g) < 0.3) & real.bool(), ids, -100)
    batch = dict(input_ids=ids.masked_fill(labels != -100, 3), labels=labels, token_type_ids=torch.zeros_like(ids),
                 attention_mask=real, sample_noise=torch.rand(3, 16, generator=g))
    loss, metrics = electra.ReplacedTokenDetection(m.config, Specials()).loss(m, batch)

    gen_logits, disc_logits, replaced, _ = m(batch["input_ids"], labels, None, real, batch["sample_noise"])
    assert 0 < int(replaced.sum()) < int((labels != -100).sum()), "the test needs both kinds of masked positions"
    mlm = -gen_logits.log_softmax(-1).gather(1, labels[labels != -100][:, None]).mean()
    p = disc_logits.sigmoid()[real.bool()]
    y = replaced[real.bool()].double()
    bce = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    torch.testing.assert_close(loss.double(), mlm + 50 * bce, rtol=1e-6, atol=0,  # the loss is computed in fp32
                               msg="ELECTRA §2: L = mean MLM loss at the masked positions + 50 x mean BCE over "
                                   "every real token (padding excluded)")
    assert int(metrics["tokens"]) == int(real.sum()) and int(metrics["replaced"]) == int(replaced.sum())


def test_masked_positions_are_counted_as_electras_pretrain_helpers_mask():
    class Specials:
        specials, eot_id = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[MASK]": 3}, 2

    cfg = tiny_model(max_seq_length=128, max_position_embeddings=128).config
    obj = electra.ReplacedTokenDetection(cfg, Specials())
    real = torch.zeros(4, 128, dtype=torch.long)
    for r, length in enumerate((3, 40, 100, 128)):
        real[r, :length] = 1
    candidates = real.bool().clone()
    candidates[:, 0] = False  # [CLS]
    k = obj.mask_count(candidates, real, None)
    # round(0.15 x tokens), at least 1, at most int(0.155 x 128) = 19
    assert k.tolist() == [1, 6, 15, 19], f"ELECTRA's counts per row: {k.tolist()}"


def test_sample_categorical_draws_from_the_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    draws = electra.sample_categorical(probs.log().expand(n, 4), u)
    counts = torch.bincount(draws, minlength=4)
    for i in range(4):
        assert sigmas(int(counts[i]), n, float(probs[i])) < 4, f"token {i}: {int(counts[i])} of {n} draws"
    assert electra.sample_categorical(torch.log(torch.tensor([[0.2, 0.5, 0.3]])), torch.tensor([0.6])).item() == 1


# ----------------------------------------------------------------------------------------------------------------------
# Through train.py, and electra.py's command line



def test_train_py_model_electra_learns_reports_its_metrics_and_flags_tokens(tmp_path, corpus, capsys):
    rows = train.train(tiny_args("electra", tmp_path, corpus, "--max-iters", "40", "--eval-interval", "20",
                                 "--lr", "3e-3"))
    out = capsys.readouterr().out
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {"val_gen_loss", "val_gen_acc", "val_disc_loss", "val_disc_acc", "val_disc_acc_replaced"} <= set(evals[-1])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_gen_loss"] < evals[0]["val_gen_loss"], \
        "the combined and the generator's losses must fall"
    last = evals[-1]
    assert last["val_loss"] == pytest.approx(last["val_gen_loss"] + 50 * last["val_disc_loss"]), "L = MLM + 50 x disc"
    assert "flagged:" in out and "replaced" in out, "the end-of-run demo must show flagged tokens"
    assert (tmp_path / "out" / "loss.png").exists()
    capsys.readouterr()
    assert exit_code(electra.main, ["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--as-is", "lend me your ears"]) == 0
    assert "flagged:" in capsys.readouterr().out
    assert exit_code(bert.main, ["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "a [MASK]"]) == 2
    assert "a checkpoint of --model electra, not bert" in capsys.readouterr().err
    assert exit_code(electra.main, ["--ckpt", str(tmp_path / "nope.pt"), "x"]) == 2
    capsys.readouterr()
    assert exit_code(electra.main, ["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "x", "--device", "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown --device" in err, err


def test_evaluation_is_the_same_every_time_and_never_touches_the_training_rng(tmp_path, corpus):
    tok, splits, _ = data.prepare_data(train.TrainConfig(data=str(corpus), val_docs="lear",
                                                         cache_dir=str(tmp_path / "cache")),
                                       data.special_tokens_of(electra))
    m = tiny_model(vocab_size=tok.n_vocab, max_position_embeddings=64, max_seq_length=64,
                   **{k: tok.specials[v] for k, v in electra.TOKEN_IDS.items()}).eval()
    obj = electra.Objective(m.config, tok)
    rng = torch.get_rng_state()
    runs = [train.evaluate(m, obj, [splits["val"]], 16, "cpu", torch.autocast("cpu", enabled=False)) for _ in range(2)]
    assert runs[0] == runs[1], "two evaluations of the same model differ (the generator's samples must be fixed)"
    assert torch.equal(torch.get_rng_state(), rng), "evaluation drew from the global RNG"
    assert 0.1 < runs[0]["replaced"] < 0.16, "about 15% masked, nearly all replaced by an untrained generator"


def test_an_electra_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path, corpus):
    # the same masks, samples and dropout after a resume
    common = ("--max-iters", "12", "--eval-interval", "6", "--log-interval", "1", "--hidden-dropout-prob", "0.1")
    keys = ("step", "kind", "loss", "val_loss", "val_disc_acc")
    assert_resumes(train.train, lambda sub: tiny_args("electra", tmp_path / sub, corpus, *common), stop_at=4, keys=keys)


def test_electra_py_refuses_another_models_checkpoint(tmp_path, corpus, capsys):
    train.train(tiny_args("bert", tmp_path, corpus, "--max-iters", "1"))
    assert exit_code(electra.main, ["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a checkpoint of --model bert, not electra" in err


def test_bad_settings_one_line_exit_2(tmp_path, corpus, capsys):
    for extra, message in ((["--generator-size", "0"], "--generator-size 0.0: must be in (0, 1]"),
                           (["--embedding-size", "-1"], "--embedding-size -1: must be >= 0"),
                           (["--hidden-dropout-prob", "1"], "--hidden-dropout-prob 1.0: must be in [0, 1)"),
                           (["--num-hidden-layers", "0"], "--num-hidden-layers 0: must be at least 1"),
                           (["--num-attention-heads", "0"], "--num-attention-heads 0: must be at least 1")):
        assert exit_code(train.main, tiny_args("electra", tmp_path, corpus, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, f"{extra}: {err!r}"
        assert not (tmp_path / "out").exists(), f"{extra}: something was written"
