"""
The decoder after GPT-2: Llama's changes to gpt.py, one at a time, in one file.

Papers
  - Touvron et al. 2023 (LLaMA) §2.2: pre-normalisation with RMSNorm (Zhang & Sennrich 2019), the
    SwiGLU feed-forward (Shazeer 2020, eq. 6), rotary positions (Su et al. 2021, RoFormer §3.4).
  - Touvron et al. 2023 (Llama 2) §2.2 and Ainslie et al. 2023 (GQA): fewer key/value heads than
    query heads; each group of queries shares one key and one value head. No biases anywhere.
  - Options the 2024-2026 recipes added, each a flag, off in the Llama preset:
    qk_norm (RMSNorm on q and k per head: OLMo 2 §3.1, Qwen3; Dehghani et al. 2023 for ViT-22B),
    mlp="relu2" (Primer, So et al. 2021 §4: relu(x)^2, no gate; nanochat, modded-nanogpt),
    logit_softcap (cap * tanh(logits / cap): Gemma 2 §2).
  Slides (lecture 001): "GPT models" (LLaMa beside GPT and PaLM), "RoPE" (positions.py).

Diff against gpt.py, change by change (same loop, same objective: gpt.NextTokenObjective):
  LayerNorm(x) = g (x - mean) / std + b    ->  RMSNorm(x) = g x / rms(x)             (no mean, no bias)
  wpe: a learned row per position          ->  RoPE: q and k rotated by position      (positions.py)
  c_attn: q, k, v at n_head heads each     ->  q_proj at n_head, k_proj, v_proj at n_kv_head (GQA)
  MLP: c_proj(gelu(c_fc(x)))               ->  down_proj(silu(gate_proj(x)) * up_proj(x))   (SwiGLU)
  biases in every Linear and LayerNorm     ->  none
  lm_head tied to wte                      ->  an untied lm_head (Llama 1-3 at 7B and up)
Names are Hugging Face's LlamaForCausalLM's (the released checkpoints on the Hub: SmolLM, TinyLlama).
Meta's own files name them tok_embeddings, attention.wq, feed_forward.w1 (gate) / w3 (up) / w2 (down).

Run
  python train.py --model llama                              # char-level Shakespeare (CPU, ~4 minutes)
  python llama.py --ckpt out/llama/ckpt.pt --prompt "ROMEO:"  # sample from the checkpoint it wrote
  Llama.from_pretrained("path/to/smollm")                     # a LlamaForCausalLM directory (its tokenizer:
                                                              # the tokenizers package, not bundled here)

Legend
  B batch, T sequence length, C n_embd, H n_head, K n_kv_head (H % K == 0), hs = C // H head size,
  F intermediate_size, V vocabulary, L n_layer. idx (B, T) token ids; logits (B, T, V).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
from common import command, require
from hf_io import copy_weights, read_hf_dir, write_hf_dir
from positions import apply_rope_half_split

# ----------------------------------------------------------------------------------------------------------------------
# Config and presets

MLPS = ("swiglu", "relu2")


@dataclass
class LlamaConfig:
    block_size: int = 256  # training context (HF: max_position_embeddings); RoPE itself has no table
    vocab_size: int = 50257  # V: train.py sets it from the tokenizer
    n_layer: int = 4  # L
    n_head: int = 4  # H: query heads
    n_kv_head: int = 0  # K: key/value heads, 0 = n_head (multi-head); 1 = multi-query (Llama 2 70B: 8 of 64)
    n_embd: int = 128  # C
    intermediate_size: int = 0  # F; 0 = Llama's rule: 2/3 of 4C (three matrices cost GPT-2's two), rounded up ...
    multiple_of: int = 32  # ... to a multiple of this (Meta's code: 256, so C = 4096 -> 11008)
    rope_theta: float = 10000.0  # RoPE's base (Llama 3: 500000, for long contexts)
    rms_norm_eps: float = 1e-5  # Llama 2's value (Llama 1: 1e-6); the HF config says which
    tie_word_embeddings: bool = False  # Llama: untied; small released models (SmolLM, Llama 3.2 1B) tie
    mlp: str = "swiglu"  # swiglu (Llama) | relu2 (Primer: up, relu, square, down; no gate)
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE (OLMo 2, Qwen3): bounded logits
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (Gemma 2: 30)
    dropout: float = 0.0  # Llama trains without dropout
    attn: str = "sdpa"  # naive: softmax(QK^T/sqrt(hs))V spelt out; sdpa: fused, tested equal

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        require(self.n_kv_head >= 0, f"--n-kv-head {self.n_kv_head}: must be >= 0 (0 = --n-head)")
        require(self.n_embd % self.n_head == 0, f"--n-embd {self.n_embd}: must be divisible by --n-head {self.n_head}")
        require(self.n_head % self.kv_heads == 0,
                f"--n-head {self.n_head}: must be a multiple of --n-kv-head {self.n_kv_head} (query groups)")
        require((self.n_embd // self.n_head) % 2 == 0, f"RoPE rotates pairs: head size {self.n_embd // self.n_head} "
                                                       "must be even")
        require(self.mlp in MLPS, f"--mlp {self.mlp}: must be {' or '.join(MLPS)}")
        require(self.attn in ("naive", "sdpa"), f"--attn {self.attn}: must be naive or sdpa")
        require(self.rope_theta > 0 and self.rms_norm_eps > 0, "--rope-theta and --rms-norm-eps must be > 0")
        require(self.logit_softcap >= 0, f"--logit-softcap {self.logit_softcap}: must be >= 0 (0 = off)")
        require(0 <= self.dropout < 1, f"--dropout {self.dropout}: must be in [0, 1)")
        require(self.intermediate_size >= 0, f"--intermediate-size {self.intermediate_size}: must be >= 0")
        require(self.multiple_of >= 1, f"--multiple-of {self.multiple_of}: must be >= 1")

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def ffn(self):
        """F: Llama's rule when unset. C = 128 -> 352; C = 4096, multiple_of 256 -> 11008 (LLaMA 7B)."""
        if self.intermediate_size:
            return self.intermediate_size
        m = self.multiple_of
        return m * math.ceil(int(2 * 4 * self.n_embd / 3) / m)


