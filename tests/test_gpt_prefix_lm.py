"""gpt.py's prefix-LM mask (T5 §3.2.1, the "Prefix LM" rows of the lecture's architecture table): the prefix attends to
itself both ways, everything after it stays causal, both attention paths and the KV cache agree, and a GPT without a
prefix is exactly the GPT it was (its GPT-2 parity tests live in test_gpt.py). --prefix-lm trains it: uniform split
points, no target its own position can read, and its classifier reads the input both ways, never the padding."""

import math
from types import SimpleNamespace

import pytest
import torch

import gpt
import train
from gpt import GPT, GPTConfig, KVCache, prefix_lm_mask
from helpers import assert_paths_agree, assert_scaled_close, tiny_args


def model_with(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16, dropout=0.0),
                            **kw})).eval()


IDX = torch.randint(0, 37, (3, 12), generator=torch.Generator().manual_seed(2))
PREFIX = torch.tensor([4, 0, 7])  # row 1: no prefix at all, i.e. plain causal


def test_the_mask_is_the_causal_mask_plus_the_prefix_block():
    m = prefix_lm_mask(torch.arange(4), torch.arange(4), torch.tensor([2, 0]))
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0].tolist() == [[True, True, False, False], [True, True, False, False], [True, True, True, False],
                                [True, True, True, True]]
    assert torch.equal(m[1, 0], torch.ones(4, 4).tril().bool()), "prefix 0 is the causal mask"
    assert torch.equal(prefix_lm_mask(torch.arange(4), torch.arange(4)), m[1, 0]), "no prefix: the causal mask"


@pytest.mark.parametrize("pos", ["learned", "t5", "rope", "shaw"])
@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_the_prefix_is_bidirectional_and_the_rest_causal(attn, pos):
    m = model_with(attn=attn, pos=pos)
    base, _ = m(IDX, prefix_len=PREFIX)
    inside = IDX.clone()
    inside[0, 3] = (inside[0, 3] + 1) % 37  # the last prefix token of row 0
    after, _ = m(inside, prefix_len=PREFIX)
    assert not torch.allclose(after[0, :3], base[0, :3]), "earlier prefix positions must see a later prefix token"
    later = IDX.clone()
    later[:, 8:] = (later[:, 8:] + 1) % 37  # tokens after every prefix
    after, _ = m(later, prefix_len=PREFIX)
    assert torch.equal(after[:, :8], base[:, :8]), "a token after the prefix changed an earlier position"


@pytest.mark.parametrize("pos", ["learned", "shaw"])
def test_naive_and_sdpa_agree_in_outputs_and_gradients_with_a_prefix(pos):
    targets = torch.randint(0, 37, (3, 12), generator=torch.Generator().manual_seed(3))
    assert_paths_agree(lambda attn: model_with(attn=attn, pos=pos).train(),
                       lambda m: m(IDX, targets, prefix_len=PREFIX))


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_default_gpt_is_untouched_and_a_cached_continuation_after_the_prefix_equals_the_full_pass(attn):
    m = model_with(attn=attn)
    plain, _ = m(IDX)
    assert torch.equal(m(IDX, prefix_len=torch.zeros(3, dtype=torch.long))[0], plain), "prefix 0 must be plain GPT"
    m.double()
    full, _ = m(IDX, prefix_len=PREFIX)
    c = m.config
    cache = KVCache(c.n_layer, (3, c.n_head, c.block_size, c.n_embd // c.n_head), "cpu", torch.float64)
    m(IDX[:, :7], cache=cache, prefix_len=PREFIX)  # every prefix fits in the prefill
    cont, _ = m(IDX[:, 7:], cache=cache, prefix_len=PREFIX)
    assert_scaled_close(cont, full[:, 7:], "cached continuation after the prefix vs the full pass")


# ----------------------------------------------------------------------------------------------------------------------
# --prefix-lm: the objective that trains the mask (T5 Table 2's decoder-only "Prefix LM", LM objective)

def prefix_batch(B=4000, T=8, seed=0):
    idx = torch.randint(0, 37, (B, T), generator=torch.Generator().manual_seed(seed))
    targets = torch.roll(idx, -1, 1)
    return idx, targets, gpt.NextTokenObjective.split_prefix({"idx": idx, "targets": targets},
                                                             torch.Generator().manual_seed(seed))


def test_prefix_lengths_are_uniform_over_the_split_points_and_prefix_targets_are_dropped():
    idx, targets, b = prefix_batch()
    P = b["prefix_len"]
    counts = torch.bincount(P, minlength=8)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * len(P) / 7, f"P uniform on 1..T-1: {counts.tolist()}"
    t = torch.arange(8)[None]
    assert torch.equal(b["targets"] == -100, t < P[:, None] - 1), "exactly the targets inside the prefix are dropped"
    kept = b["targets"] != -100
    assert torch.equal(b["targets"][kept], targets[kept]) and torch.equal(b["idx"], idx)


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_no_kept_target_is_visible_from_its_own_position(attn):
    m = model_with(attn=attn)
    idx, _, b = prefix_batch(B=3, T=12, seed=1)
    base, _ = m(idx, prefix_len=b["prefix_len"])
    for r in range(3):
        for t in range(11):  # target t is token t + 1
            if b["targets"][r, t] == -100:
                continue
            moved = idx.clone()
            moved[r, t + 1] = (moved[r, t + 1] + 1) % 37
            out, _ = m(moved, prefix_len=b["prefix_len"])
            assert torch.allclose(out[r, t], base[r, t]), f"row {r}: position {t} reads its own target"


def test_a_prefix_lm_trains_through_the_loop_and_its_classifier_reads_the_input_both_ways(plays_corpus, tmp_path):
    rows = train.train(tiny_args("gpt", tmp_path, plays_corpus, "--prefix-lm", "--max-iters", "4"))
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    tok = SimpleNamespace(specials={"<|endoftext|>": 36})
    ids = torch.randint(0, 36, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    labels = torch.tensor([0, 1])
    padded = ids.clone()
    padded[1, 6:] = 5  # other padding
    losses = {}
    for prefix_lm in (False, True):
        clf = gpt.Classifier(model_with(prefix_lm=prefix_lm), None, ["a", "b"], tok).eval()
        torch.manual_seed(0)
        torch.nn.init.normal_(clf.head.weight)
        losses[prefix_lm], _ = clf(ids, None, mask, labels)
        again, _ = clf(padded, None, mask, labels)
        assert torch.allclose(again, losses[prefix_lm]), f"prefix_lm={prefix_lm}: a real token read the padding"
    assert not torch.allclose(losses[True], losses[False]), "a prefix LM's classifier reads its input both ways"
