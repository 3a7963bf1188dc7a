"""Checkpoints of a decpo.train run: checkpoints/step-NNNNNNN directories written
atomically, read back without unpickling anything, checked against the run.

A checkpoint holds tensors.safetensors (adapter weights, optimizer moments, torch
RNG) and state.json (step, optimizer hyper-parameters, scheduler, Python RNG, the
run's identity, and the size and SHA-256 of the tensor file). `latest` names the
newest; the two newest are kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def warn(message: str) -> None:
    print(f"decpo.train: warning: {message}", file=sys.stderr, flush=True)


CHECKPOINT_FORMAT = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
STEP_DIR = re.compile(r"step-(\d{7})")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, damaged or of another run."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, say); nothing of it is left behind."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss, parameter or optimizer state: the step is not saved."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def non_finite_tensor(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The name of a trainable parameter or optimizer state tensor holding NaN or Inf,
    or None when all are finite (one device sync)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {id(p): n for n, p in named}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    named.append((f"optimizer {key} of {names.get(id(p), '?')}", value))
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t.detach()).all().to("cpu") for _, t in named])
    if bool(flags.all()):
        return None
    return named[int((~flags).nonzero()[0])][0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint_payload(
    step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    run_identity: dict[str, Any] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    tensors = {"trainable/" + k: v.contiguous() for k, v in trainable_state(model).items()}
    opt = optimizer.state_dict()
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, entries in opt["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{pid}/{key}"] = value.detach().cpu().clone().contiguous()
            else:
                plain_state.setdefault(str(pid), {})[key] = value
    tensors["rng/torch"] = torch.get_rng_state()
    version, internal, gauss = random.getstate()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "optimizer": {"param_groups": opt["param_groups"], "plain_state": plain_state},
        "scheduler": scheduler.state_dict(),
        "rng_python": [version, list(internal), gauss],
        "run": run_identity,
    }
    return tensors, meta


def save_checkpoint(
    out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, keep: int = 2, run_identity: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Write checkpoints/step-N atomically: everything goes to a temporary directory
    that is renamed into place, then the `latest` pointer is replaced atomically.
    A crash at any point leaves the previous checkpoint and pointer intact. Refuses
    (NonFiniteError) to save non-finite parameters or optimizer state; a failed write
    (CheckpointWriteError) removes its temporary directory."""
    bad = non_finite_tensor(model, optimizer)
    if bad is not None:
        raise NonFiniteError(f"non-finite values in {bad} at step {step}; not saved")
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors, meta = _checkpoint_payload(step, model, optimizer, scheduler, run_identity)
        save_file(tensors, str(tmp / TENSORS_FILE))
        with open(tmp / TENSORS_FILE, "rb+") as f:
            os.fsync(f.fileno())
        meta["files"] = {TENSORS_FILE: {"bytes": (tmp / TENSORS_FILE).stat().st_size,
                                        "sha256": _sha256(tmp / TENSORS_FILE)}}  # fmt: skip
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:  # written last
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # Re-saving a step: move the old directory aside first (never delete it
            # before the new one is in place), then drop it.
            aside = root / f".step-{step:07d}.old"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        (root / ".latest.tmp").unlink(missing_ok=True)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CheckpointWriteError(
            exc.errno or errno.EIO, f"could not write checkpoint {final}: {reason} ({exc})"
        ) from exc
    older = sorted(p for p in root.glob("step-*") if p.name < final.name)
    for old in older[: max(0, len(older) - (keep - 1))]:  # keep the newest `keep`
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class _Checkpoint:
    step: int
    path: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_torch: torch.Tensor
    rng_python: tuple


