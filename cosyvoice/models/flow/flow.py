"""CausalMaskedDiffWithXvec: speech tokens + prompt + speaker vector -> mel spectrogram."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cfm import CausalConditionalCFM
from .encoder import UpsampleConformerEncoder


class CausalMaskedDiffWithXvec(nn.Module):
    """Token encoder (mu at mel rate) followed by the flow-matching decoder.

    The prompt's tokens and mel are prepended, so the decoder continues the prompt's voice;
    the prompt frames are cut from the output. `input_frame_rate` (tokens per second) is kept
    for callers; the model itself does not need it.
    """

    def __init__(self, input_size: int, output_size: int, spk_embed_dim: int, vocab_size: int,
                 input_frame_rate: int, token_mel_ratio: int, pre_lookahead_len: int,
                 encoder: UpsampleConformerEncoder, decoder: CausalConditionalCFM):
        super().__init__()
        if encoder.upsample_stride != token_mel_ratio:
            raise ValueError(f"flow token_mel_ratio={token_mel_ratio} but the encoder upsamples "
                             f"x{encoder.upsample_stride}")
        if encoder.pre_lookahead_len != pre_lookahead_len:
            raise ValueError(f"flow pre_lookahead_len={pre_lookahead_len} but the encoder looks ahead "
                             f"{encoder.pre_lookahead_len} frames")
        self.input_frame_rate = input_frame_rate
        self.token_mel_ratio = token_mel_ratio  # mel frames per token
        self.pre_lookahead_len = pre_lookahead_len
        self.output_size = output_size      # mel bins
        self.spk_embed_dim = spk_embed_dim  # speaker vector width
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size, output_size)
        self.decoder = decoder

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
        mu = self.encoder_proj(self.encoder(x, context, streaming))  # [1, T, 80]

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
