"""
ELECTRA: replaced-token detection. A small generator fills masked positions. A discriminator labels
each token original or replaced. So the loss covers all tokens, not the 15% a masked LM scores.

Paper
  - Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than
    Generators". Method: §2, Fig. 2, loss min L_MLM + lambda L_Disc, lambda = 50. §3.2: the two
    networks share the embeddings, token and position; generators of 1/4 to 1/2 the
    discriminator's size work best (Fig. 3). Hyper-parameters: App. A, Table 6.
  - The released code (github.com/google-research/electra: run_pretraining.py,
    pretrain/pretrain_helpers.py) fixes what the paper leaves open. 85% of the chosen positions
    get [MASK], 15% keep their token (no random tokens). The generator's size multiplier scales
    its hidden size (FFN 4x hidden, a head per 64). "Replaced" = masked AND the sample differs.
  Slide (lecture 001): "Discriminative training" (loss on all tokens, not just the masked ones;
  ELECTRA). Its masked LM is bert.py's ("Masked language models (MLMs)").

Both networks are bert.py's Encoder (imported, not copied): post-LN BERT layers. They share one
Embeddings module (word, position, token type, embedding LayerNorm). Each has an
`embeddings_project` if its hidden size differs from the embedding size. Loads and exports
Hugging Face's ElectraForMaskedLM (generator) + ElectraForPreTraining (discriminator) pairs;
tests/test_electra.py checks both against transformers.

Run
  python train.py --model electra                # char-level ELECTRA on Shakespeare, CPU, minutes
  python electra.py --ckpt out/electra/ckpt.pt "Friends, Romans, countrymen, lend me your ears"
  python electra.py --ckpt out/electra/ckpt.pt --as-is "Friends, Romans, countrymen, lend me your cars"
  The first corrupts the text, then flags. --as-is flags the text as given.

Legend
  B batch size, T sequence length, C hidden size (discriminator), C_g the generator's, E embedding
  size, V vocabulary, N masked positions in a batch. input_ids etc. (B, T) as in bert.py.
"""

import argparse
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import bert
from common import UsageError, command, require
from hf_io import copy_weights, write_hf_dir

