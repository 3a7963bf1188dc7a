"""DecorrelationHooks: which passes record, row selection, cleanup, the metric."""

from __future__ import annotations

import pytest
import torch

import decpo
from decpo import data, models
from decpo.hooks import DecorrelationHooks, feature_decorrelation, select_rows


@pytest.fixture(scope="module")
def tiny():
    tokenizer = models.build_tokenizer(data.demo_corpus()[:200], vocab_size=300)
    model = models.add_lora(
        models.build_tiny_model(tokenizer, seed=0), 4, None, ["q_proj", "up_proj"]
    )
    pairs, _ = data.tokenize_pairs(data.synthetic_pairs(3, 0), tokenizer, 64)
    return model, data.collate(pairs, tokenizer.pad_token_id)


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_records_the_policy_pass_only(tiny):
    model, batch = tiny
    with DecorrelationHooks(model, "mlp.up_proj", [1, 3]) as hooks:
        _forward(model, batch)  # outside capture: not recorded
        with hooks.capture():
            logits = _forward(model, batch)
            assert len(hooks.outputs) == 2
            with torch.no_grad(), model.disable_adapter():  # a reference pass inside capture
                _forward(model, batch)
        assert len(hooks.outputs) == 2
        penalty = hooks.penalty(batch["labels"] != data.IGNORE_INDEX)
        (logits.sum() * 0 + penalty).backward()
        with torch.no_grad(), hooks.capture():  # evaluation under no_grad
            _forward(model, batch)
        assert hooks.outputs == []
        with torch.no_grad(), hooks.capture(force=True):  # metrics ask for it explicitly
            _forward(model, batch)
        assert len(hooks.outputs) == 2
    assert all(not m._forward_hooks for m in hooks.modules)


def test_gradient_checkpoint_recomputation_does_not_record(tiny):
    model, batch = tiny
    base = model.get_base_model()
    models.enable_checkpointing(base)
    base.train()
    try:
        with DecorrelationHooks(model, "mlp.up_proj") as hooks:
            with hooks.capture():
                logits = _forward(model, batch)
            assert len(hooks.outputs) == 4
            recorded = []
            original = hooks._record

            def spy(module, args, output):
                recorded.append(1)
                original(module, args, output)

            for h in hooks._handles:
                h.remove()
            hooks._handles = [m.register_forward_hook(spy) for m in hooks.modules]
            hooks._active = True  # even while "capturing", recomputation must not add rows
            logits.float().pow(2).mean().backward()
            assert recorded, "checkpointing should have re-run the forward"
            assert len(hooks.outputs) == 4
            hooks._active = False
    finally:
        for module in base.modules():  # back to plain forwards for the other tests
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
        base.eval()


def test_bad_module_or_layer(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"no module matching 'mlp\.nope'"):
        DecorrelationHooks(model, "mlp.nope")
    with pytest.raises(ValueError, match="out of range"):
        DecorrelationHooks(model, "mlp.up_proj", [7])
    with pytest.raises(ValueError, match="3 modules"):
        DecorrelationHooks(model, "mlp.*_proj")  # gate_proj, up_proj and down_proj
    assert DecorrelationHooks(model, "mlp.up*").modules[0] is DecorrelationHooks(model).modules[0]


def test_select_rows_last_and_all():
    out = torch.arange(2 * 3 * 5 * 2, dtype=torch.float32).reshape(2, 3, 5, 2)  # (L, B, T, D)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    hidden, seg = select_rows(list(out), mask, "last")
    assert seg is None
    assert torch.equal(hidden, out[:, [0, 1, 2], [2, 3, 4]])
    hidden, seg = select_rows(list(out), mask, "all")
    assert seg.tolist() == [0, 0, 1, 2, 2, 2, 2, 2]
    assert torch.equal(hidden[:, 2], out[:, 1, 3])


