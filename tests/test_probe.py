"""Probe metrics against hand-computed values, and python -m decpo.probe on a run."""

from __future__ import annotations

import json

import pytest
import torch

from decpo import probe, train


def test_variance_and_sparsity_by_hand():
    acts = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])
    # per-feature variances (population): 1, 0, 0 -> mean 1/3
    assert probe.activation_variance(acts) == pytest.approx(1 / 3)
    # RMS = sqrt((1 + 4 + 9 + 4) / 6) = sqrt(3); entries below 0.1 sqrt(3): the two zeros
    assert probe.activation_sparsity(acts) == pytest.approx(2 / 6)
    assert probe.activation_sparsity(acts, fraction=0.6) == pytest.approx(3 / 6)  # |1| < 1.04


def test_weight_proxy_by_hand_on_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=4, n_head=1, n_inner=3, vocab_size=10))
    with torch.no_grad():
        for layer, scale in zip(model.transformer.h, (1.0, -2.0), strict=True):
            fc = layer.mlp.c_fc  # Conv1D: weight (in=4, out=3)
            fc.weight.zero_()
            fc.weight[:, 0] = 1.0  # neuron 0: ||w|| = 2
            fc.weight[:, 1] = 2.0  # neuron 1: ||w|| = 4
            fc.weight[:, 2] = 0.5  # neuron 2: ||w|| = 1
            fc.bias.copy_(torch.tensor([1.0, 1.0, 3.0]) * scale)
    values, _ = probe.weight_proxy(model.transformer.h)
    # layer 0: products 2, 4, 3 -> median 3; layer 1: -4, -8, -6 -> median -6; / max |.| = 6
    assert values == pytest.approx([0.5, -1.0])


def test_weight_proxy_is_undefined_without_mlp_bias():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=20))  # fmt: skip
    values, note = probe.weight_proxy(model.model.layers)
    assert values is None and "undefined" in note


def test_probe_cli_on_a_finished_demo_run(tmp_path):
    run = tmp_path / "run"
    train.main(["--max-steps", "3", "--demo-pairs", "200", "--batch-size", "4",
                "--output-dir", str(run)])  # fmt: skip
    record = probe.main([str(run), "--max-prompts", "20"])
    saved = json.loads((run / "probe" / "probe.json").read_text())
    assert saved["layers"] == [0, 1, 2, 3] == record["layers"]
    assert all(0.0 <= d <= 2.0 for d in saved["decorrelation"])
    assert saved["weight_proxy"] is None and "undefined" in saved["weight_proxy_note"]
    assert (run / "probe" / "probe.png").is_file()


def _tiny_gpt2(where):
    from transformers import GPT2Config, GPT2LMHeadModel

    from decpo import data, models

    tokenizer = models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(tokenizer),
                                       n_positions=128))  # fmt: skip
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)


def test_a_run_trained_with_model_dir_finds_that_model(tmp_path):
    """A run of --model DIR keeps DIR in its config.json; the probe loads it from
    there (not RUN/base_model, which only the tiny demo model has)."""
    model_dir = tmp_path / "gpt2"
    _tiny_gpt2(model_dir)
    run = tmp_path / "run"
    run.mkdir()
    config = train.Config(model=str(model_dir), output_dir=str(run), dec_module="mlp.c_fc")
    (run / "config.json").write_text(json.dumps(config.__dict__))
    prompts = tmp_path / "pairs.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"note {i}", "chosen": "a", "rejected": "b"})
                               + "\n" for i in range(6)))  # fmt: skip
    record = probe.main([str(run), "--prompts", str(prompts), "--max-prompts", "4"])
    assert record["model"] == str(model_dir) and record["prompts"] == 4
    assert record["layers"] == [0, 1]


@pytest.mark.parametrize("n", ["0", "1", "-3"])
def test_fewer_than_two_prompts_are_refused(tmp_path, n, capsys):
    with pytest.raises(SystemExit):
        probe.main([str(tmp_path), "--max-prompts", n])
    assert "--max-prompts" in capsys.readouterr().err
