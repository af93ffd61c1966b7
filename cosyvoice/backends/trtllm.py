"""The LLM stage on TensorRT-LLM (written against TensorRT-LLM 1.0; needs a CUDA GPU and MPI), for
CosyVoice2 and CosyVoice3 model directories alike (the export's metadata says which).

API: the LLM API's TensorRT-engine flavour, `tensorrt_llm._tensorrt_engine.LLM`, on our HF export.
It builds a TensorRT engine from the HF checkpoint (no convert_checkpoint / trtllm-build steps),
saves it with `LLM.save`, and loads the saved engine on later starts, while still giving the LLM
API's in-flight batching, `generate_async` streaming and per-request logits processors. Chosen
over `tensorrt_llm.LLM` (1.0's PyTorch backend, which runs the HF checkpoint without an engine)
because the compiled engine is where the reported 2.5-4x over transformers comes from, and its
build is a one-time cost per GPU and version that the engine cache absorbs.

Sampling: TensorRT-LLM has no repetition-aware sampling, and its Qwen lm_head has no bias (it
drops CosyVoice2's; CosyVoice3's export has none). A per-request logits processor
(`speech_sampler.SpeechTokenSampler`) keeps only the speech head's ids (codes and every stop id:
3 for CosyVoice2, 200 for CosyVoice3), adds the head's bias, blocks below min_len the rows the
LLM blocks (the export's `min_len_masked_rows`, from `min_len_masked_token`: EOS in CosyVoice2,
SOS in CosyVoice3 as in the reference) and draws each token with the yaml's own sampler (RAS),
then forces it, EOS for any stop id; the engine decodes greedily (top_k=1) and so emits exactly
that token, and ends on EOS (its end id; every stop id is also a stop token). The distribution is
the reference's; what differs from the PyTorch backend: the draws come from a CPU generator seeded
per request (from the caller's generator), so a given seed picks other tokens than SpeechLM does;
the logits come from a bf16/fp16 engine; and a segment is cut at `max_output_len` tokens where
SpeechLM allows 20 per text token. Each step costs one small device-to-host copy per request.

Worker process: on one GPU the LLM API runs the executor in a worker process it spawns with
mpi4py (so the entry point must be guarded by `if __name__ == "__main__":`), and each request,
its SamplingParams and so its logits processor, is pickled over ZeroMQ to that process. The
processor runs there on a copy: it must pickle by reference (its `sampling` a module-level
function or a functools.partial of one, never a lambda or closure), and its state never comes
back (nothing here reads it). The worker imports `cosyvoice` with this process's sys.path.

Batching: requests from concurrent threads are submitted at once and the executor batches them in
flight (up to `max_batch_size`, the server's worker count). Streaming runs on one asyncio loop
thread owned by the backend; each `generate` iterator reads its request's tokens from a queue, and
closing it early aborts the request.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import queue
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..loading.config import YamlConfig
from ..loading.model_dir import ModelDir, open_model_dir
from ..loading import registry
from ..models.llm import token_length_limits
from .engine_cache import (BuildLimits, EngineKey, engine_dir, engine_is_complete, export_dir,
                           mark_complete)
from .hf_export import ExportInfo, export_model_dir
from .hf_model import export_lm_head_bias
from .speech_sampler import SpeechTokenSampler
from .vocab import MergedVocab

log = logging.getLogger("cosyvoice.backends.trtllm")

SERVER_DEFAULT_LIMITS = BuildLimits.for_server(workers=2, max_text_chars=2000)
NOT_INSTALLED = ("TensorRT-LLM is not installed in this environment (it needs a CUDA 12 wheel "
                 "from NVIDIA's package index, Python 3.10 or 3.12); use server.py for the "
                 "PyTorch runtime")


class BackendUnavailable(RuntimeError):
    """The TensorRT-LLM backend cannot run here (library or GPU missing)."""


def tensorrt_llm_installed() -> bool:
    """Checked without importing it (the import can hang outside mpirun)."""
    return importlib.util.find_spec("tensorrt_llm") is not None


def import_tensorrt_llm():
    if not tensorrt_llm_installed():
        raise BackendUnavailable(NOT_INSTALLED)
    import tensorrt_llm
    return tensorrt_llm


def default_dtype(capability: tuple[int, int]) -> str:
    """bfloat16 where the GPU computes it natively (Ampere and newer), else float16."""
    return "bfloat16" if capability >= (8, 0) else "float16"


def yaml_sampling(config: YamlConfig) -> Callable[..., int]:
    """The LLM's sampler as the yaml configures it (ras_sampling with its arguments)."""
    return registry.build(config.resolve("llm").kwargs["sampling"], where=f"{config.source}: llm.sampling")


