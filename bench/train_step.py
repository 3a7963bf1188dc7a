"""One training step of decpo.train (DPO and DecPO) against TRL's DPOTrainer on the
same model, data, batch, sequence length and LoRA rank.

    python -m bench.train_step                 # CPU: the tiny demo Llama, 8 pairs
    python -m bench.train_step --device cuda   # GPU: a ~1B Llama, 8 pairs x 1024 tokens

Each trainer runs in a fresh process; its steady-state step time is the median over
the steps after a warm-up, and its peak memory is what the steps need beyond the
model and optimizer (CUDA: max_memory_allocated; CPU: VmHWM after a reset). Both
sides run the policy and reference forwards, the backward and the optimizer update.
Results go to bench/results/train-step-<device>-<date>.json and bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from decpo import data, models, train

SETUPS = {
    "cpu": {"pairs": 8, "max_length": 128, "lora_r": 8, "model": "tiny", "steps": 80, "warmup": 10},
    "cuda": {
        "pairs": 8,
        "max_length": 1024,
        "lora_r": 16,
        "model": "llama-1b",
        "steps": 25,
        "warmup": 5,
    },
}
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
            "max_position_embeddings": 2048}  # fmt: skip
TRAINERS = ("decpo.train dpo", "decpo.train decpo", "TRL DPOTrainer", "TRL DPOTrainer + Liger")


def _setup(device: str) -> tuple[torch.nn.Module, object, list[data.PreferencePair], dict]:
    cfg = SETUPS[device]
    tokenizer = models.build_tokenizer(data.demo_corpus())
    if cfg["model"] == "tiny":
        model = models.build_tiny_model(tokenizer, seed=0)
        pairs = data.synthetic_pairs(cfg["pairs"] * (cfg["steps"] + 1), seed=0)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(device):  # initialized where it runs: 16 s on 2 CPU cores
            model = LlamaForCausalLM(LlamaConfig(
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, **LLAMA_1B,
            )).to(torch.bfloat16)  # fmt: skip
        short = data.synthetic_pairs(cfg["pairs"] * (cfg["steps"] + 1), seed=0)
        # Long prompts cut from the left on the host so that prompt + longer completion
        # just fits max_length: every trainer sees the same full sequences. (Left
        # longer, decpo.train would cut them from the left while TRL's DPOTrainer,
        # truncating from the right, drops every pair whose prompt fills max_length:
        # on the first GPU run it was left with no data.)
        pairs = [_fit(data.PreferencePair(p.prompt * 80, p.chosen * 4, p.rejected * 4),
                      tokenizer, cfg["max_length"]) for p in short]  # fmt: skip
    model = models.add_lora(model, cfg["lora_r"], None, list(models.DEFAULT_LORA_TARGETS))
    return model.to(device), tokenizer, pairs, cfg


def _fit(
    pair: data.PreferencePair, tokenizer: object, max_length: int, margin: int = 8
) -> data.PreferencePair:
    """The pair with its prompt cut from the left until prompt + either completion is
    at most max_length - margin tokens (the margin covers special tokens and merges
    across the boundary)."""

    def length(prompt: str) -> int:
        return max(len(tokenizer(prompt + c)["input_ids"]) for c in (pair.chosen, pair.rejected))

    lo, hi = 0, len(pair.prompt)  # characters dropped: lo too few (unless 0 fits), hi enough
    if length(pair.prompt) <= max_length - margin:
        return pair
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if length(pair.prompt[mid:]) <= max_length - margin else (mid, hi)
    return data.PreferencePair(pair.prompt[hi:], pair.chosen, pair.rejected)


def step_timer(device: str, times: list[float], memory: dict[str, float]) -> object:
    """A transformers TrainerCallback appending each step's wall time to `times` (CUDA
    synchronized) and the memory baseline at train begin to memory["base"]."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            memory["base"] = _memory_reset(device)

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.started)

    return Timer()


