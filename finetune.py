"""
Adapting a pretrained model to a task: fine-tuning all of it, or a few new weights beside frozen ones.

    python train.py --model bert --task genre --init-from out/bert/ckpt.pt                 # full fine-tuning
    python train.py --model bert --task genre --init-from out/bert/ckpt.pt --peft lora     # LoRA, base frozen
    python train.py --model gpt --task next-line --init-from out/gpt/ckpt.pt --peft adapter --train-examples 1000

Each model file says how its paper fine-tunes it (its `Classifier`: GPT-1's linear head on the last
token, BERT's [CLS] through the pooler, ELECTRA's discriminator, T5's label words as text, XLNet's last
token summary). This file holds what every family shares:
  - the parameter-efficient methods, each wrapping what a model already has, so one code serves all five:
      LoRA (Hu et al. 2021, §4.1): W x + (alpha / r) B A x, B = 0 at the start, W frozen.
      Adapters (Houlsby et al. 2019, §2.1): after a sublayer's output projection, h + up(f(down(h))),
        a bottleneck started near the identity; the model frozen.
      A trained prefix of input embeddings (prompt tuning, Lester et al. 2021, §2): n vectors read
        before the text, the model frozen. (Li & Liang's prefix-tuning trains a key/value prefix in
        every layer instead; not built here.)
  - the fine-tuning objective the loop trains with (TaskObjective), on examples from tasks.py.
Legend: B batch, T tokens per row, C model width, r LoRA rank, m adapter bottleneck, P prompt vectors.
Slides (lecture 001): "Pretraining and fine-tuning", "Parameter-efficient fine-tuning" (#Param table).
"""

import fnmatch
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UsageError, require

PEFT = ("none", "lora", "adapter", "prefix")
TASK_FORMATS = ("classifier", "completion")  # --task-format: the family's head, or GPT-2's way

# ----------------------------------------------------------------------------------------------------------------------
# Parameter-efficient methods


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * x A^T B^T, with A (r, in) and B (out, r): a rank-r update of the frozen
    weight, learned as two thin matrices (Hu et al. 2021, eq. 3). B starts at 0, so training starts
    from the pretrained function exactly; A starts random (as nn.Linear's weights, the reference code's
    choice), so B's first gradient is not 0. Trainable: in*r + r*out numbers instead of in*out."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        require(r >= 1, f"LoRA rank {r}: must be at least 1")
        self.base, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T  # (..., in) -> (..., out)

    def merged(self):
        """A plain nn.Linear computing the same function: W + (alpha / r) B A. No extra cost at inference."""
        b = self.base
        lin = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None,
                        device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(b.weight + self.scaling * self.lora_B @ self.lora_A)
            if b.bias is not None:
                lin.bias.copy_(b.bias)
        return lin


