"""One training step of decpo.train (DPO and DecPO) against TRL's DPOTrainer on the
same tiny Llama, data, batch, sequence length and LoRA rank (CPU).

    python -m bench.train_step            # prints a table, writes bench/results/

Steady-state step time is the median over steps after a warm-up; both sides run
forward (policy and reference), backward and the optimizer update.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from decpo import data, models, train

BATCH, MAX_LENGTH, LORA_R, STEPS, WARMUP = 8, 128, 8, 40, 10


def _setup() -> tuple[torch.nn.Module, object, list[data.PreferencePair]]:
    tokenizer = models.build_tokenizer(data.demo_corpus())
    model = models.build_tiny_model(tokenizer, seed=0)
    model = models.add_lora(model, LORA_R, None, list(models.DEFAULT_LORA_TARGETS))
    return model, tokenizer, data.synthetic_pairs(BATCH * (STEPS + 1), seed=0)


def decpo_step_times(loss: str) -> list[float]:
    model, tokenizer, pairs = _setup()
    cfg = train.Config(loss=loss, batch_size=BATCH, max_length=MAX_LENGTH, lora_r=LORA_R)
    tokenized, _ = data.tokenize_pairs(pairs, tokenizer, MAX_LENGTH)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3)
    device = torch.device("cpu")
    times = []
    with train.DecorrelationHooks(model, cfg.dec_module) as hooks:
        for step in range(STEPS):
            started = time.perf_counter()
            batch = data.collate(
                tokenized[step * BATCH : (step + 1) * BATCH], tokenizer.pad_token_id
            )
            value, _ = train.forward_pair_batch(model, batch, cfg, hooks, device, train=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
    return times[WARMUP:]


def trl_step_times() -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, tokenizer, pairs = _setup()
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    config = DPOConfig(
        output_dir="/tmp/decpo-bench-trl", per_device_train_batch_size=BATCH, max_steps=STEPS,
        learning_rate=2e-3, beta=0.1, max_length=MAX_LENGTH, logging_steps=STEPS,
        report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[Timer()],
    )  # fmt: skip
    trainer.train()
    return times[WARMUP:]


def main() -> dict:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    results = {
        "decpo.train dpo": statistics.median(decpo_step_times("dpo")) * 1e3,
        "decpo.train decpo": statistics.median(decpo_step_times("decpo")) * 1e3,
    }
    try:
        results["TRL DPOTrainer"] = statistics.median(trl_step_times()) * 1e3
    except ImportError as exc:
        print(f"TRL not installed ({exc}): pip install -e '.[trl]'")
    trl_ms = results.get("TRL DPOTrainer")
    shape = (
        f"{models.TINY_CONFIG['num_hidden_layers']} layers, d={models.TINY_CONFIG['hidden_size']}"
    )
    print(f"step time, tiny Llama ({shape}), {BATCH} pairs, LoRA r={LORA_R}, CPU:")
    for name, ms in results.items():
        ratio = f"{ms / trl_ms:.2f}x TRL" if trl_ms else ""
        print(f"  {name:20s} {ms:7.1f} ms  {ratio}")
    overhead = results["decpo.train decpo"] / results["decpo.train dpo"] - 1
    print(f"  regularizer overhead over DPO: {overhead * 100:.1f}%")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (out / f"train-step-cpu-{stamp}.json").write_text(json.dumps(
        {"date": stamp, "device": "cpu", "torch": torch.__version__, "median_step_ms": results},
        indent=1,
    ))  # fmt: skip
    return results


if __name__ == "__main__":
    main()
