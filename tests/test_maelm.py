"""What maelm.py promises (Meng et al. 2024): the encoder never reads a masked position, [MASK] or not, and reads every
visible one at its own position (or renumbered, misaligned); the decoder reads its [MASK] vector there; without a
decoder and with [MASK] in the input it is BERT's masked LM, weight for weight; each Table 2 option builds what it
names; and it trains, resumes, fills masks and fine-tunes its encoder alone through train.py."""

import os

import pytest
import torch

import bert
import data
import maelm
import train
from helpers import assert_resumes, assert_scaled_close, exit_code, redraw, tiny_args


def batch_of(tmp_path, corpus, rows=16, **kw):
    """A masked batch from the objective as train.py builds it, and a float64 model of that config (large weights)."""
    tc = train.TrainConfig(data=str(corpus), val_docs="lear", cache_dir=str(tmp_path / "cache"))
    tok, splits, _ = data.prepare_data(tc, data.special_tokens_of(maelm))
    cfg = maelm.MAELMConfig(**{**train.tokenizer_fields(maelm, tok), "hidden_size": 32, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
                               "max_seq_length": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                               **kw})
    obj = maelm.Objective(cfg, tok)
    batch = obj.train_batch(splits["train"], rows, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = maelm.MAELM(cfg).double().eval()
    redraw(model)
    return obj, batch, model, cfg


def encoder_inputs(model, run):
    """What the encoder's embedding layer was given while run() ran: [(input_ids, position_ids)]."""
    seen = []
    emb = model.encoder.embeddings
    original = emb.forward
    emb.forward = lambda ids, types, pos=None: seen.append((ids, pos)) or original(ids, types, pos)
    try:
        run()
    finally:
        del emb.forward
    return seen


@pytest.mark.parametrize("aligned", [True, False])
def test_the_encoder_reads_every_visible_token_once_and_never_a_masked_position(tmp_path, corpus, aligned):
    obj, batch, model, cfg = batch_of(tmp_path, corpus, aligned_positions=aligned)
    masked, real = batch["labels"] != -100, batch["attention_mask"].bool()
    assert (batch["input_ids"][masked] == cfg.mask_token_id).any(), "the test needs [MASK] in the objective's input"
    (ids, pos), = encoder_inputs(model, lambda: obj.loss(model, batch))
    assert cfg.mask_token_id not in ids[ids != cfg.pad_token_id].tolist(), "[MASK] reached the encoder"
    for r in range(ids.size(0)):
        visible = (real[r] & ~masked[r]).nonzero()[:, 0]  # the row's visible positions, in order
        n = len(visible)
        assert torch.equal(ids[r, :n], batch["input_ids"][r, visible]), f"row {r}: not its visible tokens, in order"
        want = visible if aligned else torch.arange(n)
        assert torch.equal(pos[r, :n], want), f"row {r}: positions {pos[r, :n].tolist()}, want {want.tolist()}"


def test_what_stands_at_a_masked_position_changes_nothing_unless_the_encoder_sees_it(tmp_path, corpus):
    for sees, should_change in ((False, False), (True, True)):
        obj, batch, model, _ = batch_of(tmp_path, corpus, encoder_sees_mask=sees)
        masked = batch["labels"] != -100
        other = dict(batch, input_ids=torch.where(masked, (batch["input_ids"] + 1) % 40, batch["input_ids"]))
        with torch.no_grad():
            a, b = obj.loss(model, batch)[0], obj.loss(model, other)[0]
        assert (a != b) == should_change, \
            f"encoder_sees_mask={sees}: loss {a.item():.6f} vs {b.item():.6f} after changing the masked inputs"


def test_without_a_decoder_and_with_mask_in_the_input_it_is_berts_masked_lm(tmp_path, corpus):
    obj, batch, model, cfg = batch_of(tmp_path, corpus, encoder_sees_mask=True, decoder_layers=0)
    reference = bert.BERT(bert.BertConfig(**{f: getattr(cfg, f) for f in bert.BertConfig.__dataclass_fields__}))
    reference.double().eval().load_state_dict(model.state_dict())  # the same names, strictly: no more, no less
    chosen = batch["labels"] != -100
    args = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    with torch.no_grad():
        assert_scaled_close(model(*args, masked_positions=chosen)[0], reference(*args, masked_positions=chosen)[0],
                            "MLM logits of MAE-LM without a decoder vs BERT")
        assert_scaled_close(obj.loss(model, batch)[0], obj.loss(reference, batch)[0], "MLM loss vs BERT's")


def test_the_decoder_reads_its_mask_vector_at_masked_positions_and_the_encoder_elsewhere(tmp_path, corpus):
    for kw, mask_vector_there in (({}, True), ({"encoder_sees_mask": True}, False),
                                  ({"encoder_sees_mask": True, "decoder_resets_mask": True}, True)):
        obj, batch, model, _ = batch_of(tmp_path, corpus, **kw)
        masked, real = batch["labels"] != -100, batch["attention_mask"].bool()
        seen = []
        hook = model.decoder_norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            obj.loss(model, batch)
        hook.remove()
        x = seen[0] - model.decoder_position_embeddings.weight[:masked.size(1)]  # (B, T, D): what each slot read
        at_mask = torch.allclose(x[masked], model.mask_token.expand_as(x[masked]), atol=1e-12)
        assert at_mask == mask_vector_there, f"{kw}: the decoder's input at masked positions"
        visible = real & ~masked
        assert not torch.allclose(x[visible][:, :4], model.mask_token[:4].expand(int(visible.sum()), 4)), \
            f"{kw}: visible positions must carry the encoder's states"


def test_decoder_depth_and_width_build_what_they_name_and_bad_combinations_are_refused(tmp_path, corpus):
    _, _, model, cfg = batch_of(tmp_path, corpus, decoder_layers=3, decoder_hidden_size=48)
    assert len(model.decoder) == 3 and model.decoder_embed.weight.shape == (48, 32)
    assert model.decoder[0].attention.n_head == 6, "decoder heads keep the encoder's head size (8)"
    assert model.mlm.dense.weight.shape == (32, 48), "the head maps D back to the tied embeddings' width"
    assert model.mlm.bias.shape == (cfg.vocab_size,)
    _, _, mlm, _ = batch_of(tmp_path, corpus, decoder_layers=0, encoder_sees_mask=True)
    assert not hasattr(mlm, "decoder") and set(mlm.state_dict()) == set(bert.BERT(mlm.config).state_dict())
    common = dict(vocab_size=50, mask_token_id=49)
    for bad, says in (({"decoder_layers": 0}, "--encoder-sees-mask"), ({"decoder_resets_mask": True}, "needs"),
                      ({"objective": "mlm+nsp"}, "no sentence pairs"), ({"decoder_hidden_size": 50}, "head size")):
        with pytest.raises(Exception, match=says):
            maelm.MAELMConfig(**common, **bad)


def test_flops_count_the_encoder_on_the_visible_share_and_the_decoder_on_every_token(tmp_path, corpus):
    _, _, model, cfg = batch_of(tmp_path, corpus)
    _, _, mlm, _ = batch_of(tmp_path, corpus, decoder_layers=0, encoder_sees_mask=True)
    layer = sum(p.numel() for p in model.decoder[0].parameters())
    decoder = cfg.decoder_layers * (6 * layer + 12 * cfg.max_seq_length * cfg.hidden_size)
    want = (1 - cfg.mask_prob) * bert.BERT.flops_per_token(mlm) + decoder
    assert abs(model.flops_per_token() - want) < 1e-6 * want


def test_detach_encoder_steps_trains_the_decoder_alone_first_and_counts_only_training_batches(tmp_path, corpus):
    obj, batch, model, cfg = batch_of(tmp_path, corpus, detach_encoder_steps=2)
    layers = list(model.encoder.layer.parameters())

    def encoder_learns():
        model.zero_grad(set_to_none=True)
        obj.loss(model, batch)[0].backward()
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in layers)

    with torch.no_grad():
        obj.loss(model, batch)  # eval mode: not a training batch, not counted
    model.train()
    assert [encoder_learns() for _ in range(4)] == [False, False, True, True], \
        "the encoder's layers must get no gradient in exactly the first 2 training batches"
    assert model.encoder.embeddings.word_embeddings.weight.grad is not None, \
        "the word embeddings are the tied output head: they learn throughout"
    assert model.state_dict()["batches_seen"].item() == 4, "the count is in the checkpoint (a resumed run counts on)"
    older = {k: v for k, v in model.state_dict().items() if k != "batches_seen"}  # written before the flag existed
    again = maelm.MAELM(cfg).double()
    again.batches_seen.fill_(7)
    again.load_state_dict(older)
    assert again.batches_seen.item() == 0, "a checkpoint without the count must load, as a run that never detached"


