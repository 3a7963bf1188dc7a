"""The benchmark suite's plumbing stays runnable: cases build and run on tiny shapes,
work counts are right, results render."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import cases, render


def _tiny(case: cases.Case) -> cases.Case:
    dims = {"N": 24, "D": 16, "V": 40} if case.op != "decorrelation_penalty" else {
        "G": 2, "n": 8, "D": 16}  # fmt: skip
    return cases.Case(case.op, case.name, dims, case.providers, extra=case.extra)


@pytest.mark.parametrize("case", [*cases.CPU_CASES[::3], cases.CPU_CASES[-1]], ids=lambda c: c.key)
@pytest.mark.parametrize("provider", ["decpo", "decpo-torch", "eager"])
@pytest.mark.parametrize("mode", cases.MODES)
def test_cases_run_on_tiny_shapes(case, provider, mode):
    setup, run = cases.build(_tiny(case), provider, mode, "cpu")
    run(setup())
    run(setup())


def test_work_counts():
    case = cases.Case("token_logprobs", "x", {"N": 2, "D": 3, "V": 5}, ())
    assert cases.work(case, "fwd+bwd")[0] == 4 * 2 * 3 * 5
    dec = cases.Case("decorrelation_penalty", "x", {"G": 2, "n": 4, "D": 8}, ())
    assert cases.work(dec, "fwd+bwd")[0] == 2 * 3 * 4 * 8 * 4


def test_floor_adds_fresh_pages_of_a_large_gradient():
    """On CPU a returned gradient of 32 MiB or more adds its fresh pages' zeroing to the
    floor (after the max of the FLOP, byte and exp bounds); smaller ones and the
    forward do not."""
    peak = {"bf16_matmul_flops": 1e12, "fp32_matmul_flops": 1e12, "copy_bytes_per_s": 1e12,
            "native_exp_per_s": 1e9, "fresh_page_bytes_per_s": 2e10}  # fmt: skip
    big = cases.Case("logprobs_from_logits", "x", {"N": 4096, "V": 32000}, ())
    nv = 4096 * 32000
    assert cases.fresh_output_bytes(big, "fwd") == 0
    assert cases.fresh_output_bytes(big, "fwd+bwd") == nv * 2
    assert cases.floor_seconds(big, "fwd+bwd", peak) == pytest.approx(2 * nv / 1e9 + nv * 2 / 2e10)
    assert cases.floor_seconds(big, "fwd", peak) == pytest.approx(nv / 1e9)
    small = cases.Case("logprobs_from_logits", "x", {"N": 64, "V": 32000}, ())
    assert cases.fresh_output_bytes(small, "bwd") == 0
    without = {k: v for k, v in peak.items() if k != "fresh_page_bytes_per_s"}  # e.g. CUDA
    assert cases.floor_seconds(big, "fwd+bwd", without) == pytest.approx(2 * nv / 1e9)


def _ops_record(case: cases.Case, date: str, ms: dict[str, float]) -> dict:
    rows = [
        {"op": case.op, "case": case.name, "provider": p, "mode": "fwd+bwd", "median_ms": t,
         "pct_of_floor": 50.0, "extra_mib": 1.0}
        for p, t in ms.items()
    ]  # fmt: skip
    peaks = {"bf16_matmul_flops": 1e12, "copy_bytes_per_s": 1e10}
    return {**render.environment("cpu"), "date": date, "peaks": peaks, "results": rows}


def test_render_writes_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "RESULTS_DIR", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{render.START}\nold\n{render.END}\ntail\n")
    monkeypatch.setattr(render, "BENCH", tmp_path)
    case = cases.CPU_CASES[0]
    record = _ops_record(case, "2026-01-01", {"decpo": 1.0, "eager": 2.0, "compile": 1.5})
    (tmp_path / "ops-cpu-1.json").write_text(json.dumps(record))
    render.render()
    text = readme.read_text()
    row = f"| {case.op} {case.name} | fwd+bwd | **decpo** | 1.00 | 2.00x | 1.50x | 50% | 1.0 |"
    assert row in text
    assert text.endswith("tail\n") and "old" not in text
    assert (tmp_path / "ops-cpu.png").is_file()


def test_render_takes_each_case_from_its_newest_run(tmp_path, monkeypatch):
    """A run over some cases shows beside the older run that measured the others, each
    under its own date; cases bench/cases.py no longer has are left out."""
    monkeypatch.setattr(render, "RESULTS_DIR", tmp_path)
    a, b = cases.CPU_CASES[0], cases.CPU_CASES[1]
    old = _ops_record(a, "2026-01-01", {"decpo": 4.0, "eager": 8.0})
    old["results"] += _ops_record(b, "2026-01-01", {"decpo": 3.0})["results"]
    old["results"].append(old["results"][0] | {"case": "a case since removed"})
    (tmp_path / "ops-cpu-20260101.json").write_text(json.dumps(old))
    (tmp_path / "ops-cpu-20260102.json").write_text(
        json.dumps(_ops_record(a, "2026-01-02", {"decpo": 1.0, "eager": 2.0}))
    )
    fwd_only = _ops_record(b, "2026-01-02", {"decpo": 0.5})
    fwd_only["results"][0]["mode"] = "fwd"
    (tmp_path / "ops-cpu-20260103.json").write_text(json.dumps(fwd_only))
    records = render._newest_per_case("cpu")
    assert [r["date"] for r in records] == ["2026-01-02", "2026-01-02", "2026-01-01"]
    assert [(r["case"], r["mode"]) for r in records[0]["results"]] == [(b.name, "fwd")]
    records = records[1:]  # b's fwd+bwd row stays with the run that timed that mode
    assert {(r["case"], r["median_ms"]) for r in records[0]["results"]} == {
        (a.name, 1.0),
        (a.name, 2.0),
    }
    assert {r["case"] for r in records[1]["results"]} == {b.name}


def test_interleaved_rounds_time_every_provider(monkeypatch):
    """DECPO_BENCH_INTERLEAVE: one warm-up each, then rounds alternating between the
    providers of the case that run in the mode here (compiled ones: fwd+bwd only)."""
    from bench import test_ops

    monkeypatch.setattr(test_ops, "_INTERLEAVED", {})
    case = _tiny(cases.CPU_CASES[0])
    seconds = test_ops.interleaved_seconds(case, "fwd", rounds=3)
    timed = [p for p in case.providers
             if "fwd" in cases.modes_for(case, p) and not cases.available(p, "cpu")]  # fmt: skip
    assert list(seconds) == timed and "decpo" in timed and "compile" not in timed
    assert all(len(v) == 3 and min(v) > 0 for v in seconds.values())
    assert test_ops.interleaved_seconds(case, "fwd", rounds=3) is seconds  # measured once


def test_a_benchmark_session_writes_results_but_never_the_readme(tmp_path, monkeypatch):
    """bench/conftest.py records results; only `python -m bench.render` edits the README."""
    from bench import conftest, measure, test_ops

    monkeypatch.setattr(conftest, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(measure, "peaks", lambda device: {"bf16_matmul_flops": 1.0})
    row = {"op": "token_logprobs", "case": "c", "provider": "eager", "mode": "fwd",
           "median_ms": 2.0, "pct_of_floor": 10.0}  # fmt: skip
    monkeypatch.setattr(test_ops, "RESULTS", [row])
    readme = render.BENCH / "README.md"
    before = readme.read_bytes()
    lines: list[str] = []

    class Reporter:
        write_line = staticmethod(lines.append)

    conftest.pytest_terminal_summary(Reporter(), 0, None)
    assert readme.read_bytes() == before
    (written,) = tmp_path.glob("ops-*.json")
    assert json.loads(written.read_text())["results"][0]["median_ms"] == 2.0
    assert "python -m bench.render" in lines[-1]


def test_twins_times_both_dtypes_on_tiny_shapes(monkeypatch):
    """bench.twins' child measurement: every case in bf16 and fp32, ratios per round."""
    from bench import measure, twins

    tiny = [_tiny(c) for c in cases.CPU_CASES]
    monkeypatch.setattr(cases, "cases_for", lambda device: tiny)
    monkeypatch.setattr(measure, "warm_memory", lambda gib=4.0: 0.0)
    rows = twins.measure(rounds=2)
    assert [r["case"] for r in rows] == list(twins.CASES)
    for r in rows:
        low, high = r["ratio_range"]
        assert r["bf16_ms"] > 0 and r["fp32_ms"] > 0 and low <= r["ratio_median"] <= high


