"""Embedding a folder of images into a resumable LAION-like work folder, shard by shard.

`plvmctl index build` indexes a folder of photos by first embedding them (with a caller-supplied
embedder, the recipe's CLIP vision tower in the CLI) into the same layout as a LAION folder, so
that one kind of source serves both. Shards are written atomically and a complete one is never
embedded again: an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from ..errors import PlvmError
from ..fileio import atomic_writer, write_json_atomic, write_text_atomic
from ..images import IMAGE_SUFFIXES, list_images, load_image
from .sources import EmbeddingSource, count_metadata_rows, map_npy, open_laion, unit_rows

log = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "plvmctl-embeddings"

Embedder = Callable[[list], np.ndarray]


@dataclass
class EmbeddedFolder:
    """The result of `embed_image_folder`: the work folder as a source, and what was skipped."""

    source: EmbeddingSource
    skipped: list[tuple[str, str]]  # (path, reason) of unreadable files, all shards
    embedded: int  # images embedded by this call (the rest came from completed shards)
    reused_shards: int  # shards found complete and not embedded again


def describe_skipped(skipped: Sequence[tuple[str, str]], first: int = 3) -> str:
    """One log line: how many images were skipped, the first few reasons, how many more."""
    shown = "; ".join(reason for _, reason in skipped[:first])
    more = f" (+{len(skipped) - first} more)" if len(skipped) > first else ""
    return f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''}: {shown}{more}"


def _shard_complete(work: Path, number: int) -> bool:
    """A shard is complete when its jsonl (written last) matches its .npy row count."""
    embeddings = work / "img_emb" / f"img_emb_{number}.npy"
    metadata = work / "metadata" / f"metadata_{number}.jsonl"
    if not (embeddings.is_file() and metadata.is_file()):
        return False
    try:
        return map_npy(embeddings).shape[0] == count_metadata_rows(metadata)
    except PlvmError:
        return False


def shard_sizes(folder: str | os.PathLike, work_dir: str | os.PathLike, shard_size: int) -> list[int]:
    """How many images each embeddings shard of `folder` holds (the last one may be short):
    what splitting the shards over processes balances."""
    files = list_images(Path(folder).resolve(), exclude=Path(work_dir).resolve())
    return [len(files[start:start + shard_size]) for start in range(0, len(files), shard_size)]


def all_shards_complete(work_dir: str | os.PathLike, count: int) -> bool:
    """True when shards 0..count-1 of the work folder are all complete."""
    return all(_shard_complete(Path(work_dir).resolve(), number) for number in range(count))


def embed_image_folder(folder: str | os.PathLike, work_dir: str | os.PathLike, embed: Embedder, *,
                       batch_size: int = 32, shard_size: int = 10_000,
                       model_name: str | None = None, progress: bool = True,
                       only: Sequence[int] | None = None) -> EmbeddedFolder | None:
    """Embed every image under `folder` into `work_dir` in the LAION-like layout, resumably.

    Files are listed recursively and sorted; shard N holds files [N*shard_size, (N+1)*shard_size).
    A shard is written as `img_emb/img_emb_N.npy` (float16, L2-normalised), then
    `metadata/skipped_N.json`, then `metadata/metadata_N.jsonl` (one {"path": ...} per row), each
    atomically: a shard whose jsonl exists is complete and is not embedded again, so an
    interrupted run continues from the last complete shard. `work_dir/manifest.json` pins the
    file list, shard size and model; a different one is refused rather than mixed in.
    Unreadable images are skipped and reported (count + first few), never fatal.
    `embed(images) -> [b, d]` is called with at most `batch_size` PIL images at a time.
    `only` (shard numbers) embeds just those shards, leaving the others to other processes
    (plvmctl.shards), and returns None: the folder is a source once every shard is complete.
    """
    folder = Path(folder).resolve()
    work = Path(work_dir).resolve()
    if not folder.is_dir():
        raise PlvmError(f"image folder not found: {folder}")
    if batch_size < 1 or shard_size < 1:
        raise PlvmError("batch_size and shard_size must be at least 1")
    files = list_images(folder, exclude=work)
    if not files:
        raise PlvmError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    relative = "\n".join(p.relative_to(folder).as_posix() for p in files)
    manifest = {"format": EMBEDDINGS_FORMAT, "version": 1, "folder": str(folder), "files": len(files),
                "files_sha256": hashlib.sha256(relative.encode("utf-8")).hexdigest(),
                "shard_size": shard_size, "model": model_name}
    manifest_path = work / "manifest.json"
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PlvmError(f"unreadable {manifest_path} ({error}); delete the work folder") from None
        if existing != manifest:
            changed = sorted(k for k in manifest if existing.get(k) != manifest[k])
            raise PlvmError(f"work folder {work} holds embeddings of a different run "
                            f"({', '.join(changed)} differ); delete it or choose another")
    else:
        write_json_atomic(manifest_path, manifest)

    skipped: list[tuple[str, str]] = []
    embedded = 0
    reused = 0
    dim: int | None = None
    shard_count = math.ceil(len(files) / shard_size)
    bar = tqdm(total=len(files), unit="img", desc="embedding", disable=not progress)
    try:
        for number in range(shard_count):
            shard_files = files[number * shard_size:(number + 1) * shard_size]
            skipped_path = work / "metadata" / f"skipped_{number}.json"
            if only is not None and number not in only:
                bar.update(len(shard_files))
                continue
            if _shard_complete(work, number):
                reused += 1
                if skipped_path.is_file():
                    skipped += [tuple(item) for item in json.loads(skipped_path.read_text("utf-8"))]
                array = map_npy(work / "img_emb" / f"img_emb_{number}.npy")
                if array.shape[0]:
                    dim = int(array.shape[1])
                bar.update(len(shard_files))
                continue
            rows: list[str] = []
            blocks: list[np.ndarray] = []
            shard_skipped: list[tuple[str, str]] = []
            for begin in range(0, len(shard_files), batch_size):
                batch = shard_files[begin:begin + batch_size]
                images, paths = [], []
                for path in batch:
                    try:
                        images.append(load_image(path))
                        paths.append(str(path))
                    except PlvmError as error:
                        shard_skipped.append((str(path), str(error)))
                if images:
                    vectors = np.asarray(embed(images), dtype=np.float32)
                    if vectors.ndim != 2 or vectors.shape[0] != len(images):
                        raise PlvmError(f"the embedder returned shape {list(vectors.shape)} for "
                                        f"{len(images)} images")
                    if not np.isfinite(vectors).all():
                        raise PlvmError("the embedder returned NaN or infinite values")
                    if dim is not None and vectors.shape[1] != dim:
                        raise PlvmError(f"the embedder returned dimension {vectors.shape[1]}, "
                                        f"earlier shards have {dim}")
                    dim = int(vectors.shape[1])
                    blocks.append(unit_rows(vectors))
                    rows += paths
                    embedded += len(images)
                for image in images:
                    image.close()
                bar.update(len(batch))
            data = (np.concatenate(blocks) if blocks else np.zeros((0, dim or 0), np.float32))
            with atomic_writer(work / "img_emb" / f"img_emb_{number}.npy") as handle:
                np.save(handle, data.astype(np.float16))
            write_json_atomic(skipped_path, [list(item) for item in shard_skipped])
            write_text_atomic(work / "metadata" / f"metadata_{number}.jsonl",
                              "".join(json.dumps({"path": p}) + "\n" for p in rows))
            skipped += shard_skipped
    finally:
        bar.close()
    if only is not None:
        return None
    if skipped:  # the caller reports them (the CLI prints this line)
        log.info("%s", describe_skipped(skipped))
    source = open_laion(work)
    source.kind = "images"
    return EmbeddedFolder(source, skipped, embedded, reused)
