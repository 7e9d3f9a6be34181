"""
Multi-token prediction and self-speculative decoding, on top of gpt.py's GPT-2.

Papers (slides "Multi-token prediction", both of them)
  - Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction" §2: a shared trunk f_s,
    n independent heads f_h_i (one Transformer layer each) and the shared unembedding f_u,
    P(x_t+i | x_t:1) = softmax(f_u(f_h_i(f_s(x_t:1)))), trained on the sum of the n heads' losses. At inference the
    next-token head alone, or the others as drafts for self-speculative decoding (§3.2). `--mtp parallel`.
  - DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" §2.2, eq. (21)-(25): sequential MTP modules. Depth k combines the
    previous depth's hidden state at position i with the embedding of token i+k, so every prediction keeps the causal
    chain; the MTP loss is weighted by lambda / D (eq. 25). `--mtp sequential`.
  - Stern et al. 2018, "Blockwise Parallel Decoding for Deep Autoregressive Models" §3: draft several tokens, verify
    them with one pass of the model, keep the longest prefix the model agrees with.

Design
  gpt.py is GPT-2 and never imports this file. train.py's "gpt" entry (MODELS) is this module, so the fields of
  GPTConfig and the three below are the flags of `python train.py --model gpt`. Model(config) builds gpt.Model,
  GPT-2 itself, when mtp_heads == 0, and MultiTokenGPT (gpt.GPT plus the heads, `mtp`) otherwise; Objective does the
  same. Parameter names (mtp.*) and config fields are those gpt.py wrote when the heads lived there, so those
  checkpoints load, resume and --init-from unchanged; a seed gives the same weights as then (MultiTokenGPT.__init__).

Run
  python train.py --model gpt --mtp-heads 3                       # also predict 2, 3 and 4 tokens ahead (n = 4)
  python train.py --model gpt --mtp-heads 1 --mtp sequential      # DeepSeek-V3's one module (n = 2)
  python mtp.py --ckpt out/gpt/ckpt.pt --speculative              # greedy decoding drafted by the heads
  python experiments.py mtp                                       # next-token vs multi-token at equal compute

Legend (besides gpt.py's B, T, C, V, L)
  D mtp_heads, the extra tokens predicted at each position; n = 1 + D (Gloeckle's n: the next token included).
  Head i (i = 1..n) predicts the token i places ahead; DeepSeek's depth k = i - 1. future: (B, D, T), future[:, k-1, t]
  the token k places after position t (-100 past the end of the text).
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
    mtp_heads: int = 0  # D: extra future tokens predicted at each position (0 = plain GPT; Gloeckle's n = 1 + D)
    mtp: str = "parallel"  # parallel: Gloeckle et al.'s heads on one trunk | sequential: DeepSeek-V3's chained modules
    mtp_weight: float = 1.0  # w in loss = L_1 + w * (L_2 + ... + L_n): 1 is Gloeckle's plain sum; DeepSeek's lambda / D

    def __post_init__(self):
        super().__post_init__()
        require(self.mtp_heads >= 0, f"--mtp-heads {self.mtp_heads}: must be >= 0 (extra tokens predicted)")
        require(self.mtp in ("parallel", "sequential"), f"--mtp {self.mtp}: must be parallel or sequential")
        require(self.mtp_weight >= 0, f"--mtp-weight {self.mtp_weight}: must be >= 0")


# ----------------------------------------------------------------------------------------------------------------------
# The model


class MTPModule(nn.Module):
    """DeepSeek-V3's multi-token prediction module at depth k (§2.2, eq. 21-22):
    h'_i = M_k [RMSNorm(h^(k-1)_i); RMSNorm(Emb(t_(i+k)))], then h^k = TRM_k(h'), one Transformer block.

    h^(k-1) is the previous depth's hidden state (depth 0: the main model's last block, before its final norm) and
    t_(i+k) the true token k places after position i, embedded with the shared embedding. So the prediction of token
    i+k+1 at depth k sees exactly the tokens up to i+k: the causal chain of next-token prediction, one step further per
    depth. No position vector is added to the embedding: h^(k-1) already carries the position.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        C = config.n_embd
        self.hnorm = nn.RMSNorm(C, eps=config.layer_norm_epsilon)  # RMSNorm(h^(k-1)_i)
        self.enorm = nn.RMSNorm(C, eps=config.layer_norm_epsilon)  # RMSNorm(Emb(t_(i+k)))
        self.proj = nn.Linear(2 * C, C, bias=False)  # M_k, a (C, 2C) matrix
        self.block = Block(config, layer_idx)  # TRM_k
        # The shared output head (our tied lm_head) needs a final norm in front, as the main model's does: pre-LN
        # blocks leave the residual stream unnormalised. DeepSeek-V3's released modules have a norm of their own there.
        self.ln_f = nn.LayerNorm(C, eps=config.layer_norm_epsilon, bias=config.bias)

    def forward(self, h_prev, emb, pos, bias=None):
        """h_prev (B, T, C): depth k-1's hidden states; emb (B, T, C): embeddings of the tokens k ahead -> h^k."""
        # Trap: eq. (21) puts h first; the engines that load DeepSeek-V3's released MTP weights (vLLM, SGLang: eh_proj)
        # concatenate the embedding first. The same model up to a permutation of M_k's columns; we follow the paper.
        # Trap: autocast has no rule for RMSNorm (it has one for LayerNorm), so a bf16 h_prev would meet fp32 gains:
        # a slow unfused path and a warning. Normalise in the gains' dtype; the projection is autocast as usual.
        h_prev, emb = h_prev.to(self.hnorm.weight.dtype), emb.to(self.enorm.weight.dtype)
        h = self.proj(torch.cat([self.hnorm(h_prev), self.enorm(emb)], dim=-1))  # (B, T, 2C) -> (B, T, C)
        return self.block(h, pos, bias)


