"""Monosemanticity probes: python -m decpo.probe RUN_DIR  (or --model DIR [--adapter DIR]).

Per decoder layer, on the activations of --module (default mlp.up_proj) at the last
token of each prompt (by default the run's held-out prompts, tokenized as in
training). Each metric says whose definition it is:
- decorrelation (the paper's, Figures 4-5): 1 - mean pairwise cosine similarity across
  prompts (decpo.hooks.feature_decorrelation; the official code's tokenSimi);
- variance_decpo (decpo's definition; the paper's code defines none): the mean over
  features of the activation's variance across prompts;
- sparsity_decpo (decpo's definition): the fraction of activation entries whose
  magnitude is below 10% of the layer's root-mean-square activation;
- weight_proxy (the paper's Figure 2, after Wang et al., computed as the official
  Figure2/save_weight_statistics.py and weight_stats.py do): on the MLP input weights
  as TransformerLens hands them to that script (the layer norm before the MLP folded
  in, W_in centred over d_model; mlp_input), per layer median_n(||w_in,n||_2 b_in,n)
  divided by max over layers of median_n |...|. It needs MLP input biases and a
  LayerNorm before the MLP (GPT-2, GPT-Neo, GPT-J, OPT, GPT-NeoX); for bias-free MLPs
  (Llama) it is reported as undefined.
- with --compare OTHER_RUN, weight_change (the paper's Figure 3, as the official
  Figure3/ComputDiff.py): per layer, the top-k (100) neurons whose folded input
  weights changed most between OTHER_RUN and RUN (sum over d_model of |dW_in|), the
  weight proxy of each model on those neurons, and its relative change
  (RUN - OTHER_RUN) / |OTHER_RUN|.
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
TOP_K = 100  # neurons per layer in Figure 3's statistic (official ComputDiff.py)

# MLP input projection -> the layer norm its decoder layer applies before it.
MLP_INPUT_NORMS = {
    "c_fc": "ln_2",  # GPT-2, GPT-Neo
    "fc_in": "ln_1",  # GPT-J: attention and MLP both read ln_1
    "fc1": "final_layer_norm",  # OPT
    "dense_h_to_4h": "post_attention_layernorm",  # GPT-NeoX / Pythia
}
METRIC_SOURCES = {
    "decorrelation": "paper (Figures 4-5): 1 - mean pairwise cosine similarity of the "
    "last-token activations across prompts (official tokenSimi)",
    "variance_decpo": "decpo-defined: mean over features of the variance across prompts",
    "sparsity_decpo": "decpo-defined: fraction of entries with |a| < 10% of the layer's RMS",
    "weight_proxy": "paper (Figure 2, official normalization): median_n ||w_in,n|| b_in,n / "
    "max_l median_n |.|, on layer-norm-folded, centred W_in (TransformerLens)",
    "weight_change": "paper (Figure 3, official ComputDiff.py): relative change of the "
    "weight proxy on the top-k most changed neurons per layer, (RUN - OTHER) / |OTHER|",
}


# ---------------------------------------------------------------- metrics


def activation_variance(acts: torch.Tensor) -> float:
    """decpo's variance: mean over features of the variance across samples; acts
    (samples, features)."""
    return acts.double().var(dim=0, unbiased=False).mean().item()


def activation_sparsity(acts: torch.Tensor, fraction: float = SPARSITY_FRACTION) -> float:
    """decpo's sparsity: fraction of entries with |a| < fraction * RMS(acts)."""
    a = acts.double()
    rms = a.square().mean().sqrt()
    return (a.abs() < fraction * rms).double().mean().item()


def _np_median(x: torch.Tensor) -> torch.Tensor:
    """numpy's median (the mean of the two middle values for an even count; the
    official scripts use np.median, torch.median would take the lower one)."""
    return torch.quantile(x, 0.5)


