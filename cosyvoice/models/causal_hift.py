"""CosyVoice3 HiFT vocoder: the causal variant of `hift.HiFTGenerator`, able to vocode a growing mel.

  CausalConvRNNF0Predictor  mel [B, C_mel, T] -> f0 in Hz [B, T] (float64; 3 frames of look-ahead)
  CausalSourceModule        f0 per sample [B, L, 1] -> excitation [B, L, 1] (fixed noise, no RNG)
  CausalHiFTGenerator       mel + excitation -> waveform [B, L]; 4 frames of look-ahead in conv_pre

Every other conv is causal (left-padded), so `inference(mel, finalize=False)` returns only the
samples that no later mel frame can change: 480 * (T - 8) of them, the start of a `finalize=True`
run over any longer mel with the same beginning (bit for bit where the conv backend sums in the
same order for both lengths; oneDNN on CPU does not always, leaving float32 rounding noise).

A stream need not run the vocoder over its whole mel for every chunk: `stream(new_mel, finalize,
carry)` continues from a `VocoderCarry` (each conv's last input frames, the running phase sum,
the source samples and spectrum frames the next samples still need) and returns the next
samples, the same as those of one run over the whole mel.

The excitation's noise is not drawn per call: it is a fixed uniform [0, 1) tensor of 300 s that the
reference draws once while the yaml is built, from torch's CPU generator after the flow reseeds it.
`draw_source_buffers` replays that draw (it needs sizes of the flow, which the vocoder does not
know) and `CausalHiFTGenerator.install_source_buffers` hands the result to the generator; the
noise rows are only materialised as far as the longest call so far needs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .hift import CausalConv1d, HiFTBase, SineGen

# The reference's construction-time draws between its flow reseed and the vocoder's noise buffers.
REFERENCE_SEED = 0
CFM_NOISE_SHAPE = (1, 80, 15000)       # flow CausalConditionalCFM.rand_noise (randn)
NOISE_BUFFER_SAMPLES = 300 * 24000     # rows of the sine and uv noise buffers: 300 s at 24 kHz
_MIN_MATERIALISED_ROWS = 1 << 18       # first materialisation: ~11 s of noise, 9.4 MB at 9 harmonics

_f0_cast_lock = threading.Lock()


class CausalConvRNNF0Predictor(nn.Module):
    """Five weight-normed causal convs with ELU, then a per-frame linear head; |output| is f0 in Hz.

    The first conv (kernel look_ahead + 1) looks `look_ahead` frames to the right; the others
    (kernel 3) look left only. The generator runs this module in float64.
    """

    num_layers = 5
    look_ahead = 3
    kernel_size = 3

    def __init__(self, num_class: int, in_channels: int, cond_channels: int):
        super().__init__()
        layers = [weight_norm(CausalConv1d(in_channels, cond_channels, self.look_ahead + 1, side="right")), nn.ELU()]
        for _ in range(self.num_layers - 1):
            layers += [weight_norm(CausalConv1d(cond_channels, cond_channels, self.kernel_size)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    @classmethod
    def init_draw_shapes(cls, num_class: int, in_channels: int, cond_channels: int) -> list[tuple[int, ...]]:
        """Shapes of the tensors that default initialisation fills with uniform draws, in order."""
        shapes = [(cond_channels, in_channels, cls.look_ahead + 1), (cond_channels,)]
        for _ in range(cls.num_layers - 1):
            shapes += [(cond_channels, cond_channels, cls.kernel_size), (cond_channels,)]
        return shapes + [(num_class, cond_channels), (num_class,)]

    def forward(self, mel: Tensor, finalize: bool = True,
                causal_conv: Callable[[nn.Module, Tensor], Tensor] | None = None) -> Tensor:
        """mel [B, C_mel, T] -> f0 [B, T] (num_class 1); with finalize=False the last `look_ahead`
        frames are only look-ahead and f0 has T - look_ahead frames. `causal_conv(layer, x)` runs
        the left-padded convs instead of themselves (a stream feeds them its held frames)."""
        x = self.condnet[0](mel, context=not finalize)
        for layer in self.condnet[1:]:
            x = causal_conv(layer, x) if causal_conv and isinstance(layer, CausalConv1d) else layer(x)
        return self.classifier(x.transpose(1, 2)).squeeze(-1).abs()


class LazyUniformRows:
    """Rows [0, n) of `torch.rand(1, total_rows, width, generator=g)` for a fixed start state of g,
    drawn only as far as someone has asked.

    CPU `torch.rand` fills one value after the other from the generator, so rows drawn piecewise,
    each piece continuing the generator, equal the same rows of one big draw. Materialised rows are
    kept once, on the device of the latest request, and grow at least geometrically.
    """

    def __init__(self, start_state: Tensor, total_rows: int, width: int,
                 min_rows: int = _MIN_MATERIALISED_ROWS):
        self.start_state = start_state.clone()
        self.total_rows = total_rows
        self.width = width
        self.min_rows = min_rows
        self._generator = torch.Generator()
        self._generator.set_state(self.start_state)
        self._rows = torch.empty(1, 0, width)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # copies and pickles restart from the start state, drawing again lazily
        return {"start_state": self.start_state, "total_rows": self.total_rows, "width": self.width,
                "min_rows": self.min_rows}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def materialised_rows(self) -> int:
        return self._rows.shape[1]

    def head(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """[1, n, width] float32 on `device` (default CPU)."""
        if n > self.total_rows:
            raise ValueError(f"the noise buffer holds {self.total_rows} samples; a call needs {n}")
        device = torch.device("cpu") if device is None else torch.device(device)
        rows = self._rows
        if rows.shape[1] < n or rows.device != device:
            with self._lock:
                rows = self._rows
                have = rows.shape[1]
                if have < n:
                    target = min(self.total_rows, max(n, 2 * have, self.min_rows))
                    more = torch.rand(1, target - have, self.width, generator=self._generator)
                    rows = torch.cat([rows.to(device), more.to(device)], dim=1)
                elif rows.device != device:
                    rows = rows.to(device)
                self._rows = rows
        return rows[:, :n]


@dataclass
class CausalSourceBuffers:
    """The reference's construction-time NSF noise for one set of model sizes.

    rand_ini [1, H]: initial phases (entry 0 is 0). sine_noise: rows of the [1, 300 s, H] uniform
    buffer the noise is scaled from. `uv_noise_head` replays the reference's other buffer (its
    discarded noise branch), only to check the replay: inference does not need it.
    """

    rand_ini: Tensor
    sine_noise: LazyUniformRows
    merge_init_shapes: list[tuple[int, ...]]  # SourceModule.l_linear init draws between the two buffers

    def uv_noise_head(self, n: int, chunk_rows: int = 1 << 20) -> Tensor:
        """First n rows [1, n, 1] of the reference's `torch.rand(1, total_rows, 1)` noise-branch buffer."""
        generator = torch.Generator()
        generator.set_state(self.sine_noise.start_state)
        total, width = self.sine_noise.total_rows, self.sine_noise.width
        scratch = torch.empty(1, min(chunk_rows, total), width)
        for start in range(0, total, chunk_rows):  # skip the sine noise buffer, memory-bounded
            scratch[:, :min(chunk_rows, total - start)].uniform_(generator=generator)
        for shape in self.merge_init_shapes:
            torch.empty(shape).uniform_(generator=generator)
        return torch.rand(1, n, 1, generator=generator)


