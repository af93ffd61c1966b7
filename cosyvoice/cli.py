"""Command line.

    python -m cosyvoice synth --model-dir DIR --mode cross_lingual --text "..." --prompt-wav p.wav --out o.wav
    python -m cosyvoice make-model --size tiny --out DIR   # random weights; --generation 3 (default) or 2
    python -m cosyvoice demo        # makes a tiny random CosyVoice3 model once, then speaks with it
    python -m cosyvoice export-hf --model-dir DIR --out HF_DIR   # the LLM as a HF checkpoint

Errors in the input (missing file, bad audio, unknown speaker, ...) end with one line on stderr
and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .backends.hf_export import add_export_command
from .errors import InputError
from .errors import ModelDirError
from .loading.generations import GENERATIONS
from .tools.make_model import (DEFAULT_GENERATION, DEMO_SPEAKER, GENERATION_CHOICES, OFFICIAL_MODELS,
                               add_make_model_command, make_model, parse_generation)

MODES = ("zero_shot", "cross_lingual", "instruct2", "sft")


def synth(args: argparse.Namespace) -> int:
    import cosyvoice

    started = time.perf_counter()
    tts = cosyvoice.load(args.model_dir, device=args.device)
    loaded = time.perf_counter()
    options = dict(stream=args.stream, speed=args.speed, seed=args.seed)
    if args.mode == "sft":
        if not args.speaker:
            raise InputError("--mode sft needs --speaker")
        chunks = tts.sft(args.text, args.speaker, **options)
    else:
        if args.prompt_wav is None:
            raise InputError(f"--mode {args.mode} needs --prompt-wav")
        if not args.prompt_wav.is_file():
            raise InputError(f"prompt audio {args.prompt_wav} does not exist")
        if args.mode == "zero_shot":
            chunks = tts.zero_shot(args.text, args.prompt_text, args.prompt_wav, **options)
        elif args.mode == "cross_lingual":
            chunks = tts.cross_lingual(args.text, args.prompt_wav, **options)
        else:
            chunks = tts.instruct2(args.text, args.instruct, args.prompt_wav, **options)

    audio, first_chunk_at = [], None
    request_started = time.perf_counter()
    for chunk in chunks:
        first_chunk_at = first_chunk_at or time.perf_counter()
        audio.append(chunk)
    finished = time.perf_counter()
    samples = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
    sf.write(args.out, samples, tts.sample_rate, subtype="PCM_16")
    seconds = len(samples) / tts.sample_rate
    compute = finished - request_started
    print(f"loaded in {loaded - started:.1f} s; {len(audio)} chunk(s), first after "
          f"{(first_chunk_at or finished) - request_started:.3f} s; {seconds:.2f} s of audio in "
          f"{compute:.2f} s (RTF {compute / max(seconds, 1e-9):.3f}); wrote {args.out}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """The no-download path: a tiny random-weight model (made once) speaking in its `demo` voice.

    A --model-dir that already holds a model is used as it is; --generation (default CosyVoice3)
    chooses what to make, and must match the model found when given.
    """
    found = next((g for g in GENERATIONS if (args.model_dir / g.yaml_name).is_file()), None)
    if found is None:
        generation = args.generation or DEFAULT_GENERATION
        make_model(args.model_dir, size="tiny", seed=0, generation=generation)
        print(f"made a tiny random-weight model ({generation.name}) in {args.model_dir} (it speaks "
              f"noise: real speech needs the official {OFFICIAL_MODELS[generation.name]} directory)")
    elif args.generation is not None and found is not args.generation:
        raise InputError(f"{args.model_dir} holds a {found.name} model, not {args.generation.name}: "
                         "choose another --model-dir")
    return synth(argparse.Namespace(
        model_dir=args.model_dir, mode="sft", speaker=DEMO_SPEAKER, text=args.text, out=args.out,
        stream=True, speed=1.0, seed=0, device=args.device, prompt_wav=None, prompt_text="", instruct=""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cosyvoice")
    commands = parser.add_subparsers(dest="command", required=True)

    synth_cmd = commands.add_parser("synth", help="synthesise text to a WAV file")
    synth_cmd.add_argument("--model-dir", type=Path, required=True)
    synth_cmd.add_argument("--mode", choices=MODES, required=True)
    synth_cmd.add_argument("--text", required=True)
    synth_cmd.add_argument("--prompt-wav", type=Path, help="voice prompt (not for sft)")
    synth_cmd.add_argument("--prompt-text", default="", help="transcript of the prompt (zero_shot)")
    synth_cmd.add_argument("--instruct", default="", help="instruction (instruct2)")
    synth_cmd.add_argument("--speaker", help="built-in speaker id (sft)")
    synth_cmd.add_argument("--out", type=Path, default=Path("out.wav"))
    synth_cmd.add_argument("--stream", action="store_true", help="token-level streaming")
    synth_cmd.add_argument("--speed", type=float, default=1.0)
    synth_cmd.add_argument("--seed", type=int)
    synth_cmd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    synth_cmd.set_defaults(run=synth)

    add_make_model_command(commands)
    add_export_command(commands)

    demo_cmd = commands.add_parser(
        "demo", help="make a tiny random-weight model (once; CosyVoice3 unless told) and synthesise with it")
    demo_cmd.add_argument("--model-dir", type=Path, default=Path("models/demo-tiny"))
    demo_cmd.add_argument("--generation", type=parse_generation, metavar=GENERATION_CHOICES,
                          help=f"the model to make when --model-dir holds none (default: "
                               f"{DEFAULT_GENERATION.name})")
    demo_cmd.add_argument("--text", default="Hello from CosyVoice, running on our own runtime.")
    demo_cmd.add_argument("--out", type=Path, default=Path("demo.wav"))
    demo_cmd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo_cmd.set_defaults(run=demo)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.run(args)
    except (InputError, ModelDirError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
