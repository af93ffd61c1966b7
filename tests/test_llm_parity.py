"""LLM stage parity with the reference: prompt layout, teacher-forced log-probs, decoding."""
import numpy as np
import pytest
import torch
from conftest import report_error

from cosyvoice.loading.model_dir import load_stage
from cosyvoice.models.sampling import greedy_sampling

pytestmark = pytest.mark.parity
LAYOUTS = ["zero_shot", "cross_lingual", "instruct2"]


@pytest.fixture(scope="module")
def llm(model_dir):
    return load_stage(model_dir, "llm")


def _inputs(ref, layout):
    return (torch.from_numpy(ref[f"{layout}_text_ids"]),
            torch.from_numpy(ref[f"{layout}_prompt_text_ids"]),
            torch.from_numpy(ref[f"{layout}_prompt_speech_token"]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompt_embeddings(llm, reference, layout):
    ref = reference("llm")
    embeds = llm.prompt_embeddings(*_inputs(ref, layout)).detach()
    abs_err, _ = report_error(f"llm {layout} input embeddings", embeds, ref[f"{layout}_lm_input_embeds"])
    assert abs_err < 1e-6


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacher_forced_log_probs(llm, reference, layout):
    ref = reference("llm")
    embeds = llm.prompt_embeddings(*_inputs(ref, layout))
    logp = llm.log_probs(embeds, torch.from_numpy(ref["forced_tokens"]))
    abs_err, _ = report_error(f"llm {layout} teacher-forced log-probs", logp,
                              ref[f"{layout}_teacher_forced_logp"])
    assert abs_err < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_identical(llm, reference, layout):
    ref = reference("llm")
    tokens = list(llm.generate(*_inputs(ref, layout), sampling=greedy_sampling))
    expected = ref[f"{layout}_greedy_tokens"].tolist()
    print(f"[parity] llm {layout} greedy: {len(tokens)} tokens, reference {len(expected)}")
    assert tokens == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seeded_ras_sampling_identical(llm, reference, layout):
    """The yaml's repetition-aware sampler draws like the reference given the same seed."""
    ref = reference("llm")
    torch.manual_seed(int(ref[f"{layout}_sampled_tokens_seed"][0]))
    tokens = list(llm.generate(*_inputs(ref, layout)))
    expected = ref[f"{layout}_sampled_tokens"].tolist()
    print(f"[parity] llm {layout} sampled: {len(tokens)} tokens, reference {len(expected)}")
    assert tokens == expected


def test_length_limits_follow_the_text(llm, reference):
    """min/max come from the text to speak: no EOS before 2x, never more than 20x tokens."""
    ref = reference("llm")
    text, prompt_text, prompt_speech = _inputs(ref, "cross_lingual")
    n_text = text.shape[1]

    def eos_when_allowed(logp, decoded, generator=None):
        return llm.eos_token if logp[llm.eos_token] > -np.inf else 0

    assert len(list(llm.generate(text, prompt_text, prompt_speech, sampling=eos_when_allowed))) == 2 * n_text

    def never_stop(logp, decoded, generator=None):
        return 0

    assert len(list(llm.generate(text, prompt_text, prompt_speech, sampling=never_stop))) == 20 * n_text


def test_private_generator_reproduces_and_leaves_global_rng_alone(llm, reference):
    ref = reference("llm")
    inputs = _inputs(ref, "cross_lingual")
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    first = list(llm.generate(*inputs, generator=torch.Generator().manual_seed(7)))
    second = list(llm.generate(*inputs, generator=torch.Generator().manual_seed(7)))
    assert first == second
    assert torch.equal(torch.get_rng_state(), global_state)
