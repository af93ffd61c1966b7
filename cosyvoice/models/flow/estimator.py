"""CausalConditionalDecoder: the vector-field estimator of the flow-matching decoder.

A one-level U-Net over time whose input is the channel stack [x, mu, spks, cond]:

    resnet + transformers (down, skip saved) -> causal conv
    num_mid_blocks x (resnet + transformers)
    concat skip -> resnet + transformers (up) -> causal conv
    causal block -> 1x1 projection

Convolutions work in [B, C, T], transformer blocks in [B, T, C]. Every convolution is causal
(left padding only) and attention is limited to chunks when `streaming=True`, so a frame never
depends on frames beyond its own chunk.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .carry import CarryPass, chunk_attention_mask


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of flow times t [B] -> [B, dim] laid out as [sin..., cos...]."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000.0) / (half - 1)))
    angle = scale * t[:, None].float() * freq[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(t.dtype)


def additive_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask (True = attend) -> additive attention bias: 0 where allowed, -inf elsewhere.

    Stored with its last dim padded to a multiple of 16 and sliced back: CUDA's memory-efficient
    attention needs that alignment and would otherwise copy the bias on every call.
    """
    keys = allowed.shape[-1]
    aligned = -(-keys // 16) * 16
    bias = torch.zeros(*allowed.shape[:-1], aligned, dtype=dtype, device=allowed.device)[..., :keys]
    return bias.masked_fill_(~allowed, float("-inf"))


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Conv1d that pads only on the left, so output frame t sees inputs up to t. With a carry
    (a streaming call that continues an earlier one) the padding is the previous input frames."""

    def forward(self, x: Tensor, carry: CarryPass | None = None) -> Tensor:
        pad = self.kernel_size[0] - 1
        if carry is None:
            return super().forward(F.pad(x, (pad, 0)))
        return super().forward(carry.causal_input(self, x, pad))


class SwapTimeChannels(nn.Module):
    """[B, C, T] <-> [B, T, C], so a LayerNorm can normalise over channels."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class CausalBlock1D(nn.Module):
    """Causal conv k3 -> LayerNorm over channels -> Mish, with the mask applied before and after."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        # The layout keeps checkpoint names: block.0 = conv, block.2 = LayerNorm.
        self.block = nn.Sequential(CausalConv1d(dim, dim_out, 3), SwapTimeChannels(),
                                   nn.LayerNorm(dim_out), SwapTimeChannels(), nn.Mish())

    def forward(self, x: Tensor, mask: Tensor, carry: CarryPass | None = None) -> Tensor:
        # x [B, C, T], mask [B, 1, T]
        conv, *rest = self.block
        h = conv(x * mask, carry)
        for layer in rest:
            h = layer(h)
        return h * mask


class CausalResnetBlock1D(nn.Module):
    """Two causal blocks with the time embedding added in between, plus a 1x1 residual conv."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, t_emb: Tensor, carry: CarryPass | None = None) -> Tensor:
        # x [B, C_in, T], mask [B, 1, T], t_emb [B, E] -> [B, C_out, T]
        h = self.block1(x, mask, carry) + self.mlp(t_emb)[:, :, None]
        h = self.block2(h, mask, carry)
        return h + self.res_conv(x * mask)


class SelfAttention(nn.Module):
    """Multi-head self-attention; q/k/v have no bias and an inner width of heads * head_dim."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # a Sequential keeps the name to_out.0

    def forward(self, x: Tensor, bias: Tensor | None, carry: CarryPass | None = None) -> Tensor:
        # x [B, T, C], bias [T, K] or [B, 1, T, K] added to the scores, or None (= full attention);
        # K = T, or with a carry the held frames' keys first (K = held + T)
        batch, length, _ = x.shape

        def heads(y: Tensor) -> Tensor:  # [B, T, inner] -> [B, H, T, head_dim]
            return y.view(batch, length, self.num_heads, -1).transpose(1, 2)

        keys, values = heads(self.to_k(x)), heads(self.to_v(x))
        if carry is not None:
            keys, values = carry.keys_values(self, keys, values)
        out = F.scaled_dot_product_attention(heads(self.to_q(x)), keys, values, attn_mask=bias)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x))  # exact (erf) GELU


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        # Index 1 is an empty slot (upstream's dropout) so the checkpoint names net.0 / net.2 fit.
        self.net = nn.Sequential(GELUProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention and feed-forward, each residual (names follow the checkpoint)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, num_heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: Tensor, bias: Tensor | None, carry: CarryPass | None = None) -> Tensor:  # x [B, T, C]
        x = x + self.attn1(self.norm1(x), bias, carry)
        return x + self.ff(self.norm3(x))


class CausalConditionalDecoder(nn.Module):
    """Predicts the flow velocity [B, out_channels, T] from x, mu, spks, cond and time t.

    `time_embed_mult` (4) and `ff_mult` (4) are fixed in upstream; they are arguments here with
    those defaults. `num_decoding_left_chunks` is accepted for the yaml's sake: upstream's mask
    always lets a chunk see all chunks to its left, whatever this value says.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: list[int], attention_head_dim: int,
                 n_blocks: int, num_mid_blocks: int, num_heads: int, act_fn: str, static_chunk_size: int,
                 num_decoding_left_chunks: int, time_embed_mult: int = 4, ff_mult: int = 4):
        super().__init__()
        if len(channels) != 1:
            raise ValueError(f"CausalConditionalDecoder: only a one-level U-Net is supported, "
                             f"got channels={list(channels)}")
        if act_fn != "gelu":
            raise ValueError(f"CausalConditionalDecoder: act_fn={act_fn!r} is not supported (only 'gelu')")
        width = channels[0]
        time_dim = width * time_embed_mult
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.static_chunk_size = static_chunk_size

        def stage(dim_in: int) -> list[nn.Module]:
            transformers = nn.ModuleList(
                TransformerBlock(width, num_heads, attention_head_dim, ff_mult) for _ in range(n_blocks))
            return [CausalResnetBlock1D(dim_in, width, time_dim), transformers]

        self.time_mlp = TimestepMLP(in_channels, time_dim)
        # Each level is [resnet, transformers, causal conv]; the conv stands where a U-Net would
        # down- or upsample. The up level takes the skip concatenated, hence 2 * width inputs.
        down = [*stage(in_channels), CausalConv1d(width, width, 3)]
        up = [*stage(2 * width), CausalConv1d(width, width, 3)]
        self.down_blocks = nn.ModuleList([nn.ModuleList(down)])
        self.mid_blocks = nn.ModuleList(nn.ModuleList(stage(width)) for _ in range(num_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList(up)])
        self.final_block = CausalBlock1D(width, width)
        self.final_proj = nn.Conv1d(width, out_channels, 1)

    def attention_bias(self, mask: Tensor, streaming: bool | Tensor) -> Tensor | None:
        """Additive attention bias (0 = allowed, -inf = blocked), or None for full attention.

        A bool `streaming` means one request without padding (plus its unconditioned copy): it
        gets a [T, T] chunk mask, or None. A [B] bool tensor means a batch of requests,
        right-padded where mask [B, 1, T] is 0: it gets [B, 1, T, T], where no query sees padded
        keys and streaming rows see only their own and earlier chunks.
        """
        length = mask.shape[-1]
        chunked = self.static_chunk_size > 0
        if isinstance(streaming, bool):
            if not streaming or not chunked:
                return None
            allowed = chunk_attention_mask(length, self.static_chunk_size, mask.device)   # [T, T]
        else:
            allowed = mask.bool()[:, :, None, :].expand(-1, -1, length, -1)               # [B, 1, T, T]
            if chunked:
                rows_streaming = streaming.to(mask.device)
                chunk = chunk_attention_mask(length, self.static_chunk_size, mask.device)
                allowed = allowed & (chunk | ~rows_streaming[:, None, None, None])
        return additive_bias(allowed, mask.dtype)

    @staticmethod
    def _resnet_transformers(resnet: nn.Module, transformers: nn.ModuleList, x: Tensor, mask: Tensor,
                             t_emb: Tensor, bias: Tensor | None, carry: CarryPass | None) -> Tensor:
        x = resnet(x, mask, t_emb, carry)  # [B, C, T]
        x = x.transpose(1, 2)  # [B, T, C]
        for block in transformers:
            x = block(x, bias, carry)
        return x.transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor,
                bias: Tensor | None, carry: CarryPass | None = None) -> Tensor:
        # x, mu, cond [B, 80, T]; mask [B, 1, T]; t [B]; spks [B, 80]; bias from attention_bias()
        # (the same for every step of an integration, so the caller builds it once)
        # -> [B, out_channels, T], zero on padded frames. With a carry, T are the new frames of a
        # streaming call that continues earlier ones (bias from carry.span.allowed).
        t_emb = self.time_mlp(timestep_embedding(t, self.in_channels))  # [B, time_dim]
        spks = spks[:, :, None].expand(-1, -1, x.shape[-1])
        h = torch.cat([x, mu, spks, cond], dim=1)  # [B, in_channels, T]

        resnet, transformers, conv = self.down_blocks[0]
        h = self._resnet_transformers(resnet, transformers, h, mask, t_emb, bias, carry)
        skip = h
        h = conv(h * mask, carry)

        for resnet, transformers in self.mid_blocks:
            h = self._resnet_transformers(resnet, transformers, h, mask, t_emb, bias, carry)

        resnet, transformers, conv = self.up_blocks[0]
        h = self._resnet_transformers(resnet, transformers, torch.cat([h, skip], dim=1), mask, t_emb, bias,
                                      carry)
        h = conv(h * mask, carry)

        h = self.final_block(h, mask, carry)
        return self.final_proj(h * mask) * mask
