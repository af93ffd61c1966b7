"""Contract test of the TensorRT-LLM backend against FAKE_TENSORRT_LLM, a stand-in `tensorrt_llm`
package defined here that records how it is called (the real wheel needs a CUDA GPU and cannot be
installed on CI). The fake's LLM runs the exported model with stock transformers (so, like
TensorRT-LLM, without lm_head.bias), calls the request's logits processor and decodes greedily,
which is what the real engine is asked to do. It mirrors what TensorRT-LLM 1.0's source shows of
the TensorRT-engine flavour: the config classes refuse field names the real ones lack, the
sampling params are pickled on submission (the real LLM sends them to its executor worker
process), the processor is one callable called with logits [1, beam, rows], and the streamed
token_ids are cumulative, a trailing stop word dropped from the final output. Both generations:
CosyVoice2 on the cosyvoice2-tiny fixture, CosyVoice3 (200 stop ids, SOS masked below the minimum
length, bias-free head) on cosyvoice3-tiny. What this cannot show: that the real engine behaves
like the fake (see cosyvoice/backends/trtllm.py)."""
import asyncio
import functools
import importlib.machinery
import pickle
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2ForCausalLM

from cosyvoice.backends import backend_factory
from cosyvoice.backends.engine_cache import ENGINE_MARK, BuildLimits
from cosyvoice.backends.speech_sampler import SpeechTokenSampler
from cosyvoice.backends.trtllm import (NOT_INSTALLED, BackendUnavailable, TrtLlmFactory,
                                       request_seed)
from cosyvoice.loading.model_dir import load_stage
from cosyvoice.models.sampling import greedy_sampling

LAYOUTS = ["zero_shot", "cross_lingual", "instruct2"]
LIMITS = BuildLimits.for_server(workers=3, max_text_chars=200)


class Recorder:
    """Every call the fake receives, in order: (what, details)."""

    def __init__(self):
        self.calls = []
        self.version = "1.0.0"

    def of(self, what):
        return [details for name, details in self.calls if name == what]


class FakeConfig:
    """A config object of the fake: its keyword arguments become attributes; a name the real
    class lacks is a TypeError, as it is for the real dataclasses and pydantic models."""
    FIELDS: frozenset = frozenset()

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - self.FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}")
        self.kwargs = kwargs
        self.__dict__.update(kwargs)


class FakeBuildConfig(FakeConfig):        # tensorrt_llm/builder.py BuildConfig (a subset)
    FIELDS = frozenset({"max_input_len", "max_seq_len", "max_batch_size", "max_beam_width",
                        "max_num_tokens", "opt_num_tokens", "gather_context_logits",
                        "gather_generation_logits", "plugin_config"})


class FakeKvCacheConfig(FakeConfig):      # tensorrt_llm/llmapi/llm_args.py KvCacheConfig (a subset)
    FIELDS = frozenset({"free_gpu_memory_fraction", "max_tokens", "enable_block_reuse"})


class FakeSamplingParams(FakeConfig):     # tensorrt_llm/sampling_params.py SamplingParams (a subset)
    FIELDS = frozenset({"end_id", "pad_id", "max_tokens", "stop_token_ids", "include_stop_str_in_output",
                        "top_k", "top_p", "temperature", "seed", "min_tokens", "detokenize",
                        "logits_processor", "apply_batched_logits_processor", "n", "best_of"})


# LLM(...) keywords the backend uses, all fields of TensorRT-LLM 1.0's TrtLlmArgs (LLM refuses others).
LLM_KWARGS = frozenset({"skip_tokenizer_init", "dtype", "build_config", "kv_cache_config"})


def eos_when_allowed(logp, decoded, generator=None):
    """A sampler that ends the segment as soon as EOS is allowed (module-level: it must pickle)."""
    eos = logp.shape[0] - 3
    return eos if logp[eos] > -float("inf") else 0


def pick_when_allowed(row, logp, decoded, generator=None):
    """A sampler that draws speech-head row `row` as soon as it is allowed, else code 0 (bind
    `row` with functools.partial: it must pickle)."""
    return row if logp[row] > -float("inf") else 0


