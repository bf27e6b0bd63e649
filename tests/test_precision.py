"""Mixed precision: a bf16/fp16 population equals each member trained alone under ``torch.autocast``
(with ``torch.amp.GradScaler`` for fp16), per-member loss scaling isolates an overflowing member, the
scales are per-member state, and the fp32 path enters no autocast at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import IN_SHAPE, MODEL_FNS, NUM_CLASSES, make_batches, reference_model
from torch import Tensor, nn

import popvec.precision
from popvec import Population, PopulationTrainer, optim
from popvec.data import TensorSplit
from popvec.engine import TrainStep, evaluate
from popvec.loaders import DeviceLoader
from popvec.precision import LossScaler

pytestmark = pytest.mark.usefixtures("single_thread")

N = 3
SEED = 7
STEPS = 20
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_fp16_autocast() -> bool:
    """Whether this torch build autocasts to float16 on the CPU and has ``GradScaler("cpu")`` (torch 2.14: yes)."""
    try:
        with torch.autocast("cpu", torch.float16):  # an unsupported dtype warns and disables autocast
            out = F.linear(torch.ones(2, 2), torch.ones(2, 2))
        torch.amp.GradScaler("cpu")
    except (RuntimeError, TypeError, ValueError):
        return False
    return out.dtype == torch.float16


FP16 = pytest.mark.skipif(not cpu_fp16_autocast(), reason="this torch build has no float16 autocast on the CPU")
PRECISIONS = ["bf16", pytest.param("fp16", marks=FP16)]

# How close a member must be to the same member trained alone: the norm of the difference of all
# its parameters after 20 steps, relative to how far training moved them (the norm of the update).
# Both sides round to the low precision at different places (the vmapped step runs grouped
# convolutions and batched matmuls where the loop runs one model's; normalization layers get
# float32 inputs, see popvec.precision), so now and then a ReLU unit or the sign of a tiny Adam
# step flips at some step and the runs drift apart by about one step's size. Measured worst over
# 3 members x 3 models x 2 optimizers: bf16 (8 significant bits) 5.3%, fp16 (11 bits, and the
# same skipped steps) 3.6%; allowed 15%. A missing unscale, a wrong scale or another member's batch
# moves a member by 100% or more. Losses (each step's, absolute): measured worst bf16 4.3e-3, fp16 1.8e-3.
REL_TOL = 0.15
LOSS_ATOL = {"bf16": 2e-2, "fp16": 1e-2}

OPTIMIZERS: dict[str, tuple[Callable[[Population], Any], Callable[[Any], torch.optim.Optimizer]]] = {
    "sgd": (lambda pop: optim.SGD(pop, lr=0.05, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    "adam": (lambda pop: optim.Adam(pop, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
}


class TinyLN(nn.Module):
    """64 -> 16 -> LayerNorm -> 3: a normalization layer whose backward under vmap needs the float32 input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(torch.flatten(x, 1)))))


MODELS = {**MODEL_FNS, "layernorm": TinyLN}


def train_alone(
    model_fn: Callable[[], nn.Module],
    seed: int,
    opt_fn: Callable[[Any], torch.optim.Optimizer],
    batches: list[tuple[Tensor, Tensor]],
    precision: str,
    scaler_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, list[float], float | None, int]:
    """One model under ``torch.autocast`` (+ GradScaler for fp16): model, losses, final scale, optimizer steps taken."""
    model = reference_model(model_fn, seed)
    opt = opt_fn(model.parameters())
    scaler = torch.amp.GradScaler("cpu", **(scaler_kwargs or {})) if precision == "fp16" else None
    losses, taken = [], 0
    for x, y in batches:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", DTYPES[precision]):
            loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        if scaler is None:
            loss.backward()
            opt.step()
            taken += 1
        else:
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            taken += int(scaler.get_scale() >= before)  # a skipped step is the one that backed the scale off
    return model, losses, (scaler.get_scale() if scaler is not None else None), taken


