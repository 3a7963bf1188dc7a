"""A small, reproducible replication of the DecPO paper's claims (Yan et al. 2024):
SFT, then DPO against DecPO at several lambda, on the synthetic demo task and on the
Anthropic HH harmless-base test split, with the tiny Llama and several seeds.

    python -m experiments.replicate            # about 10 minutes on 2 CPU cores

For every dataset and seed: SFT on the chosen responses (--loss sft), the SFT adapter
merged into its base model, then from that model DPO and DecPO (lambda in --lambdas)
with the same seed, data order and steps. Reported, as mean +- std over seeds (the
shape of the paper's Table 2): held-out reward accuracy and margin at the end, and
per layer the change in feature decorrelation (1 - mean pairwise cosine similarity
of mlp.up_proj activations at the last token of the held-out prompts, decpo.probe)
from the SFT model to the trained one. Curves (the paper's Figures 5 and 7):
held-out decorrelation of the regularized rows and reward margin over steps. Everything lands in
experiments/results/ (README.md table, JSON, PNG); runs in experiments/runs/.
"""

from __future__ import annotations

import argparse
import json
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


def train_run(args: list[str]) -> dict:
    """One decpo.train run; a rerun starts each run over (--overwrite)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "hh"])
    parser.add_argument("--out", default=str(ROOT / "experiments"))
    args = parser.parse_args()
    out = Path(args.out)
    runs, results_dir = out / "runs", out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    variants = [("DPO", ["--loss", "dpo"])] + [
        (f"DecPO λ={lam:g}", ["--loss", "decpo", "--dec-weight", str(lam)]) for lam in args.lambdas
    ]
    started = time.time()
    record: dict = {"command": "python -m experiments.replicate " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out"), "datasets": {}}  # fmt: skip
    for dataset in args.datasets:
        if dataset == "hh" and not HH.is_file():
            print(f"skipping hh: {HH} not found")
            continue
        data_args = ["--data", str(HH), "--max-length", "256"] if dataset == "hh" else []
        per_variant: dict[str, dict] = {name: {"acc": [], "margin": [], "delta": [],
                                               "curves": []} for name, _ in variants}  # fmt: skip
        for seed in args.seeds:
            base = runs / dataset / f"seed{seed}"
            common = ["--seed", str(seed), "--batch-size", "8", "--eval-every", "25", *data_args]
            train_run([*common, "--loss", "sft", "--max-steps", str(args.sft_steps),
                       "--output-dir", str(base / "sft")])  # fmt: skip
            merged = merge_sft(base / "sft")
            sft_model, tokenizer = probe.load_for_probe(str(merged), None)
            prompts = probe.held_out_prompts(base / "sft", tokenizer, 128)
            pad = tokenizer.pad_token_id
            before = probe.probe(sft_model, prompts, pad).decorrelation
            for name, flags in variants:
                run = base / name.replace(" ", "_").replace("λ=", "lambda")
                summary = train_run([
                    *common, *flags, "--model", str(merged), "--lr", "2e-3",
                    "--max-steps", str(args.steps), "--output-dir", str(run),
                ])  # fmt: skip
                model, _ = probe.load_for_probe(str(merged), str(run))
                after = probe.probe(model, prompts, pad).decorrelation
                slot = per_variant[name]
                slot["acc"].append(summary["eval/rewards/accuracies"])
                slot["margin"].append(summary["eval/rewards/margins"])
                slot["delta"].append([a - b for a, b in zip(after, before, strict=True)])
                slot["curves"].append({"decorrelation": eval_curve(run, "dec/decorrelation"),
                                       "margin": eval_curve(run, "rewards/margins")})  # fmt: skip
        record["datasets"][dataset] = per_variant
    record["minutes"] = (time.time() - started) / 60
    (results_dir / "replication.json").write_text(json.dumps(record, indent=1))
    write_report(record, results_dir)


def write_report(record: dict, results_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# DecPO mini-replication", "", f"Command: `{record['command']}` "
             f"({record['minutes']:.1f} minutes on the 2-core CPU machine, "
             f"torch {torch.__version__}).", ""]  # fmt: skip
    for dataset, per_variant in record["datasets"].items():
        n_layers = len(next(iter(per_variant.values()))["delta"][0])
        layer_cols = " | ".join(f"Δ decorrelation L{i}" for i in range(n_layers))
        rule = " | ".join("---" for _ in range(n_layers))
        lines += [f"## {dataset}", "",
                  f"| method | held-out reward accuracy | reward margin | {layer_cols} |",
                  f"| --- | --- | --- | {rule} |"]  # fmt: skip
        for name, slot in per_variant.items():
            deltas = [mean_std([d[i] for d in slot["delta"]]) for i in range(n_layers)]
            lines.append(f"| {name} | {mean_std(slot['acc'])} | {mean_std(slot['margin'])} | "
                         + " | ".join(deltas) + " |")  # fmt: skip
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
