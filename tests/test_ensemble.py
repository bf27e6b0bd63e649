"""Ensembles of members and joint training of experts with a fusion head.

The combined predictions must equal what the exported members (plain modules) give when
averaged by hand; the joint objective's gradients and a few training updates (accumulation,
per-group clipping, a head scheduler) must equal those of a plain-PyTorch module made of the N
exported experts and the head.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_FNS, NUM_CLASSES, make_batches
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from popvec import Population, optim
from popvec.studies.ensemble import (
    FUSIONS,
    JointTrainer,
    combine,
    ensemble_loss,
    evaluate_ensemble,
    make_fusion,
    member_outputs,
    predict,
)

pytestmark = pytest.mark.usefixtures("single_thread")

N = 3
SEED = 5
LAST_LINEAR = {"mlp": "fc2", "cnn_bn": "fc"}
FEATURE_SIZE = {"mlp": 16, "cnn_bn": 36}


def trained_population(model_name: str = "cnn_bn") -> Population:
    """A population whose members differ and whose BatchNorm statistics are not the defaults."""
    pop = Population.from_factory(MODEL_FNS[model_name], N, seed=SEED)
    opt = optim.SGD(pop, lr=0.1)
    from popvec.engine import TrainStep

    step = TrainStep(pop, opt)
    for x, y in make_batches(3, N):
        step(x, y, per_member=True)
    return pop


# --------------------------------------------------------------------------- combining
@pytest.mark.parametrize("members", [None, [2, 0], [1]])
def test_mean_prob_equals_average_of_exported_softmax(members: list[int] | None) -> None:
    pop = trained_population()
    x, y = make_batches(1, batch=32)[0]
    chosen = members if members is not None else list(range(N))
    models = [pop.member(i).eval() for i in chosen]
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(-1) for m in models]).mean(0)
    torch.testing.assert_close(predict(pop, x, "mean_prob", members), expected, rtol=1e-5, atol=1e-6)
    # the same through a list of plain modules
    torch.testing.assert_close(predict(models, x, "mean_prob"), expected, rtol=1e-5, atol=1e-6)
    metrics = evaluate_ensemble(pop, (x, y), "mean_prob", members, batch_size=10)
    assert metrics["accuracy"] == pytest.approx(float((expected.argmax(-1) == y).float().mean()))
    assert metrics["loss"] == pytest.approx(float(F.nll_loss(expected.log(), y)), rel=1e-5)


def test_mean_logit_and_vote() -> None:
    pop = trained_population()
    x, y = make_batches(1, batch=32)[0]
    models = [m.eval() for m in pop.members()]
    with torch.no_grad():
        logits = torch.stack([m(x) for m in models])
    torch.testing.assert_close(predict(pop, x, "mean_logit"), logits.mean(0), rtol=1e-5, atol=1e-6)
    votes = predict(pop, x, "vote")
    for b in range(x.shape[0]):
        counts = torch.bincount(logits[:, b].argmax(-1), minlength=NUM_CLASSES).float() / N
        torch.testing.assert_close(votes[b], counts)
    metrics = evaluate_ensemble(pop, (x, y), "mean_logit")
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits.mean(0), y)), rel=1e-5)
    assert evaluate_ensemble(pop, (x, y), "vote")["loss"] != evaluate_ensemble(pop, (x, y), "vote")["loss"]  # NaN


@pytest.mark.parametrize("method", ["mean_prob", "mean_logit", "vote"])
def test_evaluate_ensemble_over_uneven_batches_equals_a_hand_sum(method: str) -> None:
    """Float64 sums of batch-mean loss x batch size, as a plain loop over the batches would keep them."""
    pop = trained_population("mlp")
    x, y = make_batches(1, batch=23)[0]
    metrics = evaluate_ensemble(pop, (x, y), method, batch_size=10)  # batches of 10, 10, 3
    total, correct = 0.0, 0
    for xb, yb in zip(x.split(10), y.split(10)):
        combined = predict(pop, xb, method)
        total += float(ensemble_loss(combined, yb, method)) * len(yb)
        correct += int((combined.argmax(-1) == yb).sum())
    assert metrics["accuracy"] == correct / len(y)
    assert metrics["loss"] == total / len(y) or method == "vote"  # vote: NaN
    assert isinstance(metrics["loss"], float) and isinstance(metrics["accuracy"], float)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(2, 5), st.integers(0, 2**16))
def test_combine_properties(k: int, b: int, c: int, seed: int) -> None:
    outputs = torch.randn(k, b, c, generator=torch.Generator().manual_seed(seed))
    probs = combine(outputs, "mean_prob")
    torch.testing.assert_close(probs.sum(-1), torch.ones(b))
    votes = combine(outputs, "vote")
    torch.testing.assert_close(votes.sum(-1), torch.ones(b))
    if k == 1:  # one member: every method predicts that member's class
        for method in ("mean_prob", "mean_logit", "vote"):
            assert torch.equal(combine(outputs, method).argmax(-1), outputs[0].argmax(-1))


def test_member_outputs_restores_mode_and_is_eval() -> None:
    pop = trained_population()
    x, _ = make_batches(1)[0]
    pop.train()
    out = member_outputs(pop, x, [1])
    assert pop.training and out.shape == (1, x.shape[0], NUM_CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(out[0], pop.member(1).eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda pop, x: predict([], x), ValueError, "population must hold at least one member"),
        (lambda pop, x: predict(pop, x, members=[]), ValueError, "members: indices must be a non-empty"),
        (lambda pop, x: predict(pop, x, members=[0, 7]), ValueError, "members: indices must lie in"),
        (lambda pop, x: predict(pop, x, method="median"), ValueError, "method must be one of mean_prob, mean_logit, vote"),
        (lambda pop, x: ensemble_loss(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), "max"), ValueError, "method must be one of"),
        (lambda pop, x: make_fusion("attention", N, 3, 3), ValueError, "fusion must be one of mean, concat, product"),
        (
            lambda pop, x: evaluate_ensemble(pop, (x[:0], torch.zeros(0, dtype=torch.long))),
            ValueError,
            "data must hold at least one sample",
        ),
    ],
)
def test_bad_input(call: Any, error: type[Exception], match: str) -> None:
    pop = trained_population("mlp")
    x, _ = make_batches(1)[0]
    with pytest.raises(error, match=match):
        call(pop, x)


# --------------------------------------------------------------------------- joint training
class PlainJoint(nn.Module):
    """The reference: N plain experts and the head, the same objective written out with loops."""

    def __init__(
        self,
        experts: list[nn.Module],
        head: nn.Module,
        features: str,
        last: str,
        member_weight: float,
        distill_weight: float,
        temperature: float,
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.head = head
        self.features, self.member_weight = features, member_weight
        self.distill_weight, self.temperature = distill_weight, temperature
        self._feats: list[Tensor] = []
        if features == "penultimate":
            for e in self.experts:
                e.get_submodule(last).register_forward_pre_hook(lambda _m, args: self._feats.append(args[0]))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        self._feats = []
        outs = [e(x) for e in self.experts]
        feats = torch.stack(self._feats) if self.features == "penultimate" else torch.stack(outs)
        total = F.cross_entropy(self.head(feats), y) + self.member_weight * sum(F.cross_entropy(o, y) for o in outs)
        if self.distill_weight > 0:
            t = self.temperature
            target = torch.stack([F.softmax(o.detach() / t, -1) for o in outs]).mean(0)
            kl = sum(F.kl_div(F.log_softmax(o / t, -1), target, reduction="batchmean") for o in outs)
            total = total + self.distill_weight * t * t * kl
        return total


def build_joint(model_name: str, fusion_name: str, features: str, distill: float, **kwargs: Any) -> tuple[JointTrainer, PlainJoint]:
    pop = Population.from_factory(MODEL_FNS[model_name], N, seed=SEED)
    size = NUM_CLASSES if features == "outputs" else FEATURE_SIZE[model_name]
    torch.manual_seed(0)
    head = make_fusion(fusion_name, N, size, NUM_CLASSES, hidden=8)
    ref = PlainJoint(pop.members(), copy.deepcopy(head), features, LAST_LINEAR[model_name], 0.5, distill, 2.0)
    member_opt = kwargs.pop("member_optimizer", None) or optim.SGD(pop, lr=0.1)
    head_opt = torch.optim.SGD(head.parameters(), lr=0.05) if any(True for _ in head.parameters()) else None
    trainer = JointTrainer(
        pop, head, member_opt, head_opt, member_weight=0.5, features=features, distill_weight=distill, temperature=2.0, **kwargs
    )
    return trainer, ref


@pytest.mark.parametrize("fusion_name", FUSIONS)
@pytest.mark.parametrize("features", ["outputs", "penultimate"])
@pytest.mark.parametrize("model_name, distill", [("mlp", 0.0), ("cnn_bn", 0.7)])
def test_joint_gradients_equal_plain_module(model_name: str, fusion_name: str, features: str, distill: float) -> None:
    trainer, ref = build_joint(model_name, fusion_name, features, distill)
    x, y = make_batches(1, batch=12)[0]
    member_grads, head_grads, parts = trainer.gradients(x, y)
    ref.train()
    loss = ref.loss(x, y)
    loss.backward()
    assert float(parts.total) == pytest.approx(loss.item(), rel=1e-5)
    for i, expert in enumerate(ref.experts):
        for name, p in expert.named_parameters():
            message = lambda m, n=name, i=i: f"expert {i} {n}: {m}"  # noqa: E731
            torch.testing.assert_close(member_grads[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=message)
    for g, p in zip(head_grads, ref.head.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    # BatchNorm statistics moved exactly as the plain experts' did
    for i, expert in enumerate(ref.experts):
        for name, b in expert.named_buffers():
            torch.testing.assert_close(trainer.population.buffers[name][i], b)


def test_custom_features_fn_equals_penultimate() -> None:
    def features_fn(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.relu(model.fc1(torch.flatten(x, 1)))
        return model.fc2(h), h

    a, _ = build_joint("mlp", "concat", "penultimate", 0.0)
    b, _ = build_joint("mlp", "concat", "penultimate", 0.0)
    b._forward = b._build_forward(features_fn)
    x, y = make_batches(1)[0]
    ga, ha, _ = a.gradients(x, y)
    gb, hb, _ = b.gradients(x, y)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k])
    for u, v in zip(ha, hb):
        torch.testing.assert_close(u, v)


def test_joint_training_updates_equal_plain_param_groups() -> None:
    """Accumulation over 2 batches, per-group clipping, a head LR schedule: 2 updates, same weights."""
    pop = Population.from_factory(MODEL_FNS["cnn_bn"], N, seed=SEED)
    torch.manual_seed(0)
    head = make_fusion("concat", N, FEATURE_SIZE["cnn_bn"], NUM_CLASSES, hidden=8)
    ref = PlainJoint(pop.members(), copy.deepcopy(head), "penultimate", "fc", 0.5, 0.3, 2.0)
    head_opt = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)
    trainer = JointTrainer(
        pop,
        head,
        optim.SGD(pop, lr=0.1, momentum=0.9),
        head_opt,
        member_weight=0.5,
        features="penultimate",
        distill_weight=0.3,
        temperature=2.0,
        accumulation_steps=2,
        member_max_grad_norm=0.05,
        head_max_grad_norm=0.02,
        head_scheduler=torch.optim.lr_scheduler.StepLR(head_opt, step_size=1, gamma=0.5),
    )
    ref_members = torch.optim.SGD(ref.experts.parameters(), lr=0.1, momentum=0.9)
    ref_head = torch.optim.SGD(ref.head.parameters(), lr=0.05, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_head, step_size=1, gamma=0.5)
    batches = make_batches(4, batch=12)
    ref.train()
    for t, (x, y) in enumerate(batches):
        trainer.step(x, y)
        (ref.loss(x, y) / 2).backward()
        if t % 2 == 1:
            torch.nn.utils.clip_grad_norm_(list(ref.experts.parameters()), 0.05)
            torch.nn.utils.clip_grad_norm_(list(ref.head.parameters()), 0.02)
            ref_members.step()
            ref_head.step()
            ref_sched.step()
            ref_members.zero_grad()
            ref_head.zero_grad()
    assert trainer.updates == 2
    states = trainer.member_state_dicts()
    for i, expert in enumerate(ref.experts):
        for k, v in expert.state_dict().items():
            torch.testing.assert_close(states[i][k], v, rtol=1e-4, atol=1e-6, msg=lambda m, k=k, i=i: f"expert {i} {k}: {m}")
    for k, v in ref.head.state_dict().items():
        torch.testing.assert_close(trainer.head_state_dict()[k], v, rtol=1e-4, atol=1e-6)
    # exports are plain state_dicts of the model class and of the head
    model = MODEL_FNS["cnn_bn"]()
    model.load_state_dict(states[1])
    fresh_head = make_fusion("concat", N, FEATURE_SIZE["cnn_bn"], NUM_CLASSES, hidden=8)
    fresh_head.load_state_dict(trainer.head_state_dict())


def test_joint_trainer_learns_and_predicts() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=gen)
    y = (x.flatten(1)[:, :3].argmax(-1)).long()
    pop = Population.from_factory(MODEL_FNS["mlp"], N, seed=SEED)
    head = make_fusion("product", N, 16, NUM_CLASSES)
    trainer = JointTrainer(pop, head, optim.Adam(pop, lr=1e-2), torch.optim.Adam(head.parameters(), lr=1e-2), features="penultimate")
    before = trainer.evaluate((x, y))["loss"]
    for _ in range(30):
        trainer.step(x, y)
    after = trainer.evaluate((x, y))
    assert after["loss"] < before and after["accuracy"] > 0.6
    assert trainer.predict(x).shape == (96, NUM_CLASSES)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"distill_weight": -1.0}, "distill_weight must be a finite number >= 0"),
        ({"member_weight": -0.5}, "member_weight must be a finite number >= 0"),
        ({"accumulation_steps": 0}, "accumulation_steps must be an integer >= 1"),
        ({"features": "nope"}, "features must be 'outputs', 'penultimate' or a submodule name"),
        ({"head_max_grad_norm": 0.0}, "head_max_grad_norm must be None or a number > 0"),
    ],
)
def test_joint_trainer_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], N, seed=SEED)
    head = make_fusion("concat", N, NUM_CLASSES, NUM_CLASSES)
    with pytest.raises(ValueError, match=match):
        JointTrainer(pop, head, optim.SGD(pop, lr=0.1), torch.optim.SGD(head.parameters(), lr=0.1), **kwargs)


def test_joint_trainer_needs_head_optimizer_and_matching_population() -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], N, seed=SEED)
    other = Population.from_factory(MODEL_FNS["mlp"], N, seed=SEED)
    head = make_fusion("concat", N, NUM_CLASSES, NUM_CLASSES)
    with pytest.raises(ValueError, match="head_optimizer is required"):
        JointTrainer(pop, head, optim.SGD(pop, lr=0.1))
    with pytest.raises(ValueError, match="member_optimizer must be built on the population"):
        JointTrainer(pop, head, optim.SGD(other, lr=0.1), torch.optim.SGD(head.parameters(), lr=0.1))
    # a parameter-free mean fusion of the outputs needs no head optimizer
    JointTrainer(pop, make_fusion("mean", N, NUM_CLASSES, NUM_CLASSES), optim.SGD(pop, lr=0.1))


@pytest.mark.parametrize("make_opt", [lambda pop: optim.SGD(pop, lr=0.1, momentum=0.9), lambda pop: optim.Adam(pop, lr=0.1)])
def test_optimizer_accepts_non_contiguous_gradients(make_opt: Any) -> None:
    """Autograd through vmap returns e.g. a transposed [N, out, in] gradient; the fused kernels must see it right."""
    g = torch.randn(N, 36, 3, generator=torch.Generator().manual_seed(0)).transpose(1, 2)
    results = []
    for grad in (g, g.contiguous()):
        pop = Population.from_factory(lambda: nn.Linear(36, 3), N, seed=0)
        make_opt(pop).step({"weight": grad, "bias": torch.ones(N, 3)})
        results.append(pop.params["weight"].clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
