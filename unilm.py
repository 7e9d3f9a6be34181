"""
UniLM: one Transformer, three kinds of language model, chosen by the self-attention mask alone.

Paper
  - Dong et al. 2019, "Unified Language Model Pre-training for Natural Language Understanding and
    Generation" (UniLM v1). §2, Fig. 1: one shared BERT encoder; what a token may attend to makes it a
    bidirectional LM (every token sees every token), a unidirectional LM (left-to-right: a token sees
    itself and its left; right-to-left: its right) or a sequence-to-sequence LM (the source segment
    sees the source; a target token sees the source and the target on its left). Every kind is trained
    by the same cloze task: tokens are masked as BERT's 15% (80/10/10; 20% of the time a bigram or a
    trigram, not one token, §2.3) and predicted by the same head. The segment embeddings tell the
    model which LM it is (§2: "LM identifier"). §2.3: per batch, 1/3 bidirectional (with next sentence
    prediction), 1/3 sequence-to-sequence, 1/6 left-to-right, 1/6 right-to-left.
  Slides (lecture 001): "Transformers for pretraining" (UniLM with the encoder-decoders), the UniLM
  slide (Fig. 1's three masks). The encoder, masking and fine-tuning are bert.py's; this file adds the
  masks, the mix and the rows.

Run
  python train.py --model unilm                          # char UniLM on Shakespeare, CPU, minutes
  python train.py --model unilm --left-to-right 0 --right-to-left 0 --seq2seq 0   # BERT's rows only
  python unilm.py --ckpt out/unilm/ckpt.pt --prompt "ROMEO:"   # the same encoder generates, left to right
Fine-tune (train.py --task): BERT's way, bidirectional (the paper's NLU setting).

Legend
  B batch, T row length, V vocabulary; S a row's source length ([CLS] A [SEP]) in a seq2seq row.
  mask (B, T, T) bool: mask[b, i, j] = query i of row b may read key j.
"""

import argparse
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import bert
from common import command, require

LMS = ("bidirectional", "left-to-right", "right-to-left", "seq2seq")
# Segment ids per LM: (first segment, second). Bidirectional keeps BERT's 0/1, so fine-tuning reads BERT's layout.
TYPES = {"bidirectional": (0, 1), "left-to-right": (2, 2), "right-to-left": (3, 3), "seq2seq": (4, 5)}

# ----------------------------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class UniLMConfig(bert.BertConfig):
    type_vocab_size: int = 6  # the LM identifiers of TYPES
    bidirectional: float = 1 / 3  # §2.3's mix: the share of rows of each LM (normalised)
    left_to_right: float = 1 / 6
    right_to_left: float = 1 / 6
    seq2seq: float = 1 / 3
    ngram_prob: float = 0.2  # §2.3: 20% of the masking units are a bigram or a trigram, not one token

    def __post_init__(self):
        super().__post_init__()
        require(self.objective == "mlm+nsp", f"--objective {self.objective}: UniLM's rows are its own (mlm+nsp)")
        shares = self.mix
        require(min(shares) >= 0 and sum(shares) > 0,
                "--bidirectional, --left-to-right, --right-to-left, --seq2seq: shares >= 0, not all 0")
        require(self.type_vocab_size >= 6, f"--type-vocab-size {self.type_vocab_size}: UniLM needs 6 (TYPES)")
        require(0 <= self.ngram_prob <= 1, f"--ngram-prob {self.ngram_prob}: must be in [0, 1]")

    @property
    def mix(self):
        return [self.bidirectional, self.left_to_right, self.right_to_left, self.seq2seq]  # in LMS's order


Config = UniLMConfig

PRESETS = {
    # bert.py's quick start: the same encoder and recipe, UniLM's rows
    "char-cpu": {**bert.PRESETS["char-cpu"]},
    "tiny": {**bert.PRESETS["tiny"]},
}
DEFAULT_PRESET = "char-cpu"
SPECIAL_TOKENS, TOKEN_IDS = bert.SPECIAL_TOKENS, bert.TOKEN_IDS
Model = bert.BERT  # the model is BERT's: only the masks and rows are UniLM's

