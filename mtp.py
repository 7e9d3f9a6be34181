"""
Multi-token prediction and self-speculative decoding, on top of gpt.py's GPT-2.

Papers (slides "Multi-token prediction", both of them)
  - Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction" §2.
    A shared trunk f_s and unembedding f_u; n independent heads f_h_i (one Transformer layer each):
    P(x_t+i | x_t:1) = softmax(f_u(f_h_i(f_s(x_t:1)))), trained on the sum of the n heads' losses.
    Inference: next-token head alone, or others draft (self-speculative, §3.2). `--mtp parallel`.
  - DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" §2.2, eq. (21)-(25): sequential MTP modules.
    Depth k combines depth k-1's hidden state at position i with the embedding of token i+k.
    Each prediction keeps the causal chain. MTP loss weight lambda / D (eq. 25). `--mtp sequential`.
  - Stern et al. 2018, "Blockwise Parallel Decoding for Deep Autoregressive Models" §3.
    Draft several tokens, verify them in one pass of the model, keep the longest agreed prefix.

Design
  gpt.py is GPT-2 and never imports this file. train.py's "gpt" entry (MODELS) is this module.
  So GPTConfig's fields and the three below are the flags of `python train.py --model gpt`.
  Model(config) is gpt.Model (GPT-2) if mtp_heads == 0, else MultiTokenGPT (gpt.GPT + heads `mtp`).
  Objective likewise. Parameter names (mtp.*) and config fields are as when gpt.py held the heads.
  Old checkpoints load, resume and --init-from unchanged. Same seed, same weights (MultiTokenGPT).

Run
  python train.py --model gpt --mtp-heads 3                   # predict 1..4 tokens ahead (n = 4)
  python train.py --model gpt --mtp-heads 1 --mtp sequential  # DeepSeek-V3's one module (n = 2)
  python mtp.py --ckpt out/gpt/ckpt.pt --speculative          # greedy decoding drafted by the heads
  python experiments.py mtp                                   # next-token vs MTP at equal compute

Legend (besides gpt.py's B, T, C, V, L)
  D mtp_heads: extra tokens predicted per position. n = 1 + D (Gloeckle's n, next token included).
  Head i (i = 1..n) predicts the token i places ahead. DeepSeek's depth k = i - 1.
  future (B, D, T): future[:, k-1, t] = the token k places after t (-100 past the end of the text).
"""

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
from common import command, require
from gpt import Block
from gpt import DEFAULT_PRESET, PRESETS, SPECIAL_TOKENS, DemoConfig, demo  # noqa: F401  (train.py reads them here)

# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class MTPConfig(gpt.GPTConfig):
    mtp_heads: int = 0  # D: extra future tokens per position (0 = plain GPT; Gloeckle's n = 1 + D)
    mtp: str = "parallel"  # parallel: Gloeckle's heads on one trunk | sequential: DeepSeek-V3's chained modules
    mtp_weight: float = 1.0  # w in loss = L_1 + w * (L_2 + ... + L_n). 1: Gloeckle's plain sum; DeepSeek: lambda / D

    def __post_init__(self):
        super().__post_init__()
        require(self.mtp_heads >= 0, f"--mtp-heads {self.mtp_heads}: must be >= 0 (extra tokens predicted)")
        require(self.mtp in ("parallel", "sequential"), f"--mtp {self.mtp}: must be parallel or sequential")
        require(self.mtp_weight >= 0, f"--mtp-weight {self.mtp_weight}: must be >= 0")
        require(not (self.prefix_lm and self.mtp_heads), "--prefix-lm and --mtp-heads: one objective at a time")


# ----------------------------------------------------------------------------------------------------------------------
# The model


