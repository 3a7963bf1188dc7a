"""python -m decpo.train: a minimal native-PyTorch DPO / DecPO training loop with LoRA.

With no arguments it runs the demo: a tiny Llama built from a config (random init),
a BPE tokenizer trained on the demo corpus, synthetic preference pairs, LoRA, DecPO;
a few minutes on 2 CPU cores. See `python -m decpo.train --help`.

Reads top to bottom: the configuration (a dataclass whose fields are the flags),
the run directory, setup (distributed, model, data), the step (scores, loss,
penalty), outputs, optimizer and schedule, then the run: `run()` sets up the ranks
and `run_steps()` is the sequence of steps (claim the directory, build, start or
resume, train_loop, finish) and `train_loop` the loop itself. Checkpoints are in
decpo/checkpoint.py.
`torchrun --nproc_per_node K -m decpo.train ...` runs data-parallel: each rank takes
its share of every global batch and gradients are all-reduced before each update,
so K ranks with --batch-size b train and log exactly like one process with
--grad-accum K. With --fsdp the model is sharded instead of replicated (FSDP2:
each rank holds 1/K of every layer, gathered layer by layer as it runs, and
gradients are reduce-scattered), with the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
import torch.distributed as dist

import decpo
from decpo import data as data_lib
from decpo import models
from decpo.checkpoint import (
    NonFiniteError,
    apply_checkpoint,
    find_checkpoint,
    non_finite_tensor,
    save_checkpoint,
    save_sharded_checkpoint,
)
from decpo.hooks import DecorrelationHooks, feature_decorrelation
from decpo.integrations.hf import logit_transform
from decpo.losses import F_DIVERGENCE_TYPES, LOSS_TYPES, ld_logprobs, wpo_log_weights

# --loss names: "dpo" is TRL's "sigmoid"; "decpo" is the sigmoid loss plus the
# decorrelation penalty. Every other name is decpo.dpo_loss's (TRL 1.16's) loss_type.
LOSS_TYPE = {"dpo": "sigmoid", "decpo": "sigmoid", "sigmoid": "sigmoid",
             **{name: name for name in LOSS_TYPES if name != "sigmoid"}}  # fmt: skip
LOSSES = tuple(LOSS_TYPE)
TRL_LOSSES = tuple(name for name in LOSSES if name not in ("dpo", "decpo", "sigmoid", "ipo",
                                                            "hinge", "simpo", "sft"))  # fmt: skip
SMOOTHED_LOSSES = ("dpo", "decpo", "sigmoid", "simpo", "exo_pair", "robust", "aot", "aot_unpaired")
# --group-by-length sorts windows of this many global batches (HF's group_by_length
# uses megabatches of 50 batches too): wide enough to find pairs of similar length,
# narrow enough that the order stays random at the scale of an epoch.
LENGTH_WINDOW = 50
METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
               "rewards/margins", "logps/chosen", "logps/rejected", "dec/penalty",
               "dec/decorrelation")  # fmt: skip


# ---------------------------------------------------------------- configuration


class TrainError(SystemExit):
    """A user error or a stop: main() prints `decpo.train: error: <message>` (one line,
    no traceback) and the process exits with `status` (2 for bad flags or inputs)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


