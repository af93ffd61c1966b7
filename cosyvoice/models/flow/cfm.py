"""CausalConditionalCFM: integrates the flow-matching ODE from fixed noise to a mel spectrogram."""
from __future__ import annotations

import math
from typing import Any, Generator, TypeVar

import torch
from torch import Tensor, nn

from .carry import CarryPass, DecoderCarry, Span
from .estimator import additive_bias


class CausalConditionalCFM(nn.Module):
    """Euler integration on a cosine time grid with classifier-free guidance.

    The starting noise is drawn once, at construction, from a private generator seeded
    `noise_seed`: frame f of every request always starts from the same noise column, so a
    streaming chunk and a full run agree on the frames they share. `noise_frames` (15000 = 300 s
    of mel) caps prompt + output length; it and the seed are fixed in upstream.

    `in_channels` and `spk_emb_dim` come from the yaml but only matter in training.
    """

    def __init__(self, in_channels: int, spk_emb_dim: int, cfm_params: dict[str, Any], estimator: nn.Module,
                 noise_frames: int = 15000, noise_seed: int = 0):
        super().__init__()
        for key, supported in (("solver", "euler"), ("t_scheduler", "cosine")):
            if cfm_params.get(key) != supported:
                raise ValueError(f"CausalConditionalCFM: cfm_params {key}={cfm_params.get(key)!r} "
                                 f"is not supported (only {supported!r})")
        if "inference_cfg_rate" not in cfm_params:
            raise ValueError("CausalConditionalCFM: cfm_params needs 'inference_cfg_rate'")
        self.cfg_rate = float(cfm_params["inference_cfg_rate"])
        self.estimator = estimator
        generator = torch.Generator().manual_seed(noise_seed)
        noise = torch.randn(1, estimator.out_channels, noise_frames, generator=generator)
        self.register_buffer("rand_noise", noise, persistent=False)  # [1, 80, noise_frames]

    def forward(self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, n_timesteps: int = 10,
                streaming: bool | Tensor = False,
                carry: DecoderCarry | list[DecoderCarry | None] | None = None) -> Tensor:
        """mu, cond [B, 80, T]; mask [B, 1, T]; spks [B, 80] -> mel [B, 80, T] float32.

        B is 1, or several requests right-padded to T (mask 0 on padding) with `streaming` a [B]
        bool tensor (see the estimator's attention bias). Padding never reaches a real frame:
        convolutions are causal and attention skips padded keys.

        `carry` (one per request; None in a list for a request without one) continues a streaming
        request: mu and cond then hold only the frames after the `carry.frames` it holds, the
        result covers those frames, and the carry keeps the state of every complete attention
        chunk for the next call (cosyvoice.models.flow.carry).
        """
        return run_to_end(self.steps(mu, mask, spks, cond, n_timesteps, streaming, carry))

    def steps(self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, n_timesteps: int = 10,
              streaming: bool | Tensor = False,
              carry: DecoderCarry | list[DecoderCarry | None] | None = None,
              ) -> Generator[None, None, Tensor]:
        """forward() one Euler step at a time: yields after every step but the last and returns
        the mel, so a scheduler can run other calls in between (cosyvoice.concurrency.flow_batching)."""
        batch, length = mu.shape[0], mu.shape[-1]
        if carry is not None:
            return (yield from self._continue(mu, mask, spks, cond, n_timesteps, streaming,
                                              carry if isinstance(carry, list) else [carry]))
        if length > self.rand_noise.shape[-1]:
            raise ValueError(f"flow input of {length} mel frames exceeds the noise buffer "
                             f"({self.rand_noise.shape[-1]} frames)")
        x = self.rand_noise[:, :, :length].to(mu.dtype).expand(batch, -1, -1)
        # Rows [0, B) are conditioned, rows [B, 2B) unconditioned (mu, spks and cond zeroed; x is shared).
        streaming_in = streaming if isinstance(streaming, bool) else torch.cat([streaming, streaming])
        bias = self.estimator.attention_bias(torch.cat([mask, mask]), streaming_in)
        return (yield from self._integrate(x, mu, mask, spks, cond, n_timesteps, bias, [None] * n_timesteps))

    def _continue(self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, n_timesteps: int,
                  streaming: bool | Tensor, carries: list[DecoderCarry | None]) -> Generator[None, None, Tensor]:
        """steps() for requests with carried state: every row's frames start at its carry's."""
        if len(carries) != mu.shape[0]:
            raise ValueError(f"{len(carries)} carries for a batch of {mu.shape[0]}")
        carries = [c if c is not None else DecoderCarry() for c in carries]   # a final call: nothing held
        rows = torch.as_tensor(streaming).reshape(-1).expand(len(carries)).tolist()
        starts = [c.frames for c in carries]
        lengths = [int(n) for n in mask.reshape(len(carries), -1).sum(dim=1).tolist()]
        chunk = self.estimator.static_chunk_size
        if chunk <= 0 and any(rows):
            raise ValueError("carried streaming state needs an estimator with chunk attention")
        span = Span.chunked(starts, lengths, max(chunk, 1), rows)
        end = max(s + n for s, n in zip(starts, lengths))
        if end > self.rand_noise.shape[-1]:
            raise ValueError(f"flow input of {end} mel frames exceeds the noise buffer "
                             f"({self.rand_noise.shape[-1]} frames)")
        # Each row starts from the noise at its own absolute frames.
        frames = span.positions(mu.device).reshape(len(carries), -1).clamp(max=self.rand_noise.shape[-1] - 1)
        x = self.rand_noise[0].to(mu.device)[:, frames].transpose(0, 1).to(mu.dtype)   # [B, 80, T]
        allowed = span.allowed(chunk, mu.device)
        if allowed is not None and allowed.dim() == 4:
            allowed = torch.cat([allowed, allowed])           # conditioned rows, then unconditioned
        bias = None if allowed is None else additive_bias(allowed, mu.dtype)
        passes = [CarryPass(span, [c.for_steps(n_timesteps)[step] for c in carries], rows_per_request=2)
                  for step in range(n_timesteps)]
        mel = yield from self._integrate(x, mu, mask, spks, cond, n_timesteps, bias, passes)
        for c, commit in zip(carries, span.commits):
            c.frames = commit
        return mel

    def _integrate(self, x: Tensor, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, n_timesteps: int,
                   bias: Tensor | None, passes: list[CarryPass | None]) -> Generator[None, None, Tensor]:
        batch = mu.shape[0]
        grid = torch.linspace(0, 1, n_timesteps + 1, device=mu.device, dtype=mu.dtype)
        grid = 1 - torch.cos(grid * 0.5 * math.pi)  # cosine schedule: small steps near t=0

        # Rows [0, B) are conditioned, rows [B, 2B) unconditioned (mu, spks and cond zeroed; x is shared).
        mask_in = torch.cat([mask, mask])
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.cat([cond, torch.zeros_like(cond)])

        t, dt = grid[0], grid[1] - grid[0]
        for step in range(1, n_timesteps + 1):
            carry = passes[step - 1]
            inputs = (torch.cat([x, x]), mask_in, mu_in, t.expand(2 * batch), spks_in, cond_in, bias)
            velocity = self.estimator(*inputs) if carry is None else self.estimator(*inputs, carry=carry)
            v_cond, v_uncond = velocity[:batch], velocity[batch:]
            x = x + dt * ((1 + self.cfg_rate) * v_cond - self.cfg_rate * v_uncond)
            t = t + dt
            if step < n_timesteps:
                dt = grid[step + 1] - t  # measured from the accumulated t, as upstream does
                yield
        return x.float()


Result = TypeVar("Result")


def run_to_end(steps: Generator[None, None, Result]) -> Result:
    """Runs a step-by-step integration (CausalConditionalCFM.steps) through; returns its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
