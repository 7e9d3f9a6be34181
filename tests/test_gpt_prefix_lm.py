"""gpt.py's prefix-LM mask (T5 §3.2.1, the "Prefix LM" rows of the lecture's architecture table): the prefix attends to
itself both ways, everything after it stays causal, both attention paths and the KV cache agree, and a GPT without a
prefix is exactly the GPT it was (its GPT-2 parity tests live in test_gpt.py)."""

import pytest
import torch

from gpt import GPT, GPTConfig, KVCache, prefix_lm_mask
from helpers import assert_paths_agree, assert_scaled_close


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
