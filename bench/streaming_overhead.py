"""What streaming costs: the same speech tokens turned into audio streaming and not.

About `seconds` of audio worth of random speech tokens (the flow's token rate, 25 per second)
go through the model's own synthesizer with the LLM bypassed (the voice-conversion path), once
with stream=True (the hop schedule: 25 + pad, 50, 100, 100 ... tokens, then the final call) and
once with stream=False (one flow call, one vocoder call), `repeats` times each, alternating,
after one untimed non-streaming run (a process's first pass at a size is slower).

    streaming_overhead = streaming token-to-waveform time / non-streaming time   (medians)

On a shared machine wall time also counts other programs' use of the cores, so the process's
CPU time (all its threads) is recorded too, with `streaming_overhead_cpu` its ratio, and the
best (least) wall time of each mode gives `streaming_overhead_best`.

Without carried state every streaming chunk recomputes the flow over all tokens so far (and
CosyVoice3 re-vocodes the whole mel), so the overhead grows with the utterance's length; with it
the non-final chunks together cost about one streaming pass and the final call one full pass.
Each streaming run also records its flow and vocoder calls (frames computed, milliseconds).
A voice prompt's flow state is computed once per voice and shared by its streams
(cosyvoice.inference.synthesis.VoicePrefixCache); it is computed before the runs, timed
(`voice_prompt_state_s`), and `streaming_overhead_new_voice` adds it to the streaming time.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from cosyvoice.inference.synthesis import ModelInput, Synthesizer

from .stage_timers import TimedStage, synchronize, vocoder_frames
from .stats import summary


def flow_frames(token: torch.Tensor, prompt_token: torch.Tensor, *_args, finalize: bool = True,
                carry=None, **_kwargs) -> int:
    """Mel frames (prompt included) a flow call computes: every frame of its tokens (less the
    look-ahead when not final), less those a carried state already holds."""
    tokens = token.shape[1] + prompt_token.shape[1] - (0 if finalize else 3)
    return 2 * (tokens - (carry.tokens if carry is not None else 0))


def speech_tokens(count: int, speech_token_size: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, speech_token_size, (count,), generator=generator).tolist()


def timed_synthesis(synthesizer: Synthesizer, request: ModelInput, tokens: list[int], stream: bool,
                    device: torch.device) -> dict:
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    arrivals, samples = [], 0
    for chunk in synthesizer.synthesize(request, stream=stream, source_tokens=tokens):
        synchronize(device)
        arrivals.append(time.perf_counter() - started)
        samples += len(chunk)
    return {"total_s": arrivals[-1], "cpu_s": time.process_time() - cpu_started, "first_chunk_s": arrivals[0],
            "chunks": len(arrivals), "samples": samples}


def measure(tts, request: ModelInput, seconds: float, repeats: int, device: torch.device,
            seed: int = 0) -> dict:
    """One length: medians over `repeats` of each mode, streaming runs' per-call timings."""
    synthesizer = tts.synthesizer
    flow = TimedStage(synthesizer.flow, device, "frames_computed", flow_frames)
    hift = TimedStage(synthesizer.hift, device, "mel_frames", vocoder_frames)
    timed = copy.copy(synthesizer)   # the model's own settings, with timed stages
    timed.flow, timed.hift = flow, hift
    n_tokens = max(2 * synthesizer.token_hop, round(seconds * synthesizer.flow.input_frame_rate))
    tokens = speech_tokens(n_tokens, synthesizer.llm.speech_token_size, seed)
    # The voice prompt's own flow state is computed once per voice and then shared by its streams:
    # it is computed here, timed, so every streaming run below starts as a voice's later streams do.
    prompt_state_s = None
    prompt_state = getattr(synthesizer, "_prompt_state", None)
    if prompt_state is not None and synthesizer.carry_state:
        synchronize(device)
        started = time.perf_counter()
        prompt_state(request)
        synchronize(device)
        prompt_state_s = round(time.perf_counter() - started, 3)
    # One untimed non-streaming run first: the first pass at a new size is slower (allocator
    # growth, kernel selection), and it must not count against either mode.
    for _ in synthesizer.synthesize(request, stream=False, source_tokens=tokens):
        pass
    runs: dict[str, list[dict]] = {"streaming": [], "non_streaming": []}
    calls: dict[str, list] = {}
    for _ in range(repeats):
        for mode, stream in (("non_streaming", False), ("streaming", True)):
            flow.calls.clear()
            hift.calls.clear()
            runs[mode].append(timed_synthesis(timed, request, tokens, stream, device))
            if stream:
                calls = {"flow": list(flow.calls), "vocoder": list(hift.calls)}
    rate = tts.sample_rate
    result = {"seconds_requested": seconds, "tokens": n_tokens,
              "prompt_tokens": int(request.flow_prompt_tokens.shape[1]), "repeats": repeats,
              "voice_prompt_state_s": prompt_state_s}
    for mode, rows in runs.items():
        total = float(np.median([r["total_s"] for r in rows]))
        audio_s = rows[0]["samples"] / rate
        result[mode] = {"total_s": summary([r["total_s"] for r in rows], 3),
                        "cpu_s": summary([r["cpu_s"] for r in rows], 3),
                        "first_chunk_ms": summary([r["first_chunk_s"] * 1000 for r in rows], 1),
                        "chunks": rows[0]["chunks"], "audio_s": round(audio_s, 3),
                        "compute_s_per_audio_s": round(total / audio_s, 4)}
    stream, whole = result["streaming"], result["non_streaming"]
    result["streaming_overhead"] = round(stream["total_s"]["p50"] / whole["total_s"]["p50"], 3)
    result["streaming_overhead_best"] = round(stream["total_s"]["min"] / whole["total_s"]["min"], 3)
    result["streaming_overhead_cpu"] = round(stream["cpu_s"]["p50"] / whole["cpu_s"]["p50"], 3)
    # A voice's very first stream also computes the prompt's state.
    result["streaming_overhead_new_voice"] = round((stream["total_s"]["p50"] + (prompt_state_s or 0))
                                                   / whole["total_s"]["p50"], 3)
    result["streaming_calls"] = calls
    return result
