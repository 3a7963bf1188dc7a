"""decpo.train --fsdp (FSDP2, gloo on CPU): 2 sharded ranks log what one process with
--grad-accum 2 logs; the exported adapter is whole and loads with peft on one
process; sharded checkpoints resume on another number of ranks (2 save, 1 resumes,
and the reverse) with the same weights and optimizer state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from decpo import checkpoint, train
from decpo.train import METRIC_KEYS
from tests.helpers import assert_same_rows, torchrun_train, train_rows

COMMON = ["--max-steps", "4", "--eval-every", "100", "--save-every", "2", "--demo-pairs", "64",
          "--batch-size", "2"]  # fmt: skip


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One process with --grad-accum 2 (no FSDP), and 2 FSDP ranks with the same
    global batch; both save at steps 2 and 4."""
    root = tmp_path_factory.mktemp("fsdp")
    single, sharded = root / "single", root / "fsdp2"
    train.main([*COMMON, "--grad-accum", "2", "--output-dir", str(single)])
    torchrun_train([*COMMON, "--fsdp", "--output-dir", str(sharded)], port=29541)
    return {"single": single, "fsdp2": sharded}


def test_two_fsdp_ranks_log_what_one_process_with_grad_accum_logs(runs):
    assert_same_rows(train_rows(runs["single"]), train_rows(runs["fsdp2"]), rel=1e-5, abs=1e-6)
    step = runs["fsdp2"] / "checkpoints" / "step-0000004"
    assert sorted(p.name for p in step.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "state.json"
    ]  # fmt: skip
    assert json.loads((runs["fsdp2"] / "config.json").read_text())["fsdp"] is True


def test_the_fsdp_adapter_is_whole_and_loads_with_peft_on_one_process(runs):
    """save_adapter gathers the shards: the adapter equals the unsharded run's, and
    peft loads it onto the saved base model without a process group."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single, sharded = _adapter(runs["single"]), _adapter(runs["fsdp2"])
    assert set(single) == set(sharded) and single
    for name, value in single.items():
        assert sharded[name].shape == value.shape, name
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(runs["fsdp2"] / "base_model")
    reference = AutoModelForCausalLM.from_pretrained(runs["single"] / "base_model")
    for (name, p), q in zip(base.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name  # the same random init, gathered whole
    model = PeftModel.from_pretrained(base, runs["fsdp2"])
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(sharded)
    for name, value in sharded.items():  # adapter file key -> the model's parameter
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[key].detach(), value), name


def _sharded_state_on_one_rank(run: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore run's latest sharded checkpoint into a 1-rank FSDP model as decpo.train
    --resume does; returns its step and the full trainable weights (by name, in model
    order) followed by their AdamW state (`name/exp_avg`, ...)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    cfg = train.config_from_json(json.loads((run / "config.json").read_text()))
    dd = train.setup_distributed("cpu", fsdp=True)
    try:
        model, _ = train.build_model(cfg, run, dd.device, reuse_base=True, shard=True)
        optimizer, scheduler = train.build_optimizer(cfg, model, run, "continue")
        step = checkpoint.load_checkpoint(run, model, optimizer, scheduler, train.identity(cfg))
        options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
        weights, optim = get_state_dict(model, optimizer, options=options)
    finally:
        dist.destroy_process_group()
    state = {k: v.detach().clone() for k, v in weights.items()}
    for name, entries in optim["state"].items():
        state.update({f"{name}/{k}": v.detach().clone() for k, v in entries.items()})
    return step, state


def test_a_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path):
    """2 ranks saved step 4; one rank restores the adapter weights and AdamW moments
    of the unsharded run's step 4 (DCP reshards), then trains on from there."""
    from safetensors.torch import load_file

    step, state = _sharded_state_on_one_rank(runs["fsdp2"])
    assert step == 4
    saved = runs["single"] / "checkpoints" / "step-0000004"
    expected = load_file(str(saved / "tensors.safetensors"))
    names = [k[len("trainable/") :] for k in expected if k.startswith("trainable/")]
    model_order = [k for k in state if "/" not in k]
    assert sorted(names) == sorted(model_order)
    for index, name in enumerate(model_order):  # the optimizer numbers them in model order
        torch.testing.assert_close(state[name], expected[f"trainable/{name}"], rtol=1e-4,
                                   atol=1e-6)  # fmt: skip
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state[f"{name}/{key}"],
                                       expected[f"optimizer/{index}/{key}"], rtol=1e-4,
                                       atol=1e-9)  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp2"], run)
    before = train_rows(run)
    summary = train.main(["--resume", str(run), "--max-steps", "5"])  # --fsdp, one rank
    assert summary["steps"] == 5
    rows = train_rows(run)
    assert rows[:4] == before and rows[4]["step"] == 5
    assert all(torch.isfinite(torch.tensor(rows[4][k])) for k in METRIC_KEYS)
    step5 = run / "checkpoints" / "step-0000005"
    assert sorted(p.name for p in step5.iterdir()) == [".metadata", "__0_0.distcp", "state.json"]