# ----------------------------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class ElectraConfig:
    vocab_size: int = 30522  # V (train.py overwrites it from the tokenizer it builds)
    hidden_size: int = 256  # C: the discriminator's width
    num_hidden_layers: int = 12  # L: both networks have this depth
    num_attention_heads: int = 4  # the discriminator's heads
    intermediate_size: int = 1024  # the discriminator's feed-forward width
    embedding_size: int = 128  # E, shared by both networks; 0 = hidden_size. Small: 128 < C = 256
    max_position_embeddings: int = 512  # rows of the learned position table
    type_vocab_size: int = 2  # segment embeddings, as in BERT
    generator_size: float = 0.25  # C_g / C (Small: 1/4). Its FFN is 4 C_g, one head per 64
    generator_heads: int = 0  # 0 = that rule; else a released generator's own config.json says
    generator_intermediate_size: int = 0  # 0 = 4 C_g; else as its config.json says
    disc_weight: float = 50.0  # lambda: weight of the discriminator's loss (ELECTRA §2)
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and sub-layer outputs
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    layer_norm_eps: float = 1e-12  # BERT's value
    attn: str = "sdpa"  # "naive" | "sdpa" (bert.py's two attention paths)
    max_seq_length: int = 128  # tokens per training row, [CLS] and [SEP] included
    mask_prob: float = 0.15  # share of text tokens the generator must fill (Small and Base: 15%)
    mask_token_prob: float = 0.85  # of those, -> [MASK]; the rest keep their token (released code)
    random_token_prob: float = 0.0  # no random tokens: the generator provides the replacements
    pad_token_id: int = 0  # [PAD] (train.py sets the [SPECIAL] ids from the tokenizer)
    mask_token_id: int = -1  # [MASK]
    cls_token_id: int = -1  # [CLS]
    sep_token_id: int = -1  # [SEP]

    # bert.PretrainingObjective also reads these. Rows: RoBERTa-style packed full sentences.
    objective = "mlm"
    span_boundary = False
    short_seq_prob = 0.0
    static_masks = 0  # dynamic masking, as ELECTRA's own pipeline
    doc_sentences = False

    def __post_init__(self):
        require(self.embedding_size >= 0, f"--embedding-size {self.embedding_size}: must be >= 0 (0 = --hidden-size)")
        require(0 < self.generator_size <= 1, f"--generator-size {self.generator_size}: must be in (0, 1]")
        require(self.generator_heads >= 0 and self.generator_intermediate_size >= 0,
                "--generator-heads and --generator-intermediate-size must be >= 0 (0 = ELECTRA's rule)")
        # BERT's checks: heads divide the width, lengths fit, ...
        self.discriminator_config(), self.generator_config()

    def _bert(self, **kw):
        fields = {k: v for k, v in asdict(self).items() if k in bert.BertConfig.__dataclass_fields__}
        return bert.BertConfig(**{**fields, "embedding_size": self.embedding_size or self.hidden_size, **kw})

    def discriminator_config(self):
        return self._bert()

    def generator_config(self):
        """ELECTRA's get_generator_config: hidden size scaled, FFN 4x hidden, one head per 64
        (unless generator_heads / generator_intermediate_size say otherwise)."""
        h = int(round(self.hidden_size * self.generator_size))
        return self._bert(hidden_size=h, intermediate_size=self.generator_intermediate_size or 4 * h,
                          num_attention_heads=self.generator_heads or max(1, h // 64))


Config = ElectraConfig

# ELECTRA's recipe (App. A, Table 6; the released configure_pretraining.py): Adam lr 5e-4 (Small),
# beta2 0.999, epsilon 1e-6, weight decay 0.01. 10k warm-up steps, then linear decay to 0.
# Dropout 0.1. Batch: 128 sequences of 128 tokens. 1M steps.
PRESETS = {
    # The quick start (README path 7): character-level ELECTRA on a laptop CPU in minutes. The
    # discriminator is bert.py's char-cpu model. A short run needs (2-core CPU, README errata):
    # - lr 5e-4 (Small's). At 1e-3 the discriminator collapsed to always "original", for good.
    # - 64-character rows: twice the steps in the same time. The discriminator first sits at that
    #   trivial answer for hundreds of steps.
    # - a generator 1/8 of the discriminator (Small: 1/4). Its samples are easier to spot: after
    #   2,000 steps the discriminator caught 6.5% of the replaced characters (1/4: 1.5%). Dropout 0.
    "char-cpu": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, embedding_size=0, generator_size=0.125,
                     max_position_embeddings=128, max_seq_length=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn="naive", tokenizer="char",
                     batch_size=32, lr=5e-4, min_lr=5e-5, warmup_iters=100, max_iters=2400,
                     eval_interval=600, eval_tokens=131072, weight_decay=0.01, beta2=0.99),
    # For tests and for trying flags in seconds.
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 embedding_size=16, max_position_embeddings=64, max_seq_length=64,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, batch_size=8,
                 max_iters=20, warmup_iters=5, eval_interval=10, eval_tokens=4096, lr=1e-3,
                 flag_text="lend me your ears; I come to bury Caesar"),
    # The paper's ELECTRA-Small (14M; Table 6 and configure_pretraining.py's defaults): 12 layers,
    # hidden 256, 4 heads, FFN 1024, embeddings 128, a generator 1/4 as wide (hidden 64, 1 head),
    # 1M steps. Not the released checkpoint: see electra-small++ below.
    # Vocabulary: BERT's 30,522 = our BPE's 30,518 + [CLS] [SEP] [MASK] [PAD].
    "electra-small": dict(hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                          intermediate_size=1024, embedding_size=128, generator_size=0.25,
                          max_position_embeddings=512, max_seq_length=128, hidden_dropout_prob=0.1,
                          attention_probs_dropout_prob=0.1, tokenizer="bpe", vocab_size=30518,
                          lr=5e-4, min_lr=0.0, schedule="linear", warmup_iters=10_000,
                          max_iters=1_000_000, weight_decay=0.01, beta2=0.999, adam_eps=1e-6,
                          grad_clip=1.0, batch_size=128, eval_interval=10_000),
}
# The released ELECTRA-Small (google/electra-small-generator and -discriminator) is the paper's
# ELECTRA-Small++. Its README says what differs: the generator is as large as the discriminator
# ("generator_hidden_size": 1.0: hidden 256, 4 heads, FFN 1024), and it trained for 4M steps.
# Its data (the larger XLNet corpus) is not ours; everything else is kept from electra-small.
PRESETS["electra-small++"] = {**PRESETS["electra-small"], "generator_size": 1.0, "max_iters": 4_000_000}
DEFAULT_PRESET = "char-cpu"

