"""The memory preflight: exact resident bytes, activations that scale with the batch, refusals
whose suggested sizes fit by the same estimate, and commands that refuse in one line (exit 2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from popvec import memory, optim
from popvec.cli.main import main
from popvec.data import load_dataset
from popvec.models import build_model, required_image_size
from popvec.population import Population
from popvec.studies import lmc
from popvec.trainer import MultipleInitializationsTrainer

GIB = 2**30


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def nbytes(tensors) -> int:  # type: ignore[no-untyped-def]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Every device reports ``free[0]`` bytes free (8 GiB unless a test changes it)."""
    free = [8 * GIB]
    monkeypatch.setattr(memory, "available_bytes", lambda device: free[0])
    monkeypatch.delenv(memory.ENV_SWITCH, raising=False)
    return free


# --------------------------------------------------------------------------- the estimate
@pytest.mark.parametrize(("name", "slots"), [("sgd", 1), ("adam", 2), ("adamw", 2)])
def test_resident_bytes_are_exact_and_match_the_stacked_population(name: str, slots: int) -> None:
    torch.manual_seed(0)
    model = small_net()
    est = memory.probe_member(model, optimizer_slots=memory.optimizer_slots(name))
    params = nbytes(model.parameters())
    assert est.params == params == est.grads == est.workspace
    assert est.optimizer == slots * params
    assert est.buffers == nbytes(model.buffers())  # running stats float32 + num_batches_tracked int64
    assert est.activations == 0  # no batch given
    n = 5
    pop = Population.from_factory(small_net, n)
    opt = optim.make(name, pop)
    assert nbytes(pop.params.values()) == n * est.params
    assert nbytes(pop.buffers.values()) == n * est.buffers
    assert sum(nbytes(d.values()) for d in opt.state.values()) == n * est.optimizer  # type: ignore[attr-defined]


def test_optimizer_slots_come_from_the_rule() -> None:
    pop = Population.from_factory(small_net, 2)
    assert memory.optimizer_slots(optim.SGD(pop, momentum=0.9)) == 1
    assert memory.optimizer_slots(optim.Adam(pop)) == 2
    assert not hasattr(optim.TorchOptimizer, "state_names")  # a torch.optim adapter: its state comes at its first step
    assert memory.optimizer_slots(object()) == memory.TORCH_OPTIMIZER_SLOTS


def test_activations_are_positive_and_scale_with_the_batch() -> None:
    model = tiny_cnn()
    sizes = {}
    for b in (32, 64, 128):
        x, y = torch.randn(b, 1, 8, 8), torch.randint(0, 10, (b,))
        sizes[b] = memory.probe_member(model, x, y, F.cross_entropy, x_eval=x).activations
    assert sizes[32] > 0
    assert sizes[64] / sizes[32] == pytest.approx(2.0, rel=0.05)
    assert sizes[128] / sizes[64] == pytest.approx(2.0, rel=0.05)
    est = memory.probe_member(model, x, y, F.cross_entropy, x_eval=torch.randn(256, 1, 8, 8))
    assert est.eval_activations == 2 * 256 * 8 * 8 * 8 * 4  # the conv's output, twice
    assert model.training  # left as found


def test_probe_leaves_the_rng_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    x, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    memory.probe_member(model, x, y, F.cross_entropy)
    assert torch.equal(torch.random.get_rng_state(), before)


@given(
    resident=st.integers(1, 10**7),
    act=st.integers(0, 10**8),
    ev=st.integers(0, 10**8),
    fixed=st.integers(0, 10**9),
    limit=st.integers(0, 10**13),
    chunk=st.one_of(st.none(), st.integers(1, 64)),
)
def test_max_members_and_max_chunk_are_the_largest_that_fit(resident, act, ev, fixed, limit, chunk) -> None:  # type: ignore[no-untyped-def]
    est = memory.MemoryEstimate(params=resident, activations=act, eval_activations=ev, fixed=fixed)
    m = est.max_members(limit, chunk)
    if m > 0:
        assert est.total(m, chunk) <= limit
    assert est.total(m + 1, chunk) > limit
    n = m + 3
    c = est.max_chunk(limit, n)
    if c > 0:
        assert est.total(n, c) <= limit
        assert c == n or est.total(n, c + 1) > limit
    else:
        assert est.total(n, 1) > limit


