"""Run under torchrun (gloo, CPU): decpo's TRL head on a DeepSpeed ZeRO-3 model, whose
LM head is partitioned to numel 0 outside its own forward (the fused forward reads
it inside TRL's gather context). Each rank scores half the batch; rank 0 compares
log-probs and a layer's full gradient with the unpartitioned model in one process on
the whole batch, and writes "ok" (or the error) to the file named by argv[1]."""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist


def main() -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from decpo.integrations.trl import add_decpo_lm_head

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    single = LlamaForCausalLM(config)
    state = {k: v.clone() for k, v in single.state_dict().items()}
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2 * world, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    # The reference: full logits in float64, before ZeRO-3 is switched on.
    logits = single(input_ids=ids).logits[:, :-1].double()
    target = labels[:, 1:]
    picked = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    ref = picked * (target != -100)
    ref.sum().backward()
    # DeepSpeed averages gradients over ranks.
    ref_grad = single.model.layers[1].mlp.up_proj.weight.grad / world

    ds_config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_allow_untested_optimizer": True,
    }  # fmt: skip
    keep_alive = HfDeepSpeedConfig(ds_config)  # makes is_deepspeed_zero3_enabled() true
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(config)
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                p.data.copy_(state[name])
    for p in (model.lm_head.weight, model.model.embed_tokens.weight):
        p.requires_grad_(False)  # a frozen head, as with LoRA
    add_decpo_lm_head(model, outputs=("log_probs",))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=trainable)
    assert model.lm_head.weight.numel() == 0  # partitioned
    mine = slice(2 * rank, 2 * rank + 2)
    out = engine(input_ids=ids[mine], labels=labels[mine], fused_lm_head=True)
    engine.backward(out.log_probs.sum())
    grad = safe_get_full_grad(model.model.layers[1].mlp.up_proj.weight)
    gathered = [torch.zeros_like(out.log_probs) for _ in range(world)]
    dist.all_gather(gathered, out.log_probs.detach())
    if rank == 0:
        torch.testing.assert_close(torch.cat(gathered).double(), ref.detach(), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
        torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-6)
    dist.barrier()
    del keep_alive


if __name__ == "__main__":
    result = "ok"
    try:
        main()
    except Exception:  # reported to the test through the file
        result = traceback.format_exc()
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[1], "w") as f:
            f.write(result)
