"""CosyVoice3 end to end against the reference: every mode with the reference's seeds, and the
streaming schedule with the whole-mel vocoder (chunk sizes identical, audio within tolerance)."""
import numpy as np
import pytest
import torch
from conftest import report_error

import cosyvoice
from cosyvoice.inference.synthesis import ModelInput, WholeMelVocoding
from cosyvoice.models.sampling import greedy_sampling

pytestmark = pytest.mark.parity

# Tokens must be identical and the mel the vocoder receives within the flow's bound. The waveform
# is not compared with the reference's directly: a random-weight vocoder is chaotic (on this
# fixture a 1e-7 change of its mel moves the waveform by 5e-2: its last conv feeds exp() and
# sin() with values of 10-20), so float32 rounding alone decides the waveform's last digits.
# The vocoder itself is checked against the reference given the reference's mel in
# test_cv3_hift_parity; here the stream must equal one vocoder run over the final mel.
MEL_ATOL = 1e-3
# A stream chunk comes from a run over a shorter mel; oneDNN sums some convolutions in an order
# that depends on the input length, so chunk borders may differ from one long run by float32
# rounding, amplified like any mel change. A wrong join (a crossfade, a lost or repeated frame)
# moves the waveform by order 1.
STREAM_JOIN_ATOL = 0.1


@pytest.fixture(scope="module")
def tts(cv3_model_dir):
    model = cosyvoice.load(cv3_model_dir)
    assert isinstance(model, cosyvoice.CosyVoice3) and model.generation == "CosyVoice3"
    return model


@pytest.fixture(scope="module")
def prompt(cv3_fixture_dir):
    folder = cv3_fixture_dir / "reference"
    return folder / "prompt.wav", (folder / "prompt.txt").read_text(encoding="utf-8").strip()


def _text(tts, e2e, run, key="input_text"):
    """The reference's text, recovered from the ids it fed the model."""
    return tts.tokenizer.decode(e2e[f"{run}_{key}"][0].tolist())


class RecordingVocoding(WholeMelVocoding):
    """Keeps the whole mel of the last utterance it rendered."""
    last_mel = None

    def render(self, mel, finalize, speed=1.0):
        chunk = super().render(mel, finalize, speed)
        RecordingVocoding.last_mel = self.mel
        return chunk


@pytest.fixture
def recording(tts):
    tts.synthesizer.vocoding = RecordingVocoding
    yield
    tts.synthesizer.vocoding = WholeMelVocoding


def _check_run(tts, e2e, run, chunks):
    assert [len(c) for c in chunks] == e2e[f"{run}_chunk_samples"].tolist()
    mel = RecordingVocoding.last_mel
    abs_err, _ = report_error(f"cv3 e2e {run} mel", mel, e2e[f"{run}_flow_mel"])
    assert abs_err < MEL_ATOL
    whole, _ = tts.synthesizer.hift.inference(mel, finalize=True)
    streamed = np.concatenate(chunks)
    abs_err, _ = report_error(f"cv3 e2e {run} stream vs one vocoder run", streamed, whole[0].numpy())
    assert abs_err <= (STREAM_JOIN_ATOL if len(chunks) > 1 else 0.0)   # one chunk is one run: exact


def test_zero_shot_adds_the_system_prefix_to_the_transcript(tts, cv3_reference, prompt, recording):
    e2e = cv3_reference("e2e")
    voice = tts.prepare_voice(prompt[0], prompt[1])    # the bare transcript, as users give it
    assert voice.prompt_text_ids.tolist() == e2e["zero_shot_input_prompt_text"].tolist()
    assert voice.speech_tokens.tolist() == e2e["zero_shot_input_llm_prompt_speech_token"].tolist()
    chunks = list(tts.zero_shot(_text(tts, e2e, "zero_shot"), voice=voice, seed=int(e2e["zero_shot_seed"][0])))
    _check_run(tts, e2e, "zero_shot", chunks)


