"""HiFT vocoder parity against the reference arrays (hift.npz and the streaming rows of e2e.npz)."""
import numpy as np
import pytest
import torch
from conftest import report_error

from cosyvoice.loading.model_dir import build_stage, load_stage, read_config
from cosyvoice.models.hift import ConvRNNF0Predictor, HiFTGenerator, SourceNoise, normalize_hift_state_dict

pytestmark = pytest.mark.parity


def build_hift(model_dir, state_dict=None) -> HiFTGenerator:
    """HiFT built from the yaml with `state_dict` (default: hift.pt) loaded strictly, weight norm NOT folded."""
    config = read_config(model_dir / "cosyvoice2.yaml")
    hift = build_stage(config, "hift").eval()
    if state_dict is None:
        state_dict = torch.load(model_dir / "hift.pt", map_location="cpu", weights_only=True)
    hift.load_state_dict(normalize_hift_state_dict(state_dict), strict=True)
    return hift


@pytest.fixture(scope="module")
def hift(model_dir) -> HiFTGenerator:
    return load_stage(model_dir, "hift", device="cpu")


@pytest.fixture(scope="module")
def ref(reference) -> dict:
    return reference("hift")


def t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def short_noise(ref) -> SourceNoise:
    return SourceNoise(t(ref["short_rand_ini"]), t(ref["short_sine_noise_randn"]), t(ref["short_source_noise_randn"]))


@pytest.mark.parametrize("mel_key, f0_key", [("mel", "f0"), ("short_mel", "short_f0")])
def test_f0_predictor(hift, ref, mel_key, f0_key):
    with torch.no_grad():
        f0 = hift.f0_predictor(t(ref[mel_key]))
    abs_err, _ = report_error(f"hift.{f0_key}", f0, ref[f0_key])
    assert abs_err < 1e-4


def test_decode_from_source(hift, ref):
    with torch.no_grad():
        speech = hift.decode(t(ref["mel"]), t(ref["source"]))
    abs_err, _ = report_error("hift.decode", speech, ref["speech_from_source"])
    assert abs_err < 1e-4


def test_inference_global_seed(hift, ref):
    torch.manual_seed(int(ref["speech_seed"][0]))
    speech, source = hift.inference(t(ref["mel"]))
    source_err, _ = report_error("hift.inference.source", source, ref["source"])
    speech_err, _ = report_error("hift.inference.speech", speech, ref["speech"])
    assert source_err < 1e-4
    assert speech_err < 1e-3


def test_inference_explicit_generator(hift, ref):
    generator = torch.Generator().manual_seed(int(ref["short_seed"][0]))
    speech, source = hift.inference(t(ref["short_mel"]), generator=generator)
    source_err, _ = report_error("hift.inference(generator).short_source", source, ref["short_source"])
    speech_err, _ = report_error("hift.inference(generator).short_speech", speech, ref["short_speech"])
    assert source_err < 1e-4
    assert speech_err < 1e-3


def test_noise_draws_follow_seed(ref):
    torch.manual_seed(int(ref["short_seed"][0]))
    length, harmonics = ref["short_sine_noise_randn"].shape[1:]
    noise = SourceNoise.draw(1, length, harmonics, torch.device("cpu"))
    for name, drawn in [("rand_ini", noise.rand_ini), ("sine_noise_randn", noise.sine_noise),
                        ("source_noise_randn", noise.source_noise)]:
        abs_err, _ = report_error(f"hift.draw.{name}", drawn, ref[f"short_{name}"])
        assert abs_err == 0


def test_injected_noise(hift, ref):
    noise = short_noise(ref)
    mel = t(ref["short_mel"])
    with torch.no_grad():
        f0 = hift.upsample_f0(hift.f0_predictor(mel))
        sine_waves, uv = hift.m_source.sine_gen(f0, noise)
    speech, source = hift.inference(mel, noise=noise)
    checks = [("short_sine_waves", sine_waves, 1e-4), ("short_uv", uv, 0.0),
              ("short_source", source, 1e-4), ("short_speech", speech, 1e-3)]
    errors = {key: report_error(f"hift.injected.{key}", actual, ref[key])[0] for key, actual, _ in checks}
    for key, _, tolerance in checks:
        assert errors[key] <= tolerance, key


def test_streaming_chunks(hift, reference):
    """Chunk by chunk as the streaming pipeline calls the vocoder: one seed, draws consumed in order."""
    e2e = reference("e2e")
    torch.manual_seed(int(e2e["vc_stream_seed"][0]))
    previous_source = None
    for i in range(len(e2e["vc_stream_chunk_samples"])):
        cache_len = int(e2e[f"vc_stream_chunk{i}_hift_cache_source_len"][0])
        cache_source = previous_source[..., previous_source.shape[-1] - cache_len:] if cache_len else None
        speech, source = hift.inference(t(e2e[f"vc_stream_chunk{i}_hift_in_mel"]), cache_source=cache_source)
        source_err, _ = report_error(f"hift.stream{i}.source", source, e2e[f"vc_stream_chunk{i}_hift_source"])
        speech_err, _ = report_error(f"hift.stream{i}.speech", speech, e2e[f"vc_stream_chunk{i}_hift_raw_speech"])
        assert source_err < 1e-4
        assert speech_err < 1e-3
        previous_source = t(e2e[f"vc_stream_chunk{i}_hift_source"])


def test_fold_weight_norm_keeps_output(model_dir, ref):
    hift = build_hift(model_dir)
    mel, source = t(ref["short_mel"]), t(ref["short_source"])
    with torch.no_grad():
        before = hift.decode(mel, source)
        hift.fold_weight_norm()
        after = hift.decode(mel, source)
    abs_err, _ = report_error("hift.fold_weight_norm", after, before)
    assert abs_err <= 1e-6
    assert not any(".parametrizations." in key for key in hift.state_dict())


def test_legacy_weight_norm_keys(model_dir, ref):
    state_dict = torch.load(model_dir / "hift.pt", map_location="cpu", weights_only=True)
    legacy = {}
    for key, value in state_dict.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        legacy["generator." + key] = value  # also exercise the GAN-wrapper prefix
    assert any(key.endswith(".weight_g") for key in legacy)
    current, old_style = build_hift(model_dir, state_dict), build_hift(model_dir, legacy)
    mel, source = t(ref["short_mel"]), t(ref["short_source"])
    with torch.no_grad():
        expected = current.decode(mel, source)
        actual = old_style.decode(mel, source)
    abs_err, _ = report_error("hift.legacy_keys", actual, expected)
    assert abs_err == 0


def test_other_sizes_give_consistent_shapes():
    """Sizes come from the constructor only: an unusual configuration still yields hop_total samples per frame."""
    hift = HiFTGenerator(
        in_channels=20, base_channels=32, nb_harmonics=5, sampling_rate=16000,
        nsf_alpha=0.1, nsf_sigma=0.003, nsf_voiced_threshold=10,
        upsample_rates=[4, 5], upsample_kernel_sizes=[8, 9], istft_params={"n_fft": 12, "hop_len": 3},
        resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3], [1, 2]],
        source_resblock_kernel_sizes=[5, 7], source_resblock_dilation_sizes=[[1, 3], [1, 3]],
        lrelu_slope=0.1, audio_limit=0.99, f0_predictor=ConvRNNF0Predictor(1, 20, 16),
    ).eval()
    frames, hop_total = 7, 4 * 5 * 3
    speech, source = hift.inference(torch.randn(1, 20, frames), generator=torch.Generator().manual_seed(0))
    assert speech.shape == (1, frames * hop_total)
    assert source.shape == (1, 1, frames * hop_total)
