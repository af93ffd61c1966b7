"""UpsampleConformerEncoder: speech-token embeddings (25 Hz) -> hidden frames at mel rate (50 Hz).

    embed -> pre-lookahead conv -> conformer layers -> upsample x stride
          -> up_embed -> conformer layers -> after_norm

All layers are causal at chunk granularity when `streaming=True`: attention then sees only
the query's own chunk and everything before it (chunks counted from sequence index 0).
Batch size is 1 at inference, so no padding masks are needed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .carry import CarryPass, chunk_attention_mask


def relative_position_table(length: int, d_model: int, device: torch.device, keys: int | None = None) -> Tensor:
    """[K+T-1, d_model] sinusoids for relative distances K-1, K-2, ..., -(T-1) (row 0 = K-1): what
    T queries need against K keys, K = T by default (2T-1 rows), or K = held + T when the queries
    are the last T of K frames (a carried streaming call).

    Even columns hold sin(r * w_k), odd columns cos(r * w_k), w_k = 10000^(-2k / d_model).
    """
    keys = length if keys is None else keys
    distance = torch.arange(keys - 1, -length, -1, device=device, dtype=torch.float32)
    freq = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32)
                     * -(math.log(10000.0) / d_model))
    angle = distance[:, None] * freq[None, :]  # [K+T-1, d_model/2]
    table = torch.empty(distance.shape[0], d_model, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table


class LinearEmbed(nn.Module):
    """Linear + LayerNorm, then scaled by sqrt(d). The positional table is built separately."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(input_size, output_size), nn.LayerNorm(output_size, eps=1e-5))
        self.scale = math.sqrt(output_size)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C_in] -> [B, T, C]
        return self.out(x) * self.scale


class RelPositionMultiHeadAttention(nn.Module):
    """Self-attention with relative-position scores (Transformer-XL style u/v biases)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"attention width {d_model} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.d_head))  # content bias
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.d_head))  # position bias

    def forward(self, x: Tensor, pos_table: Tensor, allowed: Tensor | None,
                carry: CarryPass | None = None) -> Tensor:
        # x [B, T, C], pos_table [K+T-1, C] (relative_position_table), allowed [T, K] bool or None
        # (= full attention). K = T, or with a carry (x = the last T of K frames) the held frames' too.
        batch, length, _ = x.shape
        q = self.linear_q(x).view(batch, length, self.n_heads, self.d_head)  # [B, T, H, D]
        k = self.linear_k(x).view(batch, length, self.n_heads, self.d_head).transpose(1, 2)
        v = self.linear_v(x).view(batch, length, self.n_heads, self.d_head).transpose(1, 2)
        if carry is not None:
            k, v = carry.keys_values(self, k, v)  # [B, H, K, D]
        keys = k.shape[2]
        p = self.linear_pos(pos_table).view(-1, self.n_heads, self.d_head).transpose(0, 1)  # [H, K+T-1, D]

        content = (q + self.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)  # [B, H, T, K]
        position = (q + self.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)  # [B, H, T, K+T-1]
        # Query i is frame K-T+i; its score with key j uses the table row for distance K-T+i-j,
        # which is row (K-1) - (K-T+i-j) = (T-1) - i + j.
        query = torch.arange(length, device=x.device)
        key = torch.arange(keys, device=x.device)
        rows = (length - 1 - query[:, None] + key[None, :]).expand(batch, self.n_heads, -1, -1)
        position = position.gather(-1, rows)  # [B, H, T, K]

        scores = (content + position) / math.sqrt(self.d_head)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, -1)  # [B, T, C]
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(d_model, hidden)
        self.w_2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm block: attention then feed-forward, each residual (no macaron, no conv module)."""

    def __init__(self, d_model: int, n_heads: int, linear_units: int):
        super().__init__()
        self.self_attn = RelPositionMultiHeadAttention(d_model, n_heads)
        self.feed_forward = FeedForward(d_model, linear_units)
        self.norm_mha = nn.LayerNorm(d_model, eps=1e-12)
        self.norm_ff = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, x: Tensor, pos_table: Tensor, allowed: Tensor | None,
                carry: CarryPass | None = None) -> Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos_table, allowed, carry)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """Lets each frame see `lookahead` frames to its right, then a causal conv; residual.

    The right side is the context frames when given (streaming), zeros otherwise. The convs go
    channels -> hidden_channels -> channels; CosyVoice2 keeps the width (hidden_channels defaults
    to channels), CosyVoice3 widens 80 -> 1024 -> 80.
    """

    def __init__(self, channels: int, lookahead: int, causal_kernel: int = 3,
                 hidden_channels: int | None = None):
        super().__init__()
        hidden_channels = hidden_channels or channels
        self.channels = channels
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, hidden_channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(hidden_channels, channels, kernel_size=causal_kernel)

    def forward(self, x: Tensor, context: Tensor | None, carry: CarryPass | None = None) -> Tensor:
        # x [B, T, C], context [B, L, C] or None -> [B, T, C]. With a carry, x are the frames after
        # the ones held, whose last conv1 outputs pad conv2 on the left instead of zeros.
        h = x if context is None else torch.cat([x, context], dim=1)
        missing = x.shape[1] + self.lookahead - h.shape[1]  # right frames without context: zeros
        h = F.pad(h.transpose(1, 2), (0, missing))  # [B, C, T+L]
        h = F.leaky_relu(self.conv1(h), negative_slope=0.01)  # [B, C, T]
        pad = self.conv2.kernel_size[0] - 1
        h = self.conv2(F.pad(h, (pad, 0)) if carry is None else carry.causal_input(self.conv2, h, pad))
        return h.transpose(1, 2) + x


