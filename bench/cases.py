"""Benchmark cases: op x shape x provider x mode, for CPU and GPU.

Each case builds its inputs once and returns (setup, run): `setup()` prepares one
round (for "bwd" it runs the forward, untimed) and `run(state)` is what is timed.
Modes: "fwd" (under no_grad, as for the reference model), "bwd" (the backward of a
forward done in setup) and "fwd+bwd". work() gives each case's FLOPs and bytes, so
reports can put every time next to its physical floor.

Shapes: hidden and vocabulary sizes of Llama-2-7B (4096, 32000), Llama-3-8B (4096,
128256) and Qwen2.5-7B (3584, 152064), with token counts that fit the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import decpo
from decpo.reference import (
    eager_decorrelation_penalty,
    eager_logprobs_from_logits,
    eager_token_logprobs,
)

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    op: str  # token_logprobs | logprobs_from_logits | decorrelation_penalty
    name: str  # shape label
    dims: dict[str, int]
    providers: tuple[str, ...]
    target: str = ""  # the docs/design.md "Performance targets" item this case speaks to
    modes: tuple[str, ...] = MODES
    extra: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.bfloat16  # of the inputs

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"

    @property
    def dtype_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8


_LOGP_CPU = ("decpo", "decpo-torch", "eager", "compile", "cce-torch_compile")
_LOGP_GPU = ("decpo", "decpo-torch", "eager", "compile", "cce", "liger")
_LOGITS_CPU = ("decpo", "decpo-torch", "eager", "compile")
_LOGITS_GPU = ("decpo", "decpo-torch", "eager", "compile", "liger")
_DEC = ("decpo", "decpo-torch", "eager", "compile")

CPU_CASES = [
    Case("token_logprobs", "N=2048 D=512 V=32000", {"N": 2048, "D": 512, "V": 32000}, _LOGP_CPU,
         ">= 1.3x eager; goal: beat torch.compile and Cut Cross-Entropy torch_compile"),
    Case("token_logprobs", "Llama-2-7B N=512", {"N": 512, "D": 4096, "V": 32000}, _LOGP_CPU),
    Case("token_logprobs", "Llama-3-8B N=256", {"N": 256, "D": 4096, "V": 128256}, _LOGP_CPU),
    Case("token_logprobs", "Qwen2.5-7B N=256", {"N": 256, "D": 3584, "V": 152064}, _LOGP_CPU),
    Case("logprobs_from_logits", "N=4096 V=32000", {"N": 4096, "V": 32000}, _LOGITS_CPU,
         ">= 3x eager at <= 1/4 of its peak memory"),
    Case("logprobs_from_logits", "Llama-3-8B N=1024", {"N": 1024, "V": 128256}, _LOGITS_CPU),
    Case("decorrelation_penalty", "N=8192 D=512 one group", {"G": 1, "n": 8192, "D": 512}, _DEC,
         ">= 20x eager, no N x N buffer"),
    Case("decorrelation_penalty", "4 groups x 512 D=4096", {"G": 4, "n": 512, "D": 4096}, _DEC),
    Case("decorrelation_penalty", "last token 8 layers x 64 D=14336",
         {"G": 8, "n": 64, "D": 14336}, _DEC, extra={"layers": True}),
    # The shape of the AVX2 report (bf16 72x slower than fp32 there), and fp32 twins:
    # on every CPU the bf16 rows must not be slower than these.
    Case("token_logprobs", "N=256 D=512 V=32000", {"N": 256, "D": 512, "V": 32000},
         _LOGP_CPU, modes=("fwd+bwd",)),
    Case("token_logprobs", "fp32 N=256 D=512 V=32000", {"N": 256, "D": 512, "V": 32000},
         _LOGP_CPU, modes=("fwd+bwd",), dtype=torch.float32),
    Case("logprobs_from_logits", "fp32 N=4096 V=32000", {"N": 4096, "V": 32000}, _LOGITS_CPU,
         modes=("fwd+bwd",), dtype=torch.float32),
    Case("decorrelation_penalty", "fp32 4 groups x 512 D=4096", {"G": 4, "n": 512, "D": 4096},
         _DEC, modes=("fwd+bwd",), dtype=torch.float32),
]  # fmt: skip

GPU_CASES = [
    Case("token_logprobs", "Llama-3-8B N=8192", {"N": 8192, "D": 4096, "V": 128256}, _LOGP_GPU,
         ">= 1.3x Cut Cross-Entropy fwd+bwd, faster than Liger, >= 60% of peak (4NVD)"),
    Case("token_logprobs", "Llama-2-7B N=8192", {"N": 8192, "D": 4096, "V": 32000}, _LOGP_GPU),
    Case("token_logprobs", "Qwen2.5-7B N=8192", {"N": 8192, "D": 3584, "V": 152064}, _LOGP_GPU),
    Case("logprobs_from_logits", "Llama-3-8B N=8192", {"N": 8192, "V": 128256}, _LOGITS_GPU),
    Case("decorrelation_penalty", "16 groups x 1024 D=4096", {"G": 16, "n": 1024, "D": 4096},
         _DEC, ">= 10x eager fp32, >= 2x torch.compile, >= 60% of peak (3 n D min(n, D))"),
    Case("decorrelation_penalty", "1 group x 16384 D=4096", {"G": 1, "n": 16384, "D": 4096},
         _DEC, "covariance path: every FLOP on wgmma"),
    Case("decorrelation_penalty", "last token 8 layers x 64 D=14336",
         {"G": 8, "n": 64, "D": 14336}, _DEC, extra={"layers": True}),
]  # fmt: skip


def cases_for(device: str) -> list[Case]:
    return GPU_CASES if device == "cuda" else CPU_CASES


# torch.compile-based providers recompile for every shape and mode (tens of seconds
# each on CPU): they are timed in the headline fwd+bwd mode only.
COMPILED = ("compile", "cce-torch_compile")


def modes_for(case: Case, provider: str) -> tuple[str, ...]:
    return ("fwd+bwd",) if provider in COMPILED else case.modes


def available(provider: str, device: str) -> str:
    """'' when the provider can run on this device, else why not."""
    if provider.startswith("cce"):
        try:
            import cut_cross_entropy  # noqa: F401
        except ImportError as exc:
            return f"cut-cross-entropy not installed ({exc})"
        if provider == "cce" and device != "cuda":
            return "Cut Cross-Entropy's kernels need CUDA"
    if provider == "liger":
        if device != "cuda":
            return "Liger-Kernel needs CUDA"
        try:
            import liger_kernel  # noqa: F401
        except ImportError as exc:
            return f"liger-kernel not installed ({exc})"
    return ""


# ------------------------------------------------------------------ work


def exps(case: Case, mode: str) -> tuple[float, float]:
    """Exponentials the case needs at least, (forward, backward): logprobs_from_logits
    takes one per logit in the forward and one in the backward (the softmax is not
    stored); elsewhere they are negligible next to the matmuls (token_logprobs: N V
    exps against 4 N V D FLOPs)."""
    if case.op != "logprobs_from_logits":
        return 0.0, 0.0
    nv = float(case.dims["N"] * case.dims["V"])
    return {"fwd": (nv, 0.0), "bwd": (0.0, nv), "fwd+bwd": (nv, nv)}[mode]


def exp_seconds(case: Case, mode: str, peak: dict[str, float]) -> float:
    """The case's exponentials at the native kernels' measured exp rates: the forward's
    logsumexp needs the 1-ulp exp; a bf16 gradient, rounded to 8 bits, is computed
    with the bf16-accurate exp (about half the ops: its own rate, where measured)."""
    fwd, bwd = exps(case, mode)
    bwd_rate = peak["native_exp_per_s"]
    if case.dtype == torch.bfloat16:
        bwd_rate = peak.get("native_exp_bf16_per_s", bwd_rate)
    return fwd / peak["native_exp_per_s"] + bwd / bwd_rate


# On CPU, glibc serves allocations of this size and more with freshly mapped pages
# every time (its dynamic mmap threshold stops at 32 MiB on 64-bit), and the OS
# zeroes each page at its first write, whoever writes it.
FRESH_PAGES_MIN_BYTES = 32 << 20


def fresh_output_bytes(case: Case, mode: str) -> float:
    """Bytes of the gradient the case returns (d hidden, d logits) when it is large
    enough to land in fresh pages (FRESH_PAGES_MIN_BYTES), else 0: at N=4096, V=32000
    logprobs_from_logits returns 262 MB (bf16) or 524 MB (fp32) in every round."""
    if mode == "fwd":
        return 0.0
    d = case.dims
    elements = {"token_logprobs": d.get("N", 0) * d.get("D", 0),
                "logprobs_from_logits": d.get("N", 0) * d.get("V", 0),
                "decorrelation_penalty": d.get("G", 0) * d.get("n", 0) * d.get("D", 0)}  # fmt: skip
    size = elements[case.op] * case.dtype_bytes
    return float(size) if size >= FRESH_PAGES_MIN_BYTES else 0.0


def floor_seconds(case: Case, mode: str, peak: dict[str, float]) -> float:
    """The case's floor on this device: the largest of its minimum FLOPs at the fastest
    matmul rate its inputs allow (bf16 input: the faster of the bf16 and fp32 rates,
    since a CPU without bf16 dot products multiplies faster in fp32; fp32 input: the
    fp32 rate, or on CUDA the bf16 one as before), its bytes at the copy bandwidth,
    and its exponentials at the native kernels' measured exp rates (exp_seconds); on CPU plus the
    zeroing of a large returned gradient's fresh pages at the measured rate
    (bench/measure.py:fresh_page_rate), which the OS does before any provider's first
    write to them and which overlaps with nothing on a fully busy machine."""
    flops, nbytes = work(case, mode, case.dtype_bytes)
    rate = peak["bf16_matmul_flops"]
    if "fp32_matmul_flops" in peak and "native_exp_per_s" in peak:  # CPU
        fp32 = peak["fp32_matmul_flops"]
        rate = max(rate, fp32) if case.dtype == torch.bfloat16 else fp32
    floor = max(flops / rate, nbytes / peak["copy_bytes_per_s"])
    if "native_exp_per_s" in peak:
        floor = max(floor, exp_seconds(case, mode, peak))
    if "fresh_page_bytes_per_s" in peak:
        floor += fresh_output_bytes(case, mode) / peak["fresh_page_bytes_per_s"]
    return floor


def work(case: Case, mode: str, dtype_bytes: int = 2) -> tuple[float, float]:
    """(FLOPs, bytes) the case needs at least: the algorithmic minimum, not what any
    one provider does. token_logprobs: 2 N V D forward, 4 N V D forward + backward
    (one-pass frozen head); logits: bandwidth only; decorrelation: n D min(n, D) per
    group for the loss (symmetric product), 3 n D min(n, D) with the gradient. The
    "bwd" mode of token_logprobs and decorrelation counts only the bytes of the
    gradient (read g, write dh): the one-pass algorithms do their FLOPs in the
    forward, so compare providers on fwd+bwd."""
    d = case.dims
    if case.op == "token_logprobs":
        nvd = d["N"] * d["V"] * d["D"]
        if mode == "bwd":
            return 0.0, float(2 * d["N"] * d["D"] * dtype_bytes)
        flops = {"fwd": 2 * nvd, "fwd+bwd": 4 * nvd}[mode]
        reads = (d["N"] * d["D"] + d["V"] * d["D"]) * dtype_bytes
        writes = 0 if mode == "fwd" else d["N"] * d["D"] * dtype_bytes
        return float(flops), float(reads + writes)
    if case.op == "logprobs_from_logits":
        nv = d["N"] * d["V"]
        passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
        return float(5 * nv), float(passes * nv * dtype_bytes)
    per_group = d["n"] * d["D"] * min(d["n"], d["D"])
    size = d["G"] * d["n"] * d["D"] * dtype_bytes
    if mode == "bwd":
        return 0.0, float(2 * size)
    flops = d["G"] * per_group * (1 if mode == "fwd" else 3)
    return float(flops), float(size * (1 if mode == "fwd" else 2))


def tiled_cost(case: Case, mode: str, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of decpo's Triton kernels on this case, from the launchers'
    own tiling and traffic model (work() is the algorithmic floor instead). Modes
    "fwd" and "fwd+bwd" (frozen head for token_logprobs)."""
    d = case.dims
    if case.op == "token_logprobs":
        from decpo.triton_backend.logprobs import token_logprobs_cost

        c = token_logprobs_cost(d["N"], d["V"], d["D"], dtype, frozen_grad=mode != "fwd")
        return c["flops"], c["bytes"]
    if case.op == "decorrelation_penalty":
        from decpo.triton_backend.decorrelation import decorrelation_cost

        layers = d["G"] if case.extra.get("layers") else 1
        sizes = (1, d["n"]) if case.extra.get("layers") else (d["G"], d["n"])
        return decorrelation_cost(sizes, d["D"], dtype, layers=layers, compute_grad=mode != "fwd")
    return work(case, mode, torch.finfo(dtype).bits // 8)  # one read (and write): the floor


# ------------------------------------------------------------------ providers


def _token_fn(provider: str) -> Callable[..., torch.Tensor]:
    if provider == "decpo":
        return decpo.token_logprobs
    if provider == "decpo-torch":
        return lambda h, w, t: decpo.token_logprobs(h, w, t, backend="torch")
    if provider == "eager":
        return eager_token_logprobs
    if provider == "compile":
        return torch.compile(eager_token_logprobs, dynamic=False)
    if provider.startswith("cce"):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if provider == "cce" else "torch_compile"
        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl=impl)
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda h, w, t: -loss(w, h, t)
    raise ValueError(provider)


