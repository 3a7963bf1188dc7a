"""Capture a module's output at chosen decoder layers and turn it into the DecPO
regularizer. Used by decpo.train and by the trainer integrations.

    with DecorrelationHooks(model, module="mlp.up_proj", layers=[2, 3]) as hooks:
        with hooks.capture():                  # the policy forward only
            out = model(input_ids, attention_mask=attention_mask)
        penalty = hooks.penalty(completion_mask, tokens="last")

Outputs are recorded only inside `capture()`, only with gradients enabled and never
while autograd runs a backward pass, so a reference pass (outside capture or under
no_grad), an evaluation under no_grad and a gradient-checkpoint recomputation never
add rows. Hooks are removed on exit (the paper's code leaked one hook per step).

Gradient checkpointing: with use_reentrant=False the checkpointed forward keeps
autograd on, so the recorded outputs carry their graph as usual. With
use_reentrant=True (TRL forces it for PEFT under DeepSpeed ZeRO-3) the forward of a
checkpointed layer runs under no_grad and only the layer's output gets a gradient,
in a recomputation inside backward. The hooks then record that forward's outputs
(detected by the checkpoint frame, not by grad mode), penalty() computes
d penalty / d output at once, and when backward recomputes the layer the hook adds
upstream x that gradient to the recomputed output's gradient: the same gradient as
without checkpointing. If that cannot happen (the gradient never reached the layer)
the next capture() raises instead of training without the regularizer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

import decpo
from decpo.models import decoder_layers

TOKEN_MODES = ("last", "all")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


_REENTRANT_FORWARD = torch.utils.checkpoint.CheckpointFunction.forward.__code__


def _in_reentrant_checkpoint() -> bool:
    """True inside the (no_grad) forward of torch.utils.checkpoint(use_reentrant=True)."""
    frame = sys._getframe(2)
    for _ in range(256):
        if frame is None:
            return False
        if frame.f_code is _REENTRANT_FORWARD:
            return True
        frame = frame.f_back
    return False


class _UpstreamProbe(torch.autograd.Function):
    """0 in the forward; in the backward it stores the upstream gradient of the loss
    term it belongs to (the scale for gradients injected into recomputed layers)."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, hooks: DecorrelationHooks) -> torch.Tensor:
        ctx.hooks = hooks
        return anchor.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None]:
        ctx.hooks._upstream = grad.detach()
        return None, None