class MTPModule(nn.Module):
    """DeepSeek-V3's multi-token prediction module at depth k (§2.2, eq. 21-22):
    h'_i = M_k [RMSNorm(h^(k-1)_i); RMSNorm(Emb(t_(i+k)))]; h^k = TRM_k(h'), a Transformer block.

    h^(k-1): depth k-1's hidden state (depth 0: the main model's last block, before its final norm).
    t_(i+k): the true token k places after position i, in the shared embedding.
    Depth k predicts token i+k+1 from exactly the tokens up to i+k: the causal chain, one step on.
    No position vector is added to the embedding: h^(k-1) already carries the position.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        C = config.n_embd
        self.hnorm = nn.RMSNorm(C, eps=config.layer_norm_epsilon)  # RMSNorm(h^(k-1)_i)
        self.enorm = nn.RMSNorm(C, eps=config.layer_norm_epsilon)  # RMSNorm(Emb(t_(i+k)))
        self.proj = nn.Linear(2 * C, C, bias=False)  # M_k, a (C, 2C) matrix
        self.block = Block(config, layer_idx)  # TRM_k
        # The shared output head (tied lm_head) needs a final norm in front, like the main model's:
        # pre-LN blocks leave the residual stream unnormalised. DeepSeek-V3 modules have their own.
        self.ln_f = nn.LayerNorm(C, eps=config.layer_norm_epsilon, bias=config.bias)

    def forward(self, h_prev, emb, pos, bias=None):
        """h_prev, emb (B, T, C): depth k-1's states, the embedded tokens k ahead -> h^k."""
        # Trap: eq. (21) puts h first. vLLM and SGLang (eh_proj), running DeepSeek-V3's MTP weights,
        # put the embedding first. Same model, with M_k's columns permuted. We follow eq. 21.
        # Trap: autocast has no rule for RMSNorm, only LayerNorm. A bf16 h_prev would meet fp32
        # gains: a slow unfused path, a warning. Normalise in the gains' dtype; autocast the rest.
        h_prev, emb = h_prev.to(self.hnorm.weight.dtype), emb.to(self.enorm.weight.dtype)
        # (B, T, 2C) -> (B, T, C)
        h = self.proj(torch.cat([self.hnorm(h_prev), self.enorm(emb)], dim=-1))
        return self.block(h, pos, bias)


