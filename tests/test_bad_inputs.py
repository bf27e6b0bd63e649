"""Bad inputs get one line, never a traceback: every command's flags and the library's public calls.

Each CLI case runs ``popvec.cli.main.main(argv)`` in-process with training disabled (a step raises
:class:`TrainingStarted`), so a case passes only if it is refused before any training, with exit 2
and one stderr line naming the flag. Each API case must raise the expected exception type with a
message fragment naming the argument. ``python tests/test_bad_inputs.py`` prints the audit: how
many cases end in a raw traceback, a one-line error, or are accepted.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from popvec import MultipleInitializationsTrainer, Population, PopulationTrainer, engine, optim
from popvec.cli import common
from popvec.cli.main import main as cli_entry
from popvec.data import load_dataset
from popvec.models import build_model, model_factory
from popvec.studies import lmc

CUDA = torch.cuda.is_available()


class TrainingStarted(BaseException):
    """Raised by the first training step: a bad input must be refused before it."""


# --------------------------------------------------------------------------- CLI cases
# (argv, fragment of the one error line). "{tmp}" is a folder with the files made by make_files.
DIGITS = ["--device", "cpu", "--no-progress"]
LMC = ["--device", "cpu", "--no-plots"]
CLI_CASES: list[tuple[list[str], str]] = [
    # train
    (["train", "--model", "vgg", *DIGITS], "--model"),
    (["train", "--model", "lenet5", "--dataset", "digits", "--num-elim-steps", "19", "--epochs", "1", *DIGITS], "--num-elim-steps"),
    (["train", "--batch-size", "100000", *DIGITS], "--batch-size"),
    (["train", "--batch-size", "0", *DIGITS], "--batch-size"),
    (["train", "--batch-size", "", *DIGITS], "--batch-size"),
    (["train", "--out", "{tmp}/file.txt", *DIGITS], "--out"),
    (["train", "--out", "", *DIGITS], "--out"),
    (["train", "--seed", "99999999999999999999", *DIGITS], "--seed"),
    (["train", "--seed", "-1", *DIGITS], "--seed"),
    (["train", "--seed", "1.5", *DIGITS], "--seed"),
    (["train", "--seed", "", *DIGITS], "--seed"),
    (["train", "--num-elim-steps", "0", *DIGITS], "--num-elim-steps"),
    (["train", "--num-elim-steps", "100000", "--epochs", "1", *DIGITS], "--num-elim-steps"),
    (["train", "--reduce-factor", "1", *DIGITS], "--reduce-factor"),
    (["train", "--reduce-factor", "nan", *DIGITS], "--reduce-factor"),
    (["train", "--reduce-factor", "", *DIGITS], "--reduce-factor"),
    (["train", "--lr", "nan", *DIGITS], "--lr"),
    (["train", "--lr", "inf", *DIGITS], "--lr"),
    (["train", "--lr", "-0.1", *DIGITS], "--lr"),
    (["train", "--momentum", "nan", *DIGITS], "--momentum"),
    (["train", "--num-models", "-3", *DIGITS], "--num-models"),
    (["train", "--num-models", "", *DIGITS], "--num-models"),
    (["train", "--epochs", "-1", *DIGITS], "--epochs"),
    (["train", "--member-chunk-size", "0", *DIGITS], "--member-chunk-size"),
    (["train", "--dataset", "mnist", "--data-dir", "{tmp}/nodata", *DIGITS], "--download"),
    (["train", "--dataset", "cifar10", "--data-dir", "{tmp}/nodata", *DIGITS], "--download"),
    (["train", "--device", "tpu", "--no-progress"], "--device"),
    (["train", "--device", "", "--no-progress"], "--device"),
    (["train", "--device", "cuda:99", "--no-progress"], "--device"),
    (["train", "--resume", "{tmp}/file.txt"], "--resume"),
    (["train", "--resume", "{tmp}/badrun"], "--resume"),
    # lmc
    (["lmc", "{tmp}/missing.pt", "{tmp}/mlp.pt", "--model", "mlp", *LMC], "A.pt"),
    (["lmc", "{tmp}/mlp.pt", "{tmp}/missing.pt", "--model", "mlp", *LMC], "B.pt"),
    (["lmc", "{tmp}", "{tmp}/mlp.pt", "--model", "mlp", *LMC], "directory"),
    (["lmc", "{tmp}/mlp.pt", "{tmp}/lenet5.pt", "--model", "mlp", *LMC], "--model"),
    (["lmc", "{tmp}/lenet5.pt", "{tmp}/lenet5.pt", "--model", "mlp", *LMC], "--model"),
    (["lmc", "{tmp}/garbage.pt", "{tmp}/mlp.pt", "--model", "mlp", *LMC], "garbage.pt"),
    (["lmc", "{tmp}/file.txt", "{tmp}/mlp.pt", "--model", "mlp", *LMC], "file.txt"),
    (["lmc", "{tmp}/notdict.pt", "{tmp}/mlp.pt", "--model", "mlp", *LMC], "notdict.pt"),
    (["lmc", "{tmp}/mlp.pt", "{tmp}/mlp.pt", "--model", "mlp", "--alphas", "1", *LMC], "--alphas"),
    (["lmc", "{tmp}/mlp.pt", "{tmp}/mlp.pt", "--model", "mlp", "--alphas", "", *LMC], "--alphas"),
    (["lmc", "{tmp}/mlp.pt", "{tmp}/mlp.pt", "--model", "mlp", "--batch-size", "-1", *LMC], "--batch-size"),
    (["lmc", "{tmp}/mlp.pt", "{tmp}/mlp.pt", "--model", "mlp", "--split", "nope", *LMC], "--split"),
    (["lmc", "{tmp}/mlp.pt", *LMC], "B.pt"),
    (["lmc", "", "{tmp}/mlp.pt", "--model", "mlp", *LMC], "A.pt"),
    (["lmc", "{tmp}/mlp.pt", "{tmp}/mlp.pt", "--model", "vgg", *LMC], "--model"),
    # instability
    (["instability", "--k1", "5,5", *DIGITS], "--k1"),
    (["instability", "--k1=-1,5", *DIGITS], "--k1"),
    (["instability", "--k1", "", *DIGITS], "--k1"),
    (["instability", "--k1", "a,b", *DIGITS], "--k1"),
    (["instability", "--k1", "1.5", *DIGITS], "--k1"),
    (["instability", "--k2", "0", *DIGITS], "--k2"),
    (["instability", "--copies", "1", *DIGITS], "--copies"),
    (["instability", "--alphas", "1", *DIGITS], "--alphas"),
    (["instability", "--model", "vgg", *DIGITS], "--model"),
    (["instability", "--seed", "-5", *DIGITS], "--seed"),
    (["instability", "--batch-size", "100000", *DIGITS], "--batch-size"),
    # hyperband
    (["hyperband", "--max-t", "1", "--grace-period", "3", *DIGITS], "--max-t"),
    (["hyperband", "--reduction-factor", "1", *DIGITS], "--reduction-factor"),
    (["hyperband", "--reduction-factor", "0", *DIGITS], "--reduction-factor"),
    (["hyperband", "--brackets", "0", *DIGITS], "--brackets"),
    (["hyperband", "--brackets", "100", *DIGITS], "--brackets"),
    (["hyperband", "--unit-steps", "0", *DIGITS], "--unit-steps"),
    (["hyperband", "--lr-range", "1,0.1", *DIGITS], "--lr-range"),
    (["hyperband", "--lr-range", "nan,1", *DIGITS], "--lr-range"),
    (["hyperband", "--lr-range", "0,1", *DIGITS], "--lr-range"),
    (["hyperband", "--lr-range", "1", *DIGITS], "--lr-range"),
    (["hyperband", "--lr-range", "", *DIGITS], "--lr-range"),
    (["hyperband", "--momentum-range", "0.5,2", *DIGITS], "--momentum-range"),
    (["hyperband", "--label-smoothing-range", "0,1.5", *DIGITS], "--label-smoothing-range"),
    (["hyperband", "--clip-range=-1,1", *DIGITS], "--clip-range"),
    (["hyperband", "--space", "{tmp}/missing.toml", *DIGITS], "--space"),
    (["hyperband", "--space", "{tmp}/bad.toml", *DIGITS], "--space"),
    (["hyperband", "--space", "{tmp}/badspace.toml", *DIGITS], "--space"),
    (["hyperband", "--space", "{tmp}/unknown.toml", *DIGITS], "--space"),
    (["hyperband", "--space", "{tmp}/file.txt", *DIGITS], "--space"),
    (["hyperband", "--space", "{tmp}", *DIGITS], "--space"),
    (["hyperband", "--patience", "0", *DIGITS], "--patience"),
    (["hyperband", "--check-every", "0", *DIGITS], "--check-every"),
    (["hyperband", "--grad-norm-threshold", "nan", *DIGITS], "--grad-norm-threshold"),
    (["hyperband", "--model", "vgg", *DIGITS], "--model"),
    (["hyperband", "--seed", "99999999999999999999", *DIGITS], "--seed"),
    # pbt
    (["pbt", "--perturbation-interval", "100", "--steps", "10", *DIGITS], "--perturbation-interval"),
    (["pbt", "--perturbation-interval", "0", *DIGITS], "--perturbation-interval"),
    (["pbt", "--steps", "0", *DIGITS], "--steps"),
    (["pbt", "--num-models", "1", *DIGITS], "--num-models"),
    (["pbt", "--quantile-fraction", "0.7", *DIGITS], "--quantile-fraction"),
    (["pbt", "--quantile-fraction", "nan", *DIGITS], "--quantile-fraction"),
    (["pbt", "--resample-probability", "1.5", *DIGITS], "--resample-probability"),
    (["pbt", "--lr-range", "1,0.1", *DIGITS], "--lr-range"),
    (["pbt", "--lr-range", "nan,1", *DIGITS], "--lr-range"),
    (["pbt", "--space", "{tmp}/missing.toml", *DIGITS], "--space"),
    (["pbt", "--space", "{tmp}/bad.toml", *DIGITS], "--space"),
    (["pbt", "--space", "{tmp}/badspace.toml", *DIGITS], "--space"),
    (["pbt", "--model", "vgg", *DIGITS], "--model"),
    (["pbt", "--batch-size", "100000", *DIGITS], "--batch-size"),
    (["pbt", "--seed", "-1", *DIGITS], "--seed"),
    # warmstart
    (["warmstart", "--sp", "0.5", *DIGITS], "--sp"),
    (["warmstart", "--sp", "a,b", *DIGITS], "--sp"),
    (["warmstart", "--sp", "", *DIGITS], "--sp"),
    (["warmstart", "--sp", "0.5,-1", *DIGITS], "--sp"),
    (["warmstart", "--sp", "nan,0.1", *DIGITS], "--sp"),
    (["warmstart", "--threshold", "0", *DIGITS], "--threshold"),
    (["warmstart", "--threshold", "1.5", *DIGITS], "--threshold"),
    (["warmstart", "--fraction", "1", *DIGITS], "--fraction"),
    (["warmstart", "--chunks", "0", *DIGITS], "--chunks"),
    (["warmstart", "--chunks", "100000", *DIGITS], "--chunks"),
    (["warmstart", "--replicates", "0", *DIGITS], "--replicates"),
    (["warmstart", "--weight-decay", "-1", *DIGITS], "--weight-decay"),
    (["warmstart", "--max-steps", "0", *DIGITS], "--max-steps"),
    (["warmstart", "--model", "vgg", *DIGITS], "--model"),
    (["warmstart", "--batch-size", "100000", *DIGITS], "--batch-size"),
    (["warmstart", "--seed", "99999999999999999999", *DIGITS], "--seed"),
]


def make_files(tmp: Path) -> None:
    """The files the CLI cases name: state_dicts, a non-checkpoint, space files, a bad run folder."""
    (tmp / "file.txt").write_text("not a checkpoint\n")
    torch.manual_seed(0)
    torch.save(build_model("mlp", (1, 8, 8), 10).state_dict(), tmp / "mlp.pt")
    torch.save(build_model("lenet5", (1, 28, 28), 10).state_dict(), tmp / "lenet5.pt")
    (tmp / "garbage.pt").write_bytes(b"\x00\x01garbage" * 10)
    torch.save([1, 2, 3], tmp / "notdict.pt")
    (tmp / "bad.toml").write_text("[space\nlr = ")
    (tmp / "badspace.toml").write_text('[space]\nlr = { distribution = "loguniform", low = 1, high = 0.1 }\n')
    (tmp / "unknown.toml").write_text('[space]\nlr = { distribution = "gaussianish", low = 0.1, high = 1 }\n')
    (tmp / "badrun").mkdir()
    (tmp / "badrun" / "config.json").write_text("{not json")


def _fill(argv: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in argv]


@contextlib.contextmanager
def no_training(monkeypatch: pytest.MonkeyPatch | None = None) -> Iterator[None]:
    """Every training step raises :class:`TrainingStarted` (so an accepted case costs nothing)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise TrainingStarted

    original = engine.TrainStep.__call__
    engine.TrainStep.__call__ = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        engine.TrainStep.__call__ = original  # type: ignore[method-assign]


