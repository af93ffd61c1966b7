"""The Qwen2 body run over a preallocated key/value cache with one slot per sequence.

`transformers`' own cache grows one tensor per request, which cannot be stepped as a batch when
requests are at different positions. Here every sequence owns a slot of a fixed cache, writes its
keys/values at its own positions, and attends only to its own filled prefix, so one forward pass
can advance many requests that started at different times. The weights stay in the
`transformers` modules (q/k/v/o projections, norms, MLP, rotary frequencies); only attention and
cache handling are ours.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SlotKVCache:
    """keys/values [layers, slots, kv_heads, max_len, head_dim] for `slots` sequences."""

    def __init__(self, body: nn.Module, slots: int, max_len: int):
        config = body.config
        attention = body.layers[0].self_attn
        weight = attention.k_proj.weight
        shape = (config.num_hidden_layers, slots, config.num_key_value_heads, max_len, attention.head_dim)
        self.keys = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.values = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.max_len = max_len


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, T, D]; cos/sin [B, T, D]
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _attention(attention: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: SlotKVCache, layer: int, slots: torch.Tensor, positions: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
    """Self-attention of `hidden` [B, T, H] at `positions` [B, T], writing into the slots' cache;
    visible [B, 1, groups * T, L] says which of the first L cache positions each query sees (its
    rows repeat per query head sharing a kv head, the layout q takes below)."""
    batch, steps, _ = hidden.shape
    head_dim = attention.head_dim
    q = attention.q_proj(hidden).view(batch, steps, -1, head_dim).transpose(1, 2)   # [B, Hq, T, D]
    k = attention.k_proj(hidden).view(batch, steps, -1, head_dim).transpose(1, 2)   # [B, Hkv, T, D]
    v = attention.v_proj(hidden).view(batch, steps, -1, head_dim).transpose(1, 2)
    q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)

    rows = slots[:, None]                                                     # [B, 1] with positions [B, T]
    cache.keys[layer][rows, :, positions] = k.transpose(1, 2)                 # [B, T, Hkv, D]
    cache.values[layer][rows, :, positions] = v.transpose(1, 2)
    length = visible.shape[-1]
    keys = cache.keys[layer][slots, :, :length]                               # [B, Hkv, L, D]
    values = cache.values[layer][slots, :, :length]

    # Grouped-query attention without copying keys/values per query head: the query heads that
    # share a kv head are stacked along the time axis, [B, Hq, T, D] -> [B, Hkv, groups * T, D].
    kv_heads = keys.shape[1]
    groups = q.shape[1] // kv_heads
    q = q.reshape(batch, kv_heads, groups * steps, head_dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=attention.scaling)
    # reshape, not view: on CUDA the memory-efficient kernel returns a transposed layout
    out = out.reshape(batch, kv_heads * groups, steps, head_dim)               # [B, Hq, T, D]
    return attention.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


def forward_slots(body: nn.Module, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, cache: SlotKVCache, length: int | None = None) -> torch.Tensor:
    """inputs_embeds [B, T, H] at positions [B, T] for cache `slots` [B] -> hidden [B, T, H] after
    the final norm (what `transformers`' Qwen2Model returns as last_hidden_state).

    `length` = max(positions) + 1, when the caller knows it without asking the device."""
    if length is None:
        length = int(positions.max()) + 1
    # a query at position p sees cache positions 0..p of its own slot; [B, 1, groups * T, L]
    visible = torch.arange(length, device=positions.device)[None, None, None, :] <= positions[:, None, :, None]
    config = body.config
    visible = visible.repeat(1, 1, config.num_attention_heads // config.num_key_value_heads, 1)
    cos, sin = body.rotary_emb(inputs_embeds, positions)                      # [B, T, D] each
    x = inputs_embeds
    for index, layer in enumerate(body.layers):
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, cache, index, slots, positions,
                           visible)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return body.norm(x)
