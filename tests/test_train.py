"""python -m decpo.train end to end: outputs, the demo's accuracy, resume, data
parallel, signals, checkpoint atomicity, non-finite losses."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from decpo import checkpoint, train
from tests.helpers import assert_same_rows, torchrun_train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-steps", "6", "--eval-every", "3", "--save-every", "3", "--demo-pairs", "200",
        "--batch-size", "4"]  # fmt: skip
KEYS = {
    "step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "dec/penalty", "dec/decorrelation",
}  # fmt: skip


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _train_rows(out: Path) -> list[dict]:
    return [r for r in _metrics(out) if "loss" in r]


def _run(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "decpo.train", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600, **kw,
    )  # fmt: skip


def test_demo_defaults_learn_the_task(tmp_path):
    """The no-argument demo (here with its defaults, in another directory) ends with
    held-out reward accuracy >= 0.9 and writes every promised output."""
    out = tmp_path / "demo"
    summary = train.main(["--output-dir", str(out)])
    assert summary["eval/rewards/accuracies"] >= 0.9
    assert summary["decorrelation_after"] > summary["decorrelation_before"]
    rows = _train_rows(out)
    assert len(rows) == train.Config.max_steps and set(rows[0]) >= KEYS
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "training_curves.png", "summary.json", "config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "latest").is_file()
    # The adapter loads back onto the saved base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    PeftModel.from_pretrained(base, out)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "simpo", "sft"])
def test_other_losses_run(tmp_path, loss):
    summary = train.main([*FAST, "--loss", loss, "--output-dir", str(tmp_path / loss),
                          "--dec-tokens", "all"])  # fmt: skip
    assert summary["steps"] == 6
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _train_rows(tmp_path / loss))


def test_resume_reproduces_an_uninterrupted_run(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.main([*FAST, "--output-dir", str(full)])
    log_metrics = train.log_metrics

    def sigterm_after_step_2(out, row, dd):  # as if SIGTERM arrived during step 2
        log_metrics(out, row, dd)
        if row["step"] == 2:
            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(train, "log_metrics", sigterm_after_step_2)
        assert train.main([*FAST, "--output-dir", str(cut)]) == {"stopped_at": 2}
    assert (cut / "checkpoints" / "latest").read_text() == "step-0000002"
    assert len(_train_rows(cut)) == 2
    train.main(["--resume", str(cut), "--max-steps", "6"])
    a, b = _train_rows(full), _train_rows(cut)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        for key in KEYS | {"lr"}:
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)


def test_data_parallel_matches_gradient_accumulation(tmp_path):
    """2 gloo ranks with --batch-size 2 log what one process with --grad-accum 2 logs."""
    common = [*FAST, "--batch-size", "2", "--max-steps", "3", "--eval-every", "100"]
    single = tmp_path / "single"
    train.main([*common, "--grad-accum", "2", "--output-dir", str(single)])
    ddp = tmp_path / "ddp"
    torchrun_train([*common, "--output-dir", str(ddp)], port=29517)
    a, b = _train_rows(single), _train_rows(ddp)
    assert len(a) == len(b) == 3
    assert_same_rows(a, b)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "decpo.train", "--max-steps", "100000", "--demo-pairs", "200",
         "--batch-size", "4", "--eval-every", "100000", "--save-every", "100000",
         "--output-dir", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not _has_train_rows(out):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    assert "stopped by signal" in output
    step = _train_rows(out)[-1]["step"]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{step:07d}"


def _has_train_rows(out: Path) -> bool:
    try:
        return bool(_train_rows(out))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main([*FAST, "--max-steps", "3", "--output-dir", str(out)])
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step-0000003"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(out, 4, model, opt, sched)
    assert (root / "latest").read_text() == "step-0000003"
    assert (root / "step-0000003" / "tensors.safetensors").is_file()
    assert not (root / "step-0000004").exists()
    assert not list(root.glob(".step-*"))


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = train.decpo.dpo_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += result.losses.requires_grad  # training steps only
        if calls["n"] > 2:  # after two good steps
            return result._replace(losses=result.losses * float("nan"))
        return result

    monkeypatch.setattr(train.decpo, "dpo_loss", poisoned)
    with pytest.raises(SystemExit, match="non-finite loss"):
        train.main([*FAST, "--save-every", "1", "--eval-every", "1000", "--output-dir", str(out)])
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest.startswith("step-")
    assert (out / "checkpoints" / latest / "tensors.safetensors").is_file()


def test_bad_flags_are_rejected():
    result = _run(["--batch-size", "0"])
    assert result.returncode == 2 and "--batch-size must be >= 1" in result.stderr
    result = _run(["--loss", "kto"])
    assert result.returncode == 2 and "unknown loss 'kto'" in result.stderr


def test_trains_on_real_hh_data(tmp_path):
    hh = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
    if not hh.is_file():
        pytest.skip("../shared/data is not beside this checkout")
    summary = train.main(["--data", str(hh), "--max-steps", "2", "--batch-size", "2",
                          "--max-length", "96", "--eval-every", "1000",
                          "--output-dir", str(tmp_path / "hh")])  # fmt: skip
    assert summary["steps"] == 2 and summary["skipped_pairs"] > 0


def test_a_local_gpt2_model(tmp_path):
    """--model DIR with another architecture: the backbone and head are found generically."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from decpo import data, models

    tokenizer = models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer),
                                       n_positions=256))  # fmt: skip
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    summary = train.main(["--model", str(tmp_path / "gpt2"), "--lora-targets", "c_attn,c_fc",
                          "--dec-module", "mlp.c_fc", "--lr", "1e-3", *FAST,
                          "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert summary["steps"] == 6
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["schedule_steps"] == 6


def test_precomputed_reference_and_gradient_checkpointing_match(tmp_path):
    """--precompute-ref and --gradient-checkpointing change the cost, not the numbers."""
    base = train.main([*FAST, "--output-dir", str(tmp_path / "base")])
    pre = train.main([*FAST, "--precompute-ref", "--output-dir", str(tmp_path / "pre")])
    ckpt = train.main([*FAST, "--gradient-checkpointing", "--output-dir", str(tmp_path / "ck")])
    a = _train_rows(tmp_path / "base")
    for other in ("pre", "ck"):
        for ra, rb in zip(a, _train_rows(tmp_path / other), strict=True):
            for key in KEYS:
                if key == "rewards/accuracies" and ra["step"] == 1:
                    # The policy is its reference at step 1: every margin is rounding
                    # noise (a precomputed reference comes from other batches, other
                    # padding), so which of the tied pairs count as correct is arbitrary.
                    assert abs(rb["rewards/margins"]) < 1e-6, other
                    continue
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (other, key)
    assert base["eval/rewards/margins"] == pytest.approx(pre["eval/rewards/margins"], rel=1e-4)
    assert base["eval/rewards/margins"] == pytest.approx(ckpt["eval/rewards/margins"], rel=1e-4)


def test_trl_loss_types_run_on_the_demo(tmp_path, monkeypatch):
    """Each of TRL's other loss types trains 2 steps on the demo. At step 1 the LoRA
    policy equals the reference (zero log-ratios), so the logged loss is the loss
    type's value there: the flag reaches decpo.dpo_loss under its own name."""
    monkeypatch.setattr(train, "plot_curves", lambda *args, **kwargs: None)  # a third of the time
    zero = torch.zeros(4, dtype=torch.float64)
    for loss in train.TRL_LOSSES:
        eps = {"exo_pair": 1e-3, "robust": 0.1}.get(loss, 0.0)
        out = tmp_path / loss
        summary = train.main(["--max-steps", "2", "--eval-every", "2", "--save-every", "2",
                              "--demo-pairs", "24", "--batch-size", "4", "--loss", loss,
                              "--label-smoothing", str(eps), "--output-dir", str(out)])  # fmt: skip
        assert summary["steps"] == 2, loss
        rows = _train_rows(out)
        assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows), loss
        lengths = {"chosen_lengths": zero + 3, "rejected_lengths": zero + 5}
        expected = train.decpo.dpo_loss(zero, zero, zero, zero, beta=train.Config.beta,
                                        loss_type=loss, label_smoothing=eps, **lengths)  # fmt: skip
        assert rows[0]["loss"] == pytest.approx(float(expected.losses.mean()), rel=1e-4), loss


def test_dec_penalty_composes_with_any_loss(tmp_path, monkeypatch):
    """--dec-penalty adds dec_weight x penalty to a non-DPO loss: at step 1 (zero
    log-ratios) the logged loss is the loss type's value there plus that term."""
    monkeypatch.setattr(train, "plot_curves", lambda *args, **kwargs: None)
    zero = torch.zeros(4, dtype=torch.float64)
    expected = float(train.decpo.dpo_loss(zero, zero, zero, zero, beta=0.1,
                                          loss_type="ipo").losses.mean())  # fmt: skip
    args = ["--max-steps", "1", "--eval-every", "1", "--save-every", "1", "--demo-pairs", "24",
            "--batch-size", "4", "--loss", "ipo", "--dec-weight", "2.0"]  # fmt: skip
    train.main([*args, "--output-dir", str(tmp_path / "plain")])
    train.main([*args, "--dec-penalty", "--output-dir", str(tmp_path / "penalized")])
    plain, penalized = _train_rows(tmp_path / "plain")[0], _train_rows(tmp_path / "penalized")[0]
    assert plain["loss"] == pytest.approx(expected, rel=1e-4)
    assert penalized["dec/penalty"] > 0
    assert penalized["loss"] == pytest.approx(expected + 2.0 * penalized["dec/penalty"], rel=1e-4)


@pytest.mark.parametrize(
    "flags",
    [
        ["--loss", "dpo,sft", "--loss-weights", "1,0.5"],
        ["--loss", "ipo", "--f-divergence-type", "js_divergence"],
        ["--f-divergence-type", "alpha_divergence", "--f-alpha-divergence-coef", "0.3"],
        ["--loss", "discopop", "--discopop-tau", "0.1"],
        ["--use-weighting"],
        ["--ld-alpha", "0.5", "--loss", "hinge,sigmoid_norm", "--dec-penalty"],
    ],
    ids=["list", "f-div", "alpha", "discopop-tau", "wpo", "ld-dpo"],
)
def test_loss_options_train_on_the_demo(tmp_path, monkeypatch, flags):
    """Every loss option of decpo.dpo_loss is reachable from the command line and
    trains two finite steps on the demo."""
    monkeypatch.setattr(train, "plot_curves", lambda *args, **kwargs: None)
    summary = train.main(["--max-steps", "2", "--eval-every", "2", "--save-every", "2",
                          "--demo-pairs", "24", "--batch-size", "4", *flags,
                          "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert summary["steps"] == 2
    assert all(math.isfinite(r["loss"]) for r in _train_rows(tmp_path / "run"))


@pytest.fixture(scope="module")
def tiny_batch():
    from decpo import data, models

    tokenizer = models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)
    model = models.add_lora(models.build_tiny_model(tokenizer, 0), 4, None, ["q_proj"])
    for name, p in model.named_parameters():  # a policy that differs from its reference
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    pairs, _ = data.tokenize_pairs(data.synthetic_pairs(4, 0), tokenizer, 64)
    return model, data.collate(pairs, tokenizer.pad_token_id)


def _loss(model, batch, **fields) -> torch.Tensor:
    cfg = train.Config(dec_weight=0.0, **fields)
    with train.DecorrelationHooks(model, cfg.dec_module) as hooks:
        loss, _ = train.forward_pair_batch(model, batch, cfg, hooks, torch.device("cpu"), True)
    return loss.detach().double()


def test_a_loss_list_is_the_weighted_sum(tiny_batch):
    model, batch = tiny_batch
    both = _loss(model, batch, loss="dpo,sft,apo_zero", loss_weights="1,0.5,2")
    parts = [_loss(model, batch, loss=name) for name in ("dpo", "sft", "apo_zero")]
    assert both == pytest.approx(float(parts[0] + 0.5 * parts[1] + 2 * parts[2]), rel=1e-5)


def test_wpo_and_ld_dpo_scores_match_the_logits(tiny_batch):
    """--use-weighting's per-sequence log-weights and --ld-alpha's log-probs, from the
    fused log-prob pass, against float64 log-softmax of the model's own logits."""
    from decpo import data

    model, batch = tiny_batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cfg = train.Config(use_weighting=True, ld_alpha=0.3)
        scores = train.score_sequences(model, batch, cfg, torch.device("cpu"), wpo=True)
    logp_all = torch.log_softmax(logits[:, :-1].double(), -1)  # (2B, T - 1, V)
    targets = batch["labels"][:, 1:]
    mask = targets != data.IGNORE_INDEX
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    log_p2 = torch.logsumexp(2 * logp_all, -1)
    wpo = ((logp - log_p2) * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(scores.wpo.double(), wpo, rtol=1e-4, atol=1e-4)
    n = logp.shape[0] // 2
    shared = torch.minimum(mask[:n].sum(-1), mask[n:].sum(-1))
    expected = []
    for rows, m in ((logp[:n], mask[:n]), (logp[n:], mask[n:])):
        position = m.long().cumsum(-1)
        head = (rows * (position <= shared[:, None])).sum(-1)
        expected.append(head + 0.3 * (rows * (position > shared[:, None])).sum(-1))
    torch.testing.assert_close(scores.loss_input.double(), torch.cat(expected), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    assert mask[:n].sum(-1).ne(mask[n:].sum(-1)).any()  # LD-DPO changes something here


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss", "dpo,foo"], "--loss dpo,foo: unknown loss 'foo'"),
        (["--loss", "dpo,sft", "--loss-weights", "1"], "has 1 weights for 2 losses"),
        (["--loss", "dpo,sigmoid"], "lists a loss twice"),
        (["--loss", "simpo,sft"], "cannot be combined"),
        (["--ld-alpha", "2"], "--ld-alpha 2.0: must be in [0, 1]"),
        (["--use-weighting", "--loss", "aot"], "--use-weighting True: is not supported"),
        (["--discopop-tau", "-1", "--loss", "discopop"], "--discopop-tau -1.0: must be"),
        (["--f-divergence-type", "js_divergence", "--loss", "apo_zero"],
         "--f-divergence-type js_divergence: 'js_divergence' applies to"),
    ],
)  # fmt: skip
def test_bad_loss_options_name_their_flag(flags, message):
    with pytest.raises(train.TrainError) as caught:
        train.load_config(flags)
    assert message in caught.value.message
