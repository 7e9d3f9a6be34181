"""What bert.py promises: it is BERT as released (parity with transformers' BertForPreTraining both ways, BERT-base's
parameter count). Both attention paths compute the same function and padding changes nothing for real tokens. ALBERT's
options really factorize and share. Each objective builds the batches its paper describes: 15% of text tokens chosen,
80/10/10, specials never chosen, labels only where chosen, dynamic masks, NSP negatives from another document, SOP
negatives that are swaps, SpanBERT's span lengths and whole-span replacement. Then the loop: train.py --model bert
trains, evaluates, resumes exactly and fills masks at the end; bert.py's command line, and its errors."""

import os

import numpy as np
import pytest
import torch
import transformers

import bert
import data
import train
from helpers import (assert_paths_agree, assert_resumes, assert_scaled_close, exit_code, padded_inputs, redraw,
                     sigmas, tiny_args)

SEED_ROWS = 256  # rows drawn for the statistical tests: ~2,000 chosen tokens


def corpus_data(tmp_path, corpus, **cfg):
    """(char tokenizer with BERT's specials, splits) of the five-play test corpus; val = lear."""
    tc = train.TrainConfig(data=str(corpus), val_docs="lear", cache_dir=str(tmp_path / "cache"), **cfg)
    tok, splits, _ = data.prepare_data(tc, data.special_tokens_of(bert))
    return tok, splits


def objective(tok, **kw):
    cfg = bert.BertConfig(**{**train.tokenizer_fields(bert, tok), "max_position_embeddings": 128,
                             "max_seq_length": 64, **kw})
    return bert.Objective(cfg, tok), cfg


def originals(batch):
    """The text before masking: labels where a position was chosen, the input elsewhere."""
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


# ----------------------------------------------------------------------------------------------------------------------
# The model against transformers' BertForPreTraining, with weights re-drawn large (helpers.redraw), in float64.


def hf_bert(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(**{**dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=48, max_position_embeddings=24, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0), **kw})
    m = transformers.BertForPreTraining(cfg).eval()
    redraw(m)
    return m


def assert_rel(got, ref, what):
    assert_scaled_close(got, ref, what, rel=1e-5)  # float64 on both sides: 1e-5 of the largest logit


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_from_pretrained_matches_transformers_bert_for_pretraining_with_padding(tmp_path, attn):
    hf = hf_bert()
    hf.save_pretrained(tmp_path / "hf")
    ids, tt, am = padded_inputs()
    with torch.no_grad():
        ref = hf.double()(input_ids=ids, token_type_ids=tt, attention_mask=am)
        ours = bert.BERT.from_pretrained(str(tmp_path / "hf"), attn=attn).double().eval()
        mlm, nsp = ours(ids, tt, am)
    assert mlm.shape == (3, 24, 61) and nsp.shape == (3, 2)
    assert_rel(mlm, ref.prediction_logits, f"MLM logits ({attn})")
    assert_rel(nsp, ref.seq_relationship_logits, f"NSP logits ({attn})")


def test_the_parity_test_catches_the_tanh_gelu(tmp_path, monkeypatch):
    # GPT-2's tanh GELU instead of BERT's erf GELU: the std-0.3 weights must make the difference visible
    hf = hf_bert()
    hf.save_pretrained(tmp_path / "hf")
    ids, tt, am = padded_inputs()
    monkeypatch.setattr(torch.nn, "GELU", lambda: torch.nn.modules.activation.GELU(approximate="tanh"))
    wrong = bert.BERT.from_pretrained(str(tmp_path / "hf")).double().eval()
    with torch.no_grad():
        ref = hf.double()(input_ids=ids, token_type_ids=tt, attention_mask=am).prediction_logits
        err = ((wrong(ids, tt, am)[0] - ref).abs().max() / ref.abs().max()).item()
    assert err > 1e-4, f"a tanh GELU differs by only {err:.1e}: the parity test would not notice it"


def test_from_pretrained_reads_old_uploads_gamma_beta_names_and_decoder_bias(tmp_path):
    # BERT's first uploads: pytorch_model.bin, LayerNorm.gamma/beta (the TensorFlow names), the bias under decoder.bias
    hf = hf_bert(seed=1)
    d = tmp_path / "old"
    hf.save_pretrained(d)
    os.remove(d / "model.safetensors")
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in hf.state_dict().items() if k != "cls.predictions.bias"}
    sd["cls.predictions.decoder.bias"] = hf.cls.predictions.bias.detach().clone()
    torch.save(sd, d / "pytorch_model.bin")
    ids, tt, am = padded_inputs()
    with torch.no_grad():
        ref = hf.double()(input_ids=ids, token_type_ids=tt, attention_mask=am).prediction_logits
        got = bert.BERT.from_pretrained(str(d)).double().eval()(ids, tt, am)[0]
    assert_rel(got, ref, "pytorch_model.bin with gamma/beta names")


