"""The fast subset of the reliability campaign (benchmarks/reliability.py): its oracles on a few trials.

In process: every kind of damaged checkpoint is refused by ``--resume`` in one line naming the
file, leaving the folder as it was; fuzzed argv drawn from each command's real flags ends in an
exit code or a one-line refusal, never another exception. In child processes (slow): kill -9
after the first checkpoint then ``--resume`` equals an uninterrupted run bit for bit, two runs
started together on one folder (one runs, the other is refused naming it), a stale lock taken over.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import test_run_safety
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_run_safety import TWO_ROUNDS, one_error_line

from popvec import cli
from popvec.cli.main import build_parser
from popvec.trainer import CHECKPOINT_NAME

ROOT = Path(__file__).resolve().parents[1]


def _campaign_module() -> Any:
    spec = importlib.util.spec_from_file_location("popvec_reliability_campaign", ROOT / "benchmarks" / "reliability.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


rel = _campaign_module()
interrupted_run = test_run_safety.interrupted_run  # the shared fixture: a train run stopped after its first checkpoint


# --------------------------------------------------------------------------- damaged checkpoints (in process)
@pytest.fixture(scope="module")
def other_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished train run of another population size: its checkpoint is genuine but not this run's."""
    out = tmp_path_factory.mktemp("runs") / "other"
    assert cli.main(["train", *TWO_ROUNDS[:1], "3", *TWO_ROUNDS[2:], "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("kind", rel.KINDS)
def test_every_kind_of_damaged_checkpoint_is_refused_and_the_folder_left_as_it_was(
    kind: str,
    interrupted_run: Path,
    other_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "run"
    shutil.copytree(interrupted_run, folder)
    target = folder / CHECKPOINT_NAME
    rel.corrupt(target, kind, other_run / CHECKPOINT_NAME, random.Random(0))
    before = rel.snapshot(folder)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--resume", str(folder), "--no-progress"])
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert str(target) in line, line
    assert rel.snapshot(folder) == before


# --------------------------------------------------------------------------- fuzzed flags (in process)
SPECS = {
    name: [
        {"options": a.option_strings, "dest": a.dest, "choices": list(a.choices) if a.choices else None, "switch": a.nargs == 0}
        for a in parser._actions
        if a.dest != "help"
    ]
    for name, parser in next(a for a in build_parser()._actions if a.dest == "command").choices.items()  # type: ignore[union-attr]
}
FUZZ = st.sampled_from(sorted(SPECS)).flatmap(lambda c: st.tuples(st.just(c), rel.argv_strategy(c, SPECS[c])))


@pytest.fixture(scope="module")
def winners(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        assert cli.main(["train", *TWO_ROUNDS, "--seed", str(seed), "--out", str(out / str(seed))]) == 0
    return out / "0" / "winner.pt", out / "1" / "winner.pt"


def fuzz_argv(command: str, plan: tuple[str, list[str]], where: Path, winners: tuple[Path, Path]) -> list[str]:
    mode, tokens = plan
    extra = [rel.make_path(t, where, command, {}, {}) for t in tokens]
    if mode == "resume":
        return [command, *extra]
    if command == "lmc":
        return ["lmc", *rel.LMC, *map(str, winners), "--out", str(where / "run"), *extra]
    tiny = [*rel.TINY[command]]
    return [command, *tiny, "--out", str(where / "run"), *extra]


@pytest.mark.slow
@settings(max_examples=20, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=FUZZ)
def test_fuzzed_flags_exit_or_refuse_in_one_line(
    case: tuple[str, tuple[str, list[str]]], winners: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    command, plan = case
    if rel.long_run_asked(plan[1]):
        return  # valid flags asking for a long run: the campaign bounds those by a timeout
    home = os.getcwd()
    with tempfile.TemporaryDirectory() as where:
        argv = fuzz_argv(command, plan, Path(where), winners)
        capsys.readouterr()
        os.chdir(where)  # relative paths drawn for --out or --data-dir land in the scratch folder
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code
        finally:
            os.chdir(home)
        err = capsys.readouterr().err
    assert rel.TRACEBACK not in err
    assert code in (0, 1, 2), (argv, code, err)
    if code:
        lines = [line for line in err.splitlines() if line.strip()]
        assert 1 <= len(lines) <= 4, (argv, err)


# --------------------------------------------------------------------------- child processes (slow)
@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("campaign")
    c = rel.Campaign(rel.Popvec(ROOT, work), random.Random(0), 1, ["train"], say=lambda s: None)
    c.reference_run("train")
    return c


@pytest.mark.slow
def test_kill_9_after_the_first_checkpoint_then_resume_equals_the_uninterrupted_run(campaign: Any) -> None:
    trial = campaign.kill_resume("train", "after-first-checkpoint", "checkpoint")
    assert trial.passed, trial.finding
    assert "after a checkpoint" in trial.finding or "after the end" in trial.finding


@pytest.mark.slow
def test_two_runs_started_together_one_runs_the_other_is_refused(campaign: Any) -> None:
    trial = campaign.concurrent_together("train")
    assert trial.passed, trial.finding


@pytest.mark.slow
def test_a_stale_lock_of_a_dead_pid_is_taken_over_and_the_resume_matches(campaign: Any) -> None:
    campaign.interrupted["train"] = campaign.interrupt("train")
    trial = campaign.concurrent_stale_lock("train")
    assert trial.passed, trial.finding