class MultiTokenGPT(gpt.GPT):
    """GPT-2 plus D heads, `mtp`, one block each, numbered after the model's own blocks.
    parallel (Gloeckle et al. §2): the last block h[L-1] is head 1, the next-token head f_h_1.
      mtp[i-2] is f_h_i. Every head reads the trunk f_s = h[0..L-2]. All share f_u = ln_f + lm_head.
    sequential (DeepSeek-V3 §2.2): all of GPT is the main model. Module k reads depth k-1's states.
    Without `future`, forward is GPT's (inference): the next-token head alone, KV cache or not.
    export_hf writes it alone: the papers drop the heads at inference, GPT-2's format has none."""

    def __init__(self, config):
        make = Block if config.mtp == "parallel" else MTPModule
        # Trap: heads are built before the trunk. Building draws random numbers (nn.Linear's init).
        # In this order a seed gives its old weights (heads built in gpt.GPT): same runs as before.
        heads = [make(config, config.n_layer + k) for k in range(config.mtp_heads)]
        super().__init__(config)
        self.mtp = nn.ModuleList(heads)
        self.mtp.apply(self._init_weights)

    def flops_per_token(self):
        """GPT's count (num_params has the D blocks) + each head's lm_head matmul and attention."""
        c = self.config
        return super().flops_per_token() + c.mtp_heads * (6 * c.padded_vocab_size * c.n_embd +
                                                          12 * c.block_size * c.n_embd)

    def forward(self, idx, targets=None, cache=None, prefix_len=None, future=None):
        """As gpt.GPT.forward. With future (B, D, T), every head runs and logits are (B, n, T, V):
        [:, i] predicts the token i + 1 places ahead; [:, 0] is the next-token head.
        Only sequential modules read `future` (depth k embeds the token k ahead: teacher forcing).
        targets are then (B, n, T); loss L_1 + mtp_weight * (L_2 + ... + L_n), each a mean."""
        if future is None:
            return super().forward(idx, targets, cache, prefix_len)
        if cache is not None or prefix_len is not None:
            raise ValueError("the multi-token heads are for training and drafting; they run without a KV cache "
                             "and without a prefix-LM mask")
        z, x, pos, bias = self.trunk(idx)
        # (B, n, T, V)
        logits = torch.stack([self.unembed(x), *self.head_logits(z, x, future, pos, bias)], dim=1)
        loss = None
        if targets is not None:
            ce = [F.cross_entropy(logits[:, i].float().flatten(0, 1), targets[:, i].flatten(),
                                  ignore_index=-100) for i in range(logits.size(1))]
            loss = ce[0] + self.config.mtp_weight * sum(ce[1:])
        return logits, loss

    def trunk(self, idx):
        """The main model's states of idx (B, T): (z, x, pos, bias). pos, bias: for attention.
        x (B, T, C) leaves the last block (before ln_f); z enters it: the trunk f_s's output."""
        x, pos, bias = self.embed(idx)
        z = x  # the embeddings if there is only one block
        for block in self.transformer.h:
            z, x = x, block(x, pos, bias)
        return z, x, pos, bias

    def logits_of(self, h, module):
        """Logits (B, T, V) of a sequential module's states: its own norm, the shared lm_head."""
        return self.lm_head(module.ln_f(h))[..., :self.config.vocab_size]

    def head_logits(self, z, x, future, pos, bias):
        """The D extra heads' logits: (B, T, V) each, [k-1] for the token k + 1 places ahead."""
        if self.config.mtp == "parallel":
            # Gloeckle et al. §2: each head is its own Transformer layer on the trunk's states z.
            # So at position t it sees x_1..x_t only, like the next-token head.
            return [self.unembed(head(z, pos, bias)) for head in self.mtp]
        out, h = [], x  # h^0: the main model's last hidden state, before ln_f (DeepSeek-V3 eq. 21)
        for k, module in enumerate(self.mtp, start=1):
            # Depth k at position t embeds the true token t + k and predicts token t + k + 1.
            # Trap: past the text's end there is no token t + k (-100). Embed id 0 there instead.
            # Those positions' targets are past the end too (never scored). Causal attention keeps
            # whatever they embed from reaching any earlier position, at this depth or a deeper one.
            # h^k (B, T, C)
            h = module(h, self.transformer.wte(future[:, k - 1].clamp(min=0)), pos, bias)
            out.append(self.logits_of(h, module))
        return out

    @torch.no_grad()
    def speculative_generate(self, idx, max_new_tokens, stats=None):
        """Self-speculative greedy decoding (Gloeckle et al. §3.2; Stern et al.): heads draft, the
        next-token head verifies. Exactly generate(temperature=0)'s tokens; good drafts save passes.

        Each pass feeds the text plus a block [g, d_2, ..., d_n]. g is greedy's next token (from the
        last pass); d_i is head i's draft of the token i places ahead. d_i stands if every earlier
        draft stood and greedy chose it after the block tokens before it. The same pass gives the
        next g for free (greedy's token after the last kept one) and the states for the next drafts.
        So a pass adds 1 + (drafts kept) tokens; plain greedy adds 1.
        Batch rows move together: a step keeps the fewest drafts any row agrees on.

        No KV cache: it would have to roll back rejected drafts, and the sequential modules' states
        lag k positions behind. Once text + block outgrow block_size, it steps as plain greedy does.
        stats (optional dict) accumulates passes, drafted, accepted, and drafted_at / accepted_at:
        per draft position (d_2 .. d_n): times checked (all earlier drafts stood), times it stood.
        """
        D, T_max = self.config.mtp_heads, self.config.block_size
        was_training = self.training
        self.eval()
        st = stats if stats is not None else {}
        for key, zero in (("passes", 0), ("drafted", 0), ("accepted", 0), ("drafted_at", [0] * D),
                          ("accepted_at", [0] * D)):
            st.setdefault(key, zero)
        end = idx.size(1) + max_new_tokens
        block = None  # (B, 1 + D): greedy's next token g, then the drafts of the D tokens after it
        while idx.size(1) < end:
            if idx.size(1) + 1 + D > T_max:  # no room for a block: greedy steps (sliding window)
                logits, _ = self(idx[:, -T_max:])
                idx = torch.cat([idx, logits[:, -1:].argmax(dim=-1)], dim=1)
                st["passes"] += 1
                continue
            n = idx.size(1)
            # (B, n) at the start, else (B, n + 1 + D)
            text = idx if block is None else torch.cat([idx, block], dim=1)
            z, x, pos, bias = self.trunk(text)
            # (B, len(text)): greedy's choice of the token after each position
            greedy = self.unembed(x).argmax(dim=-1)
            st["passes"] += 1
            if block is not None:
                # block[:, j] (j >= 1) was drafted for the position after block[:, j-1].
                # Greedy chose greedy[:, n+j-1] there. stood (B, D): 1 up to the first miss.
                stood = (block[:, 1:] == greedy[:, n:n + D]).long().cumprod(dim=1)
                kept = int(stood.sum(dim=1).min())
                idx = torch.cat([idx, block[:, :1 + kept]], dim=1)  # g, greedy's own choice, stands
                st["drafted"] += D
                st["accepted"] += kept
                for j in range(min(kept + 1, D)):
                    st["drafted_at"][j] += 1
                    st["accepted_at"][j] += int(j < kept)
            p = idx.size(1)  # tokens kept; greedy's choice after the last comes free with this pass
            g = greedy[:, p - 1:p]  # (B, 1)
            block = torch.cat([g, self.draft(z[:, :p], x[:, :p], torch.cat([idx, g], dim=1),
                                             pos[:p], bias)], dim=1)
        self.train(was_training)
        return idx[:, :end]

    def draft(self, z, x, text, pos, bias):
        """The extra heads' greedy guesses (B, D) for the D tokens after text's last token,
        made at the last of P positions. z, x (B, P, C): trunk states of text[:, :P].
        text (B, P + 1) ends with greedy's next token g; pos, bias: the trunk's (>= P positions)."""
        P = z.size(1)
        if bias is not None:
            bias = bias[..., :P, :P]  # T5/ALiBi: the (H, P, P) corner for these positions
        if self.config.mtp == "parallel":
            # Head i at the last position drafts the token i places ahead.
            # It attends to all P positions, so it runs on all.
            return torch.cat([self.unembed(head(z, pos, bias)[:, -1:]).argmax(dim=-1)
                              for head in self.mtp], dim=1)
        h = x
        for k, module in enumerate(self.mtp, start=1):
            # Depth k embeds the token k places after each position:
            # the text, then g, then the drafts made so far.
            h = module(h, self.transformer.wte(text[:, k:k + P]), pos, bias)  # (B, P, C)
            text = torch.cat([text, self.logits_of(h[:, -1:], module).argmax(dim=-1)], dim=1)
        return text[:, P + 1:]


