"""DecPO for TRL: DecPOConfig and DecPOTrainer, a DPOTrainer subclass (TRL 1.x).

    from decpo.integrations.trl import DecPOConfig, DecPOTrainer
    args = DecPOConfig(output_dir="out", dec_weight=0.1, dec_layers=[10, 11])
    DecPOTrainer(model=peft_model, args=args, train_dataset=ds, processing_class=tok).train()

The trainer adds dec_weight x decorrelation_penalty of the hooked activations to
TRL's DPO loss. The hooks record the policy forward of each compute_loss only: the
reference pass runs under no_grad (and after the policy pass), evaluation runs under
no_grad, and gradient-checkpoint recomputation runs inside backward, and none of
them adds rows. dec/penalty and dec/decorrelation join TRL's logged metrics.

Log-probs: TRL >= 1.x already scores tokens through its own fused LM head without
materializing logits, and its DPO metrics need the entropy that head also returns,
so DecPOTrainer keeps TRL's log-prob path; decpo.token_logprobs is what
python -m decpo.train uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('decpo.integrations.trl needs TRL: pip install "decpo[trl]"') from exc

from decpo.hooks import TOKEN_MODES, DecorrelationHooks, feature_decorrelation

COMPAT_MODES = (None, "official")


@dataclass
class DecPOConfig(DPOConfig):
    """TRL's DPOConfig plus the DecPO regularizer's settings."""

    dec_weight: float = field(
        default=0.1, metadata={"help": "Weight lambda of the decorrelation penalty."}
    )
    dec_layers: list[int] | None = field(
        default=None, metadata={"help": "Decoder layer indices to hook; None: all layers."}
    )
    dec_module: str = field(
        default="mlp.up_proj",
        metadata={"help": "Module (name or fnmatch pattern) inside each decoder layer."},
    )
    dec_tokens: str = field(
        default="last",
        metadata={"help": "'last': last response token per sequence; 'all': every one."},
    )
    normalize: bool = field(
        default=True, metadata={"help": "Normalize rows before the Gram matrix."}
    )
    dec_compat: str | None = field(
        default=None,
        metadata={
            "help": "'official' reproduces the paper code's regularizer (ablations only; "
            "see DecorrelationHooks.official_regularizer). None: decpo's correct penalty."
        },
    )

    def __post_init__(self) -> None:
        if self.dec_tokens not in TOKEN_MODES:
            raise ValueError(f"dec_tokens must be one of {TOKEN_MODES}, got {self.dec_tokens!r}")
        if self.dec_compat not in COMPAT_MODES:
            raise ValueError(f"dec_compat must be one of {COMPAT_MODES}, got {self.dec_compat!r}")
        if self.dec_weight < 0:
            raise ValueError(f"dec_weight must be >= 0, got {self.dec_weight}")
        super().__post_init__()


class DecPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is DPO + dec_weight x decorrelation penalty."""

    args: DecPOConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DecPOConfig):
            raise TypeError("DecPOTrainer needs args=DecPOConfig(...)")
        self.dec_hooks = DecorrelationHooks(
            self.accelerator.unwrap_model(self.model),
            self.args.dec_module,
            self.args.dec_layers,
            first_pass_only=True,
        )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with self.dec_hooks:  # hooks live for this call only
            return super().train(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        if self.dec_hooks._handles:  # called from inside train()
            return super().evaluate(*args, **kwargs)
        with self.dec_hooks:
            return super().evaluate(*args, **kwargs)

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:  # fmt: skip
        hooks = self.dec_hooks
        if not hooks._handles:  # compute_loss called outside train()/evaluate()
            with hooks:
                return self.compute_loss(model, inputs, return_outputs, num_items_in_batch)
        training = torch.is_grad_enabled()
        # Under no_grad (evaluation) record the first pass, the policy's, for metrics.
        with hooks.capture(force=not training):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if len(hooks.outputs) != len(hooks.modules):
            return result  # nothing captured (e.g. a pass with no hooked modules)
        mask = inputs["completion_mask"]
        hidden, segment_ids = hooks.rows(mask, self.args.dec_tokens)
        if self.args.dec_compat == "official":
            penalty = hooks.official_regularizer()
        else:
            penalty = hooks.penalty(mask, self.args.dec_tokens, self.args.normalize)
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        self._metrics[mode]["dec/penalty"].append(gather(penalty.detach()).mean().item())
        self._metrics[mode]["dec/decorrelation"].append(
            gather(feature_decorrelation(hidden, segment_ids)).mean().item()
        )
        hooks.outputs.clear()
        if self.args.dec_weight:
            loss = loss + self.args.dec_weight * penalty.to(loss.dtype)
        return (loss, result[1]) if return_outputs else loss
