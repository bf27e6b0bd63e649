"""The ``popvec`` command: ``train`` and the example script (smoke runs, flag errors, --resume), and every
command's config (flags from its config class, config.json round trips, --out and --resume rules)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from popvec import cli
from popvec.cli import common, flags
from popvec.cli import hyperband as hyperband_cli
from popvec.cli import instability as instability_cli
from popvec.cli import pbt as pbt_cli
from popvec.cli import warmstart as warmstart_cli
from popvec.cli.main import COMMANDS
from popvec.cli.train import TrainConfig
from popvec.data import load_dataset
from popvec.models import build_model
from popvec.trainer import CHECKPOINT_NAME, PopulationTrainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-models", "3", "--num-elim-steps", "5", "--epochs", "1", "--batch-size", "64", "--model", "mlp", "--no-progress"]
# 4 members, rounds at steps 5 (4 -> 2) and 10 (2 -> 1), then the winner trains to step 19.
TWO_ROUNDS = [
    "--num-models",
    "4",
    "--num-elim-steps",
    "5",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--model",
    "mlp",
    "--no-progress",
    "--device",
    "cpu",
]


def run_python(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def load_winner(path: Path) -> torch.nn.Module:
    model = build_model("mlp", (1, 8, 8), 10)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return model


# --------------------------------------------------------------------------- smoke
@pytest.mark.slow
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


@pytest.mark.slow
def test_example_script_runs(tmp_path: Path) -> None:
    proc = run_python(
        [
            str(ROOT / "examples" / "train_mnist.py"),
            "--num-models",
            "2",
            "--num-elim-steps",
            "5",
            "--epochs",
            "1",
            "--model",
            "mlp",
            "--no-progress",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Training complete! Best validation loss:" in proc.stdout
    assert "Winner test accuracy:" in proc.stdout


# --------------------------------------------------------------------------- bad flags
@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[], ["--per-member-data"], ["--augment"], ["--augment", "--per-member-data"]],
    ids=["shared", "per_member", "augment", "augment_per_member"],
)
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


# --------------------------------------------------------------------------- one config per command

CONFIGS = {
    module.__name__.rsplit(".", 1)[1]: next(
        v for k, v in vars(module).items() if k.endswith("Config") and isinstance(v, type) and v.__module__ == module.__name__
    )
    for module in COMMANDS
}
RESUMABLE = [name for name, cls in CONFIGS.items() if cls.RESUMABLE]
# A small run of every command that trains (CPU, no plots, no progress), as config fields.
SMALL = {
    "train": {"num_models": 2, "num_elim_steps": 5, "epochs": 1, "model": "mlp"},
    "instability": {"model": "mlp", "k1": (0, 5), "k2": 5, "alphas": 3},
    "hyperband": {"max_t": 3, "no_plots": True},
    "pbt": {"num_models": 2, "steps": 10, "perturbation_interval": 5, "no_plots": True},
    "warmstart": {"replicates": 1, "max_steps": 4, "check_every": 2, "chunks": 2, "sp": ((0.5, 0.1),), "no_plots": True},
}


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def saved_run(tmp_path: Path, name: str, **changes: Any) -> Path:
    """A run folder holding only the config.json of a small run (as if killed right after starting)."""
    folder = tmp_path / f"{name}-run"
    folder.mkdir()
    config = CONFIGS[name](**{"out": str(folder), "device": "cpu", "no_progress": True, **SMALL[name], **changes})
    flags.to_json(config, folder / "config.json")
    return folder


def test_every_command_has_a_config_a_register_and_a_runner() -> None:
    assert sorted(CONFIGS) == ["hyperband", "instability", "lmc", "pbt", "train", "warmstart"]
    for module in COMMANDS:
        assert list(inspect.signature(module.run).parameters) == ["config", "console", "resume"]
        source = inspect.getsource(module)
        assert "importlib" not in source and "popvec.cli.main" not in source and "from popvec.cli import resolve_device" not in source
    assert RESUMABLE == ["train", "instability", "hyperband", "pbt", "warmstart"]


def test_shared_defaults_in_one_place() -> None:
    models = {name: cls.__dataclass_fields__["model"].default for name, cls in CONFIGS.items()}
    assert models == {"train": "lenet5", "lmc": "lenet5", "instability": "lenet5", "hyperband": "mlp", "pbt": "mlp", "warmstart": "mlp"}
    assert {cls.__dataclass_fields__["seed"].default for name, cls in CONFIGS.items() if name != "lmc"} == {0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_help_lists_every_config_field(name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(CONFIGS[name]):
        spec = flags.spec_of(field)
        assert (spec.metavar if spec.positional else flags.option(field.name)) in text, field.name
    assert ("--resume RUN_DIR" in text) == CONFIGS[name].RESUMABLE
    assert "--population" not in text


ROUND_TRIP = {
    "train": ["--num-models", "3", "--seed", "5", "--optimizer", "sgd", "--member-chunk-size", "2", "--per-member-data"],
    "lmc": ["a.pt", "b.pt", "--alphas", "5", "--bn", "keep"],
    "instability": ["--k1", "50,0,10", "--lr", "0.1", "--optimizer", "adam"],
    "hyperband": ["--max-resource", "9", "--lr-range", "1e-3,1e-1", "--brackets", "2", "--rule", "asha"],
    "pbt": ["--population", "4", "--clip-range", "0.5,2", "--space", "space.toml"],
    "warmstart": ["--sp", "0.5,0.1", "--sp", "0.6,0.01", "--chunk-size", "100", "--no-cold"],
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_config_round_trips_through_config_json(name: str, tmp_path: Path) -> None:
    config = flags.from_args(CONFIGS[name], cli.build_parser().parse_args([name, *ROUND_TRIP[name]]))
    flags.to_json(config, tmp_path / "config.json")
    assert flags.from_json(CONFIGS[name], tmp_path / "config.json") == config
    assert list(json.loads((tmp_path / "config.json").read_text())) == list(flags.as_dict(config))
    hash(config)  # tuples, not lists: the config stays a value


def test_parsed_values_have_the_config_types() -> None:
    parse = cli.build_parser().parse_args
    assert flags.from_args(CONFIGS["instability"], parse(["instability", "--k1", "50,0,10"])).k1 == (0, 10, 50)
    ws = flags.from_args(CONFIGS["warmstart"], parse(["warmstart", "--sp", "0.5,0.1", "--sp", "0.6,0.01"]))
    assert ws.sp == ((0.5, 0.1), (0.6, 0.01))
    assert flags.from_args(CONFIGS["pbt"], parse(["pbt", "--population", "3"])).num_models == 3
    assert flags.from_args(CONFIGS["hyperband"], parse(["hyperband", "--max-resource", "9"])).max_t == 9


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"drop": "epochs"}, "missing key 'epochs'"),
        ({"num_models": 0}, "'num_models' must be an integer >= 1"),
        ({"reduce_factor": 1.5}, "'reduce_factor' must lie in (0, 1)"),
        ({"model": "nope"}, "'model' must be one of"),
        ({"compile": "yes"}, "'compile' must be true or false"),
        ({"member_chunk_size": None, "epochs": None}, "'epochs' must not be null"),
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "cannot read it"),
    ],
)
def test_from_json_refuses_bad_files_in_one_line(blob: Any, match: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    if isinstance(blob, str):
        path.write_text(blob)
    else:
        data = flags.as_dict(TrainConfig())
        data.pop(blob.pop("drop", None), None)
        path.write_text(json.dumps({**data, **blob}))
    with pytest.raises(flags.ConfigError) as exc:
        flags.from_json(TrainConfig, path)
    message = str(exc.value)
    assert match in message and str(path) in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["train", "--seed", "x"], "--seed"),
        (["train", "--momentum", "-1"], "--momentum"),
        (["lmc", "a.pt", "b.pt", "--alphas", "1"], "--alphas"),
        (["instability", "--lr", "0"], "--lr"),
        (["instability", "--optimizer", "rmsprop"], "--optimizer"),
        (["hyperband", "--batch-size", "0"], "--batch-size"),
        (["hyperband", "--batch-size", "5000", "--device", "cpu"], "--batch-size"),
        (["pbt", "--device", "nope"], "--device"),
        (["pbt", "--num-models", "x"], "--num-models"),
        (["warmstart", "--lr", "0"], "--lr"),
        (["warmstart", "--optimizer", "adamw"], "--optimizer"),
        # refused by the study once the run folder exists: the folder is removed again
        (["warmstart", "--chunk-size", "5000", "--device", "cpu", "--no-progress", "--max-steps", "1"], "--chunk-size"),
    ],
)
def test_bad_flags_of_every_command_exit_2_naming_the_flag(
    argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(out)])
    assert exc.value.code == 2
    assert flag in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_out_onto_an_existing_run_is_refused(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        cli.main([name, *(["a.pt", "b.pt"] if name == "lmc" else []), "--out", str(out)])
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert "--out" in line and str(out) in line
    assert ("--resume" in line) == CONFIGS[name].RESUMABLE
    assert [p.name for p in out.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    ("name", "argv", "flag"),
    [
        ("train", ["--epochs", "2"], "--epochs"),
        ("train", ["--no-progress", "--seed", "0"], "--seed"),
        ("instability", ["--k2", "7"], "--k2"),
        ("hyperband", ["--max-resource", "9"], "--max-t"),
        ("pbt", ["--population", "3"], "--num-models"),
        ("warmstart", ["--out", "elsewhere"], "--out"),
    ],
)
def test_resume_with_another_flag_is_refused_naming_it(
    name: str, argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = saved_run(tmp_path, name)
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--resume", str(run_dir), *argv])
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert line.startswith(f"popvec {name}: error: {flag}:") and "--resume" in line
    assert [p.name for p in run_dir.iterdir()] == ["config.json"]


def test_resume_refuses_a_config_of_another_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = saved_run(tmp_path, "train")
    with pytest.raises(SystemExit) as exc:
        cli.main(["pbt", "--resume", str(run_dir)])
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert "--resume" in line and str(run_dir / "config.json") in line and "unknown key" in line


@pytest.mark.slow
def test_train_killed_before_its_first_checkpoint_resumes_by_starting_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fresh = tmp_path / "fresh"
    assert (
        cli.main(
            [
                "train",
                "--num-models",
                "2",
                "--num-elim-steps",
                "5",
                "--epochs",
                "1",
                "--model",
                "mlp",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(fresh),
            ]
        )
        == 0
    )
    run_dir = saved_run(tmp_path, "train", device="auto", no_progress=False)
    saved = (run_dir / "config.json").read_text()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run_dir), "--device", "cpu", "--no-progress"]) == 0
    text = capsys.readouterr().out.replace("\n", " ")
    assert "starting over" in text and "Winner: member" in text
    for name in ("checkpoint.pt", "history.json", "leaderboard.json", "summary.json", "winner.pt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "config.json").read_text() == saved  # written once, when the run started
    a, b = (torch.load(folder / "winner.pt", weights_only=True) for folder in (fresh, run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


LIBRARY_FUNCTIONS = {
    "instability": (instability_cli.lmc, "instability"),
    "hyperband": (hyperband_cli, "hyperband"),
    "pbt": (pbt_cli, "pbt"),
    "warmstart": (warmstart_cli, "run_study"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LIBRARY_FUNCTIONS))
def test_resume_passes_the_run_folder_to_the_library(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, attr = LIBRARY_FUNCTIONS[name]
    real = getattr(owner, attr)
    seen: dict[str, Any] = {}

    def checkpointing(*args: Any, run_dir: Any = None, resume: bool = False, **kwargs: Any) -> Any:
        seen.update(run_dir=run_dir, resume=resume)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, checkpointing)
    run_dir = saved_run(tmp_path, name)
    assert cli.main([name, "--resume", str(run_dir)]) == 0
    assert seen == {"run_dir": run_dir, "resume": True}


def test_default_run_folder_is_command_and_timestamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = Path(common.with_run_folder(CONFIGS["pbt"]()).out)
    assert out.parent == Path("runs") and re.fullmatch(r"pbt-\d{8}-\d{6}", out.name)
    assert common.with_run_folder(CONFIGS["pbt"](out="mine")).out == "mine"


# --------------------------------------------------------------------------- train --seeds
def test_train_seeds_runs_independent_eliminations_and_summarizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--seeds 2 with 4 models: runs with seeds 3 and 7 in seed-3/ and seed-7/, each exactly the
    standalone run with that seed; summary.json has mean, std and 95% CI of the winners' test
    accuracy; an interrupted second run resumes and ends the same."""
    runs = tmp_path / "runs"
    assert cli.main(["train", *TWO_ROUNDS, "--seed", "3", "--seeds", "2", "--out", str(runs)]) == 0
    assert "Winners' test accuracy over 2 seeds" in capsys.readouterr().out
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["seeds"] == [3, 7] and [r["seed"] for r in summary["runs"]] == [3, 7]
    accuracies = [r["test_accuracy"] for r in summary["runs"]]
    stats = summary["test_accuracy"]
    assert stats["n"] == stats["n_finite"] == 2 and stats["mean"] == pytest.approx(sum(accuracies) / 2)
    assert stats["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2**0.5)
    assert stats["ci_high"] - stats["mean"] == pytest.approx(12.7062 * stats["std"] / 2**0.5, rel=1e-4)
    alone = tmp_path / "alone"
    assert cli.main(["train", *TWO_ROUNDS, "--seed", "7", "--out", str(alone)]) == 0
    a, b = load_winner(alone / "winner.pt").state_dict(), load_winner(runs / "seed-7" / "winner.pt").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((alone / "summary.json").read_text())["test_accuracy"] == accuracies[1]

    interrupted = tmp_path / "interrupted"
    original = PopulationTrainer.save_checkpoint

    def stop_in_the_second_run(self: PopulationTrainer, path: Any) -> None:
        original(self, path)
        if "seed-7" in str(path) and len(self.history["rounds"]) == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(PopulationTrainer, "save_checkpoint", stop_in_the_second_run)
        assert cli.main(["train", *TWO_ROUNDS, "--seed", "3", "--seeds", "2", "--out", str(interrupted)]) == 130
    assert (interrupted / "seed-3" / "summary.json").is_file() and not (interrupted / "seed-7" / "winner.pt").exists()
    assert cli.main(["train", "--resume", str(interrupted), "--no-progress"]) == 0
    assert "seed 3: finished earlier" in capsys.readouterr().out
    resumed = json.loads((interrupted / "summary.json").read_text())
    assert resumed["test_accuracy"] == summary["test_accuracy"]
    a, b = load_winner(runs / "seed-7" / "winner.pt").state_dict(), load_winner(interrupted / "seed-7" / "winner.pt").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
