"""decpo's Triton kernels on a GPU at the benchmark shapes, against float64.

The op tests (tests/ops, tests/triton_backend; DECPO_TEST_DEVICE=cuda on a GPU) use
small shapes, so on a GPU most of them take one tile; this script runs the shapes
the GPU benchmarks time (Llama-2/3 and Qwen2.5 heads at N = 8192, the decorrelation
cases) plus the flags at a real size (bias, softcap, temperature, statistics, ignored
rows, a trainable head, masks and unsorted groups with unaligned D). For each check:
decpo (backend="triton") and eager PyTorch at the same dtype, both against the
float64 reference on the same rounded inputs (computed in row chunks), relative
Frobenius error of every output and gradient. A check passes when decpo's error is
within docs/design.md's tolerance for the dtype and no worse than PyTorch's own plus
a quarter of that tolerance (tests/helpers.py:assert_close's rule). Before each decpo
call the allocator's cache is filled with NaN, so an output element a kernel never
writes shows up as NaN instead of a plausible stale value.

    python -m bench.gpu_check            # table; bench/results/gpu-check-cuda-<date>.json
    python -m bench.gpu_check --only decorrelation
    TRITON_INTERPRET=1 python -m bench.gpu_check --device cpu --tiny   # CI: the script itself
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import decpo
from bench.render import git_commit
from decpo.numerics import interpreting
from decpo.reference import (
    decorrelation_penalty_reference,
    eager_logprobs_from_logits,
    eager_token_logprobs,
    logprobs_from_logits_reference,
    token_logprobs_reference,
)
from tests.helpers import TOL, rel_err

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = torch.device("cuda")  # --device cpu (with TRITON_INTERPRET=1 and --tiny): CI's run
TINY = False  # --tiny: every size shrunk to 17..63 (shrink), for the CPU interpreter
# Rows per float64 reference chunk: (1024, 152064) fp64 logits = 1.2 GB. PyTorch at the
# input dtype runs unchunked, as a user would (chunks would add rounding to a trainable
# head's gradient, summed over them).
ROW_CHUNK = 1024
Outputs = dict[str, torch.Tensor]


@dataclass
class Check:
    name: str
    dtype: torch.dtype
    run: Callable[[str], Outputs]  # "decpo" | "eager" | "float64" -> named outputs


def shrink(size: int) -> int:
    """The size itself, or with --tiny a small stand-in (17..63) that keeps sizes
    distinct and mostly unaligned."""
    return 17 + size % 47 if TINY else size


def _poison_cache(gib: float = 16.0) -> None:
    """Fill the CUDA caching allocator's free memory with NaN: the kernels' outputs are
    carved from it next, so an unwritten element reads NaN."""
    if DEVICE.type != "cuda":
        return
    block = torch.full((int(gib * (1 << 28)),), float("nan"), device=DEVICE)  # (gib 2^28,) fp32
    del block


def _chunked(
    fn: Callable[..., torch.Tensor],
    hidden: torch.Tensor,
    rows: dict[str, torch.Tensor],
    upstream: torch.Tensor,
    chunk: int,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(hidden, **rows, **kwargs) over row chunks of hidden (N, ...) and of the
    row-aligned tensors in `rows`: (out, d hidden) for the loss sum(out * upstream).
    Tensors in kwargs that require grad (a trainable head) accumulate .grad."""
    outs, grads = [], []
    for start in range(0, hidden.shape[0], chunk):
        part = hidden[start : start + chunk].detach().requires_grad_(True)
        out = fn(part, **{k: v[start : start + chunk] for k, v in rows.items()}, **kwargs)
        (out * upstream[start : start + chunk]).sum().backward()
        outs.append(out.detach())
        grads.append(part.grad)
    return torch.cat(outs), torch.cat(grads)


