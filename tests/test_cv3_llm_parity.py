"""CosyVoice3 LLM parity with the reference: specials in speech_embedding, bias-free head with
200 stop ids, teacher-forced log-probs, greedy and seeded decoding, the silent-token filter."""
import numpy as np
import pytest
import torch
from conftest import report_error

from cosyvoice.inference.model import CosyVoice3
from cosyvoice.inference.synthesis import drop_long_silences
from cosyvoice.loading.model_dir import load_stage
from cosyvoice.models.sampling import greedy_sampling

pytestmark = pytest.mark.parity
LAYOUTS = ["zero_shot", "cross_lingual", "instruct2"]
# Log-probs: a float32 Qwen forward accumulates rounding of ~1e-6 per layer and position; the
# reference's KV-cache vs full-forward runs of the same model already differ by ~2e-5.
LOG_PROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def llm(cv3_model_dir):
    return load_stage(cv3_model_dir, "llm")


def _inputs(ref, layout):
    return (torch.from_numpy(ref[f"{layout}_text_ids"]),
            torch.from_numpy(ref[f"{layout}_prompt_text_ids"]),
            torch.from_numpy(ref[f"{layout}_prompt_speech_token"]))


def test_vocabulary_layout(llm, cv3_reference):
    ref = cv3_reference("llm")
    assert llm.vocab_size == ref["zero_shot_teacher_forced_logp"].shape[1]
    assert llm.llm_decoder.bias is None
    assert llm.eos_token == llm.speech_token_size + 1
    assert [llm.is_stop_token(t) for t in (llm.speech_token_size - 1, llm.speech_token_size,
                                           llm.vocab_size - 1)] == [False, True, True]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompt_embeddings(llm, cv3_reference, layout):
    ref = cv3_reference("llm")
    embeds = llm.prompt_embeddings(*_inputs(ref, layout)).detach()
    abs_err, _ = report_error(f"cv3 llm {layout} input embeddings", embeds, ref[f"{layout}_lm_input_embeds"])
    assert abs_err == 0.0   # a concatenation of embedding rows: exact


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacher_forced_log_probs(llm, cv3_reference, layout):
    ref = cv3_reference("llm")
    logp = llm.log_probs(llm.prompt_embeddings(*_inputs(ref, layout)), torch.from_numpy(ref["forced_tokens"]))
    abs_err, _ = report_error(f"cv3 llm {layout} teacher-forced log-probs", logp,
                              ref[f"{layout}_teacher_forced_logp"])
    assert abs_err < LOG_PROB_ATOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_identical(llm, cv3_reference, layout):
    ref = cv3_reference("llm")
    tokens = list(llm.generate(*_inputs(ref, layout), sampling=greedy_sampling))
    assert tokens == ref[f"{layout}_greedy_tokens"].tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seeded_ras_sampling_identical(llm, cv3_reference, layout):
    ref = cv3_reference("llm")
    torch.manual_seed(int(ref[f"{layout}_sampled_tokens_seed"][0]))
    assert list(llm.generate(*_inputs(ref, layout))) == ref[f"{layout}_sampled_tokens"].tolist()


def test_min_length_masks_sos_not_eos_like_the_reference(llm, cv3_reference):
    """The reference masks index speech_token_size (SOS in CosyVoice3) below the minimum length,
    so EOS may end generation at once; we match it."""
    ref = cv3_reference("llm")
    inputs = _inputs(ref, "cross_lingual")
    assert llm.min_len_masked_token == llm.speech_token_size

    def eos_when_allowed(logp, decoded, generator=None):
        return llm.eos_token if logp[llm.eos_token] > -np.inf else 0

    assert list(llm.generate(*inputs, sampling=eos_when_allowed)) == []

    def never_stop(logp, decoded, generator=None):
        return 0

    assert len(list(llm.generate(*inputs, sampling=never_stop))) == 20 * inputs[0].shape[1]


def test_silent_token_filter(cv3_reference):
    ref = cv3_reference("llm")
    assert CosyVoice3.silent_tokens == frozenset(ref["silent_tokens"].tolist())
    filtered = drop_long_silences(ref["silent_filter_input"].tolist(), CosyVoice3.silent_tokens,
                                  CosyVoice3.max_silent_run)
    assert list(filtered) == ref["silent_filter_output"].tolist()