def warn(message: str) -> None:
    print(f"decpo.train: warning: {message}", file=sys.stderr, flush=True)


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A Config field: its default, its --help text and, for names, its choices."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class Config:
    """Every flag of python -m decpo.train; the field name is the flag (lr -> --lr).
    Values are checked when a Config is made (TrainError naming the flag); paths and
    devices are checked by check_environment."""

    model: str = option(
        "tiny", '"tiny" (demo model built from a config) or a local Hugging Face directory'
    )
    data: str | None = option(
        None,
        "JSONL or JSONL.GZ preference file (prompt/chosen/rejected "
        "strings, chat message lists, or Anthropic HH transcripts); "
        "default: synthetic demo pairs",
    )
    loss: str = option(
        "decpo",
        "loss, or comma-separated losses summed with --loss-weights: "
        + "|".join(LOSSES)
        + " (dpo = sigmoid; decpo = sigmoid + the "
        "decorrelation penalty)",
    )
    loss_weights: str | None = option(
        None, "comma-separated weights of the --loss list (default 1 each)"
    )
    beta: float = option(0.1, "DPO temperature beta (rewards are beta x log-ratio), > 0")
    label_smoothing: float = option(
        0.0,
        "label smoothing, in [0, 0.5), of the losses "
        + "|".join(SMOOTHED_LOSSES)
        + " (exo_pair needs > 0, e.g. 1e-3)",
    )
    simpo_gamma: float = option(0.5, "SimPO target margin gamma")
    discopop_tau: float = option(0.05, "DiscoPOP temperature tau, > 0")
    f_divergence_type: str = option(
        "reverse_kl", "f-divergence of the log-ratios (reverse_kl is DPO)", F_DIVERGENCE_TYPES
    )
    f_alpha_divergence_coef: float = option(0.5, "alpha of --f-divergence-type alpha_divergence")
    use_weighting: bool = option(
        False,
        "WPO: weight each pair by its policy's length-"
        "normalized probability (log sum p^2 aligned, from the "
        "log-prob pass)",
    )
    ld_alpha: float | None = option(
        None, "LD-DPO: weight, in [0, 1], of the response tokens past the shorter response's length"
    )
    dec_weight: float = option(
        0.1, "weight lambda of the decorrelation regularizer (--loss decpo or --dec-penalty), >= 0"
    )
    dec_penalty: bool = option(
        False,
        "add --dec-weight x the decorrelation penalty to any --loss (--loss decpo is dpo with it)",
    )
    dec_layers: str = option(
        "auto",
        'decoder layers to hook: "auto" (every layer of the tiny demo model; for --model DIR '
        "one layer at the paper code's depth, 10 of 32: decpo.models.default_dec_layers), "
        '"all", or indices like "2,3"',
    )
    dec_module: str = option(
        "mlp.up_proj", "module inside each decoder layer whose output is decorrelated"
    )
    dec_tokens: str = option(
        "last", "rows: last (last response token of each sequence) or all", ("last", "all")
    )
    lora_r: int = option(8, "LoRA rank")
    lora_targets: str = option(
        ",".join(models.DEFAULT_LORA_TARGETS), "comma-separated module names that get LoRA adapters"
    )
    lr: float | None = option(
        None, "peak learning rate (default 2e-3 for --model tiny, 5e-5 otherwise)"
    )
    weight_decay: float = option(0.0, "AdamW weight decay, >= 0")
    warmup_ratio: float = option(0.1, "fraction of the schedule spent in linear warmup, in [0, 1]")
    max_grad_norm: float = option(1.0, "gradient clipping norm, > 0 (inf: no clipping)")
    batch_size: int = option(8, "preference pairs per device per micro-batch")
    packing: bool = option(
        False,
        "pack each micro-batch's chosen and rejected sequences into rows no wider than "
        "its longest sequence, without padding between them (position ids restart per "
        "sequence and attention stays inside each sequence; same losses as padding)",
    )
    group_by_length: bool = option(
        False,
        f"order pairs so micro-batches hold similar lengths: every {LENGTH_WINDOW} global "
        "batches of the seeded permutation are sorted by length and their batches "
        "shuffled (less padding; same pairs per epoch)",
    )
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_length: int = option(
        128,
        "tokens per sequence (prompt cut from the left; pairs whose "
        "response cannot fit are skipped)",
    )
    max_steps: int = option(150, "optimizer steps to train to")
    schedule_steps: int | None = option(
        None,
        "length of the warmup + cosine learning-rate "
        "schedule, fixed when a run starts (default: "
        "--max-steps); after it the rate stays at 10% of its "
        "peak",
    )
    eval_every: int = option(50, "held-out evaluation every this many steps (and at the end)")
    eval_fraction: float = option(0.1, "fraction of the pairs held out for evaluation, in (0, 1)")
    save_every: int = option(50, "checkpoint every this many steps (and at the end)")
    demo_pairs: int = option(2000, "synthetic pairs generated for the demo task (without --data)")
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward to save memory"
    )
    precompute_ref: bool = option(
        False,
        "compute the reference log-probs of every pair once "
        "before training and reuse them (saves one forward per "
        "step)",
    )
    output_dir: str = option(
        "runs/demo", "where metrics, adapter, checkpoints and plots go (one run per directory)"
    )
    resume: str | None = option(
        None,
        "continue the run whose output directory is this, up to "
        "--max-steps (default: the run's own --max-steps)",
    )
    overwrite: bool = option(
        False,
        "start over in an --output-dir that holds another "
        "decpo.train run (its checkpoints and metrics are deleted)",
    )
    seed: int = option(
        0, "seed for the model, LoRA init and data order (not the split: --split-seed)"
    )
    split_seed: int = option(
        0,
        "seed of the held-out split by prompt (no eval prompt occurs in training) and of the "
        "synthetic demo pairs; independent of --seed, so runs with different --seed share one "
        "split",
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    fsdp: bool = option(
        False,
        "shard the model with FSDP2 (fully_shard per decoder layer, the LM head and the "
        "backbone) instead of replicating it (DDP); bf16 compute with fp32 gradient "
        "reduction on CUDA, fp32 on CPU; checkpoints are sharded "
        "(torch.distributed.checkpoint) and resume on any number of ranks",
    )

    def __post_init__(self) -> None:
        check_values(self)

    @property
    def losses(self) -> list[str]:
        """The --loss list."""
        return [name.strip() for name in self.loss.split(",")]

    @property
    def penalized(self) -> bool:
        """Whether dec_weight x the decorrelation penalty is part of the loss."""
        return self.dec_penalty or "decpo" in self.losses

    @property
    def needs_reference(self) -> bool:
        return any(name not in ("simpo", "sft") for name in self.losses)

    def loss_kwargs(self) -> dict[str, Any]:
        """decpo.dpo_loss's arguments for this configuration (all but the log-probs)."""
        losses = [LOSS_TYPE[name] for name in self.losses]
        weights = None
        if self.loss_weights is not None:
            weights = [float(w) for w in self.loss_weights.split(",")]
        return {"beta": self.beta, "loss_type": losses if len(losses) > 1 else losses[0],
                "loss_weights": weights, "label_smoothing": self.label_smoothing,
                "gamma": self.simpo_gamma, "discopop_tau": self.discopop_tau,
                "f_divergence_type": self.f_divergence_type,
                "f_alpha_divergence_coef": self.f_alpha_divergence_coef,
                "use_weighting": self.use_weighting}  # fmt: skip


# Fields that may change between the invocations of one run: they are not part of
# its identity (a run resumed to more steps or on another device is the same run).
VOLATILE_FIELDS = frozenset({"max_steps", "device", "resume", "output_dir", "overwrite"})
# decpo.dpo_loss argument -> the flag that sets it, for its error messages.
LOSS_FLAGS = {"loss_type": "loss", "gamma": "simpo_gamma"}


def check_values(cfg: Config) -> None:
    """Every flag that can be checked from its value alone; TrainError naming the flag."""

    def bad(name: str, why: str) -> TrainError:
        return TrainError(f"{flag(name)} {getattr(cfg, name)}: {why}")

    for name in ("batch_size", "grad_accum", "max_length", "max_steps", "lora_r", "eval_every",
                 "save_every"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise TrainError(f"{flag(name)} must be >= 1")
    if cfg.schedule_steps is not None and cfg.schedule_steps < 1:
        raise bad("schedule_steps", "must be >= 1")
    if cfg.data is None and cfg.demo_pairs < 2:
        raise bad("demo_pairs", "must be >= 2")
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and field.name != "max_grad_norm" and not math.isfinite(value):
            raise bad(field.name, "must be a finite number")
        choices = field.metadata.get("choices")
        if choices and value not in choices:
            raise bad(field.name, f"must be one of {'|'.join(choices)}")
    if math.isnan(cfg.max_grad_norm) or cfg.max_grad_norm <= 0:
        raise bad("max_grad_norm", "must be > 0 (inf: no clipping)")
    if cfg.beta <= 0:
        raise TrainError("--beta must be > 0")
    if cfg.lr is not None and cfg.lr <= 0:
        raise bad("lr", "must be > 0")
    for name in ("dec_weight", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise bad(name, "must be >= 0")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise bad("warmup_ratio", "must be in [0, 1]")
    if not 0 < cfg.eval_fraction < 1:
        raise bad("eval_fraction", "must be in (0, 1)")
    check_losses(cfg, bad)
    if cfg.dec_layers not in ("all", "auto"):
        try:
            indices = [int(x) for x in cfg.dec_layers.split(",")]
        except ValueError:
            raise bad("dec_layers", 'must be "auto", "all" or layer indices like 2,3') from None
        if len(set(indices)) != len(indices):
            raise bad("dec_layers", "lists a layer twice")
    if not cfg.dec_module.strip():
        raise TrainError("--dec-module must name a module")
    if any(not t.strip() for t in cfg.lora_targets.split(",")):
        raise bad("lora_targets", "must be comma-separated module names")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise bad("device", "must be auto, cpu, cuda or cuda:N")
    if not cfg.output_dir.strip():
        raise TrainError("--output-dir must name a directory (got an empty string)")


def check_losses(cfg: Config, bad: Any) -> None:
    """The --loss list and the loss options, checked by decpo.dpo_loss itself on a dummy
    batch so that decpo.train accepts exactly what the library does."""
    losses = cfg.losses
    unknown = [name for name in losses if name not in LOSS_TYPE]
    if unknown:
        raise bad("loss", f"unknown loss {unknown[0]!r} (choose from {'|'.join(LOSSES)})")
    if len(set(map(LOSS_TYPE.get, losses))) != len(losses):
        raise bad("loss", "lists a loss twice (dpo, decpo and sigmoid are the same loss)")
    if "simpo" in losses and len(losses) > 1:
        raise bad("loss", "simpo scores length-averaged log-probs and cannot be combined")
    if cfg.loss_weights is not None:
        try:
            weights = [float(w) for w in cfg.loss_weights.split(",")]
        except ValueError:
            raise bad("loss_weights", "must be comma-separated numbers") from None
        if len(weights) != len(losses):
            raise bad("loss_weights", f"has {len(weights)} weights for {len(losses)} losses")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise bad("label_smoothing", "must be in [0, 0.5) (0.5 makes the loss ignore the labels)")
    if cfg.label_smoothing and not set(losses) & set(SMOOTHED_LOSSES):
        raise bad("label_smoothing", f"applies to --loss {'|'.join(SMOOTHED_LOSSES)} only")
    if cfg.ld_alpha is not None:
        if not 0 <= cfg.ld_alpha <= 1:
            raise bad("ld_alpha", "must be in [0, 1] (1 is DPO)")
        if "simpo" in losses:
            raise bad("ld_alpha", "applies to summed log-probs; --loss simpo averages them")
    zeros = torch.zeros(2, dtype=torch.float64)
    try:
        decpo.dpo_loss(zeros, zeros, zeros, zeros, chosen_lengths=zeros + 1,
                       rejected_lengths=zeros + 1, chosen_wpo_logps=zeros,
                       rejected_wpo_logps=zeros, **cfg.loss_kwargs())  # fmt: skip
    except (ValueError, TypeError) as exc:
        text = str(exc)
        argument = re.match(r"\w*", text).group()  # dpo_loss's messages start with it
        name = LOSS_FLAGS.get(argument, argument)
        if name and hasattr(cfg, name):
            raise bad(name, text[len(argument) :].lstrip(" =")) from None
        raise TrainError(f"--loss {cfg.loss}: {text}") from None


def check_environment(cfg: Config) -> None:
    """The flags that name files or devices of this machine."""
    if cfg.model != "tiny" and not (Path(cfg.model) / "config.json").is_file():
        raise TrainError(f'--model {cfg.model}: must be "tiny" or a local Hugging Face model '
                         "directory (no config.json there)")  # fmt: skip
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise TrainError(f"--data {cfg.data}: no such file")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {cfg.device}: CUDA is not available on this machine")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line instead of usage + message
        raise TrainError(f"{message} (see python -m decpo.train --help)")


def build_parser() -> argparse.ArgumentParser:
    """argparse from Config: one flag per field, typed by the field's annotation."""
    parser = _Parser(
        prog="python -m decpo.train",
        description="DPO / DecPO training with LoRA. No arguments: the built-in demo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    types = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        kind = types[field.name]
        help_text = field.metadata["help"].replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag(field.name), action="store_true", help=help_text)
            continue
        (value_type,) = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
        parser.add_argument(flag(field.name), type=value_type, default=field.default,
                            choices=field.metadata["choices"], help=help_text)  # fmt: skip
    return parser


def _explicit_flags(argv: list[str] | None) -> set[str]:
    """Config fields given on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def config_from_json(saved: dict[str, Any]) -> Config:
    """A Config from a run's config.json (keys of other versions are ignored); TrainError
    when its values are not valid."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in names})


def identity(cfg: Config) -> dict[str, Any]:
    """The fields that define a run: equal identities are the same run."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in VOLATILE_FIELDS}


def read_run_config(run: Path) -> Config:
    path = run / "config.json"
    if not path.is_file():
        raise TrainError(f"--resume {run}: not a decpo.train run directory (no config.json)")
    try:
        return config_from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise TrainError(f"--resume {run}: its config.json cannot be read ({exc})") from None
    except TrainError as exc:
        raise TrainError(f"--resume {run}: its config.json is not valid here ({exc})") from None


def load_config(argv: list[str] | None = None) -> Config:
    """The configuration of this invocation, validated. With --resume it is the saved
    configuration of that run (validated again); only --max-steps and --device may be
    given anew."""
    cfg = Config(**vars(build_parser().parse_args(argv)))
    if cfg.resume is not None:
        explicit = _explicit_flags(argv)
        run = Path(cfg.resume)
        if "output_dir" in explicit and Path(cfg.output_dir).resolve() != run.resolve():
            raise TrainError(f"--output-dir {cfg.output_dir} differs from --resume {run}")
        saved = read_run_config(run)
        for name in sorted(explicit - VOLATILE_FIELDS):
            if getattr(cfg, name) != getattr(saved, name):
                raise TrainError(
                    f"{flag(name)} {getattr(cfg, name)}: --resume {run} continues the run's "
                    f"saved configuration ({getattr(saved, name)}); start a new run to change it"
                )
        max_steps = cfg.max_steps if "max_steps" in explicit else saved.max_steps
        cfg = dataclasses.replace(saved, max_steps=max_steps, device=cfg.device, resume=str(run),
                                  output_dir=str(run), overwrite=False)  # fmt: skip
    check_environment(cfg)
    if cfg.model != "tiny":  # saved absolute, so the run's model is found from anywhere
        cfg.model = str(Path(cfg.model).resolve())
    return cfg


# ---------------------------------------------------------------- the run directory

LOCK_NAME = ".decpo.lock"
# What decpo.train writes into a run directory; --overwrite deletes exactly these.
RUN_OUTPUTS = ("checkpoints", "base_model", "metrics.jsonl", "eval_before.json", "summary.json",
               "config.json", "training_curves.png", "adapter_config.json",
               "adapter_model.safetensors", "README.md")  # fmt: skip


def claim_output_dir(cfg: Config) -> str:
    """Whom --output-dir belongs to, decided before anything is written: "new" (absent
    or empty), "continue" (a run of this same configuration, or --resume), or
    "overwrite" (another decpo.train run, with --overwrite). Anything else is refused:
    the current directory, the model's directory, a non-empty directory that is not a
    run of this configuration."""
    out = Path(cfg.output_dir)
    here = out.resolve()
    if here == Path.cwd().resolve():
        raise TrainError(f"--output-dir {cfg.output_dir!r} is the current directory; name a "
                         "directory of its own for the run")  # fmt: skip
    if cfg.model != "tiny" and here == Path(cfg.model).resolve():
        raise TrainError(f"--output-dir {cfg.output_dir} is the --model directory; the run "
                         "would overwrite the model's files")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise TrainError(f"--output-dir {cfg.output_dir} exists and is not a directory")
    if cfg.resume is not None:
        return "continue"
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if not entries:
        return "new"
    if not (out / "config.json").is_file():
        raise TrainError(
            f"--output-dir {cfg.output_dir} is not empty and holds no decpo.train run "
            f"({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); choose a new "
            "or empty directory"
        )
    if cfg.overwrite:
        return "overwrite"
    try:
        saved = config_from_json(json.loads((out / "config.json").read_text(encoding="utf-8")))
    except (ValueError, TypeError):
        saved = None
    if saved is not None:
        mine, theirs = identity(cfg), identity(saved)
        if cfg.schedule_steps is None:  # the run's default, fixed when it started
            mine["schedule_steps"] = theirs["schedule_steps"]
        if mine == theirs:
            return "continue"
        differ = [k for k in mine if mine[k] != theirs.get(k)]
        name = differ[0]
        flag = "--" + name.replace("_", "-")
        why = f"a run with another configuration ({flag} {theirs.get(name)}, here {mine[name]})"
    else:
        why = "a run whose config.json cannot be read"
    raise TrainError(
        f"--output-dir {cfg.output_dir} holds {why}; continue it with --resume "
        f"{cfg.output_dir}, start over with --overwrite, or choose another --output-dir"
    )


def lock_output_dir(out: Path) -> IO[str]:
    """An exclusive lock on out/.decpo.lock, held until the returned file is closed
    (the kernel drops it when the process dies, so a killed run leaves no stale lock)."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_NAME, "a+")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise TrainError(
            f"--output-dir {out} is in use by another decpo.train run ({holder}); wait for it "
            "to finish or choose another --output-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


@contextlib.contextmanager
def run_lock(cfg: Config, dd: Dist, mode: str) -> Iterator[None]:
    """Rank 0 holds the directory's lock for the run, after checking that the directory
    is still what claim_output_dir found; every rank waits for it."""
    lock = None
    if dd.main:
        lock = lock_output_dir(Path(cfg.output_dir))
        if claim_output_dir(cfg) != mode:  # another run got here first and finished
            lock.close()
            raise TrainError(f"--output-dir {cfg.output_dir} changed while this run started; "
                             "try again")  # fmt: skip
    try:
        barrier(dd)
        yield
    finally:
        if lock is not None:
            lock.close()


def clear_run(out: Path) -> None:
    """--overwrite: delete what an earlier decpo.train run wrote here."""
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl; a damaged line (a crash mid-write) is dropped with a warning."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no integer step")
        except ValueError:
            if line.strip():
                warn(f"{path}:{number}: damaged metrics line dropped")
            continue
        rows.append(row)
    return rows


# ---------------------------------------------------------------- setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False  # the model is sharded (FSDP2); gradients are reduced by FSDP
    owns_group: bool = False  # this run created the process group and destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str, fsdp: bool = False) -> Dist:
    """The ranks of this run (torchrun's environment) and their device. FSDP needs a
    process group even on one rank: a single-process one is made for it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1 and not fsdp:
        return Dist(device=torch.device(device))
    if device.startswith("cuda"):
        index = local if world > 1 else torch.device(device).index or 0
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if world == 1 and "MASTER_ADDR" not in os.environ:  # python -m decpo.train --fsdp
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    return Dist(rank, world, dev, fsdp=fsdp, owns_group=True)


def barrier(dd: Dist) -> None:
    if dd.world > 1:
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_model(
    cfg: Config, out: Path, device: torch.device, reuse_base: bool = True, shard: bool = False
) -> tuple[torch.nn.Module, Any]:
    """Policy with LoRA adapters, and its tokenizer. The tiny demo model's base weights
    and tokenizer are saved under out/ so the adapter can be reloaded later; a run
    that continues (reuse_base) loads them back. With `shard` (--fsdp) the model is
    sharded over the process group's ranks (models.shard_model); every rank loads the
    whole model into CPU memory first. Bad --model, --lora-targets raise TrainError."""
    try:
        if cfg.model == "tiny":
            base_dir = out / "base_model"
            if reuse_base and (base_dir / "config.json").is_file():  # the same base weights
                model, tokenizer = models.load_pretrained(base_dir, torch.float32)
            else:
                tokenizer = models.build_tokenizer(data_lib.demo_corpus())
                model = models.build_tiny_model(tokenizer, cfg.seed)
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            model, tokenizer = models.load_pretrained(cfg.model, dtype)
    except (OSError, ValueError) as exc:
        raise TrainError(f"--model {cfg.model}: cannot be loaded ({exc})") from None
    if cfg.gradient_checkpointing:
        models.enable_checkpointing(model)
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    try:
        model = models.add_lora(model, cfg.lora_r, None, cfg.lora_targets.split(","))
    except ValueError as exc:
        raise TrainError(f"--lora-targets {cfg.lora_targets}: {exc}") from None
    if not shard:
        return model.to(device), tokenizer
    try:
        return models.shard_model(model, device), tokenizer
    except ValueError as exc:
        raise TrainError(f"--fsdp: {exc}") from None


def hooked_layers(cfg: Config, model: torch.nn.Module) -> list[int] | None:
    """--dec-layers as indices, checked with --dec-module against the model."""
    n_layers = len(models.decoder_layers(model))
    if cfg.dec_layers == "auto":
        layers = None if cfg.model == "tiny" else models.default_dec_layers(n_layers)
    else:
        layers = None if cfg.dec_layers == "all" else [int(x) for x in cfg.dec_layers.split(",")]
    if layers is not None and any(not 0 <= i < n_layers for i in layers):
        raise TrainError(f"--dec-layers {cfg.dec_layers}: the model has {n_layers} decoder "
                         f"layers (0 to {n_layers - 1})")  # fmt: skip
    try:
        DecorrelationHooks(model, cfg.dec_module, layers)  # resolves the modules, hooks nothing
    except ValueError as exc:
        raise TrainError(f"--dec-module {cfg.dec_module}: {exc}") from None
    return layers


def load_data(cfg: Config, tokenizer: Any) -> tuple[list, list, int]:
    """(train pairs, eval pairs, pairs skipped by truncation), tokenized; the eval
    split holds out whole prompts, about eval_fraction of the pairs, seeded by
    --split-seed (data_lib.split_by_prompt)."""
    if cfg.data is None:
        pairs = data_lib.synthetic_pairs(cfg.demo_pairs, cfg.split_seed)
    else:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", data_lib.DataWarning)
                pairs = data_lib.read_pairs(cfg.data, tokenizer)
        except (data_lib.DataFormatError, OSError) as exc:
            raise TrainError(f"--data: {exc}") from None
        for w in caught:
            if issubclass(w.category, data_lib.DataWarning):
                warn(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        train_pairs, eval_pairs = data_lib.split_by_prompt(pairs, cfg.eval_fraction, cfg.split_seed)
    except ValueError as exc:
        raise TrainError(f"--data: {exc}") from None
    train_set, skipped = data_lib.tokenize_pairs(train_pairs, tokenizer, cfg.max_length)
    eval_set, eval_skipped = data_lib.tokenize_pairs(eval_pairs, tokenizer, cfg.max_length)
    if not train_set or not eval_set:
        raise TrainError(f"{len(train_set)} training and {len(eval_set)} held-out pairs fit "
                         f"--max-length {cfg.max_length}; both need at least 1")  # fmt: skip
    return train_set, eval_set, skipped + eval_skipped


def micro_batches(train_set: list, cfg: Config, world: int, rank: int, step: int) -> list[list]:
    """This rank's micro-batches of optimizer step `step` (0-based). Every step takes
    the next world * grad_accum * batch_size pairs of a seeded per-epoch permutation;
    micro-batch u = accum_index * world + rank, so K ranks see what one process with
    --grad-accum K sees. With --group-by-length the permutation is first rearranged
    (data.group_by_length, windows of LENGTH_WINDOW global batches, longest pair
    first inside each global batch) as a function of the seed and epoch only, so
    every rank computes the same order and the equivalence holds."""
    per_step = world * cfg.grad_accum * cfg.batch_size
    steps_per_epoch = len(train_set) // per_step
    if steps_per_epoch == 0:
        raise TrainError(
            f"{len(train_set)} training pairs cannot fill one global batch of {per_step} "
            "(ranks x --grad-accum x --batch-size)"
        )
    epoch, index = divmod(step, steps_per_epoch)
    order = list(range(len(train_set)))
    random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
    if cfg.group_by_length:
        # The padded width of a micro-batch is its longest sequence: sort by that.
        lengths = [max(len(p.chosen_ids), len(p.rejected_ids)) for p in train_set]
        rng = random.Random((cfg.seed * 1_000_003 + epoch) * 2 + 1)
        order = data_lib.group_by_length(order[: steps_per_epoch * per_step], lengths, per_step,
                                         LENGTH_WINDOW, rng)  # fmt: skip
    chunk = order[index * per_step : (index + 1) * per_step]
    out = []
    for accum in range(cfg.grad_accum):
        u = accum * world + rank
        out.append([train_set[i] for i in chunk[u * cfg.batch_size : (u + 1) * cfg.batch_size]])
    return out


# ---------------------------------------------------------------- the step


class Scores(NamedTuple):
    """Per-sequence log-probs of a micro-batch of B pairs, (2B,) each: chosen rows
    first, then rejected."""

    total: torch.Tensor  # sum over the response tokens
    loss_input: torch.Tensor  # what the loss scores: the sum, the mean (simpo), or LD-DPO's
    lengths: torch.Tensor  # response tokens
    wpo: torch.Tensor | None  # WPO log-weights (--use-weighting), detached


def lm_head_weights(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight and bias as plain tensors. Under --fsdp the head is a
    sharded DTensor outside its unit's forward (score_sequences reads it directly):
    it is all-gathered, V x D parameters per scoring pass, held until its backward.
    For a 70B Llama 3 that is 128256 x 8192 x 2 bytes = 2.1 GB against ~140 GB of
    layer all-gathers per forward (1.5% more traffic). Scoring shard-aware (a
    vocabulary-parallel log-softmax) would instead all-gather every rank's hidden
    states, ranks x tokens x D: cheaper only while the ranks together score fewer
    tokens than V, and it needs a vocabulary-parallel token_logprobs."""
    return models.full_parameter(head.weight), models.full_parameter(head.bias)


def collate_pairs(pairs: list, cfg: Config, pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch as tensors: padded rows (data.collate), or with --packing the
    sequences packed into rows no wider than its longest sequence (data.collate_packed:
    never more work than padding, also for attention without a varlen kernel)."""
    if cfg.packing:
        return data_lib.collate_packed(pairs, pad_id)
    return data_lib.collate(pairs, pad_id)


def check_packing(model: torch.nn.Module) -> None:
    """TrainError unless the model keeps packed sequences apart.

    --packing passes position_ids that restart at 0 for every sequence and no
    attention_mask. transformers (masking_utils.find_packed_sequence_indices) reads
    such position_ids as packed sequences and builds a block-diagonal causal mask for
    the sdpa, eager and flex attention backends, and its flash-attention path derives
    the varlen sequence boundaries from them; no extra dependency and one code path on
    every device. Architectures that do not build their mask this way (OPT and Falcon
    attend across the row; BLOOM and MPT take no position_ids) would silently mix the
    sequences, so this runs the backbone on two probe sequences packed into one row,
    with two different first sequences, and alone: the second sequence's hidden states
    must not depend on the first and must equal those of the sequence alone (relative
    difference <= 1e-3 in fp32, 3e-2 in 16-bit formats; a leak is of order 0.1-1)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    name = type(base).__name__
    if "position_ids" not in inspect.signature(backbone.forward).parameters:
        raise TrainError(f"--packing: {name} takes no position_ids, so packed sequences "
                         "cannot be kept apart; train without --packing")  # fmt: skip
    vocab = base.get_input_embeddings().weight.shape[0]
    device = base.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(0, vocab, (n,), generator=generator)
                            for n in (6, 6, 9))  # fmt: skip
    positions = torch.cat([torch.arange(6), torch.arange(9)])[None].to(device)  # (1, 15)

    def hidden(ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        extra = {} if position_ids is None else {"position_ids": position_ids}
        out = backbone(input_ids=ids[None].to(device), use_cache=False, **extra)
        return out.last_hidden_state[0, -9:].float()  # (9, D): the second sequence

    was_training = model.training
    model.eval()  # no dropout
    try:
        with torch.no_grad():
            packed = hidden(torch.cat([first, second]), positions)
            packed_other = hidden(torch.cat([other, second]), positions)
            alone = hidden(second, None)
    finally:
        model.train(was_training)
    scale = alone.norm().clamp_min(1e-12)
    leak = ((packed - packed_other).norm() / scale).item()
    error = ((packed - alone).norm() / scale).item()
    half = next(base.parameters()).dtype in (torch.float16, torch.bfloat16)
    tolerance = 3e-2 if half else 1e-3
    if leak > tolerance or error > tolerance:
        raise TrainError(
            f"--packing: {name} ({base.config._attn_implementation} attention) does not keep "
            f"packed sequences apart (a sequence's hidden states change by {error:.2g} "
            "relative when another precedes it in the row); train without --packing"
        )


def score_sequences(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: Config, device: torch.device,
    wpo: bool = False,
) -> Scores:  # fmt: skip
    """Response log-probs per sequence from the final hidden states and the LM head with
    decpo.token_logprobs (no logits); with `wpo`, WPO's log-weights from the same pass.

    A packed batch (data.collate_packed: position_ids, no attention_mask) is scored
    as packed rows, then its token log-probs are gathered into the padded layout
    (2B, L - 1) with the batch's unpack index: the per-sequence sums, LD-DPO and WPO
    then see exactly the tokens of the padded batch (the gather moves 2B x L scalars;
    no padding goes through the model or the head)."""
    base = model.get_base_model()
    backbone = getattr(base, base.base_model_prefix)  # LlamaModel, GPT2Model, ...
    head = base.get_output_embeddings()
    packed = "unpack" in batch
    if packed:  # transformers confines attention to each sequence (see check_packing)
        inputs = {"position_ids": batch["position_ids"], "use_cache": False}
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = backbone(input_ids=batch["input_ids"], **inputs).last_hidden_state  # (R, T, D)
    weight, bias = lm_head_weights(head)
    targets = batch["labels"][:, 1:]  # (R, T - 1): token t + 1 is predicted at position t
    hidden = hidden[:, :-1]  # (R, T - 1, D)
    if hidden.dtype != weight.dtype:
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    softcap, logit_scale = logit_transform(base)  # Gemma's softcap, Cohere/Granite scales
    out = decpo.token_logprobs(hidden, weight, targets, bias=bias, softcap=softcap,
                               logit_scale=logit_scale, return_stats=wpo)  # fmt: skip
    logp, stats = out if wpo else (out, None)  # (R, T - 1)
    mask = targets != data_lib.IGNORE_INDEX  # (R, T - 1)
    log_sum_p2 = None if stats is None else stats.log_sum_p2
    if packed:
        # Per token instead of per prediction: column c holds the log-prob of token c
        # (column 0 predicts nothing). Gathering the sequences' tokens 1.. gives what
        # the padded batch holds at positions 0.. (token p + 1 predicted at p).
        unpack = batch["unpack"][:, 1:]  # (2B, L - 1)
        logp = data_lib.unpack_tokens(torch.nn.functional.pad(logp, (1, 0)), unpack)
        mask = data_lib.unpack_tokens(torch.nn.functional.pad(mask, (1, 0)), unpack, False)
        if log_sum_p2 is not None:
            log_sum_p2 = data_lib.unpack_tokens(torch.nn.functional.pad(log_sum_p2, (1, 0)),
                                                unpack)  # fmt: skip
    per_sequence = decpo.sequence_logprobs(logp, mask)
    loss_input = per_sequence.mean if cfg.losses == ["simpo"] else per_sequence.sum
    if cfg.ld_alpha is not None:
        n = logp.shape[0] // 2
        chosen, rejected = ld_logprobs(logp[:n], mask[:n], logp[n:], mask[n:],
                                             cfg.ld_alpha)  # fmt: skip
        loss_input = torch.cat([chosen, rejected])
    weights = None if log_sum_p2 is None else wpo_log_weights(logp, log_sum_p2, mask)
    return Scores(per_sequence.sum, loss_input, per_sequence.count, weights)


@torch.no_grad()
def reference_scores(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: Config, device: torch.device
) -> torch.Tensor:
    """What the loss scores (2B,) for the reference: the policy with adapters disabled."""
    with models.adapters_disabled(model):
        return score_sequences(model, batch, cfg, device).loss_input


def precompute_reference(
    model: torch.nn.Module, pairs: list, cfg: Config, pad_id: int, device: torch.device
) -> None:
    """Fill every pair's ref_logps once (batched like training)."""
    for start in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[start : start + cfg.batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, cfg, pad_id).items()}
        ref = reference_scores(model, batch, cfg, device).double().cpu().tolist()
        n = len(chunk)
        for k, pair in enumerate(chunk):
            pair.ref_logps = (ref[k], ref[n + k])


def forward_pair_batch(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: Config,
    hooks: DecorrelationHooks, device: torch.device, train: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Loss and metrics (sums over pairs) of one micro-batch of B pairs: the preference
    loss (decpo.dpo_loss) plus dec_weight x the decorrelation penalty when penalized."""
    completion = batch["labels"] != data_lib.IGNORE_INDEX  # (2B, T), or (R, T) packed
    with hooks.capture(force=not train):
        policy = score_sequences(model, batch, cfg, device, wpo=cfg.use_weighting)
    if not cfg.needs_reference:
        ref = None
    elif "ref_logps" in batch:  # precomputed once (--precompute-ref)
        ref = batch["ref_logps"].to(policy.loss_input.dtype)
    else:
        ref = reference_scores(model, batch, cfg, device)
    n = policy.total.shape[0] // 2
    wpo = {} if policy.wpo is None else {"chosen_wpo_logps": policy.wpo[:n],
                                         "rejected_wpo_logps": policy.wpo[n:]}  # fmt: skip
    losses, chosen_rewards, rejected_rewards = decpo.dpo_loss(
        policy.loss_input[:n], policy.loss_input[n:],
        None if ref is None else ref[:n], None if ref is None else ref[n:],
        chosen_lengths=policy.lengths[:n], rejected_lengths=policy.lengths[n:],
        **wpo, **cfg.loss_kwargs(),
    )  # fmt: skip
    sequence_ids = batch.get("sequence_ids")  # packed rows: the rows of each sequence
    hidden, segment_ids = hooks.rows(completion, cfg.dec_tokens, sequence_ids)
    if cfg.penalized and train:
        # Through the hooks: also differentiable under reentrant gradient checkpointing.
        penalty = hooks.penalty(completion, cfg.dec_tokens, sequence_ids=sequence_ids)
    else:
        with torch.no_grad():
            penalty = decpo.decorrelation_penalty(hidden.detach(), segment_ids=segment_ids)
    loss = losses.mean()
    if cfg.penalized:  # preference loss + lambda x penalty, for every loss type
        loss = loss + cfg.dec_weight * penalty
    metrics = {
        "loss": loss.detach() * n,
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": policy.total[:n].detach().sum(),
        "logps/rejected": policy.total[n:].detach().sum(),
        "dec/penalty": penalty.detach() * n,
        "dec/decorrelation": feature_decorrelation(hidden, segment_ids) * n,
        "count": torch.tensor(float(n)),
    }
    return loss, {k: v.float().cpu() for k, v in metrics.items()}


def reduce_metrics(sums: dict[str, torch.Tensor], dd: Dist) -> dict[str, float]:
    """Global means over all pairs of all ranks."""
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys]).to(torch.float64)
    if dd.world > 1:
        packed = packed.to(dd.device)
        dist.all_reduce(packed)
    values = dict(zip(keys, packed.cpu().tolist(), strict=True))
    count = values.pop("count")
    return {k: values[k] / count for k in METRIC_KEYS}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, eval_set: list, cfg: Config, hooks: DecorrelationHooks,
    pad_id: int, dd: Dist,
) -> dict[str, float]:  # fmt: skip
    """Held-out metrics (every rank evaluates the whole split; no communication)."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, len(eval_set), cfg.batch_size):
        batch = collate_pairs(eval_set[start : start + cfg.batch_size], cfg, pad_id)
        batch = {k: v.to(dd.device) for k, v in batch.items()}
        _, metrics = forward_pair_batch(model, batch, cfg, hooks, dd.device, train=False)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0) + v
    model.train()
    return reduce_metrics(sums, Dist(device=dd.device))


# ---------------------------------------------------------------- outputs


def export_adapter(
    out: Path, model: torch.nn.Module, tokenizer: Any, cfg: Config, dd: Dist
) -> None:
    """Rank 0 saves the adapter (save_adapter). Under --fsdp this is collective: the
    sharded weights are first gathered to full tensors on rank 0 (CPU), so the adapter
    is the same single-file peft adapter as without sharding; the frozen base is
    gathered too for the demo model only (its base_model/ is saved with it)."""
    state = None
    if dd.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=cfg.model != "tiny")  # fmt: skip
        state = get_model_state_dict(model, options=options)
    if dd.main:
        save_adapter(out, model, tokenizer, cfg, state)


def save_adapter(
    out: Path, model: torch.nn.Module, tokenizer: Any, cfg: Config,
    state: dict[str, torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """The adapter (adapter_config.json, adapter_model.safetensors) and tokenizer in
    `out`, and for the demo model its base weights; `state`: the model's full state
    dict when its parameters are sharded."""
    model.save_pretrained(out, state_dict=state)
    tokenizer.save_pretrained(out)
    if cfg.model == "tiny" and not (out / "base_model" / "config.json").is_file():
        _save_tiny_base(model.get_base_model(), tokenizer, out / "base_model", state)


def _save_tiny_base(
    base: torch.nn.Module, tokenizer: Any, where: Path, state: dict[str, torch.Tensor] | None
) -> None:
    """Base weights of the demo model (without LoRA layers) for reloading the adapter;
    `state`: the peft model's full state dict when the parameters are sharded."""
    from peft.tuners.lora import LoraLayer

    if state is None:
        state = base.state_dict()
    else:  # keys of the peft wrapper: base_model.model.<the base model's keys>
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    state = {
        k: v for k, v in state.items() if "lora_" not in k
    }  # peft's injected layers keep the base weight under base_layer
    clean = {k.replace(".base_layer", ""): v for k, v in state.items()}
    fresh = type(base)(base.config)
    fresh.load_state_dict(clean)
    assert not any(isinstance(m, LoraLayer) for m in fresh.modules())
    fresh.save_pretrained(where)
    tokenizer.save_pretrained(where)


def plot_curves(out: Path) -> Path | None:
    rows = read_metrics(out)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    before = out / "eval_before.json"
    try:  # the held-out metrics at step 0, before training
        start = json.loads(before.read_text()) if before.is_file() else None
    except ValueError:
        start = None
    if isinstance(start, dict):
        evals = [{"step": 0} | {"eval/" + k: v for k, v in start.items()}, *evals]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", "loss"),
        ("rewards/accuracies", "reward accuracy"),
        ("rewards/margins", "reward margin"),
        ("dec/decorrelation", "decorrelation"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train", lw=1)
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval/" + key] for r in evals], "o-",
                    label="held-out")  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- optimizer and schedule


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine to 10% of the peak at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    cfg: Config, model: torch.nn.Module, out: Path, mode: str
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable (LoRA) parameters and its schedule. The schedule's
    length is fixed when the run starts and saved in config.json."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if cfg.lr is not None else (2e-3 if cfg.model == "tiny" else 5e-5)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.schedule_steps is None and mode == "continue" and (out / "config.json").is_file():
        cfg.schedule_steps = read_run_config(out).schedule_steps
    if cfg.schedule_steps is None:
        cfg.schedule_steps = cfg.max_steps
    warmup = max(1, int(cfg.warmup_ratio * cfg.schedule_steps))
    factor = functools.partial(lr_factor, warmup=warmup, total=cfg.schedule_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def all_reduce_gradients(params: list[torch.nn.Parameter], dd: Dist) -> None:
    """Data parallel: average the gradients over ranks, in one flat all-reduce. Under
    --fsdp there is nothing to do: FSDP reduce-scatters (averages) each unit's
    gradients in the backward, and each rank updates its own shard."""
    if dd.world == 1 or dd.fsdp:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dd.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ---------------------------------------------------------------- the run


@dataclass
class Saver:
    """Saves checkpoints of the run (rank 0 writes) and remembers the last good one."""

    out: Path
    dd: Dist
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    run_identity: dict[str, Any]
    last_good: Path | None = None  # the newest checkpoint known to be intact and finite

    def save(self, step: int) -> None:
        """Rank 0 writes the checkpoint; under --fsdp every rank writes its shards
        (torch.distributed.checkpoint) and rank 0 completes it."""
        if self.dd.fsdp:
            self.last_good = save_sharded_checkpoint(
                self.out, step, self.model, self.optimizer, self.scheduler,
                run_identity=self.run_identity,
            )  # fmt: skip
        elif self.dd.main:
            self.last_good = save_checkpoint(
                self.out, step, self.model, self.optimizer, self.scheduler,
                run_identity=self.run_identity,
            )  # fmt: skip

    def has(self, step: int) -> bool:
        return self.last_good is not None and self.last_good.name == f"step-{step:07d}"

    def describe(self) -> str:
        if self.last_good is None:
            return "no checkpoint has been saved yet"
        return f"the last good checkpoint is {self.last_good} (step {int(self.last_good.name[5:])})"


def start_or_resume(cfg: Config, mode: str, saver: Saver, tokenizer: Any) -> int:
    """Restore the newest usable checkpoint of a continued run (its step is returned;
    0 for a new run) and write the run's files: config.json, an emptied or truncated
    metrics.jsonl and, at step 0, the base model and tokenizer."""
    out, dd = saver.out, saver.dd
    step = 0
    if mode == "continue":
        ckpt, skipped = find_checkpoint(out, saver.model, saver.optimizer, saver.run_identity)
        if ckpt is not None:
            step = apply_checkpoint(ckpt, saver.model, saver.optimizer, saver.scheduler)
            saver.last_good = ckpt.path
            if skipped and dd.main:
                warn(f"{out}: skipped {'; '.join(skipped)}; resuming from {ckpt.path.name}")
        elif any((out / "checkpoints").glob("step-*")):
            # Checkpoints exist but none is usable (damaged, an older format, another
            # run's): restarting would discard the run's progress, so stop instead.
            raise TrainError(
                f"{out}: no usable checkpoint (skipped {'; '.join(skipped)}); nothing "
                "was changed. Start over with --overwrite or choose another --output-dir"
            )
        elif dd.main:
            why = f" (skipped {'; '.join(skipped)})" if skipped else ""
            warn(f"{out}: no checkpoint saved yet{why}; starting the run from step 0")
        if dd.main and cfg.resume is None:
            print(f"decpo.train: {out} holds this run (same configuration); continuing from "
                  f"step {step} (--overwrite starts over)")  # fmt: skip
    if dd.main:
        if mode == "overwrite":
            clear_run(out)
        if mode == "continue":  # drop metrics logged after the checkpoint: they are redone
            kept = [row for row in read_metrics(out) if row["step"] <= step]
            write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        else:
            write_atomic(out / "metrics.jsonl", "")
        write_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))
        for stale in (out / "checkpoints").glob(".step-*.tmp"):  # a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
    if step == 0:
        export_adapter(out, saver.model, tokenizer, cfg, dd)  # base weights and tokenizer up front
    barrier(dd)
    return step


def evaluate_before(
    model: torch.nn.Module, eval_set: list, cfg: Config, hooks: DecorrelationHooks,
    pad_id: int, dd: Dist, out: Path, step: int,
) -> dict[str, float]:  # fmt: skip
    """Held-out metrics of the model before training: measured at step 0 and saved in
    eval_before.json, read back when the run continues."""
    path = out / "eval_before.json"
    if step > 0 and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            before = None
        if isinstance(before, dict) and set(before) >= set(METRIC_KEYS):
            return before
    if step > 0:  # damaged, and the step-0 model is gone: reported as unknown
        warn(f"{path} is missing or damaged; decorrelation before training unknown")
        return {k: float("nan") for k in METRIC_KEYS}
    before = evaluate(model, eval_set, cfg, hooks, pad_id, dd)
    if dd.main:
        write_atomic(path, json.dumps(before, indent=1))
    return before


def log_metrics(out: Path, row: dict[str, Any], dd: Dist) -> None:
    """Append one step's metrics to metrics.jsonl (rank 0)."""
    if dd.main:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


class StopFlag:
    """Set by SIGINT or SIGTERM while the loop runs: the loop saves and stops after the
    step in progress."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._set)
        return self

    def _set(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train_loop(
    cfg: Config, dd: Dist, saver: Saver, hooks: DecorrelationHooks, tokenizer: Any,
    train_set: list, eval_set: list, step: int,
) -> tuple[int, int | None]:  # fmt: skip
    """Optimizer steps from `step` to --max-steps, or until a signal; returns the last
    step and the signal that stopped the run (None when it ran to the end)."""
    from tqdm.auto import tqdm

    model, optimizer, scheduler, out = saver.model, saver.optimizer, saver.scheduler, saver.out
    trainable = [p for p in model.parameters() if p.requires_grad]
    pad_id = tokenizer.pad_token_id
    bar = tqdm(total=cfg.max_steps, initial=min(step, cfg.max_steps), disable=not dd.main,
               desc="train", dynamic_ncols=True)  # fmt: skip
    with bar, StopFlag() as stop:
        while step < cfg.max_steps:
            started = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            for micro in micro_batches(train_set, cfg, dd.world, dd.rank, step):
                batch = {k: v.to(dd.device) for k, v in collate_pairs(micro, cfg, pad_id).items()}
                loss, metrics = forward_pair_batch(model, batch, cfg, hooks, dd.device, True)
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"non-finite loss ({loss.item()}) at step {step + 1}")
                (loss / cfg.grad_accum).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v
            all_reduce_gradients(trainable, dd)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bad = non_finite_tensor(model, optimizer)
            if bad is not None:
                raise NonFiniteError(f"non-finite values in {bad} after step {step + 1}")
            step += 1

            row: dict[str, Any] = {**reduce_metrics(sums, dd), "step": step,
                                   "lr": scheduler.get_last_lr()[0],
                                   "step_time": time.perf_counter() - started}  # fmt: skip
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                held_out = evaluate(model, eval_set, cfg, hooks, pad_id, dd)
                row.update({"eval/" + k: v for k, v in held_out.items()})
            log_metrics(out, row, dd)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}",
                            s_per_step=f"{row['step_time']:.2f}")  # fmt: skip
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                saver.save(step)
            if stop.signal is not None:
                break
    return step, stop.signal


def finish(
    cfg: Config, dd: Dist, saver: Saver, hooks: DecorrelationHooks, tokenizer: Any,
    eval_set: list, before: dict[str, float], step: int, skipped: int,
) -> dict[str, Any]:  # fmt: skip
    """Final held-out evaluation; rank 0 saves the adapter, the curves and summary.json."""
    out = saver.out
    after = evaluate(saver.model, eval_set, cfg, hooks, tokenizer.pad_token_id, dd)
    summary = {
        "steps": step,
        "eval/rewards/accuracies": after["rewards/accuracies"],
        "eval/rewards/margins": after["rewards/margins"],
        "decorrelation_before": before["dec/decorrelation"],
        "decorrelation_after": after["dec/decorrelation"],
        "skipped_pairs": skipped,
    }
    export_adapter(out, saver.model, tokenizer, cfg, dd)
    if dd.main:
        curves = plot_curves(out)
        write_atomic(out / "summary.json", json.dumps(summary, indent=1))
        print(
            f"\ndone: {step} steps -> {out}\n"
            f"  held-out reward accuracy {after['rewards/accuracies']:.3f}, "
            f"margin {after['rewards/margins']:.3f}\n"
            f"  decorrelation ({cfg.dec_module}, {cfg.dec_tokens} tokens) "
            f"{before['dec/decorrelation']:.4f} -> {after['dec/decorrelation']:.4f}\n"
            f"  adapter: {out}/adapter_model.safetensors, curves: {curves}"
        )
    return summary


def run(cfg: Config) -> dict[str, Any]:
    """The whole run, step by step; returns its summary ({"stopped_at": step} after a
    signal)."""
    dd = setup_distributed(cfg.device, cfg.fsdp)
    try:
        summary = run_steps(cfg, dd)
        barrier(dd)
    finally:
        if dd.owns_group:
            dist.destroy_process_group()
    return summary


def run_steps(cfg: Config, dd: Dist) -> dict[str, Any]:
    """run() once the ranks are set up."""
    out = Path(cfg.output_dir)
    # Everything is checked before anything is written: the directory, the flags that
    # need the model, the data.
    mode = claim_output_dir(cfg)
    barrier(dd)  # every rank has looked at the directory before rank 0 writes to it
    seed_everything(cfg.seed)
    model, tokenizer = build_model(cfg, out, dd.device, reuse_base=mode == "continue",
                                   shard=dd.fsdp)  # fmt: skip
    layers = hooked_layers(cfg, model)
    if cfg.packing:
        check_packing(model)
    train_set, eval_set, skipped = load_data(cfg, tokenizer)
    micro_batches(train_set, cfg, dd.world, dd.rank, 0)  # the data fills a global batch
    with run_lock(cfg, dd, mode):
        optimizer, scheduler = build_optimizer(cfg, model, out, mode)
        saver = Saver(out, dd, model, optimizer, scheduler, identity(cfg))
        step = start_or_resume(cfg, mode, saver, tokenizer)
        if cfg.precompute_ref and cfg.needs_reference:
            precompute_reference(model, train_set + eval_set, cfg, tokenizer.pad_token_id,
                                 dd.device)  # fmt: skip
        with DecorrelationHooks(model, cfg.dec_module, layers) as hooks:
            before = evaluate_before(model, eval_set, cfg, hooks, tokenizer.pad_token_id, dd,
                                     out, step)  # fmt: skip
            if dd.main:
                print(f"decpo.train: {len(train_set)} train / {len(eval_set)} held-out pairs "
                      f"({skipped} skipped by --max-length), "
                      f"{len(models.decoder_layers(model))} layers, "
                      f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} "
                      f"trainable parameters, {dd.world} rank(s) on {dd.device}")  # fmt: skip
            try:
                step, stopped_by = train_loop(cfg, dd, saver, hooks, tokenizer, train_set,
                                              eval_set, step)  # fmt: skip
                if stopped_by is not None and not saver.has(step):
                    saver.save(step)
            except NonFiniteError as exc:
                why = saver.describe()
                raise TrainError(f"{exc}; stopping without saving it. {why[0].upper()}{why[1:]}; "
                                 "lower --lr or check the data", status=1) from None  # fmt: skip
            except OSError as exc:  # a full disk, say
                raise TrainError(f"{exc}; {saver.describe()}", status=1) from None
            if stopped_by is not None:
                if dd.main:
                    print(
                        f"\nstopped by signal {stopped_by} after step {step}; resume with: "
                        f"python -m decpo.train --resume {out} --max-steps {cfg.max_steps}"
                    )
                summary: dict[str, Any] = {"stopped_at": step}
            else:
                summary = finish(cfg, dd, saver, hooks, tokenizer, eval_set, before, step,
                                 skipped)  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train as the flags say; returns the summary. User errors and stops raise
    TrainError (a SystemExit) after printing `decpo.train: error: ...` on stderr."""
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    try:
        return run(load_config(argv))
    except TrainError as exc:
        print(f"decpo.train: error: {exc.message}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