class MultiTokenGPT(gpt.GPT):
    """GPT-2 plus D heads, `mtp`, one block each, numbered after the model's own blocks.
    parallel (Gloeckle et al. §2): the last block h[L-1] is head 1, the next-token head f_h_1, and mtp[i-2] is f_h_i;
      every head reads the trunk f_s = h[0..L-2]; all share f_u = ln_f + lm_head.
    sequential (DeepSeek-V3 §2.2): the whole GPT is the main model; module k reads depth k-1's states.
    Without `future` the forward is GPT's: the next-token head alone, with or without a KV cache (inference).
    export_hf writes that next-token model alone: both papers drop the heads at inference, GPT-2's format has none."""

    def __init__(self, config):
        make = Block if config.mtp == "parallel" else MTPModule
        # Trap: the heads are built before the trunk. Building draws random numbers (nn.Linear's own init), and in this
        # order a seed gives the weights it gave when the heads were built inside gpt.GPT: the same runs as before.
        heads = [make(config, config.n_layer + k) for k in range(config.mtp_heads)]
        super().__init__(config)
        self.mtp = nn.ModuleList(heads)
        self.mtp.apply(self._init_weights)

    def flops_per_token(self):
        """GPT's count (num_params includes the D blocks) plus each head's lm_head matmul and attention."""
        c = self.config
        return super().flops_per_token() + c.mtp_heads * (6 * c.padded_vocab_size * c.n_embd +
                                                          12 * c.block_size * c.n_embd)

    def forward(self, idx, targets=None, cache=None, prefix_len=None, future=None):
        """As gpt.GPT.forward; with future (B, D, T) every head runs and logits are (B, n, T, V): [:, i] predicts the
        token i + 1 places ahead, [:, 0] is the next-token head. The sequential modules read `future` (depth k embeds
        the token k ahead: teacher forcing); the parallel heads never do. targets are then (B, n, T) and the loss is
        L_1 + mtp_weight * (L_2 + ... + L_n), each a mean."""
        if future is None:
            return super().forward(idx, targets, cache, prefix_len)
        if cache is not None or prefix_len is not None:
            raise ValueError("the multi-token heads are for training and drafting; they run without a KV cache "
                             "and without a prefix-LM mask")
        z, x, pos, bias = self.trunk(idx)
        logits = torch.stack([self.unembed(x), *self.head_logits(z, x, future, pos, bias)], dim=1)  # (B, n, T, V)
        loss = None
        if targets is not None:
            ce = [F.cross_entropy(logits[:, i].float().flatten(0, 1), targets[:, i].flatten(), ignore_index=-100)
                  for i in range(logits.size(1))]
            loss = ce[0] + self.config.mtp_weight * sum(ce[1:])
        return logits, loss

    def trunk(self, idx):
        """The main model's states of idx (B, T): (z, x, pos, bias). x (B, T, C) leaves the last block (before ln_f);
        z enters it, i.e. the output of the parallel heads' shared trunk f_s. pos, bias: what attention needs."""
        x, pos, bias = self.embed(idx)
        z = x  # the embeddings if there is only one block
        for block in self.transformer.h:
            z, x = x, block(x, pos, bias)
        return z, x, pos, bias

    def logits_of(self, h, module):
        """A sequential module's states -> logits, through its own norm and the shared lm_head: (B, T, V)."""
        return self.lm_head(module.ln_f(h))[..., :self.config.vocab_size]

    def head_logits(self, z, x, future, pos, bias):
        """The D extra heads' logits: a list of (B, T, V), [k-1] for the token k + 1 places ahead."""
        if self.config.mtp == "parallel":
            # Gloeckle et al. §2: each head is its own Transformer layer on the trunk's states z, so at position t it
            # sees x_1..x_t only, like the next-token head.
            return [self.unembed(head(z, pos, bias)) for head in self.mtp]
        out, h = [], x  # h^0: the main model's last hidden state, before ln_f (DeepSeek-V3 eq. 21)
        for k, module in enumerate(self.mtp, start=1):
            # Depth k at position t embeds the true token t + k and predicts token t + k + 1.
            # Trap: past the end of the text there is no token t + k (-100). Embed id 0 there instead: the targets of
            # those positions are past the end too (never scored), and causal attention keeps whatever it embeds from
            # reaching any earlier position, at this depth or a deeper one.
            h = module(h, self.transformer.wte(future[:, k - 1].clamp(min=0)), pos, bias)  # h^k (B, T, C)
            out.append(self.logits_of(h, module))
        return out

    @torch.no_grad()
    def speculative_generate(self, idx, max_new_tokens, stats=None):
        """Greedy decoding that drafts with the extra heads and verifies with the next-token head: exactly the tokens
        of generate(temperature=0), in fewer passes wherever the drafts are right (Gloeckle et al. §3.2; Stern et al.).

        Each pass feeds the text plus a block [g, d_2, ..., d_n]: g is greedy's next token (known from the last pass),
        d_i the head-i draft of the token i places ahead. Draft d_i stands if greedy chose it after the block tokens
        before it and every earlier draft stood. The same pass gives greedy's token after the last kept one (the next
        g, for free) and the states the heads draft the next block from. So a pass adds 1 + (drafts kept) tokens where
        plain greedy decoding adds 1. Rows of a batch move together: a step keeps the fewest drafts any row agrees on.

        No KV cache: it would have to roll back rejected drafts, and the sequential modules' states lag k positions
        behind the text. Once text + block outgrow block_size, it steps as plain greedy decoding does.
        stats (optional dict) accumulates passes, drafted, accepted, and drafted_at / accepted_at: per draft position
        (d_2 .. d_n), how often it was checked (every earlier draft stood) and how often it stood.
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
            if idx.size(1) + 1 + D > T_max:  # no room for a block: plain greedy steps from here (sliding window)
                logits, _ = self(idx[:, -T_max:])
                idx = torch.cat([idx, logits[:, -1:].argmax(dim=-1)], dim=1)
                st["passes"] += 1
                continue
            n = idx.size(1)
            text = idx if block is None else torch.cat([idx, block], dim=1)  # (B, n) at the start, else (B, n + 1 + D)
            z, x, pos, bias = self.trunk(text)
            greedy = self.unembed(x).argmax(dim=-1)  # (B, len(text)): greedy's choice of the token after each position
            st["passes"] += 1
            if block is not None:
                # block[:, j] (j >= 1) was drafted for the position after block[:, j-1]; greedy chose greedy[:, n+j-1]
                stood = (block[:, 1:] == greedy[:, n:n + D]).long().cumprod(dim=1)  # (B, D): 1 up to the first miss
                kept = int(stood.sum(dim=1).min())
                idx = torch.cat([idx, block[:, :1 + kept]], dim=1)  # g always stands: it was greedy's own choice
                st["drafted"] += D
                st["accepted"] += kept
                for j in range(min(kept + 1, D)):
                    st["drafted_at"][j] += 1
                    st["accepted_at"][j] += int(j < kept)
            p = idx.size(1)  # tokens kept so far; greedy's choice after the last of them comes free with this pass
            g = greedy[:, p - 1:p]  # (B, 1)
            block = torch.cat([g, self.draft(z[:, :p], x[:, :p], torch.cat([idx, g], dim=1), pos[:p], bias)], dim=1)
        self.train(was_training)
        return idx[:, :end]

    def draft(self, z, x, text, pos, bias):
        """The extra heads' greedy guesses for the D tokens after text's last token, from the last of P positions:
        (B, D). z, x (B, P, C): trunk states of text[:, :P]; text (B, P + 1) ends with greedy's next token g; pos,
        bias: trunk's for at least P positions."""
        P = z.size(1)
        if bias is not None:
            bias = bias[..., :P, :P]  # T5/ALiBi: the (H, P, P) corner for these positions
        if self.config.mtp == "parallel":
            # head i at the last position drafts the token i places ahead; it attends to all P positions, so runs on all
            return torch.cat([self.unembed(head(z, pos, bias)[:, -1:]).argmax(dim=-1) for head in self.mtp], dim=1)
        h = x
        for k, module in enumerate(self.mtp, start=1):
            # depth k embeds the token k places after each position: the text, then g, then the drafts made so far
            h = module(h, self.transformer.wte(text[:, k:k + P]), pos, bias)  # (B, P, C)
            text = torch.cat([text, self.logits_of(h[:, -1:], module).argmax(dim=-1)], dim=1)
        return text[:, P + 1:]


