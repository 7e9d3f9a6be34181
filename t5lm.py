"""
T5's decoder-only rows under its denoising objective: one stack of GPT-2 blocks reads the corrupted text and then
writes its targets, in one sequence, with a language model's mask or a prefix LM's.

Paper
  - Raffel et al. 2020 (T5). §3.2.1: a decoder-only model does a text-to-text task by reading the input and the
    target concatenated. §3.2.2, Fig. 4: the language model's causal mask; the prefix LM's, which lets every
    position read the input both ways. §3.2.3: the denoising objective adapted to these two by that concatenation.
    Table 2: the rows "Language model" (74.70 GLUE) and "Prefix LM" (81.82) under "Denoising".
  Slides (lecture 001): T5's architectures table. The stack and its masks are gpt.py's (gpt.prefix_lm_mask); the
  corruption is t5.py's (DenoisingObjective, unchanged: the same rows as the encoder-decoder at the same seed).
  This file only joins each row's input and targets.

Run
  python train.py --model t5lm --noise-mask iid               # "Language model", T5's i.i.d. span corruption
  python train.py --model t5lm --noise-mask iid --prefix-lm   # "Prefix LM"; each run ends filling T5's example
  python t5lm.py --ckpt out/t5lm/ckpt.pt "Thank you <X> me to your party <Y> week."   # fill spans (t5.py's CLI)
  python tables.py t5-architectures                            # both beside the encoder-decoders, scored downstream
Fine-tune (train.py --task): GPT-1's way (gpt.Classifier), as the table's other decoder-only rows, on at most
inputs_length tokens of the example: what the encoder-decoder rows' encoder reads.

Legend (besides gpt.py's B, T, C, V)
  S a row's corrupted input and its </s>; U its targets and their </s>; T = block_size >= S + U - 1 positions.
  T5's Fig. 2, one row:   Thank you <X> me to your party <Y> week . </s> <X> for inviting <Y> last <Z> </s>
  Language model: every next token is a target. Prefix LM: the S input tokens read each other both ways, so
  only the targets' tokens are predicted (an input token is visible to the position that would predict it).
  Which tokens the language model's row is scored on, §3.2 does not say: ours, every one, as a language model is
  trained; the prefix LM cannot be scored on its input.
"""

from dataclasses import dataclass, field

import torch

import gpt
import t5
from common import require

# ----------------------------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class T5LMConfig(gpt.GPTConfig):
    block_size: int = 0  # T: positions; 0 = S + U - 1, the longest row the objective builds
    # T5's corruption, as t5.T5Config's fields of the same names (checked there)
    objective: str = field(default="replace-spans", metadata={"help": " | ".join(t5.OBJECTIVES)})
    noise_density: float = 0.15  # share of tokens corrupted (T5: 0.15)
    mean_noise_span_length: float = 3.0  # T5: 3; 1 = single tokens
    noise_mask: str = "auto"  # auto: T5's for the objective | iid: each token on its own (Table 2) | spans
    inputs_length: int = 128  # S at most: the corrupted input with its </s> (T5: 512)
    pad_token_id: int = 0  # set by train.py from the tokenizer: <pad> fills a row after its targets
    eos_token_id: int = 1  # </s>, ending the input and the targets

    def __post_init__(self):
        _, S, U = t5.row_lengths(self.t5_config())  # t5.T5Config checks the corruption's fields
        self.block_size = self.block_size or S + U - 1
        require(self.block_size >= S + U - 1, f"--block-size {self.block_size}: a row of {S} input and {U} target "
                f"tokens needs {S + U - 1} positions (0 = that many)")
        super().__post_init__()

    def t5_config(self):
        """The corruption's settings as T5's config: t5.DenoisingObjective reads them from there."""
        return t5.T5Config(objective=self.objective, noise_density=self.noise_density,
                           mean_noise_span_length=self.mean_noise_span_length, noise_mask=self.noise_mask,
                           inputs_length=self.inputs_length, pad_token_id=self.pad_token_id,
                           eos_token_id=self.eos_token_id, decoder_start_token_id=self.pad_token_id)


Config = T5LMConfig

PRESETS = {
    # gpt.py's quick start on T5's char-cpu rows (128 inputs) and evaluation (the first 100,000 val tokens: the
    # text T5's rows are scored on). With i.i.d. noise U = S, so T = 255 positions, about 160 of them real (the
    # encoder-decoder's decoder pads its 128 target slots alike).
    "char-cpu": {**gpt.PRESETS["char-cpu"], "block_size": 0, "inputs_length": 128, "eval_tokens": 100_000},
    "tiny": {**gpt.PRESETS["tiny"], "block_size": 0, "inputs_length": 32, "eval_tokens": 4096,
             "eval_train_tokens": 4096},
}
DEFAULT_PRESET = "char-cpu"
SPECIAL_TOKENS = t5.SPECIAL_TOKENS  # <pad>, </s> and the sentinels, as T5's vocabulary has them
TOKEN_IDS = {"pad_token_id": "<pad>", "eos_token_id": "</s>"}


