"""Command line: `python -m cosyvoice check --model-dir DIR --out check.wav`.

`check` loads every stage of a model directory and runs text -> speech tokens -> mel -> waveform
without a voice prompt, so a user can see that a directory is complete and that the runtime works
on this machine before starting a server.
"""
from __future__ import annotations

import argparse
import sys
import time
import wave
from pathlib import Path

import numpy as np
import torch

from .loader import ModelDirError, load_model


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """float samples in [-1, 1] -> 16-bit mono PCM WAV."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())


def check(model_dir: Path, text: str, out: Path, device: str, seed: int) -> None:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    stages = load_model(model_dir, device=device)
    loaded = time.perf_counter()
    for name in ("llm", "flow", "hift"):
        count = sum(p.numel() for p in {id(p): p for p in getattr(stages, name).parameters()}.values())
        print(f"{name}: {count:,} parameters")
    tokenizer = AutoTokenizer.from_pretrained(stages.settings.qwen_path)
    text_ids = torch.tensor([tokenizer(text)["input_ids"]], dtype=torch.int32)
    empty_ids = torch.zeros(1, 0, dtype=torch.int32)

    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = list(stages.llm.generate(text_ids, empty_ids, empty_ids, generator=generator))
    with torch.inference_mode():
        mel = stages.flow.inference(
            torch.tensor([tokens], dtype=torch.int32, device=device), empty_ids.to(device),
            torch.zeros(1, 0, stages.flow.output_size, device=device), torch.zeros(1, stages.flow.spk_embed_dim, device=device),
            streaming=False, finalize=True)
        speech, _ = stages.hift.inference(mel, generator=generator)
    done = time.perf_counter()
    samples = speech[0].float().cpu().numpy()
    write_wav(out, samples, stages.settings.sample_rate)
    seconds = len(samples) / stages.settings.sample_rate
    print(f"loaded in {loaded - started:.1f} s; {len(tokens)} speech tokens -> {seconds:.2f} s of audio "
          f"in {done - loaded:.1f} s (RTF {(done - loaded) / max(seconds, 1e-9):.2f}); wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosyvoice")
    commands = parser.add_subparsers(dest="command", required=True)
    check_cmd = commands.add_parser("check", help="load a model directory and synthesise a test sentence")
    check_cmd.add_argument("--model-dir", type=Path, required=True)
    check_cmd.add_argument("--text", default="Hello from CosyVoice two.")
    check_cmd.add_argument("--out", type=Path, default=Path("check.wav"))
    check_cmd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    check_cmd.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        check(args.model_dir, args.text, args.out, args.device, args.seed)
    except ModelDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
