"""State a streaming request carries from one non-final flow call to the next.

In a non-final streaming call every layer of the flow is causal at attention-chunk granularity:
convolutions look left only (or right only into the look-ahead tokens, which are real tokens),
attention sees the query's own chunk and every chunk before it, and the decoder's starting noise
is indexed by absolute frame. Frames already computed therefore do not change when tokens are
appended, and a call needs from the earlier calls only what its new frames read:

    convolution       the last (kernel - 1) input frames before the new ones (its "tail")
    attention layer   the keys and values of every earlier frame
    decoder           the above once per CFM step (x, and so every activation, differs per step)

Only whole attention chunks are kept ("committed"): a frame of an incomplete chunk would see more
keys once its chunk fills up, so the next call computes it again. The hop schedule ends every
non-final call on a chunk border, so in practice nothing is computed twice.

`LayerCarry` holds one stack's tensors for one request; `CarryPass` is one call's view over a batch
of requests (their new frames right-padded to the longest): layers ask it for their input with the
tail prepended (`causal_input`) and for all keys and values (`keys_values`), and it keeps what the
next call needs. Rows of a batch map to requests as `row % requests` (the CFM's batch is the
conditioned rows of every request, then the unconditioned ones), so a request's tensors hold
`rows_per_request` rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class LayerCarry:
    """One request's carried tensors for one stack of layers, keyed by layer: a conv's tail
    [rows, C, k - 1] or an attention layer's (keys, values) [rows, H, frames, D]. Held tensors are
    never changed in place (a call replaces them), so copies may share them."""

    def __init__(self):
        self.tensors: dict[int, Tensor | tuple[Tensor, Tensor]] = {}

    def copy(self) -> "LayerCarry":
        other = LayerCarry()
        other.tensors = dict(self.tensors)
        return other

    @property
    def nbytes(self) -> int:
        total = 0
        for value in self.tensors.values():
            for tensor in (value if isinstance(value, tuple) else (value,)):
                total += tensor.numel() * tensor.element_size()
        return total


@dataclass
class Span:
    """Where one call's new frames lie, per request: frames held before the call (`starts`), new
    frames (`lengths`), frames to hold after it (`commits`, a chunk border; 0 keeps nothing)."""
    starts: list[int]
    lengths: list[int]
    commits: list[int]
    streaming: list[bool] = field(default_factory=list)   # chunk attention per request (else full)

    def __post_init__(self):
        if not self.streaming:
            self.streaming = [True] * len(self.starts)

    @classmethod
    def chunked(cls, starts: list[int], lengths: list[int], chunk: int,
                streaming: list[bool] | None = None) -> "Span":
        """Commits every request's frames up to its last complete chunk (nothing where not streaming)."""
        streaming = streaming or [True] * len(starts)
        commits = [(s + n) // chunk * chunk if on else 0 for s, n, on in zip(starts, lengths, streaming)]
        return cls(starts, lengths, commits, streaming)

    @property
    def requests(self) -> int:
        return len(self.starts)

    @property
    def longest(self) -> int:
        return max(self.lengths)

    @property
    def prefix(self) -> int:
        """Width of the held keys in front of the new ones: the request's own count when alone,
        else the most any request holds (the others are padded)."""
        return self.starts[0] if self.requests == 1 else max(self.starts)

    def positions(self, device: torch.device) -> Tensor:
        """Absolute frame index of every new frame: [n] for one request, else [R, n_max]."""
        if self.requests == 1:
            return torch.arange(self.starts[0], self.starts[0] + self.lengths[0], device=device)
        local = torch.arange(self.longest, device=device)
        return torch.tensor(self.starts, device=device)[:, None] + local[None, :]

    def allowed(self, chunk: int, device: torch.device) -> Tensor | None:
        """Which keys each new frame attends to, True = attend, or None when every key is allowed.

        One request: [n, start + n], keys at absolute positions. Several: [R, 1, n_max, prefix + n_max],
        held keys (padded to `prefix`) then the new ones (padded to n_max). Streaming rows see every
        held frame and, of the new ones, those before the end of their own chunk; other rows see every
        real key. Padded queries see their row's keys like its last real frame does, so none is empty.
        """
        if self.requests == 1:
            start, length = self.starts[0], self.lengths[0]
            if not self.streaming[0] or chunk <= 0:
                return None
            allowed = chunk_attention_mask(length, chunk, device, start=start)
            return None if bool(allowed.all()) else allowed
        n_max, prefix = self.longest, self.prefix
        starts = torch.tensor(self.starts, device=device)[:, None, None]       # [R, 1, 1]
        lengths = torch.tensor(self.lengths, device=device)[:, None, None]
        streaming = torch.tensor(self.streaming, device=device)[:, None, None]
        query = torch.arange(n_max, device=device)[None, :, None]               # [1, n, 1]
        query = torch.minimum(query, lengths - 1)                               # padded rows act as the last
        held = torch.arange(prefix, device=device)[None, None, :] < starts     # [R, 1, prefix]
        new = torch.arange(n_max, device=device)[None, None, :]                  # [1, 1, n]
        visible_new = new < lengths
        if chunk > 0:
            chunk_end = ((starts + query) // chunk + 1) * chunk                 # [R, n, 1] absolute
            visible_new = visible_new & ((starts + new < chunk_end) | ~streaming)
        allowed = torch.cat([held.expand(-1, n_max, -1), visible_new.expand(-1, n_max, -1)], dim=2)
        return allowed[:, None]                                                 # [R, 1, n, prefix + n]


def chunk_attention_mask(length: int, chunk_size: int, device: torch.device, start: int = 0,
                         keys: int | None = None) -> Tensor:
    """[T, K] bool, True where query i may attend key j: every earlier chunk plus its own.

    Queries sit at absolute positions start..start+T-1, keys at 0..K-1 (default K = start + T).
    """
    keys = start + length if keys is None else keys
    query = torch.arange(start, start + length, device=device)
    chunk_end = (query // chunk_size + 1) * chunk_size  # first key index a query may not see
    return torch.arange(keys, device=device)[None, :] < chunk_end[:, None]


class CarryPass:
    """One call's view of its requests' carried tensors for one stack of layers."""

    def __init__(self, span: Span, carries: list[LayerCarry], rows_per_request: int = 1):
        if len(carries) != span.requests:
            raise ValueError(f"{len(carries)} carries for a span of {span.requests} requests")
        self.span = span
        self.carries = carries
        self.rows_per_request = rows_per_request

    @property
    def start(self) -> int:
        """Frames held before the call (one request)."""
        return self.span.starts[0]

    def _rows(self, per_request: list[Tensor]) -> Tensor:
        """Per-request tensors [rows_per_request, ...] -> batch rows [R * rows_per_request, ...]
        in the batch's order (row b belongs to request b % R)."""
        if len(per_request) == 1:
            return per_request[0]
        return torch.stack(per_request, dim=1).flatten(0, 1)   # [rows, R, ...] -> row-major

    def _request_rows(self, batch: Tensor, request: int) -> Tensor:
        """The batch rows of one request: [rows_per_request, ...]."""
        if self.span.requests == 1:
            return batch
        return batch[request::self.span.requests]

    def causal_input(self, layer: object, x: Tensor, pad: int) -> Tensor:
        """x [B, C, n] new input frames of a left-padded conv -> [B, C, pad + n] with the request's
        previous `pad` input frames (zeros at the start of a stream) in front; keeps the `pad`
        frames before each request's commit point for its next call."""
        if pad == 0:
            return x
        key = id(layer)
        tails = []
        for request, carry in enumerate(self.carries):
            tail = carry.tensors.get(key)
            if tail is None or self.span.starts[request] == 0:
                rows = self._request_rows(x, request)
                tail = rows.new_zeros(rows.shape[0], rows.shape[1], pad)
            tails.append(tail)
        padded = torch.cat([self._rows(tails), x], dim=2)                        # [B, C, pad + n]
        for request, carry in enumerate(self.carries):
            start, commit = self.span.starts[request], self.span.commits[request]
            if commit <= 0:
                carry.tensors.pop(key, None)
                continue
            # padded index p holds absolute frame start - pad + p; keep frames [commit - pad, commit)
            first = commit - start
            carry.tensors[key] = self._request_rows(padded, request)[:, :, first:first + pad].contiguous()
        return padded

    def keys_values(self, layer: object, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """keys, values [B, H, n, D] of the new frames -> [B, H, prefix + n, D]: every held frame's,
        then the new ones (see Span.allowed for the layout of a batch). Keeps each request's up to
        its commit point."""
        key = id(layer)
        span = self.span
        if span.requests == 1:
            held = self.carries[0].tensors.get(key)
            if held is not None and span.starts[0] > 0:
                keys = torch.cat([held[0], keys], dim=2)
                values = torch.cat([held[1], values], dim=2)
            self._keep(0, key, keys, values)
            return keys, values
        prefix = span.prefix
        batch, heads, _, dim = keys.shape
        held_k = keys.new_zeros(batch, heads, prefix, dim)
        held_v = values.new_zeros(batch, heads, prefix, dim)
        for request, carry in enumerate(self.carries):
            start = span.starts[request]
            held = carry.tensors.get(key)
            if held is not None and start > 0:
                held_k[request::span.requests, :, :start] = held[0]
                held_v[request::span.requests, :, :start] = held[1]
        for request in range(span.requests):
            start, length = span.starts[request], span.lengths[request]
            rows = slice(request, None, span.requests)
            self._keep(request, key, torch.cat([held_k[rows, :, :start], keys[rows, :, :length]], dim=2),
                       torch.cat([held_v[rows, :, :start], values[rows, :, :length]], dim=2))
        return torch.cat([held_k, keys], dim=2), torch.cat([held_v, values], dim=2)

    def _keep(self, request: int, key: int, keys: Tensor, values: Tensor) -> None:
        """Holds keys/values [rows, H, start + n, D] of absolute frames 0.. up to the commit point."""
        commit = self.span.commits[request]
        carry = self.carries[request]
        if commit <= 0:
            carry.tensors.pop(key, None)
        elif commit == keys.shape[2]:
            carry.tensors[key] = (keys, values)
        else:
            carry.tensors[key] = (keys[:, :, :commit].contiguous(), values[:, :, :commit].contiguous())


class DecoderCarry:
    """One request's carried state in the flow decoder: a LayerCarry per CFM step, and how many
    frames (from frame 0 of prompt + generated) they hold."""

    def __init__(self):
        self.frames = 0
        self.steps: list[LayerCarry] = []

    def for_steps(self, n_timesteps: int) -> list[LayerCarry]:
        if not self.steps:
            self.steps = [LayerCarry() for _ in range(n_timesteps)]
        elif len(self.steps) != n_timesteps:
            raise ValueError(f"this stream's decoder state is for {len(self.steps)} steps, "
                             f"not {n_timesteps}")
        return self.steps

    @property
    def nbytes(self) -> int:
        return sum(step.nbytes for step in self.steps)

    def copy(self) -> "DecoderCarry":
        other = DecoderCarry()
        other.frames = self.frames
        other.steps = [step.copy() for step in self.steps]
        return other


class FlowCarry:
    """Everything one streaming request carries between its non-final flow calls.

    `tokens`: prompt + generated tokens whose frames are held (a multiple of the attention chunk).
    `token_layers` / `frame_layers`: the encoder's state at token and at mel rate (CosyVoice2's
    conformer stacks and convolutions; CosyVoice3 has only the pre-lookahead convolution).
    `decoder`: the CFM decoder's state, `decoder.frames` = tokens * token_mel_ratio.
    """

    def __init__(self):
        self.tokens = 0
        self.token_layers = LayerCarry()
        self.frame_layers = LayerCarry()
        self.decoder = DecoderCarry()

    @property
    def nbytes(self) -> int:
        return self.token_layers.nbytes + self.frame_layers.nbytes + self.decoder.nbytes

    def copy(self) -> "FlowCarry":
        """An independent carry that starts from this one's state (the tensors are shared)."""
        other = FlowCarry()
        other.tokens = self.tokens
        other.token_layers = self.token_layers.copy()
        other.frame_layers = self.frame_layers.copy()
        other.decoder = self.decoder.copy()
        return other
