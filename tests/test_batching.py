"""Continuous batching: tokens equal the one-request path, requests come and go independently."""
import threading
import time

import pytest
import torch

from cosyvoice.concurrency import llm_scheduler as batching
from cosyvoice.concurrency.llm_scheduler import BatchedLLM
from cosyvoice.concurrency.decode_graphs import StaticDecodeStep, batch_buckets, eager_decode_step, span_buckets
from cosyvoice.errors import InputError
from cosyvoice.loading.model_dir import load_stage
from cosyvoice.models.qwen_slots import SlotKVCache, forward_slots
from cosyvoice.models.sampling import greedy_sampling

LAYOUTS = ["zero_shot", "cross_lingual", "instruct2"]


@pytest.fixture(scope="module")
def llm(model_dir):
    return load_stage(model_dir, "llm")


def _inputs(ref, layout):
    return (torch.from_numpy(ref[f"{layout}_text_ids"]), torch.from_numpy(ref[f"{layout}_prompt_text_ids"]),
            torch.from_numpy(ref[f"{layout}_prompt_speech_token"]))


def _run_concurrently(jobs):
    """Runs each zero-argument job in its own thread; returns their results in order."""
    results, errors = [None] * len(jobs), []

    def run(index, job):
        try:
            results[index] = job()
        except Exception as exc:  # re-raised below through the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return results


@pytest.mark.parity
@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "static"])
def test_batched_greedy_tokens_equal_the_reference(llm, reference, static_decode):
    ref = reference("llm")
    batched = BatchedLLM(llm, max_batch=4, max_len=1024, static_decode=static_decode)
    results = _run_concurrently([lambda layout=layout: list(batched.generate(*_inputs(ref, layout),
                                                                             sampling=greedy_sampling))
                                 for layout in LAYOUTS])
    for layout, tokens in zip(LAYOUTS, results):
        assert tokens == ref[f"{layout}_greedy_tokens"].tolist(), layout


@pytest.fixture(scope="module")
def cv3_llm(cv3_model_dir):
    return load_stage(cv3_model_dir, "llm")


@pytest.mark.parity
def test_cosyvoice3_batched_greedy_tokens_equal_the_reference(cv3_llm, cv3_reference):
    """CosyVoice3's LLM through the scheduler: its 200 stop ids and SOS-masking minimum length
    hold per request in a shared decode step."""
    ref = cv3_reference("llm")
    batched = BatchedLLM(cv3_llm, max_batch=4, max_len=1024, static_decode=True)
    results = _run_concurrently([lambda layout=layout: list(batched.generate(*_inputs(ref, layout),
                                                                             sampling=greedy_sampling))
                                 for layout in LAYOUTS])
    for layout, tokens in zip(LAYOUTS, results):
        assert tokens == ref[f"{layout}_greedy_tokens"].tolist(), layout


@pytest.mark.parametrize("generation", ["cosyvoice2", "cosyvoice3"])
def test_batched_sampling_equals_one_request_at_a_time(request, generation):
    if generation == "cosyvoice2":
        llm, ref = request.getfixturevalue("llm"), request.getfixturevalue("reference")("llm")
    else:
        llm, ref = request.getfixturevalue("cv3_llm"), request.getfixturevalue("cv3_reference")("llm")
    jobs = [(layout, seed) for layout in LAYOUTS for seed in (1, 2)]
    solo = [list(llm.generate(*_inputs(ref, layout), generator=torch.Generator().manual_seed(seed)))
            for layout, seed in jobs]
    batched = BatchedLLM(llm, max_batch=4, max_len=2048)   # fewer slots than requests: some wait
    together = _run_concurrently([
        lambda layout=layout, seed=seed: list(batched.generate(*_inputs(ref, layout),
                                                               generator=torch.Generator().manual_seed(seed)))
        for layout, seed in jobs])
    assert together == solo


def test_a_consumer_that_stops_frees_its_slot(llm, reference):
    ref = reference("llm")
    batched = BatchedLLM(llm, max_batch=2, max_len=2048)
    tokens = batched.generate(*_inputs(ref, "cross_lingual"), generator=torch.Generator().manual_seed(0))
    first = [next(tokens) for _ in range(3)]
    tokens.close()
    deadline = time.monotonic() + 60
    while len(batched._free_slots) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(first) == 3 and len(batched._free_slots) == 2
    assert len(list(batched.generate(*_inputs(ref, "instruct2"), sampling=greedy_sampling))) \
        == len(ref["instruct2_greedy_tokens"])