# ----------------------------------------------------------------------------------------------------------------------
# The objective: each row draws D more tokens; head i's targets are the tokens i places ahead.


def windows(tokens, starts, T, n_ahead):
    """Rows of T inputs and targets (B, n, T). Row i - 1 holds the token i places after each input,
    -100 where the text has ended.
    windows(np.array([5, 6, 7, 8]), [1], 2, n_ahead=2)
    -> idx [[6, 7]], targets [[[7, 8], [8, -100]]]"""
    rows = np.full((len(starts), T + n_ahead), -100, dtype=np.int64)  # (B, T + n)
    for r, s in enumerate(starts):
        piece = tokens[s:s + T + n_ahead]
        rows[r, :len(piece)] = piece
    rows = torch.from_numpy(rows)
    return {"idx": rows[:, :T],
            "targets": torch.stack([rows[:, i:i + T] for i in range(1, n_ahead + 1)], dim=1)}


class MultiTokenObjective(gpt.NextTokenObjective):
    """Next-token prediction plus D heads. targets (B, n, T).
    Loss L_1 + mtp_weight * (L_2 + ... + L_n), each L_i the mean over head i's real targets.
    mtp_weight 1: Gloeckle et al.'s L_n (§2), the plain sum. DeepSeek-V3: lambda / D (eq. 25).
    "loss" and "bpb": next token only, comparable to a plain GPT. Added: head2_loss .. headn_loss.
    Evaluation scores each next-token position once; head i, the token i places after it, if any."""

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.n_ahead = 1 + config.mtp_heads  # n: tokens predicted per position, next one included
        self.mtp_weight = config.mtp_weight
        self.raw_tokens_per_row = config.block_size + self.n_ahead  # T + n: head n's last target

    def windows(self, tokens, starts, T):
        return windows(tokens, starts, T, self.n_ahead)

    @staticmethod
    def names(n):
        """Loss terms: "nll" for the next token (as in a plain GPT), then nll_head2 .. nll_headn."""
        return ["nll"] + [f"nll_head{i}" for i in range(2, n + 1)]

    @classmethod
    def denominators(cls, batch):
        """Each loss term's denominator: the batch's real targets (not -100), per head."""
        targets = batch["targets"]  # (B, n, T)
        return {name: int((targets[:, i] != -100).sum())
                for i, name in enumerate(cls.names(targets.size(1)))}

    def loss(self, model, batch, denominators=None):
        denominators = denominators or self.denominators(batch)
        heads = batch["targets"]  # (B, n, T)
        # One call of the model's forward runs every head: DistributedDataParallel syncs gradients
        # through the wrapped module's forward only.
        # The sequential modules read heads 1..D's targets, the true tokens ahead.
        logits, _ = model(batch["idx"], future=heads[:, :-1])  # (B, n, T, V)
        total, sums = 0.0, {}
        for i, name in enumerate(self.names(heads.size(1))):
            targets = heads[:, i]  # (B, T)
            nll = F.cross_entropy(logits[:, i].float().flatten(0, 1), targets.flatten(),
                                  ignore_index=-100, reduction="sum")
            total = total + (1.0 if i == 0 else self.mtp_weight) * nll / max(1, denominators[name])
            sums[name] = nll.detach()
            if i:
                sums[f"tokens_head{i + 1}"] = (targets != -100).sum()
        # the next token's tokens and bytes, as in a plain GPT
        sums.update(self.sums(sums["nll"], heads[:, 0]))
        return total, sums

    @staticmethod
    def summarize(sums):
        """Next-token loss and bpb; head i's loss (nats/token) on the token i places ahead."""
        metrics = gpt.NextTokenObjective.summarize(sums)
        for i in sorted(int(k.removeprefix("nll_head")) for k in sums if k.startswith("nll_head")):
            metrics[f"head{i}_loss"] = float(sums[f"nll_head{i}"]) / float(sums[f"tokens_head{i}"])
        return metrics


