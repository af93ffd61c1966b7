"""End to end against the reference: every mode with the reference's seeds, streaming schedules."""
import numpy as np
import pytest
import torch
from conftest import report_error

import cosyvoice
from cosyvoice.models.sampling import greedy_sampling
from cosyvoice.inference.synthesis import ModelInput

pytestmark = pytest.mark.parity

# Flow mel matches to ~5e-6 and HiFT given the same mel to ~7e-6, but HiFT integrates f0 into
# the sine phase over the whole utterance, so tiny mel differences grow into phase drift of up to
# ~1.3e-3 in the waveform (measured). A wrong schedule, cache or fade shows up as errors > 5e-2.
WAVEFORM_ATOL = 5e-3


@pytest.fixture(scope="module")
def tts(model_dir):
    return cosyvoice.load(model_dir)


@pytest.fixture(scope="module")
def prompt(fixture_dir):
    reference = fixture_dir / "reference"
    return reference / "prompt.wav", (reference / "prompt.txt").read_text(encoding="utf-8").strip()


def _text(tts, e2e, run, key="input_text"):
    """The reference's text, recovered from the ids it fed the model."""
    return tts.tokenizer.decode(e2e[f"{run}_{key}"][0].tolist())


def _check_run(e2e, run, chunks):
    assert [len(c) for c in chunks] == e2e[f"{run}_chunk_samples"].tolist()
    abs_err, _ = report_error(f"e2e {run} waveform", np.concatenate(chunks)[None], e2e[f"{run}_speech"])
    assert abs_err < WAVEFORM_ATOL


def test_zero_shot(tts, reference, prompt):
    e2e = reference("e2e")
    voice = tts.prepare_voice(prompt[0], prompt[1])
    assert voice.prompt_text_ids.tolist() == e2e["zero_shot_input_prompt_text"].tolist()
    assert voice.speech_tokens.tolist() == e2e["zero_shot_input_llm_prompt_speech_token"].tolist()
    chunks = list(tts.zero_shot(_text(tts, e2e, "zero_shot"), voice=voice,
                                seed=int(e2e["zero_shot_seed"][0])))
    _check_run(e2e, "zero_shot", chunks)


def test_cross_lingual(tts, reference, prompt):
    e2e = reference("e2e")
    chunks = list(tts.cross_lingual(_text(tts, e2e, "cross_lingual"), prompt[0],
                                    seed=int(e2e["cross_lingual_seed"][0])))
    _check_run(e2e, "cross_lingual", chunks)


def test_instruct2(tts, reference, prompt):
    e2e = reference("e2e")
    instruct = _text(tts, e2e, "instruct2", "input_prompt_text")
    chunks = list(tts.instruct2(_text(tts, e2e, "instruct2"), instruct, prompt[0],
                                seed=int(e2e["instruct2_seed"][0])))
    _check_run(e2e, "instruct2", chunks)


def test_instruct_marker_is_appended_when_missing(tts, reference, prompt):
    e2e = reference("e2e")
    instruct = _text(tts, e2e, "instruct2", "input_prompt_text")
    text = _text(tts, e2e, "instruct2")
    seed = int(e2e["instruct2_seed"][0])
    with_marker = np.concatenate(list(tts.instruct2(text, instruct, prompt[0], seed=seed)))
    without = np.concatenate(list(tts.instruct2(text, instruct.replace("<|endofprompt|>", ""),
                                                prompt[0], seed=seed)))
    assert np.array_equal(with_marker, without)


def _greedy_input(e2e, frontend, run):
    return ModelInput(torch.from_numpy(e2e[f"{run}_input_text"]), torch.from_numpy(e2e[f"{run}_input_prompt_text"]),
                      torch.from_numpy(e2e[f"{run}_input_llm_prompt_speech_token"]),
                      torch.from_numpy(e2e[f"{run}_input_flow_prompt_speech_token"]),
                      torch.from_numpy(frontend["prompt_speech_feat"]), torch.from_numpy(frontend["spk_embedding"]))


@pytest.mark.parametrize("run, stream", [("zero_shot_stream_greedy", True),
                                         ("zero_shot_nonstream_greedy", False)])
def test_greedy_streaming_and_not(tts, reference, run, stream):
    e2e = reference("e2e")
    torch.manual_seed(int(e2e[f"{run}_seed"][0]))
    chunks = list(tts.synthesizer.synthesize(_greedy_input(e2e, reference("frontend"), run), stream=stream,
                                             sampling=greedy_sampling))
    _check_run(e2e, run, chunks)


def test_streamed_vocoder_chunks_from_fixed_tokens(tts, reference):
    """The voice-conversion path of the reference: fixed tokens, streaming schedule, caches, fades."""
    e2e, flow = reference("e2e"), reference("flow")
    request = ModelInput(torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, dtype=torch.int32),
                         torch.zeros(1, 0, dtype=torch.int32), torch.from_numpy(flow["prompt_token"]),
                         torch.from_numpy(flow["prompt_feat"]), torch.from_numpy(flow["embedding"]))
    torch.manual_seed(int(e2e["vc_stream_seed"][0]))
    chunks = list(tts.synthesizer.synthesize(request, stream=True, source_tokens=flow["token"][0].tolist()))
    assert [len(c) for c in chunks] == e2e["vc_stream_chunk_samples"].tolist()
    for i, chunk in enumerate(chunks):
        abs_err, _ = report_error(f"vc stream chunk {i}", chunk[None], e2e[f"vc_stream_chunk{i}_speech"])
        assert abs_err < WAVEFORM_ATOL
