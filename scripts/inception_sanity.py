"""Sanity figures of Inception FID (docs/inception-fid.md): CIFAR-10 against other CIFAR-10 images (small) and
against Fashion-MNIST (large), and what the Inception pass costs per 1,000 images on this machine.

n random CIFAR-10 training images are the reference; n random CIFAR-10 test images and n random Fashion-MNIST
test images (grey, repeated to RGB) are scored against it through `fidelity.Scorer`, as the score stage does.
Reads a CIFAR-10 class-folder .tar.gz (--cifar; e.g. the JPEG copy) and Debian's Fashion-MNIST files; needs
`make inception`. Prints one JSON object. Usage:

    python scripts/inception_sanity.py [--n 2000] [--threads 2] [--cifar PATH] [--fashion DIR]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from energyat.evaluation import fidelity
from energyat.science import data


def pick(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--cifar", required=True, help="CIFAR-10 as a class-folder tree or .tar.gz")
    ap.add_argument("--fashion", default=str(data.DEBIAN_FASHION_MNIST))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = fidelity.inception_pool3_file("")
    if weights is None:
        raise SystemExit("inception_sanity: error: no Inception pool3 file in the torch hub cache; `make inception`")

    cifar = data.image_folder(args.cifar)
    reference = pick(cifar.train.x, args.n, 0)
    sets = {"cifar10_test": pick(cifar.test.x, args.n, 1),
            "fashion_mnist_test": pick(data.fashion_mnist(args.fashion).test.x, args.n, 2)}
    scorer = fidelity.Scorer(fidelity.INCEPTION_POOL3, weights, reference, device=torch.device("cpu"),
                             batch_size=args.batch_size, seed=0)
    out = {"n": args.n, "threads": args.threads, "reference": "cifar10_train (JPEG copy)"}
    try:
        for name, x in sets.items():
            start, cpu = time.perf_counter(), time.process_time()
            out[f"fid.{name}"] = round(scorer.score(x)["fid"], 3)
            # the first call also extracts the reference; CPU time (all threads) is what a shared machine can't inflate
            out[f"seconds.{name}"] = round(time.perf_counter() - start, 1)
            out[f"cpu_seconds.{name}"] = round(time.process_time() - cpu, 1)
    finally:
        scorer.close()
    # the second call extracts its own n images only (plus one 2048-d FID, a few seconds)
    out["seconds_per_1000_images"] = round(out["seconds.fashion_mnist_test"] / args.n * 1000, 1)
    out["cpu_seconds_per_1000_images"] = round(out["cpu_seconds.fashion_mnist_test"] / args.n * 1000, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
