"""Streaming with carried state: the flow's non-final calls continue from the state the earlier
calls left (cosyvoice.models.flow.carry) and CosyVoice3's vocoder continues from its own
(CausalHiFTGenerator.stream); the audio equals the reference's recomputing stream within the
parity tolerances. Both generations' tiny fixtures."""
import numpy as np
import pytest
import torch

from conftest import report_error
from cosyvoice.concurrency.flow_batching import BatchedFlowDecoder, FlowCall
from cosyvoice.inference.synthesis import ModelInput, StateBudget
from cosyvoice.loading.model_dir import load_stage
from cosyvoice.models.causal_hift import VocoderCarry
from cosyvoice.models.flow.carry import DecoderCarry, FlowCarry

# Flow mel vs the reference, as in their parity tests: relative to max |reference| for CosyVoice2,
# absolute for CosyVoice3.
MEL_TOL = {"cosyvoice2": ("relative", 1e-4), "cosyvoice3": ("absolute", 1e-3)}
SAME_MATH_TOL = 2e-5    # carried vs recomputed mel: the same maths summed in another order
STREAM_JOIN_ATOL = 0.1  # CosyVoice3 vocoder in float32: chaotic rounding (see test_cv3_pipeline_parity)


@pytest.fixture(scope="module", params=["cosyvoice2", "cosyvoice3"])
def generation(request, model_dir, reference, cv3_model_dir, cv3_reference):
    if request.param == "cosyvoice2":
        return request.param, model_dir, reference
    return request.param, cv3_model_dir, cv3_reference


@pytest.fixture(scope="module")
def flow_and_ref(generation):
    name, model_dir, reference = generation
    return name, load_stage(model_dir, "flow", device="cpu"), reference("flow")


def _inputs(ref, n_tokens: int, prompt_tokens: int | None = None):
    prompt = ref["prompt_token"][:, :prompt_tokens]
    return (torch.from_numpy(ref["token"][:, :n_tokens]), torch.from_numpy(prompt),
            torch.from_numpy(ref["prompt_feat"][:, :2 * prompt.shape[1]]), torch.from_numpy(ref["embedding"]))


def _carried_call(flow, ref, carry, n_tokens, offset, prompt_tokens=None, decoder=None):
    """The new frames (from generated token `offset`) of a non-final call continuing `carry`."""
    inputs = _inputs(ref, n_tokens, prompt_tokens)
    first = max(0, carry.decoder.frames - inputs[2].shape[1])
    mel = flow.inference(*inputs, streaming=True, finalize=False, carry=carry, decoder=decoder)
    return mel[:, :, flow.token_mel_ratio * offset - first:].numpy()


def test_reference_schedule_with_carried_state(flow_and_ref):
    """Every non-final call of the reference's streaming schedule, computed from the state of the
    calls before it, equals the reference's chunk and our recomputing call."""
    name, flow, ref = flow_and_ref
    carry = FlowCarry()
    schedule = zip(ref["stream_n_tokens"], ref["stream_token_offset"], ref["stream_finalize_flag"])
    for i, (n_tokens, offset, finalize) in enumerate(schedule):
        if finalize:
            break
        new = _carried_call(flow, ref, carry, int(n_tokens), int(offset))
        errors = report_error(f"{name} carried chunk {i} vs reference", new, ref[f"stream_chunk{i}_flow_mel_new"])
        kind, tolerance = MEL_TOL[name]
        assert errors[kind == "relative"] < tolerance
        recomputed = flow.inference(*_inputs(ref, int(n_tokens)), streaming=True, finalize=False)
        recomputed = recomputed[:, :, flow.token_mel_ratio * int(offset):].numpy()
        assert np.abs(new - recomputed).max() < SAME_MATH_TOL
    assert carry.tokens % flow.carry_chunk_tokens == 0 and carry.nbytes > 0


def test_calls_ending_inside_a_chunk_are_completed_by_the_next(flow_and_ref):
    """Calls need not end on chunk borders: only complete chunks are held, the rest is recomputed."""
    name, flow, ref = flow_and_ref
    carry, offset = FlowCarry(), 0
    for n_tokens in (12, 31, 32, 60, 90):
        new = _carried_call(flow, ref, carry, n_tokens, offset, prompt_tokens=7)
        recomputed = flow.inference(*_inputs(ref, n_tokens, 7), streaming=True, finalize=False)
        recomputed = recomputed[:, :, flow.token_mel_ratio * offset:].numpy()
        assert new.shape == recomputed.shape
        assert np.abs(new - recomputed).max() < SAME_MATH_TOL, f"{name}: call over {n_tokens} tokens"
        assert carry.tokens == (7 + n_tokens - 3) // flow.carry_chunk_tokens * flow.carry_chunk_tokens
        offset = n_tokens - 3


