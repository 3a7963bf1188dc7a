"""Input validation at the public boundary: clear TypeError/ValueError naming the argument."""

from __future__ import annotations

import math

import torch


def tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value: object) -> torch.Tensor:
    t = tensor(name, value)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def integer(name: str, value: object) -> torch.Tensor:
    t = tensor(name, value)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got dtype {t.dtype}")
    return t


def same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def same_dtype(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    if len({v.dtype for v in present.values()}) > 1:
        what = ", ".join(f"{k} {v.dtype}" for k, v in present.items())
        raise ValueError(f"dtypes must match, got {what}")


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def integer_scalar(name: str, value: object) -> int:
    """A Python int that fits int64 (the targets' dtype and the custom ops' schema)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64 [{INT64_MIN}, {INT64_MAX}], got {value}")
    return value


def targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError if a target is outside [0, vocab) and not ignore_index (one host sync)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(
            f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {first} ({int(bad.sum())} bad of {targets.numel()})"
        )