SPECIAL_TOKENS = bert.SPECIAL_TOKENS
TOKEN_IDS = bert.TOKEN_IDS

# ----------------------------------------------------------------------------------------------------------------------
# The two networks


class Generator(nn.Module):
    """A small MLM (§2): bert.py's Encoder at C_g, then BERT's MLM head: dense C_g -> E, GELU,
    LayerNorm, the shared word embeddings transposed + a bias. Hugging Face: ElectraForMaskedLM."""

    def __init__(self, config, embeddings):
        super().__init__()
        self.encoder = bert.Encoder(config, embeddings)
        self.head = bert.MLMHead(config)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, masked_positions=None):
        """-> (B, T, V) logits; with masked_positions (B, T) bool, (N, V) at those only."""
        h = self.encoder(input_ids, token_type_ids, attention_mask)  # (B, T, C_g)
        if masked_positions is not None:
            h = h[masked_positions]  # (N, C_g)
        return self.head(h, self.encoder.embeddings.word_embeddings.weight)


class Discriminator(nn.Module):
    """bert.py's Encoder, then a per-token binary classifier: dense C -> C, GELU, dense C -> 1.
    A logit > 0 means "this token was replaced". Hugging Face: ElectraForPreTraining."""

    def __init__(self, config, embeddings):
        super().__init__()
        self.encoder = bert.Encoder(config, embeddings)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.gelu = nn.GELU()
        self.dense_prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        """-> (B, T) logits of "replaced"."""
        h = self.encoder(input_ids, token_type_ids, attention_mask)  # (B, T, C)
        return self.dense_prediction(self.gelu(self.dense(h))).squeeze(-1)


def sample_categorical(logits, uniform):
    """One token per row of logits (N, V), drawn from softmax(logits): the first id whose cumulative
    probability exceeds the row's uniform number (uniform: (N,)). An exact categorical sample, as
    the released code's Gumbel-max trick, and reproducible from `uniform` alone.
    sample_categorical(torch.log(torch.tensor([[0.2, 0.5, 0.3]])), torch.tensor([0.6]))
        -> tensor([1])"""
    cdf = logits.float().softmax(-1).cumsum(-1)  # (N, V)
    idx = (cdf < uniform[:, None] * cdf[:, -1:]).sum(-1)  # (N,) ids entirely below the draw
    return idx.clamp(max=logits.size(-1) - 1)


