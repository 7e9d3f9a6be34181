"""
MAE-LM: masked language modelling whose encoder never sees [MASK].

Paper
  - Meng et al. 2024, "Representation Deficiency in Masked Language Modeling" (ICLR). §3: MLM spends
    some of the encoder's dimensions on [MASK], a token no downstream input holds. §4, Fig. 2: MAE-LM
    removes the masked positions from the encoder's input; each remaining token keeps its position
    ("aligned"); a shallow decoder, discarded after pretraining, reads the encoder's states with a
    [MASK] vector at every masked position and predicts the original tokens there. Table 2: ablations.
  - He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners" §3: the architecture (a mask
    vector and position embeddings added in the decoder, a linear projection C -> D into it).
  Slides (lecture 001): "MAE-LM (Masked Autoencoder LM)" (the idea and Table 2), "Don't pass [MASK]
  token to encoder". BERT's encoder, masking and fine-tuning are bert.py's; this file adds the decoder.

The slide's Table 2 rows, as flags (the default is MAE-LM):
  MAE-LM                                   (defaults)
  enc. w. [MASK] (i.e., MLM)               --encoder-sees-mask --decoder-layers 0   (bert.py --objective mlm)
  enc. w. [MASK] + dec.                    --encoder-sees-mask
  enc. w. [MASK], dec. resets [MASK]       --encoder-sees-mask --decoder-resets-mask
  misaligned position encoding             --no-aligned-positions
  decoder size                             --decoder-layers N --decoder-hidden-size D

Run
  python train.py --model maelm                   # char MAE-LM on Shakespeare, CPU: 6.5 min, 34% of masks right
  Trap, measured: trained together from step 1, encoder and decoder never learn past the character frequencies
  (3,000 steps). While the decoder's attention is still uniform, every visible token gets the same gradient, so
  the encoder learns a summary of the row, not its tokens, and then nothing tells the decoder where to look.
  --detach-encoder-steps (ours, not the paper's; 200 in char-cpu) trains the decoder alone first. docs/14-tables.md.
  python maelm.py --ckpt out/maelm/ckpt.pt "I come to bury Caesar, n[MASK]t to praise him."
Fine-tune (train.py --task): the encoder alone, BERT's way; the decoder is frozen and unused.

Legend
  B batch, T row length, C encoder width, D decoder width, V vocabulary, N masked positions in a batch,
  K the most tokens a row keeps visible (T minus its masked and padding positions).
"""

import argparse
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

import bert
from common import command, require

# ----------------------------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class MAELMConfig(bert.BertConfig):
    objective: str = "mlm"  # RoBERTa's rows and dynamic masking (MAE-LM pretrains on RoBERTa's setup), no NSP
    decoder_layers: int = 2  # the paper's base: 4 decoder layers under 12 encoder layers; 2 under our 4
    decoder_hidden_size: int = 0  # D; 0 = C (the paper's base: 768, the encoder's width)
    encoder_sees_mask: bool = False  # the encoder reads BERT's masked input, [MASK] and all (Table 2's "enc. w.")
    decoder_resets_mask: bool = False  # with it: the decoder puts its [MASK] vector back at the masked positions
    aligned_positions: bool = True  # visible tokens keep their positions; False: renumbered 0..K-1 ("misaligned")
    # Ours, not the paper's (the docstring's trap). Counted in batches: with --grad-accum K, N/K steps.
    # Without a decoder: ignored, nothing to detach.
    detach_encoder_steps: int = 0  # the first N training batches train the decoder alone (encoder output detached)

    def __post_init__(self):
        super().__post_init__()
        require(self.objective == "mlm", f"--objective {self.objective}: MAE-LM masks tokens (mlm), no sentence pairs")
        require(self.decoder_layers >= 0, f"--decoder-layers {self.decoder_layers}: must be >= 0")
        require(self.detach_encoder_steps >= 0, f"--detach-encoder-steps {self.detach_encoder_steps}: must be >= 0")
        require(self.decoder_layers > 0 or self.encoder_sees_mask,
                "--decoder-layers 0 leaves nothing at the masked positions unless the encoder sees them: "
                "add --encoder-sees-mask (that is BERT's MLM)")
        require(not self.decoder_resets_mask or (self.encoder_sees_mask and self.decoder_layers > 0),
                "--decoder-resets-mask needs --encoder-sees-mask and a decoder")
        hs = self.hidden_size // self.num_attention_heads
        require(self.decoder_width % hs == 0,
                f"--decoder-hidden-size {self.decoder_width}: must be a multiple of the head size {hs}")

    @property
    def decoder_width(self):
        return self.decoder_hidden_size or self.hidden_size

    def decoder_config(self):
        """The decoder's layers are BERT layers of width D, heads of the encoder's size, FFN 4D."""
        D, hs = self.decoder_width, self.hidden_size // self.num_attention_heads
        return replace(self, hidden_size=D, num_attention_heads=D // hs, intermediate_size=4 * D,
                       embedding_size=self.emb_size, num_hidden_layers=max(1, self.decoder_layers),
                       share_layers=False)  # embedding_size: the head maps D to the encoder's E (tied)


