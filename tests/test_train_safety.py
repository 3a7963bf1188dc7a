"""decpo.train against a hostile or careless user: checkpoints that never execute
anything and survive damage, run directories that belong to one run, flags checked
before anything is written, non-finite steps never saved, one-line errors."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decpo import checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-steps", "3", "--eval-every", "100", "--save-every", "3", "--demo-pairs", "120",
        "--batch-size", "4"]  # fmt: skip


# ---------------------------------------------------------------- helpers


class _Planted:
    """A pickle that, when unpickled, creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _small(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _save_steps(out: Path, steps: list[int]) -> tuple[torch.nn.Module, dict[int, torch.Tensor]]:
    model, opt, sched = _small()
    weights = {}
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(float(step))
        checkpoint.save_checkpoint(out, step, model, opt, sched, keep=10)
        weights[step] = model.weight.detach().clone()
    return model, weights


def _resume_step(out: Path) -> tuple[int, torch.nn.Module]:
    model, opt, sched = _small(seed=1)
    return checkpoint.load_checkpoint(out, model, opt, sched), model


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([sys.executable, "-m", "decpo.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 3-step demo run with a checkpoint at step 3 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main([*FAST, "--output-dir", str(out)])
    return out


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_hold_safetensors_and_json_only(tmp_path):
    _save_steps(tmp_path, [1])
    step = tmp_path / "checkpoints" / "step-0000001"
    assert sorted(p.name for p in step.iterdir()) == ["state.json", "tensors.safetensors"]
    json.loads((step / "state.json").read_text())  # plain data
    assert _resume_step(tmp_path)[0] == 1


def test_a_planted_pickle_never_executes(tmp_path, capsys):
    """A pickle planted as the old state.pt, and one planted as the tensor file of the
    newest checkpoint: neither runs; the intact older checkpoint is used."""
    _save_steps(tmp_path, [1, 2])
    marker = tmp_path / "executed"
    root = tmp_path / "checkpoints"
    for where in (root / "step-0000001" / "state.pt", root / "step-0000002" / "state.pt"):
        where.write_bytes(pickle.dumps(_Planted(marker)))
    (root / "step-0000002" / "tensors.safetensors").write_bytes(pickle.dumps(_Planted(marker)))
    step, _ = _resume_step(tmp_path)
    assert not marker.exists()
    assert step == 1
    assert "step-0000002" in capsys.readouterr().err


def test_latest_never_leaves_the_run(tmp_path, capsys):
    """`latest` naming a path outside the run (with a valid checkpoint there) is
    ignored with a warning; the run's own newest checkpoint is used."""
    elsewhere = tmp_path / "elsewhere"
    _save_steps(elsewhere, [9])
    run = tmp_path / "a" / "run"
    _save_steps(run, [1])
    (run / "checkpoints" / "latest").write_text("../../../elsewhere/checkpoints/step-0000009")
    step, model = _resume_step(run)
    assert step == 1 and float(model.weight[0, 0].detach()) == 1.0
    assert "latest" in capsys.readouterr().err


def test_symbolic_links_out_of_the_run_are_never_followed(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    _save_steps(elsewhere, [5, 9])
    run = tmp_path / "run"
    _save_steps(run, [1, 2])
    root, other = run / "checkpoints", elsewhere / "checkpoints"
    (root / "step-0000009").symlink_to(other / "step-0000009")
    (root / "latest").write_text("step-0000009")
    for name in ("state.json", "tensors.safetensors"):
        (root / "step-0000002" / name).unlink()
        (root / "step-0000002" / name).symlink_to(other / "step-0000005" / name)
    step, model = _resume_step(run)
    assert step == 1 and float(model.weight[0, 0].detach()) == 1.0
    err = capsys.readouterr().err
    assert "latest" in err and "symbolic link" in err


@pytest.mark.parametrize("damage", ["dangling", "garbage", "truncated", "no-state"])
def test_a_damaged_latest_falls_back_to_the_newest_intact_step(tmp_path, capsys, damage):
    _save_steps(tmp_path, [1, 2])
    root = tmp_path / "checkpoints"
    if damage == "dangling":
        shutil.rmtree(root / "step-0000002")
    elif damage == "garbage":
        (root / "latest").write_bytes(b"\xff\x00step")
        tensors = root / "step-0000002" / "tensors.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "truncated":
        tensors = root / "step-0000002" / "tensors.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:-10])
    else:
        (root / "step-0000002" / "state.json").unlink()
    step, model = _resume_step(tmp_path)
    assert step == 1 and float(model.weight[0, 0].detach()) == 1.0
    err = capsys.readouterr().err
    assert "decpo.train: warning:" in err and "resuming from step-0000001" in err
    assert ("step-0000002" in err) or ("latest" in err)


def test_a_checkpoint_of_another_configuration_is_not_used(tmp_path):
    model, opt, sched = _small()
    checkpoint.save_checkpoint(tmp_path, 5, model, opt, sched, run_identity={"lr": 1.0})
    ckpt, skipped = checkpoint.find_checkpoint(tmp_path, model, opt, {"lr": 2.0})
    assert ckpt is None and "another configuration" in skipped[0]
    assert checkpoint.find_checkpoint(tmp_path, model, opt, {"lr": 1.0})[0].step == 5


def test_resaving_a_step_never_deletes_it_before_the_new_one_is_in_place(tmp_path, monkeypatch):
    """A crash while a step is saved again (the old copy moved aside, the new one not
    yet renamed into place) still resumes from that step."""
    _save_steps(tmp_path, [1, 2])
    model, opt, sched = _small()
    with torch.no_grad():
        model.weight.fill_(2.0)
    real = os.replace
    calls = {"n": 0}

    def crash_on_second(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # the new directory's rename into place
            raise OSError(errno.EIO, "power cut")
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path, 2, model, opt, sched, keep=10)
    monkeypatch.undo()
    step, restored = _resume_step(tmp_path)
    assert step == 2 and float(restored.weight[0, 0].detach()) == 2.0


def test_a_full_disk_gives_a_clear_error_and_leaves_no_tmp(tmp_path, monkeypatch):
    _save_steps(tmp_path, [1])
    model, opt, sched = _small()
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device"):
        checkpoint.save_checkpoint(tmp_path, 2, model, opt, sched)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]
    assert (root / "latest").read_text() == "step-0000001"


def test_non_finite_state_is_never_saved(tmp_path):
    model, opt, sched = _small()
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(checkpoint.NonFiniteError, match="bias"):
        checkpoint.save_checkpoint(tmp_path, 1, model, opt, sched)
    model, opt, sched = _small()
    opt.state[model.weight]["exp_avg"][0, 0] = float("inf")
    with pytest.raises(checkpoint.NonFiniteError, match="exp_avg"):
        checkpoint.save_checkpoint(tmp_path, 1, model, opt, sched)
    assert not list((tmp_path / "checkpoints").glob("step-*"))


@pytest.mark.parametrize(("poisoned", "last_good"), [(1, None), (3, "step-0000002")])
def test_a_non_finite_step_is_never_saved_and_the_last_good_one_is_named(
    tmp_path, monkeypatch, capsys, poisoned, last_good
):
    """Gradients turned NaN at step `poisoned` (as --lr inf did): the run stops at that
    step without saving it and names the last good checkpoint, or says there is none."""
    out = tmp_path / "run"
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def poison(params, max_norm, *args, **kwargs):
        calls["n"] += 1
        params = list(params)
        if calls["n"] == poisoned:
            for p in params:
                p.grad.fill_(float("nan"))
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poison)
    with pytest.raises(SystemExit) as info:
        train.main([*FAST, "--max-steps", "4", "--save-every", "1", "--output-dir", str(out)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite values in" in err and f"after step {poisoned}" in err
    root = out / "checkpoints"
    assert not (root / f"step-{poisoned:07d}").exists()
    if last_good is None:
        assert "no checkpoint has been saved yet" in err.lower()
        assert not list(root.glob("step-*"))
        return
    assert f"last good checkpoint is {root / last_good}" in err
    assert (root / "latest").read_text() == last_good
    from safetensors.torch import load_file

    saved = load_file(str(root / last_good / "tensors.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())


# ---------------------------------------------------------------- flags and run directories


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-grad-norm", "-1"], "--max-grad-norm"),
        (["--max-grad-norm", "nan"], "--max-grad-norm"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "-1e-3"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--beta", "nan"], "--beta"),
        (["--beta", "-0.1"], "--beta"),
        (["--warmup-ratio", "-0.1"], "--warmup-ratio"),
        (["--warmup-ratio", "nan"], "--warmup-ratio"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--dec-weight", "-1"], "--dec-weight"),
        (["--dec-weight", "nan"], "--dec-weight"),
        (["--label-smoothing", "0.5"], "--label-smoothing"),
        (["--eval-fraction", "1"], "--eval-fraction"),
        (["--dec-layers", "1,x"], "--dec-layers"),
        (["--output-dir", ""], "--output-dir"),
        (["--device", "tpu"], "--device"),
        (["--model", "/nonexistent/model"], "--model"),
        (["--data", "/nonexistent.jsonl"], "--data"),
    ],
)
def test_bad_numbers_and_names_are_refused(flags, message):
    with pytest.raises(train.TrainError, match=message) as info:
        train.load_config(flags)
    assert info.value.code == 2


@pytest.mark.parametrize(
    "flags", [["--dec-layers", "99"], ["--dec-module", "nope"], ["--lora-targets", "nope"]]
)
def test_a_flag_typo_writes_nothing(tmp_path, finished_run, flags, capsys):
    """Flags checked against the model fail before anything is written: into a new
    directory (not even created) or an existing run (not a byte changed)."""
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit):
        train.main([*FAST, *flags, "--output-dir", str(fresh)])
    assert flags[0] in capsys.readouterr().err
    assert not fresh.exists()
    before = _snapshot(finished_run)
    with pytest.raises(SystemExit):
        train.main([*FAST, *flags, "--output-dir", str(finished_run)])
    with pytest.raises(SystemExit):
        train.main(["--resume", str(finished_run), *flags])
    assert _snapshot(finished_run) == before


def test_resume_keeps_the_saved_max_steps(tmp_path):
    cfg = train.Config(max_steps=7, output_dir=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    assert train.load_config(["--resume", str(tmp_path)]).max_steps == 7
    assert train.load_config(["--resume", str(tmp_path), "--max-steps", "9"]).max_steps == 9
    with pytest.raises(train.TrainError, match="--lr"):
        train.load_config(["--resume", str(tmp_path), "--lr", "0.5"])


def test_output_dir_ownership(tmp_path, monkeypatch):
    def claim(**kw):
        return train.claim_output_dir(dataclasses.replace(train.Config(), **kw))

    monkeypatch.chdir(tmp_path)
    with pytest.raises(train.TrainError, match="current directory"):
        claim(output_dir=".")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(train.TrainError, match="--model directory"):
        claim(output_dir=str(model), model=str(model))
    assert claim(output_dir=str(tmp_path / "new")) == "new"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # not a decpo.train run: never overwritten
        with pytest.raises(train.TrainError, match=r"holds no decpo\.train run"):
            claim(output_dir=str(other), overwrite=overwrite)
    run = tmp_path / "run"
    run.mkdir()
    saved = train.Config(output_dir=str(run), schedule_steps=150)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    assert claim(output_dir=str(run)) == "continue"  # the same run
    assert claim(output_dir=str(run), max_steps=300) == "continue"
    with pytest.raises(train.TrainError, match=r"--lr.*--resume.*--overwrite"):
        claim(output_dir=str(run), lr=0.5)
    assert claim(output_dir=str(run), lr=0.5, overwrite=True) == "overwrite"


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    (tmp_path / "checkpoints" / "step-0000001").mkdir(parents=True)
    for name in ("metrics.jsonl", "config.json", "eval_before.json", "keep.txt"):
        (tmp_path / name).write_text("x")
    train.clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_second_concurrent_run_is_refused(tmp_path):
    first = train.lock_output_dir(tmp_path)
    try:
        with pytest.raises(train.TrainError, match=r"in use by another decpo\.train run"):
            train.lock_output_dir(tmp_path)
    finally:
        first.close()
    train.lock_output_dir(tmp_path).close()  # released with its holder


def test_a_different_run_in_an_old_runs_directory_is_refused(finished_run):
    """The old run's checkpoint can never be picked up by a new run (logged steps
    1, 2, 5, 6): a run with another configuration is refused up front."""
    before = _snapshot(finished_run)
    with pytest.raises(train.TrainError, match="another configuration"):
        train.main([*FAST, "--lr", "0.01", "--output-dir", str(finished_run)])
    assert _snapshot(finished_run) == before


def test_user_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n')
    bad_data = ["--data", str(bad), "--output-dir", str(tmp_path / "o")]
    for args in (["--max-grad-norm", "-1"], bad_data, ["--loss", "kto"]):
        result = _run(args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("decpo.train: error: "), result.stderr
    assert f"{bad}:2: not valid UTF-8" in _run(bad_data).stderr


def test_resume_survives_a_damaged_latest_and_a_truncated_metrics_line(
    tmp_path, finished_run, capsys
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / ".decpo.lock").unlink(missing_ok=True)
    # a kill -9 mid-write: a torn last metrics line, a torn latest pointer
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.6')
    (run / "checkpoints" / "latest").write_text("step-00")
    summary = train.main(["--resume", str(run), "--max-steps", "4"])
    assert summary["steps"] == 4
    err = capsys.readouterr().err
    assert "latest" in err and "resuming from step-0000003" in err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_a_run_whose_checkpoints_are_all_unusable_is_left_untouched(tmp_path, finished_run):
    """Restarting from step 0 would discard the run's metrics: refused, nothing changed."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for step in (run / "checkpoints").glob("step-*"):
        (step / "tensors.safetensors").write_bytes(b"damaged")
    before = _snapshot(run)
    with pytest.raises(train.TrainError, match=r"no usable checkpoint.*step-0000003"):
        train.main(["--resume", str(run)])
    assert _snapshot(run) == before


# ---------------------------------------------------------------- sharded (--fsdp) checkpoints


@pytest.fixture
def one_rank_group():
    """A one-process gloo group, as decpo.train --fsdp makes without torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_small(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _save_sharded_steps(out: Path, steps: list[int]) -> None:
    model, opt, sched = _sharded_small()
    for step in steps:
        with torch.no_grad():
            model[0].weight.fill_(float(step))
        checkpoint.save_sharded_checkpoint(out, step, model, opt, sched, keep=10)


def _resume_sharded(out: Path) -> tuple[int, float]:
    model, opt, sched = _sharded_small(seed=1)
    step = checkpoint.load_checkpoint(out, model, opt, sched)
    return step, float(model[0].weight.detach().full_tensor()[0, 0])


def test_sharded_checkpoints_hold_dcp_files_and_json(tmp_path, one_rank_group):
    _save_sharded_steps(tmp_path, [1])
    step = tmp_path / "checkpoints" / "step-0000001"
    assert sorted(p.name for p in step.iterdir()) == [".metadata", "__0_0.distcp", "state.json"]
    state = json.loads((step / "state.json").read_text())
    assert state["format"] == checkpoint.SHARDED_FORMAT and set(state["files"]) == {
        ".metadata", "__0_0.distcp"
    }  # fmt: skip
    assert _resume_sharded(tmp_path) == (1, 1.0)


@pytest.mark.parametrize("checksum", ["stale", "rewritten"])
def test_a_pickle_planted_as_dcp_metadata_never_executes(tmp_path, one_rank_group, capsys,
                                                          checksum):  # fmt: skip
    """DCP's metadata is a pickle: a planted one is refused by its checksum, and when
    state.json was rewritten to match it, by the restricted unpickler; it never runs
    and the intact older checkpoint is used."""
    _save_sharded_steps(tmp_path, [1, 2])
    marker = tmp_path / "executed"
    step2 = tmp_path / "checkpoints" / "step-0000002"
    planted = pickle.dumps(_Planted(marker))
    (step2 / ".metadata").write_bytes(planted)
    if checksum == "rewritten":
        state = json.loads((step2 / "state.json").read_text())
        digest = hashlib.sha256(planted).hexdigest()
        state["files"][".metadata"] = {"bytes": len(planted), "sha256": digest}
        (step2 / "state.json").write_text(json.dumps(state))
    assert _resume_sharded(tmp_path) == (1, 1.0)
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "step-0000002" in err
    why = ".metadata missing or truncated" if checksum == "stale" else "not allowed in DCP"
    assert why in err


def test_a_damaged_shard_falls_back_to_the_newest_intact_step(tmp_path, one_rank_group, capsys):
    _save_sharded_steps(tmp_path, [1, 2])
    shard = tmp_path / "checkpoints" / "step-0000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert _resume_sharded(tmp_path) == (1, 1.0)
    assert "resuming from step-0000001" in capsys.readouterr().err


def test_a_failed_sharded_write_leaves_the_last_checkpoint(tmp_path, one_rank_group, monkeypatch):
    import torch.distributed.checkpoint as dcp

    _save_sharded_steps(tmp_path, [1])
    model, opt, sched = _sharded_small()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device"):
        checkpoint.save_sharded_checkpoint(tmp_path, 2, model, opt, sched)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    with pytest.raises(checkpoint.NonFiniteError, match="bias"):
        checkpoint.save_sharded_checkpoint(tmp_path, 3, model, opt, sched)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]
    assert (root / "latest").read_text() == "step-0000001"
