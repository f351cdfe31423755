"""Train the learned codec's network on the real images:
`python -m compacs.models.training.train`.

Float training first, then a QAT fine-tune in which every layer computes exactly the integer
network that is shipped (models/training/network.py): with real steps it costs almost nothing,
rushed it costs up to 16 % (docs/design.md). The loss is the code length in bits per pixel of
the stored integer values under the discretized logistic the codec codes with.

Reproducible and resumable: batch `k` is drawn from a generator seeded with (seed, k), so a run
interrupted with Ctrl-C (which writes a checkpoint) and started again with the same arguments
continues where it stopped and draws the same batches as an uninterrupted run.
Data: models/training/data.py (`all_images`, `split`); the held-out images are never loaded here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812
from tqdm import tqdm

from ..entropy import ESCAPE_BITS, HALF_BUCKETS
from ..features import (
    N_SCALES,
    SCALE_STEPS,
    SIGMA_MIN_LOG2,
    ImageStats,
    image_features,
    med_prediction,
    tile_slices,
)
from . import data
from .network import ACT_SHIFT, CausalNet, floor_ste

# How often each kind of image is drawn, decided before any result was seen: CT and MR are
# what the targets are about; CR is large and smooth, NM/US add variety.
MODALITY_WEIGHTS = {"CT": 0.35, "MR": 0.35, "CR": 0.2, "NM": 0.05, "US": 0.05}


@dataclass
class Config:
    float_steps: int = 5000
    qat_steps: int = 1500
    batch: int = 16
    crop: int = 64
    channels: int = 40
    blocks: int = 5
    inner: int = 1  # 1×1 inner layer per block (training/network.py); 0: the 2026-12-01 model
    lr: float = 2e-3
    qat_lr: float = 3e-4
    seed: int = 0
    threads: int = 2  # the 2 cores of the team VM: about an hour with the defaults
    init: str = ""  # an exported model folder (e.g. models/shipped) to continue from

    @property
    def steps(self) -> int:
        return self.float_steps + self.qat_steps


@dataclass
class Tile:
    """One coding unit of a training image, with everything a batch needs precomputed."""

    x: np.ndarray  # int32 (H, W)
    med: np.ndarray  # int32 (H, W)
    feats: np.ndarray  # int8 (4, H, W)
    stats: ImageStats
    modality: str


def prepare(images: list[data.RealImage], crop: int) -> list[Tile]:
    """Split images into the codec's tiles and precompute features; tiles under crop² go."""
    tiles = []
    for image in images:
        for rs, cs in tile_slices(*image.pixels.shape):
            x = image.pixels[rs, cs].astype(np.int64)
            if min(x.shape) < crop or x.max() == x.min():
                continue
            stats = ImageStats.of(x)
            tiles.append(
                Tile(
                    x.astype(np.int32),
                    med_prediction(x, stats.lo).astype(np.int32),
                    np.ascontiguousarray(image_features(x, stats).transpose(2, 0, 1)),
                    stats,
                    image.modality,
                )
            )
    return tiles


class Sampler:
    """Random crops, batch k always the same for a given seed (resumable runs)."""

    def __init__(self, tiles: list[Tile], crop: int, batch: int, seed: int):
        self.tiles, self.crop, self.batch, self.seed = tiles, crop, batch, seed
        area = np.array([t.x.size for t in tiles], dtype=np.float64)
        weight = np.array([MODALITY_WEIGHTS.get(t.modality, 0.05) for t in tiles])
        per_modality = {m: area[[t.modality == m for t in tiles]].sum() for m in weight_keys(tiles)}
        self.p = weight * area / np.array([per_modality[t.modality] for t in tiles])
        self.p /= self.p.sum()

    def __call__(self, k: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, k])
        c = self.crop
        picks = rng.choice(len(self.tiles), size=self.batch, p=self.p)
        feats, x, med, stats = [], [], [], []
        for i in picks:
            t = self.tiles[i]
            r = int(rng.integers(0, t.x.shape[0] - c + 1))
            q = int(rng.integers(0, t.x.shape[1] - c + 1))
            feats.append(t.feats[:, r : r + c, q : q + c])
            x.append(t.x[r : r + c, q : q + c])
            med.append(t.med[r : r + c, q : q + c])
            stats.append((t.stats.d, t.stats.base, t.stats.lo, t.stats.hi))
        s = torch.tensor(stats, dtype=torch.float64)
        return {
            "feats": torch.from_numpy(np.stack(feats).astype(np.float32)),
            "x": torch.from_numpy(np.stack(x).astype(np.float64)),
            "med": torch.from_numpy(np.stack(med).astype(np.float64)),
            "d": s[:, 0].view(-1, 1, 1),
            "base": s[:, 1].view(-1, 1, 1),
            "lo": s[:, 2].view(-1, 1, 1),
            "hi": s[:, 3].view(-1, 1, 1),
        }


def weight_keys(tiles: list[Tile]) -> set[str]:
    return {t.modality for t in tiles}


