"""A small, reproducible replication of the DecPO paper's claims (Yan et al. 2024):
SFT, then DPO against DecPO at several lambda, on the synthetic demo task and on the
Anthropic HH harmless-base test split, with the tiny Llama and several seeds.

    python -m experiments.replicate            # about 30 minutes on 2 busy CPU cores

For every dataset and seed: SFT on the chosen responses (--loss sft), the SFT adapter
merged into its base model, then from that model DPO and DecPO (lambda in --lambdas)
with the same seed, data order and steps. The held-out split is by prompt (no eval
prompt occurs in training) and is the same for every seed (decpo.train's
--split-seed, left at its default), so seeds vary only the model, LoRA init and data
order. Reported, as mean +- std over seeds (the shape of the paper's Table 2):
held-out reward accuracy and margin at the end, and per layer the change in feature
decorrelation (1 - mean pairwise cosine similarity of mlp.up_proj activations at the
last token of the held-out prompts, decpo.probe) from the SFT model to the trained
one. Then the paired differences DecPO minus DPO, per seed (same seed, same SFT
model, same data order), as mean +- std over seeds with a two-sided paired t-test
(Student t with seeds - 1 degrees of freedom) and the count of seeds where DecPO is
higher. Curves (the paper's Figures 5 and 7): held-out decorrelation of the
regularized rows and reward margin over steps. Everything lands in
experiments/results/: replication_<dataset>.json per dataset with the command that
produced it (so one dataset can be rerun on its own), README.md built from all of
them, and the curves; runs in experiments/runs/.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from decpo import probe, train

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def merge_sft(run: Path) -> Path:
    """The SFT run's adapter merged into its base model, saved as a local model."""
    model, tokenizer = probe.load_for_probe(str(run / "base_model"), str(run))
    out = run / "merged"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_run(args: list[str], reuse: bool = False) -> dict:
    """One decpo.train run; a rerun starts each run over (--overwrite), unless `reuse`
    and the run already finished with the same configuration (its summary.json)."""
    if reuse:
        out = Path(args[args.index("--output-dir") + 1])
        cfg = train.config_from_json(json.loads((out / "config.json").read_text())) if (
            out / "config.json").is_file() else None  # fmt: skip
        wanted = train.parse_args(args)
        wanted.schedule_steps = wanted.schedule_steps or wanted.max_steps  # as a run saves it
        if cfg is not None and (out / "summary.json").is_file() and (
                train.identity(cfg) == train.identity(wanted)):  # fmt: skip
            return json.loads((out / "summary.json").read_text())
    return train.main([*args, "--overwrite"])


def eval_curve(run: Path, key: str) -> list[tuple[int, float]]:
    """(step, held-out metric) from step 0 (eval_before.json) to the end."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval/" + key]) for r in rows if "eval/" + key in r]
    before = run / "eval_before.json"
    if before.is_file() and (not curve or curve[0][0] != 0):
        curve.insert(0, (0, json.loads(before.read_text())[key]))
    return curve


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def t_test_p(t: float, df: int) -> float:
    """Two-sided p-value P(|T| >= |t|) of Student's t with integer df >= 1, in closed
    form (Abramowitz and Stegun 26.7.3-4: with theta = atan(|t| / sqrt(df)),
    P(|T| < |t|) is a finite series in cos(theta))."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    # odd df: (2/pi)(theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...)), last power df - 3
    if df % 2:
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    else:  # even: sin(theta) (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...), df - 2 last power
        term, series = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            series += term
        inside = math.sin(theta) * series
    return min(1.0, max(0.0, 1.0 - inside))


def paired(decpo: list[float], dpo: list[float]) -> dict:
    """Per-seed differences decpo - dpo: their mean, std, paired t-test and how many
    are positive."""
    diffs = [a - b for a, b in zip(decpo, dpo, strict=True)]
    mean = statistics.mean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    if len(diffs) < 2:
        p = float("nan")
    elif std == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = t_test_p(mean / (std / math.sqrt(len(diffs))), len(diffs) - 1)
    return {"diffs": diffs, "mean": mean, "std": std, "p": p,
            "higher": sum(d > 0 for d in diffs)}  # fmt: skip


def paired_cell(stats: dict) -> str:
    n = len(stats["diffs"])
    return (f"{stats['mean']:+.3f} ± {stats['std']:.3f} (p={stats['p']:.2g}, "
            f"{stats['higher']}/{n})")  # fmt: skip


