"""DiT: the vector-field estimator of the CosyVoice3 flow-matching decoder.

A diffusion transformer over time, conditioned on the flow time t by adaptive LayerNorm:

    [x, cond, mu, spks] -> Linear -> + causal conv position embedding        [B, T, dim]
    depth x DiTBlock:   x += gate * attention(modulated LN(x))  (rotary, chunk mask)
                        x += gate * feed-forward(modulated LN(x))
    modulated LN -> Linear -> velocity                                        [B, 80, T]

The call contract is the CosyVoice2 estimator's (`attention_bias` once per integration, then
`forward(x, mask, mu, t, spks, cond, bias)` per step, `out_channels`), so CausalConditionalCFM
and BatchedFlowDecoder drive either estimator. Inside, everything runs time-major, [B, T, C].

Padding (batched requests, right-padded, mask 0) never reaches a real frame: the position
convolutions are causal, attention skips padded keys, everything else is per frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .carry import CarryPass
from .estimator import CausalConditionalDecoder, CausalConv1d, timestep_embedding

TIME_FREQ_DIM = 256      # sinusoid width of the time embedding (fixed in upstream)
POS_CONV_KERNEL = 31     # causal position convolutions (fixed in upstream)
POS_CONV_GROUPS = 16
ROPE_BASE = 10000.0
NORM_EPS = 1e-6


def modulated_norm(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """LayerNorm over channels (no affine, eps 1e-6), then x * (1 + scale) + shift.

    x [B, T, C], shift/scale [B, 1, C]. Computed in float32 whatever the module dtype (the
    spec's advice for half precision: fp16 LayerNorm/modulation is where the DiT overflows);
    in float32 this is exactly the plain computation.
    """
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=NORM_EPS)
    return (normed * (1 + scale.float()) + shift.float()).to(x.dtype)


class TimestepEmbedding(nn.Module):
    """Flow time t [B] -> [B, dim]: 256 sinusoids of 1000 t, then Linear, SiLU, Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.time_mlp(timestep_embedding(t, TIME_FREQ_DIM))


class CausalConvPositionEmbedding(nn.Module):
    """Two causal grouped convolutions, each followed by Mish: [B, T, C] -> [B, T, C]."""

    def __init__(self, dim: int):
        super().__init__()
        # Sequentials keep the checkpoint names conv1.0 / conv2.0.
        self.conv1 = nn.Sequential(CausalConv1d(dim, dim, POS_CONV_KERNEL, groups=POS_CONV_GROUPS), nn.Mish())
        self.conv2 = nn.Sequential(CausalConv1d(dim, dim, POS_CONV_KERNEL, groups=POS_CONV_GROUPS), nn.Mish())

    def forward(self, x: Tensor, carry: CarryPass | None = None) -> Tensor:
        h = x.transpose(1, 2)
        for conv, mish in (self.conv1, self.conv2):
            h = mish(conv(h, carry))
        return h.transpose(1, 2)


class InputEmbedding(nn.Module):
    """Projects the stack [x, cond, mu, spks] (in that order) to the model width, plus position."""

    def __init__(self, mel_dim: int, mu_dim: int, spk_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * mel_dim + mu_dim + spk_dim, dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(dim)

    def forward(self, x: Tensor, cond: Tensor, mu: Tensor, spks: Tensor, carry: CarryPass | None = None) -> Tensor:
        # x, cond [B, T, mel_dim]; mu [B, T, mu_dim]; spks [B, spk_dim] -> [B, T, dim]
        spks = spks[:, None, :].expand(-1, x.shape[1], -1)
        h = self.proj(torch.cat([x, cond, mu, spks], dim=-1))
        return h + self.conv_pos_embed(h, carry)


class RotaryEmbedding(nn.Module):
    """Rotary angles for `dim` channels in the interleaved layout: pair (2i, 2i+1) turns by
    p * base^(-2i/dim) at position p.

    `inv_freq` is a checkpoint buffer (strict loading needs it). It stays float32 when the module
    is cast to half precision: rounded frequencies would shift late positions by a large angle
    (upstream's fp16 runs under autocast, which keeps it float32 too).
    """

    def __init__(self, dim: int, base: float = ROPE_BASE):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)   # [dim/2]
        self.register_buffer("inv_freq", inv_freq)

    def _apply(self, fn, recurse=True):
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)   # follow device moves, keep float32
        return self

    def forward(self, length: int) -> tuple[Tensor, Tensor]:
        """(cos, sin), each [T, dim] float32, angle theta_{p,i} in slots 2i and 2i+1."""
        return self.at(torch.arange(length, device=self.inv_freq.device))

    def at(self, position: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) at the given positions [...] -> [..., dim] float32 each."""
        position = position.to(self.inv_freq.device, torch.float32)
        angle = (position[..., None] * self.inv_freq.float()).repeat_interleave(2, dim=-1)
        return angle.cos(), angle.sin()


def apply_rotary(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotates the pairs (x_2i, x_2i+1) of the first rot = cos.shape[-1] channels of x [B, T, C]
    to (x_2i cos - x_2i+1 sin, x_2i+1 cos + x_2i sin); channels rot.. pass unchanged."""
    cos, sin = rope
    rot = cos.shape[-1]
    head, tail = x[..., :rot].float(), x[..., rot:]
    pairs = head.unflatten(-1, (-1, 2))                                          # [B, T, rot/2, 2]
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)    # (-x_2i+1, x_2i)
    return torch.cat([(head * cos + turned * sin).to(x.dtype), tail], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention, all projections with bias. Rotary acts on the un-split q and k,
    so only the first `dim_head` channels (head 0) carry position, as upstream."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))   # a Sequential keeps the name to_out.0

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], bias: Tensor | None, frame_mask: Tensor,
                carry: CarryPass | None = None) -> Tensor:
        # x [B, T, dim]; bias [T, K] or [B, 1, T, K] added to the scores, or None (= full attention),
        # K = T, or with a carry the held frames' keys first (K = held + T); frame_mask [B, T, 1],
        # 0 on padded frames
        batch, length, _ = x.shape

        def heads(y: Tensor) -> Tensor:   # [B, T, inner] -> [B, H, T, dim_head]
            return y.view(batch, length, self.heads, -1).transpose(1, 2)

        q = apply_rotary(self.to_q(x), rope)
        keys, values = heads(apply_rotary(self.to_k(x), rope)), heads(self.to_v(x))
        if carry is not None:
            keys, values = carry.keys_values(self, keys, values)
        out = F.scaled_dot_product_attention(heads(q), keys, values, attn_mask=bias)
        out = self.to_out(out.transpose(1, 2).reshape(batch, length, -1))   # [B, T, dim]
        return out * frame_mask