def relative_difference(pop: Population, i: int, model: nn.Module, initial: Population) -> float:
    """||member i - model|| / ||model - member i at the start||, over all parameters together."""
    names = [k for k, _ in model.named_parameters()]
    mine = torch.cat([pop.params[k][i].flatten() for k in names])
    ref = torch.cat([model.get_parameter(k).detach().flatten() for k in names])
    start = torch.cat([initial.params[k][i].flatten() for k in names])
    return float((mine - ref).norm() / (ref - start).norm())


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_population_equals_members_trained_alone_under_autocast(precision: str, model_name: str, opt_name: str) -> None:
    model_fn = MODELS[model_name]
    make_opt, opt_fn = OPTIMIZERS[opt_name]
    # fp16: start at 2**20, where this loss overflows, so the first steps are skipped and the scale
    # backs off; growth_interval=3 then grows it again: every branch of GradScaler's rule runs.
    scaler_kwargs = {"init_scale": 2.0**20, "growth_interval": 3}
    pop = Population.from_factory(model_fn, N, SEED)
    initial = Population.from_factory(model_fn, N, SEED)
    opt = make_opt(pop)
    scaler = LossScaler(N, **scaler_kwargs) if precision == "fp16" else None
    step = TrainStep(pop, opt, precision=precision, loss_scaler=scaler)
    batches = make_batches(STEPS)
    losses = torch.stack([step(x, y) for x, y in batches])
    for i in range(N):
        model, ref_losses, ref_scale, taken = train_alone(model_fn, SEED + i, opt_fn, batches, precision, scaler_kwargs)
        assert relative_difference(pop, i, model, initial) <= REL_TOL
        for name, buf in model.named_buffers():  # BatchNorm statistics (and num_batches_tracked exactly)
            if buf.is_floating_point():
                torch.testing.assert_close(pop.buffers[name][i], buf, rtol=0.05, atol=0.05)
            else:
                assert torch.equal(pop.buffers[name][i], buf)
        torch.testing.assert_close(losses[:, i], torch.tensor(ref_losses), rtol=0, atol=LOSS_ATOL[precision])
        if scaler is not None:
            assert float(scaler.scale[i]) == ref_scale  # the same overflows, the same backoffs and growths
            assert 0 < taken < STEPS
            if opt_name == "adam":  # a skipped step leaves the step count (Adam's bias correction) as it was
                assert int(opt.steps[i]) == taken
    # autocast really ran: the float32 run of the same members differs
    pop32 = Population.from_factory(model_fn, N, SEED)
    step32 = TrainStep(pop32, make_opt(pop32))
    for x, y in batches:
        step32(x, y)
    assert any(not torch.equal(pop32.params[k], pop.params[k]) for k in pop.params)


def overflow_run(scale_of_member_1: float | None, steps: int = 6) -> tuple[Population, Any, LossScaler, list[Tensor]]:
    pop = Population.from_factory(MODEL_FNS["cnn_bn"], 4, SEED)
    opt = optim.Adam(pop, lr=1e-2)
    scaler = LossScaler(4, init_scale=2.0**10)
    if scale_of_member_1 is not None:
        scaler.set_scale(scale_of_member_1, [1])
    step = TrainStep(pop, opt, precision="fp16", loss_scaler=scaler)
    losses = [step(x, y) for x, y in make_batches(steps)]
    return pop, opt, scaler, losses


@FP16
def test_an_overflowing_member_skips_only_its_own_step_and_halves_only_its_scale() -> None:
    initial = Population.from_factory(MODEL_FNS["cnn_bn"], 4, SEED)
    clean_pop, clean_opt, clean_scaler, clean_losses = overflow_run(None)
    pop, opt, scaler, losses = overflow_run(2.0**100)  # member 1's scaled gradients overflow fp16 at every step
    others = [0, 2, 3]
    for k in pop.params:
        assert torch.equal(pop.params[k][others], clean_pop.params[k][others]), k
        assert torch.equal(pop.params[k][1], initial.params[k][1]), k  # never updated
    for s in opt.state:
        for k in opt.state[s]:
            assert torch.equal(opt.state[s][k][others], clean_opt.state[s][k][others])
            assert not bool(opt.state[s][k][1].any())
    assert opt.steps.tolist() == [6.0, 0.0, 6.0, 6.0]  # its step count did not move
    assert torch.equal(scaler.scale[others], clean_scaler.scale[others])
    assert float(scaler.scale[1]) == 2.0**94  # halved once per skipped step, the others' untouched
    assert torch.equal(torch.stack(losses)[:, others], torch.stack(clean_losses)[:, others])
    # the loss reported is the unscaled one: at step 1 member 1 is where the clean run's member 1 is
    assert torch.equal(losses[0][1], clean_losses[0][1])
    assert bool(torch.isfinite(torch.stack(losses)).all())


