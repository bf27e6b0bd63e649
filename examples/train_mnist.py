"""Progressive elimination of N initializations, the Multiple Initializations way, in one stack.

    python examples/train_mnist.py                       # built-in digits, offline
    python examples/train_mnist.py --dataset mnist --data-dir ./data --download

Same flags and defaults as ``popvec train``. The code below is what the command does, written
out with the public API: load data onto the device, build the trainer, train, test the winner.
"""

from __future__ import annotations

import torch
from rich.console import Console

from popvec import MultipleInitializationsTrainer, Population
from popvec.cli import add_train_arguments, resolve_device
from popvec.data import load_dataset
from popvec.engine import evaluate
from popvec.loaders import DeviceLoader
from popvec.models import model_factory, required_image_size


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)

    data = load_dataset(args.dataset, args.data_dir, args.download, image_size=required_image_size(args.model)).to(device)
    train_loader = DeviceLoader(data.train, args.batch_size, seed=args.seed)  # every member sees the same batches

    trainer = MultipleInitializationsTrainer(
        model_fn=model_factory(args.model, data.input_shape, data.num_classes),
        optimizer_fn=lambda params: torch.optim.Adam(params, lr=args.lr),
        num_models=args.num_models,
        num_elim_steps=args.num_elim_steps,
        reduce_factor=args.reduce_factor,
        device=device,
        seed=args.seed,
        console=Console(),
        progress=not args.no_progress,
    )
    best_model = trainer.train(train_loader, data.val, criterion=torch.nn.CrossEntropyLoss(), num_epochs=args.epochs)

    test = evaluate(Population.from_modules([best_model]), data.test)
    print(f"Winner test accuracy: {100 * float(test['accuracy'][0]):.2f}%")


if __name__ == "__main__":
    main()
