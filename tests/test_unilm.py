"""What unilm.py promises (Dong et al. 2019): the three self-attention masks are Fig. 1's, and a token's prediction
depends on exactly the tokens its mask lets it read; BERT's encoder given the same (B, T, T) mask is transformers'
BertForPreTraining given it; rows follow §2.3's mix with each LM's segment ids and NSP only on bidirectional rows;
masking units are 1 to 3 tokens; and it trains, resumes and generates left to right through train.py."""

import pytest
import torch

import bert
import data
import train
import unilm
from helpers import assert_resumes, assert_scaled_close, exit_code, redraw, sigmas, tiny_args

BI, L2R, R2L, S2S = range(4)


def test_the_three_masks_are_the_papers_figure():
    rows = lambda *r: torch.tensor([[int(c) for c in x] for x in r], dtype=torch.bool)
    want = {BI: rows("1111", "1111", "1111", "1111"), L2R: rows("1000", "1100", "1110", "1111"),
            R2L: rows("1111", "0111", "0011", "0001"), S2S: rows("1100", "1100", "1110", "1111")}
    mask = unilm.self_attention_mask(torch.arange(4), torch.full((4,), 2), torch.ones(4, 4, dtype=torch.long))
    for lm, m in want.items():
        assert torch.equal(mask[lm], m), f"{unilm.LMS[lm]}: got\n{mask[lm].int()}"
    real = torch.tensor([[1, 1, 1, 0]] * 4)  # padding: never a key; a padding query reads the real keys
    mask = unilm.self_attention_mask(torch.arange(4), torch.full((4,), 2), real)
    assert not mask[:, :, 3].any(), "a padding key was readable"
    assert mask[:, 3, :3].all(), "a padding query must read the real keys (an empty row is NaN)"
    assert torch.equal(mask[R2L, :3, :3], want[R2L][:3, :3]) and torch.equal(mask[S2S, :3, :3], want[S2S][:3, :3])


def large_model(T=12, V=40):
    cfg = unilm.UniLMConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=T, max_seq_length=T, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, mask_token_id=V - 1)
    torch.manual_seed(0)
    model = unilm.Model(cfg).double().eval()
    redraw(model)
    return model


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_each_position_depends_on_exactly_what_its_lm_lets_it_read(attn):
    model, T, S = large_model(), 12, 5
    model.config.attn = attn
    for layer in model.encoder.layer:
        layer.attention.attn = attn
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 39, (4, T), generator=g)
    lm, source = torch.arange(4), torch.full((4,), S)
    mask = unilm.self_attention_mask(lm, source, torch.ones(4, T, dtype=torch.long))
    types = torch.zeros_like(ids)
    with torch.no_grad():
        base = model(ids, types, mask)[0]  # (4, T, V)
        for j in range(T):  # change token j alone: which positions move?
            other = ids.clone()
            other[:, j] = (other[:, j] + 1) % 39
            moved = (model(other, types, mask)[0] - base).abs().amax(-1) > 1e-9  # (4, T)
            assert torch.equal(moved, mask[:, :, j]), \
                f"changing token {j}: positions {moved.int().tolist()} moved, the masks allow {mask[:, :, j].int()}"


def test_berts_encoder_with_a_unilm_mask_is_transformers_bert_with_that_mask(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=12, type_vocab_size=6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    redraw(hf)
    hf = hf.double().eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = bert.BERT.from_pretrained(str(tmp_path / "hf")).double().eval()
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(2))
    types = torch.tensor([[0] * 5 + [1] * 7, [2] * 12, [3] * 12, [4] * 5 + [5] * 7])
    mask = unilm.self_attention_mask(torch.arange(4), torch.full((4,), 5), torch.ones(4, 12, dtype=torch.long))
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask[:, None]).prediction_logits
        got = ours(ids, types, mask)[0]
    assert_scaled_close(got, ref, "MLM logits under UniLM's four masks vs transformers", rel=1e-9)


def objective_and_split(tmp_path, corpus, **kw):
    tc = train.TrainConfig(data=str(corpus), val_docs="lear", cache_dir=str(tmp_path / "cache"))
    tok, splits, _ = data.prepare_data(tc, data.special_tokens_of(unilm))
    cfg = unilm.UniLMConfig(**{**train.tokenizer_fields(unilm, tok), "max_position_embeddings": 64,
                               "max_seq_length": 64, **kw})
    return unilm.Objective(cfg, tok), splits, cfg


