"""Maps the class paths written in official CosyVoice yaml files to our own classes.

`build(value)` turns a resolved yaml value (see `cosyvoice.loading.config`) into objects: `!new:`
records become instances of our classes (children first, as the yaml nests them) and `!name:`
records become functions with bound arguments. Keyword arguments our runtime has no use for
(dropout rates, loss settings, bidirectional-streaming ratios) are listed per class and dropped;
any other unknown argument or class path is an error, so a yaml for a different model fails
loudly instead of building something half right.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from .config import ConfigError, Name, New


@dataclass(frozen=True)
class Target:
    """What a yaml class path builds, and which of its yaml arguments we ignore."""
    build: Callable[..., Any]
    unused: frozenset = frozenset()


def _dict_config(content: dict) -> dict:
    """`!new:omegaconf.DictConfig {content: {...}}` is just a mapping for us."""
    return dict(content)


def _pre_lookahead_layer(in_channels: int, channels: int, pre_lookahead_len: int) -> Any:
    """CosyVoice3's PreLookaheadLayer: in_channels -> channels (conv1) -> in_channels (conv2)."""
    from ..models.flow import PreLookaheadLayer
    return PreLookaheadLayer(in_channels, pre_lookahead_len, hidden_channels=channels)


@functools.lru_cache(maxsize=1)
def targets() -> dict[str, Target]:
    from ..models.flow import (CausalConditionalCFM, CausalConditionalDecoder, CausalMaskedDiffWithDiT,
                               CausalMaskedDiffWithXvec, DiT, UpsampleConformerEncoder)
    from ..models.causal_hift import CausalConvRNNF0Predictor, CausalHiFTGenerator
    from ..models.hift import ConvRNNF0Predictor, HiFTGenerator
    from ..models.llm import CosyVoice3LM, QwenBody, SpeechLM
    from ..models.sampling import ras_sampling

    dropout = frozenset({"dropout_rate", "positional_dropout_rate", "attention_dropout_rate"})
    return {
        "cosyvoice.llm.llm.CosyVoice3LM": Target(
            CosyVoice3LM, frozenset({"length_normalized_loss", "lsm_weight", "mix_ratio"})),
        "cosyvoice.llm.llm.Qwen2LM": Target(
            SpeechLM, frozenset({"length_normalized_loss", "lsm_weight", "mix_ratio"})),
        "cosyvoice.llm.llm.Qwen2Encoder": Target(QwenBody),
        "cosyvoice.utils.common.ras_sampling": Target(ras_sampling),
        "cosyvoice.flow.flow.CausalMaskedDiffWithXvec": Target(
            CausalMaskedDiffWithXvec, frozenset({"output_type", "only_mask_loss"})),
        "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder": Target(
            UpsampleConformerEncoder, dropout),
        "cosyvoice.flow.flow_matching.CausalConditionalCFM": Target(
            CausalConditionalCFM, frozenset({"n_spks"})),
        "cosyvoice.flow.decoder.CausalConditionalDecoder": Target(
            CausalConditionalDecoder, frozenset({"dropout"})),
        "cosyvoice.flow.flow.CausalMaskedDiffWithDiT": Target(
            CausalMaskedDiffWithDiT, frozenset({"output_type", "only_mask_loss"})),
        "cosyvoice.transformer.upsample_encoder.PreLookaheadLayer": Target(_pre_lookahead_layer),
        "cosyvoice.flow.DiT.dit.DiT": Target(DiT, frozenset({"dropout"})),
        "omegaconf.DictConfig": Target(_dict_config),
        "cosyvoice.hifigan.generator.HiFTGenerator": Target(HiFTGenerator),
        "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor": Target(ConvRNNF0Predictor),
        "cosyvoice.hifigan.generator.CausalHiFTGenerator": Target(CausalHiFTGenerator),
        "cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor": Target(CausalConvRNNF0Predictor),
    }


def build(value: Any, extra_kwargs: dict[str, dict] | None = None, where: str = "") -> Any:
    """Builds objects from a resolved yaml value.

    `extra_kwargs` adds keyword arguments per class path (e.g. a Qwen config when the yaml
    is used without a model directory).
    """
    extra_kwargs = extra_kwargs or {}
    if isinstance(value, (New, Name)):
        target = targets().get(value.path)
        if target is None:
            raise ConfigError(f"{where}: '{value.path}' is not a class this runtime implements")
        if isinstance(value, New) and value.args:
            raise ConfigError(f"{where}: '{value.path}' with positional arguments is not supported")
        kwargs = {k: build(v, extra_kwargs, f"{where}.{k}") for k, v in value.kwargs.items()
                  if k not in target.unused}
        kwargs.update(extra_kwargs.get(value.path, {}))
        if isinstance(value, Name):
            return functools.partial(target.build, **kwargs)
        try:
            return target.build(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{where}: cannot build '{value.path}' from these arguments ({exc})") from exc
    if isinstance(value, dict):
        return {k: build(v, extra_kwargs, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [build(v, extra_kwargs, f"{where}[{i}]") for i, v in enumerate(value)]
    return value
