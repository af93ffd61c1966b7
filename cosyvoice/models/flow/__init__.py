"""The flow stage: speech tokens -> mel spectrogram (CosyVoice2 CausalMaskedDiffWithXvec)."""
from .cfm import CausalConditionalCFM
from .encoder import UpsampleConformerEncoder
from .estimator import CausalConditionalDecoder
from .flow import CausalMaskedDiffWithXvec

__all__ = ["CausalConditionalCFM", "CausalConditionalDecoder", "CausalMaskedDiffWithXvec",
           "UpsampleConformerEncoder"]