def token_check(name: str, n: int, d: int, v: int, dtype: torch.dtype, *, trainable: bool = False,
                bias: bool = False, stats: bool = False, **options) -> Check:  # fmt: skip
    """token_logprobs on a (V, D) head; 5% of the targets ignored."""
    n, d, v = shrink(n), shrink(d), shrink(v)
    gen = torch.Generator(device=DEVICE).manual_seed(n + d + v)
    h = torch.randn(n, d, device=DEVICE, generator=gen).to(dtype)  # (N, D)
    w = (torch.randn(v, d, device=DEVICE, generator=gen) / d**0.5).to(dtype)  # (V, D)
    b = (torch.randn(v, device=DEVICE, generator=gen) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
    if stats:  # a third of the targets at the row's argmax, so argmax_match is not all 0
        top = torch.cat([(h[s : s + ROW_CHUNK].float() @ w.float().T).argmax(-1)
                         for s in range(0, n, ROW_CHUNK)])  # fmt: skip
        pick = torch.rand(n, device=DEVICE, generator=gen) < 0.3
        t = torch.where(pick, top, t)
    t[torch.rand(n, device=DEVICE, generator=gen) < 0.05] = -100
    g = torch.randn(n, device=DEVICE, generator=gen)  # upstream d logp

    def run(provider: str) -> Outputs:
        work = torch.float64 if provider == "float64" else dtype
        weight = w.to(work, copy=True).requires_grad_(trainable)
        bias_ = None if b is None else b.to(work)
        if provider == "decpo":
            _poison_cache()
            x = h.clone().requires_grad_(True)
            out = decpo.token_logprobs(x, weight, t, bias=bias_, return_stats=stats,
                                       backend="triton", **options)  # fmt: skip
            logp, st = out if stats else (out, None)
            logp.backward(g)
            res = {"logp": logp.detach(), "d hidden": x.grad}
            if st is not None:
                res.update({f"stats.{k}": getattr(st, k) for k in st._fields})
        else:
            fn = token_logprobs_reference if provider == "float64" else eager_token_logprobs
            chunk = ROW_CHUNK if provider == "float64" else n
            logp, dh = _chunked(fn, h.to(work), {"targets": t}, g, chunk, weight=weight,
                                bias=bias_, **options)  # fmt: skip
            res = {"logp": logp, "d hidden": dh}
            if stats and provider == "float64":
                with torch.no_grad():
                    parts = [token_logprobs_reference(h[r].double(), weight, t[r], bias_,
                                                      return_stats=True, **options)[1]
                             for r in (slice(s, s + ROW_CHUNK) for s in range(0, n, ROW_CHUNK))]  # fmt: skip  # noqa: E501
                res.update({f"stats.{k}": torch.cat([p[k] for p in parts]) for k in parts[0]})
        if trainable:
            res["d weight"] = weight.grad
        return res

    return Check(name, dtype, run)


def logits_check(name: str, n: int, v: int, dtype: torch.dtype, temperature: float = 1.0) -> Check:
    n, v = shrink(n), shrink(v)
    gen = torch.Generator(device=DEVICE).manual_seed(n + v)
    x = (torch.randn(n, v, device=DEVICE, generator=gen) * 3).to(dtype)  # (N, V)
    t = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
    t[torch.rand(n, device=DEVICE, generator=gen) < 0.05] = -100
    g = torch.randn(n, device=DEVICE, generator=gen)

    def run(provider: str) -> Outputs:
        if provider == "decpo":
            _poison_cache()
            xg = x.clone().requires_grad_(True)
            out = decpo.logprobs_from_logits(xg, t, temperature=temperature, backend="triton")
            out.backward(g)
            return {"logp": out.detach(), "d logits": xg.grad}
        fn = logprobs_from_logits_reference if provider == "float64" else eager_logprobs_from_logits
        work = torch.float64 if provider == "float64" else dtype
        chunk = ROW_CHUNK if provider == "float64" else n
        out, grad = _chunked(fn, x.to(work), {"targets": t}, g, chunk, temperature=temperature)
        return {"logp": out, "d logits": grad}

    return Check(name, dtype, run)


def decorrelation_check(name: str, shape: tuple[int, ...], dtype: torch.dtype, groups: int = 1,
                        ragged: bool = False, **options) -> Check:  # fmt: skip
    """hidden of `shape`, (N, D) or (L, N, D); `groups` contiguous equal groups, or with
    `ragged` unsorted ids of uneven groups and a mask dropping ~10% of the rows."""
    shape = (*shape[:-2], *(shrink(x) for x in shape[-2:]))
    gen = torch.Generator(device=DEVICE).manual_seed(sum(shape))
    h = torch.randn(*shape, device=DEVICE, generator=gen).to(dtype)
    n = shape[-2]
    seg = mask = None
    if groups > 1:
        seg = torch.arange(n, device=DEVICE) // (n // groups)
    if ragged:
        seg = torch.randint(0, 5, (n,), device=DEVICE, generator=gen) ** 2  # uneven, unsorted
        mask = torch.rand(n, device=DEVICE, generator=gen) > 0.1
    upstream = -1.7

    def run(provider: str) -> Outputs:
        work = torch.float64 if provider == "float64" else dtype
        x = h.to(work, copy=True).requires_grad_(True)
        if provider == "decpo":
            _poison_cache()
            loss = decpo.decorrelation_penalty(x, mask=mask, segment_ids=seg, backend="triton",
                                               **options)  # fmt: skip
        else:  # float64, or PyTorch's own at the input dtype: the reference formula
            loss = decorrelation_penalty_reference(x, mask, seg, **options)
        (loss * upstream).backward()
        return {"penalty": loss.detach(), "d hidden": x.grad}

    return Check(name, dtype, run)


def checks() -> list[Check]:
    bf16, fp32 = torch.bfloat16, torch.float32
    return [
        token_check("token_logprobs Llama-3-8B N=8192", 8192, 4096, 128256, bf16),
        token_check("token_logprobs Llama-2-7B N=8192", 8192, 4096, 32000, bf16),
        token_check("token_logprobs Qwen2.5-7B N=8192", 8192, 3584, 152064, bf16),
        token_check(
            "token_logprobs unaligned N=3001 D=4095 V=50257 bias softcap T stats",
            3001,
            4095,
            50257,
            bf16,
            bias=True,
            stats=True,
            softcap=30.0,
            temperature=0.7,
            logit_scale=1.3,
        ),
        token_check(
            "token_logprobs trainable head Llama-2-7B N=4096",
            4096,
            4096,
            32000,
            bf16,
            trainable=True,
        ),
        token_check(
            "token_logprobs fp32 N=2048 D=2048 V=32000 trainable",
            2048,
            2048,
            32000,
            fp32,
            trainable=True,
        ),
        token_check("token_logprobs fp16 N=2048 D=4096 V=32000", 2048, 4096, 32000, torch.float16),
        logits_check("logprobs_from_logits Llama-3-8B N=8192", 8192, 128256, bf16),
        logits_check("logprobs_from_logits fp32 N=4096 V=32001 T=0.7", 4096, 32001, fp32, 0.7),
        decorrelation_check("decorrelation 16 groups x 1024 D=4096", (16384, 4096), bf16, 16),
        decorrelation_check("decorrelation 1 group x 16384 D=4096", (16384, 4096), bf16),
        decorrelation_check("decorrelation last token 8 layers x 64 D=14336", (8, 64, 14336), bf16),
        decorrelation_check("decorrelation fp32 4 groups x 512 D=4096", (2048, 4096), fp32, 4),
        decorrelation_check(
            "decorrelation ragged masked N=5000 D=4095 offdiag",
            (5000, 4095),
            bf16,
            ragged=True,
            offdiag=True,
        ),
        decorrelation_check(
            "decorrelation 2 layers N=3000 D=509 unnormalized sum",
            (2, 3000, 509),
            bf16,
            ragged=True,
            normalize=False,
            reduction="sum",
        ),
    ]


def evaluate(check: Check) -> dict:
    """Errors of decpo and eager against float64 per output; pass/fail; seconds."""
    start = time.perf_counter()
    ref = check.run("float64")
    eager = check.run("eager")
    ours = check.run("decpo")
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    again = check.run("decpo")  # run to run: bit-identical?
    tol = TOL[check.dtype]
    outputs, ok = {}, True
    for key, expected in ref.items():
        err = rel_err(ours[key], expected, 1e-3)
        eager_err = rel_err(eager[key], expected, 1e-3) if key in eager else float("nan")
        finite = bool(torch.isfinite(ours[key]).all())
        passed = finite and err <= tol and not err > eager_err + tol / 4
        ok &= passed
        outputs[key] = {"decpo_err": err, "eager_err": eager_err, "finite": finite,
                        "bit_identical_rerun": bool(torch.equal(ours[key], again[key])),
                        "passed": passed}  # fmt: skip
    del ref, eager, ours, again
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return {"check": check.name, "dtype": str(check.dtype).removeprefix("torch."),
            "tolerance": tol, "passed": ok, "outputs": outputs,
            "seconds": time.perf_counter() - start}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    global DEVICE, TINY
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="only checks whose name contains this")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: the Triton interpreter, with --tiny")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="sizes shrunk to 17..63")
    args = parser.parse_args(argv)
    DEVICE, TINY = torch.device(args.device), args.tiny
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_check needs a CUDA GPU (or --device cpu --tiny under "
              "TRITON_INTERPRET=1)", file=sys.stderr)  # fmt: skip
        return 2
    if DEVICE.type == "cpu" and not (interpreting() and TINY):
        print("--device cpu runs the Triton interpreter: set TRITON_INTERPRET=1 and pass --tiny",
              file=sys.stderr)  # fmt: skip
        return 2
    import triton

    rows = []
    for check in checks():
        if args.only not in check.name:
            continue
        try:
            row = evaluate(check)
        except Exception as exc:  # record and go on: one broken kernel must not hide the rest
            row = {"check": check.name, "passed": False, "error": f"{type(exc).__name__}: {exc}"}
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        worst = max((o["decpo_err"] for o in row.get("outputs", {}).values()), default=float("nan"))
        status = "ok  " if row["passed"] else "FAIL"
        print(f"{status} {row['check']:<72} worst decpo err {worst:.2e} "
              f"{row.get('error', '')}", flush=True)  # fmt: skip
        for key, o in row.get("outputs", {}).items():
            print(f"       {key:<20} decpo {o['decpo_err']:.2e}  eager {o['eager_err']:.2e}"
                  f"  rerun identical {o['bit_identical_rerun']}", flush=True)  # fmt: skip
    commit = git_commit()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (Triton interpreter)"
    result = {"device": name, "tiny": TINY, "torch": torch.__version__,
              "triton": triton.__version__, "commit": commit, "date": stamp,
              "rows": rows}  # fmt: skip
    out = Path(args.out) if args.out else RESULTS / f"gpu-check-{DEVICE.type}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    failed = [r["check"] for r in rows if not r["passed"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed; {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
