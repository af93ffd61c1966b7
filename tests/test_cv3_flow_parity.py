"""CosyVoice3 flow stage (CausalMaskedDiffWithDiT + DiT estimator) against the reference outputs in
the CosyVoice3 fixture's reference/flow.npz, plus the properties the runtime relies on: a streaming
chunk equals the full streaming run, batching requests changes nothing, half precision stays finite.

Sizes come only from the fixture arrays, the yaml and full_size_keys.json, so the same tests run on
any fixture set.
"""
import copy
import dataclasses
import json
import re
import threading
import time

import numpy as np
import pytest
import torch

from conftest import report_error
from cosyvoice.concurrency.flow_batching import BatchedFlowDecoder
from cosyvoice.loading import registry
from cosyvoice.loading.config import New, YamlConfig
from cosyvoice.loading.model_dir import load_checkpoint
from cosyvoice.models.flow.dit import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.parity

FP32_EPS = float(torch.finfo(torch.float32).eps)
MEL_ABS_TOL = 1e-3                # flow mel vs reference (10 Euler steps with CFG amplify rounding)
# Relative to max |expected|. Seen on the tiny set: about 2 * FP32_EPS for both.
INPUTS_REL_TOL = 100 * FP32_EPS   # mu, spks, cond, mask: an embedding and two convolutions
SAME_MATH_REL_TOL = 100 * FP32_EPS  # our own mels that differ only in summation order (chunk vs full, batched)
N_STEPS = 10                       # Euler steps of flow.inference (its default, as upstream)


def build_cv3_flow(model_dir):
    """The flow stage of a CosyVoice3 model dir with its weights, float32, eval mode."""
    config = YamlConfig.from_file(model_dir / "cosyvoice3.yaml")
    flow = registry.build(config.resolve("flow"), where=f"{config.source}: flow")
    load_checkpoint(flow, model_dir / "flow.pt")
    return flow.eval()


@pytest.fixture(scope="module")
def flow(cv3_model_dir):
    return build_cv3_flow(cv3_model_dir)


@pytest.fixture(scope="module")
def ref(cv3_reference):
    return cv3_reference("flow")


def inputs(ref, n_tokens: int):
    """(token[:, :n_tokens], prompt_token, prompt_feat, embedding) as tensors."""
    return (torch.from_numpy(ref["token"][:, :n_tokens]), torch.from_numpy(ref["prompt_token"]),
            torch.from_numpy(ref["prompt_feat"]), torch.from_numpy(ref["embedding"]))


@pytest.fixture(scope="module")
def run(flow, ref):
    """run(n_tokens, streaming, finalize) -> mel [1, 80, frames] (numpy), each distinct call computed once."""
    cache = {}

    def run_flow(n_tokens: int, streaming: bool, finalize: bool) -> np.ndarray:
        key = (int(n_tokens), bool(streaming), bool(finalize))
        if key not in cache:
            mel = flow.inference(*inputs(ref, key[0]), streaming=key[1], finalize=key[2])
            assert mel.dtype == torch.float32
            cache[key] = mel.numpy()
        return cache[key]

    return run_flow


def n_all(ref) -> int:
    return ref["token"].shape[1]


def schedule(ref):
    """(n_tokens, token_offset, streaming, finalize) per call of the reference streaming schedule."""
    return [(int(n), int(o), bool(s), bool(f)) for n, o, s, f in zip(
        ref["stream_n_tokens"], ref["stream_token_offset"], ref["stream_flow_streaming_flag"],
        ref["stream_finalize_flag"])]


def assert_mel_close(stage: str, actual: np.ndarray, expected: np.ndarray) -> None:
    abs_err, _ = report_error(stage, actual, expected)
    assert abs_err < MEL_ABS_TOL, f"{stage}: max abs error {abs_err:.3e} >= {MEL_ABS_TOL}"


# ---- structure ---------------------------------------------------------------------------------

