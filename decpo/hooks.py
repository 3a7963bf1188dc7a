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
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import decpo
from decpo.models import decoder_layers

TOKEN_MODES = ("last", "all")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


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

    def __enter__(self) -> DecorrelationHooks:
        for mod in self.modules:
            self._handles.append(mod.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()

    def _record(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self._active or _in_backward():
            return
        if self.first_pass_only and len(self.outputs) >= len(self.modules):
            return
        if self._force or torch.is_grad_enabled():
            self.outputs.append(output[0] if isinstance(output, tuple) else output)

    @contextlib.contextmanager
    def capture(self, force: bool = False) -> Iterator[DecorrelationHooks]:
        """Record outputs during this block (cleared first). Without `force`, only a
        pass with gradients enabled records; force=True records under no_grad too
        (metrics in evaluation)."""
        self.outputs.clear()
        self._active, self._force = True, force
        try:
            yield self
        finally:
            self._active = self._force = False

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
        hidden, segment_ids = self.rows(completion_mask, tokens)
        return decpo.decorrelation_penalty(hidden, segment_ids=segment_ids, normalize=normalize)

    def official_regularizer(self) -> torch.Tensor:
        """PAPER-CODE COMPATIBILITY, for ablations only (DESIGN section 1): what the
        official DecPO code (hanqi-qi/Revisit_monosemanticity, 2da99fb) adds, namely
        mean(A A^T - I) with A = |h[0::2, -1]|: position -1 of the right-padded batch
        (often a pad token), rows 0::2 (a mix of chosen and rejected), abs(), no
        normalization, signed rather than squared. Averaged over hooked layers; the
        official weight is 0.001. decpo's correct regularizer is penalty()."""
        if len(self.outputs) != len(self.modules):
            raise RuntimeError("run exactly one policy forward inside capture() first")
        values = []
        for out in self.outputs:
            a = out[0::2, -1].float().abs()  # (B', D)
            eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            values.append((a @ a.T - eye).mean())
        return torch.stack(values).mean()