def test_train_py_model_maelm_learns_fills_masks_and_resumes(tmp_path, corpus, capsys):
    rows = train.train(tiny_args("maelm", tmp_path / "demo", corpus, "--max-iters", "40", "--eval-interval", "20",
                                 "--lr", "3e-3"))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals[-1]["val_mlm_loss"] < evals[0]["val_mlm_loss"] - 0.3, "the masked-LM loss did not fall"
    out = capsys.readouterr().out
    assert "[MASK] 1:" in out and "filled:" in out, "the end-of-run demo must fill the masks"
    assert exit_code(maelm.main, ["--ckpt", str(tmp_path / "demo" / "out" / "ckpt.pt"), "lend me your [MASK]ars"]) == 0
    assert "[MASK] 1:" in capsys.readouterr().out
    # the decoder trains alone for 5 batches: the resumed run must know that 3 were seen (it is in the checkpoint)
    args = lambda sub: tiny_args("maelm", tmp_path / sub, corpus, "--max-iters", "8", "--eval-interval", "4",
                                 "--log-interval", "1", "--top-k", "0", "--detach-encoder-steps", "5")
    assert_resumes(train.train, args, stop_at=3, keys=("step", "kind", "loss", "val_loss", "val_mlm_acc"))


def test_bad_flags_stop_in_one_line_before_anything_is_written(tmp_path, corpus, capsys):
    argv = tiny_args("maelm", tmp_path, corpus, "--decoder-layers", "0")
    assert exit_code(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--encoder-sees-mask" in err, err
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_fine_tuning_trains_the_encoder_and_never_touches_the_decoder(tmp_path, plays_corpus):
    d = plays_corpus
    train.train(tiny_args("maelm", tmp_path / "pre", d, "--max-iters", "4", "--eval-interval", "4", "--top-k", "0"))
    ckpt = tmp_path / "pre" / "out" / "ckpt.pt"
    base = torch.load(ckpt, weights_only=True)["model"]
    rows = train.train(tiny_args("maelm", tmp_path / "ft", d, "--task", "genre", "--init-from", str(ckpt),
                                 "--train-examples", "48", "--max-iters", "4", "--eval-interval", "2",
                                 "--eval-tokens", "3000", "--warmup-iters", "1"))
    assert 0 <= rows[-1]["test_acc"] <= 1
    tuned = torch.load(tmp_path / "ft" / "out" / "ckpt.pt", weights_only=True)["model"]
    decoder = [k for k in base if k.startswith(("decoder", "mask_token"))]
    assert decoder and all(torch.equal(tuned["pretrained." + k], base[k]) for k in decoder), \
        "fine-tuning changed the decoder, which MAE-LM discards"
    assert not torch.equal(tuned["pretrained.encoder.layer.0.intermediate.weight"],
                           base["encoder.layer.0.intermediate.weight"]), "the encoder must be fine-tuned"
