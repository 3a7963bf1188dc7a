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
