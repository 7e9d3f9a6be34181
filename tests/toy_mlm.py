"""A toy second model for train.py's tests, written only against train.py's documented interface: a one-block
bidirectional encoder trained by masked-token prediction. It needs from the loop what BERT, T5 and XLNet will: special
tokens ([MASK], [PAD]), padded rows with an attention mask, -100 labels, a different number of targets in every
micro-batch, metric names of its own (no bits per byte), and state across steps: each batch row reads its own stream
of consecutive segments (a cursor per row, as XLNet's memory needs), kept in the checkpoint through state_dict()."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SPECIAL_TOKENS = ("[MASK]", "[PAD]")
TOKEN_IDS = {"pad_token_id": "[PAD]"}  # config fields train.py fills from the tokenizer


@dataclass
class Config:
    block_size: int = 24  # longest row; rows are 12..24 real tokens, then padding
    vocab_size: int = 0  # set by train.py from the tokenizer
    n_embd: int = 32  # width
    n_head: int = 2  # attention heads
    mask_rate: float = 0.3  # share of real tokens to predict (at least one per row)
    pad_token_id: int = -1  # set by train.py: the id of [PAD]


PRESETS = {"tiny": dict(batch_size=4, max_iters=20, warmup_iters=2, eval_interval=10, lr=3e-3, eval_tokens=2048)}
DEFAULT_PRESET = "tiny"


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        # bias=False: the key bias gets a zero gradient up to float noise (softmax ignores a constant on every key's
        # score), which Adam turns into full-size steps of random sign; equivalence tests could not compare it
        self.block = nn.TransformerEncoderLayer(config.n_embd, config.n_head, 2 * config.n_embd, dropout=0.1,
                                                batch_first=True, bias=False)
        self.head = nn.Linear(config.n_embd, config.vocab_size)

    def no_weight_decay(self):
        return {"wpe.weight"}

    def forward(self, idx, attention_mask):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        return self.head(self.block(x, src_key_padding_mask=attention_mask == 0))


class Objective:
    def __init__(self, config, tokenizer):
        self.config = config
        self.mask_id, self.pad_id = tokenizer.specials["[MASK]"], config.pad_token_id
        self.raw_tokens_per_row = self.tokens_per_row = config.block_size
        self.cursors = None  # per row: where its stream continues

    def state_dict(self):
        return {"cursors": self.cursors}

    def load_state_dict(self, state):
        self.cursors = state["cursors"]

    def reset(self):
        self.cursors = None

    def train_batch(self, split, batch_size, generator):
        n, T = len(split.tokens), self.config.block_size
        if self.cursors is None:
            self.cursors = torch.randint(n - T, (batch_size,), generator=generator).tolist()
        lengths = torch.randint(T // 2, T + 1, (batch_size,), generator=generator).tolist()
        rows = []
        for i, length in enumerate(lengths):
            if self.cursors[i] + length > n:
                self.cursors[i] = 0
            rows.append(split.tokens[self.cursors[i]:self.cursors[i] + length])
            self.cursors[i] += length
        chosen = [torch.rand(len(r), generator=generator) < self.config.mask_rate for r in rows]
        return self._batch(rows, chosen)

    def eval_batches(self, split, batch_size):
        T = self.config.block_size
        starts = range(0, len(split.tokens) - T + 1, T)
        rows = [split.tokens[s:s + T] for s in starts]
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            yield self._batch(part, [torch.arange(len(r)) % 3 == 0 for r in part])

    def _batch(self, rows, chosen):
        B, T = len(rows), self.config.block_size
        input_ids = torch.full((B, T), self.pad_id)
        labels = torch.full((B, T), -100)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        for i, (r, c) in enumerate(zip(rows, chosen)):
            r = torch.from_numpy(np.asarray(r, dtype=np.int64))
            c = c.clone()
            c[0] = c[0] | ~c.any()  # at least one target per row
            input_ids[i, :len(r)] = torch.where(c, self.mask_id, r)
            labels[i, :len(r)] = torch.where(c, r, -100)
            attention_mask[i, :len(r)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    @staticmethod
    def count_tokens(batch):
        return int(batch["attention_mask"].sum())

    @staticmethod
    def denominators(batch):
        return {"mlm": int((batch["labels"] != -100).sum())}

    def loss(self, model, batch, denominators=None):
        denominators = denominators or self.denominators(batch)
        logits = model(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        real = labels != -100
        correct = (logits.argmax(-1) == labels)[real].sum()
        return nll / denominators["mlm"], {"nll": nll.detach(), "masked": real.sum(), "correct": correct}

    @staticmethod
    def summarize(sums):
        masked = float(sums["masked"])
        return {"loss": float(sums["nll"]) / masked, "acc": float(sums["correct"]) / masked}
