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

    # With TRL's own head: bit-for-bit the DPO run. With decpo's head: the same run up
    # to fp32 rounding (Adam turns last-bit gradient differences in near-zero
    # components into lr-sized steps, so the losses drift apart slightly).
    dec = _trainer(DecPOTrainer, DecPOConfig, tmp_path / "a", tokenizer, dec_weight=0.0,
                   logprob_head="trl")  # fmt: skip
    ours = _trainer(DecPOTrainer, DecPOConfig, tmp_path / "c", tokenizer, dec_weight=0.0)
    dpo = _trainer(DPOTrainer, DPOConfig, tmp_path / "b", tokenizer)
    for trainer in (dec, ours, dpo):
        trainer.train()
    a, c, b = ([h["loss"] for h in t.state.log_history if "loss" in h] for t in (dec, ours, dpo))
    assert len(a) == len(b) == len(c) == 3
    assert a == pytest.approx(b, rel=1e-5)
    assert c[0] == pytest.approx(b[0], rel=1e-5) and c == pytest.approx(b, rel=5e-3)
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
        assert len(outs) == 4  # every layer hooked; the official code reads the first only
        a = outs[0][0::2, -1].float().abs()
        expected = (a @ a.T - torch.eye(a.shape[0])).mean()
        torch.testing.assert_close(trainer.dec_hooks.official_regularizer(), expected)
    # tests/test_official.py checks the whole loss against the official code's lines.


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="dec_tokens"):
        DecPOConfig(output_dir=str(tmp_path), dec_tokens="first", report_to="none")
    with pytest.raises(ValueError, match="dec_compat"):
        DecPOConfig(output_dir=str(tmp_path), dec_compat="paper", report_to="none")
    assert decpo.decorrelation_penalty  # the core API stays importable alongside


# ------------------------------------------------------- decpo's log-prob head in TRL

_NON_MODEL = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy",
            "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/margins")  # fmt: skip


def _head_forward(trainer, batch):
    """The policy forward exactly as TRL's DPO loss calls it."""
    kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return trainer.model(**kwargs, labels=labels, fused_lm_head=True, use_cache=False)


@torch.no_grad()
def _plant_argmax_labels(model, batch, per_sequence=4):
    """Set a few completion tokens to the model's own argmax prediction, so that
    is_top1 is true somewhere (a random tiny model rarely predicts a token)."""
    ids = batch["input_ids"].clone()
    for b in range(ids.shape[0]):
        positions = batch["completion_mask"][b].nonzero().squeeze(1)[1 : 1 + 2 * per_sequence : 2]
        for t in positions.tolist():
            logits = model(input_ids=ids[b : b + 1, :t], use_cache=False).logits
            ids[b, t] = logits[0, -1].argmax()
    return {**batch, "input_ids": ids}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("wpo", [False, True])
def test_decpo_head_matches_trl_head(tmp_path, tokenizer, wpo):
    from trl import DPOConfig, DPOTrainer

    dec = _trainer(DecPOTrainer, DecPOConfig, tmp_path / "a", tokenizer, dec_weight=0.0,
                   use_weighting=wpo)  # fmt: skip
    dpo = _trainer(DPOTrainer, DPOConfig, tmp_path / "b", tokenizer, use_weighting=wpo)
    dec.model.train()
    dpo.model.train()
    batch = _plant_argmax_labels(dpo.model, _first_batch(dec))
    ours, theirs = _head_forward(dec, batch), _head_forward(dpo, batch)
    mask = theirs.label_mask
    assert torch.equal(ours.label_mask, mask)
    assert _rel(ours.log_probs, theirs.log_probs) <= 1e-4  # fp32 tolerance
    assert _rel(ours.entropy, theirs.entropy) <= 1e-4
    assert _rel(ours.mean_logits, theirs.mean_logits) <= 1e-4
    assert torch.equal(ours.is_top1, theirs.is_top1)
    assert ours.is_top1.dtype == torch.bool and ours.is_top1[mask].any()
    if wpo:
        assert _rel(ours.log_sum_sq_probs, theirs.log_sum_sq_probs) <= 1e-4
    else:
        assert ours.log_sum_sq_probs is None and theirs.log_sum_sq_probs is None
    for out in (ours, theirs):
        assert torch.all(out.log_probs[~mask] == 0) and torch.all(out.entropy[~mask] == 0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)

    # The DPO loss, every metric TRL logs, and the LoRA gradient.
    loss_ours = dec.compute_loss(dec.model, batch)
    loss_theirs = dpo.compute_loss(dpo.model, batch)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
    for name in _METRICS:
        a, b = dec._metrics["train"][name][-1], dpo._metrics["train"][name][-1]
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), name
    loss_ours.backward()
    loss_theirs.backward()
    grads = {n: p.grad for n, p in dpo.model.named_parameters() if p.requires_grad}
    for n, p in dec.model.named_parameters():
        if p.requires_grad and grads[n].abs().sum() > 0:
            assert _rel(p.grad, grads[n]) <= 1e-4, n


