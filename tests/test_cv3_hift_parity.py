"""CosyVoice3 vocoder (CausalHiFTGenerator) against the CosyVoice3 fixture: reference/hift.npz, the
vc_stream rows of reference/e2e.npz, the construction-time noise buffers of official_size_noise.npz
and the official key list in full_size_keys.json; plus the streaming properties the runtime relies
on (a non-final call is the start of a final one, and never depends on later frames).

Sizes come only from the fixture arrays, the yaml and full_size_keys.json (the official-size
numbers are those of the official yaml), so the same tests run on any fixture set.
"""
import copy
import json

import numpy as np
import pytest
import torch

from conftest import report_error
from cosyvoice.loading import registry
from cosyvoice.loading.config import YamlConfig
from cosyvoice.loading.model_dir import load_checkpoint
from cosyvoice.models.causal_hift import (CausalConvRNNF0Predictor, CausalHiFTGenerator, LazyUniformRows,
                                          draw_source_buffers)

pytestmark = pytest.mark.parity

FP32_EPS = float(torch.finfo(torch.float32).eps)
FP64_EPS = float(torch.finfo(torch.float64).eps)
F0_FLOAT64_REL_TOL = 1e6 * FP64_EPS  # float64 convs, only the summation order may differ (seen: 0)
F0_FLOAT32_REL_TOL = 2 * FP32_EPS    # the float64 f0 rounded to float32: at most a rounding flip (seen: 0)
# The excitation is a deterministic function of f0 and the fixed noise; a float32 f0 that rounds the
# other way shifts the accumulated phase of later samples, so allow the vocoder bound (seen: 0).
SOURCE_ABS_TOL = 1e-4
# Vocoder waveform from a given mel/source: the bound (spec 9: 1e-4) where float32 allows it.
# With the fixture's random weights conv_post reaches |x| ~ 10-20 (exp clipped at 100, sin of a
# 20 rad angle), so float32 rounding alone moves the waveform by ~5e-4, measured against a float64
# run of the same weights; the reference carries the same noise (its distance to our float64 run
# was 0.9-2.1x that floor). The bound is therefore max(1e-4, 4 x the measured floor): still two
# orders of magnitude below any structural mistake (wrong padding or trim: errors ~0.1-1).
WAVEFORM_ABS_TOL = 1e-4
NOISE_FLOOR_FACTOR = 4

# The official Fun-CosyVoice3-0.5B yaml (spec 1.2): flow sizes that feed the noise replay, and hift.
OFFICIAL_FLOW = dict(flow_vocab_size=6561, flow_input_size=80, spk_embed_dim=192, flow_output_size=80)
OFFICIAL_F0 = dict(num_class=1, in_channels=80, cond_channels=512)
OFFICIAL_HIFT = dict(
    in_channels=80, base_channels=512, nb_harmonics=8, sampling_rate=24000, nsf_alpha=0.1, nsf_sigma=0.003,
    nsf_voiced_threshold=10, upsample_rates=[8, 5, 3], upsample_kernel_sizes=[16, 11, 7],
    istft_params={"n_fft": 16, "hop_len": 4}, resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], source_resblock_kernel_sizes=[7, 7, 11],
    source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], lrelu_slope=0.1, audio_limit=0.99,
    conv_pre_look_right=4)


def yaml_flow_sizes(config: YamlConfig) -> dict:
    """The flow numbers `replay_source_buffers` needs, as the loader reads them from the yaml."""
    flow = config.resolve("flow").kwargs
    return dict(flow_vocab_size=flow["vocab_size"], flow_input_size=flow["input_size"],
                spk_embed_dim=flow["spk_embed_dim"], flow_output_size=flow["output_size"])


def build_cv3_hift(model_dir, fold: bool = True, buffers: bool = True) -> CausalHiFTGenerator:
    """The hift stage of a CosyVoice3 model dir with its weights (strict), eval mode, noise installed."""
    config = YamlConfig.from_file(model_dir / "cosyvoice3.yaml")
    hift = registry.build(config.resolve("hift"), where=f"{config.source}: hift")
    load_checkpoint(hift, model_dir / "hift.pt")
    if fold:
        hift.fold_weight_norm()
    if buffers:
        hift.replay_source_buffers(**yaml_flow_sizes(config))
    return hift.eval()


def t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


@pytest.fixture(scope="module")
def hift(cv3_model_dir) -> CausalHiFTGenerator:
    return build_cv3_hift(cv3_model_dir)


