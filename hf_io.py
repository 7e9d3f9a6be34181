"""
Hugging Face checkpoint directories, read and written without `transformers`: the part every model file shares.

A directory written by `transformers`' `save_pretrained` holds `config.json` and the weights, as `model.safetensors`
(the current format: a JSON header naming each tensor's dtype, shape and byte range, then the raw bytes; reading it runs
no code) or as `pytorch_model.bin` (older uploads, e.g. OpenAI's GPT-2: a torch pickle, read with weights_only=True so
that no pickled code runs either). What differs per model is only the mapping between its parameter names and ours,
and that lives in each model file (gpt.py's GPT.from_pretrained / export_hf, ...); the checked copy is here, once.

    config, weights = read_hf_dir("path/to/gpt2")      # (dict from config.json, {name: tensor})
    copy_weights(model, weights, "path/to/gpt2", name=lambda ours: ours.removeprefix("transformer."))
    write_hf_dir("out/hf", config, weights)            # what from_pretrained in transformers loads
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file


def read_hf_dir(path):
    """(config dict, {name: tensor}) from a save_pretrained directory, or from a hub name such as "gpt2" when
    huggingface_hub is installed and online (nothing here ever downloads on its own)."""
    if not os.path.isdir(path):
        path = _download_from_hub(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    with open(config_file) as f:
        config = json.load(f)
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        return config, load_file(st)
    if os.path.exists(pt):
        return config, torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")


def copy_weights(model, weights, path, name=None, skip=(), convert=None):
    """Copy a checkpoint's tensors into model's parameters and buffers, refusing a missing name or a wrong shape.

    name(ours) -> the checkpoint's name (default: the same); parameters whose name starts with one of `skip` keep their
    initialisation (a tied weight, a head the format lacks); convert(ours, tensor) -> tensor fixes a layout first
    (GPT-2's Conv1D weights are (in, out), the transpose of nn.Linear's).
    Trap: a square weight loaded untransposed has the right shape and silently computes garbage; only parity catches it.
    """
    with torch.no_grad():
        for ours, param in model.state_dict().items():
            if ours.startswith(tuple(skip)):
                continue
            key = name(ours) if name else ours
            if key not in weights:
                raise KeyError(f"{path}: missing weight {key!r}")
            w = convert(ours, weights[key]) if convert else weights[key]
            if w.shape != param.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(w.shape)}, expected {tuple(param.shape)}")
            param.copy_(w)


def write_hf_dir(path, config, weights):
    """config.json + model.safetensors. Tensors are written contiguous, on the CPU, each stored once (safetensors
    refuses two names for one storage, so a tied weight must be left out by the caller, as transformers does)."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _download_from_hub(name):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name!r} is not a directory, and huggingface_hub is not installed") from None
    return snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])
