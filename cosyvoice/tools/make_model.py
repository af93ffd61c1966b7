"""`python -m cosyvoice make-model`: writes a random-weight CosyVoice3 or CosyVoice2 model directory.

The directory has the layout of the official Fun-CosyVoice3-0.5B or CosyVoice2-0.5B download, so
everything that loads a model (tests, CI, the installer's demo, benchmarks) can run without one:

    cosyvoice3.yaml | cosyvoice2.yaml     our own template (cosyvoice.tools.yaml_template) at the chosen size
    llm.pt flow.pt hift.pt                state dicts of the stages our loader builds from that yaml
    campplus.onnx                         toy speaker encoder: fbank [B, T, 80] -> embedding [B, 192]
    speech_tokenizer_v3.onnx | _v2.onnx   toy speech tokenizer: log-mel [B, 128, T] -> codes [B, ceil(T/4)]
    CosyVoice-BlankEN/                    Qwen2 config and a small byte-level BPE tokenizer trained here
    spk2info.pt                           one built-in speaker, `demo`, for the sft mode
    configuration.json (config.json)      ModelScope metadata (config.json, `{}`, only in CosyVoice3's)

`tiny` loads and speaks noise on a CPU in seconds; `full` has the sizes of the official model
(every checkpoint key and shape equal; CosyVoice3 about 3.4 GB, CosyVoice2 about 2.6 GB) for
benchmarks. The tokenizer is small at both sizes: the runtime looks special tokens such as
`<|endofprompt|>` up by name, so their ids need not be the official ones. The same seed always
writes byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from ..loading.generations import COSYVOICE2, COSYVOICE3, GENERATIONS, Generation, by_name
from ..loading.model_dir import CHECKPOINTS, QWEN2_0_5B, QWEN_DIR, build_stage, read_config
from .yaml_template import render

# --- sizes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """One model size: the Qwen2 architecture and the yaml's sizes (its LLM width is Qwen's)."""
    qwen: dict
    yaml: dict[str, int]


# vocab_size None: just large enough for the tokenizer written next to it.
TINY_QWEN = {**QWEN2_0_5B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": None}
SIZES = ("tiny", "full")
DEFAULT_GENERATION = COSYVOICE3   # the model people deploy now
# The official model each generation's `full` size reproduces (and real speech needs).
OFFICIAL_MODELS = {COSYVOICE2.name: "CosyVoice2-0.5B", COSYVOICE3.name: "Fun-CosyVoice3-0.5B"}
# generation name -> size -> preset. `full` is the official model (CosyVoice2-0.5B,
# Fun-CosyVoice3-0.5B: both on Qwen2-0.5B); `tiny` keeps every structure at small widths.
PRESETS = {
    COSYVOICE2.name: {
        "tiny": Preset(TINY_QWEN, dict(
            flow_size=64, encoder_heads=4, encoder_linear_units=128, encoder_blocks=1,
            estimator_channels=64, estimator_head_dim=16, estimator_blocks=1, estimator_mid_blocks=2,
            estimator_heads=4, hift_channels=64)),
        "full": Preset(QWEN2_0_5B, dict(
            flow_size=512, encoder_heads=8, encoder_linear_units=2048, encoder_blocks=6,
            estimator_channels=256, estimator_head_dim=64, estimator_blocks=4, estimator_mid_blocks=12,
            estimator_heads=8, hift_channels=512)),
    },
    COSYVOICE3.name: {
        # The DiT width must stay a multiple of 16 (its position conv has 16 groups).
        "tiny": Preset(TINY_QWEN, dict(
            lookahead_channels=64, dit_dim=64, dit_depth=2, dit_heads=4, dit_dim_head=16, hift_channels=64)),
        "full": Preset(QWEN2_0_5B, dict(
            lookahead_channels=1024, dit_dim=1024, dit_depth=22, dit_heads=16, dit_dim_head=64,
            hift_channels=512)),
    },
}


def preset(generation: Generation, size: str) -> Preset:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    return PRESETS[generation.name][size]


def as_generation(generation: str | int | Generation) -> Generation:
    """A Generation, or its name as by_name takes it ("CosyVoice3", "cosyvoice3", "3" or 3)."""
    return generation if isinstance(generation, Generation) else by_name(str(generation))


# --- the Qwen tokenizer folder -----------------------------------------------------------------

# How Qwen2 splits text into words before BPE (letters, single digits, punctuation, spaces).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's own special tokens, added right after the BPE vocabulary (in this order).
QWEN_ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_VOCAB_SIZE = 1200  # an upper bound: the corpus below runs out of merges before it
VOCAB_MULTIPLE = 64    # Qwen's embedding rows are a round number above the tokenizer's size
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog, and then it runs back home.
Hello! How are you today? I'm fine, thanks; it's a lovely morning.
We'll meet at 9:30 on March 14th, 2025, in room 208 - don't be late.
Speech synthesis turns written words into sound: voices, tones and rhythm.
She said "yes", he said 'no', and they both laughed for 3.5 seconds.
The price is $12.99 (about 90 yuan), or 15% off if you buy 2 or more.
今天天气很好，我们一起去公园散步吧。
你好，欢迎使用语音合成系统！请问有什么可以帮你的？
这本书一共有三百二十页，我已经读了一半了。
他每天早上七点起床，先喝一杯水，然后去跑步。
春天来了，花开了，小鸟在树上唱歌。
会议定在下午三点，地点是二楼的大会议室。
数字：0 1 2 3 4 5 6 7 8 9，电话号码是 138-0013-8000。
我们说中文，也说 English，一起学习，一起进步。
"""