def test_trl_head_is_kept_on_request_and_plain_dpo_trainer_one_line(tmp_path, tokenizer):
    from trl import DPOConfig, DPOTrainer

    from decpo.integrations.trl import use_decpo_head

    kept = _trainer(DecPOTrainer, DecPOConfig, tmp_path / "a", tokenizer, logprob_head="trl")
    plain = use_decpo_head(_trainer(DPOTrainer, DPOConfig, tmp_path / "b", tokenizer))
    batch = _first_batch(kept)
    calls = []
    original = decpo.token_logprobs
    try:
        decpo.token_logprobs = lambda *a, **k: calls.append(1) or original(*a, **k)
        ours, theirs = _head_forward(plain, batch), _head_forward(kept, batch)
    finally:
        decpo.token_logprobs = original
    assert len(calls) == 1  # the plain trainer's forward went through decpo, TRL's not
    assert _rel(ours.log_probs, theirs.log_probs) <= 1e-4
    with pytest.raises(ValueError, match="logprob_head"):
        DecPOConfig(output_dir=str(tmp_path), logprob_head="liger", report_to="none")


def test_softcapped_scaled_model_in_decpo_head(tmp_path, tokenizer):
    """A Gemma-2-style final_logit_softcapping and a Cohere-style logit_scale reach the
    head: log-probs equal log_softmax of the model's own (softcapped) logits."""
    from decpo.integrations.trl import add_decpo_lm_head

    model = models.build_tiny_model(tokenizer, seed=0)
    model.config.final_logit_softcapping = 2.0
    model.config.logit_scale = 3.0
    add_decpo_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 300, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].double()
    z = hidden @ model.lm_head.weight.double().T * 3.0
    logp = torch.log_softmax(2.0 * torch.tanh(z / 2.0), -1)
    target = labels[:, 1:]
    expected = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    assert _rel(out.log_probs, expected) <= 1e-4
    entropy = -(logp.exp() * logp).sum(-1) * (target != -100)
    assert _rel(out.entropy, entropy) <= 1e-4


@pytest.mark.parametrize("reentrant", [False, True])
def test_regularizer_under_gradient_checkpointing(tmp_path, tokenizer, reentrant):
    """With either checkpointing mode DecPOTrainer's loss and LoRA gradient equal those
    without checkpointing (the penalty included), and a short run logs dec/ metrics."""
    runs = {}
    for mode in (None, reentrant):
        kwargs = {} if mode is None else {
            "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": mode},
        }  # fmt: skip
        trainer = _trainer(DecPOTrainer, DecPOConfig, tmp_path / str(mode), tokenizer,
                           dec_weight=2.0, dec_layers=[1, 3], **kwargs)  # fmt: skip
        batch = _first_batch(trainer)
        model = trainer.model
        if mode is not None:
            kw = {"use_reentrant": mode}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.train()
        with trainer.dec_hooks:
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            with trainer.dec_hooks.capture():  # checks the penalty gradient was applied
                pass
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[mode] = (loss.detach(), grads, trainer._metrics["train"]["dec/penalty"][-1])
    (loss0, grads0, pen0), (loss1, grads1, pen1) = runs[None], runs[reentrant]
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert pen1 == pytest.approx(pen0, rel=1e-5) and pen0 > 0
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-7, msg=n)

    # The user's check from the issue: a real run logs the penalty and dec_weight matters.
    logs = {}
    for weight in (0.0, 1.0):
        trainer = _trainer(DecPOTrainer, DecPOConfig, tmp_path / f"run{weight}", tokenizer,
                           dec_weight=weight, max_steps=2, gradient_checkpointing=True,
                           gradient_checkpointing_kwargs={"use_reentrant": reentrant})  # fmt: skip
        trainer.train()
        logs[weight] = [h for h in trainer.state.log_history if "loss" in h]
    assert all("dec/penalty" in h for h in logs[0.0] + logs[1.0])
    assert logs[1.0][0]["loss"] != pytest.approx(logs[0.0][0]["loss"], rel=1e-6)