@FP16
def test_a_skipped_member_is_not_marked_diverged(tmp_path: Path) -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], 3, SEED)
    trainer = PopulationTrainer(pop, optim.Adam(pop, lr=1e-2), precision="fp16", progress=False, callbacks=[])
    assert trainer.state.loss_scaler is not None
    trainer.state.loss_scaler.set_scale(2.0**100, [2])
    x = torch.randn(64, *IN_SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, NUM_CLASSES, (64,), generator=torch.Generator().manual_seed(1))
    trainer.fit(DeviceLoader(TensorSplit(x, y), 16, seed=0), (x, y), steps=8)
    assert not bool(trainer.check_divergence().any())
    assert trainer.history["diverged"] == {}
    assert float(trainer.state.loss_scaler.scale[2]) == 2.0**92
    assert trainer.optimizer.steps.tolist() == [8.0, 8.0, 0.0]  # type: ignore[attr-defined]


def fp16_trainer(scales: list[float]) -> PopulationTrainer:
    pop = Population.from_factory(MODEL_FNS["cnn_bn"], len(scales), SEED)
    trainer = PopulationTrainer(pop, optim.Adam(pop, lr=1e-2), precision="fp16", progress=False, callbacks=[])
    assert trainer.state.loss_scaler is not None
    trainer.state.loss_scaler.set_scale(torch.tensor(scales))
    return trainer


def test_scales_follow_select_take_and_state_dict(tmp_path: Path) -> None:
    trainer = fp16_trainer([2.0**3, 2.0**5, 2.0**7])
    scaler = trainer.state.loss_scaler
    assert scaler is not None
    scaler.growth_tracker = torch.tensor([1, 2, 3], dtype=torch.int32)
    taken = trainer.state.take([2, 0])
    assert taken.loss_scaler is not None and taken.loss_scaler is not scaler
    assert taken.loss_scaler.scale.tolist() == [2.0**7, 2.0**3]
    assert taken.loss_scaler.growth_tracker.tolist() == [3, 1]
    trainer.select([1, 1, 0])
    assert scaler.scale.tolist() == [2.0**5, 2.0**5, 2.0**3]  # the step's scaler is the state's: it followed
    assert trainer._train_step.loss_scaler is scaler
    assert scaler.growth_tracker.tolist() == [2, 2, 1]
    assert scaler.scale.tolist() == [2.0**5, 2.0**5, 2.0**3]
    trainer.save_checkpoint(tmp_path / "c.pt")
    restored = fp16_trainer([1.0, 1.0, 1.0])  # fresh scales, same starting N: the checkpoint's come back
    restored.load_checkpoint(tmp_path / "c.pt")
    assert restored.state.loss_scaler is not None
    assert restored.state.loss_scaler.scale.tolist() == [2.0**5, 2.0**5, 2.0**3]
    assert restored.state.loss_scaler.growth_tracker.tolist() == [2, 2, 1]
    assert restored._train_step.loss_scaler is restored.state.loss_scaler


@FP16
def test_resumed_fp16_run_continues_exactly(tmp_path: Path) -> None:
    x = torch.randn(96, *IN_SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, NUM_CLASSES, (96,), generator=torch.Generator().manual_seed(1))

    def run(steps: int, resume: bool = False) -> PopulationTrainer:
        trainer = fp16_trainer([2.0**20, 2.0**12, 2.0**16])  # member 0 overflows for its first steps
        assert trainer.state.loss_scaler is not None
        trainer.state.loss_scaler.growth_interval = 2
        if resume:
            trainer.load_checkpoint(tmp_path / "c.pt")
        trainer.fit(DeviceLoader(TensorSplit(x, y), 16, seed=0), (x, y), steps=steps, checkpoint_path=None if resume else tmp_path / "c.pt")
        return trainer

    full = run(12)
    run(6)
    resumed = run(12, resume=True)
    for k in full.population.params:
        assert torch.equal(resumed.population.params[k], full.population.params[k])
    assert full.state.loss_scaler is not None and resumed.state.loss_scaler is not None
    assert torch.equal(resumed.state.loss_scaler.scale, full.state.loss_scaler.scale)
    assert torch.equal(resumed.optimizer.steps, full.optimizer.steps)  # type: ignore[attr-defined]
    assert full.optimizer.steps[0] < 12  # type: ignore[attr-defined]  # member 0 did skip