# --------------------------------------------------------------------------- the check
def test_check_fits_names_the_numbers_and_a_size_that_fits() -> None:
    est = memory.MemoryEstimate(params=1000, grads=1000, optimizer=2000, activations=50_000)
    n, free = 1000, 10**7
    budget = int(free * memory.SAFETY_FRACTION)
    with pytest.raises(memory.PopulationTooLarge) as info:
        memory.check_fits(est, n, "cpu", what="--num-models 1000", chunk_flag="--member-chunk-size", limit=free)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--num-models 1000: needs about")
    assert memory.format_bytes(est.total(n)) in message and memory.format_bytes(free) in message
    fit = int(re.search(r"at most (\d+) fit", message).group(1))  # type: ignore[union-attr]
    assert est.total(fit) <= budget < est.total(fit + 1)
    chunk = int(re.search(r"--member-chunk-size (\d+)", message).group(1))  # type: ignore[union-attr]
    assert est.total(n, chunk) <= budget < est.total(n, chunk + 1)
    memory.check_fits(est, fit, "cpu", limit=free)  # the suggestion passes the same check
    memory.check_fits(est, n, "cpu", member_chunk_size=chunk, limit=free)


def test_no_chunk_is_suggested_when_resident_memory_alone_is_too_much() -> None:
    est = memory.MemoryEstimate(params=10**6, activations=10)
    with pytest.raises(memory.PopulationTooLarge) as info:
        memory.check_fits(est, 1000, "cpu", limit=10**8)
    assert "member_chunk_size" not in str(info.value).split("(set")[0]


def test_unknown_memory_or_the_switch_skip_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    est = memory.MemoryEstimate(params=10**12)
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    memory.check_fits(est, 10, "cpu")
    monkeypatch.setenv(memory.ENV_SWITCH, "0")
    memory.check_fits(est, 10, "cpu", limit=1)


def test_available_bytes(tmp_path: Path) -> None:
    free = memory.available_bytes("cpu")
    assert free is None or free > 0
    assert memory.available_bytes("meta") is None
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       1000 kB\nMemAvailable:    512 kB\n")
    assert memory._meminfo_available(str(fake)) == 512 * 1024
    assert memory._meminfo_available(str(tmp_path / "missing")) is None


# --------------------------------------------------------------------------- where populations are built
def test_from_factory_refuses_after_building_one_member(limit) -> None:  # type: ignore[no-untyped-def]
    built = []

    def model_fn() -> nn.Module:
        built.append(1)
        return nn.Linear(1000, 1000)

    limit[0] = 100 * 2**20  # 100 MiB: about 20 members' modules and stacks
    with pytest.raises(memory.PopulationTooLarge, match=r"^n=100000 .* at most \d+ fit"):
        Population.from_factory(model_fn, 100_000)
    assert len(built) == 1
    assert Population.from_factory(model_fn, 3, memory_check=False).n == 3


def test_from_factory_is_unchanged_by_the_check() -> None:
    a = Population.from_factory(small_net, 3, seed=5)
    b = Population.from_factory(small_net, 3, seed=5, memory_check=False)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_trainer_refuses_num_models_before_building(limit) -> None:  # type: ignore[no-untyped-def]
    from popvec.data import TensorSplit
    from popvec.loaders import DeviceLoader

    split = TensorSplit(torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,)))
    trainer = MultipleInitializationsTrainer(
        tiny_cnn, lambda p: torch.optim.Adam(p, lr=1e-3), num_models=100_000, device="cpu", progress=False
    )
    limit[0] = GIB
    with pytest.raises(memory.PopulationTooLarge, match=r"^num_models=100000: needs about .* at most \d+ fit"):
        trainer.train(DeviceLoader(split, 64), split, num_epochs=1)
    assert trainer.trainer is None  # nothing was built
    limit[0] = 2**50
    est = trainer.check_memory(DeviceLoader(split, 64), split)
    assert est is not None and est.activations > 0 and est.eval_activations > 0 and est.optimizer == 2 * est.params