class Upsample1D(nn.Module):
    """Nearest-neighbour repeat x stride in time, then a causal conv of kernel 2*stride+1."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, kernel_size=2 * stride + 1)

    def forward(self, x: Tensor, carry: CarryPass | None = None) -> Tensor:  # [B, C, T] -> [B, C, stride*T]
        x = torch.repeat_interleave(x, self.stride, dim=2)
        pad = 2 * self.stride
        return self.conv(F.pad(x, (pad, 0)) if carry is None else carry.causal_input(self.conv, x, pad))


class UpsampleConformerEncoder(nn.Module):
    """Token embeddings [B, T, input_size] -> frames [B, upsample_stride*T, output_size].

    Upstream hard-codes three things that we take as arguments with its values as defaults:
    `pre_lookahead_len` (3, must match the flow's), `upsample_stride` (2, the flow's
    token_mel_ratio) and `num_up_blocks` (4 conformer layers after the upsampling).
    """

    def __init__(self, input_size: int, output_size: int, attention_heads: int, linear_units: int,
                 num_blocks: int, normalize_before: bool, input_layer: str, pos_enc_layer_type: str,
                 selfattention_layer_type: str, use_cnn_module: bool, macaron_style: bool,
                 static_chunk_size: int, pre_lookahead_len: int = 3, upsample_stride: int = 2,
                 num_up_blocks: int = 4):
        super().__init__()
        unsupported = {
            "input_layer": (input_layer, "linear"),
            "pos_enc_layer_type": (pos_enc_layer_type, "rel_pos_espnet"),
            "selfattention_layer_type": (selfattention_layer_type, "rel_selfattn"),
            "normalize_before": (normalize_before, True),
            "use_cnn_module": (use_cnn_module, False),
            "macaron_style": (macaron_style, False),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"UpsampleConformerEncoder: {name}={value!r} is not supported "
                                 f"(only {supported!r})")
        self.output_size = output_size
        self.static_chunk_size = static_chunk_size  # in tokens; x upsample_stride after upsampling
        self.pre_lookahead_len = pre_lookahead_len
        self.upsample_stride = upsample_stride

        self.embed = LinearEmbed(input_size, output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(output_size, pre_lookahead_len)
        self.encoders = nn.ModuleList(
            ConformerLayer(output_size, attention_heads, linear_units) for _ in range(num_blocks))
        self.up_layer = Upsample1D(output_size, upsample_stride)
        self.up_embed = LinearEmbed(output_size, output_size)
        self.up_encoders = nn.ModuleList(
            ConformerLayer(output_size, attention_heads, linear_units) for _ in range(num_up_blocks))
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def _run_layers(self, layers: nn.ModuleList, x: Tensor, chunk_size: int, streaming: bool,
                    carry: CarryPass | None) -> Tensor:
        length = x.shape[1]
        start = 0 if carry is None else carry.start
        pos_table = relative_position_table(length, self.output_size, x.device, keys=start + length).to(x.dtype)
        allowed = None
        if streaming and chunk_size > 0:
            allowed = chunk_attention_mask(length, chunk_size, x.device, start=start)
        for layer in layers:
            x = layer(x, pos_table, allowed, carry)
        return x

    def forward(self, x: Tensor, context: Tensor | None = None, streaming: bool = False,
                carry: tuple[CarryPass, CarryPass] | None = None) -> Tensor:
        # x [B, T, input_size]; context [B, pre_lookahead_len, input_size] or None
        # carry: (token-rate pass, mel-rate pass) of one streaming request continuing earlier calls;
        # x then holds only the tokens after those held.
        tokens, frames = carry if carry is not None else (None, None)
        x = self.embed(x)  # [B, T, C]
        if context is not None:
            context = self.embed(context)
        x = self.pre_lookahead_layer(x, context, tokens)
        x = self._run_layers(self.encoders, x, self.static_chunk_size, streaming, tokens)

        x = self.up_layer(x.transpose(1, 2), frames).transpose(1, 2)  # [B, stride*T, C]
        x = self.up_embed(x)
        x = self._run_layers(self.up_encoders, x, self.static_chunk_size * self.upsample_stride, streaming,
                             frames)
        return self.after_norm(x)