def test_fp32_enters_no_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("autocast entered on the fp32 path")

    monkeypatch.setattr(popvec.precision.torch, "autocast", refuse)
    monkeypatch.setattr(popvec.precision, "autocast", refuse)
    pop = Population.from_factory(MODEL_FNS["cnn_bn"], N, SEED)
    trainer = PopulationTrainer(pop, optim.Adam(pop, lr=1e-2), progress=False, callbacks=[])
    assert trainer.state.loss_scaler is None and trainer._train_step.loss_scaler is None
    for x, y in make_batches(3):
        trainer.step(x, y)
    trainer.evaluate(make_batches(1)[0])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_evaluate_under_autocast_matches_a_model_evaluated_alone(precision: str) -> None:
    pop = Population.from_factory(MODEL_FNS["cnn_bn"], N, SEED)
    x, y = make_batches(1, batch=64)[0]
    metrics = evaluate(pop, (x, y), precision=precision)
    for i in range(N):
        model = pop.member(i).eval()
        with torch.no_grad(), torch.autocast("cpu", DTYPES[precision]):
            loss = F.cross_entropy(model(x), y)
        assert abs(float(metrics["loss"][i]) - float(loss)) <= LOSS_ATOL[precision]
    assert metrics["loss"].dtype == torch.float32
    assert pop.training  # the mode is restored


def test_bad_settings_are_refused() -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], N, SEED)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        TrainStep(pop, optim.SGD(pop, lr=0.1), precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        evaluate(pop, make_batches(1)[0], precision="half")
    with pytest.raises(ValueError, match="loss_scaler is used with precision='fp16' only"):
        TrainStep(pop, optim.SGD(pop, lr=0.1), precision="bf16", loss_scaler=LossScaler(N))
    with pytest.raises(ValueError, match="one scale per member"):
        TrainStep(pop, optim.SGD(pop, lr=0.1), precision="fp16", loss_scaler=LossScaler(N + 1))
    with pytest.raises(ValueError, match="cuda_graph=True cannot be used with precision='fp16'"):
        TrainStep(pop, optim.SGD(pop, lr=0.1), precision="fp16", cuda_graph=True)
    with pytest.raises(ValueError, match="precision='fp16' skips an overflowing member's update with a step mask, but torch.optim.Adam"):
        TrainStep(pop, optim.from_torch(pop, lambda ps: torch.optim.Adam(ps, lr=1e-3)), precision="fp16")
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(N, backoff_factor=1.5)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        LossScaler(N).set_scale(float("inf"), [0])


def test_the_norm_probe_leaves_the_random_stream_alone() -> None:
    popvec.precision.norms_need_float32.cache_clear()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    answers = {p: popvec.precision.norms_need_float32("cpu", p) for p in ("fp32", "bf16", "fp16")}
    assert torch.equal(torch.rand(3), expected)
    assert answers["fp32"] is False  # (bf16/fp16: whatever this torch build needs; the models with norms train either way)


def test_fp16_runs_the_per_member_update_so_a_skip_changes_no_other_member() -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], N, SEED)
    opt = optim.Adam(pop, lr=1e-2)
    assert opt.use_fused == hasattr(torch, "_fused_adam_")
    TrainStep(pop, opt, precision="fp16")
    assert not opt.use_fused


