"""Loads an official model directory (as ModelScope delivers it) into our modules.

    model_dir/
      cosyvoice2.yaml | cosyvoice3.yaml   hyper-parameters and object graph; names the generation
      llm.pt flow.pt hift.pt              state dicts, loaded with strict key matching
      CosyVoice-BlankEN/                  Qwen2 config + tokenizer (its weights are not used)
      campplus.onnx speech_tokenizer_v2.onnx | speech_tokenizer_v3.onnx   used by the frontend
      spk2info.pt                         optional built-in speakers

`open_model_dir` checks the files and reads the yaml once; `load_stage` builds one stage from
it. Every problem with the directory raises `ModelDirError` with a message that names the file
and says what is wrong, so the server and installer can show it as one line.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelDirError
from ..models.causal_hift import CausalHiFTGenerator
from . import registry
from .config import ConfigError, YamlConfig
from .generations import GENERATIONS, UNSUPPORTED, Generation, of_config

QWEN_DIR = "CosyVoice-BlankEN"
CHECKPOINTS = {"llm": "llm.pt", "flow": "flow.pt", "hift": "hift.pt"}
STAGES = tuple(CHECKPOINTS)


def required_files(generation: Generation) -> tuple[str, ...]:
    return (generation.yaml_name, *CHECKPOINTS.values(), "campplus.onnx", generation.speech_tokenizer,
            f"{QWEN_DIR}/config.json", f"{QWEN_DIR}/vocab.json", f"{QWEN_DIR}/merges.txt",
            f"{QWEN_DIR}/tokenizer_config.json")


# The Qwen2-0.5B architecture of CosyVoice2-0.5B and Fun-CosyVoice3-0.5B, for building the
# full-size model from a bare yaml (benchmarks, shape checks) where no CosyVoice-BlankEN/config.json is at hand.
QWEN2_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, hidden_act="silu",
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, use_sliding_window=False,
)


@dataclass(frozen=True)
class ModelSettings:
    """Model-wide numbers the pipeline needs, read from the yaml."""
    sample_rate: int
    token_frame_rate: int
    token_mel_ratio: int
    chunk_size: int            # streaming chunk, in speech tokens
    mel: dict                  # kwargs of the prompt mel extractor (n_fft, hop_size, fmax, ...)
    qwen_path: Path


@dataclass(frozen=True)
class ModelDir:
    """A checked model directory with its yaml parsed (once)."""
    path: Path
    generation: Generation
    config: YamlConfig

    @property
    def settings(self) -> ModelSettings:
        return read_settings(self.config)

    @property
    def speech_tokenizer(self) -> Path:
        return self.path / self.generation.speech_tokenizer


@dataclass
class ModelStages:
    """The three model stages of one model directory, with weights loaded."""
    settings: ModelSettings
    llm: nn.Module
    flow: nn.Module
    hift: nn.Module


def detect_generation(path: Path) -> Generation:
    """The generation whose yaml the directory holds (the first found, in upstream's order)."""
    for name, generation in UNSUPPORTED.items():
        if (path / name).is_file():
            raise ModelDirError(f"{path} holds a {generation} model ({name}); this runtime serves "
                                f"{' and '.join(g.name for g in GENERATIONS)}")
    for generation in GENERATIONS:
        if (path / generation.yaml_name).is_file():
            return generation
    raise ModelDirError(f"{path} is not a CosyVoice model directory: it has none of "
                        f"{', '.join(g.yaml_name for g in GENERATIONS)}")


def open_model_dir(model_dir: str | Path | ModelDir) -> ModelDir:
    """Checks a model directory (raising ModelDirError naming every missing file) and parses
    its yaml. A ModelDir passes through unchanged."""
    if isinstance(model_dir, ModelDir):
        return model_dir
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist")
    generation = detect_generation(path)
    missing = [name for name in required_files(generation) if not (path / name).is_file()]
    if missing:
        raise ModelDirError(f"{path} is not a complete {generation.name} model directory: missing "
                            f"{', '.join(missing)}")
    config = read_config(path / generation.yaml_name, qwen_path=path / QWEN_DIR)
    found = of_config(config.tree)
    if found is not generation:
        raise ModelDirError(f"{path / generation.yaml_name} describes a "
                            f"{found.name if found else 'different'} model, not {generation.name}")
    return ModelDir(path, generation, config)


def read_config(yaml_path: str | Path, qwen_path: str | Path | None = None) -> YamlConfig:
    """Parses a CosyVoice yaml and checks that its stages are those of one generation.

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
    generation = of_config(config.tree)
    if generation is None:
        found = getattr(config.tree.get("llm"), "path", None)
        expected = " or ".join(f"!new:{g.stage_classes['llm']}" for g in GENERATIONS)
        raise ModelDirError(f"{yaml_path} does not describe a model this runtime serves: 'llm' is "
                            f"{found or 'missing'}, expected {expected}")
    for stage, class_path in generation.stage_classes.items():
        found = getattr(config.tree.get(stage), "path", None)
        if found != class_path:
            raise ModelDirError(f"{yaml_path} does not describe a {generation.name} model: '{stage}' is "
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
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    qwen_kwargs = {"random_init": random_init, **({"qwen_config": qwen_config} if qwen_config else {})}
    extra = {"cosyvoice.llm.llm.Qwen2Encoder": qwen_kwargs}
    try:
        module = registry.build(config.resolve(stage), extra, where=f"{config.source}: {stage}")
    except ValueError as exc:  # ConfigError, and unsupported settings rejected by a constructor
        raise ModelDirError(str(exc)) from exc
    except OSError as exc:     # the Qwen config folder is missing or unreadable
        raise ModelDirError(f"{config.source}: {stage}: {exc}") from exc
    if isinstance(module, CausalHiFTGenerator):
        _install_noise_buffers(module, config)
    return module


def _install_noise_buffers(hift: "CausalHiFTGenerator", config: YamlConfig) -> None:
    """CosyVoice3's vocoder adds noise from buffers the reference draws at construction, right
    after modules of the flow whose sizes decide where in the random stream they start."""
    flow = config.resolve("flow").kwargs
    try:
        hift.replay_source_buffers(flow_vocab_size=int(flow["vocab_size"]), flow_input_size=int(flow["input_size"]),
                                   spk_embed_dim=int(flow["spk_embed_dim"]), flow_output_size=int(flow["output_size"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelDirError(f"{config.source}: flow: cannot size the vocoder's noise buffers ({exc})") from exc


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


def load_stage(model_dir: str | Path | ModelDir, stage: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """One stage of a model directory with its weights, in eval mode on `device`.

    The vocoder always runs in float32 (as the reference does); `dtype` applies to the LLM and flow.
    """
    model = open_model_dir(model_dir)
    module = build_stage(model.config, stage, random_init=False)  # load_checkpoint fills every weight
    load_checkpoint(module, model.path / CHECKPOINTS[stage])
    finish = getattr(module, "fold_weight_norm", None)
    if finish is not None:
        finish()
    module.to(device=device, dtype=torch.float32 if stage == "hift" else dtype)
    return module.eval()


def load_model(model_dir: str | Path | ModelDir, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> ModelStages:
    """All three stages of a complete model directory."""
    model = open_model_dir(model_dir)
    stages = {stage: load_stage(model, stage, device, dtype) for stage in STAGES}
    return ModelStages(settings=model.settings, **stages)