class FeedForward(nn.Module):
    """Linear -> tanh-approximate GELU -> Linear."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        # Index 1 is an empty slot (upstream's dropout) so the checkpoint names ff.0.0 / ff.2 fit.
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh")),
                                nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


class AdaLayerNormZero(nn.Module):
    """SiLU(temb) -> Linear -> six [B, 1, dim] vectors:
    (shift, scale, gate) for attention, then (shift, scale, gate) for the feed-forward."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, temb: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(temb))[:, None, :].chunk(6, dim=-1)


class AdaLayerNormFinal(nn.Module):
    """Output norm: SiLU(temb) -> Linear -> (scale, shift), scale first; modulated LN of x."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb))[:, None, :].chunk(2, dim=-1)
        return modulated_norm(x, shift, scale)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: Tensor, temb: Tensor, rope: tuple[Tensor, Tensor], bias: Tensor | None,
                frame_mask: Tensor, carry: CarryPass | None = None) -> Tensor:
        # x [B, T, dim], temb [B, dim] -> [B, T, dim]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.attn_norm(temb)
        x = x + gate_a * self.attn(modulated_norm(x, shift_a, scale_a), rope, bias, frame_mask, carry)
        return x + gate_f * self.ff(modulated_norm(x, shift_f, scale_f))


class DiT(nn.Module):
    """Predicts the flow velocity [B, out_channels, T] from x, mu, spks, cond and time t.

    `num_decoding_left_chunks` is accepted for the yaml's sake: upstream's DiT always lets a
    chunk see every chunk to its left, whatever the yaml says. `long_skip_connection` (off in
    every CosyVoice3 yaml) is not supported.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int, mel_dim: int,
                 mu_dim: int, spk_dim: int, out_channels: int, static_chunk_size: int,
                 num_decoding_left_chunks: int, long_skip_connection: bool = False):
        super().__init__()
        if long_skip_connection:
            raise ValueError("DiT: long_skip_connection=True is not supported")
        if out_channels != mel_dim:
            raise ValueError(f"DiT: out_channels={out_channels} must equal mel_dim={mel_dim} "
                             "(the velocity has the shape of x)")
        if dim % POS_CONV_GROUPS:
            raise ValueError(f"DiT: dim={dim} must be divisible by {POS_CONV_GROUPS} (position conv groups)")
        self.out_channels = out_channels
        self.static_chunk_size = static_chunk_size   # in mel frames; read by attention_bias
        self.time_embed = TimestepEmbedding(dim)
        self.input_embed = InputEmbedding(mel_dim, mu_dim, spk_dim, dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(dim, heads, dim_head, ff_mult) for _ in range(depth))
        self.norm_out = AdaLayerNormFinal(dim)
        self.proj_out = nn.Linear(dim, mel_dim)

    # The same masks as the CosyVoice2 estimator: 0 / -inf bias, chunk-causal where streaming,
    # padded keys hidden in a batch; None (full attention) for one non-streaming request.
    attention_bias = CausalConditionalDecoder.attention_bias

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor,
                bias: Tensor | None, carry: CarryPass | None = None) -> Tensor:
        # x, mu, cond [B, 80, T]; mask [B, 1, T]; t [B]; spks [B, 80]; bias from attention_bias()
        # -> [B, 80, T]. With a carry, T are the new frames of a streaming call that continues
        # earlier ones: rotary positions continue from the frames held (bias from carry.span.allowed).
        temb = self.time_embed(t)                                                     # [B, dim]
        h = self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks,
                             carry)                                                    # [B, T, dim]
        if carry is None:
            rope = self.rotary_embed(x.shape[-1])                                      # 2 x [T, dim_head]
        else:   # [T, dim_head], or [R, T, dim_head] per request -> per row (conditioned, then not)
            rope = self.rotary_embed.at(carry.span.positions(x.device))
            if rope[0].dim() == 3:
                repeat = x.shape[0] // rope[0].shape[0]
                rope = tuple(r.repeat(repeat, 1, 1) for r in rope)
        frame_mask = mask.transpose(1, 2)                                              # [B, T, 1]
        for block in self.transformer_blocks:
            h = block(h, temb, rope, bias, frame_mask, carry)
        return self.proj_out(self.norm_out(h, temb)).transpose(1, 2)