def _logits_fn(provider: str) -> Callable[..., torch.Tensor]:
    if provider == "decpo":
        return decpo.logprobs_from_logits
    if provider == "decpo-torch":
        return lambda x, t: decpo.logprobs_from_logits(x, t, backend="torch")
    if provider == "eager":
        return eager_logprobs_from_logits
    if provider == "compile":
        return torch.compile(eager_logprobs_from_logits, dynamic=False)
    if provider == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss

        loss = LigerCrossEntropyLoss(reduction="none")
        return lambda x, t: -loss(x, t)
    raise ValueError(provider)


def _decorrelation_fn(provider: str, groups: int, layers: bool) -> Callable[..., torch.Tensor]:
    """hidden arrives as (G, n, D): G groups (or layers) of n rows."""
    if provider in ("decpo", "decpo-torch"):
        backend = "auto" if provider == "decpo" else "torch"
        if layers:  # (L, n, D): one launch over layers
            return lambda h: decpo.decorrelation_penalty(h, backend=backend)

        def grouped(h: torch.Tensor) -> torch.Tensor:
            g, n, d = h.shape
            seg = torch.arange(g, device=h.device).repeat_interleave(n)
            return decpo.decorrelation_penalty(h.reshape(g * n, d), segment_ids=seg,
                                               backend=backend)  # fmt: skip

        return grouped
    if provider == "eager":
        return eager_decorrelation_penalty
    if provider == "compile":
        return torch.compile(eager_decorrelation_penalty, dynamic=False)
    raise ValueError(provider)


