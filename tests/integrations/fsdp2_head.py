"""Run under torchrun (gloo, CPU): decpo's TRL head with an FSDP2-sharded model whose
LM head is its own FSDP unit, so the fused forward reads lm_head.weight as a sharded
DTensor. Each rank scores half the batch; rank 0 compares log-probs, entropy and a
gradient with the same model unsharded in one process on the whole batch, and
writes "ok" (or the error) to the file named by argv[1]."""

from __future__ import annotations

import copy
import os
import sys
import traceback

import torch
import torch.distributed as dist


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config)
    for p in (model.lm_head.weight, model.model.embed_tokens.weight):
        p.requires_grad_(False)  # a frozen head, as with LoRA
    return model


def _score(model, ids, labels):
    from decpo.integrations.trl import add_decpo_lm_head

    add_decpo_lm_head(model, outputs=("log_probs", "entropy"))
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    out.log_probs.sum().backward()
    return out


def main() -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2 * world, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    single = _model()
    sharded = copy.deepcopy(single)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded.lm_head)
    fully_shard(sharded)
    assert isinstance(sharded.lm_head.weight, DTensor)
    mine = slice(2 * rank, 2 * rank + 2)
    out = _score(sharded, ids[mine], labels[mine])
    logp = [torch.zeros_like(out.log_probs) for _ in range(world)]
    entropy = [torch.zeros_like(out.entropy) for _ in range(world)]
    dist.all_gather(logp, out.log_probs.detach())
    dist.all_gather(entropy, out.entropy.detach())
    # FSDP2 averages gradients over ranks: the single process gets the same from the
    # whole batch's sum divided by the number of ranks.
    grad = sharded.model.layers[1].mlp.up_proj.weight.grad.full_tensor()
    if rank == 0:
        ref = _score(single, ids, labels)
        with torch.no_grad():
            for p in single.parameters():
                if p.grad is not None:
                    p.grad /= world
        torch.testing.assert_close(torch.cat(logp), ref.log_probs.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat(entropy), ref.entropy, rtol=1e-5, atol=1e-5)
        ref_grad = single.model.layers[1].mlp.up_proj.weight.grad
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    result = "ok"
    try:
        main()
    except Exception:  # reported to the test through the file
        result = traceback.format_exc()
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[1], "w") as f:
            f.write(result)
