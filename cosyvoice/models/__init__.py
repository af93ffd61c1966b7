"""Models: the three neural stages, as plain PyTorch modules built from the yaml.

    llm.py, qwen_slots.py, sampling.py   text ids (+ prompt) -> speech tokens (Qwen2 body)
    flow/                                speech tokens -> mel (flow matching; CosyVoice2's
                                         conformer + U-Net, CosyVoice3's DiT)
    hift.py                              mel -> waveform (HiFT vocoder)
Where a model generation differs, its module sits beside the other generation's, and
`cosyvoice.loading.registry` maps each yaml class path to the right one.
"""