def test_batched_decoder_with_carried_and_final_calls(flow_and_ref):
    """Concurrent requests' carried chunks and a final call in one padded batch equal solo runs."""
    name, flow, ref = flow_and_ref
    solo_carries, batch_carries = [FlowCarry(), FlowCarry()], [FlowCarry(), FlowCarry()]
    for carry in (*solo_carries, *batch_carries):   # a first chunk each, at different lengths
        _carried_call(flow, ref, carry, 38 if carry in (solo_carries[0], batch_carries[0]) else 63, 0)
    calls = []
    for carry, n_tokens in zip(batch_carries, (88, 113)):
        mu, spks, cond, _ = flow.prepare_cfm_inputs(*_inputs(ref, n_tokens), streaming=True, finalize=False,
                                                    carry=carry)
        calls.append(FlowCall(mu, spks, cond, 10, True, carry.decoder))
    mu, spks, cond, _ = flow.prepare_cfm_inputs(*_inputs(ref, 120), streaming=False, finalize=True)
    calls.append(FlowCall(mu, spks, cond, 10, False))
    with torch.inference_mode():
        batched = BatchedFlowDecoder(flow.decoder).decode_batch(calls)
    for carry, n_tokens, mel in zip(solo_carries, (88, 113), batched):
        solo = flow.inference(*_inputs(ref, n_tokens), streaming=True, finalize=False, carry=carry)
        assert mel[:, :, -solo.shape[2]:].shape == solo.shape
        assert float((mel[:, :, -solo.shape[2]:] - solo).abs().max()) < 1e-4
    assert [c.decoder.frames for c in batch_carries] == [c.decoder.frames for c in solo_carries]
    with torch.inference_mode():
        final = flow.decoder(mu, torch.ones_like(mu[:, :1]), spks, cond, streaming=False)
    assert float((batched[2] - final).abs().max()) < 1e-4


@pytest.fixture(scope="module")
def cv3_hift(cv3_model_dir):
    return load_stage(cv3_model_dir, "hift", device="cpu")


@pytest.mark.parametrize("sizes", [(50, 100, 200, 37), (5, 2, 70, 0), (9, 1, 1, 30)])
def test_cv3_vocoder_stream_equals_one_run(cv3_hift, sizes):
    """In float64 the carried vocoder stream equals one run over the whole mel to rounding (so
    nothing is lost or repeated at the joins); in float32 within the join tolerance."""
    generator = torch.Generator().manual_seed(sum(sizes))
    mel = torch.randn(1, 80, sum(sizes), generator=generator) * 2 - 5
    for dtype, tolerance in ((torch.float64, 1e-8), (torch.float32, STREAM_JOIN_ATOL)):
        hift = cv3_hift.to(dtype)
        whole, _ = hift.inference(mel.to(dtype), finalize=True)
        carry, pieces, start = VocoderCarry(), [], 0
        for i, size in enumerate(sizes):
            pieces.append(hift.stream(mel[:, :, start:start + size].to(dtype), i == len(sizes) - 1, carry))
            start += size
        streamed = torch.cat(pieces, dim=1)
        assert streamed.shape == whole.shape
        assert float((streamed - whole).abs().max()) < tolerance, f"{dtype}"
    cv3_hift.float()


@pytest.fixture(scope="module")
def tts(generation):
    import cosyvoice
    return cosyvoice.load(generation[1])


def _vc_request(ref):
    empty = torch.zeros(1, 0, dtype=torch.int32)
    return ModelInput(empty, empty, empty, torch.from_numpy(ref["prompt_token"]),
                      torch.from_numpy(ref["prompt_feat"]), torch.from_numpy(ref["embedding"]))


def test_voice_prefix_and_budget_keep_the_audio(tts, generation):
    """The second stream with a voice starts from the voice prompt's cached state; a stream whose
    state does not fit the budget gives it up after its first chunk and recomputes its later
    chunks' prefix, as the reference does. Both give the audio of the first stream. Streams
    release their budget at the end. (The first stream is checked against the reference in the
    pipeline parity tests.)"""
    name, _, reference = generation
    ref = reference("flow")
    tokens = ref["token"][0, :120].tolist()   # two non-final chunks (28 + 50 tokens), then the final call
    synthesizer = tts.synthesizer

    def stream(carry_state: bool, budget: StateBudget) -> list[np.ndarray]:
        synthesizer.carry_state, synthesizer.state_budget = carry_state, budget
        torch.manual_seed(0)
        return list(synthesizer.synthesize(_vc_request(ref), stream=True, source_tokens=tokens))

    prefixes = synthesizer.voice_prefixes
    try:
        budget, tight = StateBudget(None), StateBudget(1)
        prefixes.clear(budget)
        carried = stream(True, budget)          # computes the voice prompt's state
        assert (prefixes.misses, prefixes.hits) == (1, 0) and budget.held_bytes == prefixes.nbytes > 0
        again = stream(True, budget)            # starts from it
        assert prefixes.hits == 1 and budget.held_bytes == prefixes.nbytes
        prefixes.clear(budget)
        dropped = stream(True, tight)           # neither the prompt's state nor the stream's fits
        assert tight.held_bytes == 0 and tight.dropped == 2 and prefixes.nbytes == 0
    finally:
        synthesizer.carry_state, synthesizer.state_budget = True, StateBudget(None)
    tolerance = 5e-3 if name == "cosyvoice2" else STREAM_JOIN_ATOL   # the parity tests' waveform bounds
    assert len(carried) == 3
    for other in (again, dropped):
        assert [len(c) for c in other] == [len(c) for c in carried]
        assert float(np.abs(np.concatenate(other) - np.concatenate(carried)).max()) < tolerance


def test_decoder_carry_rejects_a_changed_step_count():
    carry = DecoderCarry()
    carry.for_steps(10)
    with pytest.raises(ValueError, match="10 steps"):
        carry.for_steps(5)


@pytest.mark.parametrize("stream", [False, True])
def test_an_utterance_without_speech_tokens_has_no_audio(tts, generation, stream):
    """An LLM that stops before its first token (random weights do) gives no chunks, not a
    vocoder error on an empty mel (which reached clients as a 500)."""
    ref = generation[2]("flow")
    chunks = list(tts.synthesizer.synthesize(_vc_request(ref), stream=stream, source_tokens=[]))
    assert chunks == []