def test_a_one_rank_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    """--fsdp on a single process (a one-rank process group) logs what the unsharded
    run logs; 2 ranks resume its step-4 checkpoint (DCP reshards) and hold the same
    weights: their gathered adapter and held-out metrics equal the one-rank run's."""
    one = tmp_path / "one"
    summary = train.main([*COMMON, "--grad-accum", "2", "--fsdp", "--output-dir", str(one)])
    assert_same_rows(train_rows(runs["single"]), train_rows(one), rel=1e-5, abs=1e-6)
    exported = _adapter(one)
    (one / "adapter_model.safetensors").unlink()
    torchrun_train(["--resume", str(one), "--max-steps", "4"], port=29542)
    resumed = json.loads((one / "summary.json").read_text())
    for name, value in exported.items():
        assert torch.equal(_adapter(one)[name], value), name
    for key in ("eval/rewards/margins", "eval/rewards/accuracies", "decorrelation_after"):
        assert resumed[key] == pytest.approx(summary[key], rel=1e-5, abs=1e-7), key
    assert [r["step"] for r in train_rows(one)] == [1, 2, 3, 4]


def test_a_tied_head_under_fsdp(tmp_path):
    """GPT-2 ties its LM head to the input embedding: the head shares the backbone
    unit's shard and is gathered for scoring; --fsdp on one rank logs what the
    unsharded run logs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from decpo import data, models

    tokenizer = models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer),
                                       n_positions=256))  # fmt: skip
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    args = ["--model", str(tmp_path / "gpt2"), "--lora-targets", "c_attn,c_fc",
            "--dec-module", "mlp.c_fc", "--lr", "1e-3", *COMMON, "--max-steps", "2",
            "--grad-accum", "2"]  # fmt: skip
    train.main([*args, "--output-dir", str(tmp_path / "plain")])
    train.main([*args, "--fsdp", "--output-dir", str(tmp_path / "fsdp")])
    assert_same_rows(
        train_rows(tmp_path / "plain"), train_rows(tmp_path / "fsdp"), rel=1e-5, abs=1e-6
    )


@pytest.mark.parametrize("flag", ["--gradient-checkpointing", "--precompute-ref"])
def test_fsdp_with_checkpointing_or_precomputed_reference(tmp_path, flag):
    """--fsdp (one rank: the sharded model, its collectives and its state dicts)
    together with activation checkpointing, or with the reference log-probs computed
    in a pass before training, logs what the same unsharded run logs."""
    args = [*COMMON, "--max-steps", "2", "--grad-accum", "2", flag]
    train.main([*args, "--output-dir", str(tmp_path / "plain")])
    train.main([*args, "--fsdp", "--output-dir", str(tmp_path / "fsdp")])
    assert_same_rows(
        train_rows(tmp_path / "plain"), train_rows(tmp_path / "fsdp"), rel=1e-5, abs=1e-6
    )
