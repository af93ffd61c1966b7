"""Flow decoder batching across requests (cosyvoice.concurrency.flow_batching): each request's mel in a padded
batch equals its solo run, whatever the other rows' lengths and attention modes."""
import threading
import time

import pytest
import torch

from cosyvoice.concurrency.flow_batching import BatchedFlowDecoder, FlowCall
from cosyvoice.loading.model_dir import load_stage

TOL = 1e-4   # max abs mel difference batched vs solo (float rounding of batched matmuls)


@pytest.fixture(scope="module")
def flow(model_dir):
    return load_stage(model_dir, "flow", device="cpu")


@pytest.fixture(scope="module")
def calls(flow, reference):
    """Decoder inputs of requests with different lengths, streaming chunks and final calls:
    (mu, mask, spks, cond, streaming), all batch 1."""
    ref = reference("flow")
    prompt = (torch.from_numpy(ref["prompt_token"]), torch.from_numpy(ref["prompt_feat"]))
    tokens = torch.from_numpy(ref["token"])
    result = []
    for n_tokens, finalize in ((tokens.shape[1], True), (9, False), (tokens.shape[1] // 2, True), (14, False)):
        embedding = torch.from_numpy(ref["embedding"]) * (1 + 0.1 * len(result))   # a voice per request
        mu, spks, cond, mask = flow.prepare_cfm_inputs(tokens[:, :n_tokens], *prompt, embedding,
                                                       streaming=not finalize, finalize=finalize)
        result.append((mu, mask, spks, cond, not finalize))
    assert len({mu.shape[2] for mu, *_ in result}) == len(result), "lengths must differ to test padding"
    return result


@pytest.fixture(scope="module")
def solo(flow, calls):
    with torch.inference_mode():
        return [flow.decoder(mu, mask, spks, cond, streaming=streaming)
                for mu, mask, spks, cond, streaming in calls]


def test_padded_batch_equals_solo_runs(flow, calls, solo):
    batched = BatchedFlowDecoder(flow.decoder)
    pending = [_pending(call) for call in calls]
    with torch.inference_mode():
        mels = batched.decode_batch(pending)
    for index, (mel, expected) in enumerate(zip(mels, solo)):
        assert mel.shape == expected.shape
        error = float((mel - expected).abs().max())
        print(f"[flow batching] request {index}: {expected.shape[2]} frames, max abs diff {error:.2e}")
        assert error < TOL


def test_padding_is_not_ignored(flow, calls, solo):
    """The check above can fail: the same batch with every frame marked real (padding visible to
    attention) changes the shorter rows."""
    mu, cond = BatchedFlowDecoder._pad([c[0] for c in calls]), BatchedFlowDecoder._pad([c[3] for c in calls])
    spks = torch.cat([c[2] for c in calls])
    streaming = torch.tensor([c[4] for c in calls])
    with torch.inference_mode():
        unmasked = flow.decoder(mu, torch.ones_like(mu[:, :1]), spks, cond, streaming=streaming)
    shortest = min(range(len(calls)), key=lambda i: calls[i][0].shape[2])
    length = calls[shortest][0].shape[2]
    assert float((unmasked[shortest:shortest + 1, :, :length] - solo[shortest]).abs().max()) > 1e-2


def test_concurrent_callers_are_batched_and_each_gets_its_own_mel(flow, calls, solo):
    sizes = []

    def recording_decoder(mu, mask, spks, cond, n_timesteps, streaming):
        sizes.append(mu.shape[0])
        return flow.decoder(mu, mask, spks, cond, n_timesteps=n_timesteps, streaming=streaming)

    batched = BatchedFlowDecoder(recording_decoder, max_batch=8)
    start = threading.Barrier(len(calls))
    results: dict[int, torch.Tensor] = {}

    def caller(index):
        mu, mask, spks, cond, streaming = calls[index]
        start.wait()
        for _ in range(3):   # several rounds, so callers overlap whatever the scheduling
            results[index] = batched(mu, mask, spks, cond, streaming=streaming)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sum(sizes) == 3 * len(calls)
    assert max(sizes) > 1, f"no call was batched: batch sizes {sizes}"
    assert batched.batch_sizes == [sizes.count(n) for n in range(len(batched.batch_sizes))]
    for index, expected in enumerate(solo):
        assert float((results[index] - expected).abs().max()) < TOL


def test_a_failing_batch_reaches_its_callers_and_the_worker_carries_on(flow, calls, solo):
    failures = iter([RuntimeError("out of memory (simulated)")])

    def flaky_decoder(*args, **kwargs):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return flow.decoder(*args, **kwargs)

    batched = BatchedFlowDecoder(flaky_decoder)
    mu, mask, spks, cond, streaming = calls[1]
    with pytest.raises(RuntimeError, match="simulated"):
        batched(mu, mask, spks, cond, streaming=streaming)
    assert float((batched(mu, mask, spks, cond, streaming=streaming) - solo[1]).abs().max()) < TOL


def test_waiting_streaming_chunks_go_before_final_calls_then_first_come_first_served(flow, calls, solo):
    """One call at a time (max_batch 1, as on a CPU): while one call runs, two final calls and then
    two streaming chunks arrive; the chunks run next, then the final calls, each pair in arrival order."""
    started, release = threading.Event(), threading.Event()
    served = []

    def recording_decoder(mu, mask, spks, cond, n_timesteps, streaming):
        served.append(mu.shape[2])
        if len(served) == 1:     # hold the first call until the others are waiting
            started.set()
            assert release.wait(timeout=60)
        return flow.decoder(mu, mask, spks, cond, n_timesteps=n_timesteps, streaming=streaming)

    decoder = BatchedFlowDecoder(recording_decoder, max_batch=1)
    final_calls = [i for i, c in enumerate(calls) if not c[4]]
    chunk_calls = [i for i, c in enumerate(calls) if c[4]]
    first, final_calls = final_calls[0], final_calls[1:] + final_calls[:1]   # `first` comes again later
    results: dict[int, torch.Tensor] = {}
    threads = [_start_call(decoder, calls[first], results, first)]
    assert started.wait(timeout=60)
    for index in final_calls + chunk_calls:   # queued one after another while the first call runs
        threads.append(_start_call(decoder, calls[index], results, index))
        _wait_until(lambda: decoder.waiting == len(threads) - 1)
    release.set()
    for thread in threads:
        thread.join(timeout=120)
    lengths = [calls[i][0].shape[2] for i in [first] + chunk_calls + final_calls]
    assert served == lengths
    assert decoder.batch_sizes[1] == len(served)
    for index, expected in enumerate(solo):
        assert float((results[index] - expected).abs().max()) < TOL


def test_a_streaming_chunk_runs_between_the_steps_of_a_final_call(flow, calls, solo):
    """A chunk that arrives while a final call is part-way through its integration finishes
    first; the final call then goes on from where it was, and both mels equal their solo runs."""
    final, chunk = next(i for i, c in enumerate(calls) if not c[4]), next(i for i, c in enumerate(calls) if c[4])
    paused, resume = threading.Event(), threading.Event()
    finished = []

    class PausingDecoder:
        """flow.decoder, step by step; the first call pauses after its first step until `resume`."""
        def __init__(self):
            self.calls = 0

        def steps(self, mu, *args, **kwargs):
            self.calls += 1
            first, done_steps = self.calls == 1, 0
            integration = flow.decoder.steps(mu, *args, **kwargs)
            while True:
                try:
                    next(integration)
                except StopIteration as done:
                    finished.append(mu.shape[2])
                    return done.value
                done_steps += 1
                if first and done_steps == 1:
                    paused.set()
                    assert resume.wait(timeout=60)
                yield

    decoder = BatchedFlowDecoder(PausingDecoder(), max_batch=1)
    results: dict[int, torch.Tensor] = {}
    threads = [_start_call(decoder, calls[final], results, final)]
    assert paused.wait(timeout=60)
    threads.append(_start_call(decoder, calls[chunk], results, chunk))
    _wait_until(lambda: decoder.waiting == 1)
    resume.set()
    for thread in threads:
        thread.join(timeout=120)
    assert finished == [calls[chunk][0].shape[2], calls[final][0].shape[2]]
    for index in (final, chunk):
        assert float((results[index] - solo[index]).abs().max()) < TOL


def _start_call(decoder, call, results: dict, key) -> threading.Thread:
    """Calls `decoder` with `call` (mu, mask, spks, cond, streaming) on a new thread; the mel
    lands in results[key]."""
    mu, mask, spks, cond, streaming = call

    def run():
        results[key] = decoder(mu, mask, spks, cond, streaming=streaming)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _pending(call) -> FlowCall:
    mu, _, spks, cond, streaming = call
    return FlowCall(mu, spks, cond, 10, streaming)