Config = MAELMConfig

PRESETS = {
    # bert.py's quick start, RoBERTa's objective: the same encoder, rows and recipe as
    # `python train.py --model bert --objective mlm`, plus the decoder.
    # detach_encoder_steps 200: without it no decoder row learns past the character frequencies (the docstring's
    # trap). 200 of 2,000 steps, twice the lr warm-up. Not tuned: the one value tried.
    "char-cpu": {**bert.PRESETS["char-cpu"], "objective": "mlm", "detach_encoder_steps": 200},
    "tiny": {**bert.PRESETS["tiny"], "objective": "mlm", "decoder_layers": 1},
}
DEFAULT_PRESET = "char-cpu"
SPECIAL_TOKENS, TOKEN_IDS = bert.SPECIAL_TOKENS, bert.TOKEN_IDS

# ----------------------------------------------------------------------------------------------------------------------
# The model


def visible_rows(keep):
    """Each row's visible positions, moved to the front in their order, and which slots are real.
    keep (B, T) bool -> (order (B, K), valid (B, K)), K = the most visible positions of any row.
    visible_rows(tensor([[1, 0, 1, 1], [0, 1, 0, 0]]).bool()) -> order [[0, 2, 3], [1, *, *]],
    valid [[1, 1, 1], [1, 0, 0]] (* = positions that are not visible: padding slots, never read)."""
    K = int(keep.sum(1).max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]  # (B, K) visible first, in order
    return order, keep.gather(1, order)


class MAELM(bert.BERT):
    """BERT's encoder (and its unused pooler and NSP head, so that bert.Classifier fine-tunes it as is),
    a decoder of decoder_layers BERT layers, and the MLM head on the decoder's states, tied to the
    encoder's word embeddings. Without a decoder (--decoder-layers 0) the head reads the encoder: BERT."""

    def __init__(self, config):
        super().__init__(config)
        dec = config.decoder_config()
        self.mlm = bert.MLMHead(dec)  # D -> E, tied to the encoder's (V, E) word embeddings
        if config.decoder_layers:
            D = dec.hidden_size
            # MAE's projection C -> D and its mask vector, at every width. The released MAE-LM code skips the
            # projection when D = C and reads the encoder's [MASK] embedding instead. Tried at the char-cpu preset
            # without --detach-encoder-steps, both ended at the same loss (3.314 against 3.313 after 300 steps).
            self.decoder_embed = nn.Linear(config.hidden_size, D)
            self.mask_token = nn.Parameter(torch.zeros(D))  # the [MASK] vector the decoder reads
            self.decoder_position_embeddings = nn.Embedding(config.max_position_embeddings, D)
            self.decoder_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
            self.decoder = nn.ModuleList([bert.Layer(dec) for _ in range(config.decoder_layers)])
        self.apply(bert.init_bert_weights)
        if config.decoder_layers:
            nn.init.normal_(self.mask_token, std=0.02)
            # training batches seen, for --detach-encoder-steps; in the checkpoint, so a resumed run counts on
            self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    def encode(self, input_ids, token_type_ids, attention_mask, masked):
        """The encoder's states, (B, T, C), at the row's own positions. MAE-LM: the encoder reads only
        the visible tokens (not masked, not padding), each at its position; the masked and padding
        slots of the result are zeros, which decode() replaces."""
        c = self.config
        if c.encoder_sees_mask:
            return self.encoder(input_ids, token_type_ids, attention_mask)  # BERT: [MASK] in the input
        keep = attention_mask.bool() & ~masked  # (B, T)
        order, valid = visible_rows(keep)  # (B, K) each
        positions = order if c.aligned_positions else torch.arange(order.size(1), device=order.device).expand_as(order)
        ids = torch.where(valid, input_ids.gather(1, order), c.pad_token_id)  # (B, K): padding slots hold [PAD]
        h = self.encoder(ids, token_type_ids.gather(1, order), valid.long(),
                         position_ids=positions * valid)  # (B, K, C): [MASK] never enters
        h = h * valid[..., None]  # padding slots out: zeros
        # back to the row's positions; slots past a row's K point at unseen positions and carry zeros
        return torch.zeros(*input_ids.shape, h.size(-1), dtype=h.dtype, device=h.device).scatter(
            1, order[..., None].expand_as(h), h)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """A checkpoint written before --detach-encoder-steps existed has no count; it never detached: 0."""
        if hasattr(self, "batches_seen"):
            state_dict.setdefault(prefix + "batches_seen", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def decode(self, h, attention_mask, masked):
        """(B, T, C) encoder states -> (B, T, D): the [MASK] vector at masked positions (MAE-LM, or
        --decoder-resets-mask), the projected states elsewhere, plus the decoder's positions, then its
        bidirectional layers over every real position."""
        x = self.decoder_embed(h)  # (B, T, D)
        if not self.config.encoder_sees_mask or self.config.decoder_resets_mask:
            x = torch.where(masked[..., None], self.mask_token.to(x.dtype), x)
        pos = torch.arange(x.size(1), device=x.device)
        x = self.decoder_norm(x + self.decoder_position_embeddings(pos))
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.decoder:
            x = layer(x, keep)
        return x

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, masked_positions=None, spans=None):
        """-> (mlm_logits, None): (N, V) at masked_positions (B, T) bool, in row-major order; without
        masked_positions, the [MASK] tokens of input_ids are the masked positions and the logits are
        (B, T, V) (the fill demo). The None stands where bert.BERT returns NSP logits."""
        require(spans is None, "MAE-LM has no span-boundary objective")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        masked = input_ids == self.config.mask_token_id if masked_positions is None else masked_positions
        h = self.encode(input_ids, token_type_ids, attention_mask, masked)
        if self.config.decoder_layers:
            if self.training and self.batches_seen < self.config.detach_encoder_steps:
                h = h.detach()  # no gradient reaches the encoder's layers (its word embeddings learn as the tied head)
            h = self.decode(h, attention_mask, masked)
            if self.training:
                self.batches_seen += 1
        wte = self.encoder.embeddings.word_embeddings.weight  # (V, E)
        return self.mlm(h if masked_positions is None else h[masked_positions], wte), None

    def flops_per_token(self):
        """bert.BERT's count for the encoder, times the share of tokens it reads (1 - mask_prob
        without [MASK]), plus the decoder's layers over every token (6 per weight, PaLM's attention term)."""
        c, dec = self.config, self.config.decoder_config()
        encoder = super().flops_per_token() * (1 if c.encoder_sees_mask else 1 - c.mask_prob)
        per_layer = sum(p.numel() for p in self.decoder[0].parameters()) if c.decoder_layers else 0
        decoder = c.decoder_layers * (6 * per_layer + 12 * c.max_seq_length * dec.hidden_size)
        return encoder + decoder


