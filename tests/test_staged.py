"""Staged fidelity (S0..S3): stage configs from TOML/YAML, clear errors for bad ones, nested seeded
data subsets, and a run where survivors continue (warm start) with the cost accounted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from popvec.data import TensorSplit, load_dataset
from popvec.models import model_factory
from popvec.search.run import make_trainer
from popvec.search.space import LogUniform, SearchSpace
from popvec.search.staged import DEFAULT_STAGES, Stage, data_subset, load_stages, parse_stages, run_staged

TOML = """
[[stages]]
name = "S0 sanity"
steps = 4
data_fraction = 0.1
survival_rate = 0.5

[[stages]]
name = "S1 shakeout"
steps = 6
data_fraction = 0.5
survival_rate = 0.5

[[stages]]
name = "S3 finisher"
steps = 10
"""


def test_stages_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "stages.toml"
    path.write_text(TOML)
    assert load_stages(path) == [Stage("S0 sanity", 4, 0.1, 0.5), Stage("S1 shakeout", 6, 0.5, 0.5), Stage("S3 finisher", 10, 1.0, 1.0)]
    assert [s.name for s in DEFAULT_STAGES] == ["S0 sanity", "S1 shakeout", "S2 serious", "S3 finisher"]


def test_stages_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stages.yaml"
    path.write_text("stages:\n  - {name: S0, steps: 4, data_fraction: 0.1, survival_rate: 0.5}\n")
    try:
        import yaml  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(RuntimeError, match="needs PyYAML"):
            load_stages(path)
    else:
        assert load_stages(path) == [Stage("S0", 4, 0.1, 0.5)]
        monkeypatch.setitem(sys.modules, "yaml", None)
        with pytest.raises(RuntimeError, match="needs PyYAML"):
            load_stages(path)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ([], "stages must be a non-empty list"),
        ([{"steps": 5, "survival_rate": 0.0}], r"stages\[0\] stage 'S0': survival_rate must lie in \(0, 1\], got 0.0"),
        ([{"steps": 5, "survival_rate": 1.5}], r"survival_rate must lie in \(0, 1\], got 1.5"),
        ([{"steps": 5, "data_fraction": 0}], r"data_fraction must lie in \(0, 1\], got 0"),
        ([{"steps": 5, "data_fraction": 1.01}], r"data_fraction must lie in \(0, 1\]"),
        ([{"steps": 0}], "steps must be an integer >= 1"),
        ([{"survival_rate": 0.5}], r"stages\[0\]: steps is missing"),
        ([{"steps": 5, "epochs": 2}], r"unknown keys \['epochs'\]"),
        (["S0"], r"stages\[0\] must be a table"),
    ],
)
def test_bad_stage_configs(spec: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_stages(spec)


def test_bad_stage_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("stages = []\n")
    with pytest.raises(ValueError, match=r"empty\.toml: stages must be a non-empty list"):
        load_stages(empty)
    none = tmp_path / "none.toml"
    none.write_text("[space]\nlr = 0.1\n")
    with pytest.raises(ValueError, match="no 'stages' list"):
        load_stages(none)


def test_data_subsets_are_seeded_and_nested() -> None:
    split = TensorSplit(torch.arange(100.0).view(100, 1), torch.arange(100))
    small, big = data_subset(split, 0.1, seed=3), data_subset(split, 0.5, seed=3)
    assert len(small) == 10 and len(big) == 50
    assert set(small.y.tolist()) <= set(big.y.tolist())
    assert torch.equal(data_subset(split, 0.1, seed=3).y, small.y)
    assert not torch.equal(data_subset(split, 0.1, seed=4).y, small.y)
    assert data_subset(split, 1.0) is split


def test_run_staged_survivors_continue(single_thread) -> None:
    data = load_dataset("digits")
    stages = [Stage("S0", 4, 0.1, 0.5), Stage("S1", 6, 0.5, 0.5), Stage("S3", 10, 1.0, 1.0)]
    trainer = make_trainer(
        model_factory("mlp", data.input_shape, 10, hidden=(16,)), SearchSpace({"lr": LogUniform(1e-3, 1e-1)}).sample(8, 0), progress=False
    )
    history = run_staged(trainer, stages, data.train, data.val, batch_size=32)
    assert [r["step"] for r in history["rounds"]] == [4, 10, 20]
    assert [len(r["members"]) for r in history["rounds"]] == [8, 4, 2]
    assert trainer.population.n == 2
    assert trainer.optimizer.steps.tolist() == [20.0, 20.0]  # survivors kept training: a warm start
    assert history["cost"]["member_steps"] == 8 * 4 + 4 * 6 + 2 * 10
    assert history["cost"]["naive_member_steps"] == 8 * 20
    assert history["stages"][0]["name"] == "S0"
    assert all("reason" in r for r in history["rounds"][0]["members"] if not r["kept"])