def draw_source_buffers(flow_vocab_size: int, flow_input_size: int, spk_embed_dim: int, flow_output_size: int,
                        f0_num_class: int, f0_in_channels: int, f0_cond_channels: int, nb_harmonics: int = 8,
                        *, cfm_noise_shape: tuple[int, ...] = CFM_NOISE_SHAPE,
                        total_samples: int = NOISE_BUFFER_SAMPLES, seed: int = REFERENCE_SEED,
                        min_rows: int = _MIN_MATERIALISED_ROWS) -> CausalSourceBuffers:
    """Replays, on a private CPU generator, the reference's construction-time random draws from its
    flow reseed up to the vocoder's noise buffers.

    In the reference (yaml construction order) the flow's CausalConditionalCFM calls
    torch.manual_seed(seed) and draws its noise; the flow then initialises
    input_embedding = Embedding(flow_vocab_size, flow_input_size) and
    spk_embed_affine_layer = Linear(spk_embed_dim, flow_output_size); the vocoder's
    f0_predictor = CausalConvRNNF0Predictor(f0_num_class, f0_in_channels, f0_cond_channels) is
    built; then SineGen2 draws rand_ini (H = nb_harmonics + 1) and the [1, total_samples, H]
    noise. Only the generator state before that noise is kept; its rows are drawn lazily.
    """
    harmonics = nb_harmonics + 1
    generator = torch.Generator()
    generator.manual_seed(seed)
    torch.randn(cfm_noise_shape, generator=generator)
    torch.empty(flow_vocab_size, flow_input_size).normal_(generator=generator)  # nn.init.normal_
    # Linear and Conv1d default init: kaiming-uniform weight, then uniform bias.
    init_shapes = [(flow_output_size, spk_embed_dim), (flow_output_size,)]
    init_shapes += CausalConvRNNF0Predictor.init_draw_shapes(f0_num_class, f0_in_channels, f0_cond_channels)
    for shape in init_shapes:
        torch.empty(shape).uniform_(generator=generator)
    rand_ini = torch.rand(1, harmonics, generator=generator)
    rand_ini[:, 0] = 0
    sine_noise = LazyUniformRows(generator.get_state(), total_samples, harmonics, min_rows=min_rows)
    return CausalSourceBuffers(rand_ini, sine_noise, merge_init_shapes=[(1, harmonics), (1,)])


