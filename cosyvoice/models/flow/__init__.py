"""The flow stage: speech tokens -> mel spectrogram (CosyVoice2 CausalMaskedDiffWithXvec,
CosyVoice3 CausalMaskedDiffWithDiT)."""
from .cfm import CausalConditionalCFM
from .dit import DiT
from .encoder import PreLookaheadLayer, UpsampleConformerEncoder
from .estimator import CausalConditionalDecoder
from .flow import CausalMaskedDiffWithDiT, CausalMaskedDiffWithXvec

__all__ = ["CausalConditionalCFM", "CausalConditionalDecoder", "CausalMaskedDiffWithDiT",
           "CausalMaskedDiffWithXvec", "DiT", "PreLookaheadLayer", "UpsampleConformerEncoder"]