@pytest.fixture(scope="module")
def hift64(hift) -> CausalHiFTGenerator:
    """The same weights in float64: measures how much float32 rounding alone moves the waveform."""
    return copy.deepcopy(hift).double()


@pytest.fixture(scope="module")
def ref(cv3_reference) -> dict:
    return cv3_reference("hift")


@pytest.fixture(scope="module")
def e2e(cv3_reference) -> dict:
    return cv3_reference("e2e")


@pytest.fixture(scope="module")
def vocode(hift, hift64):
    """vocode(mel, finalize) -> (speech, source), each distinct call computed once.

    vocode.noise_floor(mel) -> max |float32 - float64| of the final decode of `mel` (same weights,
    same source): how much float32 rounding alone moves this waveform. Measured once per reference
    stream, on its longest final call, and used for every call of that stream.
    """
    cache = {}

    def key(mel: np.ndarray, finalize: bool):
        return mel.shape, finalize, mel.tobytes()

    def run(mel: np.ndarray, finalize: bool):
        if key(mel, finalize) not in cache:
            cache[key(mel, finalize)] = hift.inference(t(mel), finalize)
        return cache[key(mel, finalize)]

    def noise_floor(mel: np.ndarray) -> float:
        if ("floor",) + key(mel, True) not in cache:
            speech, source = run(mel, True)
            with torch.no_grad():
                exact = hift64.decode(t(mel).double(), source.double())
            cache[("floor",) + key(mel, True)] = float((speech.double() - exact).abs().max())
        floor = cache[("floor",) + key(mel, True)]
        print(f"[parity] float32 noise floor of a final call on {mel.shape[2]} frames: {floor:.3e}")
        return floor

    run.noise_floor = noise_floor
    return run


def waveform_tolerance(noise_floor: float) -> float:
    return max(WAVEFORM_ABS_TOL, NOISE_FLOOR_FACTOR * noise_floor)


def check_call(name: str, vocode, mel: np.ndarray, finalize: bool, speech_ref: np.ndarray,
               source_ref: np.ndarray, noise_floor: float) -> torch.Tensor:
    speech, source = vocode(mel, finalize)
    speech_err, _ = report_error(f"cv3.hift.{name}.speech", speech, speech_ref)
    source_err, _ = report_error(f"cv3.hift.{name}.source", source, source_ref)
    assert speech_err <= waveform_tolerance(noise_floor), name
    assert source_err <= SOURCE_ABS_TOL, name
    return speech


# --- construction: keys and noise buffers -------------------------------------------------------

def test_state_dict_keys_match_official_size(cv3_fixture_dir):
    expected = json.loads((cv3_fixture_dir / "reference" / "full_size_keys.json").read_text())["hift"]
    with torch.device("meta"):
        hift = CausalHiFTGenerator(**OFFICIAL_HIFT, f0_predictor=CausalConvRNNF0Predictor(**OFFICIAL_F0))
    state = hift.state_dict()
    shapes = {key: list(value.shape) for key, value in state.items()}
    assert sorted(shapes) == sorted(expected["keys"])
    assert shapes == expected["keys"]
    assert len(state) == expected["n_keys"]
    assert sum(value.numel() for value in state.values()) == expected["n_params_unique"]


def check_replay(buffers, reference: dict, name: str) -> None:
    """rand_ini, the sine-noise head and the uv-noise head must be the reference's bits."""
    rows = reference["causal_sine_waves_noise_head"].shape[1]
    uv_rows = reference["causal_source_uv_noise_head"].shape[1]
    assert np.array_equal(buffers.rand_ini.numpy(), reference["causal_rand_ini"]), f"{name}: rand_ini"
    assert np.array_equal(buffers.sine_noise.head(rows).numpy(), reference["causal_sine_waves_noise_head"]), \
        f"{name}: sine noise"
    assert np.array_equal(buffers.uv_noise_head(uv_rows).numpy(), reference["causal_source_uv_noise_head"]), \
        f"{name}: uv noise"


def test_noise_replay_official_size(cv3_reference):
    """The official model's buffers, bit-exact, without drawing the 7.2 M rows of sine noise."""
    official = cv3_reference("official_size_noise")
    buffers = draw_source_buffers(**OFFICIAL_FLOW, f0_num_class=OFFICIAL_F0["num_class"],
                                  f0_in_channels=OFFICIAL_F0["in_channels"],
                                  f0_cond_channels=OFFICIAL_F0["cond_channels"],
                                  nb_harmonics=OFFICIAL_HIFT["nb_harmonics"])
    check_replay(buffers, official, "official size")
    rows = official["causal_sine_waves_noise_head"].shape[1]
    assert buffers.sine_noise.materialised_rows <= max(buffers.sine_noise.min_rows, 2 * rows)
    assert buffers.sine_noise.materialised_rows < buffers.sine_noise.total_rows