class CausalSourceModule(nn.Module):
    """Harmonic sines at the f0 (phase upsampled by nearest), plus the fixed noise, merged by
    tanh(linear(.)) into one excitation channel."""

    def __init__(self, sampling_rate: int, samples_per_frame: int, num_harmonics: int,
                 sine_amp: float, noise_std: float, voiced_threshold: float):
        super().__init__()
        self.sine_gen = SineGen(sampling_rate, samples_per_frame, num_harmonics, sine_amp, noise_std,
                                voiced_threshold, phase_upsample="nearest")
        self.l_linear = nn.Linear(num_harmonics + 1, 1)
        self.register_buffer("rand_ini", None, persistent=False)
        self.sine_noise: LazyUniformRows | None = None

    def install(self, buffers: CausalSourceBuffers) -> None:
        harmonics = self.l_linear.in_features
        if buffers.rand_ini.shape != (1, harmonics) or buffers.sine_noise.width != harmonics:
            raise ValueError(f"noise buffers for {buffers.rand_ini.shape[-1]} harmonics given to a "
                             f"source module with {harmonics}")
        self.rand_ini = buffers.rand_ini.clone()
        self.sine_noise = buffers.sine_noise

    def sine_waves(self, f0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """f0 [B, L, 1] Hz -> (sine_waves [B, L, H], uv [B, L, 1], scaled noise [B, L, H])."""
        if self.sine_noise is None:
            raise RuntimeError(
                "CausalHiFTGenerator has no noise buffers: they depend on the flow's sizes, so the loader "
                "must call hift.install_source_buffers(draw_source_buffers(...)) (or "
                "hift.replay_source_buffers(...)) with the numbers from the model's yaml")
        unit_noise = self.sine_noise.head(f0.shape[1], f0.device)
        return self.sine_gen.generate(f0, self.rand_ini.to(f0.device), unit_noise)

    def forward(self, f0: Tensor) -> Tensor:  # [B, L, 1] Hz -> [B, L, 1]
        sine_waves, _, _ = self.sine_waves(f0)
        return torch.tanh(self.l_linear(sine_waves))


class CausalHiFTGenerator(HiFTBase):
    """HiFT with causal convs, nearest+conv upsampling, a look-ahead conv_pre and fixed source noise."""

    causal = True
    # The f0 predictor keeps weight norm: the reference computes its weights in float64 from the
    # float32 g and v on every call, which folding in float32 could not reproduce.
    keep_weight_norm = ("f0_predictor",)

    def __init__(self, in_channels: int, base_channels: int, nb_harmonics: int, sampling_rate: int,
                 nsf_alpha: float, nsf_sigma: float, nsf_voiced_threshold: float,
                 upsample_rates: list[int], upsample_kernel_sizes: list[int], istft_params: dict,
                 resblock_kernel_sizes: list[int], resblock_dilation_sizes: list[list[int]],
                 source_resblock_kernel_sizes: list[int], source_resblock_dilation_sizes: list[list[int]],
                 lrelu_slope: float, audio_limit: float, conv_pre_look_right: int,
                 f0_predictor: CausalConvRNNF0Predictor):
        super().__init__(upsample_rates, istft_params, len(resblock_kernel_sizes), lrelu_slope, audio_limit)
        self.f0_predictor = f0_predictor
        self.m_source = CausalSourceModule(sampling_rate, self.samples_per_frame, nb_harmonics,
                                           nsf_alpha, nsf_sigma, nsf_voiced_threshold)
        self.conv_pre_look_right = conv_pre_look_right
        self.conv_pre = weight_norm(CausalConv1d(in_channels, base_channels, conv_pre_look_right + 1, side="right"))
        last_channels = self._build_stages(base_channels, upsample_rates, upsample_kernel_sizes,
                                           resblock_kernel_sizes, resblock_dilation_sizes,
                                           source_resblock_kernel_sizes, source_resblock_dilation_sizes)
        self.conv_post = weight_norm(CausalConv1d(last_channels, 2 * self.freq_bins, 7))

    def _make_up(self, in_channels: int, out_channels: int, kernel_size: int, rate: int) -> nn.Module:
        return weight_norm(CausalUpsample(in_channels, out_channels, kernel_size, rate))

    def _make_source_down(self, in_channels: int, out_channels: int, down: int) -> nn.Module:
        if down == 1:
            return CausalConv1d(in_channels, out_channels, 1)
        return CausalDownsample(in_channels, out_channels, down)

    @property
    def look_ahead_frames(self) -> int:
        """Mel frames at the end of a non-final call that only serve as look-ahead."""
        return self.f0_predictor.look_ahead + self.conv_pre_look_right

    # --- source noise -------------------------------------------------------------------------

    def install_source_buffers(self, buffers: CausalSourceBuffers) -> None:
        self.m_source.install(buffers)

    def replay_source_buffers(self, flow_vocab_size: int, flow_input_size: int, spk_embed_dim: int,
                              flow_output_size: int) -> None:
        """`draw_source_buffers` with this generator's own f0 predictor and harmonic sizes, installed."""
        conv = self.f0_predictor.condnet[0]
        self.install_source_buffers(draw_source_buffers(
            flow_vocab_size, flow_input_size, spk_embed_dim, flow_output_size,
            f0_num_class=self.f0_predictor.classifier.out_features, f0_in_channels=conv.in_channels,
            f0_cond_channels=conv.out_channels, nb_harmonics=self.m_source.l_linear.in_features - 1))

    # --- inference ----------------------------------------------------------------------------

    @torch.no_grad()
    def predict_f0(self, mel: Tensor, finalize: bool = True,
                   causal_conv: Callable[[nn.Module, Tensor], Tensor] | None = None) -> Tensor:
        """f0 [B, T] (finalize) or [B, T - 3], computed in float64 and returned in the mel's dtype
        (`causal_conv`: see F0Predictor.forward)."""
        predictor = self.f0_predictor
        if any(p.dtype != torch.float64 for p in predictor.parameters()):
            with _f0_cast_lock:  # the reference casts the module in place and leaves it in float64
                predictor.double()
        return predictor(mel.to(torch.float64), finalize, causal_conv).to(mel.dtype)

    def upsample_f0(self, f0: Tensor) -> Tensor:  # [B, T] -> [B, L, 1] (nearest, as torch.nn.Upsample does it)
        return F.interpolate(f0[:, None], scale_factor=self.samples_per_frame, mode="nearest").transpose(1, 2)

    def decode(self, mel: Tensor, source: Tensor, finalize: bool = True) -> Tensor:
        """mel [B, C_mel, T], source [B, 1, hop * U * T] -> speech [B, samples_per_frame * T]; with
        finalize=False the last conv_pre_look_right frames are look-ahead only and one more frame of
        output is dropped: [B, samples_per_frame * (T - conv_pre_look_right - 1)]."""
        s_stft = self._stft(source.squeeze(1))  # [B, 2 * bins, U * T + 1]
        x = self.conv_pre(mel, context=not finalize)
        if not finalize:
            s_stft = s_stft[:, :, :s_stft.shape[2] - self.upsample_factor * self.conv_pre_look_right]
        speech = self._decode_stages(x, s_stft)
        if not finalize:
            speech = speech[:, :speech.shape[1] - self.samples_per_frame]
        return speech.clamp(-self.audio_limit, self.audio_limit)

    @torch.no_grad()
    def stream(self, mel: Tensor, finalize: bool, carry: "VocoderCarry") -> Tensor:
        """The next samples of a stream: mel [B, C_mel, D] are the frames after those `carry` has
        seen -> speech [B, S]. Concatenated, the returns equal `inference` over the whole mel
        (non-final calls: its first 480 * (T - 8) samples; the final call: the rest), up to the
        conv backend's length-dependent summation order."""
        if carry.frames == 0:
            if carry.mel is not None:   # too few frames for the first non-final call came before
                mel = torch.cat([carry.mel, mel], dim=2)
                carry.mel = None
            if finalize:   # the whole utterance at once: exactly the plain run
                speech, _ = self.inference(mel, finalize=True)
                carry.frames = mel.shape[2]
                return speech[:, carry.emitted:]
            if mel.shape[2] <= self.look_ahead_frames:
                carry.mel = mel
                return mel.new_zeros(mel.shape[0], 0)
        return _CarriedRun(self, carry, finalize).run(mel)

    @torch.no_grad()
    def inference(self, mel: Tensor, finalize: bool = True) -> tuple[Tensor, Tensor]:
        """mel [B, C_mel, T] -> (speech [B, L], source [B, 1, S]).

        finalize=True: L = S = 480 * T. finalize=False (more mel will follow): the last 3 frames
        are f0 look-ahead and the 4 before them conv_pre look-ahead; L = 480 * (T - 8) samples
        that a longer call reproduces (up to conv summation order), S = 480 * (T - 3).
        """
        if not finalize and mel.shape[2] <= self.look_ahead_frames:
            raise ValueError(f"a non-final vocoder call needs more than {self.look_ahead_frames} mel "
                             f"frames, got {mel.shape[2]}")
        f0 = self.predict_f0(mel, finalize)                                 # [B, T']
        source = self.m_source(self.upsample_f0(f0)).transpose(1, 2)        # [B, 1, 480 * T']
        if not finalize:
            mel = mel[:, :, :f0.shape[1]]
        return self.decode(mel, source, finalize), source


class CausalUpsample(nn.Conv1d):
    """Nearest-neighbour upsampling by `rate`, then a conv left-padded with kernel_size - 1 zeros."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, rate: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C', rate * T]
        x = F.interpolate(x, scale_factor=self.rate, mode="nearest")
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class CausalDownsample(nn.Conv1d):
    """Conv with kernel 2 * stride and stride `stride`, left-padded with stride - 1 zeros: T -> T / stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 2 * stride, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.stride[0] - 1, 0)))