class FakeRequest:
    """One generate_async(streaming=True) result: an async iterator of RequestOutputs whose
    outputs[0].token_ids holds every id generated so far."""

    def __init__(self, model, prompt, params):
        self.model, self.prompt, self.params = model, list(prompt), params
        self.generated, self.finished, self.aborted = [], False, False
        assert callable(params.logits_processor), "the TensorRT flow takes one processor, not a list"

    def abort(self):
        self.aborted = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished or self.aborted:
            raise StopAsyncIteration
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([self.prompt + self.generated]), logits_to_keep=1).logits[0, -1]
        logits = logits.float().reshape(1, 1, -1).clone()           # [1, beam, rows] like the engine's
        # The real stream_ptr is the engine's CUDA stream (an int); there is none here.
        self.params.logits_processor(7, logits, [self.prompt + self.generated], None, None)
        assert self.params.top_k == 1
        token = int(logits.argmax())
        self.generated.append(token)
        ended_by_stop_word = token in self.params.stop_token_ids and token != self.params.end_id
        self.finished = (token == self.params.end_id or ended_by_stop_word
                         or len(self.generated) >= self.params.max_tokens)
        token_ids = self.generated[:-1] if ended_by_stop_word else self.generated
        await asyncio.sleep(0)
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(token_ids))])


def make_fake_tensorrt_llm(recorder: Recorder) -> dict:
    """FAKE_TENSORRT_LLM: the modules and names the backend uses, recording each call."""

    class FakeLLM:
        def __init__(self, model, **kwargs):
            recorder.calls.append(("LLM", {"model": model, **kwargs}))
            if set(kwargs) - LLM_KWARGS:
                raise ValueError(f"LLM got invalid argument(s): {sorted(set(kwargs) - LLM_KWARGS)}")
            engine_file = Path(model) / "engine.txt"
            self.hf_dir = Path(engine_file.read_text()) if engine_file.is_file() else Path(model)
            self.model = Qwen2ForCausalLM.from_pretrained(str(self.hf_dir), dtype=torch.float32).eval()
            self.requests = []

        def save(self, path):
            recorder.calls.append(("save", path))
            Path(path).mkdir(parents=True)
            (Path(path) / "engine.txt").write_text(str(self.hf_dir))

        def generate_async(self, inputs, sampling_params=None, streaming=False):
            recorder.calls.append(("generate_async", {"inputs": inputs, "streaming": streaming,
                                                      "params": sampling_params}))
            # The real LLM pickles the request to its executor's worker process, which runs the
            # logits processor on its own copy.
            request = FakeRequest(self.model, inputs, pickle.loads(pickle.dumps(sampling_params)))
            self.requests.append(request)
            return request

    def module(name, **names):
        fake = types.ModuleType(name)
        fake.__spec__ = importlib.machinery.ModuleSpec(name, None)
        fake.__dict__.update(names)
        return fake

    def sampling_params(**kwargs):
        recorder.calls.append(("SamplingParams", kwargs))
        return FakeSamplingParams(**kwargs)

    root = module("tensorrt_llm", __version__=recorder.version, SamplingParams=sampling_params,
                  BuildConfig=FakeBuildConfig)
    return {"tensorrt_llm": root,
            "tensorrt_llm._tensorrt_engine": module("tensorrt_llm._tensorrt_engine", LLM=FakeLLM),
            "tensorrt_llm.llmapi": module("tensorrt_llm.llmapi", BuildConfig=FakeBuildConfig,
                                          KvCacheConfig=FakeKvCacheConfig)}


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")


@pytest.fixture
def fake_trtllm(monkeypatch, fake_gpu):
    recorder = Recorder()

    def install():
        for name, fake in make_fake_tensorrt_llm(recorder).items():
            monkeypatch.setitem(sys.modules, name, fake)
    install()
    recorder.reinstall = install
    return recorder


@pytest.fixture(scope="module")
def tiny_llm(model_dir):
    return load_stage(model_dir, "llm")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trtllm-cache")


def make_backend(model_dir, cache_dir):
    return TrtLlmFactory(limits=LIMITS, cache_dir=cache_dir)(model_dir, torch.device("cuda"), torch.float32)


def inputs(ref, layout):
    return (torch.from_numpy(ref[f"{layout}_text_ids"]), torch.from_numpy(ref[f"{layout}_prompt_text_ids"]),
            torch.from_numpy(ref[f"{layout}_prompt_speech_token"]))