def mlp_input(layer: torch.nn.Module, fold_ln: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_in (d_model, neurons), b_in (neurons,)) of a decoder layer's MLP input
    projection, float64. fold_ln=True gives what TransformerLens' from_pretrained
    (fold_ln=True, center_writing_weights=True, the defaults the official Figure 2/3
    scripts load with) exposes as W_in and b_in: with the layer norm's scale w and
    shift c before the MLP,
        b_in <- b_in + c W_in,  W_in <- diag(w) W_in,  W_in <- W_in - mean_d W_in[d, :]
    (the centring is exact because the layer norm's output has zero mean over
    d_model). fold_ln=False: the raw weights. ValueError saying why for a layer
    without an MLP input bias (Llama) or without a LayerNorm before the MLP."""
    mlp = getattr(layer, "mlp", None)
    for name, norm_name in MLP_INPUT_NORMS.items():
        module = getattr(mlp, name, None) if mlp is not None else None
        if module is None:
            continue
        module = getattr(module, "base_layer", module)  # an unmerged peft wrapper
        if getattr(module, "bias", None) is None:
            break
        weight = module.weight.detach().double()
        if type(module).__name__ != "Conv1D":  # nn.Linear stores (out, in)
            weight = weight.T
        bias = module.bias.detach().double()  # (F,)
        if not fold_ln:
            return weight, bias
        norm = getattr(layer, norm_name, None)
        if not isinstance(norm, torch.nn.LayerNorm) or norm.bias is None:
            raise ValueError(f"no LayerNorm with a bias at {norm_name!r} before mlp.{name} to fold")
        scale, shift = norm.weight.detach().double(), norm.bias.detach().double()  # (D,)
        bias = bias + shift @ weight  # (F,)
        weight = scale[:, None] * weight  # (D, F)
        return weight - weight.mean(dim=0, keepdim=True), bias
    raise ValueError(
        f"no MLP input projection with a bias ({', '.join(MLP_INPUT_NORMS)}); the proxy "
        "is ||w_in,n|| * b_in,n, so it needs GPT-2-style MLP input biases"
    )


def _proxy_terms(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """||w_in,n||_2 * b_in,n per neuron; weight (D, F), bias (F,)."""
    return weight.norm(dim=0) * bias


def _normalized_medians(terms: list[torch.Tensor]) -> list[float]:
    """median(terms_l) / max_l median(|terms_l|), as the official weight_stats.py."""
    scale = max(_np_median(t.abs()).item() for t in terms) or 1.0
    return [_np_median(t).item() / scale for t in terms]


def _layer_inputs(
    blocks: torch.nn.ModuleList, fold_ln: bool
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, str]:
    inputs = []
    for i, layer in enumerate(blocks):
        try:
            inputs.append(mlp_input(layer, fold_ln))
        except ValueError as exc:
            return None, f"undefined: layer {i}: {exc}"
    return inputs, ""


def weight_proxy(
    blocks: torch.nn.ModuleList, fold_ln: bool = True
) -> tuple[list[float] | None, str]:
    """The paper's Figure 2 statistic per layer, median_n ||w_in,n|| b_in,n over max_l
    median_n |.|, on the folded, centred weights (fold_ln=False: on the raw weights, a
    decpo variant named as such); (None, reason) when a layer has no MLP input bias."""
    inputs, reason = _layer_inputs(blocks, fold_ln)
    if inputs is None:
        return None, reason
    kind = "layer-norm-folded, centred" if fold_ln else "raw (not the paper's)"
    values = _normalized_medians([_proxy_terms(w, b) for w, b in inputs])
    return values, f"median_n ||w_in,n||_2 b_in,n / max_l median_n |.|, {kind} W_in"


def weight_change(
    before: torch.nn.ModuleList, after: torch.nn.ModuleList, k: int = TOP_K
) -> tuple[list[float] | None, str]:
    """The paper's Figure 3 statistic per layer, as the official ComputDiff.py: the k
    neurons whose folded W_in changed most (sum over d_model of |W_after - W_before|),
    the weight proxy of each model on them (normalized by its own max over layers),
    and (proxy_after - proxy_before) / |proxy_before|."""
    if len(before) != len(after):
        raise ValueError(f"the models have {len(before)} and {len(after)} layers")
    old, reason = _layer_inputs(before, True)
    new, reason_new = _layer_inputs(after, True)
    if old is None or new is None:
        return None, reason or reason_new
    terms_old, terms_new = [], []
    for (w0, b0), (w1, b1) in zip(old, new, strict=True):
        if w0.shape != w1.shape:
            raise ValueError(f"MLP input shapes differ: {tuple(w0.shape)} and {tuple(w1.shape)}")
        top = (w0 - w1).abs().sum(dim=0).topk(min(k, w0.shape[1])).indices  # (k,)
        terms_old.append(_proxy_terms(w0[:, top], b0[top]))
        terms_new.append(_proxy_terms(w1[:, top], b1[top]))
    p0, p1 = _normalized_medians(terms_old), _normalized_medians(terms_new)
    change = [(a - b) / abs(b) if b else float("nan") for a, b in zip(p1, p0, strict=True)]
    return change, f"top-{k} changed neurons per layer, (after - before) / |before|"


@dataclass
class ProbeResult:
    layers: list[int]
    decorrelation: list[float]
    variance_decpo: list[float]
    sparsity_decpo: list[float]
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
        variance_decpo=[activation_variance(a) for a in acts],
        sparsity_decpo=[activation_sparsity(a) for a in acts],
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


def plot(result: ProbeResult, path: Path, title: str, change: list[float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("decorrelation (paper)", result.decorrelation),
              ("activation variance (decpo)", result.variance_decpo),
              ("sparsity (decpo)", result.sparsity_decpo),
              ("weight proxy (paper Fig. 2)", result.weight_proxy)]  # fmt: skip
    if change is not None:
        panels.append((f"top-{TOP_K} weight-proxy change (Fig. 3)", change))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.2))
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
    parser.add_argument(
        "--compare", metavar="OTHER_RUN",
        help="also the paper's Figure 3 statistic: the relative change of the weight proxy "
        f"on the top-{TOP_K} most changed neurons per layer, from OTHER_RUN's model to this one",
    )  # fmt: skip
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
    record: dict[str, Any] = {"model": model_dir, "adapter": adapter, **result.__dict__}
    change = None
    if args.compare:
        other = Path(args.compare)
        other_adapter = str(other) if (other / "adapter_config.json").is_file() else None
        other_model, _ = load_for_probe(run_model_dir(other), other_adapter)
        try:
            change, note = weight_change(
                models.decoder_layers(other_model), models.decoder_layers(model)
            )
        except ValueError as exc:
            parser.error(f"--compare {args.compare}: {exc}")
        if change is not None and layers is not None:
            change = [change[i] for i in result.layers]
        record.update(weight_change=change, weight_change_note=note, compared_to=str(other))
    record["metric_sources"] = {k: v for k, v in METRIC_SOURCES.items() if k in record}
    (out / "probe.json").write_text(json.dumps(record, indent=1))
    figure = plot(result, out / "probe.png", f"{model_dir} + {adapter}, {args.module}", change)
    for i, layer in enumerate(result.layers):
        proxy = "undefined" if result.weight_proxy is None else f"{result.weight_proxy[i]:+.3f}"
        line = (f"layer {layer:3d}  decorrelation {result.decorrelation[i]:.4f}  "
                f"variance_decpo {result.variance_decpo[i]:.4g}  "
                f"sparsity_decpo {result.sparsity_decpo[i]:.3f}  weight proxy {proxy}")  # fmt: skip
        if change is not None:
            line += f"  weight change {100 * change[i]:+.1f}%"
        print(line)
    if result.weight_proxy is None:
        print(f"weight proxy: {result.weight_proxy_note}")
    if args.compare and change is None:
        print(f"weight change: {record['weight_change_note']}")
    print(f"wrote {out / 'probe.json'} and {figure}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
