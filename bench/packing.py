"""Training throughput of decpo.train's three batch layouts on real preference data:
padded (every micro-batch right-padded to its longest sequence), packed (--packing)
and length-grouped (--group-by-length, padded).

    python -m bench.packing            # HH harmless-base test split, tiny Llama, CPU
    python -m bench.packing --render   # only re-render bench/README.md from the latest JSON

One process, the three variants interleaved (padded, packed, grouped, padded, ...)
so that load from other users of the machine falls on all three alike; each round
times --steps full training steps (collate, policy and reference forwards, DecPO
penalty, backward, AdamW) per variant, and the reported pairs/s is the median over
rounds. Padded and packed train on the same micro-batches (the seeded permutation);
grouped draws its own from the length-grouped order of the same epoch. Padding per
pair is counted over the whole epoch: tokens that go through the model (rows x
width) minus real tokens, per pair. Results go to
bench/results/packing-<device>-<date>.json and a table in bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from decpo import data, models, train

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
HH = BENCH.parents[1] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
START, END = "<!-- packing:start -->", "<!-- packing:end -->"
VARIANTS = ("padded", "packed", "grouped")


def config(variant: str, args: argparse.Namespace) -> train.Config:
    return train.Config(loss="decpo", batch_size=args.pairs, max_length=args.max_length,
                        packing=variant == "packed", group_by_length=variant == "grouped",
                        seed=0)  # fmt: skip


def padding_per_pair(train_set: list, cfg: train.Config, pad_id: int, steps: int) -> float:
    """Padding tokens that go through the model per pair over `steps` steps."""
    padding = pairs = 0
    for step in range(steps):
        for micro in train.micro_batches(train_set, cfg, 1, 0, step):
            batch = train.collate_pairs(micro, cfg, pad_id)
            real = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in micro)
            padding += batch["input_ids"].numel() - real
            pairs += len(micro)
    return padding / pairs


def measure(args: argparse.Namespace) -> dict:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    tokenizer = models.build_tokenizer(data.demo_corpus())
    pairs = data.read_pairs(args.data, tokenizer)
    tokenized, skipped = data.tokenize_pairs(pairs, tokenizer, args.max_length)
    model = models.add_lora(models.build_tiny_model(tokenizer, 0), 8, None,
                            list(models.DEFAULT_LORA_TARGETS))  # fmt: skip
    train.check_packing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    cpu = torch.device("cpu")
    cfgs = {v: config(v, args) for v in VARIANTS}
    pad_id = tokenizer.pad_token_id
    steps_per_epoch = len(tokenized) // args.pairs
    lengths = [len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized]

    def run_steps(variant: str, first: int) -> float:
        cfg = cfgs[variant]
        started = time.perf_counter()
        with train.DecorrelationHooks(model, cfg.dec_module) as hooks:
            for step in range(first, first + args.steps):
                for micro in train.micro_batches(tokenized, cfg, 1, 0, step % steps_per_epoch):
                    batch = train.collate_pairs(micro, cfg, pad_id)
                    loss, _ = train.forward_pair_batch(model, batch, cfg, hooks, cpu, train=True)
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return args.steps * args.pairs / (time.perf_counter() - started)

    for variant in VARIANTS:  # warm-up
        run_steps(variant, 0)
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS:
            rates[variant].append(run_steps(variant, (r + 1) * args.steps))
        print(f"round {r + 1}/{args.rounds}: "
              + ", ".join(f"{v} {rates[v][-1]:.2f}" for v in VARIANTS) + " pairs/s")  # fmt: skip
    results = {}
    for variant in VARIANTS:
        results[variant] = {
            "pairs_per_s": statistics.median(rates[variant]),
            "pairs_per_s_rounds": [round(x, 3) for x in rates[variant]],
            "padding_tokens_per_pair": padding_per_pair(tokenized, cfgs[variant], pad_id,
                                                        steps_per_epoch),
        }  # fmt: skip
    padded = results["padded"]["pairs_per_s"]
    for variant in VARIANTS:
        results[variant]["speedup"] = results[variant]["pairs_per_s"] / padded
    return {"data": Path(args.data).name, "pairs": len(tokenized), "skipped": skipped,
            "real_tokens_per_pair": statistics.mean(lengths),
            "setup": f"tiny Llama (4 layers, d=64), LoRA r=8 on all projections, --loss decpo "
                     f"(all layers, last tokens), {args.pairs} pairs per step, --max-length "
                     f"{args.max_length}, {args.rounds} rounds x {args.steps} steps per "
                     "variant after a warm-up round, interleaved",
            "results": results}  # fmt: skip


def render() -> Path:
    """The table of the latest packing-*.json into bench/README.md (between the
    packing markers; the section is appended once if the markers are absent)."""
    from bench.render import _latest

    record = _latest("packing-cpu-*.json")
    if record is None:
        raise SystemExit("no bench/results/packing-cpu-*.json: run python -m bench.packing")
    lines = [
        f"**{record['device_name']}**, {record['date']}, commit {record['commit']} "
        f"(`{record['file']}`): {record['data']}, {record['pairs']} pairs "
        f"({record['skipped']} longer than --max-length skipped), "
        f"{record['real_tokens_per_pair']:.0f} real tokens per pair; {record['setup']}.",
        "",
        "| layout | pairs/s (median) | vs padded | vs padded, same round (median) | padding "
        "tokens per pair | rounds (pairs/s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    padded_rounds = record["results"]["padded"]["pairs_per_s_rounds"]
    names = {"padded": "padded", "packed": "packed (`--packing`)",
             "grouped": "length-grouped (`--group-by-length`)"}  # fmt: skip
    for variant, row in record["results"].items():
        rounds = ", ".join(f"{x:.2f}" for x in row["pairs_per_s_rounds"])
        # Load drifts between rounds; within a round the variants ran back to back.
        paired = statistics.median(x / p for x, p in zip(row["pairs_per_s_rounds"], padded_rounds,
                                                         strict=True))  # fmt: skip
        padding = row["padding_tokens_per_pair"]
        lines.append(f"| {names[variant]} | {row['pairs_per_s']:.2f} | {row['speedup']:.2f}x | "
                     f"{paired:.2f}x | {padding:.0f} | {rounds} |")  # fmt: skip
    lines += [
        "",
        "Padded and packed train on the same micro-batches; length-grouped draws its own "
        "steps from the grouped order, so its rate also depends on the lengths it drew "
        "(its padding per pair, counted over the epoch, does not).",
    ]
    readme = BENCH / "README.md"
    text = readme.read_text()
    body = START + "\n" + "\n".join(lines) + "\n" + END
    if START in text:
        head, rest = text.split(START, 1)
        text = head + body + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Packing and length grouping (CPU)\n\n" + body + "\n"
    readme.write_text(text)
    return readme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(HH), help="preference file (default: HH test)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="tokens per sequence (1024: almost no HH pair is cut)",
    )
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--render", action="store_true", help="only re-render the README table")
    args = parser.parse_args()
    if not args.render:
        from bench.render import environment

        record = measure(args)
        stamp = datetime.datetime.now(datetime.timezone.utc)
        record = {**environment("cpu"), "date": stamp.isoformat(timespec="seconds"), **record}
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"packing-cpu-{stamp:%Y%m%d-%H%M%S}.json"
        path.write_text(json.dumps(record, indent=1))
        for variant, row in record["results"].items():
            print(f"{variant:8s} {row['pairs_per_s']:7.2f} pairs/s  {row['speedup']:.2f}x  "
                  f"{row['padding_tokens_per_pair']:7.1f} padding tokens/pair")  # fmt: skip
        print(f"results written to {path}")
    print(f"rendered {render()}")


if __name__ == "__main__":
    main()