def test_noise_replay_from_yaml(cv3_model_dir, ref):
    """The fixture's buffers from the yaml's sizes; rows drawn in several growing pieces."""
    config = YamlConfig.from_file(cv3_model_dir / "cosyvoice3.yaml")
    hift_node = config.resolve("hift")
    f0 = hift_node.kwargs["f0_predictor"].kwargs
    rows = ref["causal_sine_waves_noise_head"].shape[1]
    buffers = draw_source_buffers(**yaml_flow_sizes(config), f0_num_class=f0["num_class"],
                                  f0_in_channels=f0["in_channels"], f0_cond_channels=f0["cond_channels"],
                                  nb_harmonics=hift_node.kwargs["nb_harmonics"], min_rows=max(1, rows // 50))
    for n in (1, rows // 50, rows // 50 + 1, rows // 7, rows):  # each continues the generator state
        assert np.array_equal(buffers.sine_noise.head(n).numpy(),
                              ref["causal_sine_waves_noise_head"][:, :n]), f"first {n} rows"
    check_replay(buffers, ref, "fixture size")


def test_installed_noise_and_copies(hift, ref):
    rows = ref["causal_sine_waves_noise_head"].shape[1]
    assert np.array_equal(hift.m_source.rand_ini.numpy(), ref["causal_rand_ini"])
    copied = copy.deepcopy(hift.m_source.sine_noise)  # restarts from the start state, draws again
    assert isinstance(copied, LazyUniformRows) and copied.materialised_rows == 0
    assert np.array_equal(copied.head(rows).numpy(), ref["causal_sine_waves_noise_head"])


def test_missing_noise_buffers_fail_loudly(cv3_model_dir, ref):
    hift = build_cv3_hift(cv3_model_dir, buffers=False)
    with pytest.raises(RuntimeError, match="install_source_buffers"):
        hift.inference(t(ref["short_mel"]))


# --- f0 and source ------------------------------------------------------------------------------

@pytest.mark.parametrize("mel_key", ["mel", "short_mel"])
def test_f0(hift, ref, mel_key):
    f0 = hift.predict_f0(t(ref[mel_key]))
    assert f0.dtype == torch.float32
    assert all(p.dtype == torch.float64 for p in hift.f0_predictor.parameters())
    key = "f0" if mel_key == "mel" else "short_f0"
    _, rel_err = report_error(f"cv3.hift.{key}", f0, ref[key])
    assert rel_err <= F0_FLOAT32_REL_TOL
    if mel_key == "mel":
        with torch.no_grad():
            f0_64 = hift.f0_predictor(t(ref["mel"]).double())
        _, rel_err = report_error("cv3.hift.f0_float64", f0_64, ref["f0_float64"])
        assert rel_err <= F0_FLOAT64_REL_TOL


def test_f0_back_in_float64_after_float32_move(hift, ref):
    """The loader moves the module to float32; the predictor (still weight-normed) goes back to float64."""
    hift.float()
    assert hift.f0_predictor.classifier.weight.dtype == torch.float32
    f0 = hift.predict_f0(t(ref["mel"]))
    _, rel_err = report_error("cv3.hift.f0(after float32)", f0, ref["f0"])
    assert rel_err <= F0_FLOAT32_REL_TOL


def test_f0_non_final_drops_look_ahead(hift, ref):
    mel = t(ref["mel"])
    full = hift.predict_f0(mel).double()
    for frames in ref["stream_prefix_frames"]:
        part = hift.predict_f0(mel[:, :, :frames], finalize=False).double()
        assert part.shape[1] == frames - hift.f0_predictor.look_ahead
        _, rel_err = report_error(f"cv3.hift.f0 non-final {frames}", part, full[:, :part.shape[1]])
        assert rel_err <= F0_FLOAT32_REL_TOL


def test_source_module(hift, ref):
    f0 = hift.predict_f0(t(ref["short_mel"]))
    with torch.no_grad():
        f0_up = hift.upsample_f0(f0)
        sine_waves, uv, noise = hift.m_source.sine_waves(f0_up)
        source = hift.m_source(f0_up).transpose(1, 2)
    assert f0_up.shape == ref["short_f0_upsampled"].shape
    checks = [("short_f0_upsampled", f0_up, 0.0), ("short_uv", uv, 0.0), ("short_noise", noise, SOURCE_ABS_TOL),
              ("short_sine_waves", sine_waves, SOURCE_ABS_TOL), ("short_source", source, SOURCE_ABS_TOL)]
    errors = {key: report_error(f"cv3.hift.{key}", actual, ref[key])[0] for key, actual, _ in checks}
    for key, _, tolerance in checks:
        assert errors[key] <= tolerance, key


# --- waveform -----------------------------------------------------------------------------------

def test_inference_final(vocode, ref):
    for key in ("mel", "short_mel"):
        prefix = "" if key == "mel" else "short_"
        check_call(f"{prefix}speech", vocode, ref[key], True, ref[f"{prefix}speech"], ref[f"{prefix}source"],
                   vocode.noise_floor(ref[key]))


def test_decode_from_reference_source(hift, vocode, ref):
    with torch.no_grad():
        speech = hift.decode(t(ref["mel"]), t(ref["source"]))
    abs_err, _ = report_error("cv3.hift.decode", speech, ref["speech_from_source"])
    assert abs_err <= waveform_tolerance(vocode.noise_floor(ref["mel"]))


def test_streaming_calls(vocode, ref):
    mel = ref["mel"]
    floor = vocode.noise_floor(mel)
    for i, frames in enumerate(ref["stream_prefix_frames"]):
        finalize = bool(ref[f"stream_call{i}_finalize"][0])
        check_call(f"stream_call{i}", vocode, mel[:, :, :frames], finalize,
                   ref[f"stream_call{i}_speech"], ref[f"stream_call{i}_source"], floor)


def vc_chunks(e2e) -> int:
    return len(e2e["vc_stream_chunk_samples"])


def test_vc_stream_chunks(vocode, e2e):
    """Each token2wav vocoder call of the streamed VC run, and the chunks sliced from them."""
    floor = vocode.noise_floor(e2e[f"vc_stream_chunk{vc_chunks(e2e) - 1}_hift_in_mel"])
    yielded = []
    offset = 0
    for i in range(vc_chunks(e2e)):
        assert int(e2e[f"vc_stream_chunk{i}_speech_offset"][0]) == offset
        speech = check_call(f"vc_stream_chunk{i}", vocode, e2e[f"vc_stream_chunk{i}_hift_in_mel"],
                            bool(e2e[f"vc_stream_chunk{i}_hift_finalize"][0]),
                            e2e[f"vc_stream_chunk{i}_hift_raw_speech"], e2e[f"vc_stream_chunk{i}_hift_source"],
                            floor)
        chunk = speech[:, offset:]
        assert chunk.shape[1] == int(e2e["vc_stream_chunk_samples"][i])
        yielded.append(chunk)
        offset += chunk.shape[1]
    abs_err, _ = report_error("cv3.hift.vc_stream_speech", torch.cat(yielded, dim=1), e2e["vc_stream_speech"])
    assert abs_err <= waveform_tolerance(floor)


# --- streaming properties -----------------------------------------------------------------------

def stream_cases(ref, e2e) -> list[tuple[np.ndarray, list[int]]]:
    """(longest mel, prefix lengths called with finalize=False) from both reference streams."""
    last = vc_chunks(e2e) - 1
    vc_frames = [e2e[f"vc_stream_chunk{i}_hift_in_mel"].shape[2] for i in range(last)
                 if not e2e[f"vc_stream_chunk{i}_hift_finalize"][0]]
    hift_frames = [int(k) for i, k in enumerate(ref["stream_prefix_frames"])
                   if not ref[f"stream_call{i}_finalize"][0]]
    return [(ref["mel"], hift_frames), (e2e[f"vc_stream_chunk{last}_hift_in_mel"], vc_frames)]


def test_non_final_is_prefix_of_final(hift, vocode, ref, e2e):
    """A non-final call returns 480 * (T - 8) samples that equal the start of a final call over any
    longer mel (up to the summation-order noise of convs over different lengths: oneDNN blocks
    some convs differently by length), and a source that is exactly the start of the final one."""
    for mel, prefixes in stream_cases(ref, e2e):
        final, final_source = vocode(mel, True)
        floor = vocode.noise_floor(mel)
        assert final.shape[1] == final_source.shape[2] == hift.samples_per_frame * mel.shape[2]
        for frames in prefixes:
            speech, source = vocode(mel[:, :, :frames], False)
            assert speech.shape[1] == hift.samples_per_frame * (frames - hift.look_ahead_frames - 1)
            assert source.shape[2] == hift.samples_per_frame * (frames - hift.f0_predictor.look_ahead)
            abs_err, _ = report_error(f"cv3.hift.non-final {frames} vs final {mel.shape[2]}",
                                      speech, final[:, :speech.shape[1]])
            assert abs_err <= waveform_tolerance(floor)
            assert torch.equal(source, final_source[:, :, :source.shape[2]])


def test_output_never_depends_on_later_frames(hift, ref):
    """Same shapes, so the same arithmetic: the first 480 * (T - 8) samples must be bit-identical
    whatever follows frame T, for final and non-final calls."""
    frames = int(ref["stream_prefix_frames"][0])
    mel = t(ref["mel"][:, :, :frames + 2 * (hift.look_ahead_frames + 1)])
    keep = hift.samples_per_frame * (frames - hift.look_ahead_frames - 1)
    changed = mel.clone()
    changed[:, :, frames:] = torch.flip(mel[:, :, frames:], dims=[2]) + 1.0
    for finalize in (True, False):
        a, _ = hift.inference(mel, finalize)
        b, _ = hift.inference(changed, finalize)
        assert torch.equal(a[:, :keep], b[:, :keep]), f"finalize={finalize}"
        assert not torch.equal(a, b)


def test_non_final_needs_look_ahead(hift, ref):
    mel = t(ref["short_mel"])
    with pytest.raises(ValueError, match="non-final"):
        hift.inference(mel[:, :, :hift.look_ahead_frames], finalize=False)
    speech, source = hift.inference(mel[:, :, :hift.look_ahead_frames + 1], finalize=False)
    assert speech.shape == (1, 0)
    assert source.shape[2] == hift.samples_per_frame * (hift.conv_pre_look_right + 1)


# --- weights ------------------------------------------------------------------------------------

def test_fold_weight_norm_keeps_output(cv3_model_dir, ref):
    hift = build_cv3_hift(cv3_model_dir, fold=False)
    mel, source = t(ref["short_mel"]), t(ref["short_source"])
    with torch.no_grad():
        before = hift.decode(mel, source)
        hift.fold_weight_norm()
        after = hift.decode(mel, source)
    abs_err, _ = report_error("cv3.hift.fold_weight_norm", after, before)
    assert abs_err <= 1e-6
    still_weight_normed = [key for key in hift.state_dict() if ".parametrizations." in key]
    assert still_weight_normed and all(key.startswith("f0_predictor.") for key in still_weight_normed)


def test_other_sizes_give_consistent_shapes():
    """Sizes come from the constructor and the replay arguments only."""
    f0_args = dict(num_class=1, in_channels=20, cond_channels=16)
    hift = CausalHiFTGenerator(
        in_channels=20, base_channels=32, nb_harmonics=5, sampling_rate=16000,
        nsf_alpha=0.1, nsf_sigma=0.003, nsf_voiced_threshold=10,
        upsample_rates=[4, 5], upsample_kernel_sizes=[8, 9], istft_params={"n_fft": 12, "hop_len": 3},
        resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3], [1, 2]],
        source_resblock_kernel_sizes=[5, 7], source_resblock_dilation_sizes=[[1, 3], [1, 3]],
        lrelu_slope=0.1, audio_limit=0.99, conv_pre_look_right=2,
        f0_predictor=CausalConvRNNF0Predictor(**f0_args)).eval()
    hift.install_source_buffers(draw_source_buffers(
        100, 20, 16, 20, f0_num_class=1, f0_in_channels=20, f0_cond_channels=16, nb_harmonics=5,
        total_samples=5000))
    frames, spf = 11, 4 * 5 * 3
    mel = torch.randn(1, 20, frames, generator=torch.Generator().manual_seed(0))
    speech, source = hift.inference(mel)
    assert speech.shape == (1, frames * spf) and source.shape == (1, 1, frames * spf)
    speech, source = hift.inference(mel, finalize=False)
    assert speech.shape == (1, (frames - 3 - 2 - 1) * spf) and source.shape == (1, 1, (frames - 3) * spf)
    with pytest.raises(ValueError, match="noise buffer"):
        hift.inference(torch.zeros(1, 20, 5000 // spf + 1))
