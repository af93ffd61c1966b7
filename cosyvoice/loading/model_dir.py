"""Loads an official CosyVoice2 model directory (as ModelScope delivers it) into our modules.

    model_dir/
      cosyvoice2.yaml           hyper-parameters and object graph  -> cosyvoice.loading.config
      llm.pt flow.pt hift.pt    state dicts, loaded with strict key matching
      CosyVoice-BlankEN/        Qwen2 config + tokenizer (its weights are not used: llm.pt has them)
      campplus.onnx speech_tokenizer_v2.onnx   used by the frontend
      spk2info.pt               optional built-in speakers

Every problem with the directory raises `ModelDirError` with a message that names the file and
says what is wrong, so the server and installer can show it as one line.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, YamlConfig
from . import registry

YAML_NAME = "cosyvoice2.yaml"
QWEN_DIR = "CosyVoice-BlankEN"
CHECKPOINTS = {"llm": "llm.pt", "flow": "flow.pt", "hift": "hift.pt"}
# The class each stage must be in a CosyVoice2 yaml.
STAGE_CLASSES = {
    "llm": "cosyvoice.llm.llm.Qwen2LM",
    "flow": "cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
    "hift": "cosyvoice.hifigan.generator.HiFTGenerator",
}
REQUIRED_FILES = (YAML_NAME, *CHECKPOINTS.values(), "campplus.onnx", "speech_tokenizer_v2.onnx",
                  f"{QWEN_DIR}/config.json", f"{QWEN_DIR}/vocab.json", f"{QWEN_DIR}/merges.txt",
                  f"{QWEN_DIR}/tokenizer_config.json")
OTHER_GENERATIONS = {"cosyvoice.yaml": "CosyVoice (300M, version 1)",
                     "cosyvoice3.yaml": "Fun-CosyVoice3"}

# The Qwen2-0.5B architecture of CosyVoice2-0.5B, for building the full-size model from a
# bare yaml (benchmarks, shape checks) where no CosyVoice-BlankEN/config.json is at hand.
QWEN2_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, hidden_act="silu",
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, use_sliding_window=False,
)


class ModelDirError(RuntimeError):
    """The model directory is missing something, or holds files that do not fit together."""


@dataclass(frozen=True)
class ModelSettings:
    """Model-wide numbers the pipeline needs, read from the yaml."""
    sample_rate: int
    token_frame_rate: int
    token_mel_ratio: int
    chunk_size: int            # streaming chunk, in speech tokens
    mel: dict                  # kwargs of the prompt mel extractor (n_fft, hop_size, fmax, ...)
    qwen_path: Path


@dataclass
class ModelStages:
    """The three model stages of one model directory, with weights loaded."""
    settings: ModelSettings
    llm: nn.Module
    flow: nn.Module
    hift: nn.Module


def check_model_dir(model_dir: str | Path) -> Path:
    """Raises ModelDirError naming every missing file; returns the directory as a Path."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist")
    if not (model_dir / YAML_NAME).is_file():
        for name, generation in OTHER_GENERATIONS.items():
            if (model_dir / name).is_file():
                raise ModelDirError(f"{model_dir} holds a {generation} model ({name}); "
                                    f"this runtime serves CosyVoice2 ({YAML_NAME})")
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ModelDirError(f"{model_dir} is not a complete CosyVoice2 model directory: missing "
                            f"{', '.join(missing)}")
    return model_dir


def read_config(yaml_path: str | Path, qwen_path: str | Path | None = None) -> YamlConfig:
    """Parses a CosyVoice2 yaml and checks that it describes CosyVoice2.

    `qwen_path` replaces the yaml's `qwen_pretrain_path` (empty in official files), as the
    reference does with the model directory's CosyVoice-BlankEN folder.
    """
    overrides = {"qwen_pretrain_path": str(qwen_path)} if qwen_path is not None else None
    try:
        config = YamlConfig.from_file(yaml_path, overrides)
    except OSError as exc:
        raise ModelDirError(f"{yaml_path}: cannot be read ({exc.strerror})") from exc
    except ConfigError as exc:
        raise ModelDirError(str(exc)) from exc
    for stage, class_path in STAGE_CLASSES.items():
        node = config.tree.get(stage)
        found = getattr(node, "path", None)
        if found != class_path:
            raise ModelDirError(f"{yaml_path} does not describe a CosyVoice2 model: '{stage}' is "
                                f"{found or 'missing'}, expected !new:{class_path}")
    return config