def _common(dataset: str, seed: int, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """(the seed's run directory, the decpo.train flags every run of it shares)."""
    data_args = ["--data", str(HH), "--max-length", "256"] if dataset == "hh" else []
    common = ["--seed", str(seed), "--batch-size", "8", "--eval-every", str(args.eval_every),
              "--dec-layers", "all", *data_args]  # fmt: skip
    return Path(args.out) / "runs" / dataset / f"seed{seed}", common


def run_sft(dataset: str, seed: int, args: argparse.Namespace, threads: int) -> None:
    """SFT for one dataset and seed, its adapter merged into RUN/sft/merged."""
    torch.set_num_threads(threads)
    base, common = _common(dataset, seed, args)
    train_run([*common, "--loss", "sft", "--max-steps", str(args.sft_steps),
               "--output-dir", str(base / "sft")], args.reuse)  # fmt: skip
    merge_sft(base / "sft")


def run_variant(
    dataset: str, seed: int, name: str, flags: list[str], args: argparse.Namespace, threads: int
) -> dict:
    """One variant from the seed's merged SFT model: {acc, margin, delta (per layer:
    held-out decorrelation after minus the SFT model's), curves}."""
    torch.set_num_threads(threads)
    base, common = _common(dataset, seed, args)
    merged = base / "sft" / "merged"
    run = base / name.replace(" ", "_").replace("λ=", "lambda")
    summary = train_run([
        *common, *flags, "--model", str(merged), "--lr", "2e-3",
        "--max-steps", str(args.steps), "--output-dir", str(run),
    ], args.reuse)  # fmt: skip
    sft_model, tokenizer = probe.load_for_probe(str(merged), None)
    prompts = probe.held_out_prompts(base / "sft", tokenizer, 128)
    pad = tokenizer.pad_token_id
    before = probe.probe(sft_model, prompts, pad).decorrelation
    model, _ = probe.load_for_probe(str(merged), str(run))
    after = probe.probe(model, prompts, pad).decorrelation
    return {
        "acc": summary["eval/rewards/accuracies"],
        "margin": summary["eval/rewards/margins"],
        "delta": [a - b for a, b in zip(after, before, strict=True)],
        "curves": {"decorrelation": eval_curve(run, "dec/decorrelation"),
                   "margin": eval_curve(run, "rewards/margins")},
    }  # fmt: skip


def variants(lambdas: list[float]) -> list[tuple[str, list[str]]]:
    return [("DPO", ["--loss", "dpo"])] + [
        (f"DecPO λ={lam:g}", ["--loss", "decpo", "--dec-weight", str(lam)]) for lam in lambdas
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "hh"])
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="parallel processes (1 thread each) when > 1: the SFT runs, then the variant runs",
    )  # fmt: skip
    parser.add_argument(
        "--reuse", action="store_true",
        help="keep runs that already finished with the same configuration (rebuild the "
        "table from them); without it every run starts over",
    )  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "experiments"))
    args = parser.parse_args()
    results_dir = Path(args.out) / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in args.datasets if d != "hh" or HH.is_file()]
    if len(datasets) < len(args.datasets):
        print(f"skipping hh: {HH} not found")
    started = time.time()
    record: dict = {"command": "python -m experiments.replicate " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("out", "reuse")), "datasets": {}}  # fmt: skip
    seeds = [(dataset, seed) for dataset in datasets for seed in args.seeds]
    runs = [(d, s, name, flags) for d, s in seeds for name, flags in variants(args.lambdas)]
    if args.jobs > 1:  # every SFT in parallel, then every variant run in parallel
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            for future in [pool.submit(run_sft, d, s, args, 1) for d, s in seeds]:
                future.result()
            futures = [pool.submit(run_variant, *r, args, 1) for r in runs]
            outcomes = [f.result() for f in futures]
    else:
        threads = torch.get_num_threads()
        for d, s in seeds:
            run_sft(d, s, args, threads)
        outcomes = [run_variant(*r, args, threads) for r in runs]
    results: dict[tuple[str, int], dict] = {}
    for (d, s, name, _), outcome in zip(runs, outcomes, strict=True):
        results.setdefault((d, s), {})[name] = outcome
    for dataset in datasets:
        names = [name for name, _ in variants(args.lambdas)]
        per_variant: dict[str, dict] = {
            name: {"acc": [], "margin": [], "delta": [], "curves": []} for name in names
        }
        for seed in args.seeds:
            for name, values in results[(dataset, seed)].items():
                for key, value in values.items():
                    per_variant[name][key].append(value)
        record["datasets"][dataset] = per_variant
    minutes = (time.time() - started) / 60
    for dataset, per_variant in record["datasets"].items():
        add_paired(per_variant)
        saved = {"command": record["command"], "minutes": minutes, "reused": args.reuse,
                 "variants": per_variant}  # fmt: skip
        (results_dir / f"replication_{dataset}.json").write_text(json.dumps(saved, indent=1))
    write_report(results_dir)


