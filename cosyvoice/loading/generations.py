"""The model generations this runtime serves, and what tells their directories apart.

A generation is recognised from the yaml file its directory holds (the official downloads
ship exactly one). Everything else that differs per generation lives in the classes the yaml
names (see `registry`) and in the prompt conventions of `cosyvoice.inference.prompts`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..frontend.tokenizer import COSYVOICE2_SPECIAL_TOKENS, COSYVOICE3_SPECIAL_TOKENS


@dataclass(frozen=True)
class Generation:
    name: str                     # as users and the API name it: "CosyVoice2", "CosyVoice3"
    yaml_name: str                # the yaml whose presence selects this generation
    stage_classes: dict           # stage -> the upstream class path its yaml must name
    speech_tokenizer: str         # ONNX speech tokenizer file in the model directory
    special_tokens: list          # added to the Qwen tokenizer, in id order


COSYVOICE2 = Generation(
    name="CosyVoice2",
    yaml_name="cosyvoice2.yaml",
    stage_classes={"llm": "cosyvoice.llm.llm.Qwen2LM",
                   "flow": "cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
                   "hift": "cosyvoice.hifigan.generator.HiFTGenerator"},
    speech_tokenizer="speech_tokenizer_v2.onnx",
    special_tokens=COSYVOICE2_SPECIAL_TOKENS,
)
COSYVOICE3 = Generation(
    name="CosyVoice3",
    yaml_name="cosyvoice3.yaml",
    stage_classes={"llm": "cosyvoice.llm.llm.CosyVoice3LM",
                   "flow": "cosyvoice.flow.flow.CausalMaskedDiffWithDiT",
                   "hift": "cosyvoice.hifigan.generator.CausalHiFTGenerator"},
    speech_tokenizer="speech_tokenizer_v3.onnx",
    special_tokens=COSYVOICE3_SPECIAL_TOKENS,
)
GENERATIONS = (COSYVOICE2, COSYVOICE3)
# Yaml files of generations we recognise but do not serve, with the name users know them by.
UNSUPPORTED = {"cosyvoice.yaml": "CosyVoice (300M, version 1)"}


def by_name(name: str) -> Generation:
    """"CosyVoice3", "cosyvoice3" or "3" -> the generation; ValueError names the choices."""
    wanted = name.strip().lower().removeprefix("cosyvoice")
    for generation in GENERATIONS:
        if generation.name.lower().removeprefix("cosyvoice") == wanted:
            return generation
    raise ValueError(f"unknown model generation {name!r}; choose "
                     f"{', '.join(g.name for g in GENERATIONS)}")


def of_config(tree: dict) -> Generation | None:
    """The generation whose LLM class a parsed yaml names, or None."""
    llm_class = getattr(tree.get("llm"), "path", None)
    for generation in GENERATIONS:
        if generation.stage_classes["llm"] == llm_class:
            return generation
    return None