# ---------------------------------------------------------------------------- studies and the command line
def test_lmc_curve_under_bf16_is_close_to_fp32_and_skips_the_fp32_shortcut() -> None:
    from popvec.studies import lmc

    pop = Population.from_factory(MODEL_FNS["cnn_bn"], 2, SEED)
    a, b = pop.member(0), pop.member(1)
    data = make_batches(1, batch=64)[0]
    curves = {p: lmc.interpolate(a, b, data, 5, bn_data=data, precision=p) for p in ("fp32", "bf16")}
    torch.testing.assert_close(curves["bf16"].loss, curves["fp32"].loss, rtol=0, atol=LOSS_ATOL["bf16"])
    assert curves["bf16"].shortcut is False  # (fp32 may take the shortcut or, timed faster, one network at a time)


@FP16
def test_instability_trains_its_trunk_and_copies_in_the_precision_given() -> None:
    from popvec.studies import lmc

    x = torch.randn(64, *IN_SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, NUM_CLASSES, (64,), generator=torch.Generator().manual_seed(1))
    runs = {
        p: lmc.instability(MODEL_FNS["mlp"], lambda pop: optim.SGD(pop, lr=0.1), (x, y), [0, 2], 3, batch_size=16, alphas=3, precision=p)
        for p in ("fp32", "fp16")
    }
    half, full = runs["fp16"].branches.params["fc1.weight"], runs["fp32"].branches.params["fc1.weight"]
    assert half.shape[0] == 4
    assert not torch.equal(half, full)  # trained under autocast
    torch.testing.assert_close(half, full, rtol=0, atol=1e-2)
    assert bool(torch.isfinite(runs["fp16"].loss_barrier).all())


COMMANDS = ["train", "hyperband", "pbt", "instability", "warmstart", "lmc"]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_takes_precision_and_refuses_a_bad_one(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from popvec import cli

    positional = ["a.pt", "b.pt"] if name == "lmc" else []
    parsed = cli.build_parser().parse_args([name, *positional, "--precision", "bf16"])
    assert parsed.precision == "bf16"
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli.main([name, *positional, "--precision", "fp8", "--out", str(out)])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--precision" in lines[0] and "fp32, bf16, fp16" in lines[0].replace("'", "")
    assert not out.exists()


def test_a_config_json_saved_before_precision_existed_resumes_in_fp32(tmp_path: Path) -> None:
    import json

    from popvec.cli import flags
    from popvec.cli.train import TrainConfig

    data = flags.as_dict(TrainConfig(precision="bf16"))
    assert data["precision"] == "bf16"
    del data["precision"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert flags.from_json(TrainConfig, tmp_path / "config.json").precision == "fp32"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_popvec_train_in_mixed_precision(precision: str, tmp_path: Path) -> None:
    import json

    from rich.console import Console

    from popvec.cli.train import TrainConfig, run

    out = tmp_path / "run"
    tiny = {"num_models": 3, "num_elim_steps": 5, "epochs": 1, "batch_size": 64, "model": "mlp", "no_progress": True}
    config = TrainConfig(**tiny, device="cpu", out=str(out), precision=precision)
    assert run(config, Console(quiet=True)) == 0
    assert json.loads((out / "config.json").read_text())["precision"] == precision
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.5  # digits: a few dozen steps of an MLP, in bf16/fp16 as in fp32


def test_loss_scaler_rule_per_member() -> None:
    scaler = LossScaler(3, init_scale=8.0, growth_interval=2)
    scaler.update(torch.tensor([False, True, True]), mask=torch.tensor([True, True, False]))
    assert scaler.scale.tolist() == [4.0, 8.0, 8.0] and scaler.growth_tracker.tolist() == [0, 1, 0]  # member 2 not trained
    scaler.update(torch.tensor([True, True, True]))
    assert scaler.scale.tolist() == [4.0, 16.0, 8.0] and scaler.growth_tracker.tolist() == [1, 0, 1]
    big = LossScaler(1, init_scale=2.0**127, growth_interval=1)
    big.update(torch.tensor([True]))
    assert big.scale.tolist() == [2.0**127]  # growing would overflow float32: kept, as GradScaler does
    grads, finite = LossScaler(2, init_scale=4.0).unscale({"w": torch.tensor([[2.0, 4.0], [float("inf"), 1.0]])})
    assert finite.tolist() == [True, False] and grads["w"][0].tolist() == [0.5, 1.0]
