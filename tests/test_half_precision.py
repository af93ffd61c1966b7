"""Half precision against the fp32 reference: how far bf16/fp16 move the flow mel and the LLM's
next-token distribution (the numbers are printed; the bounds catch dtype-handling bugs, which
give errors of order 1)."""
import numpy as np
import pytest
import torch
from conftest import report_error

from cosyvoice.loading.model_dir import load_stage


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flow_mel_in_half_precision(model_dir, reference, dtype):
    ref = reference("flow")
    flow = load_stage(model_dir, "flow", dtype=dtype)
    mel = flow.inference(torch.from_numpy(ref["token"]), torch.from_numpy(ref["prompt_token"]),
                         torch.from_numpy(ref["prompt_feat"]), torch.from_numpy(ref["embedding"]),
                         streaming=False, finalize=True)
    assert mel.dtype == torch.float32
    _, rel_err = report_error(f"flow mel {dtype}", mel, ref["nonstream_mel"])
    assert rel_err < 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llm_distribution_in_half_precision(model_dir, reference, dtype):
    ref = reference("llm")
    llm = load_stage(model_dir, "llm", dtype=dtype)
    prompt = llm.prompt_embeddings(torch.from_numpy(ref["zero_shot_text_ids"]),
                                   torch.from_numpy(ref["zero_shot_prompt_text_ids"]),
                                   torch.from_numpy(ref["zero_shot_prompt_speech_token"]))
    logp = llm.log_probs(prompt, torch.from_numpy(ref["forced_tokens"])).numpy()
    expected = ref["zero_shot_teacher_forced_logp"]
    total_variation = 0.5 * np.abs(np.exp(logp) - np.exp(expected)).sum(axis=1).max()
    print(f"[half] llm {dtype}: max total variation per step {total_variation:.4f}")
    assert total_variation < 5e-2
