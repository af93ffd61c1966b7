"""The flow stage: speech tokens + prompt + speaker vector -> mel spectrogram.

CausalMaskedDiffWithXvec (CosyVoice2) and CausalMaskedDiffWithDiT (CosyVoice3) differ only in how
the token embeddings become the decoder's mu, and in the decoder's estimator.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .carry import CarryPass, FlowCarry, Span
from .cfm import CausalConditionalCFM
from .encoder import PreLookaheadLayer, UpsampleConformerEncoder


class TokenToMelFlow(nn.Module):
    """What both flow generations share: speaker projection, token embedding, the prompt as the
    decoder's condition, the decoder call, and cutting the prompt frames from its output.

    The prompt's tokens and mel are prepended, so the decoder continues the prompt's voice.
    Subclasses turn the embedded tokens into mu at mel rate (`encode`) and set `self.decoder`.
    `input_frame_rate` (tokens per second) is kept for callers; the model itself does not need it.
    """

    decoder: CausalConditionalCFM

    def __init__(self, input_size: int, output_size: int, spk_embed_dim: int, vocab_size: int,
                 input_frame_rate: int, token_mel_ratio: int, pre_lookahead_len: int):
        super().__init__()
        self.input_frame_rate = input_frame_rate
        self.token_mel_ratio = token_mel_ratio  # mel frames per token
        self.pre_lookahead_len = pre_lookahead_len
        self.output_size = output_size      # mel bins
        self.spk_embed_dim = spk_embed_dim  # speaker vector width
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)

    def encode(self, x: Tensor, context: Tensor | None, streaming: bool,
               carry: tuple[CarryPass, CarryPass] | None = None) -> Tensor:
        """Embedded tokens x [1, M, input_size] (context: the next pre_lookahead_len tokens, or None
        for zeros) -> mu [1, token_mel_ratio * M, output_size]. With a carry (token-rate and
        mel-rate passes) x are the tokens after those the carry holds."""
        raise NotImplementedError

    @property
    def carry_chunk_tokens(self) -> int:
        """Tokens per attention chunk of a streaming call, the unit in which a FlowCarry holds
        state; 0 when this flow cannot carry state (no chunked attention to make it causal)."""
        chunk = getattr(self.decoder.estimator, "static_chunk_size", 0)
        if chunk <= 0 or chunk % self.token_mel_ratio:
            return 0
        return chunk // self.token_mel_ratio

    @torch.inference_mode()
    def prepare_cfm_inputs(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                           streaming: bool, finalize: bool,
                           carry: FlowCarry | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The decoder's inputs (mu [1, 80, T], spks [1, 80], cond [1, 80, T], mask [1, 1, T]).

        T = token_mel_ratio * M, with M = P + N tokens. When not finalizing, M = P + N - pre_lookahead_len:
        the last tokens then only serve as right context for the ones before them. With a carry
        (streaming, not finalizing) only the frames after `carry.tokens` tokens are prepared, and
        the carry then holds every token up to the last complete attention chunk.
        """
        weight = self.input_embedding.weight
        device, dtype = weight.device, weight.dtype
        embedding = F.normalize(embedding.to(device, dtype), dim=1)
        spks = self.spk_embed_affine_layer(embedding)  # [1, 80]

        tokens = torch.cat([prompt_token, token], dim=1).to(device).long().clamp(min=0)  # [1, P+N]
        start = 0
        if carry is not None:
            if finalize or not streaming:
                raise ValueError("only non-final streaming calls carry state")
            start = carry.tokens
            encoded = tokens.shape[1] - self.pre_lookahead_len
            if not 0 <= start < encoded:
                raise ValueError(f"this stream holds {start} tokens; a call with {encoded} has none to add")
            tokens = tokens[:, start:]
        x = self.input_embedding(tokens)  # [1, P+N, input_size] (with a carry, those after `start`)
        context = None
        if not finalize:
            x, context = x[:, :-self.pre_lookahead_len], x[:, -self.pre_lookahead_len:]
        if carry is None:
            mu = self.encode(x, context, streaming)  # [1, T, 80]
        else:
            length = x.shape[1]
            chunk = self.carry_chunk_tokens
            if chunk == 0:
                raise ValueError("this flow cannot carry streaming state (its decoder has no chunk attention)")
            ratio = self.token_mel_ratio
            token_span = Span.chunked([start], [length], chunk)
            frame_span = Span([ratio * start], [ratio * length], [ratio * token_span.commits[0]])
            mu = self.encode(x, context, streaming, (CarryPass(token_span, [carry.token_layers]),
                                                     CarryPass(frame_span, [carry.frame_layers])))
            carry.tokens = token_span.commits[0]

        first_frame = self.token_mel_ratio * start
        prompt_frames = prompt_feat.shape[1]
        cond = torch.zeros_like(mu)
        if prompt_frames > first_frame:
            cond[:, :prompt_frames - first_frame] = prompt_feat[:, first_frame:].to(device, dtype)
        mask = torch.ones(1, 1, mu.shape[1], device=device, dtype=dtype)
        return mu.transpose(1, 2), spks, cond.transpose(1, 2), mask

    @torch.inference_mode()
    def inference(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                  streaming: bool, finalize: bool, n_timesteps: int = 10,
                  decoder: Callable[..., Tensor] | None = None, carry: FlowCarry | None = None) -> Tensor:
        """token [1, N], prompt_token [1, P], prompt_feat [1, T_p, 80], embedding [1, 192]
        -> mel [1, 80, T - T_p] float32 for the new tokens only.

        `decoder` stands in for `self.decoder` (same call; cosyvoice.concurrency.flow_batching batches it
        across requests). `carry` (non-final streaming calls of one request, in order) holds what
        the earlier calls computed: only the frames after those it holds are computed, and the
        result starts at generated frame `max(0, frames held before the call - T_p)`.
        """
        first_frame = 0 if carry is None else carry.decoder.frames
        if carry is not None and first_frame != self.token_mel_ratio * carry.tokens:
            raise ValueError("this stream's flow state is inconsistent (a call failed midway?)")
        mu, spks, cond, mask = self.prepare_cfm_inputs(token, prompt_token, prompt_feat, embedding,
                                                       streaming, finalize, carry)
        run = decoder or self.decoder
        if carry is None:
            mel = run(mu, mask, spks, cond, n_timesteps=n_timesteps, streaming=streaming)
        else:
            mel = run(mu, mask, spks, cond, n_timesteps=n_timesteps, streaming=streaming, carry=carry.decoder)
        return mel[:, :, max(0, prompt_feat.shape[1] - first_frame):]