# ----------------------------------------------------------------------------------------------------------------------
# The objective: each row draws D more tokens; head i's targets are the tokens i places ahead.


def windows(tokens, starts, T, n_ahead):
    """Rows of T inputs and targets (B, n, T): row i - 1 holds the token i places after each input, -100 where the text
    has ended. windows(np.array([5, 6, 7, 8]), [1], 2, n_ahead=2) -> idx [[6, 7]], targets [[[7, 8], [8, -100]]]"""
    rows = np.full((len(starts), T + n_ahead), -100, dtype=np.int64)  # (B, T + n)
    for r, s in enumerate(starts):
        piece = tokens[s:s + T + n_ahead]
        rows[r, :len(piece)] = piece
    rows = torch.from_numpy(rows)
    return {"idx": rows[:, :T], "targets": torch.stack([rows[:, i:i + T] for i in range(1, n_ahead + 1)], dim=1)}


class MultiTokenObjective(gpt.NextTokenObjective):
    """Next-token prediction plus D heads: targets (B, n, T), loss L_1 + mtp_weight * (L_2 + ... + L_n), each L_i the
    mean over head i's real targets. mtp_weight 1 is Gloeckle et al.'s L_n (§2), the plain sum over the n heads;
    DeepSeek-V3 weights its MTP losses by lambda / D (eq. 25). The metrics keep "loss" and "bpb" for the next token
    alone, so every run compares with a plain GPT, and add head2_loss .. headn_loss. Evaluation scores every next-token
    target once; head i scores the token i places after each of those positions that has one."""

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.n_ahead = 1 + config.mtp_heads  # n: tokens predicted at every position, the next one included
        self.mtp_weight = config.mtp_weight
        self.raw_tokens_per_row = config.block_size + self.n_ahead  # head n's last target is T + n tokens in

    def windows(self, tokens, starts, T):
        return windows(tokens, starts, T, self.n_ahead)

    @staticmethod
    def names(n):
        """Each head's loss term: "nll" for the next token, as in a plain GPT, then nll_head2 .. nll_headn."""
        return ["nll"] + [f"nll_head{i}" for i in range(2, n + 1)]

    @classmethod
    def denominators(cls, batch):
        """What each loss term is averaged over: the real targets (not -100) of the whole batch, per head."""
        targets = batch["targets"]  # (B, n, T)
        return {name: int((targets[:, i] != -100).sum()) for i, name in enumerate(cls.names(targets.size(1)))}

    def loss(self, model, batch, denominators=None):
        denominators = denominators or self.denominators(batch)
        heads = batch["targets"]  # (B, n, T)
        # One call of the model's forward runs every head (DistributedDataParallel syncs gradients through the
        # wrapped module's forward only). The sequential modules read heads 1..D's targets: the true tokens ahead.
        logits, _ = model(batch["idx"], future=heads[:, :-1])  # (B, n, T, V)
        total, sums = 0.0, {}
        for i, name in enumerate(self.names(heads.size(1))):
            targets = heads[:, i]  # (B, T)
            nll = F.cross_entropy(logits[:, i].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                  reduction="sum")
            total = total + (1.0 if i == 0 else self.mtp_weight) * nll / max(1, denominators[name])
            sums[name] = nll.detach()
            if i:
                sums[f"tokens_head{i + 1}"] = (targets != -100).sum()
        sums.update(self.sums(sums["nll"], heads[:, 0]))  # the next token's tokens and bytes, as in a plain GPT
        return total, sums

    @staticmethod
    def summarize(sums):
        """Next-token loss and bits per byte, and head i's loss (nats/token) on the token i places ahead."""
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


Model.from_pretrained = gpt.GPT.from_pretrained  # --init-from a Hugging Face GPT-2 directory: GPT-2 has no heads


# ----------------------------------------------------------------------------------------------------------------------
# Measuring self-speculative decoding, and sampling with it from the command line


def speculate(model, tokens, prompts, prompt_len, new_tokens):
    """Self-speculative greedy decoding from `prompts` evenly spaced prompts of the text `tokens`: the acceptance rate
    (drafts kept / drafts made), per draft position (kept / checked), tokens per pass, and whether every output equals
    plain greedy decoding."""
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