def run_cli(argv: list[str]) -> tuple[str, int | None, str]:
    """Run one CLI case: ``(outcome, exit code, stderr)``; outcome is one-line, traceback or accepted."""
    err = io.StringIO()
    with no_training(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code: Any = cli_entry(argv)
        except SystemExit as exit_:
            code = exit_.code
        except TrainingStarted:
            return "accepted", None, "training started"
        except Exception:
            return "traceback", None, traceback.format_exc()
    text = err.getvalue().strip()
    if code == 0:
        return "accepted", 0, text
    return ("one-line" if len(text.splitlines()) == 1 else "multi-line"), code, text


# --------------------------------------------------------------------------- API cases
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _trainer(n: int = 3, model_fn: Callable[[], nn.Module] = _mlp) -> PopulationTrainer:
    pop = Population.from_factory(model_fn, n, seed=0)
    return PopulationTrainer(pop, optim.SGD(pop, lr=0.1), progress=False, callbacks=[])


def _trainer_with(**kwargs: Any) -> PopulationTrainer:
    pop = Population.from_factory(_mlp, 2, seed=0)
    return PopulationTrainer(pop, optim.SGD(pop, lr=0.1), progress=False, callbacks=[], **kwargs)


X = torch.randn(8, 1, 8, 8)
Y = torch.randint(0, 10, (8,))


def _sgd(pop: Population) -> Any:
    return optim.SGD(pop, lr=0.1)


API_CASES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    ("module as model_fn", lambda: Population.from_factory(_mlp(), 2), TypeError, "model_fn"),
    ("model_fn not callable", lambda: Population.from_factory(3, 2), TypeError, "model_fn"),  # type: ignore[arg-type]
    ("model_fn returns non-module", lambda: Population.from_factory(lambda: 3, 2), TypeError, "model_fn"),
    ("n=0", lambda: Population.from_factory(_mlp, 0), ValueError, "n must"),
    ("n=-1", lambda: Population.from_factory(_mlp, -1), ValueError, "n must"),
    ("n=2.5", lambda: Population.from_factory(_mlp, 2.5), TypeError, "n must"),  # type: ignore[arg-type]
    ("n=True", lambda: Population.from_factory(_mlp, True), TypeError, "n must"),
    ("seed=-1", lambda: Population.from_factory(_mlp, 2, seed=-1), ValueError, "seed"),
    ("seed huge", lambda: Population.from_factory(_mlp, 2, seed=2**70), ValueError, "seed"),
    ("seed float", lambda: Population.from_factory(_mlp, 2, seed=1.5), TypeError, "seed"),  # type: ignore[arg-type]
    ("device tpu", lambda: Population.from_factory(_mlp, 2, device="tpu"), ValueError, "device"),
    ("from_modules empty", lambda: Population.from_modules([]), ValueError, "modules"),
    ("from_modules mixed", lambda: Population.from_modules([_mlp(), _cnn()]), ValueError, "modules"),
    ("from_modules non-module", lambda: Population.from_modules([_mlp(), 3]), TypeError, "modules[1]"),  # type: ignore[list-item]
    ("step int x", lambda: _trainer().step(X.long(), Y), ValueError, "x"),
    ("step float64 x", lambda: _trainer().step(X.double(), Y), ValueError, "dtype torch.float64"),
    ("step wrong shape x", lambda: _trainer().step(torch.randn(8, 3, 5, 5), Y), ValueError, "x"),
    ("step wrong shape x (cnn)", lambda: _trainer(model_fn=_cnn).step(torch.randn(8, 1, 4, 4), Y), ValueError, "x"),
    ("step x 1-D", lambda: _trainer().step(torch.randn(64), Y), ValueError, "x"),
    ("step y out of range", lambda: _trainer().step(X, torch.full((8,), 10)), ValueError, "y"),
    ("step y negative", lambda: _trainer().step(X, torch.full((8,), -1)), ValueError, "y"),
    ("step y float", lambda: _trainer().step(X, Y.float()), TypeError, "y"),
    ("step y bool", lambda: _trainer().step(X, Y > 4), TypeError, "y"),
    ("step y 2-D", lambda: _trainer().step(X, Y[:, None]), ValueError, "y"),
    ("step len(y) != len(x)", lambda: _trainer().step(X, Y[:5]), ValueError, "y"),
    ("step empty x", lambda: _trainer().step(X[:0], Y[:0]), ValueError, "x"),
    (
        "step per_member wrong N",
        lambda: _trainer().step(torch.randn(2, 8, 1, 8, 8), torch.zeros(2, 8).long(), per_member=True),
        ValueError,
        "N=3",
    ),
    ("step per_member shared x", lambda: _trainer().step(X, torch.zeros(3, 8).long(), per_member=True), ValueError, "x"),
    ("step wrong device", lambda: _trainer().step(X.to("meta"), Y), ValueError, "device"),
    ("step mask wrong length", lambda: _trainer().step(X, Y, mask=torch.ones(2, dtype=torch.bool)), ValueError, "mask"),
    ("forward int x", lambda: Population.from_factory(_mlp, 2)(X.long()), ValueError, "x"),
    ("forward wrong shape", lambda: Population.from_factory(_mlp, 2)(torch.randn(4, 7)), ValueError, "x"),
    ("SGD lr wrong length", lambda: optim.SGD(Population.from_factory(_mlp, 3), lr=[0.1, 0.2]), ValueError, "lr"),
    ("SGD lr nan", lambda: optim.SGD(Population.from_factory(_mlp, 3), lr=math.nan), ValueError, "lr"),
    ("SGD lr negative", lambda: optim.SGD(Population.from_factory(_mlp, 3), lr=-1.0), ValueError, "lr"),
    ("Adam betas bad", lambda: optim.Adam(Population.from_factory(_mlp, 3), lr=0.1, betas=(1.5, 0.9)), ValueError, "beta"),
    ("set_hparam wrong length", lambda: _trainer().set_hparam("lr", [0.1, 0.2]), ValueError, "lr"),
    ("set_hparam unknown", lambda: _trainer().set_hparam("nope", 0.1), ValueError, "nope"),
    ("select out of range", lambda: _trainer().select([0, 5]), ValueError, "indices"),
    ("select negative", lambda: _trainer().select([-1]), ValueError, "indices"),
    ("select floats", lambda: _trainer().select([0.0, 1.0]), TypeError, "indices"),
    ("select empty", lambda: _trainer().select([]), ValueError, "indices"),
    ("pop.select out of range", lambda: Population.from_factory(_mlp, 2).select([2]), ValueError, "indices"),
    ("member out of range", lambda: Population.from_factory(_mlp, 2).member(5), ValueError, "[0, 1]"),
    ("spawn copies 0", lambda: Population.from_factory(_mlp, 2).spawn([0], copies=0), ValueError, "copies"),
    ("evaluate batch_size -1", lambda: _trainer().evaluate(X, Y, batch_size=-1), ValueError, "batch_size"),
    ("evaluate batch_size 0", lambda: _trainer().evaluate(X, Y, batch_size=0), ValueError, "batch_size"),
    (
        "engine.evaluate batch_size -1",
        lambda: engine.evaluate(Population.from_factory(_mlp, 2), (X, Y), batch_size=-1),
        ValueError,
        "batch_size",
    ),
    ("evaluate y out of range", lambda: _trainer().evaluate(X, torch.full((8,), 10)), ValueError, "y"),
    ("evaluate y negative", lambda: _trainer().evaluate(X, torch.full((8,), -3)), ValueError, "y"),
    ("evaluate y float", lambda: _trainer().evaluate(X, Y.float()), TypeError, "y"),
    ("evaluate len mismatch", lambda: _trainer().evaluate(X, Y[:3]), ValueError, "y"),
    ("evaluate int x", lambda: _trainer().evaluate(X.long(), Y), ValueError, "x"),
    ("evaluate wrong shape x", lambda: _trainer().evaluate(torch.randn(8, 3), Y), ValueError, "x"),
    ("fit steps -1", lambda: _trainer().fit([(X, Y)], (X, Y), steps=-1), ValueError, "steps"),
    ("trainer eval_batch_size 0", lambda: _trainer_with(eval_batch_size=0), ValueError, "eval_batch_size"),
    ("interpolate different archs", lambda: lmc.interpolate(_mlp(), _cnn(), (X, Y)), ValueError, "architecture"),
    ("interpolate alphas 1", lambda: lmc.interpolate(_mlp(), _mlp(), (X, Y), alphas=1), ValueError, "alphas"),
    ("interpolate alphas out of [0,1]", lambda: lmc.interpolate(_mlp(), _mlp(), (X, Y), alphas=[0.0, 2.0]), ValueError, "alphas"),
    ("interpolate batch_size -1", lambda: lmc.interpolate(_mlp(), _mlp(), (X, Y), batch_size=-1), ValueError, "batch_size"),
    ("interpolate bn bogus", lambda: lmc.interpolate(_mlp(), _mlp(), (X, Y), bn="nope"), ValueError, "bn"),  # type: ignore[arg-type]
    ("interpolate non-module", lambda: lmc.interpolate(3, _mlp(), (X, Y)), TypeError, "a"),  # type: ignore[arg-type]
    ("to tpu", lambda: Population.from_factory(_mlp, 2).to("tpu"), ValueError, "device"),
    ("load_state_dict of something else", lambda: Population.from_factory(_mlp, 2).load_state_dict({}), ValueError, "state"),
    ("build_model num_classes 0", lambda: build_model("mlp", (1, 8, 8), 0), ValueError, "num_classes"),
    ("MultipleInitializationsTrainer module", lambda: MultipleInitializationsTrainer(_mlp(), _sgd, num_models=2), TypeError, "model_fn"),
    (
        "MultipleInitializationsTrainer seed -1",
        lambda: MultipleInitializationsTrainer(_mlp, _sgd, num_models=2, seed=-1),
        ValueError,
        "seed",
    ),
    ("evaluate batches not pairs", lambda: engine.evaluate(Population.from_factory(_mlp, 2), [1, 2, 3]), TypeError, "(x, y) pairs"),
    ("interpolate batches not pairs", lambda: lmc.interpolate(_mlp(), _mlp(), [1, 2, 3]), TypeError, "(x, y) pairs"),
    ("fit train_data None", lambda: _trainer().fit(None, (X, Y), steps=2), TypeError, "train data"),
    ("interpolate alphas 0", lambda: lmc.interpolate(_mlp(), _mlp(), (X, Y), alphas=0), ValueError, "alphas"),
    (
        "shrink_perturb lam -1",
        lambda: Population.from_factory(_mlp, 2).shrink_perturb(lam=-1.0, sigma=0.1, model_fn=_mlp),
        ValueError,
        "lam",
    ),
    ("member -1", lambda: Population.from_factory(_mlp, 2).member(-1), ValueError, "[0, 1]"),
    (
        "set_hparam label_smoothing 2",
        lambda: _trainer_with(loss_hparams={"label_smoothing": 0.1}).set_hparam("label_smoothing", 2.0),
        ValueError,
        "label_smoothing",
    ),
    ("interpolate y out of range", lambda: lmc.interpolate(_mlp(), _mlp(), (X, torch.full((8,), 12))), ValueError, "y"),
]
if not CUDA:
    API_CASES.append(("device cuda without CUDA", lambda: Population.from_factory(_mlp, 2, device="cuda"), ValueError, "CUDA"))