def test_engine_is_built_once_per_key_then_loaded(fake_trtllm, model_dir, tmp_path):
    make_backend(model_dir, tmp_path)
    build = fake_trtllm.of("LLM")[0]
    assert Path(build["model"]).name.startswith("hf-")                 # built from our HF export
    assert build["skip_tokenizer_init"] is True and build["dtype"] == "bfloat16"
    assert build["build_config"].kwargs == dict(
        max_batch_size=3, max_input_len=LIMITS.max_input_len, max_seq_len=LIMITS.max_seq_len,
        max_num_tokens=LIMITS.max_num_tokens, max_beam_width=1)
    assert build["kv_cache_config"].max_tokens == 3 * LIMITS.max_seq_len
    saved = Path(fake_trtllm.of("save")[0])
    engine = saved.with_name(saved.name.removesuffix(".partial"))
    assert engine.name.startswith("nvidia-h100-80gb-hbm3-sm90-trtllm1.0.0-bfloat16-")
    assert (engine / ENGINE_MARK).is_file()

    make_backend(model_dir, tmp_path)                                    # second start: load
    load = fake_trtllm.of("LLM")[1]
    assert load["model"] == str(engine) and "build_config" not in load
    assert len(fake_trtllm.of("save")) == 1

    fake_trtllm.version = "1.0.1"                                      # new library: new engine
    fake_trtllm.reinstall()
    make_backend(model_dir, tmp_path)
    assert "build_config" in fake_trtllm.of("LLM")[2] and len(fake_trtllm.of("save")) == 2
    assert len(list(tmp_path.glob("hf-*"))) == 1                       # exported once
    assert len(list((tmp_path / "engines").iterdir())) == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_match_speech_lm(fake_trtllm, model_dir, cache_dir, tiny_llm, reference, layout):
    backend = make_backend(model_dir, cache_dir)
    ref = reference("llm")
    tokens = list(backend.generate(*inputs(ref, layout), sampling=greedy_sampling))
    assert tokens == list(tiny_llm.generate(*inputs(ref, layout), sampling=greedy_sampling))
    assert tokens == ref[f"{layout}_greedy_tokens"].tolist()
    request = fake_trtllm.of("generate_async")[-1]
    assert request["streaming"] is True
    assert request["inputs"] == backend.vocab.prompt_ids(*inputs(ref, layout))
    params = fake_trtllm.of("SamplingParams")[-1]
    assert params["end_id"] == backend.vocab.eos_id and params["stop_token_ids"] == list(backend.vocab.stop_ids)
    assert params["max_tokens"] == 20 * ref[f"{layout}_text_ids"].shape[1] and params["detokenize"] is False


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seeded_repetition_aware_sampling_matches_speech_lm(fake_trtllm, model_dir, cache_dir, tiny_llm,
                                                            reference, layout):
    """The yaml's RAS runs in the logits processor: with the request's seed it draws SpeechLM's tokens."""
    backend = make_backend(model_dir, cache_dir)
    ref = reference("llm")
    tokens = list(backend.generate(*inputs(ref, layout), generator=torch.Generator().manual_seed(11)))
    seed = request_seed(torch.Generator().manual_seed(11))
    expected = list(tiny_llm.generate(*inputs(ref, layout), generator=torch.Generator().manual_seed(seed)))
    print(f"[trtllm fake] {layout}: {len(tokens)} sampled tokens")
    assert tokens == expected


