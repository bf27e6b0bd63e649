"""Safe run folders: checksummed checkpoints, one run per folder (the lock), atomic writes and temp cleanup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_mlp

from popvec import Population, cli, optim
from popvec import checkpoint as ckpt
from popvec.checkpoint import CheckpointError, checksum_path, load_checkpoint, save_checkpoint
from popvec.cli import common, flags
from popvec.cli.train import TrainConfig
from popvec.models import build_model
from popvec.runlock import LOCK_NAME, RunLocked, clean_temp_files, lock_run_folder, read_lock
from popvec.trainer import CHECKPOINT_NAME, PopulationTrainer

ROOT = Path(__file__).resolve().parents[1]
TWO_ROUNDS = ["--num-models", "4", "--num-elim-steps", "5", "--batch-size", "64", "--model", "mlp", "--no-progress", "--device", "cpu"]
TWO_ROUNDS += ["--epochs", "1"]
STATE = {"w": torch.arange(6.0).reshape(2, 3), "step": 3, "names": ["a", "b"]}


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- checksums
def test_a_checkpoint_has_a_sha256sum_sidecar_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, STATE)
    digest, name = checksum_path(path).read_text().split()
    assert name == "c.pt" and len(digest) == 64
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], STATE["w"]) and loaded["step"] == 3
    assert torch.load(path, weights_only=True)["step"] == 3  # still a plain torch file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.sha256"]  # no temp files left


def test_one_flipped_bit_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, STATE)
    flip_byte(path)
    with pytest.raises(
        CheckpointError, match=r"checkpoint .*c\.pt is corrupted: sha256 mismatch \(expected [0-9a-f]{64}, got [0-9a-f]{64}\)"
    ):
        load_checkpoint(path)


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "random": lambda p: p.write_bytes(os.urandom(4096)),
    "json": lambda p: p.write_text(json.dumps({"not": "a checkpoint"})),
    "not a dict": lambda p: torch.save([1, 2, 3], p),
}


@pytest.mark.parametrize("sidecar", [True, False], ids=["with_sha256", "without_sha256"])
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_unreadable_checkpoints_are_one_line_naming_the_file(kind: str, sidecar: bool, tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, STATE)
    CORRUPTIONS[kind](path)
    if not sidecar:
        checksum_path(path).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    message = str(exc.value)
    assert "\n" not in message and f"checkpoint {path} " in message
    if kind == "empty":
        assert "empty" in message
    elif sidecar:
        assert "sha256 mismatch" in message
    else:
        assert "unreadable" in message or "not a popvec checkpoint" in message


def test_a_plain_torch_file_without_sha256_is_read(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(STATE, path)
    assert load_checkpoint(path)["names"] == ["a", "b"]


def test_a_broken_sidecar_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, STATE)
    checksum_path(path).write_text("garbage\n")
    with pytest.raises(CheckpointError, match="c.pt is corrupted: its checksum file .* holds no sha256"):
        load_checkpoint(path)


@pytest.mark.parametrize("crash_at", [2, 3], ids=["before_the_file", "before_the_final_sidecar"])
def test_a_crash_between_the_writes_never_blocks_the_resume(crash_at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, STATE)
    calls: list[Path] = []
    original = ckpt.atomic_write_bytes

    def crash_on_write(target: Any, data: bytes) -> None:
        calls.append(Path(target))
        if len(calls) == crash_at:  # writes: 1 the sidecar with both hashes, 2 the file, 3 the sidecar
            raise KeyboardInterrupt  # the process dies here
        original(target, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", crash_on_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {**STATE, "step": 4})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == (3 if crash_at == 2 else 4)
    save_checkpoint(path, {**STATE, "step": 5})  # and the next save settles to one hash again
    assert len(checksum_path(path).read_text().splitlines()) == 1 and load_checkpoint(path)["step"] == 5


def test_a_foreign_file_is_not_a_trainer_checkpoint(tmp_path: Path) -> None:
    pop = Population.from_factory(tiny_mlp, 2, seed=0)
    trainer = PopulationTrainer(pop, optim.SGD(pop, lr=0.1), progress=False)
    path = tmp_path / "foreign.pt"
    save_checkpoint(path, {"weights": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"checkpoint .*foreign\.pt is not a checkpoint of this popvec run"):
        trainer.load_checkpoint(path)


def test_a_trainer_refuses_the_checkpoint_of_a_population_that_started_with_another_size(tmp_path: Path) -> None:
    def trainer(n: int) -> PopulationTrainer:
        pop = Population.from_factory(tiny_mlp, n, seed=0)
        return PopulationTrainer(pop, optim.SGD(pop, lr=0.1), progress=False)

    path = tmp_path / "c.pt"
    trainer(2).save_checkpoint(path)
    with pytest.raises(
        CheckpointError, match=r"c\.pt is not a checkpoint of this popvec run \(it started with 2 members, this run with 3\)"
    ):
        trainer(3).load_checkpoint(path)
    trainer(2).load_checkpoint(path)  # the same size loads


# --------------------------------------------------------------------------- the CLI: --resume and lmc
@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train run stopped (Ctrl-C) right after its first checkpoint; each test copies it."""
    out = tmp_path_factory.mktemp("runs") / "interrupted"
    original = PopulationTrainer.save_checkpoint

    def save_then_interrupt(self: PopulationTrainer, path: Any) -> None:
        original(self, path)
        if len(self.history["rounds"]) == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(PopulationTrainer, "save_checkpoint", save_then_interrupt)
        assert cli.main(["train", *TWO_ROUNDS, "--out", str(out)]) == 130
    assert (out / CHECKPOINT_NAME).is_file() and checksum_path(out / CHECKPOINT_NAME).is_file()
    assert not (out / LOCK_NAME).exists()  # released on Ctrl-C
    return out