# ----------------------------------------------------------------------------------------------------------------------
# The three masks (Fig. 1)


def self_attention_mask(lm, source_len, real):
    """(B, T, T) bool, Fig. 1's masks. lm (B,) an index into LMS; source_len (B,) = S (seq2seq rows);
    real (B, T) 1 at real tokens. Keys are never padding; a padding query reads every real key (its
    output is never used; a row of nothing would be NaN).
    T = 4, S = 2, all real:   bidirectional   left-to-right   right-to-left   seq2seq
                              1111            1000            1111            1100
                              1111            1100            0111            1100
                              1111            1110            0011            1110
                              1111            1111            0001            1111"""
    T = real.size(1)
    i = torch.arange(T, device=real.device)[:, None]  # (T, 1) queries
    j = torch.arange(T, device=real.device)[None, :]  # (1, T) keys
    allowed = torch.stack([torch.ones(T, T, dtype=torch.bool, device=real.device), j <= i, j >= i])  # (3, T, T)
    mask = allowed[lm.clamp(max=2)]  # (B, T, T) the first three kinds
    s2s = (j < source_len[:, None, None]) | (j <= i)  # (B, T, T): the source, and the target's left
    mask = torch.where((lm == LMS.index("seq2seq"))[:, None, None], s2s, mask)
    key, query = real.bool()[:, None, :], real.bool()[:, :, None]  # (B, 1, T), (B, T, 1)
    return (mask & key) | (~query & key)

# ----------------------------------------------------------------------------------------------------------------------
# The objective: rows of each LM, BERT's masking in units of 1 to 3 tokens


