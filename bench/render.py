"""Turn bench/results/*.json into bench/README.md tables and PNG plots.

python -m bench.render
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
DECPO = ("decpo", "decpo-torch")


def git_commit() -> str:
    """The checkout's short commit (with -dirty for uncommitted changes to tracked
    files), or DECPO_COMMIT where set: a copy without .git, such as the tree a GPU
    machine receives, is told its commit by the command that runs it."""
    if commit := os.environ.get("DECPO_COMMIT"):
        return commit
    try:
        git = ["git", "-C", str(BENCH)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        commit += "-dirty" if dirty and commit else ""
    except OSError:
        commit = ""
    return commit or "unknown"


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers: virtual machines often
    report only "AMD EPYC", and the numbers tell the generations apart (family 25
    model 1 is Zen 3, model 17 Zen 4)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    name = info.get("model name", platform.machine())
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def environment(device: str) -> dict:
    """device, commit and versions recorded with every result file."""
    commit = git_commit()
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{cpu_model()}, {torch.get_num_threads()} threads"
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "transformers", "trl", "cut_cross_entropy", "liger_kernel"):
        with contextlib.suppress(ImportError, AttributeError):
            versions[module] = __import__(module).__version__
    return {"device": device, "device_name": name, "commit": commit or "unknown",
            "versions": versions}  # fmt: skip


def summarize(rows: list[dict]) -> None:
    """Add vs_eager and vs_best_other (decpo rows: against the fastest non-decpo
    provider; other rows: against the fastest decpo provider) to each row."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["mode"]), []).append(r)
    for group in groups.values():
        eager = next((r["median_ms"] for r in group if r["provider"] == "eager"), math.nan)
        ours = [r["median_ms"] for r in group if r["provider"] in DECPO]
        theirs = [r["median_ms"] for r in group if r["provider"] not in DECPO]
        for r in group:
            r["vs_eager"] = eager / r["median_ms"]
            other = theirs if r["provider"] in DECPO else ours
            r["vs_best_other"] = min(other) / r["median_ms"] if other else math.nan


def _latest(pattern: str) -> dict | None:
    files = sorted(RESULTS_DIR.glob(pattern))
    return json.loads(files[-1].read_text()) | {"file": files[-1].name} if files else None


def _newest_per_case(device: str) -> list[dict]:
    """The ops result files of `device` that hold the newest measurement of some
    benchmark case and mode, newest first, each cut to those: a run over a subset of
    the cases or modes (one GPU call) then shows beside the older run that measured
    the rest, each under its own commit and date. Cases no longer in bench/cases.py
    are left out."""
    from bench.cases import cases_for

    current = {(c.op, c.name) for c in cases_for(device)}
    records, seen = [], set()
    for path in sorted(RESULTS_DIR.glob(f"ops-{device}-*.json"), reverse=True):
        record = json.loads(path.read_text()) | {"file": path.name}
        keys = {(r["op"], r["case"], r["mode"]) for r in record["results"]}  # per mode:
        mine = {k for k in keys if k[:2] in current} - seen  # a run may time only some
        if mine:
            seen |= mine
            rows = [r for r in record["results"] if (r["op"], r["case"], r["mode"]) in mine]
            records.append(record | {"results": rows})
    return records


def _cpu_peaks(peaks: dict) -> str:
    """The CPU-only rates of the floors, as a sentence tail ('' where not measured)."""
    parts = []
    if "fp32_matmul_flops" in peaks:
        parts.append(f"fp32 matmul {peaks['fp32_matmul_flops'] / 1e12:.2f} TFLOP/s")
    if "native_exp_per_s" in peaks:
        parts.append(f"native exp {peaks['native_exp_per_s'] / 1e9:.1f} G/s")
    if "native_exp_bf16_per_s" in peaks:
        parts.append(f"bf16-gradient exp {peaks['native_exp_bf16_per_s'] / 1e9:.1f} G/s")
    if "fresh_page_bytes_per_s" in peaks:
        parts.append(f"fresh pages zeroed at {peaks['fresh_page_bytes_per_s'] / 1e9:.1f} GB/s")
    return "".join(f", {p}" for p in parts)


