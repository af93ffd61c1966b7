"""Loads an export (`hf_export`) with transformers, with the speech head's bias and mask applied.

Stock Qwen2ForCausalLM builds `lm_head` without a bias: it leaves CosyVoice2's `lm_head.bias`
unused (the speech logits then lack the head's bias) and gives every id off the speech head
(text, prompt markers, padding) a logit of 0 instead of -inf, for both generations.
`export_lm_head_bias` is the [rows] bias that fixes both (-inf off the head; on it the head's
bias, or 0 for CosyVoice3's bias-free head); `load_exported` swaps in a biased head holding the
exported weight and that bias.

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

from .hf_export import WEIGHTS_NAME, ExportInfo

BIAS_KEY = "lm_head.bias"


def read_lm_head_bias(export_dir: str | Path) -> torch.Tensor:
    """lm_head.bias [rows] as stored in the export (float32); KeyError where there is none."""
    path = Path(export_dir) / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as weights:
        if BIAS_KEY not in weights.keys():
            raise KeyError(f"{path} has no {BIAS_KEY}")
        return weights.get_tensor(BIAS_KEY).float()


def export_lm_head_bias(export_dir: str | Path, info: ExportInfo | None = None) -> torch.Tensor:
    """The bias [rows] (float32) that makes the bias-free exported head ours: -inf on every id
    off the speech head, the speech head's own bias (0 where it has none) on its ids."""
    info = info or ExportInfo.read(export_dir)
    vocab = info.vocab
    head = slice(vocab.speech_offset, vocab.speech_offset + vocab.head_rows)
    bias = torch.full((vocab.rows,), -float("inf"))
    bias[head] = read_lm_head_bias(export_dir)[head] if info.head_bias else 0.0
    return bias


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
    """The exported model in eval mode, its lm_head carrying `export_lm_head_bias`."""
    # transformers reports a bias it does not load as an unexpected key; it is added below.
    loading_log = logging.getLogger("transformers.modeling_utils")
    level = loading_log.level
    loading_log.setLevel(logging.ERROR)
    try:
        model = Qwen2ForCausalLM.from_pretrained(str(export_dir), dtype=dtype)
    finally:
        loading_log.setLevel(level)
    attach_lm_head_bias(model, export_lm_head_bias(export_dir))
    return model.to(device).eval()
