"""Population: construction, members as modules, selection, forward, state and dtype."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import MODEL_FNS, TinyMLP, make_batches, reference_model, tiny_cnn, tiny_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from popvec import Population

pytestmark = pytest.mark.usefixtures("single_thread")

N = 4


def snapshot(pop: Population) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in [*pop.params.items(), *pop.buffers.items()]}


def trained(model_name: str, n: int = N, seed: int = 0) -> Population:
    """A population whose members differ, with non-trivial BatchNorm statistics."""
    pop = Population.from_factory(MODEL_FNS[model_name], n, seed=seed)
    x, _ = make_batches(1, n)[0]
    pop.train()
    pop.forward(x, per_member=True)  # updates running stats in train mode
    return pop


# --------------------------------------------------------------------------- construction
@pytest.mark.parametrize("seed", [0, 11])
def test_from_factory_member_equals_seeded_model(model_name: str, seed: int) -> None:
    pop = Population.from_factory(MODEL_FNS[model_name], N, seed=seed)
    assert pop.n == len(pop) == N
    assert pop.ids.tolist() == list(range(N))
    for i in range(N):
        ref = reference_model(MODEL_FNS[model_name], seed + i)
        for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
            stack = pop.params[name] if name in pop.params else pop.buffers[name]
            assert stack.shape == (N, *t.shape)
            assert torch.equal(stack[i], t.detach()), f"member {i} {name}"


def test_from_factory_leaves_global_rng_unchanged() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    Population.from_factory(tiny_cnn, 3, seed=99)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


def test_members_differ() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    w = pop.params["fc1.weight"]
    assert all(not torch.equal(w[0], w[i]) for i in range(1, N))


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_from_factory_bad_n(n: object) -> None:
    with pytest.raises(ValueError, match="n"):
        Population.from_factory(tiny_mlp, n)  # type: ignore[arg-type]


def test_from_factory_n_equals_one() -> None:
    pop = Population.from_factory(tiny_cnn, 1, seed=5)
    assert pop.n == 1
    assert torch.equal(pop.params["fc.weight"][0], reference_model(tiny_cnn, 5).fc.weight.detach())


def test_from_modules_stacks_copies() -> None:
    modules = [reference_model(tiny_cnn, s) for s in (3, 1, 4)]
    pop = Population.from_modules(modules)
    for i, m in enumerate(modules):
        for name, t in m.state_dict().items():
            stack = pop.params[name] if name in pop.params else pop.buffers[name]
            assert torch.equal(stack[i], t)
    # stacks are copies: editing a module afterwards does not change the population
    with torch.no_grad():
        modules[0].fc.weight.add_(1.0)
    assert not torch.equal(pop.params["fc.weight"][0], modules[0].fc.weight)
    assert pop.params["fc.weight"].requires_grad is False


def tiny_mlp_wide() -> nn.Module:
    """Same class as TinyMLP, other shapes."""
    m = TinyMLP()
    m.fc1 = nn.Linear(64, 32)
    m.fc2 = nn.Linear(32, 3)
    return m


def tiny_mlp_extra() -> nn.Module:
    """Same class as TinyMLP, one buffer more."""
    m = TinyMLP()
    m.register_buffer("extra", torch.zeros(2))
    return m


class TinyMLPSub(TinyMLP):
    pass


@pytest.mark.parametrize(
    ("other", "fragment"),
    [
        (lambda: nn.Sequential(nn.Linear(64, 3)), "classes differ"),
        (tiny_mlp_wide, "fc1.weight"),
        (lambda: TinyMLP().double(), "float64"),
        (tiny_mlp_extra, "parameters and buffers"),
    ],
    ids=["class", "shape", "dtype", "count"],
)
def test_from_modules_mismatch(other: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Population.from_modules([TinyMLP(), TinyMLP(), other()])  # type: ignore[operator]


def test_mismatch_subclass_is_a_class_difference() -> None:
    """A subclass with the very same parameters is still a different architecture."""
    with pytest.raises(ValueError, match="TinyMLPSub"):
        Population.from_modules([TinyMLP(), TinyMLPSub()])


def test_from_modules_empty_or_not_modules() -> None:
    with pytest.raises(ValueError):
        Population.from_modules([])
    with pytest.raises(TypeError):
        Population.from_modules([TinyMLP(), "not a module"])  # type: ignore[list-item]


def test_frozen_parameters_stay_frozen() -> None:
    modules = [TinyMLP() for _ in range(2)]
    for m in modules:
        m.fc1.weight.requires_grad_(False)
    pop = Population.from_modules(modules)
    assert "fc1.weight" not in pop.trainable
    assert "fc1.weight" in pop.params
    assert not pop.member(1).fc1.weight.requires_grad
    assert pop.member(1).fc2.weight.requires_grad


# --------------------------------------------------------------------------- members as modules
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_member_round_trip(model_name: str, mode: str) -> None:
    pop = trained(model_name)
    getattr(pop, mode)()
    x = make_batches(1)[0][0]
    with torch.no_grad():
        outputs = pop.forward(x) if mode == "eval" else None
    for i in range(N):
        module = pop.member(i)
        assert isinstance(module, type(MODEL_FNS[model_name]()))
        assert module.training == (mode == "train")
        for name, t in module.state_dict().items():
            stack = pop.params[name] if name in pop.params else pop.buffers[name]
            assert torch.equal(t, stack[i])
        if outputs is not None:
            with torch.no_grad():
                torch.testing.assert_close(module(x), outputs[i], rtol=1e-5, atol=1e-6)
        # strict load into a fresh model, which then computes the same outputs
        fresh = MODEL_FNS[model_name]()
        fresh.load_state_dict(module.state_dict(), strict=True)
        fresh.eval()
        pop.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), pop.forward(x)[i], rtol=1e-5, atol=1e-6)
        getattr(pop, mode)()


def test_member_is_independent_copy() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    before = snapshot(pop)
    module = pop.member(2)
    with torch.no_grad():
        module.fc1.weight.zero_()
    for k, v in snapshot(pop).items():
        assert torch.equal(v, before[k])
    assert len(pop.members()) == N


def test_member_train_mode_outputs_match_with_batchnorm() -> None:
    """In train mode, the stacked forward and each exported member update BN statistics alike."""
    pop = trained("cnn_bn")
    modules = pop.members()
    x = make_batches(1, N, seed=8)[0][0]
    pop.train()
    with torch.no_grad():
        out = pop.forward(x, per_member=True)
        for i, m in enumerate(modules):
            m.train()
            torch.testing.assert_close(m(x[i]), out[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.bn.running_var, pop.buffers["bn.running_var"][i], rtol=1e-5, atol=1e-6)
            assert torch.equal(m.bn.num_batches_tracked, pop.buffers["bn.num_batches_tracked"][i])


@pytest.mark.parametrize("bad", [N, -1, 100])
def test_member_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        Population.from_factory(tiny_mlp, N).member(bad)


# --------------------------------------------------------------------------- select
@settings(max_examples=20, deadline=None, derandomize=True)
@given(idx=st.lists(st.integers(0, N - 1), min_size=1, max_size=2 * N))
def test_select_reorders_drops_and_copies(idx: list[int]) -> None:
    pop = trained("cnn_bn")
    pop.select([3, 1, 0, 2])  # ids are no longer positions
    before, ids = snapshot(pop), pop.ids.tolist()
    assert pop.select(idx) is pop
    assert pop.n == len(idx)
    assert pop.ids.tolist() == [ids[j] for j in idx]
    for name, stack in snapshot(pop).items():
        assert stack.shape == (len(idx), *before[name].shape[1:])
        for pos, j in enumerate(idx):
            assert torch.equal(stack[pos], before[name][j])


def test_select_copies_are_independent() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    pop.select([1, 1])
    pop.params["fc1.weight"][0].zero_()
    assert not torch.equal(pop.params["fc1.weight"][1], torch.zeros_like(pop.params["fc1.weight"][1]))


@pytest.mark.parametrize(
    "bad",
    [[], [N], [0, N + 3], [-1], [0, -2], [[0, 1]]],
    ids=["empty", "too_big", "too_big_later", "negative", "negative_later", "2d"],
)
def test_select_bad_indices(bad: list) -> None:
    pop = Population.from_factory(tiny_mlp, N)
    before = snapshot(pop)
    with pytest.raises(ValueError):
        pop.select(bad)
    assert pop.n == N  # unchanged on error
    for k, v in snapshot(pop).items():
        assert torch.equal(v, before[k])


def test_select_accepts_tensor_and_rejects_float_indices() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    pop.select(torch.tensor([2, 3]))
    assert pop.ids.tolist() == [2, 3]
    with pytest.raises(TypeError):
        pop.select(torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------- forward
def test_forward_shared_and_per_member(model_name: str) -> None:
    pop = trained(model_name)
    pop.eval()
    shared = make_batches(1)[0][0]
    per = make_batches(1, N, seed=4)[0][0]
    with torch.no_grad():
        out_shared = pop(shared)
        out_per = pop.forward(per, per_member=True)
        out_chunked = pop.forward(per, per_member=True, chunk_size=3)
    assert out_shared.shape == (N, shared.shape[0], 3)
    assert out_per.shape == (N, per.shape[1], 3)
    torch.testing.assert_close(out_chunked, out_per)
    for i, m in enumerate(pop.members()):
        m.eval()
        with torch.no_grad():
            torch.testing.assert_close(m(shared), out_shared[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m(per[i]), out_per[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(N + 1, 5, 1, 8, 8), (N - 1, 5, 1, 8, 8), (5, 1, 8, 8)])
def test_forward_per_member_wrong_leading_dim(shape: tuple[int, ...]) -> None:
    pop = Population.from_factory(tiny_cnn, N)
    with pytest.raises(ValueError, match="x"):
        pop.forward(torch.zeros(shape), per_member=True)


def test_forward_scalar_per_member_rejected() -> None:
    with pytest.raises(ValueError, match="x"):
        Population.from_factory(tiny_mlp, N).forward(torch.tensor(1.0), per_member=True)


def test_eval_forward_leaves_buffers_and_train_forward_updates_them() -> None:
    pop = trained("cnn_bn")
    x = make_batches(1)[0][0]
    before = snapshot(pop)
    pop.eval()
    with torch.no_grad():
        pop(x)
    for k, v in snapshot(pop).items():
        assert torch.equal(v, before[k])
    pop.train()
    with torch.no_grad():
        pop(x)
    assert not torch.equal(pop.buffers["bn.running_mean"], before["bn.running_mean"])
    assert (pop.buffers["bn.num_batches_tracked"] == before["bn.num_batches_tracked"] + 1).all()


# --------------------------------------------------------------------------- state and dtype
def test_state_dict_round_trip_through_torch_save(model_name: str) -> None:
    pop = trained(model_name, seed=21)
    pop.select([2, 0, 3])
    pop.eval()
    buf = io.BytesIO()
    torch.save(pop.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    other = Population.from_factory(MODEL_FNS[model_name], N + 2, seed=0)  # different n and weights
    assert other.load_state_dict(state) is other
    assert other.n == 3
    assert other.ids.tolist() == pop.ids.tolist() == [2, 0, 3]
    assert other.training is False
    assert other.trainable == pop.trainable
    for k, v in snapshot(pop).items():
        got = other.params[k] if k in other.params else other.buffers[k]
        assert torch.equal(got, v) and got.dtype == v.dtype
    x = make_batches(1)[0][0]
    with torch.no_grad():
        assert torch.equal(other(x), pop(x))


def test_state_dict_is_not_aliased_by_select() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    state = pop.state_dict()
    saved = state["params"]["fc1.weight"].clone()
    pop.select([1, 0])
    assert torch.equal(state["params"]["fc1.weight"], saved)
    assert state["ids"].tolist() == list(range(N))


def test_load_state_dict_rejects_other_architecture() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    with pytest.raises(ValueError, match="names"):
        pop.load_state_dict(Population.from_factory(tiny_cnn, N).state_dict())
    wide = Population.from_modules([tiny_mlp_wide(), tiny_mlp_wide()])
    with pytest.raises(ValueError, match="fc1.weight"):
        pop.load_state_dict(wide.state_dict())


def test_to_float64(model_name: str) -> None:
    pop = trained(model_name)
    before = snapshot(pop)
    assert pop.to(dtype=torch.float64) is pop
    for k, v in snapshot(pop).items():
        if before[k].is_floating_point():
            assert v.dtype == torch.float64
            assert torch.equal(v, before[k].double())
        else:  # num_batches_tracked stays an integer
            assert v.dtype == before[k].dtype
            assert torch.equal(v, before[k])
    pop.eval()
    x = make_batches(1)[0][0].double()
    with torch.no_grad():
        out = pop(x)
    assert out.dtype == torch.float64
    m = pop.member(1)
    assert all(t.dtype == pop.params[k].dtype for k, t in m.named_parameters())
    assert all(t.dtype == pop.buffers[k].dtype for k, t in m.named_buffers())
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), out[1])


def test_to_device_cpu_is_noop_copy() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    before = snapshot(pop)
    pop.to("cpu")
    assert pop.device == torch.device("cpu")
    for k, v in snapshot(pop).items():
        assert torch.equal(v, before[k])


def test_repr_and_modes() -> None:
    pop = Population.from_factory(tiny_cnn, N)
    assert "TinyCNN" in repr(pop) and "n=4" in repr(pop)
    assert pop.has_batchnorm()
    assert not Population.from_factory(tiny_mlp, 2).has_batchnorm()
    assert pop.eval() is pop and pop.training is False
    assert pop.train() is pop and pop.training is True


def test_deepcopy_population_is_independent() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    twin = copy.deepcopy(pop)
    twin.params["fc1.weight"].zero_()
    assert not torch.equal(pop.params["fc1.weight"], twin.params["fc1.weight"])


def test_member_follows_dtype_of_loaded_state() -> None:
    """A float64 state loaded into a float32 population exports float64 members."""
    src = trained("cnn_bn").to(dtype=torch.float64)
    pop = Population.from_factory(tiny_cnn, 2)
    pop.load_state_dict(src.state_dict())
    m = pop.member(3)
    for k, t in m.state_dict().items():
        stack = src.params[k] if k in src.params else src.buffers[k]
        assert t.dtype == stack.dtype and torch.equal(t, stack[3])


def test_spawn_and_repeat_copy_members_consecutively() -> None:
    from popvec.population import spawn_indices

    pop = Population.from_factory(tiny_mlp, 3, seed=5)
    originals = {k: v.clone() for k, v in pop.params.items()}
    pop.spawn([2, 0], copies=2)
    assert pop.ids.tolist() == [2, 2, 0, 0]
    for k, v in pop.params.items():
        assert torch.equal(v, originals[k][torch.tensor([2, 2, 0, 0])])
    pop.repeat(3)
    assert pop.ids.tolist() == [2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0]
    assert spawn_indices(range(2), 1, 2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="copies"):
        pop.spawn([0], copies=0)
    with pytest.raises(ValueError, match="indices"):
        pop.spawn([99])