class CausalMaskedDiffWithXvec(TokenToMelFlow):
    """CosyVoice2: a chunk-causal conformer encoder (which upsamples to mel rate) and a linear
    projection to mel width give mu; the decoder's estimator is a U-Net."""

    def __init__(self, input_size: int, output_size: int, spk_embed_dim: int, vocab_size: int,
                 input_frame_rate: int, token_mel_ratio: int, pre_lookahead_len: int,
                 encoder: UpsampleConformerEncoder, decoder: CausalConditionalCFM):
        if encoder.upsample_stride != token_mel_ratio:
            raise ValueError(f"flow token_mel_ratio={token_mel_ratio} but the encoder upsamples "
                             f"x{encoder.upsample_stride}")
        if encoder.pre_lookahead_len != pre_lookahead_len:
            raise ValueError(f"flow pre_lookahead_len={pre_lookahead_len} but the encoder looks ahead "
                             f"{encoder.pre_lookahead_len} frames")
        super().__init__(input_size, output_size, spk_embed_dim, vocab_size, input_frame_rate, token_mel_ratio,
                         pre_lookahead_len)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size, output_size)
        self.decoder = decoder

    @property
    def carry_chunk_tokens(self) -> int:
        # The encoder's attention chunks must end where the decoder's do.
        chunk = super().carry_chunk_tokens
        encoder_chunk = self.encoder.static_chunk_size
        return chunk if encoder_chunk > 0 and chunk % encoder_chunk == 0 else 0

    def encode(self, x: Tensor, context: Tensor | None, streaming: bool,
               carry: tuple[CarryPass, CarryPass] | None = None) -> Tensor:
        return self.encoder_proj(self.encoder(x, context, streaming, carry))  # [1, T, 80]


class CausalMaskedDiffWithDiT(TokenToMelFlow):
    """CosyVoice3: no encoder. mu is the token embedding after the PreLookaheadLayer, each token
    repeated token_mel_ratio times; the decoder's estimator is a DiT."""

    def __init__(self, input_size: int, output_size: int, spk_embed_dim: int, vocab_size: int,
                 input_frame_rate: int, token_mel_ratio: int, pre_lookahead_len: int,
                 pre_lookahead_layer: PreLookaheadLayer, decoder: CausalConditionalCFM):
        if input_size != output_size:
            raise ValueError(f"flow input_size={input_size} must equal output_size={output_size}: "
                             "CosyVoice3 feeds the token embedding to the decoder without a projection")
        if pre_lookahead_layer.channels != input_size:
            raise ValueError(f"flow input_size={input_size} but the pre-lookahead layer has "
                             f"{pre_lookahead_layer.channels} channels")
        if pre_lookahead_layer.lookahead != pre_lookahead_len:
            raise ValueError(f"flow pre_lookahead_len={pre_lookahead_len} but the pre-lookahead layer looks "
                             f"ahead {pre_lookahead_layer.lookahead} frames")
        super().__init__(input_size, output_size, spk_embed_dim, vocab_size, input_frame_rate, token_mel_ratio,
                         pre_lookahead_len)
        self.pre_lookahead_layer = pre_lookahead_layer
        self.decoder = decoder

    def encode(self, x: Tensor, context: Tensor | None, streaming: bool,
               carry: tuple[CarryPass, CarryPass] | None = None) -> Tensor:
        tokens = None if carry is None else carry[0]
        h = self.pre_lookahead_layer(x, context, tokens)  # [1, M, 80]; no chunking, `streaming` has no effect
        return torch.repeat_interleave(h, self.token_mel_ratio, dim=1)  # [1, ratio * M, 80]