def train_bpe() -> Tokenizer:
    """A byte-level BPE trained on TRAINING_TEXT with Qwen2's normaliser and word splitting."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer)
    return tokenizer


def tokenizer_config(first_added_id: int) -> dict:
    """tokenizer_config.json of a Qwen2Tokenizer whose added tokens start at `first_added_id`."""
    added = {str(first_added_id + i): {"content": token, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}
             for i, token in enumerate(QWEN_ADDED_TOKENS)}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": QWEN_ADDED_TOKENS[1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def qwen_config(architecture: dict, end_of_text_id: int) -> dict:
    """config.json of a Qwen2ForCausalLM with the given architecture."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **architecture,
        "attention_dropout": 0.0,
        "bos_token_id": end_of_text_id,
        "eos_token_id": end_of_text_id,
        "initializer_range": 0.02,
        "max_window_layers": architecture["num_hidden_layers"],
        "rope_scaling": None,
        "sliding_window": architecture["max_position_embeddings"],
        "torch_dtype": "float32",
        "use_cache": True,
    }


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_qwen_folder(folder: Path, architecture: dict, special_tokens: list[str]) -> None:
    """vocab.json, merges.txt, tokenizer_config.json, config.json and generation_config.json.

    An architecture whose vocab_size is None gets the smallest round size that holds the
    tokenizer plus the `special_tokens` the generation adds at load time.
    """
    folder.mkdir(parents=True, exist_ok=True)
    bpe = train_bpe()
    bpe.model.save(str(folder))                                  # vocab.json, merges.txt
    end_of_text_id = bpe.get_vocab_size()
    write_json(folder / "tokenizer_config.json", tokenizer_config(end_of_text_id))
    new_specials = [t for t in special_tokens if t not in QWEN_ADDED_TOKENS]
    needed = end_of_text_id + len(QWEN_ADDED_TOKENS) + len(new_specials)
    if architecture["vocab_size"] is None:
        architecture = {**architecture, "vocab_size": round_up(needed, VOCAB_MULTIPLE)}
    write_json(folder / "config.json", qwen_config(architecture, end_of_text_id))
    write_json(folder / "generation_config.json", {
        "bos_token_id": end_of_text_id, "eos_token_id": end_of_text_id, "max_new_tokens": 2048})


# --- yaml and the three checkpoints ------------------------------------------------------------


def write_yaml(path: Path, generation: Generation, sizes: Preset) -> None:
    text = render({"llm_size": sizes.qwen["hidden_size"], **sizes.yaml}, generation.name)
    path.write_text(text, encoding="utf-8")


