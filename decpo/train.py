"""python -m decpo.train: a minimal native-PyTorch DPO / DecPO training loop with LoRA.

With no arguments it runs the demo: a tiny Llama built from a config (random init),
a BPE tokenizer trained on the demo corpus, synthetic preference pairs, LoRA, DecPO;
a few minutes on 2 CPU cores. See `python -m decpo.train --help`.

Reads top to bottom: configuration, setup (distributed, seed, model, data),
the step, evaluation, checkpoints, the loop, the summary.
`torchrun --nproc_per_node K -m decpo.train ...` runs data-parallel: each rank takes
its share of every global batch and gradients are all-reduced before each update,
so K ranks with --batch-size b train and log exactly like one process with
--grad-accum K.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

import decpo
from decpo import data as data_lib
from decpo import models
from decpo.hooks import DecorrelationHooks, feature_decorrelation
from decpo.integrations.hf import logit_transform

# TRL 1.16's other loss types, passed to decpo.dpo_loss under their own names.
TRL_LOSSES = ("exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sigmoid_norm")  # fmt: skip
LOSSES = ("dpo", "decpo", "ipo", "hinge", "simpo", "sft", *TRL_LOSSES)
# --loss -> decpo.dpo_loss loss_type; decpo = DPO's sigmoid loss + the regularizer.
LOSS_TYPE = {"dpo": "sigmoid", "decpo": "sigmoid", "ipo": "ipo", "hinge": "hinge",
             "simpo": "simpo", "sft": "sft", **{name: name for name in TRL_LOSSES}}  # fmt: skip
SMOOTHED_LOSSES = ("dpo", "decpo", "simpo", "exo_pair", "robust", "aot", "aot_unpaired")
METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
               "rewards/margins", "logps/chosen", "logps/rejected", "dec/penalty",
               "dec/decorrelation")  # fmt: skip


# ---------------------------------------------------------------- configuration


@dataclass
class Config:
    model: str = "tiny"  # "tiny" or a local Hugging Face model directory
    data: str | None = None  # JSONL(.gz) preference file; None: the synthetic demo task
    loss: str = "decpo"
    beta: float = 0.1
    dec_weight: float = 0.1  # lambda of the regularizer (--loss decpo, or --dec-penalty)
    dec_penalty: bool = False  # add dec_weight x penalty to any --loss (decpo implies it)
    dec_layers: str = "auto"  # "auto", "all" or comma-separated layer indices
    dec_module: str = "mlp.up_proj"
    dec_tokens: str = "last"  # last | all
    lora_r: int = 8
    lora_targets: str = ",".join(models.DEFAULT_LORA_TARGETS)
    lr: float | None = None  # default: 2e-3 for the tiny demo model, 5e-5 otherwise
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    batch_size: int = 8  # pairs per device per micro-batch
    grad_accum: int = 1
    max_length: int = 128
    max_steps: int = 150
    schedule_steps: int | None = None  # warmup + cosine length; default --max-steps
    eval_every: int = 50
    eval_fraction: float = 0.1
    save_every: int = 50
    demo_pairs: int = 2000
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    gradient_checkpointing: bool = False
    precompute_ref: bool = False
    output_dir: str = "runs/demo"
    resume: str | None = None
    overwrite: bool = False
    seed: int = 0
    split_seed: int = 0  # held-out split and demo pairs; independent of --seed
    device: str = "auto"


# Fields that may change between the invocations of one run: they are not part of
# its identity (a run resumed to more steps or on another device is the same run).
VOLATILE_FIELDS = frozenset({"max_steps", "device", "resume", "output_dir", "overwrite"})


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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line instead of usage + message
        raise TrainError(f"{message} (see python -m decpo.train --help)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m decpo.train",
        description="DPO / DecPO training with LoRA. No arguments: the built-in demo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    helps = {
        "model": '"tiny" (demo model built from a config) or a local Hugging Face directory',
        "data": "JSONL or JSONL.GZ preference file (prompt/chosen/rejected strings, chat "
        "message lists, or Anthropic HH transcripts); default: synthetic demo pairs",
        "loss": "loss: " + "|".join(LOSSES),
        "dec_weight": "weight lambda of the decorrelation regularizer (--loss decpo or "
        "--dec-penalty), >= 0",
        "dec_penalty": "add --dec-weight x the decorrelation penalty to any --loss "
        "(--loss decpo is dpo with it)",
        "dec_layers": 'decoder layers to hook: "auto" (every layer of the tiny demo model; '
        "for --model DIR one layer at the paper code's depth, 10 of 32: "
        'decpo.models.default_dec_layers), "all", or indices like "2,3"',
        "dec_module": "module inside each decoder layer whose output is decorrelated",
        "dec_tokens": "rows: last (last response token of each sequence) or all",
        "batch_size": "preference pairs per device per micro-batch",
        "lr": "peak learning rate (default 2e-3 for --model tiny, 5e-5 otherwise)",
        "resume": "continue the run whose output directory is this, up to --max-steps "
        "(default: the run's own --max-steps)",
        "overwrite": "start over in an --output-dir that holds another decpo.train run "
        "(its checkpoints and metrics are deleted)",
        "schedule_steps": "length of the warmup + cosine learning-rate schedule, fixed when a "
        "run starts (default: --max-steps); after it the rate stays at 10%% of its peak",
        "device": "auto, cpu, cuda or cuda:N",
        "beta": "DPO temperature beta (rewards are beta x log-ratio), > 0",
        "lora_r": "LoRA rank",
        "lora_targets": "comma-separated module names that get LoRA adapters",
        "weight_decay": "AdamW weight decay, >= 0",
        "warmup_ratio": "fraction of the schedule spent in linear warmup, in [0, 1]",
        "max_grad_norm": "gradient clipping norm, > 0 (inf: no clipping)",
        "grad_accum": "micro-batches per optimizer step",
        "max_length": "tokens per sequence (prompt cut from the left; pairs whose response "
        "cannot fit are skipped)",
        "max_steps": "optimizer steps to train to",
        "eval_every": "held-out evaluation every this many steps (and at the end)",
        "eval_fraction": "fraction of the pairs held out for evaluation, in (0, 1)",
        "save_every": "checkpoint every this many steps (and at the end)",
        "demo_pairs": "synthetic pairs generated for the demo task (without --data)",
        "label_smoothing": "label smoothing, in [0, 0.5), of the losses "
        + "|".join(SMOOTHED_LOSSES)
        + " (exo_pair needs > 0, e.g. 1e-3)",
        "simpo_gamma": "SimPO target margin gamma",
        "gradient_checkpointing": "recompute activations in the backward to save memory",
        "precompute_ref": "compute the reference log-probs of every pair once before training "
        "and reuse them (saves one forward per step)",
        "output_dir": "where metrics, adapter, checkpoints and plots go (one run per directory)",
        "seed": "seed for the model, LoRA init and data order (not the split: --split-seed)",
        "split_seed": "seed of the held-out split by prompt (no eval prompt occurs in "
        "training) and of the synthetic demo pairs; independent of --seed, so runs with "
        "different --seed share one split",
    }
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if field.type in ("bool",):
            parser.add_argument(flag, action="store_true", help=helps.get(field.name))
            continue
        kind = {"int": int, "float": float}.get(str(field.type).split(" ")[0], str)
        kwargs: dict[str, Any] = {"type": kind, "default": default, "help": helps.get(field.name)}
        if field.name == "loss":
            kwargs["choices"] = LOSSES
        if field.name == "dec_tokens":
            kwargs["choices"] = ("last", "all")
        parser.add_argument(flag, **kwargs)
    return parser


def _explicit_flags(argv: list[str] | None) -> set[str]:
    """Config fields given on the command line (not left at their defaults)."""
    parser = _build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def config_from_json(saved: dict[str, Any]) -> Config:
    """A Config from a run's config.json (keys of other versions are ignored)."""
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


