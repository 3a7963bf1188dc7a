"""Monosemanticity probes: python -m decpo.probe RUN_DIR  (or --model DIR [--adapter DIR]).

Per decoder layer, on the activations of --module (default mlp.up_proj) at the last
token of each prompt (by default the run's held-out prompts, tokenized as in
training):
- decorrelation: 1 - mean pairwise cosine similarity across prompts (the paper's
  Figures 4-5 metric; decpo.hooks.feature_decorrelation);
- variance: the mean over features of the activation's variance across prompts;
- sparsity: the fraction of activation entries whose magnitude is below 10% of the
  layer's root-mean-square activation (Figure 6 looks at both);
- weight proxy (Wang et al., used in the paper's Figures 2-3): the median over MLP
  neurons n of ||w_in,n||_2 * b_in,n (the neuron's input weight norm times its input
  bias), divided by the largest absolute such median over layers. It needs MLP input
  biases (GPT-2 style); for bias-free MLPs (Llama) it is reported as undefined.
Writes probe.json and probe.png to --output (default: RUN_DIR/probe).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decpo import data as data_lib
from decpo import models
from decpo.hooks import DecorrelationHooks, feature_decorrelation

SPARSITY_FRACTION = 0.1  # "near zero": below this fraction of the layer's RMS activation


# ---------------------------------------------------------------- metrics


def activation_variance(acts: torch.Tensor) -> float:
    """Mean over features of the variance across samples; acts (samples, features)."""
    return acts.double().var(dim=0, unbiased=False).mean().item()


def activation_sparsity(acts: torch.Tensor, fraction: float = SPARSITY_FRACTION) -> float:
    """Fraction of entries with |a| < fraction * RMS(acts)."""
    a = acts.double()
    rms = a.square().mean().sqrt()
    return (a.abs() < fraction * rms).double().mean().item()


def mlp_input_weight_and_bias(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W_in (neurons, D), b_in (neurons,)) of a decoder layer's MLP input projection,
    or None when it has no bias (Llama's up/gate projections)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        return None
    for name in ("c_fc", "fc1", "fc_in", "dense_h_to_4h", "up_proj"):
        module = getattr(mlp, name, None)
        if module is None:
            continue
        module = getattr(module, "base_layer", module)  # an unmerged peft wrapper
        bias = getattr(module, "bias", None)
        if bias is None:
            return None
        weight = module.weight
        if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
            weight = weight.T
        return weight.detach(), bias.detach()
    return None


def weight_proxy(blocks: torch.nn.ModuleList) -> tuple[list[float] | None, str]:
    """Per-layer median_n ||w_in,n|| * b_in,n, divided by the largest |median| over
    layers; (None, reason) when any layer's MLP has no input bias."""
    medians = []
    for i, layer in enumerate(blocks):
        wb = mlp_input_weight_and_bias(layer)
        if wb is None:
            return None, (
                f"undefined: layer {i}'s MLP input projection has no bias (the proxy is "
                "||w_in,n|| * b_in,n, so it needs GPT-2-style MLP input biases)"
            )
        weight, bias = wb
        medians.append((weight.double().norm(dim=1) * bias.double()).median().item())
    scale = max(abs(m) for m in medians) or 1.0
    return [m / scale for m in medians], "median_n ||w_in,n||_2 * b_in,n / max_l |median|"


@dataclass
class ProbeResult:
    layers: list[int]
    decorrelation: list[float]
    variance: list[float]
    sparsity: list[float]
    weight_proxy: list[float] | None
    weight_proxy_note: str
    module: str
    prompts: int


# ---------------------------------------------------------------- running


@torch.no_grad()
def probe(
    model: torch.nn.Module, prompts: list[list[int]], pad_id: int, module: str = "mlp.up_proj",
    layers: list[int] | None = None, batch_size: int = 16,
) -> ProbeResult:  # fmt: skip
    """Run the tokenized prompts (as training tokenizes them: BOS, prompt cut from the
    left) through `model` and measure every hooked layer at each prompt's last token."""
    model.eval()
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = []
    with DecorrelationHooks(model, module, layers) as hooks:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):  # right padding: the last real token is the prompt's
                ids[row, : len(p)] = torch.tensor(p)
                mask[row, : len(p)] = 1
            with hooks.capture(force=True):
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
            hidden, _ = hooks.rows(mask.to(device), "last")  # (L, B, F)
            if not per_layer:
                per_layer = [[] for _ in range(hidden.shape[0])]
            for k in range(hidden.shape[0]):
                per_layer[k].append(hidden[k].float().cpu())
        layer_ids = hooks.layer_ids
    acts = [torch.cat(chunks) for chunks in per_layer]  # per layer (prompts, F)
    proxy, note = weight_proxy(models.decoder_layers(model))
    if proxy is not None and layers is not None:
        proxy = [proxy[i] for i in layer_ids]
    return ProbeResult(
        layers=layer_ids,
        decorrelation=[feature_decorrelation(a[None], None).item() for a in acts],
        variance=[activation_variance(a) for a in acts],
        sparsity=[activation_sparsity(a) for a in acts],
        weight_proxy=proxy,
        weight_proxy_note=note,
        module=module,
        prompts=len(prompts),
    )