def write_checkpoints(model_dir: Path, generation: Generation, seed: int) -> None:
    """Builds each stage from the directory's yaml with seeded random weights and saves its state.

    HiFT's weight-normed convolutions stay unfolded, so its file has the official
    `parametrizations.weight.original0/1` keys; the LLM's Qwen lm_head stays tied to the text
    embedding and is saved under both names, as in the official llm.pt. CosyVoice3's vocoder
    noise buffers are not part of its state (the loader derives them from the yaml's sizes).
    """
    config = read_config(model_dir / generation.yaml_name, qwen_path=model_dir / QWEN_DIR)
    for offset, (stage, filename) in enumerate(CHECKPOINTS.items()):
        with torch.random.fork_rng(devices=[]):   # leave the caller's global RNG untouched
            torch.manual_seed(seed * len(CHECKPOINTS) + offset)
            module = build_stage(config, stage)
        torch.save(module.state_dict(), model_dir / filename)
        del module


# --- the two toy ONNX models -------------------------------------------------------------------

ONNX_OPSET = 17      # onnxruntime >= 1.17 runs opset 17 ...
ONNX_IR_VERSION = 8  # ... in IR version 8 files
FBANK_BINS, SPEAKER_DIM = 80, 192
DEMO_SPEAKER = "demo"
WHISPER_MELS, TOKEN_DIGITS, FRAMES_PER_TOKEN = 128, 8, 4  # 6561 codes = 3 ** 8


def save_onnx(path: Path, graph: onnx.GraphProto) -> None:
    model = helper.make_model(graph, producer_name="cosyvoice make-model",
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def float_tensor(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def write_campplus(path: Path, rng: np.random.Generator) -> None:
    """Speaker encoder: statistics pooling (mean and RMS of each bin over time), then a fixed
    random projection and tanh. input [B, T, 80] -> output [B, 192]."""
    weight = rng.standard_normal((2 * FBANK_BINS, SPEAKER_DIM)) / np.sqrt(2 * FBANK_BINS)
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1], keepdims=0),     # [B, 80]
        helper.make_node("Mul", ["input", "input"], ["square"]),
        helper.make_node("ReduceMean", ["square"], ["power"], axes=[1], keepdims=0),
        helper.make_node("Sqrt", ["power"], ["rms"]),                                   # [B, 80]
        helper.make_node("Concat", ["mean", "rms"], ["stats"], axis=1),                 # [B, 160]
        helper.make_node("MatMul", ["stats", "weight"], ["projected"]),                 # [B, 192]
        helper.make_node("Tanh", ["projected"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "toy_campplus",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", FBANK_BINS])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", SPEAKER_DIM])],
        initializer=[float_tensor("weight", weight)])
    save_onnx(path, graph)


def write_speech_tokenizer(path: Path, rng: np.random.Generator, name: str) -> None:
    """Speech tokenizer: average 4 frames (the last group may be shorter), normalise each averaged
    frame over its mel bins, project it to 8 values, round each to a base-3 digit and read the
    digits as one code in [0, 6561). v2 and v3 files differ only in `name` and their random draws.

    feats [B, 128, T] and feats_length [B] (accepted, not needed) -> indices int64 [B, ceil(T/4)].
    """
    projection = rng.standard_normal((WHISPER_MELS, TOKEN_DIGITS)) / np.sqrt(WHISPER_MELS)
    digit_values = 3.0 ** np.arange(TOKEN_DIGITS)
    nodes = [
        # Padding by 3 frames that do not count in the average gives ceil(T / 4) groups.
        helper.make_node("AveragePool", ["feats"], ["pooled"], kernel_shape=[FRAMES_PER_TOKEN],
                         strides=[FRAMES_PER_TOKEN], pads=[0, FRAMES_PER_TOKEN - 1],
                         count_include_pad=0),                                          # [B, 128, N]
        helper.make_node("Transpose", ["pooled"], ["frames"], perm=[0, 2, 1]),          # [B, N, 128]
        # Zero mean and unit variance per frame: the projections come out about N(0, 1).
        helper.make_node("LayerNormalization", ["frames", "ones", "zeros"], ["normed"], axis=-1),
        helper.make_node("MatMul", ["normed", "projection"], ["projected"]),            # [B, N, 8]
        helper.make_node("Clip", ["projected", "low", "high"], ["clipped"]),            # [-1, 1]
        helper.make_node("Add", ["clipped", "one"], ["shifted"]),                       # [0, 2]
        helper.make_node("Round", ["shifted"], ["digits"]),                             # {0, 1, 2}
        helper.make_node("MatMul", ["digits", "digit_values"], ["codes"]),              # [B, N]
        helper.make_node("Cast", ["codes"], ["indices"], to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes, f"toy_{name}",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["B", WHISPER_MELS, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, ["B"])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, ["B", "N"])],
        initializer=[float_tensor("ones", np.ones(WHISPER_MELS)),
                     float_tensor("zeros", np.zeros(WHISPER_MELS)), float_tensor("projection", projection),
                     float_tensor("digit_values", digit_values),
                     float_tensor("low", -1.0), float_tensor("high", 1.0), float_tensor("one", 1.0)])
    save_onnx(path, graph)