def validate(cfg: Config) -> None:
    """Every flag that can be checked without the model or the data; TrainError naming
    the flag otherwise. Runs before anything is written."""

    def bad(name: str, why: str) -> TrainError:
        value = getattr(cfg, name)
        return TrainError(f"--{name.replace('_', '-')} {value}: {why}")

    for name in ("batch_size", "grad_accum", "max_length", "max_steps", "lora_r", "eval_every",
                 "save_every"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.schedule_steps is not None and cfg.schedule_steps < 1:
        raise bad("schedule_steps", "must be >= 1")
    if cfg.data is None and cfg.demo_pairs < 2:
        raise bad("demo_pairs", "must be >= 2")
    for name in ("beta", "dec_weight", "lr", "weight_decay", "warmup_ratio", "eval_fraction",
                 "label_smoothing", "simpo_gamma"):  # fmt: skip
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise bad(name, "must be a finite number")
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
    if not 0 <= cfg.label_smoothing < 0.5:
        raise bad("label_smoothing", "must be in [0, 0.5) (0.5 makes the loss ignore the labels)")
    if cfg.label_smoothing and cfg.loss not in SMOOTHED_LOSSES:
        raise bad("label_smoothing", f"applies to --loss {'|'.join(SMOOTHED_LOSSES)} only")
    if cfg.loss == "exo_pair" and cfg.label_smoothing == 0:
        raise bad("label_smoothing", "must be > 0 for --loss exo_pair (the EXO paper uses 1e-3)")
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
    if cfg.model != "tiny" and not (Path(cfg.model) / "config.json").is_file():
        raise bad("model", 'must be "tiny" or a local Hugging Face model directory (no '
                  "config.json there)")  # fmt: skip
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise bad("data", "no such file")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise bad("device", "must be auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise bad("device", "CUDA is not available on this machine")
    if not cfg.output_dir.strip():
        raise TrainError("--output-dir must name a directory (got an empty string)")


def parse_args(argv: list[str] | None = None) -> Config:
    """The configuration of this invocation, validated. With --resume it is the saved
    configuration of that run; only --max-steps and --device may be given anew."""
    cfg = Config(**vars(_build_parser().parse_args(argv)))
    if cfg.resume is not None:
        explicit = _explicit_flags(argv)
        run = Path(cfg.resume)
        if "output_dir" in explicit and Path(cfg.output_dir).resolve() != run.resolve():
            raise TrainError(f"--output-dir {cfg.output_dir} differs from --resume {run}")
        saved = read_run_config(run)
        for name in sorted(explicit - VOLATILE_FIELDS):
            if getattr(cfg, name) != getattr(saved, name):
                raise TrainError(
                    f"--{name.replace('_', '-')} {getattr(cfg, name)}: --resume {run} continues "
                    f"the run's saved configuration ({getattr(saved, name)}); start a new run "
                    "to change it"
                )
        max_steps = cfg.max_steps if "max_steps" in explicit else saved.max_steps
        cfg = dataclasses.replace(saved, max_steps=max_steps, device=cfg.device, resume=str(run),
                                  output_dir=str(run), overwrite=False)  # fmt: skip
    validate(cfg)
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

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_model(
    cfg: Config, out: Path, device: torch.device, reuse_base: bool = True
) -> tuple[torch.nn.Module, Any]:
    """Policy with LoRA adapters, and its tokenizer. The tiny demo model's base weights
    and tokenizer are saved under out/ so the adapter can be reloaded later; a run
    that continues (reuse_base) loads them back. Bad --model, --lora-targets raise
    TrainError."""
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
    return model.to(device), tokenizer


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
    --grad-accum K sees."""
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
    chunk = order[index * per_step : (index + 1) * per_step]
    out = []
    for accum in range(cfg.grad_accum):
        u = accum * world + rank
        out.append([train_set[i] for i in chunk[u * cfg.batch_size : (u + 1) * cfg.batch_size]])
    return out


# ---------------------------------------------------------------- the step


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) of response-token log-probs per sequence, (2B,) each, from the
    final hidden states and the LM head with decpo.token_logprobs (no logits)."""
    base = model.get_base_model()
    backbone = getattr(base, base.base_model_prefix)  # LlamaModel, GPT2Model, ...
    head = base.get_output_embeddings()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state  # (2B, T, D)
    weight = head.weight
    bias = head.bias
    targets = batch["labels"][:, 1:]  # token t + 1 is predicted at position t
    hidden = hidden[:, :-1]
    if hidden.dtype != weight.dtype:
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    softcap, logit_scale = logit_transform(base)  # Gemma's softcap, Cohere/Granite scales
    logp = decpo.token_logprobs(
        hidden, weight, targets, bias=bias, softcap=softcap, logit_scale=logit_scale
    )  # (2B, T - 1)
    per_sequence = decpo.sequence_logprobs(logp, targets != data_lib.IGNORE_INDEX)
    return per_sequence.sum, per_sequence.mean


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """Sequence log-probs (2B,) of the reference: the policy with adapters disabled."""
    with models.adapters_disabled(model):
        return sequence_logps(model, batch, device)[0]


def precompute_reference(
    model: torch.nn.Module, pairs: list, cfg: Config, pad_id: int, device: torch.device
) -> None:
    """Fill every pair's ref_logps once (batched like training)."""
    for start in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[start : start + cfg.batch_size]
        batch = {k: v.to(device) for k, v in data_lib.collate(chunk, pad_id).items()}
        ref = reference_logps(model, batch, device).double().cpu().tolist()
        n = len(chunk)
        for k, pair in enumerate(chunk):
            pair.ref_logps = (ref[k], ref[n + k])


def forward_pair_batch(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: Config,
    hooks: DecorrelationHooks, device: torch.device, train: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Loss and metrics (sums over pairs) of one micro-batch of B pairs."""
    completion = batch["labels"] != data_lib.IGNORE_INDEX  # (2B, T)
    with hooks.capture(force=not train):
        policy_sum, policy_mean = sequence_logps(model, batch, device)
    if cfg.loss in ("simpo", "sft"):
        ref_sum = None
    elif "ref_logps" in batch:  # precomputed once (--precompute-ref)
        ref_sum = batch["ref_logps"].to(policy_sum.dtype)
    else:
        ref_sum = reference_logps(model, batch, device)
    policy = policy_mean if cfg.loss in ("simpo", "sft") else policy_sum
    n = policy.shape[0] // 2
    losses, chosen_rewards, rejected_rewards = decpo.dpo_loss(
        policy[:n], policy[n:],
        None if ref_sum is None else ref_sum[:n], None if ref_sum is None else ref_sum[n:],
        beta=cfg.beta, loss_type=LOSS_TYPE[cfg.loss], label_smoothing=cfg.label_smoothing,
        gamma=cfg.simpo_gamma,
        **({} if cfg.loss != "sigmoid_norm" else  # per-token log-ratios: the response lengths
           {"chosen_lengths": completion[:n].sum(-1), "rejected_lengths": completion[n:].sum(-1)}),
    )  # fmt: skip
    hidden, segment_ids = hooks.rows(completion, cfg.dec_tokens)
    penalized = cfg.loss == "decpo" or cfg.dec_penalty
    if penalized and train:
        # Through the hooks: also differentiable under reentrant gradient checkpointing.
        penalty = hooks.penalty(completion, cfg.dec_tokens)
    else:
        with torch.no_grad():
            penalty = decpo.decorrelation_penalty(hidden.detach(), segment_ids=segment_ids)
    loss = losses.mean()
    if penalized:  # preference loss + lambda x penalty, for every loss type
        loss = loss + cfg.dec_weight * penalty
    metrics = {
        "loss": loss.detach() * n,
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": policy_sum[:n].detach().sum(),
        "logps/rejected": policy_sum[n:].detach().sum(),
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
        batch = data_lib.collate(eval_set[start : start + cfg.batch_size], pad_id)
        batch = {k: v.to(dd.device) for k, v in batch.items()}
        _, metrics = forward_pair_batch(model, batch, cfg, hooks, dd.device, train=False)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0) + v
    model.train()
    return reduce_metrics(sums, Dist(device=dd.device))


# ---------------------------------------------------------------- checkpoints


# A checkpoint is a directory checkpoints/step-NNNNNNN holding tensors.safetensors
# (adapter weights, optimizer moments, torch RNG) and state.json (step, optimizer
# hyper-parameters, scheduler, Python RNG, the run's identity, and the size and
# SHA-256 of the tensor file). Nothing is unpickled when it is loaded.
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


def save_adapter(out: Path, model: torch.nn.Module, tokenizer: Any, cfg: Config) -> None:
    model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
    tokenizer.save_pretrained(out)
    if cfg.model == "tiny" and not (out / "base_model" / "config.json").is_file():
        _save_tiny_base(model.get_base_model(), tokenizer, out / "base_model")


def _save_tiny_base(base: torch.nn.Module, tokenizer: Any, where: Path) -> None:
    """Base weights of the demo model (without LoRA layers) for reloading the adapter."""
    from peft.tuners.lora import LoraLayer

    state = {
        k: v for k, v in base.state_dict().items() if "lora_" not in k
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


# ---------------------------------------------------------------- the loop


class StopRequested(Exception):  # noqa: N818 (control flow, not an error)
    """SIGINT or SIGTERM arrived: save a checkpoint and leave the loop."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train as the flags say; returns the summary. User errors and stops raise
    TrainError (a SystemExit) after printing `decpo.train: error: ...` on stderr."""
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    try:
        return _train(parse_args(argv))
    except TrainError as exc:
        print(f"decpo.train: error: {exc.message}", file=sys.stderr, flush=True)
        raise


def _train(cfg: Config) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    dd = setup_distributed(cfg.device)
    # Everything is checked before anything is written: the directory, the flags
    # that need the model, the data.
    mode = claim_output_dir(cfg)
    if dd.world > 1:  # every rank has looked at the directory before rank 0 writes to it
        dist.barrier()
    seed_everything(cfg.seed)
    model, tokenizer = build_model(cfg, out, dd.device, reuse_base=mode == "continue")
    layers = hooked_layers(cfg, model)
    train_set, eval_set, skipped = load_data(cfg, tokenizer)
    micro_batches(train_set, cfg, dd.world, dd.rank, 0)  # the data fills a global batch
    lock = None
    if dd.main:
        lock = lock_output_dir(out)
        if claim_output_dir(cfg) != mode:  # another run got here first and finished
            lock.close()
            raise TrainError(f"--output-dir {out} changed while this run started; try again")
    try:
        return _train_locked(cfg, out, dd, mode, model, tokenizer, layers, train_set, eval_set,
                             skipped)  # fmt: skip
    finally:
        if lock is not None:
            lock.close()


def _train_locked(
    cfg: Config, out: Path, dd: Dist, mode: str, model: torch.nn.Module, tokenizer: Any,
    layers: list[int] | None, train_set: list, eval_set: list, skipped: int,
) -> dict[str, Any]:  # fmt: skip
    if dd.world > 1:
        dist.barrier()
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if cfg.lr is not None else (2e-3 if cfg.model == "tiny" else 5e-5)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.schedule_steps is None:  # saved in config.json: a resumed run keeps it
        saved = out / "config.json"
        if mode == "continue" and saved.is_file():
            cfg.schedule_steps = read_run_config(out).schedule_steps
        if cfg.schedule_steps is None:
            cfg.schedule_steps = cfg.max_steps
    schedule_steps = cfg.schedule_steps
    warmup = max(1, int(cfg.warmup_ratio * schedule_steps))

    def lr_factor(step: int) -> float:  # linear warmup, then cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, schedule_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    n_layers = len(models.decoder_layers(model))
    run_identity = identity(cfg)

    step = 0
    last_good: Path | None = None  # the newest checkpoint known to be intact and finite
    resuming = mode == "continue"
    if resuming:
        ckpt, skipped_ckpts = find_checkpoint(out, model, optimizer, run_identity)
        if ckpt is not None:
            step = apply_checkpoint(ckpt, model, optimizer, scheduler)
            last_good = ckpt.path
            if skipped_ckpts and dd.main:
                warn(f"{out}: skipped {'; '.join(skipped_ckpts)}; resuming from "
                     f"{ckpt.path.name}")  # fmt: skip
        elif any((out / "checkpoints").glob("step-*")):
            # Checkpoints exist but none is usable (damaged, an older format, another
            # run's): restarting would discard the run's progress, so stop instead.
            raise TrainError(
                f"{out}: no usable checkpoint (skipped {'; '.join(skipped_ckpts)}); nothing "
                "was changed. Start over with --overwrite or choose another --output-dir"
            )
        elif dd.main:
            why = f" (skipped {'; '.join(skipped_ckpts)})" if skipped_ckpts else ""
            warn(f"{out}: no checkpoint saved yet{why}; starting the run from step 0")
        if dd.main and cfg.resume is None:
            print(f"decpo.train: {out} holds this run (same configuration); continuing from "
                  f"step {step} (--overwrite starts over)")  # fmt: skip
    if dd.main:
        if mode == "overwrite":
            clear_run(out)
        if resuming:  # drop metrics logged after the checkpoint: they are redone exactly
            kept = [row for row in read_metrics(out) if row["step"] <= step]
            write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        else:
            write_atomic(out / "metrics.jsonl", "")
        write_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))
        if step == 0:
            save_adapter(out, model, tokenizer, cfg)  # base weights and tokenizer up front
        for stale in (out / "checkpoints").glob(".step-*.tmp"):  # a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
    if dd.world > 1:
        dist.barrier()

    if cfg.precompute_ref and cfg.loss not in ("simpo", "sft"):
        precompute_reference(model, train_set + eval_set, cfg, tokenizer.pad_token_id, dd.device)

    def last_good_text() -> str:
        if last_good is None:
            return "no checkpoint has been saved yet"
        return f"the last good checkpoint is {last_good} (step {int(last_good.name[5:])})"

    def save(at: int) -> None:
        nonlocal last_good
        if dd.main:
            last_good = save_checkpoint(out, at, model, optimizer, scheduler,
                                        run_identity=run_identity)  # fmt: skip

    stop = {"signal": None}

    def request_stop(signum: int, frame: Any) -> None:
        stop["signal"] = signum

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    stop_at = int(os.environ.get("DECPO_STOP_AT_STEP", "0"))  # tests: a stop at this step

    summary: dict[str, Any] = {}
    with DecorrelationHooks(model, cfg.dec_module, layers) as hooks:
        before_file = out / "eval_before.json"
        before = None
        if resuming and before_file.is_file():
            try:
                before = json.loads(before_file.read_text(encoding="utf-8"))
            except ValueError:
                before = None
            if not isinstance(before, dict) or set(before) < set(METRIC_KEYS):
                before = None
        if before is None and step == 0:
            before = evaluate(model, eval_set, cfg, hooks, tokenizer.pad_token_id, dd)
            if dd.main:
                write_atomic(before_file, json.dumps(before, indent=1))
        elif before is None:  # damaged, and the step-0 model is gone: reported as unknown
            warn(f"{before_file} is missing or damaged; decorrelation before training unknown")
            before = {k: float("nan") for k in METRIC_KEYS}
        if dd.main:
            print(f"decpo.train: {len(train_set)} train / {len(eval_set)} held-out pairs "
                  f"({skipped} skipped by --max-length), {n_layers} layers, "
                  f"{sum(p.numel() for p in trainable)} trainable parameters, "
                  f"{dd.world} rank(s) on {dd.device}")  # fmt: skip
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=min(step, cfg.max_steps), disable=not dd.main,
                   desc="train", dynamic_ncols=True)  # fmt: skip
        try:
            while step < cfg.max_steps:
                started = time.perf_counter()
                sums: dict[str, torch.Tensor] = {}
                for micro in micro_batches(train_set, cfg, dd.world, dd.rank, step):
                    batch = data_lib.collate(micro, tokenizer.pad_token_id)
                    batch = {k: v.to(dd.device) for k, v in batch.items()}
                    loss, metrics = forward_pair_batch(model, batch, cfg, hooks, dd.device, True)
                    if not torch.isfinite(loss):
                        raise NonFiniteError(f"non-finite loss ({loss.item()}) at step {step + 1}")
                    (loss / cfg.grad_accum).backward()
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0) + v
                if dd.world > 1:  # data parallel: average gradients over ranks
                    grads = [p.grad for p in trainable]
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    dist.all_reduce(flat)
                    flat /= dd.world
                    offset = 0
                    for g in grads:
                        g.copy_(flat[offset : offset + g.numel()].view_as(g))
                        offset += g.numel()
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bad = non_finite_tensor(model, optimizer)
                if bad is not None:
                    raise NonFiniteError(f"non-finite values in {bad} after step {step + 1}")
                step += 1

                logged = reduce_metrics(sums, dd)
                logged["step"] = step
                logged["lr"] = scheduler.get_last_lr()[0]
                logged["step_time"] = time.perf_counter() - started
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    held_out = evaluate(model, eval_set, cfg, hooks, tokenizer.pad_token_id, dd)
                    logged.update({"eval/" + k: v for k, v in held_out.items()})
                if dd.main:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(logged) + "\n")
                    bar.set_postfix(loss=f"{logged['loss']:.3f}",
                                    acc=f"{logged['rewards/accuracies']:.2f}",
                                    s_per_step=f"{logged['step_time']:.2f}")  # fmt: skip
                    bar.update(1)
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    save(step)
                if stop_at and step == stop_at:
                    stop["signal"] = signal.SIGTERM
                if stop["signal"] is not None:
                    raise StopRequested
        except StopRequested:
            if last_good is None or last_good.name != f"step-{step:07d}":
                try:
                    save(step)
                except OSError as exc:
                    raise TrainError(f"{exc}; {last_good_text()}", status=1) from None
            if dd.main:
                print(f"\nstopped by signal {stop['signal']} after step {step}; "
                      f"resume with: python -m decpo.train --resume {out} "
                      f"--max-steps {cfg.max_steps}")  # fmt: skip
            summary = {"stopped_at": step}
        except NonFiniteError as exc:
            raise TrainError(
                f"{exc}; stopping without saving it. {last_good_text()[0].upper()}"
                f"{last_good_text()[1:]}; lower "
                "--lr or check the data", status=1,
            ) from None  # fmt: skip
        except OSError as exc:  # a full disk, say
            raise TrainError(f"{exc}; {last_good_text()}", status=1) from None
        finally:
            bar.close()
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)

        if not summary:
            after = evaluate(model, eval_set, cfg, hooks, tokenizer.pad_token_id, dd)
            summary = {
                "steps": step,
                "eval/rewards/accuracies": after["rewards/accuracies"],
                "eval/rewards/margins": after["rewards/margins"],
                "decorrelation_before": before["dec/decorrelation"],
                "decorrelation_after": after["dec/decorrelation"],
                "skipped_pairs": skipped,
            }
            if dd.main:
                save_adapter(out, model, tokenizer, cfg)
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
    if dd.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