def test_feature_decorrelation_by_hand():
    # Two groups: identical rows (cos 1) and orthogonal rows (cos 0).
    rows = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [4.0, 0.0]])[None]
    seg = torch.tensor([0, 0, 1, 1])
    # pairs: (0,1), (1,0) cos 1; (2,3), (3,2) cos 0 -> mean 0.5
    assert feature_decorrelation(rows, seg).item() == pytest.approx(0.5)
    assert feature_decorrelation(rows[:, :2], None).item() == pytest.approx(0.0)
    # The penalty on the same rows agrees with the cosine picture.
    assert decpo.decorrelation_penalty(rows[0, 2:], offdiag=True).item() == pytest.approx(0.0)


def test_any_hugging_face_model_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=50))
    ids = torch.randint(0, 50, (4, 9))
    attention = torch.ones(4, 9, dtype=torch.long)
    attention[1, 6:] = 0
    with DecorrelationHooks(model, "mlp.c_fc", [0, 2]) as hooks:
        with hooks.capture():
            model(input_ids=ids, attention_mask=attention)
        hidden, _ = hooks.rows(attention, "last")  # the last real token of each sequence
        assert hidden.shape == (2, 4, 128)
        torch.testing.assert_close(hidden[:, 1], torch.stack([o[1, 5] for o in hooks.outputs]))
        hooks.penalty(attention, "all").backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None


def _set_checkpointing(base, mode):
    """mode None: off; else torch.utils.checkpoint with use_reentrant=mode."""
    if mode is None:
        for module in base.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
        return
    kwargs = {"use_reentrant": mode}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _penalized_grads(model, batch, mode, tokens):
    """LoRA gradients of mean(logits^2) + 0.7 x penalty with checkpointing `mode`."""
    base = model.get_base_model()
    _set_checkpointing(base, mode)
    base.train()
    handle = base.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out.requires_grad_(True)  # what peft's enable_input_require_grads does
    )
    model.zero_grad()
    try:
        with DecorrelationHooks(model, "mlp.up_proj", [0, 2, 3]) as hooks:
            for _ in range(2):  # two steps: the second checks the first was complete
                model.zero_grad()
                with hooks.capture():
                    logits = _forward(model, batch)
                assert len(hooks.outputs) == 3
                penalty = hooks.penalty(batch["attention_mask"], tokens)
                loss = logits.float().pow(2).mean() * 1e-3 + 0.7 * penalty
                (loss * 0.5).backward()  # a loss scale, as gradient accumulation applies
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        handle.remove()
        _set_checkpointing(base, None)
        base.eval()
    return penalty.detach(), grads


@pytest.mark.parametrize("tokens", ["last", "all"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_penalty_gradient_under_gradient_checkpointing(tiny, reentrant, tokens):
    # The regularizer must act identically with and without checkpointing; with
    # use_reentrant=True the checkpointed forward runs under no_grad (the old hooks
    # recorded nothing there and DecPO trained as DPO).
    model, batch = tiny
    penalty_ref, ref = _penalized_grads(model, batch, None, tokens)
    penalty, grads = _penalized_grads(model, batch, reentrant, tokens)
    torch.testing.assert_close(penalty, penalty_ref)
    assert ref.keys() == grads.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-7, msg=name)
    # The penalty moves the hooked layers' adapters: its gradient is really in there.
    up = [n for n in ref if "layers.2.mlp.up_proj.lora_B" in n]
    assert up and ref[up[0]].abs().sum() > 0


def test_reentrant_checkpoint_gradient_that_never_arrives_is_an_error(tiny):
    model, batch = tiny
    base = model.get_base_model()
    _set_checkpointing(base, True)
    base.train()
    handle = base.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out.requires_grad_(True)
    )
    try:
        with DecorrelationHooks(model, "mlp.up_proj", [1]) as hooks:
            with hooks.capture():
                _forward(model, batch)
            penalty = hooks.penalty(batch["attention_mask"], "last")
            penalty.backward()  # reaches the probe, but no layer is recomputed
            with pytest.raises(RuntimeError, match="use_reentrant"), hooks.capture():
                pass
    finally:
        handle.remove()
        _set_checkpointing(base, None)
        base.eval()
