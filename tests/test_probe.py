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


def _gpt2(n_layer: int, n_inner: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=4, n_head=1, n_inner=n_inner, vocab_size=10,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


SIGNS = torch.tensor([1.0, -1.0, 1.0, -1.0])  # a zero-mean column: centring keeps it, norm 2


def _set_mlp(layer, scales, biases):
    """c_fc (Conv1D, weight (in=4, out=neurons)): neuron n's input column is
    scales[n] * SIGNS (norm 2 |scales[n]|); the layer norm before it stays the
    identity (weight 1, bias 0), so folding changes nothing."""
    with torch.no_grad():
        for n, scale in enumerate(scales):
            layer.mlp.c_fc.weight[:, n] = scale * SIGNS
        layer.mlp.c_fc.bias.copy_(torch.tensor(biases))


def test_mlp_input_folds_the_layer_norm_and_centres_by_hand():
    model = _gpt2(1, 2)
    layer = model.transformer.h[0]
    with torch.no_grad():
        layer.ln_2.weight.copy_(torch.tensor([2.0, 1.0, 1.0, 0.0]))
        layer.ln_2.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))
        layer.mlp.c_fc.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0], [0.0, 4.0]]))
        layer.mlp.c_fc.bias.copy_(torch.tensor([0.5, -1.0]))
    weight, bias = probe.mlp_input(layer)
    # b_in + ln.b W_in: 0.5 + (1*1 + 1*0) = 1.5; -1 + (1*0 + 1*4) = 3
    assert bias.tolist() == pytest.approx([1.5, 3.0])
    # diag(ln.w) W_in: columns [2, 1, 0, 0] and [0, 2, 0, 0]; minus their means 0.75, 0.5
    expected = [[1.25, -0.5], [0.25, 1.5], [-0.75, -0.5], [-0.75, -0.5]]
    torch.testing.assert_close(weight, torch.tensor(expected, dtype=torch.float64))
    raw_weight, raw_bias = probe.mlp_input(layer, fold_ln=False)
    assert raw_bias.tolist() == [0.5, -1.0] and raw_weight[3].tolist() == [0.0, 4.0]


def test_weight_proxy_by_hand_with_the_official_normalization():
    model = _gpt2(2, 4)
    _set_mlp(model.transformer.h[0], [1, 1, 1, 1], [-3.0, 1.0, 2.0, 5.0])
    _set_mlp(model.transformer.h[1], [1, 1, 1, 1], [-4.0, -2.0, -1.0, 1.0])
    values, note = probe.weight_proxy(model.transformer.h)
    # terms ||w|| b: layer 0 [-6, 2, 4, 10], median (2 + 4) / 2 = 3, median |.| = 5;
    # layer 1 [-8, -4, -2, 2], median -3, median |.| = 3. Over max_l median |.| = 5.
    assert values == pytest.approx([0.6, -0.6])
    assert "folded" in note
    raw, raw_note = probe.weight_proxy(model.transformer.h, fold_ln=False)
    assert raw == pytest.approx([0.6, -0.6]) and "raw" in raw_note  # identity layer norm


def test_weight_change_by_hand():
    before, after = _gpt2(2, 3), _gpt2(2, 3)
    _set_mlp(before.transformer.h[0], [1, 1, 1], [1.0, 2.0, 3.0])
    _set_mlp(after.transformer.h[0], [1, 2, 1.5], [1.0, 2.0, 3.0])
    _set_mlp(before.transformer.h[1], [1, 1, 1], [-1.0, -1.0, -2.0])
    _set_mlp(after.transformer.h[1], [1.25, 1, 3], [-1.0, -1.0, -2.0])
    change, _ = probe.weight_change(before.transformer.h, after.transformer.h, k=2)
    # sum |dW| per neuron = 4 |d scale|: layer 0 [0, 4, 2] -> top-2 {1, 2}; layer 1
    # [1, 0, 8] -> {0, 2}. Terms before: [4, 6] and [-2, -4] -> medians 5, -3, scale 5
    # -> [1, -0.6]. After: [8, 9] and [-2.5, -12] -> 8.5, -7.25, scale 8.5 -> [1, -29/34].
    assert change == pytest.approx([0.0, (-29 / 34 + 0.6) / 0.6])


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


def _tiny_gpt2(where, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    from decpo import data, models

    torch.manual_seed(seed)
    tokenizer = models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(tokenizer),
                                       n_positions=128, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id))  # fmt: skip
    with torch.no_grad():  # GPT-2 initializes biases to 0; the weight proxy needs some
        for layer in model.transformer.h:
            layer.mlp.c_fc.bias.normal_(0.0, 0.1)
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


def test_probe_cli_compare_reports_the_weight_change(tmp_path):
    runs = []
    for i in range(2):
        model_dir = tmp_path / f"gpt2-{i}"
        _tiny_gpt2(model_dir, seed=i)
        run = tmp_path / f"run{i}"
        run.mkdir()
        config = train.Config(model=str(model_dir), output_dir=str(run), dec_module="mlp.c_fc")
        (run / "config.json").write_text(json.dumps(config.__dict__))
        runs.append(run)
    prompts = tmp_path / "pairs.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"note {i}", "chosen": "a", "rejected": "b"})
                               + "\n" for i in range(6)))  # fmt: skip
    record = probe.main([str(runs[1]), "--prompts", str(prompts), "--compare", str(runs[0])])
    old, _ = probe.load_for_probe(str(tmp_path / "gpt2-0"), None)
    new, _ = probe.load_for_probe(str(tmp_path / "gpt2-1"), None)
    expected, _ = probe.weight_change(old.transformer.h, new.transformer.h)
    assert record["weight_change"] == pytest.approx(expected) and len(expected) == 2
    assert record["compared_to"] == str(runs[0])
    saved = json.loads((runs[1] / "probe" / "probe.json").read_text())
    assert {"decorrelation", "variance_decpo", "sparsity_decpo", "weight_proxy",
            "weight_change"} <= set(saved["metric_sources"])  # fmt: skip
    assert saved["metric_sources"]["variance_decpo"].startswith("decpo-defined")