def run_api(call: Callable[[], Any]) -> tuple[str, BaseException | None]:
    """``(outcome, exception)``: raised (a one-line popvec error) or accepted; the caller judges the type."""
    try:
        call()
    except Exception as err:  # noqa: BLE001 - the audit looks at every exception
        return "raised", err
    return "accepted", None


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    make_files(tmp)
    return tmp


def _cli_ids() -> list[str]:
    return [" ".join(argv[:4]) for argv, _ in CLI_CASES]


@pytest.mark.parametrize(("argv", "fragment"), CLI_CASES, ids=_cli_ids())
def test_bad_cli_input_is_one_line_exit_2(
    argv: list[str], fragment: str, files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_thread: None
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = _fill(argv, files)
    if "--out" not in argv and "--resume" not in argv:
        argv = [*argv, "--out", str(tmp_path / "run")]
    if "cuda" in " ".join(argv) and CUDA:
        pytest.skip("needs a machine without that device")
    outcome, code, text = run_cli(argv)
    assert outcome == "one-line", f"{outcome}: {text}"
    assert code == 2, text
    assert fragment in text, text
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("name", "call", "error", "fragment"), API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_call_raises_one_line(
    name: str, call: Callable[[], Any], error: type[BaseException], fragment: str, single_thread: None
) -> None:
    with pytest.raises(error) as exc:
        call()
    message = str(exc.value)
    assert fragment in message, message
    assert "\n" not in message.strip(), message


def test_model_probe_leaves_the_global_rng_alone() -> None:
    """The startup probe of --model builds a model: --seed must draw the same numbers with or without it."""
    data = load_dataset("digits")
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    common.check_model_fits(model_factory("mlp", data.input_shape, data.num_classes), data, "mlp")
    assert torch.equal(torch.rand(4), expected)


def test_labels_are_checked_over_the_whole_first_batch_not_only_the_probed_samples() -> None:
    y = Y.clone()
    y[-1] = 10  # past the samples the vmap preflight runs on
    with pytest.raises(ValueError, match=r"y must hold class labels in \[0, 9\].*got \d+\.\.10$"):
        _trainer().step(X, y)


def test_a_bad_input_leaves_the_population_untouched() -> None:
    trainer = _trainer()
    before = {k: v.clone() for k, v in trainer.population.params.items()}
    with pytest.raises(ValueError):
        trainer.step(X, torch.full((8,), -1))
    assert all(torch.equal(before[k], v) for k, v in trainer.population.params.items())
    assert trainer.global_step == 0


class _Casting(nn.Module):
    """Casts its input itself: float64 x is fine for it, so dtype is judged by the forward, not up front."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.float().flatten(1))


def test_an_input_the_model_can_take_is_not_refused(single_thread: None) -> None:
    trainer = _trainer(model_fn=_Casting)
    losses = trainer.step(X.double(), Y)
    assert losses.shape == (3,) and bool(torch.isfinite(losses).all())
    assert trainer.evaluate(X.double(), Y)["loss"].shape == (3,)


# --------------------------------------------------------------------------- the audit
def audit() -> int:
    """Run every case and print one row each: raw tracebacks, multi-line errors, accepted inputs."""
    import tempfile

    torch.set_num_threads(1)
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        make_files(tmp)
        for i, (argv, fragment) in enumerate(CLI_CASES):
            filled = _fill(argv, tmp)
            if "--out" not in filled and "--resume" not in filled:
                filled = [*filled, "--out", str(tmp / f"run{i}")]
            outcome, code, text = run_cli(filled)
            if outcome == "one-line" and (code != 2 or fragment not in text):
                outcome = "unclear"
            counts[f"cli {outcome}"] = counts.get(f"cli {outcome}", 0) + 1
            last = text.strip().splitlines()[-1] if text.strip() else ""
            print(f"CLI {outcome:10} {' '.join(argv)}\n    {last[:200]}")
    for name, call, error, fragment in API_CASES:
        outcome, err = run_api(call)
        if err is not None:
            one = "\n" not in str(err).strip()
            outcome = "one-line" if isinstance(err, error) and fragment in str(err) and one else "traceback"
        counts[f"api {outcome}"] = counts.get(f"api {outcome}", 0) + 1
        shown = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200] if str(err).strip() else ''}" if err else ""
        print(f"API {outcome:10} {name}\n    {shown}")
    print(f"{len(CLI_CASES)} CLI cases, {len(API_CASES)} API cases:", dict(sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(audit())
