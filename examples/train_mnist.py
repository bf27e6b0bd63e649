"""Progressive elimination of N initializations, the Multiple Initializations way, in one stack.

    python examples/train_mnist.py                       # built-in digits, offline
    python examples/train_mnist.py --dataset mnist --data-dir ./data --download

Same flags and defaults as ``popvec train``. The code below is what the command does, written
out with the public API: load data onto the device, build the trainer, train, test the winner.
"""

from __future__ import annotations

import functools

import torch
from rich.console import Console

from popvec import MultipleInitializationsTrainer, Population, optim
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
    # Every member sees the same batches, or (--per-member-data) each draws its own seeded order.
    members = args.num_models if args.per_member_data else None
    train_loader = DeviceLoader(data.train, args.batch_size, num_members=members, seed=args.seed)
    # The vectorized optimizer by name; a torch.optim factory works too:
    # optimizer_fn=lambda params: torch.optim.Adam(params, lr=args.lr)
    hparams = {"lr": args.lr, **({"momentum": args.momentum} if args.optimizer == "sgd" else {})}
    optimizer_fn = functools.partial(optim.OPTIMIZERS[args.optimizer], **hparams)

    trainer = MultipleInitializationsTrainer(
        model_fn=model_factory(args.model, data.input_shape, data.num_classes),
        optimizer_fn=optimizer_fn,
        num_models=args.num_models,
        num_elim_steps=args.num_elim_steps,
        reduce_factor=args.reduce_factor,
        device=device,
        seed=args.seed,
        console=Console(),
        progress=not args.no_progress,
        compile=args.compile,
        member_chunk_size=args.member_chunk_size,
    )
    best_model = trainer.train(train_loader, data.val, criterion=torch.nn.CrossEntropyLoss(), num_epochs=args.epochs)

    test = evaluate(Population.from_modules([best_model]), data.test)
    print(f"Winner test accuracy: {100 * float(test['accuracy'][0]):.2f}%")


if __name__ == "__main__":
    main()