@pytest.mark.parametrize("with_prefix", [True, False])
def test_cross_lingual(tts, cv3_reference, prompt, with_prefix, recording):
    """The reference's own call carries the prefix in the text; plain text gets it added."""
    e2e = cv3_reference("e2e")
    text = _text(tts, e2e, "cross_lingual")
    if not with_prefix:
        text = text.split("<|endofprompt|>", 1)[1]
    chunks = list(tts.cross_lingual(text, prompt[0], seed=int(e2e["cross_lingual_seed"][0])))
    _check_run(tts, e2e, "cross_lingual", chunks)


@pytest.mark.parametrize("as_written", [True, False])
def test_instruct2(tts, cv3_reference, prompt, as_written, recording):
    """The reference's instruct text, or just the instruction: the same LLM input."""
    e2e = cv3_reference("e2e")
    instruct = _text(tts, e2e, "instruct2", "input_prompt_text")
    if not as_written:
        instruct = instruct.removeprefix("You are a helpful assistant. ").removesuffix("<|endofprompt|>")
    chunks = list(tts.instruct2(_text(tts, e2e, "instruct2"), instruct, prompt[0],
                                seed=int(e2e["instruct2_seed"][0])))
    _check_run(tts, e2e, "instruct2", chunks)


def _input(e2e, frontend, run):
    return ModelInput(torch.from_numpy(e2e[f"{run}_input_text"]), torch.from_numpy(e2e[f"{run}_input_prompt_text"]),
                      torch.from_numpy(e2e[f"{run}_input_llm_prompt_speech_token"]),
                      torch.from_numpy(e2e[f"{run}_input_flow_prompt_speech_token"]),
                      torch.from_numpy(frontend["prompt_speech_feat"]), torch.from_numpy(frontend["spk_embedding"]))


@pytest.mark.parametrize("run, stream, sampling", [("zero_shot_stream_greedy", True, greedy_sampling),
                                                   ("zero_shot_nonstream_greedy", False, greedy_sampling),
                                                   ("zero_shot_stream_sampled", True, None)])
def test_streaming_and_not(tts, cv3_reference, run, stream, sampling, recording):
    e2e = cv3_reference("e2e")
    generator = torch.Generator().manual_seed(int(e2e[f"{run}_seed"][0]))
    chunks = list(tts.synthesizer.synthesize(_input(e2e, cv3_reference("frontend"), run), stream=stream,
                                             sampling=sampling, generator=generator))
    _check_run(tts, e2e, run, chunks)


def test_streamed_vocoder_chunks_from_fixed_tokens(tts, cv3_reference, recording):
    """The voice-conversion path of the reference: fixed tokens through the streaming schedule;
    every chunk re-vocodes the whole mel and emits only its new samples."""
    e2e, flow = cv3_reference("e2e"), cv3_reference("flow")
    request = ModelInput(torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, dtype=torch.int32),
                         torch.zeros(1, 0, dtype=torch.int32), torch.from_numpy(flow["prompt_token"]),
                         torch.from_numpy(flow["prompt_feat"]), torch.from_numpy(flow["embedding"]))
    chunks = list(tts.synthesizer.synthesize(request, stream=True, source_tokens=flow["token"][0].tolist()))
    assert [len(c) for c in chunks] == e2e["vc_stream_chunk_samples"].tolist()
    for i in range(len(chunks)):
        mel_so_far = RecordingVocoding.last_mel[:, :, :e2e[f"vc_stream_chunk{i}_hift_in_mel"].shape[2]]
        abs_err, _ = report_error(f"cv3 vc stream mel after chunk {i}", mel_so_far, e2e[f"vc_stream_chunk{i}_hift_in_mel"])
        assert abs_err < MEL_ATOL
    whole, _ = tts.synthesizer.hift.inference(RecordingVocoding.last_mel, finalize=True)
    abs_err, _ = report_error("cv3 vc stream vs one vocoder run", np.concatenate(chunks), whole[0].numpy())
    assert abs_err < STREAM_JOIN_ATOL