def test_trainable_head_case_gives_the_weight_a_gradient():
    """bench.twins' trainable-head twin: the weight needs a gradient, each round
    starts without one and ends with it."""
    import dataclasses

    case = next(c for c in cases.CPU_CASES if c.key == "token_logprobs/N=256 D=512 V=32000")
    case = dataclasses.replace(_tiny(case), extra={"trainable_head": True})
    setup, run = cases.build(case, "decpo", "fwd+bwd", "cpu")
    weight = run.args[0]
    assert weight.requires_grad
    for _ in range(2):
        setup()
        assert weight.grad is None
        run(None)
        assert weight.grad is not None and weight.grad.shape == weight.shape


def test_bf16_gradient_exps_count_at_their_own_rate():
    """The forward's exps at the 1-ulp rate; a bf16 gradient's at the bf16-accurate
    exp's rate (where measured); an fp32 gradient's at the 1-ulp rate."""
    import dataclasses

    import torch

    case = next(c for c in cases.CPU_CASES if c.key == "logprobs_from_logits/N=4096 V=32000")
    nv = 4096 * 32000
    peak = {"native_exp_per_s": 1e9, "native_exp_bf16_per_s": 2e9}
    assert cases.exp_seconds(case, "fwd+bwd", peak) == nv / 1e9 + nv / 2e9
    assert cases.exp_seconds(case, "fwd", peak) == nv / 1e9
    fp32 = dataclasses.replace(case, dtype=torch.float32)
    assert cases.exp_seconds(fp32, "fwd+bwd", peak) == 2 * nv / 1e9
    assert cases.exp_seconds(case, "bwd", {"native_exp_per_s": 1e9}) == nv / 1e9