def _memory_reset(device: str) -> float:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def _memory_peak(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mib("VmHWM")


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def run_decpo(loss: str, device: str) -> dict:
    model, tokenizer, pairs, setup = _setup(device)
    b = setup["pairs"]
    cfg = train.Config(loss=loss, batch_size=b, max_length=setup["max_length"],
                       lora_r=setup["lora_r"])  # fmt: skip
    tokenized, _ = data.tokenize_pairs(pairs, tokenizer, setup["max_length"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    dev = torch.device(device)
    steps, warmup = setup["steps"], setup["warmup"]
    times = []
    base = _memory_reset(device)  # model and data in place; activations, grads, Adam to come
    with train.DecorrelationHooks(model, cfg.dec_module) as hooks:
        for step in range(steps):
            started = time.perf_counter()
            batch = data.collate(tokenized[step * b : (step + 1) * b], tokenizer.pad_token_id)
            batch = {k: v.to(dev) for k, v in batch.items()}
            value, _ = train.forward_pair_batch(model, batch, cfg, hooks, dev, train=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        peak = _memory_peak(device)
    return {"median_step_ms": statistics.median(times[warmup:]) * 1e3,
            "extra_mib": round(max(0.0, peak - base), 1)}  # fmt: skip


def run_trl(device: str, liger: bool) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer, pairs, setup = _setup(device)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    times: list[float] = []
    memory = {"base": 0.0}
    steps, warmup = setup["steps"], setup["warmup"]

    config = DPOConfig(
        output_dir="/tmp/decpo-bench-trl", per_device_train_batch_size=setup["pairs"],
        max_steps=steps, learning_rate=1e-4, beta=0.1, max_length=setup["max_length"],
        logging_steps=steps, report_to="none", save_strategy="no", use_cpu=device == "cpu",
        dataloader_num_workers=0, disable_tqdm=True, bf16=device == "cuda",
        use_liger_kernel=liger,
        gradient_checkpointing=False,  # TRL 1.x defaults to True; decpo.train does not
    )  # fmt: skip
    timer = step_timer(device, times, memory)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    trainer.train()
    return {"median_step_ms": statistics.median(times[warmup:]) * 1e3,
            "extra_mib": round(max(0.0, _memory_peak(device) - memory["base"]), 1)}  # fmt: skip


def run_one(name: str, device: str) -> dict:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    if name.startswith("decpo.train"):
        return run_decpo(name.split()[-1], device)
    return run_trl(device, liger=name.endswith("Liger"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one trainer, in-process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device)))
        return
    from bench.render import RESULTS_DIR, environment

    results = {}
    for name in TRAINERS:
        if name.endswith("Liger") and args.device != "cuda":
            continue
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "bench.train_step", "--device", args.device,
                              "--one", name], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:26s} {results[name]['median_step_ms']:8.1f} ms  "
              f"{results[name]['extra_mib']:8.1f} MiB  "
              f"({time.perf_counter() - started:.0f} s with setup)", flush=True)  # fmt: skip
        partial = (
            Path(__file__).resolve().parent / "results" / f"train-step-{args.device}.partial.json"
        )
        partial.parent.mkdir(exist_ok=True)
        partial.write_text(json.dumps(results, indent=1))  # kept if a time limit cuts the run
    setup = SETUPS[args.device]
    stamp = datetime.datetime.now(datetime.timezone.utc)
    record = {**environment(args.device), "date": stamp.isoformat(timespec="seconds"),
              "setup": f"{setup['model']} Llama, {setup['pairs']} pairs, max_length "
                       f"{setup['max_length']}, LoRA r={setup['lora_r']}, no gradient "
                       f"checkpointing, median of {setup['steps'] - setup['warmup']} steps "
                       f"after {setup['warmup']} warm-up steps; memory: peak during training "
                       "minus the baseline before the first step",
              "results": results}  # fmt: skip
    if "decpo.train dpo" in results and "decpo.train decpo" in results:
        dpo_ms = results["decpo.train dpo"]["median_step_ms"]
        record["overhead_pct"] = 100 * (results["decpo.train decpo"]["median_step_ms"] / dpo_ms - 1)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"train-step-{args.device}-{stamp:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    (RESULTS_DIR / f"train-step-{args.device}.partial.json").unlink(missing_ok=True)
    print(f"results written to {path}; `python -m bench.render` updates bench/README.md")


if __name__ == "__main__":
    main()
