"""Our trainer (whole data set on the device, on-device batching) vs a plain DataLoader loop over the
same model, batch size, optimizer and data, in one run. The baseline is the usual torchvision-style
pipeline (per sample: PIL image -> ToTensor -> Normalize, emulated without torchvision); a lean
tensor-only DataLoader is printed beside it. The last line is `speedup: <N>x` (ours vs the
torchvision-style loop, MNIST MLP). Also times the cpu-mlp-mnist recipe to its test accuracy.

    python benchmarks/train_throughput.py            # CPU: MNIST MLP 3x512 (<= 5 min)
    python benchmarks/train_throughput.py --full     # also ResNet-20 and VGG-16 (meant for a GPU)
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from llfc_core import data
from llfc_core.recipes import Recipe, get_recipe
from llfc_core.runtime import configure_threads, default_device
from llfc_core.train import evaluate, train


class PerSampleDataset(Dataset):
    """One sample at a time, converted and normalised in Python.

    `via_pil=True` is what torchvision's MNIST/CIFAR10 datasets with ToTensor + Normalize do (the usual
    "plain DataLoader loop"): uint8 array -> PIL image -> float tensor in [0, 1] -> normalise. With
    `via_pil=False` it is a lean tensor-only variant, kept as a second, harder baseline.
    """

    def __init__(self, ds: data.Dataset, augment: bool, via_pil: bool):
        self.ds, self.augment, self.via_pil = ds, augment, via_pil
        self.mean, self.std = (torch.tensor(s).view(-1, 1, 1) / 255 for s in data.STATS[ds.name])

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image = self.ds.images[i]
        if self.via_pil:
            from PIL import Image

            array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
            pil = Image.fromarray(array)
            x = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).float().div(255)
            x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        else:
            x = image.float() / 255
        x = (x - self.mean) / self.std
        if self.augment:
            x = data.random_crop_flip(x[None], torch.Generator().manual_seed(i))[0]
        return x, self.ds.labels[i]


def dataloader_epoch_rate(recipe: Recipe, ds: data.Dataset, device, steps: int, via_pil: bool = True) -> float:
    torch.manual_seed(0)
    from llfc_core.models import build_model
    from llfc_core.train import build_optimizer

    model = build_model(recipe.model).to(device).train()
    opt = build_optimizer(recipe, model)
    loader = DataLoader(PerSampleDataset(ds, recipe.augment, via_pil), batch_size=recipe.batch_size, shuffle=True,
                        num_workers=0, pin_memory=device.type == "cuda")
    warmup, seen, start = 3, 0, None

    def forever():  # small subsets run out of batches: keep going over epochs
        while True:
            yield from loader

    for i, (x, y) in enumerate(forever()):
        if i == warmup:  # warm-up steps excluded
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
        if i == warmup + steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def ours_rate(recipe: Recipe, device) -> float:
    train(recipe, init_seed=0, data_seed=0, until=1, device=device)  # warm-up: data on device, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train(recipe, init_seed=0, data_seed=0, until=1, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (recipe.train_subset or data.SIZES[(recipe.dataset, "train")]) / (time.perf_counter() - start)


def compare(name: str, recipe: Recipe, device, steps: int) -> float:
    from llfc_core.train import dataset_on

    ds = dataset_on(recipe.dataset, "train", "cpu", recipe.train_subset)
    ref = dataloader_epoch_rate(recipe, ds, device, steps, via_pil=True)
    lean = dataloader_epoch_rate(recipe, ds, device, steps, via_pil=False)
    ours = ours_rate(recipe, device)
    print(f"{name:28s} DataLoader (torchvision-style) {ref:8.0f} img/s | DataLoader (tensor-only) {lean:8.0f} img/s"
          f" | ours {ours:8.0f} img/s | ratios {ours / ref:5.2f}x, {ours / lean:5.2f}x", flush=True)
    return ours / ref


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", "--conv", dest="conv", action="store_true",
                        help="also ResNet-20 and VGG-16 (batch 128 and 512)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    device = default_device()
    print(f"device {device}, torch {torch.__version__}, {threads} CPU threads")
    recipe = get_recipe("cpu-mlp-mnist")

    start = time.perf_counter()
    state = train(recipe, init_seed=0, data_seed=0, device=device)
    minutes = (time.perf_counter() - start) / 60
    err = evaluate(state.model, data.load("mnist", "test").to(device))["error"]
    print(f"cpu-mlp-mnist recipe: {recipe.epochs} epochs in {minutes:.2f} min, test accuracy {1 - err:.2%} "
          f"(goal: >= 97% in <= 2 min)")

    if args.conv or device.type == "cuda":
        for arch, model in (("resnet20", {"arch": "resnet20", "width": 1, "norm": "bn"}),
                            ("vgg16", {"arch": "vgg16", "norm": "bn"})):
            for batch in (128, 512):
                conv = Recipe(f"bench-{arch}", "cifar10", model, epochs=1, batch_size=batch, augment=True,
                              train_subset=None if device.type == "cuda" else 2048)
                compare(f"{arch} batch {batch}", conv, device, steps=30 if device.type == "cuda" else 8)
    speedup = compare("MNIST MLP 3x512 batch 128", recipe, device, steps=200)
    print(f"speedup: {speedup:.2f}x")


if __name__ == "__main__":
    main()