class Adapter(nn.Module):
    """A sublayer's output projection, then Houlsby's bottleneck with a skip connection:
        h = base(x);  h + up(gelu(down(h)))     down: C -> m, up: m -> C
    Placed where Houlsby et al. put it (Fig. 2): after the projection, before the residual sum and the
    LayerNorm. Near-identity at the start: small random down, up = 0 (the output is exactly h; the
    paper uses small random weights for both, ~1e-2, "near-identity")."""

    def __init__(self, base: nn.Linear, size: int):
        super().__init__()
        require(size >= 1, f"adapter size {size}: must be at least 1")
        self.base = base
        base.requires_grad_(False)
        C, w = base.out_features, base.weight
        self.down = nn.Linear(C, size, device=w.device, dtype=w.dtype)
        self.up = nn.Linear(size, C, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = self.base(x)  # (..., C)
        return h + self.up(F.gelu(self.down(h)))


class PromptEmbedding(nn.Module):
    """A frozen token embedding and P trained vectors, looked up by ids past its table: id V + k
    (V = rows of the table) reads vector k. The task objective writes ids V..V+P-1 where the family
    reads a prefix (before the text; after [CLS] for BERT and ELECTRA, whose [CLS] the head reads).
    Ids never reach the table's end by accident: no tokenizer makes them. Vectors start as copies of
    random rows of the table (Lester et al. §2.2 found sampled vocabulary better than random noise)."""

    def __init__(self, base: nn.Embedding, n_tokens: int, generator=None):
        super().__init__()
        require(n_tokens >= 1, f"prefix of {n_tokens} vectors: must be at least 1")
        self.base, self.first_id = base, base.num_embeddings
        base.requires_grad_(False)
        rows = torch.randint(base.num_embeddings, (n_tokens,), generator=generator)
        self.prompt = nn.Parameter(base.weight.detach()[rows].clone())  # (P, C)

    @property
    def weight(self):  # GPT's output layer and BERT's MLM head read the (tied) table through this name
        return self.base.weight

    def forward(self, ids):
        virtual = ids >= self.first_id  # (B, T) prompt positions
        x = self.base(ids.clamp(max=self.first_id - 1))  # (B, T, C)
        p = self.prompt[(ids - self.first_id).clamp(min=0, max=len(self.prompt) - 1)]  # (B, T, C)
        return torch.where(virtual[..., None], p.to(x.dtype), x)


def _replace(root, path, make):
    """Swap the submodule at dotted `path` for make(old). _replace(m, "h.0.attn.c_attn", f)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, make(getattr(parent, name)))


def matching(model, patterns, kind):
    """Dotted names of the `kind` modules matching one of the glob `patterns` ("*" spans dots).
    matching(gpt, ["*.attn.c_attn"], nn.Linear) -> ["transformer.h.0.attn.c_attn", ...]"""
    return [n for n, m in model.named_modules()
            if isinstance(m, kind) and any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def apply_peft(classifier, method, r=8, alpha=16.0, adapter_size=16, prompt_tokens=8, generator=None):
    """Freeze the pretrained model inside `classifier` and add `method`'s weights (in place); the
    task head stays trainable. The family says where: Classifier.LORA (the projections LoRA adapts:
    queries and values, as Hu et al. §7.1 found best per parameter), .ADAPTER (the two sublayer
    outputs), .EMBEDDING (the token table the prompt extends). Returns the trainable count."""
    require(method in PEFT, f"--peft {method!r}: choose one of {', '.join(PEFT)}")
    if method == "none":
        return trainable(classifier)
    base = classifier.pretrained
    base.requires_grad_(False)
    if method == "lora":
        names = matching(base, classifier.LORA, nn.Linear)
        for n in names:
            _replace(base, n, lambda lin: LoRALinear(lin, r, alpha))
    elif method == "adapter":
        names = matching(base, classifier.ADAPTER, nn.Linear)
        for n in names:
            _replace(base, n, lambda lin: Adapter(lin, adapter_size))
    else:
        names = [classifier.EMBEDDING]
        _replace(base, classifier.EMBEDDING, lambda emb: PromptEmbedding(emb, prompt_tokens, generator))
        first = base.get_submodule(classifier.EMBEDDING).first_id
        classifier.prompt_ids = list(range(first, first + prompt_tokens))
    if not names:
        raise UsageError(f"--peft {method}: {type(base).__name__} has no layer named "
                         f"{classifier.LORA if method == 'lora' else classifier.ADAPTER}")
    return trainable(classifier)


def merge_lora(model):
    """Every LoRALinear replaced by its merged nn.Linear (in place): a plain model again, with the
    pretrained parameter names, which exports as the base model does. Returns the model."""
    for n in matching(model, ["*"], LoRALinear):
        _replace(model, n, lambda m: m.merged())
    return model


def trainable(model):
    """(trainable, total) parameter counts, shared tensors once: the slide's #Param column."""
    seen, train, total = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            train += p.numel() if p.requires_grad else 0
    return train, total


# ----------------------------------------------------------------------------------------------------------------------
# The examples, as the loop sees a split; and the fine-tuning objective


class Examples:
    """A task's labelled examples, tokenized: a and b (lists of id arrays; b None for one text),
    labels. The loop counts and slices splits by tokens (eval views, checks): `tokens` is every
    example's tokens end to end, and slice(i, j) keeps the examples that start in [i, j)."""

    def __init__(self, name, a, b, labels, works):
        self.name, self.a, self.b, self.labels, self.doc_names = name, a, b, np.asarray(labels), works
        lengths = [len(x) + (len(y) if b is not None else 0) for x, y in zip(a, b or a)]
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.tokens = np.zeros(int(sum(lengths)), dtype=np.int32)  # only its length is read
        self.n_bytes = 0

    def __len__(self):
        return len(self.labels)

    def slice(self, start, end):
        keep = np.nonzero((self.starts >= start) & (self.starts < end))[0]
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]
        return Examples(self.name, pick(self.a), pick(self.b), self.labels[keep], self.doc_names)