def bits_per_pixel(net: CausalNet, batch: dict[str, torch.Tensor], qat: bool) -> torch.Tensor:
    """Mean code length (bits) of the stored integers as the codec codes them.

    Inside ±64 buckets of its scale (models/entropy.py) a pixel costs what the discretized
    logistic gives it (the uniform low bits of a bucket cost ≈ 0.003 bit more); beyond, the
    escape: the tail mass plus 17 raw bits. Without that cap, a few outliers (an edge next to
    flat air) cost thousands of bits under a logistic tail and drag every scale up.
    In QAT mode mean and scale are rounded exactly as the codec rounds them (floor of mean·d,
    scale index = base + level), with straight-through gradients.
    """
    mean, log_scale = net(batch["feats"], qat)
    delta = mean.double() * batch["d"]
    if qat:
        delta = floor_ste(delta)
        index = torch.clamp(batch["base"] + log_scale.double() * SCALE_STEPS, 0, N_SCALES - 1)
        log2_sigma = SIGMA_MIN_LOG2 + index / SCALE_STEPS
    else:
        top = SIGMA_MIN_LOG2 + (N_SCALES - 1) / SCALE_STEPS
        log2_sigma = torch.clamp(torch.log2(batch["d"]) + log_scale.double(), SIGMA_MIN_LOG2, top)
    mu = torch.clamp(batch["med"] + delta, batch["lo"], batch["hi"])
    inv = torch.exp2(-log2_sigma)
    r = -(batch["x"] - mu).abs()  # the distribution is symmetric: work in the lower tail
    upper = F.logsigmoid((r + 0.5) * inv)
    lower = F.logsigmoid((r - 0.5) * inv)
    inside = upper + torch.log1p(-torch.exp(lower - upper).clamp(max=1 - 1e-12))
    width = torch.exp2(torch.clamp(torch.floor(log2_sigma.detach()) - 2, min=0))
    reach = HALF_BUCKETS * width
    escape = math.log(2.0) + F.logsigmoid(-(reach + 0.5) * inv) - ESCAPE_BITS * math.log(2.0)
    log_p = torch.where(-r < reach, inside, escape)
    return -log_p.mean() / math.log(2)


def learning_rate(cfg: Config, step: int) -> float:
    """Warm-up then cosine decay in the float phase; a lower cosine in the QAT phase."""
    if step < cfg.float_steps:
        warm = min(1.0, (step + 1) / 100)
        cosine = 0.5 * (1 + math.cos(math.pi * step / cfg.float_steps))
        return cfg.lr * warm * (0.05 + 0.95 * cosine)
    k = (step - cfg.float_steps) / max(1, cfg.qat_steps)
    return cfg.qat_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k)))