# --- the whole directory -----------------------------------------------------------------------


def write_speakers(path: Path, rng: np.random.Generator) -> None:
    """spk2info.pt with one built-in speaker, `demo`, so `sft` works without a prompt."""
    embedding = torch.from_numpy(np.tanh(rng.standard_normal((1, SPEAKER_DIM))).astype(np.float32))
    torch.save({DEMO_SPEAKER: {"embedding": embedding}}, path)


def make_model(out_dir: str | Path, size: str = "tiny", seed: int = 0,
               generation: str | int | Generation = DEFAULT_GENERATION) -> Path:
    """Writes a random-weight model directory of `generation` (CosyVoice3 unless told; a name
    by_name takes, such as "CosyVoice2" or "2") and `size` ('tiny' or 'full') to `out_dir`, which
    must be new or empty; returns its path."""
    generation = as_generation(generation)
    sizes = preset(generation, size)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; make-model writes only into a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_qwen_folder(out_dir / QWEN_DIR, sizes.qwen, generation.special_tokens)
    write_yaml(out_dir / generation.yaml_name, generation, sizes)
    write_checkpoints(out_dir, generation, seed)
    rng = np.random.default_rng(seed)
    write_campplus(out_dir / "campplus.onnx", rng)
    write_speech_tokenizer(out_dir / generation.speech_tokenizer, rng,
                           name=generation.speech_tokenizer.removesuffix(".onnx"))
    write_speakers(out_dir / "spk2info.pt", rng)
    write_json(out_dir / "configuration.json", {"framework": "pytorch", "task": "text-to-speech"})
    if generation is COSYVOICE3:
        write_json(out_dir / "config.json", {})   # as in the official download; nothing reads it
    return out_dir


def directory_size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def parse_generation(value: str) -> Generation:
    """argparse type of --generation: 2, 3, CosyVoice2, CosyVoice3 (any case)."""
    try:
        return by_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


GENERATION_CHOICES = "|".join(g.name.removeprefix("CosyVoice") for g in GENERATIONS)


def add_make_model_command(subparsers: argparse._SubParsersAction) -> None:
    """Adds `make-model` to the CLI's subcommands."""
    command = subparsers.add_parser(
        "make-model", help="write a random-weight CosyVoice3 or CosyVoice2 model directory "
                           "(for tests, the demo and benchmarks)",
        description="Writes a model directory in the official layout with random weights: it loads "
                    "and runs like the real model but speaks noise.")
    command.add_argument("--generation", type=parse_generation, default=DEFAULT_GENERATION,
                         metavar=GENERATION_CHOICES,
                         help=f"model generation: {GENERATION_CHOICES} or "
                              f"{'/'.join(g.name for g in GENERATIONS)} (default: {DEFAULT_GENERATION.name})")
    command.add_argument("--size", choices=SIZES, default="tiny",
                         help="tiny: small widths, loads and runs on a CPU in seconds; full: the official "
                              "model's sizes (every checkpoint key and shape), for benchmarks (default: tiny)")
    command.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    command.add_argument("--seed", type=int, default=0, help="the same seed writes byte-identical files")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs `make-model` with parsed arguments; returns the exit status."""
    started = time.perf_counter()
    out_dir = make_model(args.out, args.size, args.seed, args.generation)
    megabytes = directory_size(out_dir) / 2 ** 20
    print(f"wrote a {args.size} random-weight {args.generation.name} model ({megabytes:.1f} MB) to "
          f"{out_dir} in {time.perf_counter() - started:.1f} s")
    return 0
