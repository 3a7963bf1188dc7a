"""DecPOTrainer on CPU with a tiny model and LoRA."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")

import decpo
from decpo import data, models
from decpo.hooks import DecorrelationHooks
from decpo.integrations.trl import DecPOConfig, DecPOTrainer


@pytest.fixture(scope="module")
def tokenizer():
    return models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)


def _dataset(n: int = 32):
    from datasets import Dataset

    pairs = data.synthetic_pairs(n, seed=3)
    return Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )


def _model(tokenizer):
    model = models.build_tiny_model(tokenizer, seed=0)
    torch.manual_seed(0)
    return models.add_lora(model, 4, None, ["q_proj", "v_proj", "up_proj", "down_proj"])


def _config(tmp_path, cls, **kwargs):
    base = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": 3,
        "learning_rate": 1e-2, "max_length": 64, "report_to": "none", "save_strategy": "no",
        "use_cpu": True, "logging_steps": 1, "disable_tqdm": True, "seed": 0,
        "dataloader_num_workers": 0,
    }  # fmt: skip
    return cls(**(base | kwargs))


def _trainer(cls, config_cls, tmp_path, tokenizer, **kwargs):
    warnings.filterwarnings("ignore")
    return cls(
        model=_model(tokenizer), args=_config(tmp_path, config_cls, **kwargs),
        train_dataset=_dataset(), processing_class=tokenizer,
    )  # fmt: skip


def _first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.accelerator.device) for k, v in batch.items()}


def test_loss_is_dpo_plus_weighted_penalty(tmp_path, tokenizer):
    from trl import DPOConfig, DPOTrainer

    dec = _trainer(DecPOTrainer, DecPOConfig, tmp_path / "a", tokenizer, dec_weight=0.5,
                   dec_layers=[1, 3])  # fmt: skip
    dpo = _trainer(DPOTrainer, DPOConfig, tmp_path / "b", tokenizer)
    batch = _first_batch(dec)
    dec.model.train()
    dpo.model.train()
    loss = dec.compute_loss(dec.model, batch)
    base = dpo.compute_loss(dpo.model, batch)
    # The penalty computed independently: our own hooks around a plain policy forward.
    with DecorrelationHooks(dpo.model, "mlp.up_proj", [1, 3]) as hooks:
        with hooks.capture():
            dpo.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        penalty = hooks.penalty(batch["completion_mask"], "last")
    torch.testing.assert_close(loss, base + 0.5 * penalty, rtol=1e-5, atol=1e-6)
    assert "dec/penalty" in dec._metrics["train"] and "dec/decorrelation" in dec._metrics["train"]


def test_hooks_skip_the_reference_pass_and_are_removed(tmp_path, tokenizer):
    trainer = _trainer(DecPOTrainer, DecPOConfig, tmp_path, tokenizer)
    batch = _first_batch(trainer)
    calls = []
    original = trainer.dec_hooks._record

    def spy(module, args, output):
        calls.append(torch.is_grad_enabled())
        original(module, args, output)

    trainer.dec_hooks._record = spy
    trainer.model.train()
    with trainer.dec_hooks:
        with trainer.dec_hooks.capture():
            trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        policy_records = len(trainer.dec_hooks.outputs)
        calls.clear()
        trainer.compute_loss(trainer.model, batch)
    layers = len(trainer.dec_hooks.modules)
    assert policy_records == layers
    # compute_loss ran the policy (grad) and the reference (no_grad): both hit the hooks,
    # only the policy's outputs were kept.
    assert calls.count(True) == layers and calls.count(False) == layers
    assert all(not m._forward_hooks for m in trainer.dec_hooks.modules)


def test_dec_weight_zero_matches_trl(tmp_path, tokenizer):
    from trl import DPOConfig, DPOTrainer

    dec = _trainer(DecPOTrainer, DecPOConfig, tmp_path / "a", tokenizer, dec_weight=0.0)
    dpo = _trainer(DPOTrainer, DPOConfig, tmp_path / "b", tokenizer)
    dec.train()
    dpo.train()
    a = [h["loss"] for h in dec.state.log_history if "loss" in h]
    b = [h["loss"] for h in dpo.state.log_history if "loss" in h]
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-5)
    assert any("dec/penalty" in h for h in dec.state.log_history)


def test_trains_and_logs(tmp_path, tokenizer):
    trainer = _trainer(DecPOTrainer, DecPOConfig, tmp_path, tokenizer, dec_weight=1.0,
                       dec_tokens="all")  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "dec/penalty" in h]
    assert len(logs) == 3 and all(h["dec/penalty"] >= 0 for h in logs)
    metrics = trainer.evaluate(_dataset(8))
    assert "eval_dec/decorrelation" in metrics


def test_official_compat_mode(tmp_path, tokenizer):
    trainer = _trainer(DecPOTrainer, DecPOConfig, tmp_path, tokenizer, dec_compat="official",
                       dec_weight=0.001)  # fmt: skip
    batch = _first_batch(trainer)
    trainer.model.train()
    with trainer.dec_hooks:
        with trainer.dec_hooks.capture():
            trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        outs = trainer.dec_hooks.outputs
        a = [o[0::2, -1].float().abs() for o in outs]
        expected = torch.stack([(x @ x.T - torch.eye(x.shape[0])).mean() for x in a]).mean()
        torch.testing.assert_close(trainer.dec_hooks.official_regularizer(), expected)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="dec_tokens"):
        DecPOConfig(output_dir=str(tmp_path), dec_tokens="first", report_to="none")
    with pytest.raises(ValueError, match="dec_compat"):
        DecPOConfig(output_dir=str(tmp_path), dec_compat="paper", report_to="none")
    assert decpo.decorrelation_penalty  # the core API stays importable alongside