def select_rows(
    outputs: Sequence[torch.Tensor], completion_mask: torch.Tensor, tokens: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows for the penalty from per-layer outputs (B, T, D) and a (B, T) mask of
    response tokens: "last", the last response token of each sequence (one group of
    B rows); "all", every response token (one group per sequence). Returns hidden
    (L, N, D) and segment ids (N,) or None."""
    if tokens not in TOKEN_MODES:
        raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
    mask = completion_mask.bool()
    if tokens == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask, positions, -1).amax(1)  # (B,)
        has = last >= 0
        batch = torch.arange(mask.shape[0], device=mask.device)[has]
        # Gather each layer's rows first: stacking whole (B, T, D) outputs would copy
        # every activation of every hooked layer.
        return torch.stack([out[batch, last[has]] for out in outputs]), None  # (L, B', D)
    rows = mask.nonzero()  # (N, 2): sequence, position
    return torch.stack([out[rows[:, 0], rows[:, 1]] for out in outputs]), rows[:, 0]


def feature_decorrelation(hidden: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """1 - mean pairwise cosine similarity of rows within their group (i != j),
    averaged over layers: the paper's decorrelation metric. hidden (L, N, D)."""
    z = torch.nn.functional.normalize(hidden.detach().float(), dim=-1, eps=1e-6)
    seg = (
        torch.zeros(z.shape[1], dtype=torch.long, device=z.device)
        if segment_ids is None
        else torch.unique(segment_ids, return_inverse=True)[1]
    )
    groups = int(seg.max()) + 1 if seg.numel() else 0
    sums = z.new_zeros((z.shape[0], groups, z.shape[2])).index_add_(1, seg, z)  # (L, G, D)
    counts = torch.bincount(seg, minlength=groups).to(z.dtype)  # (G,)
    # sum_{i != j} z_i . z_j = ||sum z||^2 - sum ||z||^2 per group.
    pair_sum = sums.square().sum(-1).sum(-1) - z.square().sum(-1).sum(-1)  # (L,)
    pairs = (counts * (counts - 1)).sum()
    if pairs == 0:
        return z.new_ones(())
    return 1.0 - (pair_sum / pairs).mean()


class DecorrelationHooks:
    """Forward hooks on `module` of the given decoder layers (None: all layers).

    module: a dotted name inside each decoder layer ("mlp.up_proj", GPT-2's "mlp.c_fc")
    or an fnmatch pattern ("mlp.up*") that matches exactly one module per layer.
    first_pass_only: keep only the first forward of each capture() block (useful when
    a trainer runs the policy and then the reference inside one call under no_grad).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        module: str = "mlp.up_proj",
        layers: Sequence[int] | None = None,
        first_pass_only: bool = False,
    ) -> None:
        blocks = decoder_layers(model)
        self.layer_ids = list(range(len(blocks))) if layers is None else list(layers)
        bad = [i for i in self.layer_ids if not -len(blocks) <= i < len(blocks)]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {len(blocks)} layers")
        self.modules = []
        for i in self.layer_ids:
            # peft's internals (lora_A, base_layer, ...) are never what a user means.
            names = [
                n for n, _ in blocks[i].named_modules()
                if n and "lora_" not in n and "base_layer" not in n
            ]  # fmt: skip
            matches = [n for n in names if fnmatch.fnmatchcase(n, module)]
            if len(matches) != 1:
                found = "no module" if not matches else f"{len(matches)} modules ({matches})"
                raise ValueError(
                    f"layer {i} has {found} matching {module!r}; one is needed. "
                    f"Its modules: {', '.join(names)}"
                )
            self.modules.append(blocks[i].get_submodule(matches[0]))
        self.module_name = module
        self.first_pass_only = first_pass_only
        self.outputs: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._active = False
        self._force = False
        self._training = False
        # Reentrant checkpointing (see the module docstring): which recorded outputs had
        # no graph, the penalty gradients waiting for each module's recomputation, and
        # the loss gradient's scale at the penalty, set during backward.
        self._recorded_by: list[torch.nn.Module] = []
        self._deferred: set[int] = set()
        self._pending: dict[int, torch.Tensor] = {}
        self._upstream: torch.Tensor | None = None
        self._missed: list[str] = []

    def __enter__(self) -> DecorrelationHooks:
        for mod in self.modules:
            self._handles.append(mod.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()
        self._recorded_by.clear()
        self._deferred.clear()
        self._pending.clear()

    def _record(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if _in_backward():
            self._inject(module, output)  # a reentrant checkpoint's recomputation
            return
        if not self._active:
            return
        if self.first_pass_only and len(self.outputs) >= len(self.modules):
            return
        out = output[0] if isinstance(output, tuple) else output
        if self._force or torch.is_grad_enabled():
            self.outputs.append(out)
            self._recorded_by.append(module)
        elif self._training and _in_reentrant_checkpoint():
            self.outputs.append(out)
            self._recorded_by.append(module)
            self._deferred.add(len(self.outputs) - 1)

    def _inject(self, module: torch.nn.Module, output: Any) -> None:
        grad = self._pending.pop(id(module), None)
        if grad is None:
            return
        out = output[0] if isinstance(output, tuple) else output
        if self._upstream is None or not out.requires_grad:
            self._missed.append(type(module).__name__)
            return
        extra = (self._upstream * grad).to(out.dtype)
        out.register_hook(lambda g: g + extra)

    @contextlib.contextmanager
    def capture(self, force: bool = False) -> Iterator[DecorrelationHooks]:
        """Record outputs during this block (cleared first). Without `force`, only a
        pass with gradients enabled records (or the forward of a reentrant gradient
        checkpoint inside such a block); force=True records under no_grad too
        (metrics in evaluation)."""
        self._check_previous_step()
        self.outputs.clear()
        self._recorded_by.clear()
        self._deferred.clear()
        self._active, self._force = True, force
        self._training = torch.is_grad_enabled() and not force
        try:
            yield self
        finally:
            self._active = self._force = self._training = False

    def _check_previous_step(self) -> None:
        """The penalty gradient of the last reentrant-checkpointed step reached every
        hooked layer, or an error (never a silent DPO step)."""
        missed = len(self._missed)
        if self._upstream is not None:
            missed += len(self._pending)
        self._pending.clear()
        self._missed.clear()
        self._upstream = None
        if missed:
            raise RuntimeError(
                "decpo: the decorrelation penalty's gradient did not reach "
                f"{missed} hooked module(s) under gradient checkpointing with "
                "use_reentrant=True (a penalty computed with gradients enabled must be "
                "part of the loss that is backpropagated; compute metric-only penalties "
                'under torch.no_grad()), or use gradient_checkpointing_kwargs={"use_reentrant": '
                "False}"
            )

    def _scalar(self, fn: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """fn(outputs), differentiable also when some outputs came from a reentrant
        checkpoint's no_grad forward (their gradient is injected when backward
        recomputes those layers). Under no_grad (a metric) nothing is deferred."""
        if not self._deferred or not torch.is_grad_enabled():
            return fn(self.outputs)
        leaves = {i: self.outputs[i].detach().requires_grad_(True) for i in self._deferred}
        inputs = [leaves.get(i, out) for i, out in enumerate(self.outputs)]
        with torch.enable_grad():
            value = fn(inputs)
            live = any(out.requires_grad for i, out in enumerate(inputs) if i not in leaves)
            grads = torch.autograd.grad(value, list(leaves.values()), retain_graph=live)
        self._pending = {id(self._recorded_by[i]): g for i, g in zip(leaves, grads, strict=True)}
        self._upstream = None
        anchor = torch.zeros((), device=value.device, dtype=value.dtype, requires_grad=True)
        probe = _UpstreamProbe.apply(anchor, self)
        return (value if live else value.detach()) + probe

    def rows(
        self, completion_mask: torch.Tensor, tokens: str = "last"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden (L, N, D), segment ids) of the captured pass; see select_rows."""
        if len(self.outputs) != len(self.modules):
            raise RuntimeError(
                f"captured {len(self.outputs)} outputs for {len(self.modules)} hooked modules: "
                "run exactly one policy forward inside capture()"
            )
        return select_rows(self.outputs, completion_mask, tokens)

    def penalty(
        self, completion_mask: torch.Tensor, tokens: str = "last", normalize: bool = True
    ) -> torch.Tensor:
        """decorrelation_penalty of the captured rows (mean over hooked layers).
        completion_mask (B, T): response tokens, or the attention mask for "the last
        real token" / "every real token"."""
        self.rows(completion_mask, tokens)  # checks what was captured

        def penalty(outputs: list[torch.Tensor]) -> torch.Tensor:
            hidden, segment_ids = select_rows(outputs, completion_mask, tokens)
            return decpo.decorrelation_penalty(hidden, segment_ids=segment_ids, normalize=normalize)

        return self._scalar(penalty)

    def official_regularizer(self) -> torch.Tensor:
        """PAPER-CODE COMPATIBILITY, for ablations only (docs/design.md, "DecPO
        objective"): what the official DecPO code (hanqi-qi/Revisit_monosemanticity,
        2da99fb) adds, namely mean(A A^T - I) with A = |h[0::2, -1]|: position -1 of
        the right-padded batch (often a pad token), rows 0::2 (a mix of chosen and
        rejected), abs(), no normalization, signed rather than squared. Averaged over
        hooked layers; the official weight is 0.001. decpo's correct regularizer is
        penalty()."""
        if len(self.outputs) != len(self.modules):
            raise RuntimeError("run exactly one policy forward inside capture() first")

        def regularizer(outputs: list[torch.Tensor]) -> torch.Tensor:
            values = []
            for out in outputs:
                a = out[0::2, -1].float().abs()  # (B', D)
                eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
                values.append((a @ a.T - eye).mean())
            return torch.stack(values).mean()

        return self._scalar(regularizer)