def load_for_probe(model_dir: str, adapter: str | None) -> tuple[torch.nn.Module, Any]:
    """A local model (and LoRA adapter, merged in) with its tokenizer."""
    model, tokenizer = models.load_pretrained(model_dir, torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model, tokenizer


def prompt_tokens(pairs: list[data_lib.TokenizedPair], n: int) -> list[list[int]]:
    """Up to n distinct tokenized prompts of these pairs, as training saw them."""
    seen: dict[tuple[int, ...], None] = {}
    for pair in pairs:
        if len(seen) >= n:
            break
        seen.setdefault(tuple(pair.chosen_ids[: pair.prompt_len]))
    return [list(p) for p in seen]


def held_out_prompts(run_dir: Path, tokenizer: Any, n: int) -> list[list[int]]:
    """The held-out prompts of a decpo.train run: its own data and split (its config)."""
    from decpo import train

    cfg = train.config_from_json(json.loads((run_dir / "config.json").read_text()))
    _, eval_set, _ = train.load_data(cfg, tokenizer)
    return prompt_tokens(eval_set, n)


def run_setting(run: Path | None, name: str, default: Any) -> Any:
    """One setting of a decpo.train run's config.json (default without a run)."""
    config = run / "config.json" if run is not None else None
    if config is None or not config.is_file():
        return default
    return json.loads(config.read_text()).get(name, default)


def run_model_dir(run: Path) -> str:
    """The base model of a decpo.train run: its --model directory, or RUN/base_model
    where the run built the tiny demo model."""
    model = run_setting(run, "model", "tiny")
    return str(run / "base_model") if model == "tiny" else str(model)


def file_prompts(path: str, tokenizer: Any, n: int, max_length: int) -> list[list[int]]:
    """Prompts of a preference file, tokenized as training would."""
    pairs = data_lib.read_pairs(path, tokenizer)
    tokenized, _ = data_lib.tokenize_pairs(pairs, tokenizer, max_length)
    return prompt_tokens(tokenized, n)


def plot(result: ProbeResult, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("decorrelation", result.decorrelation), ("activation variance", result.variance),
              ("sparsity", result.sparsity), ("weight proxy", result.weight_proxy)]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, (name, values) in zip(axes, panels, strict=True):
        if values is None:
            ax.text(0.5, 0.5, "undefined\n(no MLP input bias)", ha="center", va="center")
        else:
            ax.plot(result.layers, values, "o-")
        ax.set_title(name)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m decpo.probe", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run", nargs="?", help="a decpo.train output directory")
    parser.add_argument(
        "--model",
        help="local Hugging Face model directory (default: the run's --model, or "
        "RUN/base_model for the tiny demo model)",
    )
    parser.add_argument("--adapter", help="LoRA adapter directory (default: RUN)")
    parser.add_argument(
        "--prompts",
        help="JSONL(.gz) preference file whose prompts to use (default: the run's held-out split)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=256,
        help="tokens per prompt, cut from the left as in training",
    )
    parser.add_argument(
        "--max-prompts", type=int, default=256, help="prompts to probe (at least 2)"
    )
    parser.add_argument(
        "--module", help="module per decoder layer (default: the run's --dec-module, else "
        "mlp.up_proj)",
    )  # fmt: skip
    parser.add_argument("--layers", default="all", help='"all" or indices like "0,2"')
    parser.add_argument("--output", help="output directory (default: RUN/probe)")
    args = parser.parse_args(argv)
    run = Path(args.run) if args.run else None
    if run is None and args.model is None:
        parser.error("give a run directory or --model")
    if args.max_prompts < 2:
        parser.error(f"--max-prompts {args.max_prompts}: decorrelation compares prompts, "
                     "at least 2 are needed")  # fmt: skip
    model_dir = args.model or run_model_dir(run)
    if args.module is None:
        args.module = run_setting(run, "dec_module", "mlp.up_proj")
    adapter = args.adapter or (
        str(run) if run and (run / "adapter_config.json").is_file() else None
    )
    model, tokenizer = load_for_probe(model_dir, adapter)
    if args.prompts:
        prompts = file_prompts(args.prompts, tokenizer, args.max_prompts, args.max_length)
    elif run is not None:
        prompts = held_out_prompts(run, tokenizer, args.max_prompts)
    else:
        parser.error("--model without a run directory needs --prompts")
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    if len(prompts) < 2:
        parser.error(f"found {len(prompts)} distinct prompt(s); decorrelation needs at least 2")
    result = probe(model, prompts, tokenizer.pad_token_id, args.module, layers)
    out = Path(args.output) if args.output else (run / "probe" if run else Path("probe"))
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": model_dir, "adapter": adapter, **result.__dict__}
    (out / "probe.json").write_text(json.dumps(record, indent=1))
    figure = plot(result, out / "probe.png", f"{model_dir} + {adapter}, {args.module}")
    for i, layer in enumerate(result.layers):
        proxy = "undefined" if result.weight_proxy is None else f"{result.weight_proxy[i]:+.3f}"
        print(f"layer {layer:3d}  decorrelation {result.decorrelation[i]:.4f}  "
              f"variance {result.variance[i]:.4g}  sparsity {result.sparsity[i]:.3f}  "
              f"weight proxy {proxy}")  # fmt: skip
    if result.weight_proxy is None:
        print(f"weight proxy: {result.weight_proxy_note}")
    print(f"wrote {out / 'probe.json'} and {figure}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
