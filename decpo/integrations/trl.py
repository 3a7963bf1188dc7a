"""DecPO for TRL (>= 1.15): DecPOConfig and DecPOTrainer, a DPOTrainer subclass, and
decpo's log-prob head for any TRL trainer.

    from decpo.integrations.trl import DecPOConfig, DecPOTrainer
    args = DecPOConfig(output_dir="out", dec_weight=0.1, dec_layers=[10, 11])
    DecPOTrainer(model=peft_model, args=args, train_dataset=ds, processing_class=tok).train()

The trainer adds dec_weight x decorrelation_penalty of the hooked activations to
TRL's DPO loss. The hooks record the policy forward of each compute_loss only: the
reference pass runs under no_grad (and after the policy pass), evaluation runs under
no_grad, and gradient-checkpoint recomputation runs inside backward, and none of
them adds rows. Under reentrant gradient checkpointing the policy forward runs under
no_grad too; the hooks detect it and inject the penalty's gradient when backward
recomputes each layer (decpo.hooks). dec/penalty and dec/decorrelation join TRL's
logged metrics.

Log-probs: TRL (>= 1.15) scores tokens through its fused head (add_fused_lm_head):
the model's forward with fused_lm_head=True returns per-token log-probs, entropy,
mean logits, is_top1 (and log sum p^2 for WPO) without building the logits, but
recomputes every logit tile in the backward (6 N V D FLOPs with a frozen head).
add_decpo_lm_head is a drop-in for it built on decpo.token_logprobs (4 N V D: the
frozen-head gradient is formed in the forward; the statistics come from the same
pass), returning the same FusedCausalLMOutput fields, so every TRL metric is
unchanged. DecPOTrainer installs it by default (DecPOConfig(logprob_head="trl")
keeps TRL's); a plain DPOTrainer gets it with one line, use_decpo_head(trainer).
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch.distributed.tensor import DTensor

try:
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('decpo.integrations.trl needs TRL >= 1.15: pip install "decpo[trl]"') from exc

import decpo
from decpo.hooks import TOKEN_MODES, DecorrelationHooks, feature_decorrelation
from decpo.integrations.hf import logit_transform

COMPAT_MODES = (None, "official")
LOGPROB_HEADS = ("decpo", "trl")
HEAD_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _gather_ctx(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """DeepSpeed ZeRO-3 partitions every parameter to numel 0 outside its module's
    forward; gather the head for the direct read (TRL's own helper)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:  # pragma: no cover - older TRL
        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(weight, bias)


def _full(param: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2 DTensor parameter gathered to a plain tensor (differentiably), so
    every rank scores its tokens against the whole head."""
    if param is not None and isinstance(param, DTensor):
        return param.full_tensor()
    return param


def add_decpo_lm_head(
    model: torch.nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    backend: str = "auto",
) -> None:
    """Drop-in for TRL's add_fused_lm_head (same arguments, same output) on
    decpo.token_logprobs: model(..., labels=labels, fused_lm_head=True) returns a
    trl FusedCausalLMOutput (loss, log_probs, entropy, log_sum_sq_probs, mean_logits,
    is_top1, label_mask, aux_loss) without building the logits. Only the positions
    whose label is not -100 are scored, on every device. The model config's softcap
    and logit scale are applied (decpo.integrations.hf.logit_transform). The FSDP2
    DTensor head is gathered with full_tensor() and a DeepSpeed ZeRO-3 head inside
    TRL's gather context before scoring. Differences from TRL's head: entropy has no
    gradient (TRL's DPO detaches it anyway), and is_top1 counts a tie at the maximum
    as a match (torch.argmax's first maximum decides in TRL's); see
    decpo.TokenStats. Without fused_lm_head=True the model's previous forward runs.
    """
    unknown = set(outputs) - set(HEAD_OUTPUTS)
    if unknown:
        raise ValueError(f"outputs {sorted(unknown)} unknown; choose from {HEAD_OUTPUTS}")
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    softcap, logit_scale = logit_transform(text_config)
    want_stats = any(name != "log_probs" for name in outputs)
    # Before transformers 5, vision-language models expose their language backbone as
    # `model` rather than through `base_model_prefix` (as TRL's head handles it).
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5"):
        backbone_attr = "model"

    @functools.wraps(type(model).forward)
    def _decpo_forward(
        self: torch.nn.Module, *args: Any, fused_lm_head: bool = False, labels: Any = None,
        shift_labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        if not fused_lm_head:
            for name, value in (
                ("labels", labels), ("shift_labels", shift_labels),
                ("num_items_in_batch", num_items_in_batch),
            ):  # fmt: skip
                if value is not None:
                    kwargs[name] = value
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        if shift_labels is None:
            hidden = backbone_outputs.last_hidden_state[:, :-1]
            labels = labels[:, 1:]
        else:
            hidden = backbone_outputs.last_hidden_state
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        hidden = hidden.to(lm_head.weight.device)
        labels = labels.to(lm_head.weight.device)
        mask = labels != -100
        if hasattr(lm_head.weight, "ds_status") and lm_head.weight.requires_grad:
            raise NotImplementedError(
                "decpo's head under DeepSpeed ZeRO-3 needs a frozen LM head (LoRA): a "
                "trainable head's backward would read the re-partitioned weight; use "
                "logprob_head='trl' to train the head"
            )
        weight, bias = _full(lm_head.weight), _full(lm_head.bias)
        if cast_lm_head_to_fp32:
            dtype = torch.float32
        elif torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
        else:
            dtype = hidden.dtype
        with _gather_ctx(lm_head.weight, lm_head.bias), torch.autocast(
            hidden.device.type, enabled=False
        ):  # fmt: skip
            result = decpo.token_logprobs(
                hidden.to(dtype), weight.to(dtype), labels,
                bias=None if bias is None else bias.to(dtype), temperature=temperature,
                softcap=softcap, logit_scale=logit_scale, return_stats=want_stats,
                backend=backend,
            )  # fmt: skip
        log_probs, stats = result if want_stats else (result, None)
        extra: dict[str, Any] = dict.fromkeys(HEAD_OUTPUTS[1:])
        if stats is not None:
            fields = {
                "entropy": stats.entropy,
                "log_sum_sq_probs": stats.log_sum_p2,
                "mean_logits": stats.logit_sum / weight.shape[0],
                "is_top1": stats.argmax_match.bool(),
            }
            extra = {k: (v if k in outputs else None) for k, v in fields.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            n_experts = getattr(text_config, "num_experts", None) or getattr(
                text_config, "num_local_experts", None
            )
            aux_loss = load_balancing_loss_func(
                backbone_outputs.router_logits, n_experts, text_config.num_experts_per_tok,
                kwargs.get("attention_mask"),
            )  # fmt: skip
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss, log_probs=log_probs, label_mask=mask, aux_loss=aux_loss, **extra
        )

    model.forward = types.MethodType(_decpo_forward, model)


def _head_target(model: torch.nn.Module) -> torch.nn.Module:
    """The model TRL patches: the base model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_decpo_head(trainer: DPOTrainer, backend: str = "auto") -> DPOTrainer:
    """Score a TRL DPOTrainer's tokens with decpo's head instead of TRL's fused head,
    with the same outputs (so the same metrics and WPO weights). One line after
    building the trainer: use_decpo_head(DPOTrainer(...)).train(). Returns trainer."""
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    if getattr(trainer, "use_weighting", False):
        outputs += ("log_sum_sq_probs",)
    add_decpo_lm_head(_head_target(trainer.model), outputs=outputs, backend=backend)
    if getattr(trainer, "ref_model", None) is not None:
        add_decpo_lm_head(_head_target(trainer.ref_model), backend=backend)
    return trainer


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
    logprob_head: str = field(
        default="decpo",
        metadata={
            "help": "'decpo': score tokens with decpo.token_logprobs (add_decpo_lm_head); "
            "'trl': keep TRL's fused LM head."
        },
    )
    logprob_backend: str = field(
        default="auto", metadata={"help": "decpo backend of the log-prob head."}
    )
    dec_compat: str | None = field(
        default=None,
        metadata={
            "help": "'official' reproduces the paper code's regularizer (ablations only; "
            "see DecorrelationHooks.official_regularizer: first hooked layer only). None: "
            "decpo's correct penalty."
        },
    )
    average_log_prob: bool = field(
        default=False,
        metadata={
            "help": "Score each response by its mean per-token log-prob, as the paper code "
            "does (average_log_prob=True): runs TRL's loss_type 'sigmoid_norm', the sigmoid "
            "DPO loss of length-averaged log-probs. Needs loss_type 'sigmoid'."
        },
    )

    def __post_init__(self) -> None:
        if self.dec_tokens not in TOKEN_MODES:
            raise ValueError(f"dec_tokens must be one of {TOKEN_MODES}, got {self.dec_tokens!r}")
        if self.dec_compat not in COMPAT_MODES:
            raise ValueError(f"dec_compat must be one of {COMPAT_MODES}, got {self.dec_compat!r}")
        if self.logprob_head not in LOGPROB_HEADS:
            raise ValueError(
                f"logprob_head must be one of {LOGPROB_HEADS}, got {self.logprob_head!r}"
            )
        if self.dec_weight < 0:
            raise ValueError(f"dec_weight must be >= 0, got {self.dec_weight}")
        super().__post_init__()  # loss_type becomes a list
        if self.average_log_prob:
            # sigmoid_norm divides each response's summed log-ratio by its completion
            # length, which policy and reference share: beta (mean log pi_c - mean
            # log ref_c - mean log pi_r + mean log ref_r), the paper code's DPO logits.
            if self.loss_type not in (["sigmoid"], ["sigmoid_norm"]):
                raise ValueError(
                    f"average_log_prob needs loss_type 'sigmoid', got {self.loss_type}"
                )
            self.loss_type = ["sigmoid_norm"]


class DecPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is DPO + dec_weight x decorrelation penalty."""

    args: DecPOConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DecPOConfig):
            raise TypeError("DecPOTrainer needs args=DecPOConfig(...)")
        if self.args.logprob_head == "decpo":
            use_decpo_head(self, self.args.logprob_backend)
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
            if training and model.training and loss.requires_grad:
                raise RuntimeError(
                    f"decpo: the hooks on {self.args.dec_module!r} captured "
                    f"{len(hooks.outputs)} of {len(hooks.modules)} layer outputs in the "
                    "policy forward, so the regularizer would be silently off (gradient "
                    f"checkpointing: {self.args.gradient_checkpointing}, kwargs "
                    f"{self.args.gradient_checkpointing_kwargs})"
                )
            return result  # evaluation of a pass with no hooked modules
        mask = inputs["completion_mask"]
        hidden, segment_ids = hooks.rows(mask, self.args.dec_tokens)
        # Metrics only (dec_weight 0): no gradient, so nothing is owed to the backward.
        with torch.set_grad_enabled(bool(self.args.dec_weight) and torch.is_grad_enabled()):
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
