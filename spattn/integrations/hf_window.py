"""Which sliding window each Hugging Face attention layer uses, read from the model's config the way the
model builds its own mask, or why spattn cannot express that layer's mask. Pure functions, no torch.

transformers (5.x) gives a layer a sliding-window mask in one of two ways:

- configs with ``layer_types`` (Qwen2/Qwen2-MoE/Qwen3, Gemma2/Gemma3, GPT-OSS, Cohere2, Ministral, Olmo3,
  SmolLM3, Exaone4, ...): layer i gets the sliding mask iff ``layer_types[i] == "sliding_attention"``.
  The configs derive ``layer_types`` from the older knobs at construction: Qwen2/Qwen3 make layers
  ``>= max_window_layers`` sliding when ``use_sliding_window``; Qwen2-MoE makes the *even* layers
  ``< max_window_layers`` sliding (and sets ``sliding_window = 0`` when ``use_sliding_window`` is off);
  Gemma2/GPT-OSS alternate; Gemma3 every layer but each 6th (``sliding_window_pattern``).
- configs without them (Mistral, Mixtral, Phi3, PhiMoE, Starcoder2, Qwen3-MoE): every layer is
  sliding iff ``config.sliding_window`` is not None.

The sliding mask keeps key kv for query q iff ``q - sliding_window < kv <= q``, i.e. flash-attn's window
``(sliding_window - 1, 0)`` with causal attention (transformers' own flash path passes the same left
bound). Gemma3 with ``use_bidirectional_attention`` keeps ``|q - kv| < sliding_window`` on sliding
layers (and every key on full ones), non-causal: ``(sliding_window - 1, sliding_window - 1)``.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

Window = Tuple[int, int]
FULL: Window = (-1, -1)


class WindowNotSupported(NotImplementedError):
    """The layer's attention mask is one spattn cannot express (the message says why and what to do)."""


def hf_layer_window(config: Any, layer_idx: Optional[int], *, causal: bool = True,
                    sliding_window: Optional[int] = None) -> Window:
    """The window ``(left, right)`` (-1 = unbounded, ``(-1, -1)`` = full attention) of attention layer
    ``layer_idx`` of a model with (text) ``config``, as the model's own mask builds it.

    Args:
        config: the attention module's config (``module.config``).
        layer_idx: the module's ``layer_idx`` (None if it has none: then only configs without
            ``layer_types`` can be resolved).
        causal: whether the layer attends causally (``module.is_causal``); Gemma3's bidirectional mode
            has non-causal layers.
        sliding_window: the ``sliding_window`` kwarg the attention module passed, if any (what
            transformers hands flash-attention). It must agree with the mask; a disagreement is refused.

    Raises WindowNotSupported naming the setting when the mask is something else (chunked attention,
    a non-causal use of a causal LM, a sliding window of 0, an unknown layer type).
    """
    where = f"layer {layer_idx}" if layer_idx is not None else "this layer"
    sw = getattr(config, "sliding_window", None)
    sliding = _is_sliding(config, layer_idx, sw, where)
    if getattr(config, "is_causal", True) is False and (causal or sliding):
        raise WindowNotSupported(
            f"{where}: config.is_causal=False (a causal LM used bidirectionally) builds masks spattn's "
            "integration does not reproduce; use the model causally or another attn_implementation")
    if sliding_window is not None and (not sliding or sliding_window != sw):
        raise WindowNotSupported(
            f"{where}: the attention module passed sliding_window={sliding_window} but the model's mask for it "
            f"is {'sliding_window=%s' % sw if sliding else 'full attention'}; spattn will not guess which one "
            "the model means")
    if not sliding:
        return FULL
    if not isinstance(sw, int) or isinstance(sw, bool) or sw < 1:
        raise WindowNotSupported(
            f"{where} is a sliding-window layer with config.sliding_window={sw!r}: the model's mask then hides "
            "every key (for Qwen2-MoE, sliding_window is set to 0 when use_sliding_window=False); set "
            "use_sliding_window / sliding_window consistently with layer_types")
    bidirectional = bool(getattr(config, "use_bidirectional_attention", False))
    if bidirectional != (not causal):
        raise WindowNotSupported(
            f"{where}: a {'causal' if causal else 'non-causal'} module with config.use_bidirectional_attention="
            f"{bidirectional} has a sliding mask spattn cannot reproduce")
    return (sw - 1, sw - 1) if bidirectional else (sw - 1, 0)


def _is_sliding(config: Any, layer_idx: Optional[int], sw: Optional[int], where: str) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if getattr(config, "attention_chunk_size", None):
            raise WindowNotSupported(f"{where}: chunked attention (config.attention_chunk_size) is not supported")
        return sw is not None
    if layer_idx is None:
        raise WindowNotSupported(
            f"{where}: config.layer_types is set but the attention module has no layer_idx, so its mask type "
            "cannot be told")
    if not 0 <= layer_idx < len(layer_types):
        raise WindowNotSupported(f"{where}: layer_idx {layer_idx} is outside config.layer_types "
                                 f"({len(layer_types)} entries)")
    kind = layer_types[layer_idx]
    if kind == "full_attention":
        return False
    if kind == "sliding_attention":
        return True
    raise WindowNotSupported(f"{where}: layer type {kind!r} (config.layer_types) is not supported by spattn; "
                             "supported: 'full_attention', 'sliding_attention'")