class T5LM(gpt.GPT):
    """GPT-2's stack, unchanged: only the rows are T5's. write_targets: what it writes after a corrupted input."""

    @torch.no_grad()
    def write_targets(self, ids, max_new_tokens, temperature=0.0, top_k=None, generator=None):
        """ids (1, S): a corrupted input ending with </s> -> (new ids,): the targets, up to </s> or the row's end.
        The row grows a token at a time and is read whole at each step: gpt.py's KV cache is causal, and the
        prefix LM reads its input both ways (the prompt is its prefix). t5.fill_spans calls it for the demo."""
        S, was_training = ids.size(1), self.training
        prefix = torch.tensor([S], device=ids.device) if self.config.prefix_lm else None
        self.eval()
        for _ in range(min(max_new_tokens, self.config.block_size - S)):
            logits, _ = self(ids, prefix_len=prefix)  # (1, T, V)
            ids = torch.cat([ids, gpt.sample_next(logits[:, -1].float(), temperature, top_k, generator=generator)], 1)
            if ids[0, -1] == self.config.eos_token_id:
                break
        self.train(was_training)
        return ids[0, S:]


Model = T5LM
DemoConfig, demo = t5.DemoConfig, t5.demo  # the end of a run: T5's texts, their spans filled (t5.fill_spans)

# ----------------------------------------------------------------------------------------------------------------------
# The objective: T5's rows, joined


class DenoisingLMObjective(gpt.NextTokenObjective):
    """t5.DenoisingObjective's batches, each row's input and targets joined into one sequence; gpt.py's
    next-token loss on it. Metrics: loss (nats per predicted token) and bits per byte, as gpt.py's (a sentinel
    counts as the bytes of its text, <extra_id_0>: compare bits per byte between t5lm runs only)."""

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.t5 = t5.DenoisingObjective(config.t5_config(), tokenizer)  # the corruption: T5's, unchanged
        self.raw_tokens_per_row = self.t5.raw_tokens_per_row
        self.pad = config.pad_token_id

    def describe(self):
        mask = "the input read both ways (prefix LM)" if self.prefix_lm else "causal (language model)"
        return f"{self.t5.rows('input', 'target')}, joined into rows of {self.block_size}; {mask}"

    def join(self, batch):
        """A T5 batch (t5.DenoisingObjective.collate) -> gpt.py's: input then targets, next-token targets.
        input_ids [[7, 8, 90, 1]], labels [[90, 9, 1]] (1 = </s>, 90 a sentinel), block_size 7 ->
        idx [[7, 8, 90, 1, 90, 9, pad]], targets [[8, 90, 1, 90, 9, 1, -100]]; the prefix LM's:
        targets [[-100, -100, -100, 90, 9, 1, -100]], prefix_len [4]"""
        B, T = batch["input_ids"].size(0), self.block_size
        S = batch["attention_mask"].sum(1)  # (B,) real input tokens, </s> included
        idx = torch.full((B, T), self.pad, dtype=torch.long)
        targets = torch.full((B, T), -100, dtype=torch.long)
        for b in range(B):
            row = torch.cat([batch["input_ids"][b, :S[b]], batch["labels"][b][batch["labels"][b] != -100]])
            idx[b, :len(row) - 1], targets[b, :len(row) - 1] = row[:-1], row[1:]
        if not self.prefix_lm:
            return {"idx": idx, "targets": targets}
        inside = torch.arange(T)[None, :] < S[:, None] - 1  # (B, T): the target is an input token
        return {"idx": idx, "targets": targets.masked_fill(inside, -100), "prefix_len": S}

    def train_batch(self, split, batch_size, generator):
        return self.join(self.t5.train_batch(split, batch_size, generator))

    def eval_batches(self, split, batch_size):
        for batch in self.t5.eval_batches(split, batch_size):
            yield self.join(batch)

    def count_tokens(self, batch):
        return int((batch["idx"] != self.pad).sum())  # real tokens, not the row's padding


Objective = DenoisingLMObjective

# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning: GPT-1's head on what the encoder-decoder's encoder would read


class Classifier(gpt.Classifier):
    """gpt.Classifier on at most inputs_length tokens: the view of the example the encoder-decoder rows of T5's
    table get. The whole pretraining row (block_size, up to twice that) would be an advantage no objective earned."""

    def __init__(self, model, task, labels, tokenizer, lm_weight=0.0):
        super().__init__(model, task, labels, tokenizer, lm_weight)
        self.max_len = min(self.max_len, model.config.inputs_length)


if __name__ == "__main__":
    t5.main()  # t5.py's span filler reads a t5lm checkpoint too
