"""Our text of `cosyvoice2.yaml` and `cosyvoice3.yaml`, in the official hyperpyyaml format.

Only the inference sections are written: the seeding calls, the global numbers, the three model
stages, the text tokenizer and the prompt mel extractor (no dataset, GAN or training sections:
nothing that loads a model for inference reads them). `$name` placeholders are the sizes that
differ between the tiny and the full model; everything else is the generation's fixed value.
"""
from __future__ import annotations

from string import Template

# The parts both generations share; $-names the generation fills in are listed in GENERATION_TEXT.
COMMON_HEADER = """\
# $generation model description, written by `python -m cosyvoice make-model` (random weights).
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# global numbers
sample_rate: 24000
llm_input_size: $llm_size
llm_output_size: $llm_size
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

# streaming: chunk length in speech tokens; a negative left-chunk count means all of them
chunk_size: 25
num_decoding_left_chunks: -1

"""
LLM = """\
# text -> speech tokens$llm_note
llm: !new:$llm_class
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

"""
FRONTEND = """\
# text tokenizer (the Qwen folder CosyVoice-BlankEN replaces qwen_pretrain_path at load time)
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True$tokenizer_version
allowed_special: 'all'

# the 80-bin mel of the prompt audio$fmax_note
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: $fmax
    center: False
"""

COSYVOICE2_STAGES = """\
# speech tokens -> mel spectrogram
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: $flow_size
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        input_size: $flow_size
        output_size: $flow_size
        attention_heads: $encoder_heads
        linear_units: $encoder_linear_units
        num_blocks: $encoder_blocks
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [$estimator_channels]
            dropout: 0.0
            attention_head_dim: $estimator_head_dim
            n_blocks: $estimator_blocks
            num_mid_blocks: $estimator_mid_blocks
            num_heads: $estimator_heads
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

# mel spectrogram -> waveform
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: $hift_channels
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: $hift_channels

"""

COSYVOICE3_STAGES = """\
# speech tokens -> mel spectrogram: 80-dim token embeddings, a look-ahead conv, a DiT decoder
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: $lookahead_channels
        pre_lookahead_len: 3
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: $dit_dim
            depth: $dit_depth
            heads: $dit_heads
            dim_head: $dit_dim_head
            ff_mult: 2
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

# mel spectrogram -> waveform, causal (conv_pre looks 4 frames ahead)
hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: $hift_channels
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: $hift_channels

"""

# What differs per generation besides the flow and vocoder sections.
GENERATION_TEXT = {
    "CosyVoice2": dict(generation="CosyVoice2", llm_class="cosyvoice.llm.llm.Qwen2LM", llm_note="",
                       tokenizer_version="", fmax_note="", fmax="8000"),
    "CosyVoice3": dict(generation="CosyVoice3", llm_class="cosyvoice.llm.llm.CosyVoice3LM",
                       llm_note=" (sos, eos, task id and fill are rows of the speech embedding)",
                       tokenizer_version="\n    version: cosyvoice3",
                       fmax_note=" (no fmax: up to the Nyquist frequency, 12 kHz)", fmax="null"),
}
TEMPLATES = {"CosyVoice2": Template(COMMON_HEADER + LLM + COSYVOICE2_STAGES + FRONTEND),
             "CosyVoice3": Template(COMMON_HEADER + LLM + COSYVOICE3_STAGES + FRONTEND)}


def render(sizes: dict[str, int], generation: str = "CosyVoice2") -> str:
    """The yaml text of `generation` (a name in TEMPLATES) with every size `$name` replaced by
    `sizes[name]`; a missing name is a KeyError."""
    return TEMPLATES[generation].substitute({**sizes, **GENERATION_TEXT[generation]})
