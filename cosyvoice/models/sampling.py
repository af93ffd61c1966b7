"""Speech-token sampling as CosyVoice2's LLM does it.

The draws use `torch.multinomial` in the same order and on the same tensors as the reference,
so a run seeded like the reference picks the same tokens. `generator=None` uses torch's
global generator (what the reference does); a per-request `torch.Generator` keeps
concurrent requests independent.
"""
from __future__ import annotations

import torch


def nucleus_sampling(probs: torch.Tensor, top_p: float, top_k: int,
                     generator: torch.Generator | None = None) -> int:
    """Draws from the most likely tokens: at most `top_k`, stopping once `top_p` is covered.

    The token whose probability carries the running sum past `top_p` is still included,
    because the test looks at the sum *before* adding it.
    """
    # probs: [V]
    sorted_probs, sorted_ids = probs.sort(descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
    n_taken = int(((mass_before < top_p).cumprod(dim=0)).sum().clamp(min=1, max=top_k))
    pick = torch.multinomial(sorted_probs[:n_taken], 1, replacement=True, generator=generator)
    return int(sorted_ids[pick])


def random_sampling(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Draws one token from the whole distribution."""
    return int(torch.multinomial(probs, 1, replacement=True, generator=generator))


def ras_sampling(logp: torch.Tensor, decoded_tokens: list[int], *, top_p: float = 0.8,
                 top_k: int = 25, win_size: int = 10, tau_r: float = 0.1,
                 generator: torch.Generator | None = None) -> int:
    """Repetition-aware sampling: nucleus first; if the pick already occurs often enough in
    the last `win_size` generated tokens, exclude it and draw from the full distribution."""
    # logp: [V] log-probabilities (EOS already masked where generation must go on)
    top_id = nucleus_sampling(logp.softmax(dim=0), top_p, top_k, generator)
    repeats = decoded_tokens[-win_size:].count(top_id)
    if repeats >= win_size * tau_r:
        logp = logp.clone()
        logp[top_id] = -float("inf")
        top_id = random_sampling(logp.softmax(dim=0), generator)
    return top_id


def greedy_sampling(logp: torch.Tensor, decoded_tokens: list[int],
                    generator: torch.Generator | None = None) -> int:
    """The most likely token (deterministic; used by parity tests and for debugging)."""
    return int(logp.argmax())