def _ops_table(record: dict) -> list[str]:
    peaks = record["peaks"]
    lines = [
        f"**{record['device_name']}**, {record['date']}, commit {record['commit']}, "
        f"torch {record['versions'].get('torch')} (`{record['file']}`). Measured peaks: bf16 "
        f"matmul {peaks['bf16_matmul_flops'] / 1e12:.2f} TFLOP/s, copy "
        f'{peaks["copy_bytes_per_s"] / 1e9:.1f} GB/s{_cpu_peaks(peaks)}. "% of floor" = time '
        "at those peaks for the case's minimum FLOPs, bytes and exps (bench/cases.py:"
        'floor_seconds) / measured time. "vs best other": decpo rows against the fastest '
        "non-decpo provider, others against the fastest decpo one.",
        "",
        "| case | mode | provider | median ms | vs eager | vs best other | % of floor | "
        "extra peak MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in record["results"]:
        name = f"{r['op']} {r['case']}"
        bold = "**" if r["provider"] in DECPO else ""
        lines.append(
            f"| {name} | {r['mode']} | {bold}{r['provider']}{bold} | {r['median_ms']:.2f} | "
            f"{r['vs_eager']:.2f}x | {r['vs_best_other']:.2f}x | {r['pct_of_floor']:.0f}% | "
            f"{r.get('extra_mib', '')} |"
        )
    return lines


def _plot(record: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["results"] if r["mode"] == "fwd+bwd"]
    cases = list(dict.fromkeys(f"{r['op']}\n{r['case']}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 4))
    width = 0.8 / len(providers)
    for k, p in enumerate(providers):
        xs, ys = [], []
        for i, c in enumerate(cases):
            hit = [r for r in rows if f"{r['op']}\n{r['case']}" == c and r["provider"] == p]
            if hit:
                xs.append(i + k * width)
                ys.append(hit[0]["vs_eager"])
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, fontsize=7)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("speed-up over eager (fwd+bwd)")
    ax.set_title(f"{record['device_name']} ({record['date'][:10]})", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = RESULTS_DIR / f"ops-{record['device']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _train_table(record: dict) -> list[str]:
    lines = [
        f"**{record['device_name']}**, {record['date']}, commit {record['commit']} "
        f"(`{record['file']}`): {record['setup']}",
        "",
        "| trainer | median step ms | vs TRL | extra peak MiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    trl = record["results"].get("TRL DPOTrainer", {}).get("median_step_ms")
    for name, r in record["results"].items():
        ratio = f"{r['median_step_ms'] / trl:.2f}x" if trl else ""
        lines.append(f"| {name} | {r['median_step_ms']:.1f} | {ratio} | {r.get('extra_mib', '')} |")
    if "overhead_pct" in record:
        lines += ["", f"DecPO's step time relative to DPO's: {record['overhead_pct']:+.1f}%."]
    return lines


def render() -> Path:
    """Rewrite the results section of bench/README.md from the newest result files."""
    body: list[str] = []
    for device in ("cuda", "cpu"):
        records = _newest_per_case(device)
        if not records:
            body += [f"### Ops on {device}", "", "Not measured yet.", ""]
            continue
        body += [f"### Ops on {device}", ""]
        for record in records:
            summarize(record["results"])
            body += [*_ops_table(record), ""]
        dates = sorted({rec["date"][:10] for rec in records})
        merged = records[0] | {
            "results": [r for rec in records for r in rec["results"]],
            "device_name": " / ".join(sorted({rec["device_name"] for rec in records})),
            "date": " to ".join(dict.fromkeys([dates[0], dates[-1]])),
        }
        plot = _plot(merged)
        body += [f"![speed-up over eager]({plot.relative_to(BENCH)})", ""]
    for device in ("cuda", "cpu"):
        record = _latest(f"train-step-{device}-*.json")
        body += [f"### Training step on {device}", ""]
        body += _train_table(record) if record else ["Not measured yet."]
        body.append("")
    readme = BENCH / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n" + "\n".join(body) + "\n" + END + tail)
    return readme


if __name__ == "__main__":
    print(render())
