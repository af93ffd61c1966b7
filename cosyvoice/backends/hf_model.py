"""Loads an export (`hf_export`) with transformers, with the speech head's bias applied.

Stock Qwen2ForCausalLM builds `lm_head` without a bias and leaves the checkpoint's `lm_head.bias`
unused; without it the speech logits lack the head's bias and every text id gets logit 0 instead
of -inf. `load_exported` swaps in a biased head holding the exported weight and bias.

    model = load_exported(export_dir)
    logits = model(input_ids=torch.tensor([vocab.prompt_ids(...)])).logits   # [1, T, rows]
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import Qwen2ForCausalLM

from .hf_export import WEIGHTS_NAME

BIAS_KEY = "lm_head.bias"


def read_lm_head_bias(export_dir: str | Path) -> torch.Tensor:
    """lm_head.bias [rows] as stored in the export (float32)."""
    path = Path(export_dir) / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as weights:
        if BIAS_KEY not in weights.keys():
            raise KeyError(f"{path} has no {BIAS_KEY}: it is not a CosyVoice2 export")
        return weights.get_tensor(BIAS_KEY).float()


def attach_lm_head_bias(model: Qwen2ForCausalLM, bias: torch.Tensor) -> None:
    """Replaces the bias-free lm_head [rows, H] by a Linear with the same weight and `bias`."""
    weight = model.lm_head.weight
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"lm_head bias of shape {tuple(bias.shape)} does not fit the head {tuple(weight.shape)}")
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=True, device="meta")
    head.weight = weight
    head.bias = nn.Parameter(bias.to(device=weight.device, dtype=weight.dtype), requires_grad=False)
    model.lm_head = head


def load_exported(export_dir: str | Path, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Qwen2ForCausalLM:
    """The exported model in eval mode, its lm_head carrying the exported bias."""
    # transformers reports the bias it does not load as an unexpected key; it is added below.
    loading_log = logging.getLogger("transformers.modeling_utils")
    level = loading_log.level
    loading_log.setLevel(logging.ERROR)
    try:
        model = Qwen2ForCausalLM.from_pretrained(str(export_dir), dtype=dtype)
    finally:
        loading_log.setLevel(level)
    attach_lm_head_bias(model, read_lm_head_bias(export_dir))
    return model.to(device).eval()