def test_export_hf_round_trips_through_transformers(tmp_path):
    torch.manual_seed(0)
    ours = bert.BERT(bert.BertConfig(vocab_size=53, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=40, max_position_embeddings=20, max_seq_length=20)).eval()
    redraw(ours)
    ours.export_hf(str(tmp_path / "export"))
    hf = transformers.BertForPreTraining.from_pretrained(str(tmp_path / "export")).eval().double()
    ids, tt, am = padded_inputs(V=53, T=20)
    with torch.no_grad():
        ref_mlm, ref_nsp = ours.double()(ids, tt, am)
        got = hf(input_ids=ids, token_type_ids=tt, attention_mask=am)
    assert_rel(got.prediction_logits, ref_mlm, "transformers reads our export's MLM logits differently")
    assert_rel(got.seq_relationship_logits, ref_nsp, "transformers reads our export's NSP logits differently")
    back = bert.BERT.from_pretrained(str(tmp_path / "export")).double()
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), f"export -> from_pretrained changed {name}"
    with pytest.raises(ValueError, match="shared layers"):
        bert.BERT(bert.BertConfig(vocab_size=20, hidden_size=16, num_attention_heads=2, share_layers=True,
                                  max_position_embeddings=16, max_seq_length=16)).export_hf(str(tmp_path / "x"))


def test_bert_base_preset_has_bert_bases_parameter_count():
    p = bert.PRESETS["bert-base"]
    keys = {k: v for k, v in p.items() if k in bert.BertConfig.__dataclass_fields__ and k != "vocab_size"}
    with torch.device("meta"):
        ours = bert.BERT(bert.BertConfig(vocab_size=30522, **keys))
        hf = transformers.BertForPreTraining(transformers.BertConfig())  # bert-base-uncased's configuration
    n_hf = sum(t.numel() for t in hf.parameters())
    assert ours.num_params() == n_hf == 110_106_428, f"ours {ours.num_params():,}, BertForPreTraining {n_hf:,}"
    assert p["vocab_size"] + len(bert.SPECIAL_TOKENS) == 30522, "the preset's BPE + our specials = BERT's vocabulary"


# ----------------------------------------------------------------------------------------------------------------------
# Attention paths, padding, the gathered MLM head, ALBERT's options


def small(**kw):
    base = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=24, max_seq_length=24, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return bert.BertConfig(**{**base, **kw})


def test_naive_and_sdpa_attention_agree_in_outputs_and_gradients_with_padding():
    ids, tt, am = padded_inputs(V=40)

    def build(attn):
        torch.manual_seed(0)
        m = bert.BERT(small(attn=attn)).train()
        redraw(m)  # large weights: a wrong scale or mask must show
        for layer in m.encoder.layer:  # q.(k + b) shifts every key's score alike, so the key bias's gradient is 0
            layer.attention.key.bias.requires_grad_(False)  # exactly: rounding noise with no magnitude to scale by
        return m

    def run(m):
        mlm, nsp = m(ids, tt, am)
        return (mlm, nsp), mlm[am.bool()].logsumexp(-1).sum() + nsp.sum()

    assert_paths_agree(build, run)


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_padding_changes_nothing_for_the_real_tokens(attn):
    torch.manual_seed(0)
    m = bert.BERT(small(attn=attn)).eval().double()
    ids = torch.randint(0, 40, (1, 10))
    alone, _ = m(ids, attention_mask=torch.ones(1, 10, dtype=torch.long))
    padded_ids = torch.cat([ids, torch.randint(0, 40, (1, 14))], 1)  # any ids in the padding: they must not matter
    padded, _ = m(padded_ids, attention_mask=torch.cat([torch.ones(1, 10), torch.zeros(1, 14)], 1).long())
    assert_scaled_close(padded[:, :10], alone, f"{attn}: real tokens' logits with and without padding")


def test_mlm_logits_at_masked_positions_equal_the_full_logits_there():
    torch.manual_seed(0)
    m = bert.BERT(small()).eval().double()
    ids, tt, am = padded_inputs(V=40)
    where = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    full, nsp = m(ids, tt, am)
    gathered, nsp2 = m(ids, tt, am, masked_positions=where)
    assert_scaled_close(gathered, full[where], "the gathered MLM head and the full one")
    assert torch.equal(nsp, nsp2)


def test_mlm_decoder_is_the_word_embedding_matrix():
    m = bert.BERT(small()).double()
    names = {n for n, _ in m.named_parameters()}
    assert not any("decoder" in n for n in names), "the decoder must not be a second matrix"
    with torch.no_grad():
        m.encoder.embeddings.word_embeddings.weight[7] += 1.0
    ids = torch.zeros(1, 4, dtype=torch.long)
    h = m.mlm.LayerNorm(m.mlm.gelu(m.mlm.dense(m.encoder(ids))))
    assert_scaled_close(m(ids)[0][..., 7], h @ m.encoder.embeddings.word_embeddings.weight[7] + m.mlm.bias[7],
                        "the logit of token 7 and its embedding row times the head's output")


def test_albert_factorized_embeddings_and_cross_layer_sharing_count_their_parameters():
    V, C, E, L = 40, 32, 8, 4
    layer = sum(p.numel() for p in bert.Layer(small()).parameters())
    plain = bert.BERT(small(num_hidden_layers=L)).num_params()
    shared = bert.BERT(small(num_hidden_layers=L, share_layers=True))
    assert plain - shared.num_params() == (L - 1) * layer, "sharing must keep exactly one layer's parameters"
    assert len(shared.encoder.layer) == 1
    factor = bert.BERT(small(num_hidden_layers=L, embedding_size=E))
    assert factor.encoder.embeddings.word_embeddings.weight.shape == (V, E)
    assert factor.encoder.embeddings_project.weight.shape == (C, E)
    # embeddings V*E + 24*E (positions) + 2*E (types) + 2E (LayerNorm) + E*C + C (projection), MLM head C*E + E + 2E + V
    emb_plain = (V + 24 + 2 + 2) * C + C * C + C + 2 * C
    emb_factor = (V + 24 + 2 + 2) * E + E * C + C + C * E + E + 2 * E
    assert plain - factor.num_params() == emb_plain - emb_factor, "factorized embeddings: V x E + E x C"
    calls = []
    shared.encoder.layer[0].register_forward_hook(lambda *a: calls.append(1))
    shared(torch.zeros(1, 5, dtype=torch.long))
    assert len(calls) == L, "the shared layer must run num_hidden_layers times"


