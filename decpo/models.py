"""Models and tokenizers: the demo's tiny Llama and its own BPE tokenizer, or a local
Hugging Face causal LM, with LoRA adapters from peft."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# The demo model: a small Llama-architecture network, random init.
TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY_VOCAB = 512
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tokenizer(corpus: Iterable[str], vocab_size: int = TINY_VOCAB) -> Any:
    """A byte-level BPE tokenizer trained on `corpus`, as a PreTrainedTokenizerFast
    with <pad>, <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def build_tiny_model(tokenizer: Any, seed: int) -> torch.nn.Module:
    """The demo's Llama-architecture model, random init from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_CONFIG,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_pretrained(directory: str | Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """A local Hugging Face causal LM and its tokenizer (no hub, no remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(directory)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {directory}: no config.json (a local model directory)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, trust_remote_code=False, dtype=dtype
    )
    return model, tokenizer


def add_lora(
    model: torch.nn.Module, r: int, alpha: float | None, targets: Sequence[str]
) -> torch.nn.Module:
    """Wrap `model` with peft LoRA adapters on the modules named in `targets`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=0.0,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# The official DecPO script (hanqi-qi/Revisit_monosemanticity, scripts/train_dpo.sh:
# --act_layers "10") regularizes one layer, 10 of Llama-2-7B's 32 decoder layers.
OFFICIAL_DEC_LAYER, OFFICIAL_N_LAYERS = 10, 32


def default_dec_layers(n_layers: int) -> list[int]:
    """The decoder layer decpo.train regularizes by default in a real model: one layer
    at the official script's relative depth 10/32, rounded half up (layer 10 of 32;
    4 of 12, 8 of 24, 9 of 28, 13 of 40, 25 of 80)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return [
        min(
            n_layers - 1,
            (2 * OFFICIAL_DEC_LAYER * n_layers + OFFICIAL_N_LAYERS) // (2 * OFFICIAL_N_LAYERS),
        )
    ]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a (peft-wrapped) Hugging Face causal LM: the
    ModuleList with num_hidden_layers entries (model.layers for Llama, transformer.h
    for GPT-2, ...), the largest one if several match."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    candidates = [
        m for m in base.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0
        and (n_layers is None or len(m) == n_layers)
    ]  # fmt: skip
    if not candidates:
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing under either transformers API name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


_ADAPTER_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The reference model: the policy with every LoRA layer switched off. Same effect
    as peft's model.disable_adapter(), which also inspects every layer's status on
    each call (about 4 ms a step on the demo model, 15% of its step time)."""
    layers = _ADAPTER_LAYERS.get(model)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if not all(hasattr(m, "_disable_adapters") for m in layers):
            layers = None  # an unknown peft layout: use peft's own context
        _ADAPTER_LAYERS[model] = layers
    if layers is None:
        with model.disable_adapter():
            yield
        return
    previous = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, was in zip(layers, previous, strict=True):
            m._disable_adapters = was


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 (torch.distributed.fsdp.fully_shard) over the default process group, in
    place: one unit per decoder layer, the LM head (when not tied to the input
    embedding), then the backbone (embeddings, final norm), which is the root of the
    forward pass (score_sequences calls the backbone, not the top model). Parameters
    are sharded over the ranks along dim 0 and moved to `device` unit by unit, so the
    whole model never sits on one device. On CUDA with bf16 support the units compute
    in bf16 (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)): LoRA weights
    and their optimizer state stay fp32 shards, gradients are reduced in fp32; on CPU
    everything stays fp32. Outside their unit's forward the head and embedding are
    sharded DTensors: read the head with `full_parameter`. Every trainable parameter
    must end up in a unit (ValueError otherwise: its gradient would not be reduced)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    if head is not None and not tied:
        fully_shard(head, mesh=mesh, mp_policy=policy)
    fully_shard(backbone, mesh=mesh, mp_policy=policy)
    if tied:  # the head outside the backbone still holds the full tensor: share the shard
        head.weight = embedding.weight
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loose = [n for n, p in trainable if not isinstance(p, DTensor)]
    if loose:
        raise ValueError(f"trainable parameters outside every FSDP unit: {', '.join(loose[:3])}")
    for module in model.modules():  # buffers (rotary frequencies) of the backbone are moved
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.device != device:
                setattr(module, name, buffer.to(device))
    return model


def full_parameter(param: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter as a plain tensor on every rank: an FSDP2-sharded DTensor is
    all-gathered (differentiably), anything else is returned as it is."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.full_tensor()
    return param
