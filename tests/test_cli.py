"""The ``popvec train`` command and the example script: smoke runs, flag errors, --resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from popvec import cli
from popvec.data import load_dataset
from popvec.models import build_model
from popvec.trainer import CHECKPOINT_NAME, PopulationTrainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-models", "3", "--num-elim-steps", "5", "--epochs", "1", "--batch-size", "64", "--model", "mlp", "--no-progress"]
# 4 members, rounds at steps 5 (4 -> 2) and 10 (2 -> 1), then the winner trains to step 19.
TWO_ROUNDS = ["--num-models", "4", "--num-elim-steps", "5", "--epochs", "1", "--batch-size", "64", "--model", "mlp", "--no-progress", "--device", "cpu"]


def run_python(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def load_winner(path: Path) -> torch.nn.Module:
    model = build_model("mlp", (1, 8, 8), 10)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return model


# --------------------------------------------------------------------------- smoke
def test_cli_train_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_python(["-m", "popvec.cli", "train", *TINY, "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "Eliminated poor performers. Remaining models:" in text
    assert "Training complete! Best validation loss:" in text
    assert "test accuracy" in text

    for name in ("history.json", "leaderboard.json", "summary.json", "config.json", CHECKPOINT_NAME, "winner.pt"):
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert [len(r["members"]) for r in history["rounds"]] == [3]
    assert history["rounds"][0]["step"] == 5
    assert history["cost"]["member_steps"] == 3 * 5 + 1 * 14
    leaderboard = json.loads((out / "leaderboard.json").read_text())
    assert [row["rank"] for row in leaderboard] == [1, 2, 3]
    assert sorted(row["id"] for row in leaderboard) == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["winner_id"] == leaderboard[0]["id"] == history["rounds"][0]["kept_ids"][0]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["num_models"] == 3 and config["model"] == "mlp"
    torch.load(out / CHECKPOINT_NAME, weights_only=True)
    # the saved winner, evaluated alone with plain PyTorch, has the reported losses and accuracy
    winner = load_winner(out / "winner.pt").eval()
    data = load_dataset("digits")
    with torch.no_grad():
        val_loss = float(F.cross_entropy(winner(data.val.x), data.val.y))
        test_out = winner(data.test.x)
    assert summary["best_val_loss"] == pytest.approx(val_loss, rel=1e-5)
    assert summary["test_loss"] == pytest.approx(float(F.cross_entropy(test_out, data.test.y)), rel=1e-5)
    assert summary["test_accuracy"] == pytest.approx(float((test_out.argmax(-1) == data.test.y).float().mean()), abs=1e-6)


def test_example_script_runs(tmp_path: Path) -> None:
    proc = run_python(
        [str(ROOT / "examples" / "train_mnist.py"), "--num-models", "2", "--num-elim-steps", "5", "--epochs", "1", "--model", "mlp", "--no-progress"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Training complete! Best validation loss:" in proc.stdout
    assert "Winner test accuracy:" in proc.stdout


# --------------------------------------------------------------------------- bad flags
def test_bad_flag_subprocess_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_python(["-m", "popvec.cli", "train", "--reduce-factor", "1.5", "--out", str(tmp_path / "r")], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--reduce-factor" in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--reduce-factor", "1.5"], "--reduce-factor"),
        (["--reduce-factor", "0"], "--reduce-factor"),
        (["--num-models", "0"], "--num-models"),
        (["--num-models", "two"], "--num-models"),
        (["--num-elim-steps", "-1"], "--num-elim-steps"),
        (["--epochs", "0"], "--epochs"),
        (["--lr", "0"], "--lr"),
        (["--dataset", "nope"], "--dataset"),
        (["--model", "nope"], "--model"),
        (["--bogus"], "--bogus"),
        (["--resume", "/nonexistent/popvec-run"], "--resume"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *argv, "--out", str(out)])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert flag in lines[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--device", "cuda", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--device" in lines[0]


def test_no_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_out_folder_with_a_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *TWO_ROUNDS, "--out", str(out)])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and "--resume" in lines[0]


# --------------------------------------------------------------------------- resume
def interrupt_after_first_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate Ctrl-C right after the checkpoint of round 1 is written."""
    original = PopulationTrainer.save_checkpoint

    def save_then_interrupt(self: PopulationTrainer, path: Any) -> None:
        original(self, path)
        if len(self.history["rounds"]) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(PopulationTrainer, "save_checkpoint", save_then_interrupt)


def without_wall_time(history: dict[str, Any]) -> dict[str, Any]:
    return {**history, "cost": {k: v for k, v in history["cost"].items() if k != "wall_time_s"}}


@pytest.mark.parametrize("extra", [[], ["--per-member-data"]], ids=["shared", "per_member"])
def test_resume_interrupted_run_equals_uninterrupted(
    extra: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    assert cli.main(["train", *TWO_ROUNDS, *extra, "--out", str(full)]) == 0

    with monkeypatch.context() as m:
        interrupt_after_first_checkpoint(m)
        assert cli.main(["train", *TWO_ROUNDS, *extra, "--out", str(interrupted)]) == 130
    text = capsys.readouterr().out
    assert f"--resume {interrupted}" in text.replace("\n", "")
    assert not (interrupted / "winner.pt").exists()
    state = torch.load(interrupted / CHECKPOINT_NAME, weights_only=True)
    assert state["counters"]["global_step"] == 5 and len(state["history"]["rounds"]) == 1

    assert cli.main(["train", "--resume", str(interrupted), "--no-progress"]) == 0

    a, b = load_winner(full / "winner.pt").state_dict(), load_winner(interrupted / "winner.pt").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((full / "history.json").read_text())
    hb = json.loads((interrupted / "history.json").read_text())
    assert len(ha["rounds"]) == 2
    assert without_wall_time(ha) == without_wall_time(hb)
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((interrupted / "summary.json").read_text())
    assert sa["winner_id"] == sb["winner_id"] and sa["test_accuracy"] == sb["test_accuracy"]
    assert json.loads((full / "leaderboard.json").read_text()) == json.loads((interrupted / "leaderboard.json").read_text())