# ----------------------------------------------------------------------------------------------------------------------
# Masking (BERT §3.1; slide "Masked language models")


def masked_text_batch(tok, splits, **kw):
    obj, _ = objective(tok, objective="mlm", **kw)
    return obj, obj.train_batch(splits["train"], SEED_ROWS, torch.Generator().manual_seed(0))


def test_masking_chooses_15_percent_of_text_tokens_and_never_a_special_one(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    obj, _ = objective(tok, objective="mlm")
    g = torch.Generator().manual_seed(0)
    batch = obj.train_batch(splits["train"], SEED_ROWS, g)
    ids = batch["input_ids"]
    rows = torch.where(batch["labels"] != -100, batch["labels"], ids)
    masked, labels = obj.mask_tokens(rows, batch["attention_mask"], g)  # again, on known text
    chosen = labels != -100
    special = torch.tensor([i in tok.specials.values() for i in range(tok.n_vocab)])[rows]
    text = batch["attention_mask"].bool() & ~special
    assert special.any() and not (chosen & ~text).any(), "a special token or padding was chosen"
    n = int(text.sum())
    assert sigmas(int(chosen.sum()), n, 0.15) < 4, f"chose {int(chosen.sum())} of {n} text tokens, not ~15%"
    assert torch.equal(labels[chosen], rows[chosen]), "labels must hold the original token at chosen positions"
    assert (labels[~chosen] == -100).all(), "labels must be -100 everywhere else"
    assert torch.equal(masked[~chosen], rows[~chosen]), "inputs changed at positions that were not chosen"


def test_each_objective_counts_its_masked_positions_and_draws_random_tokens_as_its_paper(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    for kind in ("mlm+nsp", "sop", "mlm"):
        obj, _ = objective(tok, objective=kind)
        batch = obj.train_batch(splits["train"], SEED_ROWS, torch.Generator().manual_seed(0))
        text, real = originals(batch), batch["attention_mask"]
        k = (batch["labels"] != -100).sum(1)  # (B,)
        n = (real.bool() & ~obj.special[text]).sum(1)
        if kind == "mlm":  # RoBERTa (fairseq): int(0.15 n + U[0, 1)), over the text tokens
            assert ((k - (0.15 * n).floor()) >= 0).all() and ((k - (0.15 * n).floor()) <= 1).all(), \
                "RoBERTa chooses floor(0.15 n) or one more"
        else:  # BERT, ALBERT: round(0.15 x the row's tokens with [CLS] and [SEP]), at least 1
            want = torch.minimum((real.sum(1).double() * 0.15).round().long().clamp(min=1), n)
            assert torch.equal(k, want), f"{kind}: BERT's per-row count round(0.15 len) is not kept"
        drawn = obj.replacements[torch.randint(len(obj.replacements), (20_000,))]
        assert obj.special[drawn].any() == (kind != "mlm"), \
            f"{kind}: random tokens from {'the whole vocabulary' if kind != 'mlm' else 'ordinary tokens only'}"


def test_the_80_10_10_rule(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    obj, batch = masked_text_batch(tok, splits)
    chosen = batch["labels"] != -100
    inp, orig = batch["input_ids"][chosen], batch["labels"][chosen]
    n = len(inp)
    is_mask = inp == tok.specials["[MASK]"]
    kept = inp == orig
    other = ~is_mask & ~kept
    V = len(obj.ordinary)
    assert sigmas(int(is_mask.sum()), n, 0.8) < 4, f"[MASK] share {float(is_mask.float().mean()):.3f}, not 0.8"
    assert sigmas(int(other.sum()), n, 0.1 * (1 - 1 / V)) < 4, f"random share {float(other.float().mean()):.3f}"
    assert sigmas(int(kept.sum()), n, 0.1 + 0.1 / V) < 4, f"unchanged share {float(kept.float().mean()):.3f}"
    assert not obj.special[inp[other]].any(), "a random replacement must be an ordinary token"


def test_masks_are_dynamic_and_drawn_only_from_the_loops_generator(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    for kind in ("mlm", "mlm+nsp", "span", "sop"):
        obj, _ = objective(tok, objective=kind)
        rng = torch.get_rng_state()
        g = torch.Generator().manual_seed(3)
        first = obj.train_batch(splits["train"], 8, g)
        again = obj.train_batch(splits["train"], 8, torch.Generator().manual_seed(3))
        assert all(torch.equal(first[k], again[k]) for k in first), f"{kind}: the same generator state must give " \
                                                                      f"the same batch (resume depends on it)"
        assert torch.equal(torch.get_rng_state(), rng), f"{kind}: batch building touched the global RNG"
    obj, _ = objective(tok, objective="mlm")
    g = torch.Generator().manual_seed(0)
    batch = obj.train_batch(splits["train"], 16, g)
    text = originals(batch)
    masks = [obj.mask_tokens(text, batch["attention_mask"], g)[1] != -100 for _ in range(2)]
    assert not torch.equal(masks[0], masks[1]), "the same sequence drawn twice must get a new mask (dynamic masking)"


@pytest.mark.parametrize("kind", ["mlm", "mlm+nsp"])
def test_static_masking_gives_each_line_at_most_k_rows_and_dynamic_masking_a_new_one_each_time(tmp_path, corpus,
                                                                                                kind):
    tok, splits = corpus_data(tmp_path, corpus)
    train_split = splits["train"]
    lines = train_split.line_starts
    first = int(np.searchsorted(lines, train_split.doc_starts[1]))  # the second document's first line
    small = train_split.slice(int(lines[first - 6]), int(lines[first + 7]))  # 2 documents, ~12 lines: each drawn ~20x
    n_lines = bert.SplitIndex(small, tok.eot_id).n_lines
    distinct = {}
    for K in (0, 2):
        obj, _ = objective(tok, objective=kind, static_masks=K)
        g = torch.Generator().manual_seed(0)
        rows = {tuple(r.tolist()) for _ in range(30) for r in obj.train_batch(small, 8, g)["input_ids"]}
        distinct[K] = len(rows)
    assert distinct[2] <= 2 * n_lines, f"{kind}: static masking with 2 copies must give each line at most 2 rows"
    assert distinct[0] > 4 * n_lines, f"{kind}: dynamic masking must give a line drawn again a new mask"


def test_doc_sentences_rows_stop_at_a_document_end_where_full_sentences_cross_it(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    crossing, text = {}, {}
    for doc in (False, True):
        obj, cfg = objective(tok, objective="mlm", doc_sentences=doc)
        ids = torch.cat([originals(b) for b in obj.eval_batches(splits["train"], 64)])
        crossing[doc] = int(((ids == cfg.sep_token_id).sum(1) > 1).sum())  # an inner [SEP]: a document boundary
        text[doc] = int((~obj.special[ids]).sum())
    assert crossing[False] > 0, "FULL-SENTENCES rows cross document boundaries (with a [SEP])"
    assert crossing[True] == 0, "DOC-SENTENCES rows never cross a document boundary"
    assert text[True] == text[False], "either packing covers every token of the split once"


def test_rows_are_real_text_and_count_only_real_tokens(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    obj, batch = masked_text_batch(tok, splits)
    stream = tok.decode(splits["train"].tokens.tolist()).replace("<|endoftext|>", "[SEP]")
    for r in range(20):
        ids = originals(batch)[r][batch["attention_mask"][r].bool()].tolist()
        assert ids[0] == tok.specials["[CLS]"] and ids[-1] == tok.specials["[SEP]"]
        assert tok.decode(ids[1:-1]) in stream, "a packed row is not a contiguous piece of the corpus"
        assert tok.eot_id not in ids, "<|endoftext|> must never be inside a row as text"
    assert obj.count_tokens(batch) == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()


# ----------------------------------------------------------------------------------------------------------------------
# Sentence pairs: NSP (BERT) and SOP (ALBERT)


def pair_texts(tok, batch, r):
    """(A, B) of row r, unmasked, as text."""
    ids, types, real = originals(batch)[r], batch["token_type_ids"][r], batch["attention_mask"][r].bool()
    a = ids[(types == 0) & real].tolist()[1:-1]  # without [CLS] and the first [SEP]
    b = ids[(types == 1) & real].tolist()[:-1]
    return tok.decode(a), tok.decode(b)


def longest_line(split):
    starts = np.asarray(split.line_starts)
    return int(np.diff(np.append(starts, len(split.tokens))).max())


def located(docs, text):
    """[(document index, offset)] of every occurrence of text in the documents."""
    out = []
    for d, doc in enumerate(docs):
        at = doc.find(text)
        while at >= 0:
            out.append((d, at))
            at = doc.find(text, at + 1)
    return out


def test_truncate_pair_shortens_the_longer_side_b_on_a_tie_from_either_end():
    g = torch.Generator().manual_seed(0)
    a, b = list(range(5)), [9, 9]
    assert bert.truncate_pair(a, b, 7, g) == (a, b), "a pair that fits is left alone"
    ends = set()
    for _ in range(200):
        ta, tb = bert.truncate_pair(list(range(10)), list(range(100, 106)), 12, g)
        assert (len(ta), len(tb)) == (6, 6), "BERT's truncate_seq_pair: the longer side loses tokens until they tie"
        assert ta == list(range(ta[0], ta[0] + 6)), "what is left of A is a contiguous run of A"
        ends.add(ta[0])
        ta, tb = bert.truncate_pair([1, 2, 3], [4, 5, 6], 5, g)
        assert len(ta) == 3 and len(tb) == 2, "on a tie B loses the token"
    assert min(ends) == 0 and max(ends) == 4 and len(ends) > 2, "tokens must go from the front and the back at random"


def test_nsp_b_is_the_continuation_half_the_time_and_from_another_document_otherwise(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    obj, cfg = objective(tok, objective="mlm+nsp")
    batch = obj.train_batch(splits["train"], SEED_ROWS, torch.Generator().manual_seed(0))
    docs = tok.decode(splits["train"].tokens.tolist()).split("<|endoftext|>")
    labels = batch["next_sentence_label"].tolist()
    assert sigmas(sum(labels), len(labels), 0.5) < 4, f"{sum(labels)} of {len(labels)} pairs are NotNext, not ~half"
    gap = longest_line(splits["train"]) + cfg.max_seq_length  # what truncating the pair can cut between A and B
    checked = 0
    for r, label in enumerate(labels):
        a, b = pair_texts(tok, batch, r)
        where_a, where_b = located(docs, a), located(docs, b)
        if len(a) < 12 or len(b) < 12 or len(where_a) != 1 or len(where_b) != 1:
            continue  # too short to place in the corpus unambiguously
        (da, pa), (db, pb) = where_a[0], where_b[0]
        if label == 0:
            assert da == db and pa + len(a) <= pb <= pa + len(a) + gap, \
                f"row {r}: IsNext, but B does not follow A in its document"
        else:
            assert da != db, f"row {r}: NotNext, but B comes from A's own document"
        checked += 1
    assert checked > SEED_ROWS // 2, f"only {checked} pairs could be placed in the corpus"


@pytest.mark.parametrize("kind", ["mlm+nsp", "sop"])
def test_a_line_that_fills_the_budget_alone_is_a_pair_with_b_from_another_document(kind):
    # BERT's (and ALBERT's) create_instances_from_document: a chunk of one segment cannot be split into A and B, so
    # B starts in another document and the label is 1 (NotNext; for SOP "not in order"). Four documents of six
    # 20-token lines, 16-token rows: every line fills the budget alone. Token 10 d + k is line k of document d.
    class Toy:
        specials, eot_id = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[MASK]": 3, "<|endoftext|>": 4}, 4

    tokens, doc_starts, line_starts = [], [], []
    for d in range(1, 5):
        doc_starts.append(len(tokens))
        for k in range(6):
            line_starts.append(len(tokens))
            tokens += [10 * d + k] * 20
        if d < 4:
            line_starts.append(len(tokens))
            tokens.append(4)  # <|endoftext|>, a line of its own between documents (data.py)
    split = data.Split("train", np.array(tokens), np.array(doc_starts), np.array(line_starts), [], 0)
    cfg = bert.BertConfig(vocab_size=64, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3,
                          objective=kind, max_seq_length=16, max_position_embeddings=16)
    batch = bert.Objective(cfg, Toy()).train_batch(split, 64, torch.Generator().manual_seed(0))
    assert batch["next_sentence_label"].tolist() == [1] * 64, "a one-line pair must be labelled 1"
    ids, types, real = originals(batch), batch["token_type_ids"], batch["attention_mask"].bool()
    for r in range(64):
        a = ids[r][(types[r] == 0) & real[r]][1:-1]  # without [CLS] and [SEP]
        b = ids[r][(types[r] == 1) & real[r]][:-1]
        assert len(set((a // 10).tolist())) == 1 and len(set((a % 10).tolist())) == 1, f"row {r}: A is not one line"
        assert not set((b // 10).tolist()) & set((a // 10).tolist()), f"row {r}: B comes from A's own document"


def test_sop_swaps_the_segments_before_truncating_them_as_albert_does():
    # Two documents of two 10-token lines; 22-token rows leave 19 for A and B, so a pair of both lines loses one token,
    # from B on a tie (truncate_seq_pair). ALBERT swaps first: a swapped pair keeps the later line (now A) whole.
    class Toy:
        specials, eot_id = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[MASK]": 3, "<|endoftext|>": 4}, 4

    tokens = [10] * 10 + [11] * 10 + [4] + [20] * 10 + [21] * 10
    split = data.Split("train", np.array(tokens), np.array([0, 21]), np.array([0, 10, 20, 21, 31]), [], 0)
    cfg = bert.BertConfig(vocab_size=64, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3,
                          objective="sop", max_seq_length=22, max_position_embeddings=22, short_seq_prob=0.0)
    batch = bert.Objective(cfg, Toy()).train_batch(split, 64, torch.Generator().manual_seed(0))
    ids, types, real = originals(batch), batch["token_type_ids"], batch["attention_mask"].bool()
    seen = {0: 0, 1: 0}
    for r, label in enumerate(batch["next_sentence_label"].tolist()):
        a = ids[r][(types[r] == 0) & real[r]][1:-1].tolist()
        b = ids[r][(types[r] == 1) & real[r]][:-1].tolist()
        if {t // 10 for t in a} != {t // 10 for t in b}:
            continue  # a one-line pair: B from the other document
        first, second = (a, b) if label == 0 else (b, a)
        assert {*first} == {first[0]} and {*second} == {first[0] + 1}, \
            f"row {r}: not the two lines, in the order the label says"
        assert (len(a), len(b)) == (10, 9), f"row {r} (label {label}): {len(a)} + {len(b)} tokens; A must stay whole"
        seen[label] += 1
    assert seen[0] > 8 and seen[1] > 8, f"too few two-line pairs of each label: {seen}"


def test_sop_negatives_are_the_same_two_segments_swapped(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    obj, cfg = objective(tok, objective="sop")
    batch = obj.train_batch(splits["train"], SEED_ROWS, torch.Generator().manual_seed(0))
    docs = tok.decode(splits["train"].tokens.tolist()).split("<|endoftext|>")
    labels = batch["next_sentence_label"].tolist()
    assert sigmas(sum(labels), len(labels), 0.5) < 4, f"{sum(labels)} of {len(labels)} swapped, not ~half"
    gap = longest_line(splits["train"]) + cfg.max_seq_length
    checked = 0
    for r, label in enumerate(labels):
        first, second = pair_texts(tok, batch, r)
        where_1, where_2 = located(docs, first), located(docs, second)
        if len(first) < 12 or len(second) < 12 or len(where_1) != 1 or len(where_2) != 1:
            continue
        (d1, p1), (d2, p2) = where_1[0], where_2[0]
        if d1 != d2:  # ALBERT: a line that fills the budget alone takes B from another document, label 1
            assert label == 1, f"row {r}: segments from two documents labelled in order"
            continue
        earlier, later, n_earlier = (p1, p2, len(first)) if label == 0 else (p2, p1, len(second))
        assert earlier + n_earlier <= later <= earlier + n_earlier + gap, \
            f"row {r} (label {label}): the segments are not two consecutive segments in the order the label says"
        checked += 1
    assert checked > SEED_ROWS // 2


def test_an_evaluation_slice_with_one_document_still_gets_negatives(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    obj, _ = objective(tok, objective="mlm+nsp")
    one_doc = splits["train"].slice(0, 3000)
    labels = torch.cat([b["next_sentence_label"] for b in obj.eval_batches(one_doc, 16)])
    assert 0.25 < labels.float().mean() < 0.75, "NotNext rows must exist in a one-document evaluation slice"


# ----------------------------------------------------------------------------------------------------------------------
# SpanBERT


def test_span_lengths_follow_the_clipped_geometric_law():
    law = bert.span_length_law(0.2, 10)
    expected = torch.tensor([0.2 * 0.8 ** (n - 1) for n in range(1, 11)], dtype=torch.float64)
    torch.testing.assert_close(law, expected / expected.sum())
    assert abs(float((law * torch.arange(1, 11)).sum()) - 3.8) < 0.01, "SpanBERT §3.1: mean span length 3.8 words"
    cfg = bert.BertConfig(vocab_size=10, objective="span", max_position_embeddings=64, max_seq_length=64)

    class Words:  # every token is a word of its own
        specials, eot_id = {"<|endoftext|>": 9}, 9
        decode = staticmethod(lambda ids: " w")

    obj = bert.Objective(cfg, Words())
    n = 20_000
    drawn = torch.bincount(obj.span_lengths(n, torch.Generator().manual_seed(0)), minlength=11)[1:]
    for length in range(10):
        assert sigmas(int(drawn[length]), n, float(law[length])) < 4.5, \
            f"length {length + 1}: drawn {int(drawn[length])} times of {n}, law says {float(law[length]) * n:.0f}"


def test_span_masking_masks_whole_words_as_whole_spans_with_their_boundaries(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    obj, cfg = objective(tok, objective="span", span_boundary=True)
    batch = obj.train_batch(splits["train"], SEED_ROWS, torch.Generator().manual_seed(0))
    text = originals(batch)
    chosen = batch["labels"] != -100
    candidates = batch["attention_mask"].bool() & ~obj.special[text]
    assert not (chosen & ~candidates).any(), "a special token or padding was chosen"
    assert sigmas(int(chosen.sum()), int(candidates.sum()), 0.15) < 4, "span masking must choose ~15% of text tokens"
    kinds, n_spans = {"mask": 0, "random": 0, "kept": 0}, 0
    for r in range(SEED_ROWS):
        spans = sorted({(int(batch["span_left"][r, i]) + 1, int(batch["span_right"][r, i]))
                        for i in chosen[r].nonzero()[:, 0].tolist()})
        assert sum(e - s for s, e in spans) == int(chosen[r].sum()), f"row {r}: spans overlap or miss a chosen token"
        ends_mid_word = 0
        for s, e in spans:
            assert chosen[r, s:e].all(), f"row {r}: span {s}..{e} is not a run of chosen tokens"
            assert torch.equal(batch["span_offset"][r, s:e], torch.arange(e - s)), "offsets inside a span: 0, 1, ..."
            assert obj.word_start[text[r, s]] or not candidates[r, s - 1], f"row {r}: span {s}..{e} starts mid-word"
            ends_mid_word += not (obj.word_start[text[r, e]] or not candidates[r, e])
            inp, orig = batch["input_ids"][r, s:e], text[r, s:e]
            if (inp == tok.specials["[MASK]"]).all():
                kinds["mask"] += 1
            elif torch.equal(inp, orig):
                kinds["kept"] += 1
            else:
                assert not (inp == tok.specials["[MASK]"]).any(), f"row {r}: a span is half [MASK], half not"
                kinds["random"] += 1
            n_spans += 1
        assert ends_mid_word <= 1, f"row {r}: only the last span may end mid-word (cut to the masking budget)"
    assert sigmas(kinds["mask"], n_spans, 0.8) < 4 and sigmas(kinds["kept"], n_spans, 0.1) < 4.5, \
        f"80/10/10 must apply per span: {kinds} of {n_spans}"


def test_every_span_boundary_target_reads_two_visible_text_tokens_as_spanbert_merges_touching_spans(tmp_path, corpus):
    assert bert.merge_spans([(5, 7), (0, 2), (2, 3), (6, 9)]) == [(0, 3), (5, 9)], "the docstring's example"
    tok, splits = corpus_data(tmp_path, corpus)
    obj, _ = objective(tok, objective="span", span_boundary=True)
    batch = obj.train_batch(splits["train"], SEED_ROWS, torch.Generator().manual_seed(1))
    text, chosen, sbo = originals(batch), batch["labels"] != -100, batch["sbo_target"]
    visible_text = batch["attention_mask"].bool() & ~obj.special[text] & ~chosen  # (B, T)
    rows = torch.arange(SEED_ROWS)[:, None].expand_as(chosen)
    left, right = batch["span_left"], batch["span_right"]
    assert not (sbo & ~chosen).any(), "a span-boundary target that is not masked"
    for name, side in (("left", left), ("right", right)):
        ok = visible_text[rows[sbo], side[sbo]]
        assert ok.all(), f"{int((~ok).sum())} SBO targets read a masked or special token as their {name} boundary"
        # the merged spans: the token just outside every span is never chosen (touching spans became one)
        outside = chosen[rows[chosen], side[chosen]]
        assert not outside.any(), f"{int(outside.sum())} masked positions have a masked {name} boundary: unmerged spans"
    edge = chosen & ~sbo  # spans next to [CLS] or [SEP]: masked, but no boundary target (SpanBERT's block edges)
    assert edge.any() and sbo.sum() > 0.5 * chosen.sum(), "expected most spans with, some without, boundary targets"
    assert not visible_text[rows[edge], left[edge]].logical_and(visible_text[rows[edge], right[edge]]).any(), \
        "a span with two visible text boundaries lost its SBO target"
    assert obj.denominators(batch)["sbo"] == int(sbo.sum())


def test_span_boundary_objective_adds_its_loss(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    obj, cfg = objective(tok, objective="span", span_boundary=True)
    torch.manual_seed(0)
    model = bert.BERT(cfg)
    loss, stats = obj.loss(model, obj.train_batch(splits["train"], 8, torch.Generator().manual_seed(0)))
    m = obj.summarize({k: float(v) for k, v in stats.items()})
    assert {"mlm_loss", "sbo_loss", "sbo_acc"} <= set(m) and "nsp_loss" not in m
    assert m["loss"] == pytest.approx(m["mlm_loss"] + m["sbo_loss"]) == pytest.approx(loss.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and accumulation


@pytest.mark.parametrize("kind", ["mlm", "mlm+nsp"])
def test_eval_batches_are_deterministic_cover_the_split_and_leave_the_global_rng_alone(tmp_path, corpus, kind):
    tok, splits = corpus_data(tmp_path, corpus)
    obj, _ = objective(tok, objective=kind)
    rng = torch.get_rng_state()
    first, second = list(obj.eval_batches(splits["val"], 16)), list(obj.eval_batches(splits["val"], 16))
    assert torch.equal(torch.get_rng_state(), rng), "eval_batches drew from the global RNG"
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second) for k in a), "two evaluations scored differently"
    val = splits["val"].tokens.tolist()
    val_text = [t for t in val if t != tok.eot_id]
    if kind == "mlm":  # packed rows: every token exactly once, in order
        got = [t for b in first for r in range(len(b["input_ids"])) for t in
               originals(b)[r][b["attention_mask"][r].bool()].tolist() if not obj.special[t]]
        assert got == val_text, "packed evaluation rows must hold every token of the split once, in order"
    else:  # pairs: every line is in some row (as A or B); truncation may trim a row's ends
        covered = sum(int(b["attention_mask"].sum()) - 3 * len(b["input_ids"]) for b in first)
        assert covered > 0.8 * len(val_text), f"pairs cover {covered} of {len(val_text)} tokens"


def test_accumulated_loss_and_gradients_equal_one_big_batch(tmp_path, corpus):
    tok, splits = corpus_data(tmp_path, corpus)
    obj, cfg = objective(tok, objective="mlm+nsp", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = bert.BERT(cfg)
    batch = obj.train_batch(splits["train"], 8, torch.Generator().manual_seed(0))
    big, _ = obj.loss(model, batch)
    big.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    den, total = obj.denominators(batch), 0.0
    for micro in train.chunk(batch, 4):
        loss, _ = obj.loss(model, micro, den)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(big.item(), rel=1e-5), "micro-batch losses must add up to the big batch's"
    # fp32 (the loss casts logits to fp32), so a tolerance scaled to each gradient's magnitude. Not the key biases:
    # their gradient is exactly 0 (they shift every key's score alike), so both sides are rounding noise.
    for n, g in want.items():
        if not n.endswith("attention.key.bias"):
            assert_scaled_close(dict(model.named_parameters())[n].grad, g, f"gradient of {n}", rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Through train.py, and bert.py's command line



def test_train_py_model_bert_learns_reports_its_metrics_and_fills_masks(tmp_path, corpus, capsys):
    rows = train.train(tiny_args("bert", tmp_path, corpus, "--max-iters", "40", "--eval-interval", "20",
                                 "--lr", "3e-3"))
    out = capsys.readouterr().out
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {"val_mlm_loss", "val_mlm_acc", "val_nsp_loss", "val_nsp_acc", "train_mlm_acc"} <= set(evals[-1])
    assert "val_bpb" not in evals[-1], "bits per byte belongs to next-token objectives"
    assert evals[-1]["val_mlm_loss"] < evals[0]["val_mlm_loss"] - 0.3, "the masked-LM loss did not fall"
    assert (tmp_path / "out" / "loss.png").exists()
    assert "[MASK] 1:" in out and "filled:" in out, "the end-of-run demo must fill the masks"
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    tok = data.tokenizer_from_identity(ckpt["tokenizer"])
    assert [tok.specials[s] for s in ("[CLS]", "[SEP]", "[MASK]", "[PAD]")] == \
        [ckpt["model_config"][f] for f in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id")]
    capsys.readouterr()
    assert exit_code(bert.main, ["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "lend me your [MASK]ars"]) == 0
    assert "[MASK] 1:" in capsys.readouterr().out


def test_a_bert_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path, corpus):
    # the same rows, masks and dropout after a resume
    common = ("--max-iters", "12", "--eval-interval", "6", "--log-interval", "1", "--hidden-dropout-prob", "0.1",
              "--objective", "sop")
    keys = ("step", "kind", "loss", "val_loss", "val_mlm_acc", "val_sop_acc")
    assert_resumes(train.train, lambda sub: tiny_args("bert", tmp_path / sub, corpus, *common), stop_at=4, keys=keys)


def test_bad_input_one_line_exit_2_nothing_written(tmp_path, corpus, capsys):
    one = tmp_path / "one"
    one.mkdir()
    (one / "sonnets.txt").write_text((corpus / "hamlet.txt").read_text())
    cases = [(["--data", str(one), "--val-docs", ""], "another document"),
             (["--objective", "electra"], "unknown --objective"),
             (["--span-boundary"], "needs --objective span"),
             (["--max-seq-length", "100"], "at most --max-position-embeddings 64"),
             (["--hidden-dropout-prob", "2"], "--hidden-dropout-prob 2.0: must be in [0, 1)"),
             (["--attention-probs-dropout-prob", "-0.1"], "--attention-probs-dropout-prob -0.1: must be in [0, 1)"),
             (["--num-hidden-layers", "0"], "--num-hidden-layers 0: must be at least 1"),
             (["--num-attention-heads", "0"], "--num-attention-heads 0: must be at least 1"),
             (["--num-attention-heads", "3"], "--hidden-size 32: must be divisible by --num-attention-heads 3")]
    for extra, message in cases:
        out = tmp_path / "out"
        code = exit_code(train.main, tiny_args("bert", tmp_path, corpus, *extra))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, f"{extra}: {code} {err!r}"
        assert not (out / "ckpt.pt").exists(), f"{extra}: a checkpoint was written"
    one_doc_mlm = ("--data", str(one), "--val-docs", "", "--objective", "mlm", "--max-iters", "2", "--overwrite")
    assert exit_code(train.main, tiny_args("bert", tmp_path, corpus, *one_doc_mlm)) == 0, \
        "one document is enough for the MLM-only objective"


def test_bert_py_refuses_another_models_checkpoint_and_a_sentence_without_mask(tmp_path, corpus, capsys):
    train.train(tiny_args("gpt", tmp_path / "g", corpus, "--max-iters", "1"))
    assert exit_code(bert.main, ["--ckpt", str(tmp_path / "g" / "out" / "ckpt.pt"), "a [MASK]"]) == 2
    assert "a checkpoint of --model gpt, not bert" in capsys.readouterr().err
    train.train(tiny_args("bert", tmp_path, corpus, "--max-iters", "1"))
    ckpt = str(tmp_path / "out" / "ckpt.pt")
    for argv, message in ((["no mask here"], "no [MASK]"), (["a [MASK]", "--top-k", "0"], "--top-k 0: must be at"),
                          (["a [MASK]", "--device", "nonsense"], "unknown --device")):
        assert exit_code(bert.main, ["--ckpt", ckpt, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert exit_code(bert.main, ["--ckpt", str(tmp_path / "nope.pt"), "a [MASK]"]) == 2
    assert "--ckpt" in capsys.readouterr().err


def test_bert_py_fills_masks_from_a_hugging_face_directory_with_its_vocab_txt(tmp_path, capsys):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "my", "dog", "is", "cute", "hairy", "apple", ".", "##s"]
    hf = hf_bert(vocab_size=len(vocab))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    assert exit_code(bert.main, ["--hf", str(tmp_path / "hf"), "--top-k", "3", "My dog is [MASK]."]) == 0
    out = capsys.readouterr().out
    ids = torch.tensor([[2, 5, 6, 7, 4, 11, 3]])  # [CLS] my dog is [MASK] . [SEP], as BertTokenizer encodes it
    with torch.no_grad():
        probs = hf(input_ids=ids).prediction_logits[0, 4].softmax(-1)
    probs[[0, 1, 2, 3, 4]] = 0  # never fill a mask with a special token
    best = vocab[int(probs.argmax())]
    assert f"filled: my dog is {best} ." in out, f"expected transformers' best guess {best!r} in:\n{out}"
    (tmp_path / "hf" / "vocab.txt").unlink()
    assert exit_code(bert.main, ["--hf", str(tmp_path / "hf"), "a [MASK]"]) == 2
    assert "no vocab.txt" in capsys.readouterr().err
