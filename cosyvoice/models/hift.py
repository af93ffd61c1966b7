"""HiFT vocoder: mel -> f0 -> harmonic excitation -> NSF + iSTFT generator -> waveform.

Three parts, in the order data flows through them:
  ConvRNNF0Predictor  mel [B, C_mel, T]                 -> f0 in Hz [B, T]
  SourceModule        f0 per sample [B, L, 1] + noise   -> excitation [B, L, 1]
  HiFTGenerator       mel + excitation                  -> waveform [B, L]
where L = T * prod(upsample_rates) * istft hop (480 samples per frame for CosyVoice2).

`HiFTBase` holds what CosyVoice2's generator and CosyVoice3's causal one (`causal_hift.py`) share:
the source STFT, the upsampling stages that fuse it in, the spectrum head with its iSTFT, and
checkpoint handling. Every size comes from the constructor arguments, i.e. from the model's yaml.
"""
from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm


def normalize_hift_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drops the `generator.` that checkpoints saved from the GAN training wrapper carry in their keys."""
    return {key.replace("generator.", ""): value for key, value in state_dict.items()}


class Snake(nn.Module):
    """Periodic activation x + sin^2(alpha * x) / alpha, with one learned alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C, T]
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(alpha * x).pow(2)


class CausalConv1d(nn.Conv1d):
    """Conv1d padded with (kernel - 1) * dilation zeros on one side only, so length is kept.

    side "left": output t sees inputs up to t (causal). side "right": output t sees inputs up to
    t + pad (look-ahead); `forward(x, context=True)` then takes the look-ahead from the last `pad`
    frames of x instead of zeros, and returns `pad` frames fewer.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 side: str = "left"):
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', not {side!r}")
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.pad = (kernel_size - 1) * dilation
        self.side = side

    def forward(self, x: Tensor, context: bool = False) -> Tensor:  # [B, C, T] -> [B, C', T] (T - pad with context)
        if self.side == "left":
            x = F.pad(x, (self.pad, 0))
        elif not context:
            x = F.pad(x, (0, self.pad))
        return super().forward(x)


class ResBlock(nn.Module):
    """For each dilation: snake, dilated conv, snake, plain conv, then add the residual.

    The convs are centred (CosyVoice2) or, with `causal`, left-padded (CosyVoice3).
    """

    def __init__(self, channels: int, kernel_size: int, dilations: list[int], causal: bool = False):
        super().__init__()

        def conv(dilation: int) -> nn.Module:
            if causal:
                return weight_norm(CausalConv1d(channels, channels, kernel_size, dilation=dilation))
            return weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=dilation,
                                         padding=dilation * (kernel_size - 1) // 2))

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C, T]
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    """Five weight-normed k3 convs with ELU, then a per-frame linear head; |output| is f0 in Hz."""

    num_layers = 5

    def __init__(self, num_class: int, in_channels: int, cond_channels: int):
        super().__init__()
        layers = []
        for i in range(self.num_layers):
            conv = nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, kernel_size=3, padding=1)
            layers += [weight_norm(conv), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: Tensor) -> Tensor:  # [B, C_mel, T] -> [B, T] (num_class 1)
        x = self.condnet(mel).transpose(1, 2)  # [B, T, C]
        return self.classifier(x).squeeze(-1).abs()


@dataclass
class SourceNoise:
    """The random tensors one vocoder call consumes, in the order they are drawn.

    Pass one to `HiFTGenerator.inference` to replay recorded draws instead of sampling.
    """

    rand_ini: Tensor      # [B, H] uniform initial phases (they end up having no effect on the output)
    sine_noise: Tensor    # [B, L, H] standard normal, added to the sines
    source_noise: Tensor  # [B, L, 1] standard normal; drawn for a noise branch whose output is unused

    @classmethod
    def draw(cls, batch: int, length: int, harmonics: int, device: torch.device,
             generator: torch.Generator | None = None) -> "SourceNoise":
        rand_ini = torch.rand(batch, harmonics, device=device, generator=generator)
        # Filled in harmonic-major memory order: a non-contiguous fill, so element by element on CPU.
        # This reproduces the reference draws value for value; a plain randn(B, L, H) would not.
        sine_noise = torch.empty(batch, harmonics, length, device=device).transpose(1, 2)
        sine_noise.normal_(generator=generator)
        source_noise = torch.randn(batch, length, 1, device=device, generator=generator)
        return cls(rand_ini, sine_noise, source_noise)


class SineGen(nn.Module):
    """Sines at f0 and its overtones, plus noise; the phase is accumulated at frame rate.

    The per-sample phase increment is averaged down to one value per frame, summed, and
    interpolated back up (`phase_upsample`: "linear" for CosyVoice2, "nearest" for CosyVoice3's
    causal generator), which keeps the phase smooth where f0 jumps between frames.
    """

    def __init__(self, sampling_rate: int, samples_per_frame: int, num_harmonics: int,
                 sine_amp: float, noise_std: float, voiced_threshold: float, phase_upsample: str = "linear"):
        super().__init__()
        self.sampling_rate = sampling_rate
        self.samples_per_frame = samples_per_frame
        self.num_harmonics = num_harmonics  # overtones, not counting the fundamental
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold
        self.phase_upsample = phase_upsample

    def forward(self, f0: Tensor, noise: SourceNoise) -> tuple[Tensor, Tensor]:
        # f0: [B, L, 1] Hz per sample -> sine_waves [B, L, H], uv [B, L, 1] with H = num_harmonics + 1
        rand_ini = noise.rand_ini.clone()
        rand_ini[:, 0] = 0  # the fundamental starts at phase 0
        sine_waves, uv, _ = self.generate(f0, rand_ini, noise.sine_noise)
        return sine_waves, uv

    def generate(self, f0: Tensor, rand_ini: Tensor | None, unit_noise: Tensor,
                 cycles: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """f0 [B, L, 1], initial phases [B or 1, H], noise before scaling [B or 1, L, H]
        -> (sine_waves [B, L, H], uv [B, L, 1], scaled noise [B, L, H]).

        `cycles` [B, H, 1] float64 continues an earlier call (its f0 ended where this one starts):
        the running sum of phase increments, updated in place. Torch's CPU cumsum keeps its sum in
        float64, so carrying it that way gives the bits of one call over both. `rand_ini` None:
        no initial phase (a continuation does not start at sample 0).
        """
        multiples = torch.arange(1, self.num_harmonics + 2, device=f0.device, dtype=f0.dtype)
        rad = (f0 * multiples / self.sampling_rate) % 1  # [B, L, H] cycles per sample
        if rand_ini is not None:
            rad[:, 0, :] = rad[:, 0, :] + rand_ini

        up = self.samples_per_frame
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / up, mode="linear")       # [B, H, T]
        if cycles is None:
            total = torch.cumsum(rad, dim=-1)
        else:
            running = torch.cumsum(torch.cat([cycles, rad.double()], dim=-1), dim=-1)     # [B, H, 1 + T]
            cycles.copy_(running[..., -1:])
            total = running[..., 1:].to(rad.dtype)
        phase = total * 2 * math.pi                                                         # [B, H, T]
        phase = F.interpolate(phase * up, scale_factor=up, mode=self.phase_upsample)       # [B, H, L]
        sines = torch.sin(phase).transpose(1, 2) * self.sine_amp                           # [B, L, H]

        uv = (f0 > self.voiced_threshold).to(f0.dtype)  # [B, L, 1] 1 = voiced
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * unit_noise
        return sines * uv + noise, uv, noise


class SourceModule(nn.Module):
    """Merges the harmonic sines into one excitation channel: tanh(linear(sines))."""

    def __init__(self, sampling_rate: int, samples_per_frame: int, num_harmonics: int,
                 sine_amp: float, noise_std: float, voiced_threshold: float):
        super().__init__()
        self.sine_gen = SineGen(sampling_rate, samples_per_frame, num_harmonics, sine_amp, noise_std, voiced_threshold)
        self.l_linear = nn.Linear(num_harmonics + 1, 1)

    def forward(self, f0: Tensor, noise: SourceNoise) -> Tensor:  # [B, L, 1] Hz -> [B, L, 1]
        sine_waves, _ = self.sine_gen(f0, noise)
        return torch.tanh(self.l_linear(sine_waves))


class HiFTBase(nn.Module):
    """The parts of the HiFT generator that do not depend on causality.

    Subclasses build `f0_predictor`, `m_source` and `conv_pre`, then the per-stage layers with
    `_build_stages` (which asks `_make_up` / `_make_source_down` for the layers that differ and
    makes ResBlock(causal=cls.causal)), then `conv_post`; they define `decode` / `inference` around `_decode_stages`.
    """

    causal = False
    # Child modules whose weight norm `fold_weight_norm` leaves in place.
    keep_weight_norm: tuple[str, ...] = ()

    def __init__(self, upsample_rates: list[int], istft_params: dict, num_kernels: int,
                 lrelu_slope: float, audio_limit: float):
        super().__init__()
        self.n_fft = istft_params["n_fft"]
        self.hop = istft_params["hop_len"]
        self.upsample_factor = math.prod(upsample_rates)  # source STFT frames per mel frame
        self.samples_per_frame = self.upsample_factor * self.hop
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        self.num_kernels = num_kernels
        self.freq_bins = self.n_fft // 2 + 1
        self.register_buffer("window", self._periodic_hann(self.n_fft), persistent=False)

    def _build_stages(self, base_channels: int, upsample_rates: list[int], upsample_kernel_sizes: list[int],
                      resblock_kernel_sizes: list[int], resblock_dilation_sizes: list[list[int]],
                      source_resblock_kernel_sizes: list[int], source_resblock_dilation_sizes: list[list[int]]) -> int:
        """Creates ups, source_downs, source_resblocks and resblocks; returns the last stage's channels."""
        self.ups = nn.ModuleList()
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            channels = base_channels // 2 ** (i + 1)
            self.ups.append(self._make_up(2 * channels, channels, kernel, rate))
            # The source STFT runs at the final frame rate; bring it down to this stage's rate.
            self.source_downs.append(self._make_source_down(2 * self.freq_bins, channels,
                                                            math.prod(upsample_rates[i + 1:])))
            self.source_resblocks.append(ResBlock(channels, source_resblock_kernel_sizes[i],
                                                  source_resblock_dilation_sizes[i], causal=self.causal))
            for kernel_size, dilations in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock(channels, kernel_size, dilations, causal=self.causal))
        return base_channels // 2 ** len(upsample_rates)

    def _make_up(self, in_channels: int, out_channels: int, kernel_size: int, rate: int) -> nn.Module:
        raise NotImplementedError

    def _make_source_down(self, in_channels: int, out_channels: int, down: int) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def _periodic_hann(size: int) -> Tensor:
        # Computed in float64 then rounded, like a window built with numpy and cast to float32.
        return torch.hann_window(size, periodic=True, dtype=torch.float64).float()

    @staticmethod
    def prepare_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Called by the loader on the checkpoint before `load_state_dict`."""
        return normalize_hift_state_dict(state_dict)

    def fold_weight_norm(self) -> None:
        """Replaces every weight-norm parametrization by its plain weight (call after loading),
        except inside the children named in `keep_weight_norm`."""
        kept = {id(m) for name in self.keep_weight_norm for m in getattr(self, name).modules()}
        for module in self.modules():
            if id(module) not in kept and parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight")

    def _stft(self, x: Tensor) -> Tensor:  # [B, L] -> [B, 2 * bins, L / hop + 1] (real parts, then imaginary)
        spec = torch.stft(x, self.n_fft, self.hop, self.n_fft, window=self.window, return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, magnitude: Tensor, phase: Tensor) -> Tensor:  # [B, bins, F] x2 -> [B, hop * (F - 1)]
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.n_fft, self.hop, self.n_fft, window=self.window)

    def _decode_stages(self, x: Tensor, s_stft: Tensor) -> Tensor:
        """conv_pre output [B, base, T] and source STFT [B, 2 * bins, U * T + 1] -> speech [B, hop * U * T],
        not yet clamped (U = upsample_factor)."""
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.lrelu_slope))  # [B, C_i, T * prod(rates[:i+1])]
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one extra frame to match the STFT frame count
            si = self.source_resblocks[i](self.source_downs[i](s_stft))
            x = x + si
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope here, not lrelu_slope
        magnitude = torch.exp(x[:, :self.freq_bins]).clamp(max=1e2)
        phase = torch.sin(x[:, self.freq_bins:])  # sin() of the raw output, then used as an angle
        return self._istft(magnitude, phase)


class HiFTGenerator(HiFTBase):
    """Neural source-filter vocoder that predicts an STFT (log-magnitude, phase) and inverts it."""

    def __init__(self, in_channels: int, base_channels: int, nb_harmonics: int, sampling_rate: int,
                 nsf_alpha: float, nsf_sigma: float, nsf_voiced_threshold: float,
                 upsample_rates: list[int], upsample_kernel_sizes: list[int], istft_params: dict,
                 resblock_kernel_sizes: list[int], resblock_dilation_sizes: list[list[int]],
                 source_resblock_kernel_sizes: list[int], source_resblock_dilation_sizes: list[list[int]],
                 lrelu_slope: float, audio_limit: float, f0_predictor: nn.Module):
        if sampling_rate == 22050:
            raise ValueError("HiFT at 22050 Hz (CosyVoice 1) uses another sine generator, not implemented here")
        super().__init__(upsample_rates, istft_params, len(resblock_kernel_sizes), lrelu_slope, audio_limit)
        self.f0_predictor = f0_predictor
        self.m_source = SourceModule(sampling_rate, self.samples_per_frame, nb_harmonics,
                                     nsf_alpha, nsf_sigma, nsf_voiced_threshold)
        self.conv_pre = weight_norm(nn.Conv1d(in_channels, base_channels, 7, padding=3))
        last_channels = self._build_stages(base_channels, upsample_rates, upsample_kernel_sizes,
                                           resblock_kernel_sizes, resblock_dilation_sizes,
                                           source_resblock_kernel_sizes, source_resblock_dilation_sizes)
        self.conv_post = weight_norm(nn.Conv1d(last_channels, 2 * self.freq_bins, 7, padding=3))

    def _make_up(self, in_channels: int, out_channels: int, kernel_size: int, rate: int) -> nn.Module:
        return weight_norm(nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=rate,
                                              padding=(kernel_size - rate) // 2))

    def _make_source_down(self, in_channels: int, out_channels: int, down: int) -> nn.Module:
        if down == 1:
            return nn.Conv1d(in_channels, out_channels, 1)
        return nn.Conv1d(in_channels, out_channels, 2 * down, stride=down, padding=down // 2)

    def decode(self, mel: Tensor, source: Tensor) -> Tensor:
        # mel: [B, C_mel, T], source: [B, 1, L] -> speech [B, L]
        s_stft = self._stft(source.squeeze(1))  # [B, 2 * bins, L / hop + 1]
        speech = self._decode_stages(self.conv_pre(mel), s_stft)
        return speech.clamp(-self.audio_limit, self.audio_limit)

    def upsample_f0(self, f0: Tensor) -> Tensor:  # [B, T] -> [B, L, 1], each frame's value repeated
        return f0.repeat_interleave(self.samples_per_frame, dim=1).unsqueeze(-1)

    @torch.no_grad()
    def inference(self, mel: Tensor, cache_source: Tensor | None = None,
                  generator: torch.Generator | None = None,
                  noise: SourceNoise | None = None) -> tuple[Tensor, Tensor]:
        """mel [B, C_mel, T] -> (speech [B, L], source [B, 1, L]).

        cache_source [B, 1, S] overwrites the first S source samples (continuity between stream chunks).
        Random draws come from `generator` (else the global RNG) unless `noise` supplies them.
        """
        f0 = self.upsample_f0(self.f0_predictor(mel))  # [B, L, 1]
        if noise is None:
            harmonics = self.m_source.l_linear.in_features
            noise = SourceNoise.draw(f0.shape[0], f0.shape[1], harmonics, mel.device, generator)
        source = self.m_source(f0, noise).transpose(1, 2)  # [B, 1, L]
        if cache_source is not None and cache_source.shape[2] > 0:
            source[:, :, :cache_source.shape[2]] = cache_source
        return self.decode(mel, source), source