def request_seed(generator: torch.Generator | None) -> int:
    """A seed for one request's draws, taken from the caller's generator (or torch's global one)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=device))


@dataclass(frozen=True)
class TrtLlmFactory:
    """Makes the backend for a model directory: exports the LLM and builds the engine when the
    cache lacks them, else loads them. A `cosyvoice.load(llm_backend=...)` factory."""
    limits: BuildLimits = SERVER_DEFAULT_LIMITS
    cache_dir: Path | None = None        # default: <model_dir>/trtllm
    dtype: str | None = None             # default: default_dtype(the GPU's compute capability)
    kv_cache_fraction: float = 0.2       # most of the free GPU memory the KV cache may take
    engine_options: dict = field(default_factory=dict)   # more LLM(...) arguments, passed as given

    def __call__(self, model: ModelDir | str | Path, device: torch.device, dtype: torch.dtype) -> "TrtLlmBackend":
        """`dtype` (the flow's and HiFT's) does not apply: the engine's is `self.dtype`."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable(f"the TensorRT-LLM backend needs a CUDA GPU (device is {device}, "
                                     f"CUDA available: {torch.cuda.is_available()}); use server.py")
        if device.index not in (None, 0):
            raise BackendUnavailable("the TensorRT-LLM backend uses the first visible GPU; choose it "
                                     "with CUDA_VISIBLE_DEVICES and pass --device cuda")
        trtllm = import_tensorrt_llm()
        model = open_model_dir(model)
        cache_dir = Path(self.cache_dir) if self.cache_dir is not None else model.path / "trtllm"
        hf_dir = ensure_export(model, cache_dir)
        info = ExportInfo.read(hf_dir)
        if info.generation != model.generation.name:
            raise RuntimeError(f"{hf_dir} is an export of a {info.generation} LLM, but {model.path} "
                               f"holds {model.generation.name}; remove {hf_dir} to export again")
        capability = torch.cuda.get_device_capability()
        key = EngineKey(gpu_name=torch.cuda.get_device_name(), compute_capability=f"{capability[0]}.{capability[1]}",
                        trtllm_version=trtllm.__version__, dtype=self.dtype or default_dtype(capability),
                        weights_sha256=info.weights_sha256, limits=self.limits)
        llm = self.open_engine(hf_dir, engine_dir(cache_dir, key), key)
        vocab = info.vocab
        bias = export_lm_head_bias(hf_dir, info)[vocab.speech_offset:vocab.speech_offset + vocab.head_rows]
        sampling = yaml_sampling(model.config)
        return TrtLlmBackend(llm, trtllm.SamplingParams, info, bias, sampling, self.limits.max_output_len)

    def open_engine(self, hf_dir: Path, folder: Path, key: EngineKey):
        """The LLM on the cached engine, building and caching it first when missing."""
        from tensorrt_llm._tensorrt_engine import LLM
        # tensorrt_llm.llmapi exports both; later releases drop the top-level BuildConfig.
        from tensorrt_llm.llmapi import BuildConfig, KvCacheConfig

        limits = key.limits
        kv_cache = KvCacheConfig(free_gpu_memory_fraction=self.kv_cache_fraction,
                                 max_tokens=limits.max_batch_size * limits.max_seq_len)
        if engine_is_complete(folder, key):
            log.info("TensorRT-LLM engine: loading %s (%s, %s)", folder, limits.describe(), key.dtype)
            return LLM(model=str(folder), skip_tokenizer_init=True, kv_cache_config=kv_cache,
                       **self.engine_options)
        log.info("TensorRT-LLM engine: building for %s (sm %s, TensorRT-LLM %s, %s) with %s; "
                 "cached in %s", key.gpu_name, key.compute_capability, key.trtllm_version, key.dtype,
                 limits.describe(), folder)
        build_config = BuildConfig(max_batch_size=limits.max_batch_size, max_input_len=limits.max_input_len,
                                   max_seq_len=limits.max_seq_len, max_num_tokens=limits.max_num_tokens,
                                   max_beam_width=1)
        llm = LLM(model=str(hf_dir), skip_tokenizer_init=True, dtype=key.dtype,
                  build_config=build_config, kv_cache_config=kv_cache, **self.engine_options)
        partial = folder.with_name(folder.name + ".partial")
        for leftover in (partial, folder):   # from a build that was killed
            if leftover.exists():
                shutil.rmtree(leftover)
        partial.parent.mkdir(parents=True, exist_ok=True)
        llm.save(str(partial))
        mark_complete(partial, key)
        partial.rename(folder)
        log.info("TensorRT-LLM engine: saved to %s", folder)
        return llm