Model = MAELM
Objective = bert.PretrainingObjective  # RoBERTa's rows and dynamic masking; the model decides what the encoder sees

# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning (train.py --task): the encoder alone, as BERT (MAE-LM §4: the decoder is discarded)


class Classifier(bert.Classifier):
    """bert.Classifier on MAE-LM's encoder; the decoder and its head are frozen (and never run).
    PEFT patterns name the encoder's layers only: the decoder's have the same names below it."""
    LORA = ("encoder.*.attention.query", "encoder.*.attention.value")
    ADAPTER = ("encoder.*.attention.dense", "encoder.layer.*.output")

    def __init__(self, model, task, labels, tokenizer):
        super().__init__(model, task, labels, tokenizer)
        for name in ("decoder_embed", "decoder_position_embeddings", "decoder_norm", "decoder"):
            if hasattr(model, name):
                getattr(model, name).requires_grad_(False)
        if hasattr(model, "mask_token"):
            model.mask_token.requires_grad_(False)

# ----------------------------------------------------------------------------------------------------------------------
# Demo: fill masks, as bert.py does (the decoder fills them; the encoder never saw them)

DemoConfig, demo = bert.DemoConfig, bert.demo


@command
def main(argv=None):
    p = argparse.ArgumentParser(description="Fill every [MASK] in a sentence with an MAE-LM checkpoint "
                                            "written by train.py --model maelm.")
    p.add_argument("--ckpt", required=True, help="path to ckpt.pt (e.g. out/maelm/ckpt.pt)")
    p.add_argument("text", help='a sentence with one or more [MASK], e.g. "lend me your [MASK]ars"')
    p.add_argument("--top-k", type=int, default=5, help="candidates to show per [MASK]")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    require(args.top_k >= 1, f"--top-k {args.top_k}: must be at least 1")
    import train

    device = train.pick_device(args.device)
    model, tokenizer, _ = train.load_for_inference(args.ckpt, device, flag="--ckpt", model="maelm")
    bert.print_fill(args.text, *bert.fill_masks(model, tokenizer, args.text, args.top_k, device))


if __name__ == "__main__":
    main()