class UniLMObjective(bert.PretrainingObjective):
    """Each row draws its LM from the mix. bidirectional: BERT's sentence pairs with next sentence
    prediction (B follows A half the time). seq2seq: a packed run of lines cut at a random token into
    source and target (the target always follows). left-to-right, right-to-left: one packed segment.
    Then BERT's masking on every row (both segments), the cloze loss on every kind, NSP on bidirectional rows."""

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.mix = torch.tensor(config.mix, dtype=torch.float)

    def _row(self, ix, lm, i, g, training):
        """(lm, a, b or None, NSP label or -100, next line, offset) from line i; None if no pair starts there."""
        if LMS[lm] == "bidirectional":
            pair = self._pair(ix, i, g, training)
            return None if pair is None else (lm, pair[0], pair[1], pair[2], max(pair[3], i + 1), 0)
        return (lm,) + self._packed_row(ix, lm, i, 0, g)

    def _packed_row(self, ix, lm, line, offset, g):
        ids, line, offset = self._packed(ix, line, offset)
        if LMS[lm] != "seq2seq":
            return ids, None, -100, line, offset
        ids = ids[:self.config.max_seq_length - 3]  # room for a second [SEP]
        if len(ids) < 2:
            return ids, None, -100, line, offset  # too short to cut: all source (every token sees all)
        cut = int(torch.randint(1, len(ids), (1,), generator=g))
        return ids[:cut], ids[cut:], -100, line, offset

    def train_batch(self, split, batch_size, generator):
        ix = self.index(split)
        require(ix.n_lines > 0, "the training split holds no text lines")
        lms = torch.multinomial(self.mix, batch_size, replacement=True, generator=generator).tolist()
        rows = []
        for lm in lms:
            row = None
            while row is None:
                row = self._row(ix, lm, int(torch.randint(ix.n_lines, (1,), generator=generator)), generator, True)
            rows.append(row[:4])
        return self._batch(rows, generator)

    def eval_batches(self, split, batch_size):
        """The whole split in order, each row's LM drawn from the mix by a generator seeded here."""
        ix, g = self.index(split), torch.Generator().manual_seed(bert.EVAL_SEED)
        rows, line, offset = [], 0, 0
        while line < ix.n_lines:
            lm = int(torch.multinomial(self.mix, 1, generator=g))
            if LMS[lm] == "bidirectional":
                row = self._row(ix, lm, line, g, training=False)
                if row is None:
                    line += 1
                    continue
                line, offset = row[4], 0
            else:
                row = (lm,) + self._packed_row(ix, lm, line, offset, g)
                line, offset = row[4], row[5]
            rows.append(row[:4])
            if len(rows) == batch_size:
                yield self._batch(rows, g)
                rows = []
        if rows:
            yield self._batch(rows, g)

    def _batch(self, rows, g):
        """rows of (lm, a, b or None, NSP label) -> [CLS] a [SEP] (b [SEP]), padded; segment ids
        from TYPES; BERT's masking. The (B, T, T) mask is built in loss() from lm and source_len."""
        T, B = self.config.max_seq_length, len(rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((B, T), dtype=torch.long)
        real = torch.zeros((B, T), dtype=torch.long)
        source_len = torch.zeros(B, dtype=torch.long)
        for r, (lm, a, b, _) in enumerate(rows):
            first, second = TYPES[LMS[lm]]
            ids = np.concatenate([[self.cls_id], a, [self.sep_id]])
            source_len[r] = len(ids)
            if b is not None:
                ids = np.concatenate([ids, b, [self.sep_id]])
            input_ids[r, :len(ids)] = torch.from_numpy(ids.astype(np.int64))
            token_type_ids[r, :len(ids)] = first
            token_type_ids[r, source_len[r]:len(ids)] = second
            real[r, :len(ids)] = 1
        masked, labels = self.mask_tokens(input_ids, real, g)
        return {"input_ids": masked, "token_type_ids": token_type_ids, "attention_mask": real, "labels": labels,
                "lm": torch.tensor([row[0] for row in rows]), "source_len": source_len,
                "next_sentence_label": torch.tensor([row[3] for row in rows])}

    def choose(self, candidates, k, g):
        """(B, T) bool: k[row] positions per row in units of one token, or (ngram_prob of the time) two
        or three consecutive candidates; a unit past the budget is cut. Units never overlap."""
        B, T = candidates.shape
        chosen = torch.zeros(B, T, dtype=torch.bool)
        for r in range(B):
            pos = candidates[r].nonzero()[:, 0]
            order = pos[torch.randperm(len(pos), generator=g)].tolist()
            units = torch.rand(len(order), generator=g).tolist()
            sizes = torch.randint(2, 4, (len(order),), generator=g).tolist()
            left, cand = int(k[r]), candidates[r].tolist()
            for start, u, n in zip(order, units, sizes):
                if left <= 0:
                    break
                if chosen[r, start]:
                    continue
                n = n if u < self.config.ngram_prob else 1
                for t in range(start, min(T, start + n)):
                    if left <= 0 or not cand[t] or chosen[r, t]:
                        break
                    chosen[r, t], left = True, left - 1
        return chosen

    def denominators(self, batch):
        return {"mlm": int((batch["labels"] != -100).sum()), "pair": int((batch["next_sentence_label"] != -100).sum())}

    def loss(self, model, batch, denominators=None):
        """(loss, sums): the cloze loss over every masked position of every LM + NSP over the bidirectional rows."""
        den = denominators or self.denominators(batch)
        labels, y = batch["labels"], batch["next_sentence_label"]
        chosen, bi = labels != -100, y != -100
        mask = self_attention_mask(batch["lm"], batch["source_len"], batch["attention_mask"])  # (B, T, T)
        mlm_logits, nsp_logits = model(batch["input_ids"], batch["token_type_ids"], mask, masked_positions=chosen)
        target = labels[chosen]  # (N,)
        nll = F.cross_entropy(mlm_logits.float(), target, reduction="none")  # (N,)
        pair_nll = F.cross_entropy(nsp_logits.float()[bi], y[bi], reduction="sum")
        loss = nll.sum() / max(1, den["mlm"]) + pair_nll / max(1, den["pair"])
        right = mlm_logits.argmax(-1) == target
        lm_of = batch["lm"][:, None].expand_as(labels)[chosen]  # (N,) each masked position's LM
        stats = {"mlm_nll": nll.sum().detach(), "masked": chosen.sum(), "mlm_correct": right.sum(),
                 "pair_nll": pair_nll.detach(), "rows": bi.sum(),
                 "pair_correct": (nsp_logits.argmax(-1) == y)[bi].sum()}
        for k, name in enumerate(LMS):
            stats[f"{name}_masked"], stats[f"{name}_correct"] = (lm_of == k).sum(), right[lm_of == k].sum()
        return loss, stats

    def summarize(self, sums):
        """loss = cloze + NSP, each term and its accuracy, and the cloze accuracy of each LM."""
        masked, rows = max(1.0, float(sums["masked"])), max(1.0, float(sums["rows"]))
        m = {"mlm_loss": float(sums["mlm_nll"]) / masked, "mlm_acc": float(sums["mlm_correct"]) / masked,
             "nsp_loss": float(sums["pair_nll"]) / rows, "nsp_acc": float(sums["pair_correct"]) / rows}
        for name in LMS:
            if float(sums[f"{name}_masked"]):
                m[f"{name.replace('-', '_')}_acc"] = float(sums[f"{name}_correct"]) / float(sums[f"{name}_masked"])
        return {"loss": m["mlm_loss"] + m["nsp_loss"], **m}


Objective = UniLMObjective
Classifier = bert.Classifier  # NLU: the bidirectional mask and BERT's head (§3.1, §3.2)

# ----------------------------------------------------------------------------------------------------------------------
# Generation with the same encoder: left to right, one [MASK] at a time (§2.1's unidirectional LM)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """[CLS] prompt [MASK] under the left-to-right mask: the [MASK]'s prediction is the next token; it
    replaces the [MASK], and a new [MASK] follows. -> the new ids. T <= max_position_embeddings."""
    cls, mask_id = tokenizer.specials["[CLS]"], tokenizer.specials["[MASK]"]
    ids, out = [cls, *prompt_ids], []
    lm = torch.tensor([LMS.index("left-to-right")])
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        row = torch.tensor([ids + [mask_id]], device=device)[:, -model.config.max_position_embeddings:]
        T = row.size(1)
        types = torch.full_like(row, TYPES["left-to-right"][0])
        mask = self_attention_mask(lm.to(device), torch.zeros(1, dtype=torch.long, device=device),
                              torch.ones_like(row))
        logits, _ = model(row, types, mask)  # (1, T, V)
        logits = logits[0, T - 1].float() / max(temperature, 1e-6)
        logits[list(tokenizer.specials.values())] = float("-inf")  # text only
        if top_k:
            logits[logits < logits.topk(min(top_k, logits.numel())).values[-1]] = float("-inf")
        nxt = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
        ids.append(nxt)
        out.append(nxt)
    model.train(was_training)
    return out


@dataclass
class DemoConfig(bert.DemoConfig):
    prompt: str = "ROMEO:"  # the prompt the run continues, left to right, when it ends
    max_new_tokens: int = 100  # 0: no generation


def demo(model, tokenizer, cfg, device):
    """Fill the masks (bidirectional), then continue cfg.prompt left to right: one encoder, both uses."""
    bert.demo(model, tokenizer, cfg, device)
    if cfg.max_new_tokens > 0:
        new = generate(model, tokenizer, tokenizer.encode(cfg.prompt), cfg.max_new_tokens, temperature=0.8,
                       top_k=20, generator=torch.Generator().manual_seed(0))
        print(cfg.prompt + tokenizer.decode(new))
        print("-" * 80)


@command
def main(argv=None):
    p = argparse.ArgumentParser(description="Continue a prompt left to right with a UniLM checkpoint written by "
                                            "train.py --model unilm (its bidirectional side: bert.py's fill).")
    p.add_argument("--ckpt", required=True, help="path to ckpt.pt (e.g. out/unilm/ckpt.pt)")
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    require(args.max_new_tokens >= 1 and args.temperature > 0, "--max-new-tokens >= 1 and --temperature > 0")
    import train

    device = train.pick_device(args.device)
    model, tokenizer, _ = train.load_for_inference(args.ckpt, device, flag="--ckpt", model="unilm")
    new = generate(model, tokenizer, tokenizer.encode(args.prompt), args.max_new_tokens, args.temperature,
                   args.top_k, torch.Generator().manual_seed(args.seed))
    print(args.prompt + tokenizer.decode(new))


if __name__ == "__main__":
    main()