class ELECTRA(nn.Module):
    """Generator and discriminator in one module: one optimizer, one loss (ELECTRA §2):
        L = L_MLM(generator) + disc_weight * L_Disc(discriminator)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        disc, gen = config.discriminator_config(), config.generator_config()
        embeddings = bert.Embeddings(disc)  # §3.2: both networks share all embedding parameters
        self.generator = Generator(gen, embeddings)
        self.discriminator = Discriminator(disc, embeddings)
        self.apply(bert.init_bert_weights)

    def forward(self, input_ids, labels, token_type_ids=None, attention_mask=None, sample_noise=None):
        """input_ids (B, T): the masked text. labels (B, T): the original token where masked, else
        -100. Returns (generator logits (N, V) at the masked positions, discriminator logits (B, T),
        replaced (B, T) bool, the discriminator's input (B, T)).

        The generator's sample fills each masked position. The discriminator reads the ORIGINAL
        text with those samples in it, not the [MASK]s. No gradient flows through the sample: the
        generator learns from its MLM loss alone (§2: sampling blocks the discriminator's gradient;
        GAN-style training of the generator worked worse, §3.2). The draw uses the global torch RNG
        (train.py saves it), or sample_noise (B, T) uniforms where given: each eval is the same."""
        chosen = labels != -100  # (B, T) the masked positions
        gen_logits = self.generator(input_ids, token_type_ids, attention_mask,
                                    masked_positions=chosen)  # (N, V)
        with torch.no_grad():
            if sample_noise is None:
                u = torch.rand(gen_logits.size(0), device=gen_logits.device)
            else:
                u = sample_noise[chosen]
            sampled = sample_categorical(gen_logits.detach(), u)  # (N,)
        original = torch.where(chosen, labels, input_ids)  # (B, T) the text before masking
        corrupted = original.masked_scatter(chosen, sampled)  # row-major, as `chosen` lists them
        # Trap: a sample equal to the original is NOT replaced. Labelling every masked position
        # "replaced" would teach the discriminator to flag correct guesses: genuine tokens.
        replaced = chosen & (corrupted != original)
        disc_logits = self.discriminator(corrupted, token_type_ids, attention_mask)  # (B, T)
        return gen_logits, disc_logits, replaced, corrupted

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # shared embeddings count once

    def no_weight_decay(self):
        return set()  # as BERT: train.py exempts only biases and LayerNorm gains (by shape)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight a token passes, in both networks (a shared weight
        once per use); attention, 12 * L * T * C each; the generator's MLM head on mask_prob of the
        tokens, the discriminator's on all (Kaplan et al. 2020 eq. 2.1; PaLM App. B)."""
        c, total = self.config, 0
        for net, cfg in ((self.generator, c.generator_config()),
                         (self.discriminator, c.discriminator_config())):
            enc = net.encoder
            dense = sum(p.numel() for p in enc.layer.parameters()) + sum(
                p.numel() for p in getattr(enc, "embeddings_project", nn.Identity()).parameters())
            total += 6 * dense + 12 * cfg.num_hidden_layers * c.max_seq_length * cfg.hidden_size
        gen = c.generator_config()
        total += 6 * c.mask_prob * (gen.hidden_size * gen.emb_size + gen.emb_size * c.vocab_size)
        total += 6 * (c.hidden_size * c.hidden_size + c.hidden_size)
        return total

    # ------------------------------------------------------------------------------------------------------------------
    # Hugging Face format: ElectraForMaskedLM (generator) + ElectraForPreTraining (discriminator)
    # directories, as Google released them (electra-small-generator / -discriminator, ...).

    @classmethod
    def from_pretrained(cls, generator_path, discriminator_path=None, **overrides):
        """Load an ElectraForMaskedLM and an ElectraForPreTraining directory (config.json + weights)
        without transformers. One argument: a directory holding generator/ and discriminator/ (what
        export_hf(path) writes, what train.py --init-from passes). Both must come from one run:
        their embeddings are one set of parameters here, checked to be equal."""
        if discriminator_path is None:
            both = generator_path
            generator_path, discriminator_path = (os.path.join(both, "generator"),
                                                  os.path.join(both, "discriminator"))
            if not (os.path.isdir(generator_path) and os.path.isdir(discriminator_path)):
                raise FileNotFoundError(f"{both}: expected generator/ and discriminator/ "
                                        f"directories in it (or give the two directories "
                                        f"separately)")
        hf_g, sd_g = bert.read_bert_dir(generator_path)
        hf_d, sd_d = bert.read_bert_dir(discriminator_path)
        for path, hf in ((generator_path, hf_g), (discriminator_path, hf_d)):
            if hf.get("model_type") != "electra":
                raise ValueError(f"{path}: model_type {hf.get('model_type')!r}, not electra")
        d = bert.config_from_hf(hf_d, discriminator_path,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        for key in ("vocab_size", "embedding_size", "max_position_embeddings", "type_vocab_size",
                    "num_hidden_layers"):
            if hf_g.get(key) != hf_d.get(key):
                raise ValueError(f"{generator_path} and {discriminator_path} differ in {key} "
                                 f"({hf_g.get(key)} vs {hf_d.get(key)}): not a "
                                 f"generator/discriminator pair")
        d.update(embedding_size=hf_d["embedding_size"], generator_size=hf_g["hidden_size"] / d["hidden_size"])
        # the generator's own config.json decides its shape; ELECTRA's rule is only the default
        h = hf_g["hidden_size"]
        if hf_g["num_attention_heads"] != max(1, h // 64):
            d["generator_heads"] = hf_g["num_attention_heads"]
        if hf_g["intermediate_size"] != 4 * h:
            d["generator_intermediate_size"] = hf_g["intermediate_size"]
        config = ElectraConfig(**{k: v for k, v in d.items() if k in ElectraConfig.__dataclass_fields__},
                               **overrides)
        model = cls(config)
        copy_weights(model.discriminator, sd_d, discriminator_path, name=discriminator_hf_name)
        for ours in model.generator.encoder.embeddings.state_dict():
            key = f"electra.embeddings.{ours}"
            if key in sd_g and key in sd_d and not torch.equal(sd_g[key].to(sd_d[key].dtype), sd_d[key]):
                raise ValueError(f"{generator_path}: {key} differs from the discriminator's; "
                                 f"ELECTRA shares its embeddings, so these two checkpoints were "
                                 f"not trained together")
        # the shared embeddings are loaded (from the discriminator's file) once
        copy_weights(model.generator, sd_g, generator_path, name=generator_hf_name,
                     skip=("encoder.embeddings.",))
        return model

    def export_hf(self, generator_path, discriminator_path=None):
        """Write the two directories that ElectraForMaskedLM.from_pretrained and
        ElectraForPreTraining.from_pretrained load with the same logits. Each gets its own copy of
        the shared embeddings. With one argument, generator/ and discriminator/ inside it."""
        if discriminator_path is None:
            both = generator_path
            generator_path, discriminator_path = (os.path.join(both, "generator"),
                                                  os.path.join(both, "discriminator"))
        c = self.config
        nets = ((generator_path, self.generator, generator_hf_name, c.generator_config(),
                 "ElectraForMaskedLM"),
                (discriminator_path, self.discriminator, discriminator_hf_name,
                 c.discriminator_config(), "ElectraForPreTraining"))
        for path, net, name, part, arch in nets:
            hf = bert.hf_encoder_config(part, arch, "electra")
            hf.update(embedding_size=part.emb_size, summary_type="first", summary_use_proj=True,
                      summary_activation="gelu", summary_last_dropout=0.1)
            write_hf_dir(path, hf, {name(k): v.float() for k, v in net.named_parameters()})


Model = ELECTRA


def generator_hf_name(name):
    """Generator parameter name -> ElectraForMaskedLM's: bert.hf_name, ELECTRA's prefix and head.
    generator_hf_name("head.bias") -> "generator_lm_head.bias" """
    return bert.hf_name(name, "electra.", {"head.dense.": "generator_predictions.dense.",
                                           "head.LayerNorm.": "generator_predictions.LayerNorm.",
                                           "head.bias": "generator_lm_head.bias"})


def discriminator_hf_name(name):
    """The discriminator's parameter name -> ElectraForPreTraining's.
    discriminator_hf_name("dense.weight") -> "discriminator_predictions.dense.weight" """
    return bert.hf_name(name, "electra.", {
        "dense.": "discriminator_predictions.dense.",
        "dense_prediction.": "discriminator_predictions.dense_prediction."})

# ----------------------------------------------------------------------------------------------------------------------
# The objective: replaced-token detection. Rows and masking are bert.py's (packed full sentences,
# dynamic masking). What differs: the model's two outputs and the combined loss.


class ReplacedTokenDetection(bert.PretrainingObjective):
    """ELECTRA's objective (train.py's Objective interface). The generator's MLM loss: a mean over
    the masked positions. The discriminator's binary cross-entropy: a mean over every real token
    ([CLS] and [SEP] too, as released; never padding). loss = L_MLM + disc_weight * L_Disc."""

    def mask_count(self, candidates, attention_mask, g):
        """(B,) positions per row, as ELECTRA's pretrain_helpers.mask: round(mask_prob x the row's
        tokens, [CLS] and [SEP] counted), at least 1, at most max_predictions_per_seq =
        int((mask_prob + 0.005) x max_seq_length) (19 at 128). It then samples the positions WITH
        replacement (a position drawn twice is scored twice); we choose them without (errata)."""
        c = self.config
        cap = int((c.mask_prob + 0.005) * c.max_seq_length)
        k = bert.rounded_share(attention_mask.sum(1), c.mask_prob).clamp(max=cap)  # (B,)
        return torch.minimum(k, candidates.sum(1))

    def eval_batches(self, split, batch_size):
        """bert.py's evaluation rows and masks, plus the uniforms for the generator's samples. Fixed
        here, so every evaluation scores the same corrupted text. Never drawn from the global RNG:
        that would shift the training run's later samples and dropout masks."""
        g = torch.Generator().manual_seed(bert.EVAL_SEED + 1)
        for batch in super().eval_batches(split, batch_size):
            batch["sample_noise"] = torch.rand(batch["input_ids"].shape, generator=g)
            yield batch

    def denominators(self, batch):
        return {"mlm": int((batch["labels"] != -100).sum()), "disc": int(batch["attention_mask"].sum())}

    def loss(self, model, batch, denominators=None):
        den = denominators or self.denominators(batch)
        labels, real = batch["labels"], batch["attention_mask"].bool()
        gen_logits, disc_logits, replaced, _ = model(
            batch["input_ids"], labels, batch["token_type_ids"], batch["attention_mask"],
            batch.get("sample_noise"))
        target = labels[labels != -100]  # (N,)
        mlm_nll = F.cross_entropy(gen_logits.float(), target, reduction="sum")
        disc_nll = F.binary_cross_entropy_with_logits(
            disc_logits.float()[real], replaced[real].float(), reduction="sum")
        loss = mlm_nll / max(1, den["mlm"]) + self.config.disc_weight * disc_nll / max(1, den["disc"])
        flagged = disc_logits > 0
        return loss, {"mlm_nll": mlm_nll.detach(), "masked": (labels != -100).sum(),
                      "mlm_correct": (gen_logits.argmax(-1) == target).sum(),
                      "disc_nll": disc_nll.detach(), "tokens": real.sum(),
                      "disc_correct": (flagged == replaced)[real].sum(),
                      "replaced": replaced.sum(), "caught": (flagged & replaced).sum()}

    def summarize(self, sums):
        """loss as trained; the generator's MLM loss and accuracy; the discriminator's loss and
        accuracy, over all real tokens and over the replaced ones (recall). Baselines: `replaced`,
        the share replaced (always "original" scores 1 - it); disc_prior_loss, the loss of always
        predicting that share (its binary entropy), where a context-blind discriminator sits."""
        masked, tokens, replaced = (max(1.0, float(sums[k])) for k in ("masked", "tokens", "replaced"))
        gen_loss, disc_loss = float(sums["mlm_nll"]) / masked, float(sums["disc_nll"]) / tokens
        share = float(sums["replaced"]) / tokens
        prior = -sum(p * math.log(p) for p in (share, 1 - share) if p > 0)
        return {"loss": gen_loss + self.config.disc_weight * disc_loss, "gen_loss": gen_loss,
                "gen_acc": float(sums["mlm_correct"]) / masked, "disc_loss": disc_loss,
                "disc_prior_loss": prior, "disc_acc": float(sums["disc_correct"]) / tokens,
                "disc_acc_replaced": float(sums["caught"]) / replaced, "replaced": share}


Objective = ReplacedTokenDetection

# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning (train.py --task, finetune.py): the discriminator alone


class Classifier(bert.Classifier):
    """ELECTRA fine-tunes the discriminator and throws the generator out (Clark et al. 2020, §2, end):
    BERT's input layout, then the released classification head (ElectraClassificationHead): the
    final state of [CLS], dropout, dense C -> C, GELU, dropout, a linear layer. The generator's own
    layers and the replaced-token head are frozen: no trained parameter (the shared embeddings are
    the discriminator's too)."""
    LORA = ("discriminator.*.attention.query", "discriminator.*.attention.value")
    ADAPTER = ("discriminator.*.attention.dense", "discriminator.*.layer.*.output")
    EMBEDDING = "discriminator.encoder.embeddings.word_embeddings"  # shared with the generator

    def __init__(self, model, task, labels, tokenizer):
        nn.Module.__init__(self)
        disc = model.discriminator
        self.pretrained, self.labels, self.max_len = model, labels, model.config.max_seq_length
        self.cls, self.sep = tokenizer.specials["[CLS]"], tokenizer.specials["[SEP]"]
        model.requires_grad_(False)
        disc.encoder.requires_grad_(True)  # its embeddings, shared, included
        C = disc.dense.in_features
        self.dropout = nn.Dropout(0.1)
        self.dense, self.out_proj = nn.Linear(C, C), nn.Linear(C, len(labels))
        self.dense.apply(bert.init_bert_weights)
        self.out_proj.apply(bert.init_bert_weights)

    def forward(self, input_ids, token_type_ids, attention_mask, labels):
        h = self.pretrained.discriminator.encoder(input_ids, token_type_ids, attention_mask)  # (B, T, C)
        x = self.dropout(F.gelu(self.dense(self.dropout(h[:, 0]))))  # (B, C) from [CLS]
        logits = self.out_proj(x)  # (B, n_labels)
        return F.cross_entropy(logits.float(), labels, reduction="none"), logits.argmax(-1)

# ----------------------------------------------------------------------------------------------------------------------
# Demo: corrupt a sentence with the generator and show what the discriminator flags.

# a play the char-cpu run never sees (Julius Caesar)
FLAG_TEXT = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."


@dataclass
class DemoConfig:
    flag_text: str = FLAG_TEXT  # text to corrupt and flag ('' = no demo)
    demo_seed: int = 0  # seeds which positions are masked and what the generator samples there


def _render(tokenizer, ids, marks):
    """Decode ids on one line, each marked token in {braces}. Newlines and tabs show as \\n, \\t.
    _render(char tokenizer, ids of "ab\\nc", [False, True, True, False]) -> 'a{b}{\\n}c'"""
    text = [tokenizer.decode([i]).replace("\n", "\\n").replace("\t", "\\t") for i in ids]
    return "".join("{" + t + "}" if m else t for t, m in zip(text, marks))


@torch.no_grad()
def flag(model, tokenizer, text, device="cpu", seed=0, as_is=False):
    """(corrupted ids, replaced (T,) bool, flagged (T,) bool) for `text` without [CLS]/[SEP].
    Unless as_is, first corrupted as in training (mask_prob masked, seeded; samples put in)."""
    ids = tokenizer.encode(text)
    require(ids, "the text is empty")
    c = model.config
    row = bert.with_cls_sep(tokenizer, ids, c.max_position_embeddings, "text")
    was_training = model.training
    model.eval()
    attention_mask = torch.ones_like(row)
    if as_is:
        corrupted, replaced = row, torch.zeros_like(row, dtype=torch.bool)
    else:
        g = torch.Generator().manual_seed(seed)
        masked, labels = ReplacedTokenDetection(c, tokenizer).mask_tokens(row, attention_mask, g)
        noise = torch.rand(row.shape, generator=g)
        _, _, replaced, corrupted = model(masked.to(device), labels.to(device),
                                          attention_mask=attention_mask.to(device),
                                          sample_noise=noise.to(device))
    flagged = model.discriminator(corrupted.to(device), attention_mask=attention_mask.to(device)) > 0
    model.train(was_training)
    return corrupted[0, 1:-1].tolist(), replaced[0, 1:-1].cpu(), flagged[0, 1:-1].cpu()


def print_flags(tokenizer, text, ids, replaced, flagged, as_is):
    print(f"text:      {_render(tokenizer, tokenizer.encode(text), [False] * len(ids))}")
    if not as_is:
        print(f"corrupted: {_render(tokenizer, ids, replaced)}   ({{}} = replaced by the generator)")
    print(f"flagged:   {_render(tokenizer, ids, flagged)}   ({{}} = the discriminator says replaced)")
    if not as_is:
        caught = int((replaced & flagged).sum())
        print(f"{int(replaced.sum())} replaced, {int(flagged.sum())} flagged, "
              f"{caught} of the replaced caught, {int((flagged & ~replaced).sum())} false alarms")


def demo(model, tokenizer, cfg, device):
    """Corrupt cfg.flag_text with the generator and show which tokens the discriminator flags."""
    if not cfg.flag_text:
        return
    try:
        out = flag(model, tokenizer, cfg.flag_text, device, cfg.demo_seed)
    except UsageError as e:  # e.g. text beyond a small model's position table; the run is fine
        print(f"demo skipped: {e} (--flag-text sets the text)")
        return
    print("-" * 80)
    print_flags(tokenizer, cfg.flag_text, *out, as_is=False)
    print("-" * 80)


@command
def main(argv=None):
    p = argparse.ArgumentParser(
        description="Show which tokens an ELECTRA discriminator flags as replaced: in a text "
                    "the generator corrupts first (default), or in the text as you give it.")
    p.add_argument("--ckpt", required=True, help="path to ckpt.pt written by train.py --model electra")
    p.add_argument("text", help="the text")
    p.add_argument("--as-is", action="store_true",
                   help="do not corrupt the text: flag what looks replaced in it")
    p.add_argument("--seed", type=int, default=0,
                   help="which positions are masked and what the generator samples")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    import train

    device = train.pick_device(args.device)
    model, tokenizer, _ = train.load_for_inference(args.ckpt, device, flag="--ckpt", model="electra")
    out = flag(model, tokenizer, args.text, device, args.seed, args.as_is)
    print_flags(tokenizer, args.text, *out, as_is=args.as_is)


if __name__ == "__main__":
    main()