def read_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    run_identity: dict[str, Any] | None = None,
) -> _Checkpoint:  # fmt: skip
    """Read and fully check one checkpoint directory without changing anything;
    CheckpointError says what is wrong with it. Tensors come from safetensors and
    the rest from JSON: nothing is unpickled (a state.pt is never read)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    links = [f.name for f in (path / STATE_FILE, path / TENSORS_FILE) if f.is_symlink()]
    if links:
        raise CheckpointError(f"{', '.join(links)} is a symbolic link (never followed)")
    try:
        meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"no {STATE_FILE} (incomplete, or not in this version's format)"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{STATE_FILE} unreadable ({exc})") from None
    try:
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"unknown checkpoint format {meta.get('format')!r}")
        if run_identity is not None and meta.get("run") not in (None, run_identity):
            raise CheckpointError("written by a run with another configuration")
        expected = meta["files"][TENSORS_FILE]
        tensor_path = path / TENSORS_FILE
        if not tensor_path.is_file() or tensor_path.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{TENSORS_FILE} missing or truncated")
        if _sha256(tensor_path) != expected["sha256"]:
            raise CheckpointError(f"{TENSORS_FILE} does not match its checksum")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{TENSORS_FILE} unreadable ({exc})") from None
        trainable = {k[len("trainable/") :]: v for k, v in tensors.items()
                     if k.startswith("trainable/")}  # fmt: skip
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(trainable) != set(params):
            raise CheckpointError("its adapter parameters do not match the model's")
        for name, value in trainable.items():
            if value.shape != params[name].shape:
                raise CheckpointError(f"{name} has shape {tuple(value.shape)}, the model's is "
                                      f"{tuple(params[name].shape)}")  # fmt: skip
        groups = meta["optimizer"]["param_groups"]
        ours = optimizer.param_groups
        if len(groups) != len(ours) or any(
            len(g["params"]) != len(o["params"]) for g, o in zip(groups, ours, strict=False)
        ):
            raise CheckpointError("its optimizer groups do not match the model's")
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, pid, name = key.split("/", 2)
                state.setdefault(int(pid), {})[name] = value
        for pid, entries in meta["optimizer"]["plain_state"].items():
            state.setdefault(int(pid), {}).update(entries)
        version, internal, gauss = meta["rng_python"]
        return _Checkpoint(
            step=int(meta["step"]), path=path, trainable=trainable,
            optimizer={"state": state, "param_groups": groups}, scheduler=meta["scheduler"],
            rng_torch=tensors["rng/torch"], rng_python=(version, tuple(internal), gauss),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{STATE_FILE} incomplete ({type(exc).__name__}: {exc})") from None


def find_checkpoint(
    out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    run_identity: dict[str, Any] | None = None,
) -> tuple[_Checkpoint | None, list[str]]:  # fmt: skip
    """The checkpoint to resume from: the one `latest` names when it is intact, else
    the newest intact step directory. `latest` must name a step directory directly
    inside checkpoints/ (never a path). Returns it (None if there is none) and what
    was skipped, with why."""
    root = out / "checkpoints"
    skipped: list[str] = []
    steps = sorted(  # real directories only: a symlink could lead out of the run
        (p for p in root.glob("step-*")
         if STEP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()),
        key=lambda p: p.name, reverse=True,
    )  # fmt: skip
    # A re-save of a step moves the old directory aside as .step-N.old before the new
    # one is renamed into place: a crash between the two leaves it there, intact.
    aside = [p for p in root.glob(".step-*.old")
             if STEP_DIR.fullmatch(p.name[1:-4]) and not p.is_symlink()]  # fmt: skip
    order = sorted(
        [*steps, *aside], key=lambda p: (p.name.strip(".")[:12], p in steps), reverse=True
    )
    pointer = root / "latest"
    if pointer.is_file() or pointer.is_symlink():
        try:
            named = pointer.read_text(encoding="utf-8").strip()
        except (OSError, ValueError):
            named = None
        if named is not None and STEP_DIR.fullmatch(named) and (root / named) in steps:
            order.remove(root / named)
            order.insert(0, root / named)
        else:
            skipped.append(f"`latest` ({named!r}: not a step directory of this run)")
    for path in order:
        try:
            return read_checkpoint(path, model, optimizer, run_identity), skipped
        except CheckpointError as exc:
            skipped.append(f"{path.name} ({exc})")
    return None, skipped


def apply_checkpoint(
    ckpt: _Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> int:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in ckpt.trainable.items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    torch.set_rng_state(ckpt.rng_torch)
    random.setstate(ckpt.rng_python)
    return ckpt.step


def load_checkpoint(
    out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    run_identity: dict[str, Any] | None = None,
) -> int:  # fmt: skip
    """Restore the latest intact checkpoint of run `out` (warning about each damaged
    one skipped); returns its step. CheckpointError when there is none."""
    ckpt, skipped = find_checkpoint(out, model, optimizer, run_identity)
    if ckpt is None:
        what = f": skipped {'; '.join(skipped)}" if skipped else ""
        raise CheckpointError(f"{out}: no intact checkpoint{what}")
    if skipped:
        warn(f"{out}: skipped {'; '.join(skipped)}; resuming from {ckpt.path.name}")
    return apply_checkpoint(ckpt, model, optimizer, scheduler)