def on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch moved to where the network is (the sampler builds it on the CPU)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(net: CausalNet, sampler: Sampler, batches: int, qat: bool) -> float:
    device = next(net.parameters()).device
    return float(
        np.mean([float(bits_per_pixel(net, on(sampler(k), device), qat)) for k in range(batches)])
    )


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights as CPU tensors: a checkpoint or final.pt made on a GPU loads anywhere."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def pick_device(name: str) -> torch.device:
    """The torch device for `--device`, refused with what to do when it is not there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; "
            "use --device cpu, or run on a machine with one (models/training/device_train.sh)"
        )
    if device.type == "cuda":
        # QAT should compute the integer network's values: TF32 would round its sums. (cuDNN
        # may still pick a non-GEMM convolution, so a floor on a boundary can differ; the
        # exported integers, and what the codec computes, are exact regardless.)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def load_exported(net: CausalNet, folder: Path) -> None:
    """Set `net` to the integer network exported in `folder` (its weights.npz).

    Why: the float weights of a shipped model are not kept (only its integers are), and the
    integers are a float network too: w = w_int·2^-e, b = b_int·2^-(e + in_shift). Their QAT
    forward pass is the shipped network exactly (export picks e with max |w_int| in 64..127, so
    `QConv.exponent` finds the same e), which lets a longer run continue from a shipped model
    instead of starting over.
    """
    missing = [name for name in ("meta.json", "weights.npz") if not (folder / name).exists()]
    if missing:
        raise SystemExit(
            f"--init {folder}: no {' or '.join(missing)} there; name a folder written by "
            "python -m compacs.models.training.export, such as models/shipped"
        )
    meta = json.loads((folder / "meta.json").read_text())
    wanted = {"channels": net.channels, "blocks": len(net.blocks), "inner": net.inner}
    found = {k: int(meta.get(k, 0)) for k in wanted}
    if found != wanted:
        raise SystemExit(
            f"{folder} holds a network with {found}, not {wanted}: pass --channels, --blocks and "
            "--inner to match it"
        )
    arrays = np.load(folder / "weights.npz")
    layers = net.layers()
    for i, layer in enumerate(layers):
        head = i == len(layers) - 1
        e = int(arrays[f"s{i}"]) - layer.in_shift + (0 if head else ACT_SHIFT)
        weight = torch.from_numpy(arrays[f"w{i}"].astype(np.float64) * 2.0**-e)
        bias = torch.from_numpy(arrays[f"b{i}"].astype(np.float64) * 2.0 ** -(e + layer.in_shift))
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    train_images: list[data.RealImage],
    validation_images: list[data.RealImage],
    cfg: Config,
    work: Path,
    checkpoint_every: int = 50,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Train (or resume) in `work`; returns the run's summary, also written to summary.json.

    `device` is not part of the config: a run checkpointed on a GPU resumes on a CPU (its
    batches are the same; its float sums may differ in the last bits). `threads` is: resume
    with the same arguments, --threads included."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint.pt"
    where = pick_device(device)
    net = CausalNet(cfg.channels, cfg.blocks, cfg.inner).to(where)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    step, elapsed, log = 0, 0.0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        if state["config"] != asdict(cfg):
            raise SystemExit(
                f"{ckpt} was written with {state['config']}, not {asdict(cfg)}: rerun with the "
                "same arguments to resume, or pass --fresh to start over"
            )
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        step, elapsed, log = state["step"], state["elapsed"], state["log"]
    elif cfg.init:
        load_exported(net, Path(cfg.init))

    tiles = prepare(train_images, cfg.crop)
    sampler = Sampler(tiles, cfg.crop, cfg.batch, cfg.seed)
    val_tiles = prepare(validation_images, cfg.crop)
    val_sampler = Sampler(val_tiles, cfg.crop, cfg.batch, cfg.seed + 1) if val_tiles else None

    def checkpoint() -> None:
        state = {"net": cpu_state(net), "opt": opt.state_dict(), "step": step}
        _save(ckpt, {**state, "elapsed": elapsed, "log": log, "config": asdict(cfg)})

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", unit="step")
    ema = None
    started = time.monotonic() - elapsed
    try:
        while step < cfg.steps:
            qat = step >= cfg.float_steps
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            loss = bits_per_pixel(net, on(sampler(step), where), qat)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            elapsed = time.monotonic() - started
            value = float(loss.detach())
            ema = value if ema is None else 0.98 * ema + 0.02 * value
            bar.update(1)
            bar.set_postfix(phase="qat" if qat else "float", bpp=f"{ema:.3f}")
            if step % checkpoint_every == 0 or step in (cfg.float_steps, cfg.steps):
                entry = {"step": step, "train_bpp": ema, "seconds": round(elapsed, 1)}
                milestone = step % (4 * checkpoint_every) == 0 or step in (
                    cfg.float_steps,
                    cfg.steps,
                )
                if val_sampler is not None and milestone:
                    entry["validation_bpp"] = evaluate(net, val_sampler, 8, qat)
                log.append(entry)
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        bar.close()
        print(f"\ninterrupted at step {step}: {ckpt} saved; rerun to resume", file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()
    summary = {
        "config": asdict(cfg),
        "steps": step,
        "training_seconds": round(elapsed, 1),
        "threads": cfg.threads,
        "device": str(where),
        "train_tiles": len(tiles),
        "train_pixels": int(sum(t.x.size for t in tiles)),
        "train_groups": sorted({im.group for im in train_images}),
        "validation_groups": sorted({im.group for im in validation_images}),
        "log": log,
    }
    if cfg.init:
        previous = json.loads((Path(cfg.init) / "meta.json").read_text()).get("training", {})
        summary["continued_from"] = previous
    _save(work / "final.pt", {"net": cpu_state(net), "config": asdict(cfg)})
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


HELP = {
    "init": "an exported model folder (models/shipped, or a retired one) whose integer weights "
    "the run starts from instead of random ones: continue a shipped model for more steps",
}


def default_work_dir() -> Path:
    return data.cache_dir() / "learned-train"


def main(argv: list[str] | None = None) -> int:
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m compacs.models.training.train", description=__doc__
    )
    for field, value in asdict(defaults).items():
        parser.add_argument(
            f"--{field.replace('_', '-')}", type=type(value), default=value, help=HELP.get(field)
        )
    parser.add_argument("--work", type=Path, default=default_work_dir(), help="checkpoints")
    parser.add_argument("--fresh", action="store_true", help="discard a checkpoint in --work")
    parser.add_argument(
        "--images",
        type=Path,
        help="train from a file written by `python -m compacs.models.training.data FILE` instead "
        "of fetching the images from the registries (a machine with no registry, such as a lent "
        "GPU)",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    args = parser.parse_args(argv)
    cfg = Config(**{f: getattr(args, f) for f in asdict(defaults)})
    if args.fresh:
        for name in ("checkpoint.pt", "final.pt", "summary.json"):
            (args.work / name).unlink(missing_ok=True)
    if args.images and not args.images.is_file():
        raise SystemExit(
            f"--images {args.images}: no such file; "
            "write it with python -m compacs.models.training.data FILE"
        )
    parts = data.split(data.unpack(args.images) if args.images else data.all_images())
    summary = train(parts["train"], parts["validation"], cfg, args.work, device=args.device)
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=1))
    print(
        f"final weights: {args.work / 'final.pt'}; next: python -m compacs.models.training.export"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
