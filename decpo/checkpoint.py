"""Checkpoints of a decpo.train run: checkpoints/step-NNNNNNN directories written
atomically, read back without unpickling anything, checked against the run.

A checkpoint holds tensors.safetensors (adapter weights, optimizer moments, torch
RNG) and state.json (step, optimizer hyper-parameters, scheduler, Python RNG, the
run's identity, and the size and SHA-256 of the tensor file). `latest` names the
newest; the two newest are kept.

A sharded checkpoint (decpo.train --fsdp; save_sharded_checkpoint) holds instead
the files of torch.distributed.checkpoint (DCP): one `__R_0.distcp` per saving rank
with that rank's shards of the adapter weights and optimizer moments, and
`.metadata`, which maps every tensor to its pieces; DCP re-shards on load, so it
resumes on any number of ranks. state.json holds the rest as above, with the size
and SHA-256 of every DCP file. DCP's `.metadata` is a pickle: it is unpickled only
after its checksum matched, and then by an unpickler that admits only DCP's own
metadata classes and plain values (nothing else is ever imported or called), and
only tensor entries are accepted (DCP unpickles non-tensor entries without any
restriction). The tensor pieces are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist


def warn(message: str) -> None:
    print(f"decpo.train: warning: {message}", file=sys.stderr, flush=True)


CHECKPOINT_FORMAT = 1  # safetensors + JSON
SHARDED_FORMAT = 2  # torch.distributed.checkpoint files + JSON (save_sharded_checkpoint)
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
DCP_METADATA = ".metadata"
DCP_FILE = re.compile(r"\.metadata|__\d+_\d+\.distcp")
STEP_DIR = re.compile(r"step-(\d{7})")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, damaged or of another run."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, say); nothing of it is left behind."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss, parameter or optimizer state: the step is not saved."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's trainable parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)


def _all_ranks_agree(ok: bool) -> bool:
    """True when `ok` holds on every rank of the default process group (one all-reduce;
    just `ok` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def non_finite_tensor(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The name of a trainable parameter or optimizer state tensor holding NaN or Inf,
    or None when all are finite (one device sync). For a sharded model each rank checks
    its shards and the ranks agree (one all-reduce), so every rank stops together."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {id(p): n for n, p in named}
    sharded = is_sharded(model)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    named.append((f"optimizer {key} of {names.get(id(p), '?')}", value))
    bad = None
    if named:
        flags = torch.stack([torch.isfinite(_local(t).detach()).all().to("cpu") for _, t in named])
        if not bool(flags.all()):
            bad = named[int((~flags).nonzero()[0])][0]
    if sharded and not _all_ranks_agree(bad is None) and bad is None:
        return "a trainable shard held by another rank"
    return bad


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
    if is_sharded(model):
        raise ValueError("the model is sharded (FSDP2): save it with save_sharded_checkpoint")
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
        _write_state_and_publish(root, tmp, final, meta)  # state.json written last
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        (root / ".latest.tmp").unlink(missing_ok=True)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CheckpointWriteError(
            exc.errno or errno.EIO, f"could not write checkpoint {final}: {reason} ({exc})"
        ) from exc
    _prune(root, final, keep)
    return final


@dataclass
class _Checkpoint:
    step: int
    path: Path
    trainable: dict[str, torch.Tensor]  # empty for a sharded checkpoint (apply loads it)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_torch: torch.Tensor | None  # None for a sharded checkpoint (in its DCP files)
    rng_python: tuple
    sharded: bool = False


def _dcp_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What DCP saves and loads, as this rank's shards: {"model": trainable parameters,
    "optimizer": their optimizer state (tensors only)} by name, and the optimizer's
    param_groups (plain values, kept in state.json). Frozen base weights are left out."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    for name, entries in optim_state["state"].items():
        plain = [k for k, v in entries.items() if not isinstance(v, torch.Tensor)]
        if plain:  # DCP would pickle them, and unpickle them unrestricted on load
            raise ValueError(f"optimizer state {plain} of {name} is not a tensor")
    return {"model": model_state, "optimizer": optim_state["state"]}, optim_state["param_groups"]


def save_sharded_checkpoint(
    out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, keep: int = 2, run_identity: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Collective (every rank of the default process group calls it): write
    checkpoints/step-N of an FSDP2-sharded model with torch.distributed.checkpoint,
    each rank its own shards of the adapter weights and optimizer moments, into a
    temporary directory (on a file system every rank sees) that rank 0 completes with
    state.json (checksums of every file) and renames into place after a barrier,
    then `latest`, as save_checkpoint does. Raises on every rank: NonFiniteError
    (a NaN or Inf on any rank; nothing written), CheckpointWriteError (a write failed
    on any rank; the temporary directory is removed)."""
    import torch.distributed.checkpoint as dcp

    bad = non_finite_tensor(model, optimizer)  # the ranks agree
    if bad is not None:
        raise NonFiniteError(f"non-finite values in {bad} at step {step}; not saved")
    main = dist.get_rank() == 0
    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    failure: BaseException | None = None

    def failed() -> CheckpointWriteError:
        """The error every rank raises; rank 0 removes what was written."""
        if not main:
            return CheckpointWriteError(errno.EIO, f"could not write checkpoint {final} "
                                                   "(failed on another rank)")  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)
        (root / ".latest.tmp").unlink(missing_ok=True)
        number = getattr(failure, "errno", None)
        reason = os.strerror(number) if number else "failed on a rank"
        message = f"could not write checkpoint {final}: {reason} ({failure})"
        return CheckpointWriteError(number or errno.EIO, message)

    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            failure = exc
    if not _all_ranks_agree(failure is None):
        raise failed()
    state, groups = _dcp_state(model, optimizer)
    state["rng"] = {"torch": torch.get_rng_state()}
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    except Exception as exc:  # DCP raises on every rank when any rank's write failed
        failure = exc
    if not _all_ranks_agree(failure is None):
        raise failed() from failure
    if main:
        try:
            files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                     for f in sorted(tmp.iterdir())}  # fmt: skip
            version, internal, gauss = random.getstate()
            meta = {
                "format": SHARDED_FORMAT,
                "step": step,
                "ranks": dist.get_world_size(),
                "optimizer": {"param_groups": groups, "plain_state": {}},
                "scheduler": scheduler.state_dict(),
                "rng_python": [version, list(internal), gauss],
                "run": run_identity,
                "files": files,
            }
            _write_state_and_publish(root, tmp, final, meta)
        except OSError as exc:
            failure = exc
    if not _all_ranks_agree(failure is None):
        raise failed() from failure
    if main:
        _prune(root, final, keep)
    return final


def _write_state_and_publish(root: Path, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """state.json last into `tmp` (fsynced), `tmp` renamed to `final`, then `latest`
    replaced atomically. Re-saving a step moves the old directory aside first (never
    deleting it before the new one is in place), then drops it."""
    with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        aside = root / f".{final.name}.old"
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


def _prune(root: Path, final: Path, keep: int) -> None:
    older = sorted(p for p in root.glob("step-*") if p.name < final.name)
    for old in older[: max(0, len(older) - (keep - 1))]:  # keep the newest `keep`
        shutil.rmtree(old, ignore_errors=True)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata admitting only what DCP itself writes there: its
    metadata dataclasses, torch.Size, dtypes and layouts, and the checkpoint's path.
    Any other global (os.system, builtins.eval, ...) raises instead of being imported."""

    ALLOWED: ClassVar[dict[str, set[str]]] = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
            "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"PosixPath", "Path"},
    }  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def _read_dcp_metadata(path: Path) -> Any:
    """DCP's Metadata from `path`, restricted (see _MetadataUnpickler) and checked to
    hold tensors only; CheckpointError otherwise."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as exc:  # fmt: skip
        raise CheckpointError(f"{DCP_METADATA} refused ({exc})") from None
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if (
        not isinstance(metadata, Metadata)
        or not isinstance(entries, dict)
        or not isinstance(storage, dict)
    ):
        raise CheckpointError(f"{DCP_METADATA} is not DCP metadata")
    for key, entry in entries.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{DCP_METADATA}: {key} is not a tensor (never loaded)")
    return metadata


def _safe_reader(path: Path) -> Any:
    """A DCP FileSystemReader whose metadata goes through _read_dcp_metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            try:
                metadata = _read_dcp_metadata(path / DCP_METADATA)
            except CheckpointError as exc:  # changed since it was checked
                raise ValueError(f"{path}: {exc}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)


def _check_sharded(
    path: Path, meta: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Everything about a sharded checkpoint that can be checked without loading it,
    the same on every rank (no communication): its files (names, no links, sizes,
    SHA-256), DCP's metadata (restricted unpickling, tensors only), and that it holds
    this model's trainable parameters with their shapes and state for each of them."""
    files = meta["files"]
    if DCP_METADATA not in files:
        raise CheckpointError(f"{STATE_FILE} lists no {DCP_METADATA}")
    for name, expected in files.items():
        where = path / name
        if not DCP_FILE.fullmatch(name):
            raise CheckpointError(f"{STATE_FILE} lists {name!r}, not a DCP file name")
        if where.is_symlink():
            raise CheckpointError(f"{name} is a symbolic link (never followed)")
        if not where.is_file() or where.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{name} missing or truncated")
        if _sha256(where) != expected["sha256"]:
            raise CheckpointError(f"{name} does not match its checksum")
    metadata = _read_dcp_metadata(path / DCP_METADATA)
    entries = metadata.state_dict_metadata
    pieces = {getattr(info, "relative_path", None) for info in metadata.storage_data.values()}
    if not pieces <= set(files) - {DCP_METADATA}:
        raise CheckpointError(f"{DCP_METADATA} names files that {STATE_FILE} does not list")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k[len("model.") :]: v for k, v in entries.items() if k.startswith("model.")}
    if set(saved) != set(params):
        raise CheckpointError("its adapter parameters do not match the model's")
    for name, entry in saved.items():
        if tuple(entry.size) != tuple(params[name].shape):
            raise CheckpointError(f"{name} has shape {tuple(entry.size)}, the model's is "
                                  f"{tuple(params[name].shape)}")  # fmt: skip
    with_state = {k[len("optimizer.") :].rsplit(".", 1)[0] for k in entries
                  if k.startswith("optimizer.")}  # fmt: skip
    groups = meta["optimizer"]["param_groups"]
    listed = [name for g in groups for name in g["params"]]
    if len(groups) != len(optimizer.param_groups) or sorted(listed) != sorted(params):
        raise CheckpointError("its optimizer groups do not match the model's")
    if with_state and with_state != set(params):
        raise CheckpointError("its optimizer state does not match the model's")
    if "rng.torch" not in entries:
        raise CheckpointError(f"{DCP_METADATA} holds no RNG state")


def _apply_sharded(
    ckpt: _Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Collective: load a checked sharded checkpoint into this rank's shards (DCP
    reads the pieces each rank needs, whatever the number of ranks that saved it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state, _ = _dcp_state(model, optimizer)  # this run's layout, filled in place
    state["rng"] = {"torch": torch.get_rng_state()}
    dcp.load(state, storage_reader=_safe_reader(ckpt.path))
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g
              for g in ckpt.optimizer["param_groups"]]  # fmt: skip
    set_state_dict(
        model, optimizer, model_state_dict=state["model"],
        optim_state_dict={"state": state["optimizer"], "param_groups": groups},
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )  # fmt: skip
    torch.set_rng_state(state["rng"]["torch"])


def read_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    run_identity: dict[str, Any] | None = None,
) -> _Checkpoint:  # fmt: skip
    """Read and fully check one checkpoint directory without changing anything;
    CheckpointError says what is wrong with it. Tensors come from safetensors and
    the rest from JSON: nothing is unpickled (a state.pt is never read). A sharded
    checkpoint (for a sharded model only) is checked here and loaded by
    apply_checkpoint; its DCP metadata is unpickled restricted (see the module)."""
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
        if meta.get("format") not in (CHECKPOINT_FORMAT, SHARDED_FORMAT):
            raise CheckpointError(f"unknown checkpoint format {meta.get('format')!r}")
        if run_identity is not None and meta.get("run") not in (None, run_identity):
            raise CheckpointError("written by a run with another configuration")
        sharded = meta["format"] == SHARDED_FORMAT
        if sharded != is_sharded(model):
            raise CheckpointError("sharded (FSDP), the model is not" if sharded
                                  else "not sharded, the model is (FSDP)")  # fmt: skip
        if sharded:
            _check_sharded(path, meta, model, optimizer)
            version, internal, gauss = meta["rng_python"]
            return _Checkpoint(
                step=int(meta["step"]), path=path, trainable={}, optimizer=meta["optimizer"],
                scheduler=meta["scheduler"], rng_torch=None,
                rng_python=(version, tuple(internal), gauss), sharded=True,
            )  # fmt: skip
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
    """Restore a checkpoint read by read_checkpoint; returns its step. Collective (every
    rank calls it) for a sharded one."""
    if ckpt.sharded:
        _apply_sharded(ckpt, model, optimizer)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in ckpt.trainable.items():
                params[name].copy_(value)
        optimizer.load_state_dict(ckpt.optimizer)
        torch.set_rng_state(ckpt.rng_torch)
    scheduler.load_state_dict(ckpt.scheduler)
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