def test_full_size_state_dict_keys_and_shapes(cv3_model_dir, cv3_fixture_dir):
    """The official-size flow (dims read back from full_size_keys.json) has exactly the official keys."""
    keys = json.loads((cv3_fixture_dir / "reference" / "full_size_keys.json").read_text())["flow"]["keys"]
    est = "decoder.estimator."
    dim = keys[est + "time_embed.time_mlp.0.weight"][0]
    dim_head = 2 * keys[est + "rotary_embed.inv_freq"][0]
    block = re.compile(re.escape(est) + r"transformer_blocks\.(\d+)\.")
    sizes = {
        "cosyvoice.flow.DiT.dit.DiT": dict(
            dim=dim, dim_head=dim_head, heads=keys[est + "transformer_blocks.0.attn.to_q.weight"][0] // dim_head,
            depth=1 + max(int(m.group(1)) for k in keys if (m := block.match(k))),
            ff_mult=keys[est + "transformer_blocks.0.ff.ff.0.0.weight"][0] // dim),
        "cosyvoice.transformer.upsample_encoder.PreLookaheadLayer": dict(
            channels=keys["pre_lookahead_layer.conv1.weight"][0]),
    }

    def resize(value):
        if isinstance(value, New):
            kwargs = {**value.kwargs, **sizes.get(value.path, {})}
            return dataclasses.replace(value, kwargs={k: resize(v) for k, v in kwargs.items()})
        return {k: resize(v) for k, v in value.items()} if isinstance(value, dict) else value

    config = YamlConfig.from_file(cv3_model_dir / "cosyvoice3.yaml")
    with torch.device("meta"):
        full = registry.build(resize(config.resolve("flow")), where="full-size flow")
    assert {k: list(v.shape) for k, v in full.state_dict().items()} == keys
    assert not any("rand_noise" in key for key in full.state_dict())


def test_noise_buffer_is_exact(flow, ref):
    head = ref["rand_noise_head"]
    assert np.array_equal(flow.decoder.rand_noise[:, :, :head.shape[-1]].numpy(), head)


def test_rotary_turns_adjacent_pairs_of_the_first_channels_only():
    """Spec 5.4: pair (x_2i, x_2i+1) at position p turns by p * base^(-2i/rot); channels >= rot pass."""
    rot, length, width = 8, 5, 20
    rope = RotaryEmbedding(rot)
    x = torch.randn(2, length, width, generator=torch.Generator().manual_seed(0))
    out = apply_rotary(x, rope(length)).numpy()
    xs = x.numpy().astype(np.float64)
    expected = xs.copy()
    for p in range(length):
        for i in range(rot // 2):
            theta = p * 10000.0 ** (-2 * i / rot)
            a, b = xs[:, p, 2 * i], xs[:, p, 2 * i + 1]
            expected[:, p, 2 * i] = a * np.cos(theta) - b * np.sin(theta)
            expected[:, p, 2 * i + 1] = b * np.cos(theta) + a * np.sin(theta)
    assert np.abs(out - expected).max() < 1e-5
    assert np.array_equal(out[..., rot:], x.numpy()[..., rot:])


# ---- parity with the reference -------------------------------------------------------------------

def test_cfm_inputs(flow, ref):
    mu, spks, cond, mask = flow.prepare_cfm_inputs(*inputs(ref, n_all(ref)), streaming=False, finalize=True)
    for name, actual in (("mu", mu), ("spks", spks), ("cond", cond), ("mask", mask)):
        _, rel_err = report_error(f"cv3 flow nonstream_{name}", actual.numpy(), ref[f"nonstream_{name}"])
        assert rel_err < INPUTS_REL_TOL, f"{name}: relative error {rel_err:.3e}"


def test_pre_lookahead_with_context(flow, ref):
    """mu of a non-final call: the last pre_lookahead_len tokens are context, not frames. It equals the
    reference and the matching prefix of the full run's mu."""
    n_tokens = int(ref["single_stream_call_n_tokens"][0])
    mu, *_ = flow.prepare_cfm_inputs(*inputs(ref, n_tokens), streaming=True, finalize=False)
    expected = ref["single_stream_call_mu"]
    _, rel_err = report_error("cv3 flow single_stream_call_mu", mu.numpy(), expected)
    assert rel_err < INPUTS_REL_TOL
    prefix = ref["nonstream_mu"][:, :, :expected.shape[-1]]
    assert np.abs(mu.numpy() - prefix).max() <= INPUTS_REL_TOL * np.abs(prefix).max()


def test_nonstream_mel(run, ref):
    assert_mel_close("cv3 flow nonstream_mel", run(n_all(ref), False, True), ref["nonstream_mel"])


def test_nonstream_with_streaming_mask(run, ref):
    assert_mel_close("cv3 flow nonstream_streamingmask_mel", run(n_all(ref), True, True),
                     ref["nonstream_streamingmask_mel"])


def test_single_streaming_call(run, ref):
    n_tokens = int(ref["single_stream_call_n_tokens"][0])
    assert_mel_close("cv3 flow single_stream_call_mel", run(n_tokens, True, False), ref["single_stream_call_mel"])


def test_streaming_schedule(flow, run, ref):
    news = []
    for i, (n_tokens, offset, streaming, finalize) in enumerate(schedule(ref)):
        full = run(n_tokens, streaming, finalize)
        new = full[:, :, flow.token_mel_ratio * offset:]
        assert_mel_close(f"cv3 flow stream_chunk{i}_flow_mel_full", full, ref[f"stream_chunk{i}_flow_mel_full"])
        assert_mel_close(f"cv3 flow stream_chunk{i}_flow_mel_new", new, ref[f"stream_chunk{i}_flow_mel_new"])
        news.append(new)
    assert_mel_close("cv3 flow stream_mel_concat", np.concatenate(news, axis=2), ref["stream_mel_concat"])


# ---- streaming and batching properties --------------------------------------------------------------

def test_streaming_chunk_equals_full_streaming_run(flow, run, ref):
    """A non-final streaming call equals the full streaming=True run on every frame whose attention
    chunk is complete in the call (chunks count from prompt frame 0)."""
    chunk = flow.decoder.estimator.static_chunk_size
    prompt_frames = ref["prompt_feat"].shape[1]
    full = run(n_all(ref), True, True)
    calls = [(n, True, False) for n, _, s, f in schedule(ref) if s and not f]
    calls.append((int(ref["single_stream_call_n_tokens"][0]), True, False))
    compared = 0
    for n_tokens, streaming, finalize in calls:
        mel = run(n_tokens, streaming, finalize)
        frames = (prompt_frames + mel.shape[-1]) // chunk * chunk - prompt_frames   # complete chunks only
        if frames <= 0:
            continue
        abs_err, _ = report_error(f"cv3 flow {n_tokens}-token chunk vs full streaming run",
                                  mel[:, :, :frames], full[:, :, :frames])
        assert abs_err <= SAME_MATH_REL_TOL * np.abs(full).max()
        compared += frames
    assert compared > 0, "no call of this fixture ends a complete attention chunk"


def batch_requests(ref):
    """(n_tokens, streaming, finalize) of three requests of different lengths: a final call and two
    streaming chunks."""
    requests = [(n_all(ref), False, True)]
    requests += [(n, s, f) for n, _, s, f in schedule(ref) if s and not f][-1:]
    requests.append((int(ref["single_stream_call_n_tokens"][0]), True, False))
    return requests


def test_concurrent_requests_are_batched_and_equal_solo_runs(flow, run, ref):
    """The requests go through one BatchedFlowDecoder from three threads and are served as one
    right-padded batch; each gets its solo result."""
    requests = batch_requests(ref)
    assert len({run(*r).shape[-1] for r in requests}) == len(requests), "lengths must differ to test padding"
    holding, results = threading.Event(), {}

    def gated_decoder(*args, **kwargs):
        # The first (warm-up) call holds the worker until every request is queued, so they form one batch.
        if not holding.is_set():
            holding.set()
            deadline = time.monotonic() + 60
            while batched.waiting < len(requests) and time.monotonic() < deadline:
                time.sleep(0.002)
        return flow.decoder(*args, **kwargs)

    batched = BatchedFlowDecoder(gated_decoder, max_batch=8)
    mu, spks, cond, mask = flow.prepare_cfm_inputs(*inputs(ref, 4), streaming=False, finalize=True)
    warm_up = threading.Thread(target=batched, args=(mu, mask, spks, cond))
    warm_up.start()
    assert holding.wait(60)

    def caller(index, n_tokens, streaming, finalize):
        results[index] = flow.inference(*inputs(ref, n_tokens), streaming=streaming, finalize=finalize,
                                        decoder=batched).numpy()

    threads = [threading.Thread(target=caller, args=(i, *r)) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in [*threads, warm_up]:
        thread.join(timeout=120)
    assert batched.batch_sizes[1] == 1 and batched.batch_sizes[len(requests)] == 1, batched.batch_sizes
    for index, request in enumerate(requests):
        solo = run(*request)
        abs_err, _ = report_error(f"cv3 flow batched vs solo, {solo.shape[-1]} frames, streaming={request[1]}",
                                  results[index], solo)
        assert abs_err <= SAME_MATH_REL_TOL * np.abs(solo).max()


def test_padding_is_not_ignored(flow, run, ref):
    """The check above can fail: the same padded batch with every frame marked real (padded keys
    visible to attention) changes the shorter rows."""
    requests = batch_requests(ref)
    calls = [flow.prepare_cfm_inputs(*inputs(ref, n), streaming=s, finalize=f) for n, s, f in requests]
    mu = BatchedFlowDecoder._pad([c[0] for c in calls])
    cond = BatchedFlowDecoder._pad([c[2] for c in calls])
    spks = torch.cat([c[1] for c in calls])
    streaming = torch.tensor([s for _, s, _ in requests])
    with torch.inference_mode():
        unmasked = flow.decoder(mu, torch.ones_like(mu[:, :1]), spks, cond, streaming=streaming).numpy()
    prompt_frames = ref["prompt_feat"].shape[1]
    shortest = min(range(len(calls)), key=lambda i: calls[i][0].shape[-1])
    solo = run(*requests[shortest])
    row = unmasked[shortest:shortest + 1, :, prompt_frames:prompt_frames + solo.shape[-1]]
    assert np.abs(row - solo).max() > 1e-2


# ---- half precision ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(flow, ref, dtype):
    """Measures one DiT call and the whole flow cast to fp16/bf16 (the runtime's half-precision path)
    against fp32; printed with -s. The bounds are loose, C * eps * (layers the error passes through):
    depth for one call; depth weighted by the CFG mix, plus the Euler steps (whose state is in the
    same dtype), for the mel. They catch dtype-handling bugs and non-finite values."""
    eps = float(torch.finfo(dtype).eps)
    depth = len(flow.decoder.estimator.transformer_blocks)
    cfg = flow.decoder.cfg_rate
    half = copy.deepcopy(flow).to(dtype)

    # One estimator call on the reference CFM inputs (noise as x, t in mid-integration).
    names = ("mu", "mask", "spks", "cond")
    mu, mask, spks, cond = (torch.from_numpy(ref[f"nonstream_{name}"]) for name in names)
    x = flow.decoder.rand_noise[:, :, :mu.shape[-1]]
    t = torch.full((1,), 0.5)
    with torch.inference_mode():
        expected = flow.decoder.estimator(x, mask, mu, t, spks, cond, None)
        actual = half.decoder.estimator(*(a.to(dtype) for a in (x, mask, mu, t, spks, cond)), None).float()
    finite = bool(torch.isfinite(actual).all())
    _, rel_err = report_error(f"cv3 DiT single call {dtype} vs fp32 (finite={finite})", actual, expected)
    assert finite
    assert rel_err < 4 * eps * depth

    mel = half.inference(*inputs(ref, n_all(ref)), streaming=False, finalize=True)
    finite = bool(torch.isfinite(mel).all())
    assert mel.dtype == torch.float32
    _, rel_err = report_error(f"cv3 flow mel {dtype} vs fp32 reference (finite={finite})", mel,
                              ref["nonstream_mel"])
    assert finite
    assert rel_err < 4 * eps * (depth * (1 + 2 * cfg) + N_STEPS)
