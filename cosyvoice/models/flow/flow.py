"""The flow stage: speech tokens + prompt + speaker vector -> mel spectrogram.

CausalMaskedDiffWithXvec (CosyVoice2) and CausalMaskedDiffWithDiT (CosyVoice3) differ only in how
the token embeddings become the decoder's mu, and in the decoder's estimator.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    def encode(self, x: Tensor, context: Tensor | None, streaming: bool) -> Tensor:
        """Embedded tokens x [1, M, input_size] (context: the next pre_lookahead_len tokens, or None
        for zeros) -> mu [1, token_mel_ratio * M, output_size]."""
        raise NotImplementedError

    @torch.inference_mode()
    def prepare_cfm_inputs(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                           streaming: bool, finalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The decoder's inputs (mu [1, 80, T], spks [1, 80], cond [1, 80, T], mask [1, 1, T]).

        T = token_mel_ratio * M, with M = P + N tokens. When not finalizing, M = P + N - pre_lookahead_len:
        the last tokens then only serve as right context for the ones before them.
        """
        weight = self.input_embedding.weight
        device, dtype = weight.device, weight.dtype
        embedding = F.normalize(embedding.to(device, dtype), dim=1)
        spks = self.spk_embed_affine_layer(embedding)  # [1, 80]

        tokens = torch.cat([prompt_token, token], dim=1).to(device).long().clamp(min=0)  # [1, P+N]
        x = self.input_embedding(tokens)  # [1, P+N, input_size]
        context = None
        if not finalize:
            x, context = x[:, :-self.pre_lookahead_len], x[:, -self.pre_lookahead_len:]
        mu = self.encode(x, context, streaming)  # [1, T, 80]

        prompt_frames = prompt_feat.shape[1]
        cond = torch.zeros_like(mu)
        cond[:, :prompt_frames] = prompt_feat.to(device, dtype)
        mask = torch.ones(1, 1, mu.shape[1], device=device, dtype=dtype)
        return mu.transpose(1, 2), spks, cond.transpose(1, 2), mask

    @torch.inference_mode()
    def inference(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                  streaming: bool, finalize: bool, n_timesteps: int = 10,
                  decoder: Callable[..., Tensor] | None = None) -> Tensor:
        """token [1, N], prompt_token [1, P], prompt_feat [1, T_p, 80], embedding [1, 192]
        -> mel [1, 80, T - T_p] float32 for the new tokens only.

        `decoder` stands in for `self.decoder` (same call; cosyvoice.concurrency.flow_batching batches it
        across requests).
        """
        mu, spks, cond, mask = self.prepare_cfm_inputs(token, prompt_token, prompt_feat, embedding,
                                                       streaming, finalize)
        mel = (decoder or self.decoder)(mu, mask, spks, cond, n_timesteps=n_timesteps, streaming=streaming)
        return mel[:, :, prompt_feat.shape[1]:]


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

    def encode(self, x: Tensor, context: Tensor | None, streaming: bool) -> Tensor:
        return self.encoder_proj(self.encoder(x, context, streaming))  # [1, T, 80]


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

    def encode(self, x: Tensor, context: Tensor | None, streaming: bool) -> Tensor:
        h = self.pre_lookahead_layer(x, context)  # [1, M, 80]; no chunking, so `streaming` has no effect
        return torch.repeat_interleave(h, self.token_mel_ratio, dim=1)  # [1, ratio * M, 80]
