"""python -m decpo.train: a minimal native-PyTorch DPO / DecPO training loop with LoRA.

With no arguments it runs the demo: a tiny Llama built from a config (random init),
a BPE tokenizer trained on the demo corpus, synthetic preference pairs, LoRA, DecPO;
a few minutes on 2 CPU cores. See `python -m decpo.train --help` and DESIGN section 4.

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
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import decpo
from decpo import data as data_lib
from decpo import models
from decpo.hooks import DecorrelationHooks, feature_decorrelation
from decpo.integrations.hf import logit_transform

LOSSES = ("dpo", "decpo", "ipo", "hinge", "simpo", "sft")
# --loss -> decpo.dpo_loss loss_type; decpo = DPO's sigmoid loss + the regularizer.
LOSS_TYPE = {"dpo": "sigmoid", "decpo": "sigmoid", "ipo": "ipo", "hinge": "hinge",
             "simpo": "simpo", "sft": "sft"}  # fmt: skip
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
    dec_weight: float = 0.1  # lambda of the regularizer (--loss decpo)
    dec_layers: str = "all"  # comma-separated layer indices, or "all"
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
    seed: int = 0
    device: str = "auto"


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m decpo.train",
        description="DPO / DecPO training with LoRA. No arguments: the built-in demo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    helps = {
        "model": '"tiny" (demo model built from a config) or a local Hugging Face directory',
        "data": "JSONL or JSONL.GZ preference file (prompt/chosen/rejected strings, chat "
        "message lists, or Anthropic HH transcripts); default: synthetic demo pairs",
        "loss": "loss: " + "|".join(LOSSES),
        "dec_weight": "weight lambda of the decorrelation regularizer (--loss decpo)",
        "dec_layers": 'decoder layers to hook: "all" or indices like "2,3"',
        "dec_module": "module inside each decoder layer whose output is decorrelated",
        "dec_tokens": "rows: last (last response token of each sequence) or all",
        "batch_size": "preference pairs per device per micro-batch",
        "lr": "peak learning rate (default 2e-3 for --model tiny, 5e-5 otherwise)",
        "resume": "continue the run whose output directory is this, up to --max-steps",
        "schedule_steps": "length of the warmup + cosine learning-rate schedule, fixed when a "
        "run starts (default: --max-steps); after it the rate stays at 10%% of its peak",
        "device": "auto, cpu, cuda or cuda:N",
        "beta": "DPO temperature beta (rewards are beta x log-ratio)",
        "lora_r": "LoRA rank",
        "lora_targets": "comma-separated module names that get LoRA adapters",
        "weight_decay": "AdamW weight decay",
        "warmup_ratio": "fraction of the schedule spent in linear warmup",
        "max_grad_norm": "gradient clipping norm",
        "grad_accum": "micro-batches per optimizer step",
        "max_length": "tokens per sequence (prompt cut from the left; pairs whose response "
        "cannot fit are skipped)",
        "max_steps": "optimizer steps to train to",
        "eval_every": "held-out evaluation every this many steps (and at the end)",
        "eval_fraction": "fraction of the pairs held out for evaluation",
        "save_every": "checkpoint every this many steps (and at the end)",
        "demo_pairs": "synthetic pairs generated for the demo task (without --data)",
        "label_smoothing": "label smoothing of the sigmoid (DPO) and SimPO losses",
        "simpo_gamma": "SimPO target margin gamma",
        "gradient_checkpointing": "recompute activations in the backward to save memory",
        "precompute_ref": "compute the reference log-probs of every pair once before training "
        "and reuse them (saves one forward per step)",
        "output_dir": "where metrics, adapter, checkpoints and plots go",
        "seed": "seed for the model, LoRA init, data split and data order",
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
    args = parser.parse_args(argv)
    cfg = Config(**vars(args))
    for name in ("batch_size", "grad_accum", "max_length", "max_steps", "lora_r", "eval_every",
                 "save_every"):  # fmt: skip
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.beta <= 0:
        parser.error("--beta must be > 0")
    return cfg


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


def build_model(cfg: Config, out: Path, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """Policy with LoRA adapters, and its tokenizer. The tiny demo model's base weights
    and tokenizer are saved under out/ so the adapter can be reloaded later."""
    if cfg.model == "tiny":
        base_dir = out / "base_model"
        if (base_dir / "config.json").is_file():  # resuming: the same base weights
            model, tokenizer = models.load_pretrained(base_dir, torch.float32)
        else:
            tokenizer = models.build_tokenizer(data_lib.demo_corpus())
            model = models.build_tiny_model(tokenizer, cfg.seed)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, tokenizer = models.load_pretrained(cfg.model, dtype)
    if cfg.gradient_checkpointing:
        models.enable_checkpointing(model)
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    model = models.add_lora(model, cfg.lora_r, None, cfg.lora_targets.split(","))
    return model.to(device), tokenizer


def load_data(cfg: Config, tokenizer: Any) -> tuple[list, list, int]:
    """(train pairs, eval pairs, pairs skipped by truncation), tokenized; the eval
    split is a seeded random eval_fraction of the pairs."""
    if cfg.data is None:
        pairs = data_lib.synthetic_pairs(cfg.demo_pairs, cfg.seed)
    else:
        pairs = data_lib.read_pairs(cfg.data, tokenizer)
    tokenized, skipped = data_lib.tokenize_pairs(pairs, tokenizer, cfg.max_length)
    if len(tokenized) < 2:
        raise SystemExit(f"only {len(tokenized)} pairs fit --max-length {cfg.max_length}")
    order = list(range(len(tokenized)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = max(1, int(len(order) * cfg.eval_fraction))
    eval_set = [tokenized[i] for i in order[:n_eval]]
    train_set = [tokenized[i] for i in order[n_eval:]]
    return train_set, eval_set, skipped


def micro_batches(train_set: list, cfg: Config, world: int, rank: int, step: int) -> list[list]:
    """This rank's micro-batches of optimizer step `step` (0-based). Every step takes
    the next world * grad_accum * batch_size pairs of a seeded per-epoch permutation;
    micro-batch u = accum_index * world + rank, so K ranks see what one process with
    --grad-accum K sees."""
    per_step = world * cfg.grad_accum * cfg.batch_size
    steps_per_epoch = len(train_set) // per_step
    if steps_per_epoch == 0:
        raise SystemExit(
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
    )  # fmt: skip
    hidden, segment_ids = hooks.rows(completion, cfg.dec_tokens)
    if cfg.loss == "decpo" and train:
        # Through the hooks: also differentiable under reentrant gradient checkpointing.
        penalty = hooks.penalty(completion, cfg.dec_tokens)
    else:
        with torch.no_grad():
            penalty = decpo.decorrelation_penalty(hidden.detach(), segment_ids=segment_ids)
    loss = losses.mean()
    if cfg.loss == "decpo":
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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, keep: int = 2,
) -> Path:  # fmt: skip
    """Write checkpoints/step-N atomically: everything goes to a temporary directory
    that is renamed into place, then the `latest` pointer is replaced atomically.
    A crash at any point leaves the previous checkpoint and pointer intact."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(
        {
            "step": step,
            "trainable": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        },
        tmp / "state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    older = sorted(p for p in root.glob("step-*") if p.name < final.name)
    for old in older[: max(0, len(older) - (keep - 1))]:  # keep the newest `keep`
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> int:
    """Restore the latest checkpoint of run `out`; returns its step."""
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        raise SystemExit(f"--resume {out}: no checkpoint found (missing {pointer})")
    state = torch.load(pointer.parent / pointer.read_text().strip() / "state.pt",
                       weights_only=False)  # fmt: skip
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


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
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    before = out / "eval_before.json"
    if before.is_file():  # the held-out metrics at step 0, before training
        start = json.loads(before.read_text())
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
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    cfg = parse_args(argv)
    if cfg.resume is not None:
        saved = json.loads((Path(cfg.resume) / "config.json").read_text())
        saved.update(max_steps=cfg.max_steps, device=cfg.device, resume=cfg.resume,
                     output_dir=cfg.resume)  # fmt: skip
        cfg = Config(**saved)
    out = Path(cfg.output_dir)
    dd = setup_distributed(cfg.device)
    seed_everything(cfg.seed)
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
    if dd.world > 1:
        dist.barrier()

    model, tokenizer = build_model(cfg, out, dd.device)
    train_set, eval_set, skipped = load_data(cfg, tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if cfg.lr is not None else (2e-3 if cfg.model == "tiny" else 5e-5)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.schedule_steps is None:  # saved in config.json: a resumed run keeps it
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
    layers = None if cfg.dec_layers == "all" else [int(x) for x in cfg.dec_layers.split(",")]

    step = 0
    if cfg.resume is not None:
        step = load_checkpoint(out, model, optimizer, scheduler)
        if dd.main:  # drop metrics logged after the checkpoint: they are redone exactly
            lines = (out / "metrics.jsonl").read_text().splitlines()
            kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
            (out / "metrics.jsonl").write_text("".join(x + "\n" for x in kept))
    elif dd.main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        (out / "metrics.jsonl").write_text("")
        save_adapter(out, model, tokenizer, cfg)  # base weights and tokenizer up front
    if dd.world > 1:
        dist.barrier()

    if cfg.precompute_ref and cfg.loss not in ("simpo", "sft"):
        precompute_reference(model, train_set + eval_set, cfg, tokenizer.pad_token_id, dd.device)

    stop = {"signal": None}

    def request_stop(signum: int, frame: Any) -> None:
        stop["signal"] = signum

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    stop_at = int(os.environ.get("DECPO_STOP_AT_STEP", "0"))  # tests: a stop at this step

    summary: dict[str, Any] = {}
    with DecorrelationHooks(model, cfg.dec_module, layers) as hooks:
        before_file = out / "eval_before.json"
        if cfg.resume is not None and before_file.is_file():
            before = json.loads(before_file.read_text())
        else:
            before = evaluate(model, eval_set, cfg, hooks, tokenizer.pad_token_id, dd)
            if dd.main:
                before_file.write_text(json.dumps(before, indent=1))
        if dd.main:
            print(f"decpo.train: {len(train_set)} train / {len(eval_set)} held-out pairs "
                  f"({skipped} skipped by --max-length), {n_layers} layers, "
                  f"{sum(p.numel() for p in trainable)} trainable parameters, "
                  f"{dd.world} rank(s) on {dd.device}")  # fmt: skip
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, disable=not dd.main, desc="train",
                   dynamic_ncols=True)  # fmt: skip
        try:
            while step < cfg.max_steps:
                started = time.perf_counter()
                sums: dict[str, torch.Tensor] = {}
                for micro in micro_batches(train_set, cfg, dd.world, dd.rank, step):
                    batch = data_lib.collate(micro, tokenizer.pad_token_id)
                    batch = {k: v.to(dd.device) for k, v in batch.items()}
                    loss, metrics = forward_pair_batch(model, batch, cfg, hooks, dd.device, True)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite loss ({loss.item()}) at step {step + 1}; stopping. "
                            "The last good checkpoint is kept; lower --lr or check the data."
                        )
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
                saving = step % cfg.save_every == 0 or step == cfg.max_steps
                if saving and dd.main:
                    save_checkpoint(out, step, model, optimizer, scheduler)
                if stop_at and step == stop_at:
                    stop["signal"] = signal.SIGTERM
                if stop["signal"] is not None:
                    raise StopRequested
        except StopRequested:
            if dd.main:
                save_checkpoint(out, step, model, optimizer, scheduler)
                print(f"\nstopped by signal {stop['signal']} after step {step}; "
                      f"resume with: python -m decpo.train --resume {out} "
                      f"--max-steps {cfg.max_steps}")  # fmt: skip
            summary = {"stopped_at": step}
        except FloatingPointError as exc:
            bar.close()
            raise SystemExit(f"decpo.train: {exc}") from None
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
                (out / "summary.json").write_text(json.dumps(summary, indent=1))
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
