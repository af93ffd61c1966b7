"""Flow stage (tokens -> mel) against the reference outputs in reference/flow.npz.

Sizes come only from the fixture arrays and the model directory, so the same tests run on any
fixture set.
"""
import numpy as np
import pytest
import torch

from conftest import report_error
from cosyvoice.loading.model_dir import load_stage

MEL_REL_TOL = 1e-4     # max abs error / max |reference|
INPUTS_ABS_TOL = 1e-4  # mu, spks, cond, mask


@pytest.fixture(scope="module")
def flow(model_dir):
    return load_stage(model_dir, "flow", device="cpu")


@pytest.fixture(scope="module")
def ref(reference):
    return reference("flow")


def run_flow(flow, ref, n_tokens: int, streaming: bool, finalize: bool) -> np.ndarray:
    """flow.inference on the first n_tokens of the fixture tokens, with the fixture prompt."""
    mel = flow.inference(torch.from_numpy(ref["token"][:, :n_tokens]),
                         torch.from_numpy(ref["prompt_token"]), torch.from_numpy(ref["prompt_feat"]),
                         torch.from_numpy(ref["embedding"]), streaming=streaming, finalize=finalize)
    assert mel.dtype == torch.float32
    return mel.numpy()


def assert_mel_close(stage: str, actual: np.ndarray, expected: np.ndarray) -> None:
    _, rel_err = report_error(stage, actual, expected)
    assert rel_err < MEL_REL_TOL, f"{stage}: relative error {rel_err:.3e} >= {MEL_REL_TOL}"


@pytest.mark.parity
def test_noise_buffer_is_exact_and_not_saved(flow, ref):
    head = ref["rand_noise_head"]
    noise = flow.decoder.rand_noise[:, :, :head.shape[-1]].numpy()
    report_error("flow rand_noise_head", noise, head)
    assert np.array_equal(noise, head)
    assert not any("rand_noise" in key for key in flow.state_dict())


@pytest.mark.parity
def test_cfm_inputs(flow, ref):
    mu, spks, cond, mask = flow.prepare_cfm_inputs(
        torch.from_numpy(ref["token"]), torch.from_numpy(ref["prompt_token"]),
        torch.from_numpy(ref["prompt_feat"]), torch.from_numpy(ref["embedding"]),
        streaming=False, finalize=True)
    for name, actual in (("mu", mu), ("spks", spks), ("cond", cond), ("mask", mask)):
        abs_err, _ = report_error(f"flow nonstream_{name}", actual.numpy(), ref[f"nonstream_{name}"])
        assert abs_err < INPUTS_ABS_TOL, f"{name}: max abs error {abs_err:.3e}"


@pytest.mark.parity
def test_nonstream_mel(flow, ref):
    mel = run_flow(flow, ref, ref["token"].shape[1], streaming=False, finalize=True)
    assert_mel_close("flow nonstream_mel", mel, ref["nonstream_mel"])


@pytest.mark.parity
def test_single_streaming_call(flow, ref):
    n_tokens = int(ref["single_stream_call_n_tokens"][0])
    mel = run_flow(flow, ref, n_tokens, streaming=True, finalize=False)
    assert_mel_close("flow single_stream_call_mel", mel, ref["single_stream_call_mel"])


@pytest.fixture(scope="module")
def stream_chunks(flow, ref) -> list[tuple[np.ndarray, np.ndarray]]:
    """(full, new) mel of every call of the reference streaming schedule."""
    chunks = []
    schedule = zip(ref["stream_n_tokens"], ref["stream_token_offset"],
                   ref["stream_flow_streaming_flag"], ref["stream_finalize_flag"])
    for n_tokens, offset, streaming, finalize in schedule:
        full = run_flow(flow, ref, int(n_tokens), streaming=bool(streaming), finalize=bool(finalize))
        chunks.append((full, full[:, :, flow.token_mel_ratio * int(offset):]))
    return chunks


@pytest.mark.parity
def test_streaming_schedule_chunks(stream_chunks, ref):
    for i, (full, new) in enumerate(stream_chunks):
        assert_mel_close(f"flow stream_chunk{i}_flow_mel_full", full, ref[f"stream_chunk{i}_flow_mel_full"])
        assert_mel_close(f"flow stream_chunk{i}_flow_mel_new", new, ref[f"stream_chunk{i}_flow_mel_new"])


@pytest.mark.parity
def test_streaming_concat(stream_chunks, ref):
    mel = np.concatenate([new for _, new in stream_chunks], axis=2)
    assert_mel_close("flow stream_mel_concat", mel, ref["stream_mel_concat"])