def build(case: Case, provider: str, mode: str, device: str) -> tuple[Callable, Callable]:
    """(setup, run) for one round of `mode`; run(setup()) is the timed part."""
    torch.manual_seed(0)
    dev = torch.device(device)
    d = case.dims
    dtype = case.dtype  # of the inputs (bf16 unless the case says otherwise)
    if case.op == "token_logprobs":
        leaf = torch.randn(d["N"], d["D"], dtype=dtype, device=dev)
        weight = (torch.randn(d["V"], d["D"], device=dev) / d["D"] ** 0.5).to(dtype)
        targets = torch.randint(0, d["V"], (d["N"],), device=dev)
        fn, args = _token_fn(provider), (weight, targets)
        if case.extra.get("trainable_head"):  # the weight gets a gradient too
            weight.requires_grad_(True)
    elif case.op == "logprobs_from_logits":
        leaf = torch.randn(d["N"], d["V"], dtype=dtype, device=dev)
        targets = torch.randint(0, d["V"], (d["N"],), device=dev)
        fn, args = _logits_fn(provider), (targets,)
    else:
        leaf = torch.randn(d["G"], d["n"], d["D"], dtype=dtype, device=dev)
        fn, args = _decorrelation_fn(provider, d["G"], case.extra.get("layers", False)), ()
    upstream: dict[str, torch.Tensor] = {}

    def grad_of(out: torch.Tensor) -> torch.Tensor:
        if "g" not in upstream:
            upstream["g"] = torch.randn_like(out) if out.dim() else torch.ones_like(out)
        return upstream["g"]

    if mode == "fwd":

        def setup() -> None:
            return None

        def run(_: None) -> None:
            with torch.no_grad():
                fn(leaf, *args)

    elif mode == "fwd+bwd":
        x = leaf.clone().requires_grad_(True)

        def setup() -> None:
            x.grad = None
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    a.grad = None

        def run(_: None) -> None:
            out = fn(x, *args)
            out.backward(grad_of(out))

    else:  # bwd
        x = leaf.clone().requires_grad_(True)

        def setup() -> torch.Tensor:
            x.grad = None
            return fn(x, *args)

        def run(out: torch.Tensor) -> None:
            out.backward(grad_of(out))

    run.leaf = leaf  # type: ignore[attr-defined]
    run.args = args  # type: ignore[attr-defined]
    return setup, run
