"""Built-in tiny random text-to-image (and text-to-video) pipelines, assembled locally from configs (nothing is downloaded).

They are the real diffusers pipeline classes (``QwenImagePipeline``, ``FluxPipeline``, ``WanPipeline``) with the real
transformer, VAE and scheduler classes at toy sizes, and a tiny random text encoder + tokenizer built
here. The weights are random but seeded, so every rank (and every run) builds the same pipeline;
``save_pretrained`` writes a directory that ``from_pretrained`` (and ``spattn generate --model DIR``)
loads back unchanged. The VAEs keep the real models' spatial factor (8), so width/height rules and
token counts (``(H/16) * (W/16)`` image tokens) are those of the full-size models.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Tuple

import torch

# Words of the fixed prompt templates get one token each (see _byte_bpe): Qwen-Image drops the first
# 34 template tokens of the encoder output, as with its real tokenizer.
_QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# A few everyday words so that prompts are not all single bytes.
_COMMON_WORDS = (
    "a an the cat dog sitting on windowsill in of with and red blue green small large photo painting "
    "city mountain lake sky sun night morning tree house car"
)


def _byte_bpe(words: str, pre_tokenize: Callable[[str], List[str]], end_suffix: str = "") -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """A byte-level BPE vocabulary (all 256 byte symbols) plus merges that spell each pre-token of
    ``words`` as one token. Returns ``(vocab, merges)``."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: Dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
        if end_suffix:
            vocab[ch + end_suffix] = len(vocab)
    merges: List[Tuple[str, str]] = []
    for piece in pre_tokenize(words):
        if len(piece) < 2:
            continue
        left = piece[0]
        for i, ch in enumerate(piece[1:], start=1):
            right = ch + end_suffix if (end_suffix and i == len(piece) - 1) else ch
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((left, right))
            left = merged
    return vocab, merges


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    base = Qwen2Tokenizer(vocab={"<|endoftext|>": 0})
    backend = base.backend_tokenizer
    # The special tokens are added tokens, not BPE pieces: pre-tokenize the text between them.
    text = _QWEN_TEMPLATE.replace("{}", " " + _COMMON_WORDS)

    def pre(s: str) -> List[str]:
        segments = re.split(r"<\|im_start\|>|<\|im_end\|>", s)
        return [p for seg in segments for p, _ in backend.pre_tokenizer.pre_tokenize_str(seg)]

    vocab, merges = _byte_bpe(text, pre)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.model_max_length = 2048
    return tok


def build_tiny_qwen_image(dtype: torch.dtype = torch.float32, seed: int = 0):
    """Tiny random ``QwenImagePipeline``: 4 transformer blocks, 8 heads of 32, a 2-layer Qwen2.5-VL text
    encoder (hidden 32), a Qwen-Image VAE with 3 downsamples (spatial factor 8, 4 latent channels).
    Sized so that, as in the real model, the transformer (not the VAE) dominates a 20-step run."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_tokenizer()
    text_hidden, z_dim = 32, 4
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=4, attention_head_dim=32,
        num_attention_heads=8, joint_attention_dim=text_hidden, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )
    with torch.no_grad():  # random decoders give a flat grey image: spread it over the pixel range
        vae.decoder.conv_out.weight.mul_(3.0)
    torch.manual_seed(seed + 2)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": text_hidden, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e6},
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": text_hidden},
        # No images ever reach the encoder; the vision token ids only need to be valid ids.
        image_token_id=0, video_token_id=0, vision_start_token_id=0, vision_end_token_id=0,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer,
    )
    return pipe.to(dtype=dtype)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    base = CLIPTokenizer()
    backend = base.backend_tokenizer

    def pre(s: str) -> List[str]:
        return [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(s))]

    vocab, merges = _byte_bpe(_COMMON_WORDS, pre, end_suffix="</w>")
    for s in ("<|startoftext|>", "<|endoftext|>"):
        vocab[s] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -5.0) for w in _COMMON_WORDS.split()]
    pieces += [(chr(c), -10.0) for c in range(32, 127)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def build_tiny_flux(dtype: torch.dtype = torch.float32, seed: int = 0):
    """Tiny random ``FluxPipeline``: 1 double + 1 single stream block, 2 heads of 32, tiny CLIP and T5
    text encoders, a 4-stage ``AutoencoderKL`` (spatial factor 8, 4 latent channels)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    z_dim, t5_hidden, clip_hidden = 4, 32, 32
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * z_dim, out_channels=None, num_layers=1, num_single_layers=1,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=t5_hidden,
        pooled_projection_dim=clip_hidden, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=z_dim, block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0, scaling_factor=1.0,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=clip_hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=clip_hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=t5_hidden, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    return pipe.to(dtype=dtype)


def build_tiny_wan(dtype: torch.dtype = torch.float32, seed: int = 0):
    """Tiny random ``WanPipeline`` (text-to-video): 2 transformer blocks, 4 heads of 16, patches (1, 2, 2),
    a 2-layer UMT5 text encoder (d_model 32), a Wan VAE with 3 spatial / 2 temporal downsamples (factors
    8 and 4, as the real Wan 2.1: ``num_frames`` is 4k+1, sizes multiples of 16), the real UniPC
    flow scheduler."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer()
    text_hidden, z_dim = 32, 4
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=z_dim, out_channels=z_dim,
        text_dim=text_hidden, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )
    with torch.no_grad():  # as for Qwen-Image: spread the random decoder's output over the pixel range
        vae.decoder.conv_out.weight.mul_(3.0)
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=text_hidden, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)  # already fp32; .to() would only warn


TINY_MODELS: Dict[str, Callable] = {"tiny-qwen-image": build_tiny_qwen_image, "tiny-flux": build_tiny_flux,
                                    "tiny-wan": build_tiny_wan}

def build_tiny_pipeline(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The built-in tiny pipeline ``name`` (a key of ``TINY_MODELS``), weights seeded by ``seed``."""
    return TINY_MODELS[name](dtype=dtype, seed=seed)

TINY_PIPELINE_CLASS: Dict[str, str] = {"tiny-qwen-image": "QwenImagePipeline", "tiny-flux": "FluxPipeline",
                                        "tiny-wan": "WanPipeline"}
# The tiny VAEs downsample by 8 and the transformers take 2x2 latent patches: sizes are multiples of 16.
TINY_SPATIAL_MULTIPLE = 16