def tokenize(task, tokenizer, train_examples=None):
    """{"train", "val", "test"}: the task's examples as Examples (val = the dev works)."""
    enc = lambda text: np.asarray(tokenizer.encode(text), dtype=np.int64)
    splits = {}
    for part, exs in (("train", task.train_set(train_examples or None)), ("val", task.dev), ("test", task.test)):
        works = sorted({ex.work for ex in exs})
        b = [enc(ex.b) for ex in exs] if task.pair else None
        splits[part] = Examples(part, [enc(ex.a) for ex in exs], b, [ex.label for ex in exs], works)
    return splits


EVAL_SEED = 1234


class TaskObjective:
    """Batches of labelled examples in the family's input layout; the loss and accuracy its
    Classifier computes. The loop's interface (train.py's header): rows are examples, not windows."""

    def __init__(self, classifier, max_len, pad_id):
        self.classifier, self.max_len, self.pad_id = classifier, max_len, pad_id
        self.raw_tokens_per_row = 1  # a split needs one token per example at least
        self.tokens_per_row = max_len  # the most a row holds (tokens/s counts real ones)
        self.prompt = list(getattr(classifier, "prompt_ids", []))
        # tokens left for the text, one text or two: max_len less the layout's special tokens and the prompt
        self.room = {pair: max_len - len(classifier.encode([], [] if pair else None)[0]) - len(self.prompt)
                     for pair in (False, True)}

    def describe(self):
        c = self.classifier
        return f"fine-tuning: {type(c).__module__}.{type(c).__name__}, {len(c.labels)} labels ({', '.join(c.labels)})"

    def row(self, a, b):
        """One example in the family's layout, cut to max_len: the longer text loses its end first."""
        prompt, room = self.prompt, self.room[b is not None]
        require(room >= 2, f"--block-size {self.max_len}: no room for the text beside the "
                           f"{self.max_len - room} special and prompt tokens")
        a, b = list(a), (None if b is None else list(b))
        while len(a) + (len(b) if b is not None else 0) > room:
            if b is not None and len(b) > len(a):
                b.pop()
            else:
                a.pop()
        ids, types = self.classifier.encode(a, b)
        at = self.classifier.PROMPT_AT
        return ids[:at] + prompt + ids[at:], types[:at] + [types[at]] * len(prompt) + types[at:]

    def batch(self, split, idx):
        rows = [self.row(split.a[i], None if split.b is None else split.b[i]) for i in idx]
        T = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for n, (ids, tt) in enumerate(rows):  # right-padded; the mask says which are real
            input_ids[n, :len(ids)], types[n, :len(ids)], mask[n, :len(ids)] = \
                torch.tensor(ids), torch.tensor(tt), 1
        return {"input_ids": input_ids, "token_type_ids": types, "attention_mask": mask,
                "labels": torch.as_tensor(split.labels[idx], dtype=torch.long)}

    def train_batch(self, split, batch_size, generator):
        return self.batch(split, torch.randint(len(split), (batch_size,), generator=generator).numpy())

    def eval_batches(self, split, batch_size):
        for i in range(0, len(split), batch_size):
            yield self.batch(split, np.arange(i, min(i + batch_size, len(split))))

    @staticmethod
    def count_tokens(batch):
        return int(batch["attention_mask"].sum())

    @staticmethod
    def denominators(batch):
        return {"loss": len(batch["labels"])}

    def loss(self, model, batch, denominators=None):
        """Mean over the step's examples of the family's per-example loss; sums for accuracy."""
        den = (denominators or self.denominators(batch))["loss"]
        per_row, pred = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                              batch["labels"])  # (B,), (B,)
        loss = per_row.sum() / den
        return loss, {"loss": per_row.detach().float().sum(), "correct": (pred == batch["labels"]).sum(),
                      "n": len(batch["labels"])}

    @staticmethod
    def summarize(sums):
        n = max(sums["n"], 1)
        return {"loss": sums["loss"] / n, "acc": sums["correct"] / n}