def test_concurrent_requests_each_get_their_own_processor(fake_trtllm, model_dir, cache_dir, tiny_llm, reference):
    backend = make_backend(model_dir, cache_dir)
    ref = reference("llm")
    results = {}

    def run(layout):
        results[layout] = list(backend.generate(*inputs(ref, layout), sampling=greedy_sampling))
    threads = [threading.Thread(target=run, args=(layout,)) for layout in LAYOUTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {layout: results.get(layout) for layout in LAYOUTS} == \
        {layout: ref[f"{layout}_greedy_tokens"].tolist() for layout in LAYOUTS}
    processors = [call["params"].logits_processor for call in fake_trtllm.of("generate_async")]
    assert len({id(processor) for processor in processors}) == len(LAYOUTS)


def test_closing_the_stream_aborts_the_request(fake_trtllm, model_dir, cache_dir, reference):
    backend = make_backend(model_dir, cache_dir)
    stream = backend.generate(*inputs(reference("llm"), "zero_shot"), sampling=greedy_sampling)
    first = [next(stream) for _ in range(3)]
    stream.close()
    request = backend.llm.requests[-1]
    deadline = time.monotonic() + 30
    while not request.aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(first) == 3 and request.aborted


def test_eos_is_blocked_before_the_minimum_length(fake_trtllm, model_dir, cache_dir, reference):
    backend = make_backend(model_dir, cache_dir)
    text, prompt_text, prompt_speech = inputs(reference("llm"), "cross_lingual")
    assert backend.vocab.speech_size == backend.head_bias.shape[0] - 3      # eos_when_allowed's EOS
    assert len(list(backend.generate(text, prompt_text, prompt_speech, sampling=eos_when_allowed))) == \
        2 * text.shape[1]


def test_sampler_forces_one_token_and_adds_the_bias():
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0])                      # speech_size 2 + 3 stops
    sampler = SpeechTokenSampler(speech_offset=4, head_bias=bias, speech_size=2, eos_row=2,
                                 min_len_masked_rows=[2], min_len=0, sampling=greedy_sampling, seed=0)
    logits = torch.zeros(1, 1, 12)
    sampler(0, logits, [[1, 2]], None, None)
    assert logits[0, 0, 4 + 2] == 0 and torch.isinf(logits).sum() == 11   # <|eos1|> won by its bias
    blocked = SpeechTokenSampler(4, bias, 2, 2, [2], min_len=1, sampling=greedy_sampling, seed=0)
    assert blocked.force_next(torch.zeros(12)) != 2 and blocked.decoded


def test_missing_tensorrt_llm_is_one_clear_error(fake_gpu, monkeypatch, model_dir, tmp_path):
    monkeypatch.setattr("cosyvoice.backends.trtllm.tensorrt_llm_installed", lambda: False)
    with pytest.raises(BackendUnavailable, match="server.py") as error:
        make_backend(model_dir, tmp_path)
    assert str(error.value) == NOT_INSTALLED and isinstance(backend_factory("trtllm"), TrtLlmFactory)


def test_cpu_device_is_refused(model_dir, tmp_path):
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        TrtLlmFactory(cache_dir=tmp_path)(model_dir, torch.device("cpu"), torch.float32)


def test_the_pipeline_runs_on_the_backend(fake_trtllm, model_dir, cache_dir, fixture_dir):
    """cosyvoice.load(llm_backend=factory): the synthesizer's tokens come from the backend."""
    import cosyvoice

    tts = cosyvoice.load(model_dir, llm_backend=lambda directory, device, dtype: make_backend(directory, cache_dir))
    chunks = list(tts.cross_lingual("Hello there.", fixture_dir / "reference" / "prompt.wav", stream=True, seed=0))
    assert sum(len(chunk) for chunk in chunks) > 0
    assert len(fake_trtllm.of("generate_async")) == 1


def test_a_request_the_llm_refuses_fails_instead_of_hanging(fake_trtllm, model_dir, cache_dir, reference):
    """generate_async raises at once for a request it refuses (the real one for a processor that
    does not pickle, a prompt plus max_tokens over max_seq_len, or an LLM shutting down)."""
    backend = make_backend(model_dir, cache_dir)
    failures = []

    def run():
        try:
            list(backend.generate(*inputs(reference("llm"), "zero_shot"),
                                  sampling=lambda logp, decoded, generator=None: 0))   # does not pickle
        except RuntimeError as error:
            failures.append(error)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and "TensorRT-LLM request failed" in str(failures[0])


# ---- CosyVoice3 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cv3_llm(cv3_model_dir):
    return load_stage(cv3_model_dir, "llm")


