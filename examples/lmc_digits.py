"""Linear mode connectivity on the built-in digits: different inits vs copies spawned from one trunk.

1. Four networks from different random initializations, each with its own data order, train
   ``--steps`` steps in one stack; ``barrier_matrix`` measures the barrier between every pair.
2. The instability analysis: copies spawned from one trunk at several k1 train ``--steps`` more steps
   (all branches in one stack); the barrier between the copies of each k1.

    python examples/lmc_digits.py                    # LeNet-5, about a minute on a 2-core CPU
    python examples/lmc_digits.py --model mlp
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console

import popvec
from popvec import Population, lmc
from popvec.data import load_dataset
from popvec.engine import TrainStep
from popvec.loaders import DeviceLoader
from popvec.models import model_factory, required_image_size
from popvec.report import leaderboard_table


def sgd(population: Population) -> popvec.optim.SGD:
    return popvec.optim.SGD(population, lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("lenet5", "mlp"), default="lenet5")
    parser.add_argument("--steps", type=int, default=500, help="training steps of every network after it starts (k2)")
    parser.add_argument("--k1", default="0,10,50,100,500")
    args = parser.parse_args()
    console = Console()
    data = load_dataset("digits", image_size=required_image_size(args.model))
    model_fn = model_factory(args.model, data.input_shape, data.num_classes)

    population = Population.from_factory(model_fn, n=4, seed=0)
    step = TrainStep(population, sgd(population))
    loader = DeviceLoader(data.train, batch_size=64, num_members=4, seed=100)
    for _ in range(args.steps):
        step(*loader.next_batch(), per_member=True)
    matrix = lmc.barrier_matrix(population, data.test, alphas=25, bn_data=data.train)
    pairs = torch.triu_indices(4, 4, offset=1)
    loss, error, l2 = (m[pairs[0], pairs[1]] for m in (matrix.loss, matrix.error, matrix.l2))
    console.print(
        f"different inits ({args.model}, {args.steps} steps, 6 pairs, test): loss barrier {loss.mean():.4f} "
        f"[{loss.min():.4f}, {loss.max():.4f}], error barrier {100 * error.mean():.2f}% "
        f"[{100 * error.min():.2f}, {100 * error.max():.2f}], L2 {l2.mean():.2f}"
    )

    k1 = [int(k) for k in args.k1.split(",")]
    result = lmc.instability(model_fn, sgd, data.train, k1, args.steps, copies=2, eval_data=data.test)
    rows = [{**row, "error_barrier": 100 * row["error_barrier"], "error": 100 * row["error"]} for row in result.rows()]
    console.print(leaderboard_table(rows, title=f"spawned copies ({args.model}, k2 = {args.steps}, test; errors in %)"))


if __name__ == "__main__":
    main()
