"""TRL's DPOTrainer (its own fused LM head) against DecPOTrainer (decpo's head) on a
model whose head matters: a Qwen2.5-0.5B-shaped config (vocabulary 151936, hidden
896, tied embeddings) cut to 2 decoder layers, random init, LoRA r=16, 4 pairs x 256
tokens per step.

    python -m bench.trl_head            # CPU; each trainer in a fresh process

Both trainers run the same TRL DPO step (policy and reference forwards, backward,
AdamW) with gradient checkpointing off; only the log-prob head and, at dec_weight
0.1, the regularizer differ. Step time is the median over the steps after a warm-up;
peak memory is VmHWM (CUDA: max_memory_allocated) during training minus the baseline
before the first step. Note: on CPU TRL's head scores every position, prompt and
padding included (it drops ignored labels only on CUDA/XPU, where Triton runs);
decpo's head scores only the completion tokens on every device.
Results go to bench/results/trl-head-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from bench.train_step import _memory_peak, step_timer
from decpo import data, models

QWEN_05B_2L = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
               "num_hidden_layers": 2, "num_attention_heads": 14, "num_key_value_heads": 2,
               "max_position_embeddings": 4096, "tie_word_embeddings": True}  # fmt: skip
SETUP = {"pairs": 4, "max_length": 256, "lora_r": 16, "steps": 5, "warmup": 2}
TRAINERS = ("TRL DPOTrainer", "DecPOTrainer dec_weight=0", "DecPOTrainer dec_weight=0.1")


def _model_and_data(device: str) -> tuple[torch.nn.Module, object, list[dict]]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = models.build_tokenizer(data.demo_corpus())
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **QWEN_05B_2L,
    ))  # fmt: skip
    model = models.add_lora(model, SETUP["lora_r"], None, list(models.DEFAULT_LORA_TARGETS))
    n = SETUP["pairs"] * SETUP["steps"]
    short = data.synthetic_pairs(n, seed=0)
    # ~128 prompt tokens and a completion cut at max_length: every sequence is 256 long.
    rows = [{"prompt": p.prompt * 9, "chosen": p.chosen * 40, "rejected": p.rejected * 40}
            for p in short]  # fmt: skip
    return model.to(device), tokenizer, rows


def run_one(name: str, device: str) -> dict:
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from decpo.integrations.trl import DecPOConfig, DecPOTrainer

    model, tokenizer, rows = _model_and_data(device)
    times: list[float] = []
    memory = {"base": 0.0}

    common = dict(
        output_dir="/tmp/decpo-bench-trl-head", per_device_train_batch_size=SETUP["pairs"],
        max_steps=SETUP["steps"], learning_rate=1e-4, beta=0.1,
        max_length=SETUP["max_length"], logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=device == "cpu", dataloader_num_workers=0,
        disable_tqdm=True, bf16=device == "cuda", gradient_checkpointing=False,
    )  # fmt: skip
    if name.startswith("TRL"):
        cls, config = DPOTrainer, DPOConfig(**common)
    else:
        weight = float(name.split("=")[-1])
        cls, config = DecPOTrainer, DecPOConfig(**common, dec_weight=weight)
    timer = step_timer(device, times, memory)
    trainer = cls(model=model, args=config, train_dataset=Dataset.from_list(rows),
                  processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"median_step_ms": statistics.median(times[SETUP["warmup"] :]) * 1e3,
            "step_ms": [round(t * 1e3, 1) for t in times],
            "extra_mib": round(max(0.0, _memory_peak(device) - memory["base"]), 1),
            "tokens_per_sequence": int(batch["attention_mask"].sum(1).max()),
            "scored_tokens_per_step": int(batch["completion_mask"][:, 1:].sum()),
            "all_positions_per_step": int(batch["input_ids"].shape[0]
                                          * (batch["input_ids"].shape[1] - 1)),
            "first_loss": losses[0] if losses else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one trainer, in-process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device)))
        return
    from bench.render import RESULTS_DIR, environment

    env = environment(args.device)  # the commit measured, before anything else changes
    results = {}
    for name in TRAINERS:
        out = subprocess.run([sys.executable, "-m", "bench.trl_head", "--device", args.device,
                              "--one", name], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-3000:]}")
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:30s} {results[name]['median_step_ms']:9.1f} ms  "
              f"{results[name]['extra_mib']:8.1f} MiB", flush=True)  # fmt: skip
    stamp = datetime.datetime.now(datetime.timezone.utc)
    record = {**env, "date": stamp.isoformat(timespec="seconds"),
              "setup": "Qwen2.5-0.5B-shaped (V=151936, D=896, tied head), 2 decoder layers, "
                       f"random init, LoRA r={SETUP['lora_r']}, {SETUP['pairs']} pairs x "
                       f"{SETUP['max_length']} tokens, no gradient checkpointing, median of "
                       f"{SETUP['steps'] - SETUP['warmup']} steps after {SETUP['warmup']} "
                       "warm-up steps; memory: peak during training minus the baseline "
                       "before the first step; TRL's head scores every position on CPU",
              "results": results}  # fmt: skip
    trl = results.get("TRL DPOTrainer")
    if trl:
        record["ratios_vs_trl"] = {
            name: {"time": r["median_step_ms"] / trl["median_step_ms"],
                   "memory": r["extra_mib"] / trl["extra_mib"] if trl["extra_mib"] else None}
            for name, r in results.items() if name != "TRL DPOTrainer"
        }  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"trl-head-{args.device}-{stamp:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