def test_interpolate_refuses_alphas_that_cannot_fit(limit) -> None:  # type: ignore[no-untyped-def]
    a, b = tiny_cnn(), tiny_cnn()
    data = (torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    limit[0] = 50 * 2**20
    with pytest.raises(memory.PopulationTooLarge, match=r"^alphas=100000: .* at most \d+ fit"):
        lmc.interpolate(a, b, data, alphas=100_000)
    assert lmc.interpolate(a, b, data, alphas=5).loss.shape == (5,)


# --------------------------------------------------------------------------- the commands
def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_train_refuses_num_models_in_one_line(limit, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    err = _refused(capsys, ["train", "--num-models", "100000", "--device", "cpu", "--out", str(out)])
    assert err.startswith("popvec train: error: --num-models 100000: needs about")
    assert "at most" in err and "POPVEC_MEMORY_CHECK=0" in err
    assert not out.exists()  # refused before the run folder


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["pbt", "--num-models", "100000"], "--num-models 100000"),
        (["hyperband", "--max-t", "100000"], "--max-t 100000"),
        (["instability", "--copies", "50000"], "--copies 50000"),
        (["warmstart", "--replicates", "50000"], "--replicates 50000"),
    ],
)
def test_every_training_command_refuses_its_size(limit, tmp_path: Path, capsys, argv, flag) -> None:  # type: ignore[no-untyped-def]
    err = _refused(capsys, [*argv, "--device", "cpu", "--out", str(tmp_path / "run")])
    assert f"error: {flag}" in err
    assert not (tmp_path / "run").exists()


def test_lmc_refuses_alphas_in_one_line(limit, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    data = load_dataset("digits", "./data", False, image_size=required_image_size("lenet5"))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}.pt"
        torch.save(build_model("lenet5", data.input_shape, data.num_classes).state_dict(), path)
        paths.append(str(path))
    limit[0] = GIB
    err = _refused(capsys, ["lmc", *paths, "--alphas", "100000", "--device", "cpu", "--out", str(tmp_path / "lmc")])
    assert err.startswith("popvec lmc: error: --alphas 100000: needs about")
    assert "at most" in err
    assert not (tmp_path / "lmc").exists()


# --------------------------------------------------------------------------- against reality
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_estimate_is_in_the_ballpark_of_cuda_peak_memory() -> None:
    device = torch.device("cuda")
    x, y = torch.randn(64, 1, 8, 8, device=device), torch.randint(0, 10, (64,), device=device)
    x_eval = torch.randn(512, 1, 8, 8, device=device)
    n = 256
    est = memory.preflight_training(tiny_cnn, n, device, "adam", x, y, F.cross_entropy, x_eval=x_eval)
    assert est is not None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    pop = Population.from_factory(tiny_cnn, n, device=device)
    from popvec.trainer import PopulationTrainer

    trainer = PopulationTrainer(pop, optim.Adam(pop), callbacks=[])
    for _ in range(2):
        trainer.step(x, y)
    trainer.evaluate(x_eval, torch.randint(0, 10, (512,), device=device))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert 0.5 < peak / est.total(n) < 2.0, (peak, est.describe(n))


class _DoublesItsInput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mul_(2))


def test_probe_leaves_the_callers_data_alone() -> None:
    """A forward that modifies its input in place must not change the batch the probe was given."""
    x, x_eval = torch.ones(5, 4), torch.ones(7, 4)
    memory.probe_member(_DoublesItsInput(), x, torch.zeros(5, dtype=torch.long), torch.nn.functional.cross_entropy, x_eval=x_eval)
    assert torch.equal(x, torch.ones(5, 4)) and torch.equal(x_eval, torch.ones(7, 4))