def test_rows_follow_the_mix_with_each_lms_segment_ids_and_nsp_on_bidirectional_rows_only(tmp_path, corpus):
    obj, splits, cfg = objective_and_split(tmp_path, corpus)
    batch = obj.train_batch(splits["train"], 600, torch.Generator().manual_seed(0))
    lm, types, ids, real = batch["lm"], batch["token_type_ids"], batch["input_ids"], batch["attention_mask"].bool()
    for k, share in enumerate((1 / 3, 1 / 6, 1 / 6, 1 / 3)):
        assert sigmas(int((lm == k).sum()), 600, share) < 4, f"{unilm.LMS[k]}: {int((lm == k).sum())} of 600 rows"
    labels = batch["labels"]
    text = torch.where(labels != -100, labels, ids)
    for r in range(600):
        first, second = unilm.TYPES[unilm.LMS[lm[r]]]
        S, n = int(batch["source_len"][r]), int(real[r].sum())
        assert text[r, S - 1] == cfg.sep_token_id and text[r, 0] == cfg.cls_token_id, f"row {r}: [CLS] a [SEP] ..."
        assert (types[r, :S] == first).all() and (types[r, S:n] == second).all(), f"row {r}: segment ids"
        assert (batch["next_sentence_label"][r] != -100) == (lm[r] == BI), f"row {r}: NSP only on bidirectional rows"
        if lm[r] in (L2R, R2L):
            assert S == n, f"row {r}: a unidirectional row is one segment"
    assert (labels[lm == S2S][:, :] != -100).any(), "seq2seq rows are masked too"


def test_masking_units_are_one_token_or_ngram_prob_of_the_time_two_or_three(tmp_path, corpus):
    k = torch.full((8,), 150)
    cand = torch.ones(8, 1000, dtype=torch.bool)
    for p, lo, hi in ((0.0, 0.0, 0.35), (1.0, 0.9, 1.0)):
        obj, _, _ = objective_and_split(tmp_path, corpus, ngram_prob=p)
        chosen = obj.choose(cand, k, torch.Generator().manual_seed(0))
        assert (chosen.sum(1) == 150).all(), "each row gets exactly its count"
        neighbour = torch.zeros_like(chosen)
        neighbour[:, 1:] |= chosen[:, :-1]
        neighbour[:, :-1] |= chosen[:, 1:]
        share = float((chosen & neighbour).sum() / chosen.sum())
        assert lo <= share <= hi, f"ngram_prob {p}: {share:.2f} of the chosen tokens have a chosen neighbour"
    cand[:, 500:] = False
    chosen = obj.choose(cand, k, torch.Generator().manual_seed(0))
    assert not chosen[:, 500:].any(), "a unit ran past the candidates"


def test_train_py_model_unilm_learns_each_lm_and_generates_left_to_right(tmp_path, corpus, capsys):
    rows = train.train(tiny_args("unilm", tmp_path / "demo", corpus, "--max-iters", "40", "--eval-interval", "20",
                                 "--lr", "3e-3", "--max-new-tokens", "20"))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {f"val_{n}_acc" for n in ("bidirectional", "left_to_right", "right_to_left", "seq2seq")} <= set(evals[-1])
    assert evals[-1]["val_mlm_loss"] < evals[0]["val_mlm_loss"] - 0.3, "the cloze loss did not fall"
    out = capsys.readouterr().out
    assert "[MASK] 1:" in out, "the end-of-run demo fills masks"
    ckpt = str(tmp_path / "demo" / "out" / "ckpt.pt")
    assert exit_code(unilm.main, ["--ckpt", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "30"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30 + 1, f"30 characters after the prompt: {text}"
    args = lambda sub: tiny_args("unilm", tmp_path / sub, corpus, "--max-iters", "8", "--eval-interval", "4",
                                 "--log-interval", "1", "--top-k", "0")
    assert_resumes(train.train, args, stop_at=3, keys=("step", "kind", "loss", "val_loss", "val_mlm_acc"))


def test_bad_mix_is_refused_in_one_line(tmp_path, corpus, capsys):
    argv = tiny_args("unilm", tmp_path, corpus, "--bidirectional", "0", "--left-to-right", "0", "--right-to-left", "0",
                     "--seq2seq", "0")
    assert exit_code(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not all 0" in err, err
