"""GPU-only checks: the CUDA-graph step equals the eager step (skipped without CUDA)."""

import pytest
import torch
from torch import nn

import popvec
from popvec import Population
from popvec.engine import TrainStep
from popvec.precision import LossScaler

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def small_cnn() -> nn.Module:
    # No conv bias before BatchNorm: its true gradient is exactly 0, and Adam would turn the
    # rounding noise of two different reduction orders into full-size steps of either sign.
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 10)
    )


OPTIMIZERS = {
    "sgd": lambda pop: popvec.optim.SGD(pop, lr=[0.05, 0.1, 0.0, 0.02], momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam_clip": lambda pop: popvec.optim.Adam(pop, lr=[1e-3, 2e-3, 3e-3, 0.0], max_grad_norm=0.5),
    "adamw_schedule": lambda pop: popvec.optim.AdamW(
        pop, lr=1e-2, weight_decay=0.01, schedule=popvec.schedules.warmup(3, popvec.schedules.cosine(20))
    ),
    "adam_per_member_betas": lambda pop: popvec.optim.Adam(pop, lr=1e-3, betas=([0.9, 0.8, 0.95, 0.9], 0.999)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("per_member", [False, True])
def test_cuda_graph_step_equals_eager(name: str, per_member: bool) -> None:
    runs = {}
    for graph in (False, True):
        pop = Population.from_factory(small_cnn, 4, seed=0, device="cuda")
        opt = OPTIMIZERS[name](pop)
        step = TrainStep(pop, opt, cuda_graph=graph)
        gen = torch.Generator(device="cuda").manual_seed(0)
        losses = []
        for i in range(16):
            shape = (4, 8) if per_member else (8,)
            x = torch.randn(*shape, 1, 8, 8, device="cuda", generator=gen)
            y = torch.randint(0, 10, shape, device="cuda", generator=gen)
            losses.append(step(x, y, per_member=per_member))
            if i == 7:  # selection changes every stacked tensor: the graph must be recorded again
                pop.select([2, 0, 0, 3])
                opt.select([2, 0, 0, 3])
        runs[graph] = (pop, torch.stack(losses))
    (eager, eager_losses), (graphed, graph_losses) = runs[False], runs[True]
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for k in eager.params:
        torch.testing.assert_close(graphed.params[k], eager.params[k], rtol=1e-5, atol=1e-6)
    for k in eager.buffers:
        torch.testing.assert_close(graphed.buffers[k], eager.buffers[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_cuda_population_equals_models_trained_alone(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The central equivalence on the GPU (TF32 off so both sides compute in float32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    make = {
        "sgd": (lambda pop: popvec.optim.SGD(pop, lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
        "adam": (lambda pop: popvec.optim.Adam(pop, lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
    }[name]
    pop = Population.from_factory(small_cnn, 3, seed=1, device="cuda")
    trainer = popvec.PopulationTrainer(pop, make[0](pop), progress=False)
    models = []
    for i in range(3):
        torch.manual_seed(1 + i)
        models.append(small_cnn().cuda())
    optimizers = [make[1](m.parameters()) for m in models]
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(20):
        x = torch.randn(16, 1, 8, 8, device="cuda", generator=gen)
        y = torch.randint(0, 10, (16,), device="cuda", generator=gen)
        trainer.step(x, y)
        for model, opt in zip(models, optimizers):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for i, model in enumerate(models):
        for k, v in model.state_dict().items():
            stack = pop.params.get(k, pop.buffers.get(k))
            torch.testing.assert_close(stack[i], v, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- mixed precision on the GPU
@pytest.mark.parametrize("name", ["sgd", "adam_clip"])
def test_cuda_graph_step_in_bf16_equals_eager(name: str) -> None:
    """bf16 autocast runs inside the recorded graph (weight-cast cache off): replays equal eager steps."""
    runs = {}
    for graph in (False, True):
        pop = Population.from_factory(small_cnn, 4, seed=0, device="cuda")
        step = TrainStep(pop, OPTIMIZERS[name](pop), cuda_graph=graph, precision="bf16")
        gen = torch.Generator(device="cuda").manual_seed(0)
        losses = []
        for _ in range(8):
            x = torch.randn(8, 1, 8, 8, device="cuda", generator=gen)
            y = torch.randint(0, 10, (8,), device="cuda", generator=gen)
            losses.append(step(x, y))
        assert (step._graph is not None) == graph
        runs[graph] = (pop, torch.stack(losses))
    (eager, eager_losses), (graphed, graph_losses) = runs[False], runs[True]
    # The same kernels on the same inputs: equal up to nondeterministic reductions (cuDNN), far below bf16's 4e-3.
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-3, atol=1e-3)
    for k in eager.params:
        torch.testing.assert_close(graphed.params[k], eager.params[k], rtol=1e-3, atol=1e-3)


def test_cuda_fp16_population_equals_models_trained_alone_with_grad_scaler() -> None:
    """Per-member loss scaling on the GPU follows torch.amp.GradScaler("cuda") of each member alone."""
    init = {"init_scale": 2.0**20, "growth_interval": 3}  # the first steps overflow and back off, then it grows
    pop = Population.from_factory(small_cnn, 3, seed=1, device="cuda")
    start = {k: v.clone() for k, v in pop.params.items()}
    opt = popvec.optim.SGD(pop, lr=0.05, momentum=0.9)
    scaler = LossScaler(3, "cuda", **init)
    step = TrainStep(pop, opt, precision="fp16", loss_scaler=scaler)
    models, optimizers, scalers = [], [], []
    for i in range(3):
        torch.manual_seed(1 + i)
        models.append(small_cnn().cuda())
        optimizers.append(torch.optim.SGD(models[-1].parameters(), lr=0.05, momentum=0.9))
        scalers.append(torch.amp.GradScaler("cuda", **init))
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(20):
        x = torch.randn(16, 1, 8, 8, device="cuda", generator=gen)
        y = torch.randint(0, 10, (16,), device="cuda", generator=gen)
        step(x, y)
        for model, opt_i, scaler_i in zip(models, optimizers, scalers):
            opt_i.zero_grad()
            with torch.autocast("cuda", torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler_i.scale(loss).backward()
            scaler_i.step(opt_i)
            scaler_i.update()
    assert not step._graphs_enabled(x)  # fp16 loss scaling runs eagerly
    for i, (model, scaler_i) in enumerate(zip(models, scalers)):
        assert float(scaler.scale[i]) == scaler_i.get_scale()
        names = [k for k, _ in model.named_parameters()]
        mine = torch.cat([pop.params[k][i].flatten() for k in names])
        ref = torch.cat([model.get_parameter(k).detach().flatten() for k in names])
        moved = torch.cat([start[k][i].flatten() for k in names])
        assert float((mine - ref).norm() / (ref - moved).norm()) <= 0.15  # as on the CPU (tests/test_precision.py)


def test_cuda_fp16_overflow_of_one_member_leaves_the_others_bit_identical() -> None:
    def run(scale_of_member_1: float | None) -> tuple[Population, LossScaler]:
        mlp = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # noqa: E731
        pop = Population.from_factory(mlp, 4, seed=0, device="cuda")
        scaler = LossScaler(4, "cuda", init_scale=2.0**10)
        if scale_of_member_1 is not None:
            scaler.set_scale(scale_of_member_1, [1])
        step = TrainStep(pop, popvec.optim.Adam(pop, lr=1e-2), precision="fp16", loss_scaler=scaler)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(5):
            step(torch.randn(16, 1, 8, 8, device="cuda", generator=gen), torch.randint(0, 10, (16,), device="cuda", generator=gen))
        return pop, scaler

    (clean, clean_scaler), (pop, scaler) = run(None), run(2.0**100)
    for k in pop.params:
        assert torch.equal(pop.params[k][[0, 2, 3]], clean.params[k][[0, 2, 3]]), k
    assert torch.equal(scaler.scale[[0, 2, 3]], clean_scaler.scale[[0, 2, 3]])
    assert float(scaler.scale[1]) == 2.0**95