def test_too_long_for_the_cache_is_an_input_error(llm, reference):
    ref = reference("llm")
    batched = BatchedLLM(llm, max_batch=1, max_len=64)
    with pytest.raises(InputError, match="LLM positions"):
        batched.generate(*_inputs(ref, "zero_shot"))


def test_padded_prefill_then_batched_decode_matches_the_reference(llm, reference):
    """Prompts of different lengths prefilled in one right-padded pass, then decoded together:
    the padding junk left in shorter slots is overwritten before any query can see it."""
    ref = reference("llm")
    with torch.inference_mode():
        prompts = [llm.prompt_embeddings(*_inputs(ref, layout)) for layout in LAYOUTS]
        lengths = torch.tensor([p.shape[1] for p in prompts])
        padded = torch.zeros(len(prompts), int(lengths.max()), prompts[0].shape[2])
        for row, prompt in enumerate(prompts):
            padded[row, :prompt.shape[1]] = prompt[0]
        body = llm.body
        cache = SlotKVCache(body, slots=len(prompts), max_len=512)
        slots = torch.arange(len(prompts))
        positions = torch.arange(padded.shape[1])[None].expand(len(prompts), -1)
        hidden = forward_slots(body, padded, positions, slots, cache)[slots, lengths - 1]
        decoded = [[] for _ in prompts]
        for step in range(12):
            logp = llm.head_log_probs(hidden)
            logp[:, llm.min_len_masked_token] = -float("inf")   # within every layout's minimum length
            tokens = logp.argmax(dim=-1)
            for row, token in enumerate(tokens.tolist()):
                decoded[row].append(token)
            inputs = llm.speech_embedding(tokens)[:, None]
            hidden = forward_slots(body, inputs, (lengths + step)[:, None], slots, cache)[:, 0]
    for layout, tokens in zip(LAYOUTS, decoded):
        assert tokens == ref[f"{layout}_greedy_tokens"][:12].tolist(), layout


def test_batch_buckets_cover_every_batch_size():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert span_buckets(4096) == [256, 512, 1024, 2048, 4096]
    assert span_buckets(100) == [100]


def test_static_decode_step_equals_the_eager_step(llm, reference):
    """Three requests padded to the bucket of 4 (the fourth row writes the scratch slot), one of
    them far into the cache (attention over the 512-position span bucket): the same
    log-probabilities as the eager step."""
    ref = reference("llm")
    body = llm.body
    with torch.inference_mode():
        prompts = [llm.prompt_embeddings(*_inputs(ref, layout)) for layout in LAYOUTS]
        cache = SlotKVCache(body, slots=5, max_len=1024)
        static = StaticDecodeStep(body, llm.head_log_probs, cache, scratch_slot=4, max_batch=4,
                                  hidden_size=body.config.hidden_size)
        eager = eager_decode_step(body, llm.head_log_probs, cache)
        slots = torch.tensor([3, 0, 1])          # any free slots, in any order
        positions = []
        for slot, prompt, start in zip(slots.tolist(), prompts, (0, 300, 40)):
            at = start + torch.arange(prompt.shape[1])[None]
            forward_slots(body, prompt, at, torch.tensor([slot]), cache)   # prefill
            positions.append(int(at[0, -1]) + 1)
        assert 256 < max(positions) <= 512
        tokens = torch.tensor([1, 2, 3])
        for _ in range(4):
            inputs = llm.speech_embedding(tokens)[:, None]                       # [3, 1, H]
            at = torch.tensor(positions)[:, None]
            expected = eager(inputs, at, slots, max(positions) + 1).clone()
            actual = static(inputs, at, slots, max(positions) + 1)
            assert actual.shape == expected.shape
            assert float((actual - expected).abs().max()) < 1e-4
            tokens = expected.argmax(dim=-1)
            positions = [p + 1 for p in positions]


def test_a_failed_setup_reaches_every_request(llm, reference, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(batching, "SlotKVCache", no_memory)
    batched = BatchedLLM(llm, max_batch=2, max_len=256)
    ref = reference("llm")
    for _ in range(2):   # the first request and a later one: none of them hangs
        with pytest.raises(RuntimeError, match="simulated"):
            list(batched.generate(*_inputs(ref, "zero_shot")))