@pytest.fixture()
def run_dir(interrupted_run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(interrupted_run, folder)
    return folder


CLI_CORRUPTIONS = {"flipped byte": flip_byte, **{k: v for k, v in CORRUPTIONS.items() if k != "not a dict"}}


@pytest.mark.parametrize("kind", sorted(CLI_CORRUPTIONS))
def test_resume_from_a_damaged_checkpoint_is_one_line_exit_2(kind: str, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run_dir / CHECKPOINT_NAME
    CLI_CORRUPTIONS[kind](path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--resume", str(run_dir), "--no-progress"])
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert line.startswith("popvec train: error: checkpoint ") and str(path) in line
    assert ("sha256 mismatch" in line) == (kind != "empty")
    assert not (run_dir / "winner.pt").exists() and not (run_dir / LOCK_NAME).exists()


def test_resume_from_a_foreign_checkpoint_is_one_line_exit_2(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run_dir / CHECKPOINT_NAME
    path.write_text(json.dumps({"history": []}))  # a JSON file renamed .pt, and no checksum to go by
    checksum_path(path).unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--resume", str(run_dir), "--no-progress"])
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert f"checkpoint {path} is unreadable" in line


def test_resume_from_the_checkpoint_of_a_run_of_another_size_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"  # a genuine checkpoint, valid sha256, of a run that started with 3 members, not 4
    assert cli.main(["train", *TWO_ROUNDS[:1], "3", *TWO_ROUNDS[2:], "--out", str(other)]) == 0
    for name in (CHECKPOINT_NAME, CHECKPOINT_NAME + ".sha256"):
        shutil.copyfile(other / name, run_dir / name)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--resume", str(run_dir), "--no-progress"])
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert f"checkpoint {run_dir / CHECKPOINT_NAME} is not a checkpoint of this popvec run" in line and "3 members" in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_resume_after_a_clean_interrupt_still_works_and_cleans_temp_files(run_dir: Path) -> None:
    leftovers = [run_dir / ".checkpoint.pt.k3j4h5.tmp", run_dir / ".history.json.abc.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert not any(p.exists() for p in leftovers)
    assert load_checkpoint(run_dir / "winner.pt") and not (run_dir / LOCK_NAME).exists()
    assert not list(run_dir.glob(".*.tmp"))


def test_lmc_reads_checked_and_plain_state_dicts_and_refuses_damaged_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    winner, plain = tmp_path / "winner.pt", tmp_path / "plain.pt"
    torch.manual_seed(0)
    save_checkpoint(winner, build_model("mlp", (1, 8, 8), 10).state_dict())  # as popvec writes a winner.pt
    torch.save(build_model("mlp", (1, 8, 8), 10).state_dict(), plain)  # a user's file: no checksum
    lmc = ["lmc", "--model", "mlp", "--device", "cpu", "--alphas", "3", "--no-plots"]
    assert cli.main([*lmc, str(winner), str(plain), "--out", str(tmp_path / "lmc-ok")]) == 0
    flip_byte(winner)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main([*lmc, str(winner), str(plain), "--out", str(tmp_path / "lmc-bad")])
    assert exc.value.code == 2
    assert f"checkpoint {winner} is corrupted: sha256 mismatch" in one_error_line(capsys)
    plain.write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        cli.main([*lmc, str(plain), str(plain), "--out", str(tmp_path / "lmc-empty")])
    assert exc.value.code == 2
    assert f"checkpoint {plain} is empty" in one_error_line(capsys)


# --------------------------------------------------------------------------- the lock
def write_lock(folder: Path, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "command": "popvec train", "started": "2026-01-01 00:00:00"}
    (folder / LOCK_NAME).write_text(json.dumps(record))


def train_config(folder: Path) -> TrainConfig:
    return TrainConfig(out=str(folder), device="cpu", no_progress=True)


def test_the_lock_is_held_for_the_run_and_released_on_errors_and_ctrl_c(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with common.run_folder(train_config(folder)) as out:
        record = read_lock(out)
        assert record is not None and record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == "popvec train" and record["started"]
    assert not (folder / LOCK_NAME).exists()
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)), common.run_folder(train_config(folder), resume=True):
            assert (folder / LOCK_NAME).exists()
            raise error
        assert not (folder / LOCK_NAME).exists()


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "run"
    write_lock(folder, os.getpid())  # a live run: this process
    for argv in (["train", "--out", str(folder), "--device", "cpu"], ["train", "--resume", str(folder)]):
        if "--resume" in argv:
            flags.to_json(train_config(folder), folder / "config.json")
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        line = one_error_line(capsys)
        assert f"{folder} is in use by another run: pid {os.getpid()} on host {socket.gethostname()}, started 2026-01-01" in line
        assert f"rm {folder / LOCK_NAME}" in line
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()  # left to its owner


def test_a_lock_from_another_host_is_never_broken(tmp_path: Path) -> None:
    write_lock(tmp_path, dead_pid(), host="some-other-host")
    with pytest.raises(RunLocked, match="pid .* on host some-other-host.*rm "), lock_run_folder(tmp_path):
        pass


def test_a_stale_lock_of_a_dead_pid_is_taken_over_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    pid = dead_pid()
    write_lock(folder, pid)
    said: list[str] = []
    with lock_run_folder(folder, "popvec train", say=said.append):
        assert read_lock(folder)["pid"] == os.getpid()  # type: ignore[index]
    assert len(said) == 1 and "stale lock" in said[0] and f"pid {pid}" in said[0]
    assert not (folder / LOCK_NAME).exists() and not list(folder.iterdir())


def test_two_overlapping_new_runs_one_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with common.run_folder(train_config(folder)):
        with pytest.raises(common.UsageError, match="in use by another run"), common.run_folder(train_config(folder)):
            pass
        assert (folder / "config.json").is_file()
    assert not (folder / LOCK_NAME).exists()


def test_temp_files_of_killed_writes_are_removed_when_a_run_starts(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    (folder / "trial").mkdir(parents=True)
    stale = [folder / ".checkpoint.pt.x1y2.tmp", folder / ".winner.pt.sha256.q.tmp", folder / "trial" / ".history.json.z.tmp"]
    kept = [folder / "notes.tmp", folder / "history.json"]
    for path in stale + kept:
        path.write_text("x")
    assert sorted(clean_temp_files(folder)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    stale[0].write_text("x")
    with common.run_folder(train_config(folder)):
        assert not stale[0].exists()


# --------------------------------------------------------------------------- kill -9
@pytest.mark.slow
def test_kill_9_then_resume_takes_over_the_lock_and_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    argv = [*TWO_ROUNDS[:-1], "5"]  # --epochs 5: time to kill it after its first checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "popvec.cli", "train", *argv, "--out", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not checksum_path(out / CHECKPOINT_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_lock(out)["pid"] == proc.pid  # type: ignore[index]  # left behind by the killed run
    result = subprocess.run([sys.executable, "-m", "popvec.cli", "train", "--resume", str(out), "--no-progress"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Taking over the stale lock" in result.stderr and f"pid {proc.pid}" in result.stderr
    assert load_checkpoint(out / "winner.pt") and not (out / LOCK_NAME).exists()
    assert not list(out.rglob(".*.tmp"))
