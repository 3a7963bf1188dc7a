"""Hugging Face model conventions decpo needs without importing TRL."""

from __future__ import annotations

from typing import Any


def logit_transform(model_or_config: Any) -> tuple[float | None, float]:
    """(softcap, logit_scale) for decpo.token_logprobs from a transformers model or
    config, read as the model's own forward applies them (and as TRL's fused head
    reads them): final_logit_softcapping (Gemma 2/3) is the softcap; logit_scale
    (Cohere), output_multiplier and lm_head_multiplier multiply the logits;
    logits_scaling divides them (Granite, MiniCPM3; HyperCLOVA X multiplies)."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            break
    scaling = getattr(text, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if getattr(text, "model_type", "") == "hyperclovax" else 1.0 / scaling
    return (float(softcap) if softcap else None), (1.0 if scale is None else float(scale))