# ----------------------------------------------------------------------------------------------------------------------
# train.py's "gpt" entry: GPT-2 itself unless heads are asked for (see the docstring's Design)

Config = MTPConfig


def Model(config):
    """gpt.Model (GPT-2, looked up when called) when config.mtp_heads == 0, else MultiTokenGPT."""
    return MultiTokenGPT(config) if config.mtp_heads else gpt.Model(config)


def Objective(config, tokenizer):
    return MultiTokenObjective(config, tokenizer) if config.mtp_heads else gpt.Objective(config, tokenizer)


# --init-from a Hugging Face GPT-2 directory: GPT-2 has no heads
Model.from_pretrained = gpt.GPT.from_pretrained
Classifier = gpt.Classifier  # --task: GPT-1's fine-tuning head


# ----------------------------------------------------------------------------------------------------------------------
# Measuring self-speculative decoding, and sampling with it from the command line


def speculate(model, tokens, prompts, prompt_len, new_tokens):
    """Self-speculative greedy decoding from `prompts` evenly spaced prompts of the text `tokens`.
    Reports the acceptance rate (drafts kept / drafts made), per draft position (kept / checked),
    tokens per pass, and whether every output equals plain greedy decoding."""
    stats, exact = {}, 0
    starts = [i * (len(tokens) - prompt_len) // prompts for i in range(prompts)]
    for s in starts:
        prompt = torch.tensor(tokens[s:s + prompt_len].astype(np.int64))[None]  # (1, prompt_len)
        fast = model.speculative_generate(prompt, new_tokens, stats=stats)
        exact += torch.equal(fast, model.generate(prompt, new_tokens, temperature=0))
    return dict(acceptance=stats["accepted"] / max(1, stats["drafted"]),
                acceptance_at=[a / max(1, d) for a, d in zip(stats["accepted_at"], stats["drafted_at"])],
                tokens_per_pass=prompts * new_tokens / stats["passes"], exact=f"{exact}/{prompts}")


@command
def main(argv=None):
    p = gpt.parser("Greedy decoding from a GPT trained with --mtp-heads: with --speculative the extra heads draft "
                   "and the next-token head verifies. The same text, in fewer passes.", hf=False)
    p.add_argument("--speculative", action="store_true", help="draft with the multi-token heads")
    args = p.parse_args(argv)
    model, tokenizer, idx = gpt.load(args)
    require(isinstance(model, MultiTokenGPT),
            f"--ckpt {args.ckpt}: a model without multi-token heads (train with --mtp-heads N)")
    if args.speculative:
        stats = {}
        out = model.speculative_generate(idx, args.max_new_tokens, stats)
        how = f"speculative greedy: {stats['accepted']}/{stats['drafted']} drafts kept, " \
              f"{args.max_new_tokens} tokens in {stats['passes']} passes"
    else:
        out = model.generate(idx, args.max_new_tokens, temperature=0)
        how = f"greedy: {args.max_new_tokens} tokens in {args.max_new_tokens} passes"
    print(tokenizer.decode(out[0].tolist()))
    print(how, file=sys.stderr)


if __name__ == "__main__":
    main()