class Completion(nn.Module):
    """GPT-2's way (Radford et al. 2019, §2): no new layer, the task is text to continue. A row is the
    example, then a task token ("genre:"), then the label's word; fine-tuning trains the LM loss on
    the word's tokens only. Prediction scores every label's word after the row and picks the most
    likely (mean log-probability per token, as GPT-3 ranks multiple-choice completions, §2.4).
    shots: labelled examples read first, each with its answer: few-shot prompting, no gradient
    (GPT-3 §2). For any left-to-right LM of the suite (family.CAUSAL_LM); PEFT globs are family's.
      row:  <eot> A (<eot> B) " genre:" | " tragedy"   <- loss / score on the word after "|"
    forward(...) -> (per-example loss (B,), predicted label (B,)): TaskObjective's interface."""

    def __init__(self, model, task, labels, tokenizer, family, shots=()):
        super().__init__()
        require(getattr(family, "CAUSAL_LM", False), f"--task-format completion: {family.__module__} "
                "is no left-to-right LM (GPT-2's way needs one); use --task-format classifier")
        self.pretrained, self.labels, self.eot = model, labels, tokenizer.specials["<|endoftext|>"]
        self.LORA, self.ADAPTER, self.EMBEDDING, self.PAD = family.LORA, family.ADAPTER, family.EMBEDDING, family.PAD
        self.PROMPT_AT = 0
        self.cue = tokenizer.encode(f" {task}:")  # the task token(s)
        self.words = [tokenizer.encode(f" {w}") for w in labels]
        self.max_len = model.config.block_size - max(map(len, self.words))  # the word must fit after the row
        # few-shot: each demonstration is a row with its answer, read before the example
        self.prompt_ids = [i for a, b, y in shots for i in [*self.encode(a, b)[0], *self.words[y]]]

    def encode(self, a, b=None):
        """The row without its answer: encode([7], [9]) -> ([e, 7, e, 9, *cue], [0] * (4 + len(cue)))."""
        ids = [self.eot, *a, *([self.eot, *b] if b is not None else []), *self.cue]
        return ids, [0] * len(ids)

    def forward(self, input_ids, token_type_ids, attention_mask, labels):
        B, T = input_ids.shape
        n = attention_mask.sum(1)  # (B,) real tokens: the word starts at position n
        nll = []  # per label: (B,) mean negative log-probability of its word after the row
        for word in self.words:
            L, w = len(word), torch.tensor(word, device=input_ids.device)
            ids = torch.cat([input_ids, input_ids.new_full((B, L), self.eot)], 1)  # (B, T + L)
            at = n[:, None] + torch.arange(L, device=ids.device)  # (B, L) the word's positions
            ids = ids.scatter(1, at, w.expand(B, L))
            targets = torch.full_like(ids, -100).scatter(1, at - 1, w.expand(B, L))  # predicted one before
            logits = self.pretrained(ids[:, :-1])[0]  # (B, T + L - 1, V)
            loss = F.cross_entropy(logits.float().transpose(1, 2), targets[:, :-1], ignore_index=-100,
                                   reduction="none")  # (B, T + L - 1), 0 off the word
            nll.append(loss.sum(1) / L)
        nll = torch.stack(nll, 1)  # (B, n_labels)
        return nll.gather(1, labels[:, None])[:, 0], nll.argmin(1)


def for_task(mod, model, task, labels, tokenizer, cfg):
    """(classifier with cfg.peft applied, its TaskObjective, a line for the log): what the loop
    trains when --task is given. The family's Classifier wraps the pretrained model."""
    require(hasattr(mod, "Classifier"), f"--task: {mod.__name__} has no Classifier (no fine-tuning head)")
    if cfg.task_format == "completion":
        classifier = Completion(model, task, labels, tokenizer, mod.Classifier)
    else:
        classifier = mod.Classifier(model, task, labels, tokenizer)
    if cfg.lm_weight:
        require(hasattr(classifier, "lm_weight"), f"--lm-weight: {cfg.model} has no auxiliary LM loss (GPT's)")
        classifier.lm_weight = cfg.lm_weight
    g = torch.Generator().manual_seed(cfg.seed)
    n_train, n_total = apply_peft(classifier, cfg.peft, cfg.lora_r, cfg.lora_alpha, cfg.adapter_size,
                                  cfg.prompt_tokens, g)
    line = f"--peft {cfg.peft}: {n_train:,} of {n_total:,} parameters trained ({n_train / n_total:.2%})"
    objective = TaskObjective(classifier, classifier.max_len, tokenizer.specials[classifier.PAD])
    return classifier, objective, line