def test_cpu_results_name_the_cpu_generation(monkeypatch, tmp_path):
    """The device name carries /proc/cpuinfo's family and model numbers (a virtual
    machine's "AMD EPYC" alone does not tell Zen 3 from Zen 4)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\n"
                       "model name\t: AMD EPYC\nprocessor\t: 1\nmodel\t\t: 99\n")  # fmt: skip
    real_path = render.Path
    monkeypatch.setattr(
        render, "Path", lambda p: cpuinfo if str(p) == "/proc/cpuinfo" else real_path(p)
    )
    assert render.cpu_model() == "AMD EPYC (family 25, model 17)"
    assert render.environment("cpu")["device_name"].startswith("AMD EPYC (family 25, model 17), ")


def test_twins_interval_is_the_order_statistic_interval_of_the_median():
    """n = 11: the 2nd smallest and 2nd largest (98.8% coverage; the 3rd would give
    93.5%); n < 6: the whole range; the verdict needs the whole interval past 1."""
    from bench import twins

    values = [float(v) for v in range(11)][::-1]
    assert twins.median_interval(values) == (1.0, 9.0)
    assert twins.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    # n = 100: ranks 40 and 61 (1-based), the textbook 95% interval for the median.
    assert twins.median_interval([float(v) for v in range(1, 101)]) == (40.0, 61.0)
    assert twins.verdict((1.01, 1.2)) == "bf16 slower"
    assert twins.verdict((0.8, 0.99)) == "bf16 faster"
    assert twins.verdict((0.97, 1.04)) == "tie"


def test_twins_pools_processes_and_needs_them_to_agree():
    """Pooled rounds give the median and interval; a verdict needs every process's
    median on its side of 1 (one process at 0.88 and one at 1.02: a tie)."""
    from bench import twins

    def row(ratios: list[float]) -> dict:
        return {"case": "c", "bf16_ms": 1.0, "fp32_ms": 1.0, "native_isa": "avx2",
                "ratio_median": sorted(ratios)[len(ratios) // 2], "ratios": ratios}  # fmt: skip

    slow = [1.02 + 0.001 * i for i in range(11)]
    fast = [0.88 + 0.001 * i for i in range(11)]
    (agree,) = twins.pool([[row(slow)], [row(slow)]])
    assert agree["rounds"] == 22 and agree["processes"] == 2
    assert agree["verdict"] == "bf16 slower"
    (split,) = twins.pool([[row(slow)], [row(slow)], [row(slow)], [row(fast)]])
    assert split["process_medians"] == [1.025, 1.025, 1.025, 0.885]
    assert twins.verdict(tuple(split["ratio_interval95"])) == "bf16 slower"  # pooled alone
    assert split["verdict"] == "tie"  # but one process disagrees
    assert twins.median_interval(split["ratios"]) == tuple(split["ratio_interval95"])


@pytest.mark.parametrize("op", ["logits_fwd", "logits_bwd", "decorrelation"])
def test_native_ab_compares_two_builds(op, tmp_path, capsys):
    """bench.native_ab loads two copies of the library side by side, forces both to one
    variant, times them alternately and finds a build equal to itself bit for bit."""
    from bench import native_ab
    from decpo.native_backend import library

    if not library.is_available():
        pytest.skip(library.unavailable_reason())
    before = library.active_isa()
    copy = tmp_path / "old.so"
    copy.write_bytes(Path(library.loaded_path()).read_bytes())
    native_ab.main([str(copy), "--op", op, "--isa", "baseline", "--dtype", "fp32", "--rounds",
                    "2", "--tiny"])  # fmt: skip
    out = capsys.readouterr().out
    assert "on baseline" in out and "DIFFER" not in out
    assert out.count("bitwise equal") == (2 if op == "logits_bwd" else 1)
    assert library.active_isa() == before  # the process's own library is restored


def test_gpu_check_runs_its_checks_on_the_interpreter(tmp_path):
    """bench.gpu_check's own logic (references, eager baselines, the pass rule, JSON)
    at tiny sizes on the Triton interpreter; on a GPU it runs the benchmark shapes."""
    from bench import gpu_check

    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["rows"]) == len(gpu_check.checks()) >= 15
    for row in result["rows"]:
        assert row["passed"], row
        assert {"logp", "penalty"} & set(row["outputs"])
        for o in row["outputs"].values():
            assert o["finite"] and o["decpo_err"] <= row["tolerance"]


def test_train_step_gpu_pairs_fit_max_length():
    """The GPU training-step setup cuts long prompts from the left on the host, so that
    TRL (which drops pairs whose prompt fills max_length) and decpo.train see the same
    full sequences."""
    from bench import train_step
    from decpo import data, models

    tokenizer = models.build_tokenizer(data.demo_corpus())
    for p in data.synthetic_pairs(20, seed=1):
        long = data.PreferencePair(p.prompt * 80, p.chosen * 4, p.rejected * 4)
        fit = train_step._fit(long, tokenizer, 1024)
        assert long.prompt.endswith(fit.prompt) and fit.chosen == long.chosen
        lengths = [len(tokenizer(fit.prompt + c)["input_ids"]) for c in (fit.chosen, fit.rejected)]
        assert 900 < max(lengths) <= 1016