def ensure_export(model: ModelDir, cache_dir: Path) -> Path:
    """The HF export of the model directory's LLM, made once per version of llm.pt."""
    folder = export_dir(cache_dir, model.path)
    if not folder.is_dir():
        log.info("exporting the %s LLM of %s to %s (once)", model.generation.name, model.path, folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        export_model_dir(model, folder)
    return folder


_DONE = object()


class TrtLlmBackend:
    """Streams speech tokens from a TensorRT-LLM `LLM`; safe to call from several threads."""

    def __init__(self, llm, sampling_params: type, info: ExportInfo, head_bias: torch.Tensor,
                 sampling: Callable[..., int], max_output_len: int):
        self.llm = llm
        self.sampling_params = sampling_params       # tensorrt_llm.SamplingParams
        self.info = info
        self.vocab: MergedVocab = info.vocab
        self.head_bias = head_bias                   # [S + E] float32 (zeros for CosyVoice3)
        self.sampling = sampling
        self.max_output_len = max_output_len
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="trtllm-stream", daemon=True).start()

    def generate(self, text_ids: torch.Tensor, prompt_text_ids: torch.Tensor,
                 prompt_speech_tokens: torch.Tensor, *, sampling: Callable[..., int] | None = None,
                 generator: torch.Generator | None = None) -> Iterator[int]:
        """See cosyvoice.backends.LLMBackend. The draw for each request is seeded from
        `generator` when the request is submitted (the iterator's first step). `sampling` runs in
        TensorRT-LLM's worker process, so it must be picklable (see the module docstring)."""
        vocab = self.vocab
        min_len, max_len = token_length_limits(text_ids.shape[1])
        max_len = min(max_len, self.max_output_len)
        if max_len == 0:
            return
        sampler = SpeechTokenSampler(vocab.speech_offset, self.head_bias, vocab.speech_size, vocab.eos_row,
                                     self.info.min_len_masked_rows, min_len, sampling or self.sampling,
                                     request_seed(generator))
        params = self.sampling_params(
            max_tokens=max_len, end_id=vocab.eos_id, pad_id=vocab.eos_id,
            stop_token_ids=list(vocab.stop_ids), top_k=1, detokenize=False,
            logits_processor=sampler)   # one callable: a list is for the PyTorch backend only
        prompt = vocab.prompt_ids(text_ids, prompt_text_ids, prompt_speech_tokens)
        with contextlib.closing(self._stream(prompt, params)) as merged_ids:
            for merged_id in merged_ids:
                if vocab.is_stop_id(merged_id):
                    return
                yield vocab.head_row(merged_id)   # raises for an id off the speech head

    def _stream(self, prompt: list[int], params) -> Iterator[int]:
        """Generated ids of one request as they arrive; closing the iterator aborts the request."""
        arrived: queue.Queue = queue.Queue()

        async def run() -> None:
            try:
                # Inside the try: generate_async raises at once for a request it refuses (a
                # processor that does not pickle, prompt + max_tokens over max_seq_len, shutdown).
                result = self.llm.generate_async(prompt, sampling_params=params, streaming=True)
                async for output in result:
                    # token_ids holds all ids generated so far (token_ids_diff is the new part);
                    # the final output may drop a trailing stop word, so it can be shorter.
                    arrived.put(list(output.outputs[0].token_ids))
            except asyncio.CancelledError:
                result.abort()
                raise
            except BaseException as error:
                arrived.put(error)
                raise
            arrived.put(_DONE)

        request = asyncio.run_coroutine_threadsafe(run(), self._loop)
        emitted = 0
        try:
            while (item := arrived.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise RuntimeError(f"TensorRT-LLM request failed: {item}") from item
                yield from item[emitted:]
                emitted = len(item)
        finally:
            request.cancel()   # no-op once finished