def read_settings(config: YamlConfig) -> ModelSettings:
    try:
        mel = config.resolve("feat_extractor")
        return ModelSettings(
            sample_rate=int(config.resolve("sample_rate")),
            token_frame_rate=int(config.resolve("token_frame_rate")),
            token_mel_ratio=int(config.resolve("token_mel_ratio")),
            chunk_size=int(config.resolve("chunk_size")),
            mel=dict(mel.kwargs),
            qwen_path=Path(config.resolve("qwen_pretrain_path")),
        )
    except (ConfigError, AttributeError, TypeError, ValueError) as exc:
        raise ModelDirError(f"{config.source}: cannot read the model settings ({exc})") from exc


def build_stage(config: YamlConfig, stage: str, qwen_config: dict | None = None,
                random_init: bool = True) -> nn.Module:
    """Builds one stage from a parsed yaml, with random weights unless `random_init=False`
    (the Qwen body is then left uninitialised, for a checkpoint to fill).

    `qwen_config` (e.g. QWEN2_0_5B) gives the Qwen2 architecture when no Qwen folder is at hand.
    """
    if stage not in STAGE_CLASSES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGE_CLASSES)}")
    qwen_kwargs = {"random_init": random_init, **({"qwen_config": qwen_config} if qwen_config else {})}
    extra = {"cosyvoice.llm.llm.Qwen2Encoder": qwen_kwargs}
    try:
        module = registry.build(config.resolve(stage), extra, where=f"{config.source}: {stage}")
    except ValueError as exc:  # ConfigError, and unsupported settings rejected by a constructor
        raise ModelDirError(str(exc)) from exc
    except OSError as exc:     # the Qwen config folder is missing or unreadable
        raise ModelDirError(f"{config.source}: {stage}: {exc}") from exc
    return module


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise ModelDirError(f"{path} is missing")
    try:
        # mmap avoids holding a second copy of a 2 GB checkpoint in memory.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelDirError(f"{path} cannot be read as a PyTorch checkpoint ({first_line}); the file "
                            "is truncated or corrupt: copy or extract it again") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelDirError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def _format_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_checkpoint(module: nn.Module, path: str | Path) -> None:
    """Loads a state dict into `module`, requiring exactly the module's keys and shapes."""
    path = Path(path)
    state = _read_checkpoint(path)
    prepare = getattr(module, "prepare_state_dict", None)
    if prepare is not None:
        state = prepare(state)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        details = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise ModelDirError(f"{path} does not fit the model described by the yaml: {details}") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys: {_format_keys(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys: {_format_keys(result.unexpected_keys)}")
    if problems:
        raise ModelDirError(f"{path} does not match the model described by the yaml: "
                            + "; ".join(problems))


def load_stage(model_dir: str | Path, stage: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """One stage of a model directory with its weights, in eval mode on `device`.

    HiFT always runs in float32 (as the reference does); `dtype` applies to the LLM and flow.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir / YAML_NAME, qwen_path=model_dir / QWEN_DIR)
    module = build_stage(config, stage, random_init=False)  # load_checkpoint fills every weight
    load_checkpoint(module, model_dir / CHECKPOINTS[stage])
    finish = getattr(module, "fold_weight_norm", None)
    if finish is not None:
        finish()
    module.to(device=device, dtype=torch.float32 if stage == "hift" else dtype)
    return module.eval()


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> ModelStages:
    """All three stages of a complete model directory."""
    model_dir = check_model_dir(model_dir)
    config = read_config(model_dir / YAML_NAME, qwen_path=model_dir / QWEN_DIR)
    stages = {stage: load_stage(model_dir, stage, device, dtype) for stage in STAGE_CLASSES}
    return ModelStages(settings=read_settings(config), **stages)