# The char-cpu preset is gpt.py's, changed only where Llama differs: a student compares like with like.
PRESETS = {
    "char-cpu": {**gpt.PRESETS["char-cpu"]},
    # the 2024-2026 additions that modern.py measures on top of Llama: QK-norm, and Muon for the hidden matrices
    "modern-cpu": {**gpt.PRESETS["char-cpu"], "qk_norm": True, "optimizer": "muon"},
    "tiny": {**gpt.PRESETS["tiny"]},  # for tests, and for trying flags in seconds
}
DEFAULT_PRESET = "char-cpu"

# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """g * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019, eq. 4): LayerNorm without the mean and
    the bias. Computed in fp32 whatever x is, as the released code does, then cast back.
    RMSNorm(4)(torch.tensor([3., 4., 0., 0.])) -> [1.2, 1.6, 0, 0] (rms = 2.5)"""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE. H query heads share K key/value heads: query
    head h reads key/value head h // (H / K). The KV cache holds K heads, not H: GQA's reason."""

    def __init__(self, c, layer_idx=0):
        super().__init__()
        self.layer_idx = layer_idx  # which of the cache's layers is this one's
        self.H, self.K, self.hs = c.n_head, c.kv_heads, c.n_embd // c.n_head
        self.q_proj = nn.Linear(c.n_embd, self.H * self.hs, bias=False)
        self.k_proj = nn.Linear(c.n_embd, self.K * self.hs, bias=False)
        self.v_proj = nn.Linear(c.n_embd, self.K * self.hs, bias=False)
        self.o_proj = nn.Linear(self.H * self.hs, c.n_embd, bias=False)
        self.o_proj.residual = True
        self.q_norm = RMSNorm(self.hs, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(self.hs, c.rms_norm_eps) if c.qk_norm else None
        self.theta, self.attn, self.dropout = c.rope_theta, c.attn, c.dropout

    def forward(self, x, pos, cache=None):
        """x (B, T, C) at positions pos (T,) -> (B, T, C). cache: a gpt.KVCache of (B, K, T_max, hs)."""
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.H, self.hs).transpose(1, 2)  # (B, H, T, hs)
        k = self.k_proj(x).view(B, T, self.K, self.hs).transpose(1, 2)  # (B, K, T, hs)
        v = self.v_proj(x).view(B, T, self.K, self.hs).transpose(1, 2)  # (B, K, T, hs)
        if self.q_norm is not None:  # per head, before the rotation (OLMo 2, Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        # Trap: HF's Llama pairs coordinate i with i + hs/2 ("rotate_half"), not 2i with 2i+1 as
        # the RoFormer paper and gpt.py's --pos rope do. Released weights assume it: we use it too.
        q, k = apply_rope_half_split(q, pos, self.theta), apply_rope_half_split(k, pos, self.theta)
        if cache is not None:  # the past's keys were rotated at their own positions: cached as they are
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, T_k, hs), T_k = past + T
        # (B, K, T_k, hs) -> (B, H, T_k, hs): each key/value head serves H / K query heads, consecutively
        k, v = (t.repeat_interleave(self.H // self.K, dim=1) for t in (k, v))
        p = self.dropout if self.training else 0.0
        keep = torch.arange(k.size(2), device=x.device)[None, :] <= pos[:, None]  # (T, T_k): no key after the query
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if cache is None else keep,
                                               is_causal=cache is None, dropout_p=p)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hs)  # (B, H, T, T_k)
            att = att.masked_fill(~keep, float("-inf"))
            y = F.dropout(att.softmax(-1), p) @ v  # (B, H, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020, eq. 6): down(silu(gate(x)) * up(x)); one matrix more than GPT-2's MLP,
    so F is 2/3 of 4C for the same parameters. relu2 (Primer): down(relu(up(x))^2), width 4C."""

    def __init__(self, c):
        super().__init__()
        self.kind = c.mlp
        F_ = c.ffn if c.mlp == "swiglu" else (c.intermediate_size or 4 * c.n_embd)
        self.gate_proj = nn.Linear(c.n_embd, F_, bias=False) if c.mlp == "swiglu" else None
        self.up_proj = nn.Linear(c.n_embd, F_, bias=False)
        self.down_proj = nn.Linear(F_, c.n_embd, bias=False)
        self.down_proj.residual = True

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.relu(self.up_proj(x)).square())


class Block(nn.Module):
    """Pre-norm, as GPT-2: x + attn(norm(x)), then x + mlp(norm(x)). HF's names for the two norms."""

    def __init__(self, c, layer_idx=0):
        super().__init__()
        self.input_layernorm = RMSNorm(c.n_embd, c.rms_norm_eps)
        self.self_attn = Attention(c, layer_idx)
        self.post_attention_layernorm = RMSNorm(c.n_embd, c.rms_norm_eps)
        self.mlp = MLP(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, pos, cache=None):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), pos, cache))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


