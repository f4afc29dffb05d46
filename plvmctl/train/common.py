"""Loop bits shared by the trainers: seeding, RNG state, checkpoints, logs, curves, Ctrl-C.

Everything here is small and explicit (torchtune style); a trainer is a plain `for` loop that
calls these helpers:

* `seed_everything`, `capture_rng_state` / `restore_rng_state`: python, numpy and torch
  (CPU and every CUDA device) generators, as plain tensors and numbers.
* `save_checkpoint` / `load_checkpoint`: a checkpoint is a folder written atomically (built
  in a temporary folder next to it, then renamed into place). It holds the trained module as
  an Aligner folder (config.json + model.safetensors), `trainer.pt` (optimizer, scheduler and
  RNG state: a plain dict of tensors and numbers, saved with `torch.save` and read back with
  `torch.load(weights_only=True)` only) and `state.json` (step, losses, sampler state: what a
  person may want to read).
* `lr_multiplier`: constant or cosine decay after an optional linear warm-up.
* `JsonlLogger`: one JSON object a line, flushed at once (OUT/log.jsonl).
* `draw_loss_curve`: the loss-curve PNG, drawn with Pillow.
* `InterruptFlag`: turns the first Ctrl-C (SIGINT) into a flag the loop checks after each
  step, so the checkpoint saved on the way out is the state after a whole step; a second
  Ctrl-C interrupts at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..errors import PlvmError
from ..fileio import (atomic_folder, sha256_file, write_bytes_atomic, write_image_atomic,
                      write_json_atomic, writing)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_MODULE = "aligner"  # the trained module, as an Aligner folder
CHECKPOINT_TENSORS = "trainer.pt"  # optimizer + scheduler + RNG (weights_only-loadable)
CHECKPOINT_STATE = "state.json"  # step, losses, sampler state, config
CHECKPOINT_FORMAT = "plvmctl.train-checkpoint"
CHECKPOINT_VERSION = 1
SCHEDULES = ("constant", "cosine")


class TrainingInterrupted(PlvmError):
    """Training stopped on Ctrl-C after saving a checkpoint; `--resume` continues it."""


# --------------------------------------------------------------------------------------------
# Seeds and random states
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The state of every global generator, as tensors and numbers only (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),  # 625 numbers < 2**32
            "gauss": gauss,  # None or a float
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` returned (CUDA states only if the devices match)."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["internal"].tolist()),
                     python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32),
                         numpy["position"], numpy["has_gauss"], numpy["cached"]))
    torch.random.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int = 0,
                  schedule: str = "constant") -> float:
    """The factor applied to the base lr at optimizer step `step` (0-based).

    Linear warm-up from 1/(warmup+1) to 1 over `warmup_steps` steps, then either constant or a
    cosine decay to 0 at `total_steps`.
    """
    if schedule not in SCHEDULES:
        raise PlvmError(f"unknown lr schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                   schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_multiplier` (its state dict holds only numbers)."""
    lr_multiplier(0, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule)

    def factor(step: int) -> float:
        return lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps,
                             schedule=schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_checkpoint(out_dir: str | os.PathLike, *, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, rng: dict[str, Any],
                    state: dict[str, Any],
                    save_module: Callable[[torch.nn.Module, Path], Any]) -> Path:
    """Write OUT/checkpoint atomically and return its path.

    `save_module(module, folder)` writes the trained module (for PLVM: `save_aligner`);
    `state` is JSON-ready (step, losses, sampler state...); `rng` comes from
    `capture_rng_state`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / CHECKPOINT_DIR
    with atomic_folder(folder) as tmp:
        save_module(module, tmp / CHECKPOINT_MODULE)
        tensors = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "rng": rng}
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        write_bytes_atomic(tmp / CHECKPOINT_TENSORS, buffer.getvalue())
        write_json_atomic(tmp / CHECKPOINT_STATE, {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state})
    return folder


def find_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """OUT/checkpoint if complete, else the newest complete backup left by a crash, else None."""
    out = Path(out_dir)
    candidates = [out / CHECKPOINT_DIR]
    if out.is_dir():
        backups = sorted(out.glob(f".{CHECKPOINT_DIR}.*.old"), key=lambda p: p.stat().st_mtime,
                         reverse=True)
        candidates += backups
    for candidate in candidates:
        if (candidate / CHECKPOINT_STATE).is_file() and (candidate / CHECKPOINT_TENSORS).is_file():
            return candidate
    return None


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint folder: (state from state.json, tensors from trainer.pt).

    `trainer.pt` is read with `torch.load(weights_only=True)`: no pickled code runs.
    The module itself is in `folder/aligner` (load it with the trainer's own loader).
    """
    folder = Path(folder)
    state_path = folder / CHECKPOINT_STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PlvmError(f"cannot read checkpoint {state_path}: {error}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PlvmError(f"{state_path} is not a plvmctl training checkpoint")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise PlvmError(f"{state_path} has format_version {state.get('format_version')!r}; this "
                        f"plvmctl reads version {CHECKPOINT_VERSION}")
    tensors_path = folder / CHECKPOINT_TENSORS
    try:
        tensors = torch.load(tensors_path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PlvmError(f"cannot read {tensors_path} (weights only): {reason}") from None
    if not isinstance(tensors, dict) or not {"optimizer", "scheduler", "rng"} <= set(tensors):
        raise PlvmError(f"{tensors_path} lacks optimizer, scheduler or rng state")
    return state, tensors


# --------------------------------------------------------------------------------------------
# Logs and the loss curve
# --------------------------------------------------------------------------------------------


class JsonlLogger:
    """Append one JSON object per line to `path`, flushed at once (a crash loses no line)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        with writing(self.path):
            self._handle.write(json.dumps(row) + "\n")
            self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete JSON line of `path` ([] if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(row, dict):
            rows.append(row)
    return rows


def rounded_mean(values: list[float]) -> float | None:
    """The mean of `values` to 4 places, for a card or a log (None when there are none)."""
    return round(sum(values) / len(values), 4) if values else None


def truncate_log(path: str | os.PathLike, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite the JSONL log atomically with only the rows `keep` accepts (used on resume)."""
    from ..fileio import write_text_atomic

    path = Path(path)
    if path.is_file():
        rows = [row for row in read_jsonl(path) if keep(row)]
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round numbers spanning [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


def draw_loss_curve(steps: Iterable[int], losses: Iterable[float], path: str | os.PathLike,
                    title: str = "training loss", size: tuple[int, int] = (640, 400)) -> Path:
    """Draw loss against step as a PNG with Pillow (raw curve grey, running mean blue)."""
    from PIL import Image, ImageDraw

    xs = [int(s) for s in steps]
    ys = [float(v) for v in losses]
    points = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    plot = (left, top, width - right, height - bottom)
    draw.rectangle(plot, outline="black")
    if points:
        x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
        y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
        if x_high == x_low:
            x_high = x_low + 1
        if y_high == y_low:
            y_low, y_high = y_low - 0.5, y_high + 0.5

        def to_pixel(x: float, y: float) -> tuple[float, float]:
            px = plot[0] + (x - x_low) / (x_high - x_low) * (plot[2] - plot[0])
            py = plot[3] - (y - y_low) / (y_high - y_low) * (plot[3] - plot[1])
            return px, py

        for tick in _nice_ticks(y_low, y_high):
            _, py = to_pixel(x_low, tick)
            draw.line([(plot[0] - 4, py), (plot[0], py)], fill="black")
            draw.text((4, py - 6), f"{tick:.3g}", fill="black")
        for tick in _nice_ticks(x_low, x_high):
            px, _ = to_pixel(tick, y_low)
            draw.line([(px, plot[3]), (px, plot[3] + 4)], fill="black")
            draw.text((px - 10, plot[3] + 8), f"{tick:g}", fill="black")
        draw.text(((plot[0] + plot[2]) // 2 - 12, height - 16), "step", fill="black")
        raw = [to_pixel(x, y) for x, y in points]
        if len(raw) > 1:
            draw.line(raw, fill=(170, 170, 170), width=1)
            window = max(1, len(points) // 20)
            smooth = []
            for i in range(len(points)):
                chunk = points[max(0, i - window + 1): i + 1]
                smooth.append(to_pixel(points[i][0], sum(y for _, y in chunk) / len(chunk)))
            draw.line(smooth, fill=(30, 90, 200), width=2)
        else:
            x, y = raw[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 90, 200))
    path = Path(path)
    write_image_atomic(path, image)
    return path


# --------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------


class InterruptFlag:
    """While active, the first SIGINT only sets `.raised`; a second one raises at once.

    Installed only from the main thread (signal handlers cannot be set elsewhere); the
    previous handler comes back on exit.
    """

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


# --------------------------------------------------------------------------------------------
# What a trained concept was made from (per-concept trainers record both in the concept)


def config_digest(config) -> str:
    """sha256 of a trainer's settings dataclass, the output folder (`out`) excluded."""
    settings = {key: value for key, value in dataclasses.asdict(config).items() if key != "out"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def photos_digest(photos) -> str:
    """sha256 over the photos' own sha256s, in order."""
    digest = hashlib.sha256()
    for photo in photos:
        digest.update(sha256_file(photo).encode())
    return digest.hexdigest()