def add_paired(per_variant: dict) -> None:
    """Each DecPO variant's paired differences against DPO, per seed."""
    dpo = per_variant["DPO"]
    for name, slot in per_variant.items():
        if name == "DPO":
            continue
        n_layers = len(dpo["delta"][0])
        slot["paired_vs_dpo"] = {
            "acc": paired(slot["acc"], dpo["acc"]),
            "margin": paired(slot["margin"], dpo["margin"]),
            "delta": [paired([d[i] for d in slot["delta"]], [d[i] for d in dpo["delta"]])
                      for i in range(n_layers)],
        }  # fmt: skip


def write_report(results_dir: Path) -> None:
    """README.md and curves from every results_dir/replication_<dataset>.json (each
    dataset keeps the command that produced it, so datasets can be rerun apart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {"synthetic": 0, "hh": 1}
    files = sorted(results_dir.glob("replication_*.json"),
                   key=lambda f: (order.get(f.stem[len("replication_"):], 2), f.name))  # fmt: skip
    lines = ["# DecPO mini-replication", ""]
    for file in files:
        dataset = file.stem[len("replication_") :]
        saved = json.loads(file.read_text())
        per_variant = saved["variants"]
        took = (f"assembled with --reuse from finished runs in {saved['minutes']:.1f} minutes"
                if saved.get("reused") else f"{saved['minutes']:.1f} minutes")  # fmt: skip
        lines += [f"## {dataset}", "", f"Command: `{saved['command']}` ({took} on the shared "
                  f"2-core CPU machine, torch {torch.__version__}).", ""]  # fmt: skip
        n_layers = len(next(iter(per_variant.values()))["delta"][0])
        layer_cols = " | ".join(f"Δ decorrelation L{i}" for i in range(n_layers))
        rule = " | ".join("---" for _ in range(n_layers))
        lines += [f"| method | held-out reward accuracy | reward margin | {layer_cols} |",
                  f"| --- | --- | --- | {rule} |"]  # fmt: skip
        for name, slot in per_variant.items():
            deltas = [mean_std([d[i] for d in slot["delta"]]) for i in range(n_layers)]
            lines.append(f"| {name} | {mean_std(slot['acc'])} | {mean_std(slot['margin'])} | "
                         + " | ".join(deltas) + " |")  # fmt: skip
        dpo = per_variant["DPO"]
        n_seeds = len(dpo["acc"])
        lines += ["", f"Paired differences DecPO − DPO over the {n_seeds} seeds: mean ± std "
                  "of the per-seed differences (p: two-sided paired t-test; k/n: seeds where "
                  "DecPO is higher).", "",
                  f"| method | Δ accuracy | Δ margin | {layer_cols} |",
                  f"| --- | --- | --- | {rule} |"]  # fmt: skip
        for name, slot in per_variant.items():
            if name == "DPO":
                continue
            stats = slot["paired_vs_dpo"]
            cells = [stats["acc"], stats["margin"], *stats["delta"]]
            lines.append(f"| {name} | " + " | ".join(map(paired_cell, cells)) + " |")
        lines.append("")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        for name, slot in per_variant.items():
            for ax, key in zip(axes, ("decorrelation", "margin"), strict=True):
                curves = [c[key] for c in slot["curves"]]
                steps = [s for s, _ in curves[0]]
                mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
                ax.plot(steps, mean, "o-", ms=3, label=name)
        axes[0].set_title(f"{dataset}: held-out decorrelation (Fig. 5)")
        axes[1].set_title(f"{dataset}: held-out reward margin (Fig. 7)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        png = results_dir / f"curves_{dataset}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        lines += [f"![{dataset} curves]({png.name})", ""]
    (results_dir / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
