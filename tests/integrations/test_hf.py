"""Softcapped and scaled heads of Hugging Face models in decpo.train and the shared
config reader (decpo.integrations.hf)."""

from __future__ import annotations

import pytest
import torch

from decpo import data, models, train
from decpo.integrations.hf import logit_transform


def _gemma2(vocab: int, softcap: float = 2.0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=256, final_logit_softcapping=softcap, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():  # logits of several units, so the softcap bends them
        model.lm_head.weight.mul_(8.0)
    return model


def test_logit_transform_reads_each_convention():
    from transformers import CohereConfig, GraniteConfig, LlamaConfig

    assert logit_transform(LlamaConfig()) == (None, 1.0)
    assert logit_transform(_gemma2(50, softcap=30.0).config) == (30.0, 1.0)
    assert logit_transform(CohereConfig(logit_scale=0.0625)) == (None, 0.0625)
    assert logit_transform(GraniteConfig(logits_scaling=8.0)) == (None, 0.125)


def test_sequence_logps_of_a_softcapped_model_match_its_own_logits():
    tokenizer = models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)
    model = models.add_lora(_gemma2(len(tokenizer)), 4, None, ["q_proj", "up_proj"])
    pairs, _ = data.tokenize_pairs(data.synthetic_pairs(3, 0), tokenizer, 64)
    batch = data.collate(pairs, tokenizer.pad_token_id)
    total = train.score_sequences(model, batch, train.Config(), torch.device("cpu")).total
    # The model's forward applies final_logit_softcapping to its logits itself.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.abs().max() < 2.0 and logits.abs().max() > 1.5  # capped, and the cap bites
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    targets = batch["labels"][:, 1:]
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    torch.testing.assert_close(total.double(), picked.sum(1), rtol=1e-4, atol=1e-4)
    total.sum().backward()  # the chain rule through the softcap reaches the adapters
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_decpo_train_runs_a_gemma2_style_model(tmp_path):
    """decpo.train accepts a softcapped model (it used to refuse it)."""
    tokenizer = models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)
    _gemma2(len(tokenizer)).save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    summary = train.main([
        "--model", str(tmp_path / "gemma2"), "--max-steps", "2", "--eval-every", "1000",
        "--demo-pairs", "40", "--batch-size", "2", "--max-length", "64",
        "--output-dir", str(tmp_path / "run"),
    ])  # fmt: skip
    assert summary["steps"] == 2


@pytest.mark.parametrize("reentrant", [False, True])
def test_decpo_train_step_under_gradient_checkpointing(reentrant):
    """decpo.train's step (forward_pair_batch, DecPO loss) gives the same loss and LoRA
    gradient with reentrant or non-reentrant checkpointing as without."""
    tokenizer = models.build_tokenizer(data.demo_corpus()[:200], vocab_size=300)
    pairs, _ = data.tokenize_pairs(data.synthetic_pairs(3, 0), tokenizer, 64)
    batch = data.collate(pairs, tokenizer.pad_token_id)
    cfg = train.Config(loss="decpo", dec_weight=5.0, batch_size=3)
    results = []
    for mode in (None, reentrant):
        model = models.build_tiny_model(tokenizer, seed=0)
        if mode is not None:
            kwargs = {"use_reentrant": mode}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.enable_input_require_grads()
        torch.manual_seed(0)
        model = models.add_lora(model, 4, None, ["q_proj", "up_proj"])
        model.train()
        with train.DecorrelationHooks(model, cfg.dec_module) as hooks:
            loss, metrics = train.forward_pair_batch(
                model, batch, cfg, hooks, torch.device("cpu"), train=True
            )
            loss.backward()
            with hooks.capture():  # raises if the penalty gradient missed a layer
                pass
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), metrics["dec/penalty"], grads))
    (loss0, pen0, grads0), (loss1, pen1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pen1, pen0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-7, msg=n)
