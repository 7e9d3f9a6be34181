"""
Hugging Face checkpoint directories, read and written without `transformers`. Shared by all models.

`transformers`' `save_pretrained` writes `config.json` and the weights, as one of:
- `model.safetensors`, the current format: a JSON header (each tensor's dtype, shape, byte range),
  then the raw bytes. Reading it runs no code.
- `pytorch_model.bin`, older uploads (e.g. OpenAI's GPT-2): a torch pickle.
  Read with weights_only=True, so no pickled code runs either.
Per model, only the map from its parameter names to ours differs. It lives in each model file
(gpt.py's GPT.from_pretrained / export_hf, ...). The checked copy is here, once.

    config, weights = read_hf_dir("path/to/gpt2")  # (dict from config.json, {name: tensor})
    copy_weights(model, weights, "path/to/gpt2", name=lambda k: k.removeprefix("transformer."))
    write_hf_dir("out/hf", config, weights)        # what transformers' from_pretrained loads
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file


def read_hf_dir(path):
    """(config dict, {name: tensor}) from a save_pretrained directory.
    Or a hub name ("gpt2") with huggingface_hub installed and online. Nothing downloads unasked."""
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
    """Copy checkpoint tensors into model.state_dict(). Refuse a missing name or a wrong shape.

    name(ours) -> the checkpoint's name (default: the same).
    Names starting with one of `skip` keep their init (a tied weight, a head the format lacks).
    convert(ours, tensor) -> tensor fixes a layout first
    (GPT-2's Conv1D weights are (in, out), the transpose of nn.Linear's).
    Trap: a square weight loaded untransposed has the right shape and silently computes garbage.
    Only parity catches it.
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
    """config.json + model.safetensors. Tensors go contiguous, on the CPU, each stored once.
    safetensors refuses two names for one storage: leave a tied weight out, as transformers does."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _download_from_hub(name):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name!r} is not a directory, and huggingface_hub is not installed") from None
    return snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])