@pytest.fixture(scope="module")
def cv3_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trtllm-cache-cv3")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cv3_greedy_tokens_match_cosyvoice3_lm(fake_trtllm, cv3_model_dir, cv3_cache_dir, cv3_llm, cv3_reference,
                                               layout):
    backend = make_backend(cv3_model_dir, cv3_cache_dir)
    ref = cv3_reference("llm")
    vocab = backend.vocab
    assert backend.info.generation == "CosyVoice3" and bool((backend.head_bias == 0).all())
    tokens = list(backend.generate(*inputs(ref, layout), sampling=greedy_sampling))
    assert tokens == list(cv3_llm.generate(*inputs(ref, layout), sampling=greedy_sampling))
    assert tokens == ref[f"{layout}_greedy_tokens"].tolist()
    prompt = fake_trtllm.of("generate_async")[-1]["inputs"]
    assert prompt == vocab.prompt_ids(*inputs(ref, layout))
    assert prompt[0] == 151924 + 6561 and 151924 + 6563 in prompt          # SOS, TASK_ID rows
    params = fake_trtllm.of("SamplingParams")[-1]
    assert params["end_id"] == params["pad_id"] == 151924 + 6562             # EOS
    assert params["stop_token_ids"] == list(range(151924 + 6561, 151924 + 6761))   # all 200 extra ids
    assert params["max_tokens"] == 20 * ref[f"{layout}_text_ids"].shape[1]
    assert backend.llm.requests[-1].generated[-1] == vocab.eos_id          # ended on its end id


def test_cv3_seeded_repetition_aware_sampling_matches_cosyvoice3_lm(fake_trtllm, cv3_model_dir, cv3_cache_dir,
                                                                    cv3_llm, cv3_reference):
    backend = make_backend(cv3_model_dir, cv3_cache_dir)
    ref = cv3_reference("llm")
    tokens = list(backend.generate(*inputs(ref, "zero_shot"), generator=torch.Generator().manual_seed(5)))
    seed = request_seed(torch.Generator().manual_seed(5))
    assert tokens and tokens == list(cv3_llm.generate(*inputs(ref, "zero_shot"),
                                                      generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("extra, name", [(0, "SOS"), (1, "EOS"), (2, "TASK_ID"), (3, "FILL"), (4, "unused 6565"),
                                         (199, "unused 6760")])
def test_cv3_every_extra_id_stops_and_only_sos_waits_for_the_minimum(fake_trtllm, cv3_model_dir, cv3_cache_dir,
                                                                     cv3_llm, cv3_reference, extra, name):
    """As CosyVoice3LM (and the reference): any of the 200 ids after the codes ends the segment
    without being emitted; below the minimum length only row 6561 (`min_len_masked_token`, SOS)
    is blocked, so EOS and the others may end it at once. The engine is always ended on EOS."""
    backend = make_backend(cv3_model_dir, cv3_cache_dir)
    text, prompt_text, prompt_speech = inputs(cv3_reference("llm"), "cross_lingual")
    row = 6561 + extra
    sampler = functools.partial(pick_when_allowed, row)
    tokens = list(backend.generate(text, prompt_text, prompt_speech, sampling=sampler))
    assert tokens == list(cv3_llm.generate(text, prompt_text, prompt_speech, sampling=sampler))
    assert tokens == ([0] * (2 * text.shape[1]) if row == cv3_llm.min_len_masked_token else [])
    request = backend.llm.requests[-1]
    assert request.finished and request.generated[-1] == backend.vocab.eos_id


def test_cv3_sampler_keeps_to_the_speech_head():
    """Text ids and padding rows are never drawn, however large their logits; a drawn stop id
    (here SOS, allowed from the minimum length on) is forced as EOS."""
    text, padding = 3, 2
    head = torch.tensor([1.0, 0.0, 9.0, 0.5, 0.0, 0.0])            # 2 codes, SOS EOS TASK_ID FILL
    sampler = SpeechTokenSampler(speech_offset=text, head_bias=torch.zeros(6), speech_size=2, eos_row=3,
                                 min_len_masked_rows=[2], min_len=1, sampling=greedy_sampling, seed=0)
    logits = torch.cat([torch.full((text,), 50.0), head, torch.full((padding,), 50.0)])
    first = logits.clone()
    assert sampler.force_next(first) == 0 and first.argmax() == text + 0 and torch.isinf(first).sum() == 10
    second = logits.clone()
    assert sampler.force_next(second) == 2 and second.argmax() == text + 3 and sampler.decoded == [0]