@dataclass
class VocoderCarry:
    """One stream's CausalHiFTGenerator state between `stream` calls (absolute indices count from
    the stream's first mel frame, source sample, STFT frame).

    frames: mel frames seen. mel: the last `look_ahead_frames` of them (the next call's conv_pre
    and f0 look-ahead start there). cycles [B, H, 1] float64: running sum of the harmonics'
    phase increments. source [B, L]: source samples from the first one the next STFT frame
    reads. stft_frames: STFT frames computed. tails: per conv, the input frames its next call
    reads first. spectrum [B, bins, F] complex, from frame spectrum_start: the frames the next
    samples overlap. emitted: samples returned.
    """
    frames: int = 0
    mel: Tensor | None = None
    cycles: Tensor | None = None
    source: Tensor | None = None
    stft_frames: int = 0
    tails: dict[int, Tensor] = field(default_factory=dict)
    spectrum: Tensor | None = None
    spectrum_start: int = 0
    emitted: int = 0


class _CarriedRun:
    """One `CausalHiFTGenerator.stream` call over new mel frames, continuing from a VocoderCarry.

    With T0 frames seen before and T after this call, a non-final call (like the reference's
    finalize=False run over all T frames) computes f0 up to frame T - 3, conv_pre up to T - 7 and
    STFT frames up to 120 (T - 7), and emits samples up to 480 (T - 8); the final call computes
    everything up to T with the reference's right-edge padding. Each stage starts where the
    previous call stopped, its causal convs fed their held input frames.
    """

    def __init__(self, hift: CausalHiFTGenerator, carry: VocoderCarry, finalize: bool):
        self.hift = hift
        self.carry = carry
        self.finalize = finalize
        self.first = carry.frames == 0

    # ---- convs with held input frames ----------------------------------------------------------

    def conv(self, layer: nn.Conv1d, x: Tensor, pad: int) -> Tensor:
        """A conv that pads `pad` frames on the left, on new input frames x [B, C, n]: the held
        frames (zeros at the stream start) go in front, and the inputs that no output window has
        started at yet are held for the next call."""
        tail = self.carry.tails.get(id(layer))
        if tail is None:
            tail = x.new_zeros(x.shape[0], x.shape[1], pad)
        x = torch.cat([tail, x], dim=2)
        stride, width = layer.stride[0], layer.dilation[0] * (layer.kernel_size[0] - 1) + 1
        outputs = max(0, (x.shape[2] - width) // stride + 1)
        self.carry.tails[id(layer)] = x[:, :, outputs * stride:]
        return nn.Conv1d.forward(layer, x)

    def resblock(self, block: nn.Module, x: Tensor) -> Tensor:
        for conv1, conv2, act1, act2 in zip(block.convs1, block.convs2, block.activations1, block.activations2):
            h = self.conv(conv1, act1(x), conv1.pad)
            x = x + self.conv(conv2, act2(h), conv2.pad)
        return x

    # ---- stages ----------------------------------------------------------------------------------

    def run(self, mel: Tensor) -> Tensor:
        hift, carry = self.hift, self.carry
        start = carry.frames                                     # mel frames seen before
        frames = start + mel.shape[2]
        look_ahead = hift.look_ahead_frames                      # 3 (f0) + 4 (conv_pre)
        f0_ahead = hift.f0_predictor.look_ahead
        window = mel if carry.mel is None else torch.cat([carry.mel, mel], dim=2)
        window_start = frames - window.shape[2]                  # absolute frame of window[..., 0]
        carry.mel = window[:, :, -look_ahead:]
        carry.frames = frames

        def mel_from(frame: int) -> Tensor:
            return window[:, :, frame - window_start:]

        f0_from, f0_to = max(0, start - f0_ahead), frames if self.finalize else frames - f0_ahead
        dec_from, dec_to = max(0, start - look_ahead), frames if self.finalize else frames - look_ahead
        f0 = self.f0(mel_from(f0_from)[:, :, :f0_to - f0_from + (0 if self.finalize else f0_ahead)])
        source = self.source(f0, f0_from)                                      # [B, 480 (f0_to - f0_from)]
        s_stft = self.stft(source, last_frame=hift.upsample_factor * dec_to)
        x = hift.conv_pre(mel_from(dec_from)[:, :, :dec_to - dec_from + (0 if self.finalize else hift.conv_pre_look_right)],
                          context=not self.finalize)                          # [B, base, dec_to - dec_from]
        spectrum = self.stages(x, s_stft)
        end = hift.samples_per_frame * (frames if self.finalize else frames - look_ahead - 1)
        return self.istft(spectrum, end).clamp(-hift.audio_limit, hift.audio_limit)

    def f0(self, mel: Tensor) -> Tensor:
        """f0 of the new frames [B, n] (float64 predictor, result in the mel's dtype)."""
        return self.hift.predict_f0(mel, self.finalize, lambda layer, x: self.conv(layer, x, layer.pad))

    def source(self, f0: Tensor, first_frame: int) -> Tensor:
        """Excitation samples of f0's frames [B, 480 n], continuing the phase and the noise rows."""
        hift, carry = self.hift, self.carry
        module = hift.m_source
        if module.sine_noise is None:
            module.sine_waves(f0[:, :0, None])   # raises the missing-buffers error
        f0_up = hift.upsample_f0(f0)                                        # [B, L, 1]
        first_sample = first_frame * hift.samples_per_frame
        noise = module.sine_noise.head(first_sample + f0_up.shape[1], f0.device)[:, first_sample:]
        if carry.cycles is None:
            carry.cycles = torch.zeros(f0.shape[0], module.l_linear.in_features, 1, dtype=torch.float64,
                                       device=f0.device)
        rand_ini = module.rand_ini.to(f0.device) if first_sample == 0 else None
        sine_waves, _, _ = module.sine_gen.generate(f0_up, rand_ini, noise, cycles=carry.cycles)
        return torch.tanh(module.l_linear(sine_waves)).squeeze(-1)          # [B, L]

    def stft(self, source: Tensor, last_frame: int) -> Tensor:
        """STFT frames from the first not yet computed through `last_frame` (inclusive):
        [B, 2 * bins, n], the reference's center=True frames (reflect padding at the stream's two
        ends only)."""
        hift, carry = self.hift, self.carry
        half = hift.n_fft // 2
        first = carry.stft_frames
        samples = source if carry.source is None else torch.cat([carry.source, source], dim=1)
        origin = hift.hop * first - half            # absolute sample of samples[:, 0] (before padding)
        padded = samples
        if first == 0:
            padded = F.pad(padded[:, None], (half, 0), mode="reflect")[:, 0]
            origin = 0
        if self.finalize:
            padded = F.pad(padded[:, None], (0, half), mode="reflect")[:, 0]
        spec = torch.stft(padded, hift.n_fft, hift.hop, hift.n_fft, window=hift.window, center=False,
                          return_complex=True)[:, :, :last_frame + 1 - first]
        carry.stft_frames = last_frame + 1
        keep = hift.hop * carry.stft_frames - half - origin
        carry.source = samples[:, keep:]
        return torch.cat([spec.real, spec.imag], dim=1)

    def stages(self, x: Tensor, s_stft: Tensor) -> Tensor:
        """conv_pre output and STFT frames -> complex spectrum frames [B, bins, n] (_decode_stages)."""
        hift = self.hift
        for i, up in enumerate(hift.ups):
            x = F.interpolate(F.leaky_relu(x, hift.lrelu_slope), scale_factor=up.rate, mode="nearest")
            x = self.conv(up, x, up.kernel_size[0] - 1)
            if i == len(hift.ups) - 1 and self.first:
                x = F.pad(x, (1, 0), mode="reflect")
            down = hift.source_downs[i]
            pad = down.stride[0] - 1 if isinstance(down, CausalDownsample) else down.pad
            si = self.resblock(hift.source_resblocks[i], self.conv(down, s_stft, pad))
            x = x + si
            blocks = hift.resblocks[i * hift.num_kernels:(i + 1) * hift.num_kernels]
            x = sum(self.resblock(block, x) for block in blocks) / hift.num_kernels
        x = self.conv(hift.conv_post, F.leaky_relu(x), hift.conv_post.pad)
        magnitude = torch.exp(x[:, :hift.freq_bins]).clamp(max=1e2)
        phase = torch.sin(x[:, hift.freq_bins:])
        return torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))

    def istft(self, spectrum: Tensor, end: int) -> Tensor:
        """Samples [emitted, end) by overlap-add of the spectrum frames that reach them, as
        torch.istft(center=True) over all frames computes them."""
        hift, carry = self.hift, self.carry
        n_fft, hop, half = hift.n_fft, hift.hop, hift.n_fft // 2
        if carry.spectrum is not None:
            spectrum = torch.cat([carry.spectrum, spectrum], dim=2)
        first = carry.spectrum_start
        begin = carry.emitted
        # Sample s (after the centre trim) is overlap-add index s + half, reached by frames f with
        # hop * f <= s + half < hop * f + n_fft.
        lo = max(first, -(-(begin + half - n_fft + 1) // hop))
        hi = min(first + spectrum.shape[2] - 1, (end - 1 + half) // hop)
        frames = spectrum[:, :, lo - first:hi - first + 1]
        count = frames.shape[2]
        wave = torch.fft.irfft(frames.transpose(1, 2), n=n_fft, dim=-1) * hift.window     # [B, F, n_fft]
        length = hop * (count - 1) + n_fft
        ola = torch.ops.aten.unfold_backward(wave, [wave.shape[0], length], 1, n_fft, hop)
        envelope = torch.ops.aten.unfold_backward(hift.window.pow(2).expand(1, count, n_fft), [1, length],
                                                  1, n_fft, hop)
        offset = hop * lo - half                                   # sample index of ola[:, 0]
        speech = (ola / envelope)[:, begin - offset:end - offset]
        carry.emitted = end
        next_lo = -(-(end + half - n_fft + 1) // hop)
        carry.spectrum = spectrum[:, :, max(0, next_lo - first):]
        carry.spectrum_start = max(first, next_lo)
        return speech