# ----------------------------------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(c.vocab_size, c.n_embd),
            layers=nn.ModuleList([Block(c, i) for i in range(c.n_layer)]),
            norm=RMSNorm(c.n_embd, c.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # HF's LlamaPreTrainedModel: N(0, 0.02) everywhere, gains 1. The residual projections get
        # GPT-2's 1/sqrt(2L) too (§2.3, as gpt.py): with it, the stream's variance at init does not
        # grow with depth. from_pretrained overwrites all of it.
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameters, tied ones once. non_embedding drops the token table (not an untied head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if non_embedding else n

    def flops_per_token(self):
        """6 per weight (the head's matmul included) + 12 L T C for attention (PaLM, App. B)."""
        c = self.config
        # a tied head is the token table, which non_embedding dropped: its matmul still costs 6 per weight
        head = c.vocab_size * c.n_embd if c.tie_word_embeddings else 0
        return 6 * (self.num_params(non_embedding=True) + head) + 12 * c.n_layer * c.block_size * c.n_embd

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> (logits (B, T, V), mean cross-entropy against targets or None), as gpt.GPT.
        cache: a gpt.KVCache (B, K, block_size, hs) per layer; idx continues what it holds."""
        c, T, past = self.config, idx.size(1), cache.length if cache is not None else 0
        require(past + T <= c.block_size, f"sequence of {past + T} tokens is longer than block_size={c.block_size}")
        pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.model.embed_tokens(idx)  # (B, T, C): no position added; RoPE acts inside attention
        for layer in self.model.layers:
            x = layer(x, pos, cache)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.model.norm(x))  # (B, T, V)
        if c.logit_softcap:  # smooth clip to (-cap, cap): no logit can run away
            logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, generator=None):
        """idx (B, T) plus max_new_tokens sampled tokens, as gpt.GPT.generate: the prompt is encoded
        once, then each new token reads the cached keys and values (K heads per layer). Past
        block_size tokens the window slides and every rotation shifts: each step re-reads its window."""
        was_training, c, cache = self.training, self.config, None
        self.eval()
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= c.block_size:
                if cache is None:  # prefill: the whole prompt at once
                    shape = (idx.size(0), c.kv_heads, c.block_size, c.n_embd // c.n_head)
                    cache = gpt.KVCache(c.n_layer, shape, idx.device, self.lm_head.weight.dtype)
                    logits, _ = self(idx, cache=cache)
                else:  # decode: the newest token only
                    logits, _ = self(idx[:, -1:], cache=cache)
            else:
                logits, _ = self(idx[:, -c.block_size:])
            idx = torch.cat((idx, gpt.sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)), 1)
        self.train(was_training)
        return idx

    # ------------------------------------------------------------------------------------------------------------------
    # Released weights: a transformers LlamaForCausalLM directory, both ways

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """A LlamaForCausalLM directory (config.json + model.safetensors), e.g. SmolLM or TinyLlama."""
        hf, weights = read_hf_dir(path)
        require(hf.get("model_type") == "llama", f"{path}: model_type {hf.get('model_type')!r}, not llama")
        require(hf.get("hidden_act", "silu") == "silu", f"{path}: hidden_act {hf.get('hidden_act')!r} is not SwiGLU's")
        # transformers < 5 writes rope_theta (+ rope_scaling); 5.x writes rope_parameters {rope_theta, rope_type}
        rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0),
                                             **(hf.get("rope_scaling") or {})}
        kind = rope.get("rope_type", rope.get("type", "default"))
        require(kind == "default", f"{path}: rope_type {kind!r} (Llama 3.1's long-context scaling) is not built here")
        require(not hf.get("attention_bias") and not hf.get("mlp_bias"), f"{path}: biases; Llama has none")
        C, H = hf["hidden_size"], hf["num_attention_heads"]
        require(hf.get("head_dim") in (None, C // H), f"{path}: head_dim {hf.get('head_dim')} is not hidden / heads")
        config = LlamaConfig(block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                             n_layer=hf["num_hidden_layers"], n_head=H,
                             n_kv_head=hf.get("num_key_value_heads") or H, n_embd=C,
                             intermediate_size=hf["intermediate_size"], rope_theta=rope.get("rope_theta", 10000.0),
                             rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                             tie_word_embeddings=hf.get("tie_word_embeddings", False), **overrides)
        model = cls(config)
        skip = ("lm_head.",) if config.tie_word_embeddings else ()
        copy_weights(model, weights, path, skip=skip)
        return model

    def export_hf(self, path):
        """The inverse of from_pretrained: a directory transformers' LlamaForCausalLM reads."""
        c = self.config
        require(not c.qk_norm and c.mlp == "swiglu" and not c.logit_softcap,
                "export_hf: LlamaForCausalLM has no qk_norm, relu2 or logit soft-capping")
        config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=c.vocab_size,
                      hidden_size=c.n_embd, intermediate_size=c.ffn, num_hidden_layers=c.n_layer,
                      num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads, head_dim=c.n_embd // c.n_head,
                      max_position_embeddings=c.block_size, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                      rope_parameters={"rope_theta": c.rope_theta, "rope_type": "default"},  # both versions' keys
                      hidden_act="silu", attention_bias=False, mlp_bias=False,
                      tie_word_embeddings=c.tie_word_embeddings, initializer_range=0.02, torch_dtype="float32")
        weights = {k: v.float() for k, v in self.state_dict().items()
                   if not (c.tie_word_embeddings and k == "lm_head.weight")}  # a tied head: one storage, one name
        write_hf_dir(path, config, weights)


# ----------------------------------------------------------------------------------------------------------------------
# What train.py plugs in: the objective and the demo are GPT's (next-token prediction, samples)

Model, Config, Objective = Llama, LlamaConfig, gpt.NextTokenObjective
SPECIAL_TOKENS = gpt.SPECIAL_TOKENS
DemoConfig, demo = gpt.DemoConfig, gpt.demo


@command
def main(argv=None):
    import train  # checkpoints and devices, as for every model

    p = gpt.parser("Sample from a checkpoint of train.py --model llama.", hf=False)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    demo = DemoConfig(prompt=args.prompt, sample_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k or 0)  # checks the flags: one line, exit 2
    device = train.pick_device(args.device)
    model, tokenizer, _ = train.load_for_inference(args.ckpt, device, "--ckpt", model="llama")
    gpt.demo(model, tokenizer, demo, device, args.seed)


if __name__ == "__main__":
    main()
