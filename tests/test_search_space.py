"""Search spaces: seeded sampling (determinism, bounds), config files, optimizers from sampled values,
and per-member label smoothing (equivalence with F.cross_entropy one model at a time)."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import Reference, assert_members_equal, make_batches, reference_model, tiny_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from popvec import optim
from popvec.losses import cross_entropy
from popvec.population import Population
from popvec.search.files import load_config, load_space
from popvec.search.run import build_optimizer
from popvec.search.space import Choice, LogUniform, SearchSpace, Uniform
from popvec.trainer import PopulationTrainer

SPACE = SearchSpace({"lr": LogUniform(1e-4, 1e-1), "weight_decay": Uniform(0.0, 1e-3), "beta2": Choice([0.99, 0.999])})


# --------------------------------------------------------------------------- sampling
def test_sampling_is_deterministic_and_seeded() -> None:
    a, b, c = SPACE.sample(16, seed=3), SPACE.sample(16, seed=3), SPACE.sample(16, seed=4)
    assert a == b
    assert a["lr"] != c["lr"]
    # each name has its own stream: adding a hyperparameter leaves the others' values alone
    bigger = SearchSpace({**SPACE.params, "label_smoothing": Uniform(0.0, 0.2)}).sample(16, seed=3)
    assert all(bigger[k] == a[k] for k in a)
    tensors = SPACE.sample_tensors(16, seed=3)
    assert all(t.shape == (16,) and t.dtype == torch.float32 for t in tensors.values())
    assert set(a["beta2"]) <= {0.99, 0.999}


@settings(max_examples=60, deadline=None)
@given(
    low=st.floats(1e-8, 1e3),
    ratio=st.floats(1.0, 1e6),
    n=st.integers(1, 64),
    seed=st.integers(0, 2**40),
    ulow=st.floats(-1e3, 1e3),
    width=st.floats(0.0, 1e3),
)
def test_samples_stay_within_bounds(low: float, ratio: float, n: int, seed: int, ulow: float, width: float) -> None:
    high = low * ratio
    space = SearchSpace({"lr": LogUniform(low, high), "x": Uniform(ulow, ulow + width)})
    values = space.sample(n, seed)
    assert len(values["lr"]) == n and all(low <= v <= high for v in values["lr"])
    assert all(ulow <= v <= ulow + width for v in values["x"])
    rng = random.Random(seed)
    assert low <= space.resample("lr", rng) <= high
    assert low <= space.perturb("lr", high, 1.2) <= high  # perturbation is clipped to the bounds


def test_loguniform_spreads_over_decades() -> None:
    lr = SearchSpace({"lr": LogUniform(1e-4, 1e-1)}).sample(2000, seed=0)["lr"]
    decades = [sum(10 ** (-4 + d) <= v < 10 ** (-3 + d) for v in lr) for d in range(3)]
    assert all(500 < c < 850 for c in decades), decades


def test_choice_perturb_moves_to_a_neighbour() -> None:
    space = SearchSpace({"m": Choice([0.0, 0.5, 0.9])})
    assert space.perturb("m", 0.5, 1.2) == 0.9
    assert space.perturb("m", 0.5, 0.8) == 0.0
    assert space.perturb("m", 0.9, 1.2) == 0.9


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"lr": {"distribution": "loguniform", "low": 0.0, "high": 1.0}}, r"space\.lr: loguniform needs 0 < low"),
        ({"lr": {"distribution": "uniform", "low": 2.0, "high": 1.0}}, r"space\.lr: uniform needs low <= high"),
        ({"lr": {"distribution": "normal", "low": 0.1, "high": 1.0}}, r"space\.lr\.distribution must be one of"),
        ({"lr": {"distribution": "uniform", "low": 0.1}}, r"space\.lr\.high is missing"),
        ({"lr": {"distribution": "choice", "values": []}}, r"space\.lr\.values must be a non-empty list"),
        ({"lr": {"distribution": "uniform", "low": 0.1, "high": 1.0, "step": 2}}, r"space\.lr: unknown keys \['step'\]"),
        ({"lr": "fast"}, r"space\.lr must be a table"),
        ({}, r"space must be a non-empty table"),
    ],
)
def test_bad_space_specs_name_the_parameter(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SearchSpace.from_dict(spec)


# --------------------------------------------------------------------------- files
def test_space_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text(
        '[space]\nlr = { distribution = "loguniform", low = 1e-4, high = 1e-1 }\n'
        'label_smoothing = { distribution = "uniform", low = 0.0, high = 0.2 }\n'
        'momentum = { distribution = "choice", values = [0.0, 0.9] }\nbeta2 = 0.99\n'
    )
    space = load_space(path)
    assert space.params == {
        "lr": LogUniform(1e-4, 1e-1),
        "label_smoothing": Uniform(0.0, 0.2),
        "momentum": Choice([0.0, 0.9]),
        "beta2": Choice([0.99]),
    }
    assert SearchSpace.from_dict(space.to_dict()).params == space.params


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[space\nlr = 1")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    other = tmp_path / "space.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match=r"must end in \.toml, \.yaml or \.yml"):
        load_config(other)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[space]\nlr = { distribution = "loguniform", low = -1.0, high = 1.0 }\n')
    with pytest.raises(ValueError, match=r"wrong\.toml: space\.lr: loguniform"):
        load_space(wrong)


def test_yaml_needs_pyyaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("space:\n  lr: {distribution: loguniform, low: 0.0001, high: 0.1}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(RuntimeError, match="needs PyYAML"):
        load_config(path)


def test_yaml_space_when_pyyaml_present(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "space.yml"
    path.write_text("space:\n  lr: {distribution: loguniform, low: 0.0001, high: 0.1}\n")
    assert load_space(path).params == {"lr": LogUniform(1e-4, 1e-1)}


# --------------------------------------------------------------------------- optimizers
def test_build_optimizer_sets_per_member_values() -> None:
    pop = Population.from_factory(tiny_mlp, 4, seed=0)
    values = SearchSpace({"lr": LogUniform(1e-3, 1e-1), "beta2": Choice([0.9, 0.99]), "label_smoothing": Uniform(0, 0.2)}).sample(4, 1)
    opt, loss = build_optimizer("adam", pop, values)
    assert isinstance(opt, optim.Adam)
    torch.testing.assert_close(opt.hparams["lr"], torch.tensor(values["lr"]))
    torch.testing.assert_close(opt.hparams["beta2"], torch.tensor(values["beta2"]))
    torch.testing.assert_close(loss["label_smoothing"], torch.tensor(values["label_smoothing"]))
    with pytest.raises(ValueError, match="'momentum' does not apply to adam"):
        build_optimizer("adam", pop, {"momentum": [0.9] * 4})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("lion", pop, {"lr": [0.1] * 4})
    sgd, _ = build_optimizer("sgd", pop, {"lr": [0.1] * 4, "momentum": [0.0, 0.5, 0.9, 0.9], "max_grad_norm": [1.0] * 4})
    assert sgd.hparams["momentum"].tolist() == pytest.approx([0.0, 0.5, 0.9, 0.9])


# --------------------------------------------------------------------------- label smoothing
@pytest.mark.parametrize("s", [0.0, 0.1, 0.35])
def test_cross_entropy_matches_torch(s: float) -> None:
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(32, 5, generator=g), torch.randint(0, 5, (32,), generator=g)
    torch.testing.assert_close(cross_entropy(out, y, torch.tensor(s)), F.cross_entropy(out, y, label_smoothing=s))


@pytest.mark.parametrize("per_member", [False, True])
def test_label_smoothing_member_equals_single_model(per_member: bool, single_thread: None) -> None:
    smoothing = [0.0, 0.1, 0.3]
    n, seed = len(smoothing), 5
    pop = Population.from_factory(tiny_mlp, n, seed=seed)
    opt = optim.Adam(pop, lr=[1e-2, 3e-3, 1e-2])
    trainer = PopulationTrainer(pop, opt, loss_fn=cross_entropy, progress=False, loss_hparams={"label_smoothing": smoothing})
    batches = make_batches(12, n if per_member else None)
    refs = [
        Reference(
            reference_model(tiny_mlp, seed + i),
            lambda p, lr=lr: torch.optim.Adam(p, lr=lr),
            loss_fn=lambda out, y, s=s: F.cross_entropy(out, y, label_smoothing=s),
        )
        for i, (s, lr) in enumerate(zip(smoothing, [1e-2, 3e-3, 1e-2]))
    ]
    for x, y in batches:
        losses = trainer.step(x, y, per_member=per_member)
        for i, ref in enumerate(refs):
            expected = ref.step(x[i] if per_member else x, y[i] if per_member else y)
            assert math.isclose(float(losses[i]), expected, rel_tol=1e-5, abs_tol=1e-6)
    assert_members_equal(pop, [r.model for r in refs])
    # the loss hyperparameters follow selection and can be set like the optimizer's
    trainer.select([2, 0])
    assert trainer.loss_hparams["label_smoothing"].tolist() == pytest.approx([0.3, 0.0])
    trainer.set_hparam("label_smoothing", [0.05, 0.2])
    trainer.set_hparam("lr", 1e-3)
    assert trainer.hparams()["label_smoothing"].tolist() == pytest.approx([0.05, 0.2])
    assert trainer.hparams()["lr"].tolist() == pytest.approx([1e-3, 1e-3])
    with pytest.raises(ValueError, match="name must be one of"):
        trainer.set_hparam("dropout", 0.1)
    x, y = batches[0]
    trainer.step(x[:2] if per_member else x, y[:2] if per_member else y, per_member=per_member)
