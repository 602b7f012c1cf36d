"""Train the nodule detector: ``python -m lungscreen.training.train --out runs/default --steps N``.

Sources: on-the-fly synthetic chest CT (:mod:`training.synthetic`), LIDC-IDRI-0001 as a real
background with inserted synthetic nodules (its own nodule region excluded), and optionally
LUNA16 scans (``--luna16 DIR``). Resumable: ``OUT/checkpoint.pt`` holds the model, optimiser,
step and random states, and the pool is rebuilt from its volume index; rerunning the same
command continues. Every ``--log-every`` steps a progress line is printed and a JSON line is
appended to ``OUT/train_log.jsonl``. Runs on CUDA when available, else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lungscreen.training.dataset import PreparedVolume, VolumePool, intensity_augmentation, make_batch, prepare
from lungscreen.training.losses import detection_loss
from lungscreen.training.network import NoduleNet
from lungscreen.training.readers import Luna16Folder
from lungscreen.training.scan import Scan
from lungscreen.training.sources import SEED_RANGES, RealBackground, read_lidc_0001, synthetic_scan

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
WARMUP_STEPS = 100
# Training scans carry more nodules than screening scans: more positives per generated volume.
TRAIN_NODULES_PER_SCAN = (1, 6)


def build_source(args: argparse.Namespace) -> Callable[[int], PreparedVolume]:
    """``index -> prepared volume``: which source and which seed follow from the index alone."""
    real = None if args.real_fraction <= 0 else RealBackground(read_lidc_0001())
    luna = Luna16Folder(args.luna16) if args.luna16 else None
    first_seed = SEED_RANGES["train"][0] + args.seed * 100_000

    def make(index: int) -> PreparedVolume:
        draw = np.random.default_rng([args.seed, index, 3]).random()
        scan: Scan
        luna_share = args.luna16_fraction if luna else 0.0
        if luna and draw < luna_share:
            scan = luna.scan(index % len(luna))
        elif real is not None and draw < luna_share + args.real_fraction:
            scan = real.sample(first_seed + index)
        else:
            scan = synthetic_scan(first_seed + index, TRAIN_NODULES_PER_SCAN)
        return prepare(scan)

    return make


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = NoduleNet().to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    step, pool_index = 0, 0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        step, pool_index = state["step"], state["pool_first_index"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    intensity = intensity_augmentation()
    intensity.set_random_state(seed=args.seed + step)
    t0 = time.perf_counter()
    pool = VolumePool(build_source(args), args.pool_size, first_index=pool_index)
    print(f"pool of {args.pool_size} volumes ready in {time.perf_counter() - t0:.0f} s; device {device}", flush=True)

    model.train()
    start_step, t_start, sums = step, time.perf_counter(), {}
    with (out / LOG).open("a") as log:
        while step < args.steps:
            if step > start_step and step % args.refresh_every == 0:
                pool.refresh()
            batch = {k: v.to(device) for k, v in make_batch(pool, args.batch_size, rng, intensity).items()}
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(step, args.steps, args.lr)
            losses = detection_loss(model.forward_raw(batch["image"]), batch)
            optimiser.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
            step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if step % args.log_every == 0 or step == args.steps:
                n = args.log_every if step % args.log_every == 0 else step % args.log_every
                rate = (step - start_step) / (time.perf_counter() - t_start)
                record = {"step": step, "lr": learning_rate(step - 1, args.steps, args.lr), **{k: v / n for k, v in sums.items()}}
                record["steps_per_s"] = rate
                log.write(json.dumps(record) + "\n")
                log.flush()
                eta = (args.steps - step) / max(rate, 1e-9)
                print(
                    f"step {step}/{args.steps} loss {record['loss']:.4f} (heat {record['heatmap']:.4f} "
                    f"diam {record['diameter']:.3f} off {record['offset']:.3f}) {rate:.2f} step/s eta {eta / 60:.1f} min",
                    flush=True,
                )
                sums = {}
            if step % args.checkpoint_every == 0 or step == args.steps:
                _save(ckpt_path, model, optimiser, step, pool, rng)
    return ckpt_path


def _save(path: Path, model: NoduleNet, optimiser: torch.optim.Optimizer, step: int, pool: VolumePool, rng) -> None:
    state = {
        "model": model.state_dict(),
        "optimiser": optimiser.state_dict(),
        "step": step,
        "pool_first_index": pool.next_index - len(pool.volumes),
        "rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last checkpoint


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lungscreen.training.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, log)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-size", type=int, default=24, help="prepared volumes held in memory")
    p.add_argument("--refresh-every", type=int, default=10, help="steps between two new pool volumes")
    p.add_argument("--real-fraction", type=float, default=0.2, help="share of LIDC-IDRI-0001 backgrounds (0: none)")
    p.add_argument("--luna16", type=Path, help="LUNA16 folder (.mhd/.raw + annotations.csv) to train on")
    p.add_argument("--luna16-fraction", type=float, default=0.5, help="share of LUNA16 volumes when --luna16")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch default)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--checkpoint-every", type=int, default=100)
    return p


if __name__ == "__main__":
    train(parser().parse_args())
