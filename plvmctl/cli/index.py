"""`plvmctl index ...`: build and search FAISS indexes of image embeddings.

SOURCE is a LAION / clip-retrieval folder (img_emb/ + metadata/), a `.npy` file of vectors, or
a folder of images, embedded with the recipe's CLIP vision tower (the same embedder `search`
uses for its query photos).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

from ..errors import PlvmError
from .app import App, ReportingGroup


def _embedder() -> tuple[Callable[[list], np.ndarray], str | None]:
    """The backbone's `embed_images` as a numpy function, and the backbone's name.

    The main CLI puts an `App` in `ctx.obj`; any object with `.runtime.backbone.embed_images`
    works (tests pass a fake).
    """
    ctx = click.get_current_context()
    app: Any = ctx.find_object(App) or ctx.obj
    try:
        backbone = app.runtime.backbone
        embed_images = backbone.embed_images
    except AttributeError:
        raise PlvmError("embedding images needs a model: run this through `plvmctl` "
                        "(with --recipe)") from None

    def embed(images: list) -> np.ndarray:
        output = embed_images(images)
        if hasattr(output, "detach"):  # a torch tensor
            output = output.detach().float().cpu().numpy()
        return np.asarray(output, dtype=np.float32)

    return embed, getattr(backbone, "name", None)


@click.group(cls=ReportingGroup, name="index")
def index() -> None:
    """Nearest-neighbour indexes of image embeddings (FAISS), e.g. for Yo'LLaVA's hard negatives.

    \b
    plvmctl index build laion-shards/ --out laion.index
    plvmctl index build photos/ --out photos.index          # embeds the photos first
    plvmctl index search photos.index query.jpg -k 5
    """


@index.command("build")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Index file to write (its sidecar goes to INDEX.json).")
@click.option("--factory", default=None,
              help="FAISS index factory string [default: Flat up to 100 k vectors, IVF-SQ8 "
                   "up to 4 M, IVF-PQ above].")
@click.option("--metric", type=click.Choice(["ip", "l2"]), default="ip", show_default=True,
              help="Inner product on L2-normalised vectors (cosine), or L2 distance.")
@click.option("--gpu", is_flag=True, help="Run the IVF clustering on the GPU (faiss-gpu build).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None,
              help="Default IVF lists visited per query, stored with the index.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per embedder call (image folders).")
@click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Images per embeddings shard; an interrupted run resumes at a shard boundary.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where image-folder embeddings go [default: INDEX.embeddings/].")
@click.option("--train-sample", type=click.IntRange(min=1), default=None,
              help="Vectors to train on [default: enough for the index, under 2 GiB].")
@click.option("--model-name", default=None,
              help="Embedding model to record for LAION/.npy sources (e.g. ViT-L-14).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the training sample.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def build(source: Path, out_path: Path, factory: str | None, metric: str, gpu: bool,
          nprobe: int | None, batch_size: int, shard_size: int, work: Path | None,
          train_sample: int | None, model_name: str | None, seed: int, progress: bool) -> None:
    """Build an index of SOURCE and print its path and a one-line summary."""
    from .. import image_index
    from ..locks import hold
    from ..shards import current_process

    started = time.perf_counter()
    if gpu:
        image_index.check_gpu()  # before any embedding work
    kind = image_index.source_kind(source)
    if kind == "images":
        embed, backbone_name = _embedder()
        work = work or Path(str(out_path) + ".embeddings")
        if not _embed_my_shards(source, work, embed, batch_size, shard_size, backbone_name, progress):
            return  # not rank 0: rank 0 builds the index once every shard is embedded
        embedded = image_index.embed_image_folder(source, work, embed, batch_size=batch_size,
                                                  shard_size=shard_size, model_name=backbone_name,
                                                  progress=progress)
        if embedded.skipped:
            click.echo(image_index.describe_skipped(embedded.skipped), err=True)
        if embedded.reused_shards:
            click.echo(f"reused {embedded.reused_shards} complete embeddings shard(s) from {work}",
                       err=True)
        src = embedded.source
        model_name = model_name or backbone_name
    else:
        if not current_process().is_main:
            return  # vectors already embedded: nothing to split, rank 0 builds the index
        src = image_index.open_source(source)
    with hold(Path(f"{out_path}.lock"), f"the index {out_path}"):
        info = image_index.build_index(src, out_path, factory=factory, metric=metric,
                                       train_sample=train_sample, use_gpu=gpu, progress=progress,
                                       embedding_model=model_name, seed=seed,
                                       search_params={"nprobe": nprobe} if nprobe else None)
    seconds = time.perf_counter() - started
    click.echo(str(info.path))
    click.echo(f"{info.count} vectors, dim {info.dim}, {info.factory}, {info.metric}, "
               f"{seconds:.1f} s")


def _embed_my_shards(source: Path, work: Path, embed, batch_size: int, shard_size: int,
                     model_name: str | None, progress: bool) -> bool:
    """Under several processes (accelerate launch, torchrun), embed this rank's share of the
    embeddings shards (balanced by their photo counts; plvmctl.shards) and, on rank 0, wait
    until every shard is complete. True on the rank that goes on to build the index (rank 0,
    or the only process)."""
    from .. import image_index
    from ..shards import assign, barrier, current_process, wait_for

    process = current_process()
    if not process.several:
        return True
    sizes = image_index.shard_sizes(source, work, shard_size)
    mine = assign(sizes, process.world_size)[process.rank]
    image_index.embed_image_folder(source, work, embed, batch_size=batch_size, shard_size=shard_size,
                                   model_name=model_name, progress=progress and process.is_main,
                                   only=mine)
    barrier()
    if process.is_main:
        wait_for(lambda: image_index.all_shards_complete(work, len(sizes)),
                 lambda: f"embeddings shards of {source} missing in {work}")
    return process.is_main


def _query_vectors(images: tuple[Path, ...], vector_npy: Path | None,
                   batch_size: int) -> tuple[np.ndarray, list[str], str | None]:
    """Query vectors, their labels, and the embedding model's name (None for --vector-npy)."""
    if vector_npy is not None:
        if images:
            raise PlvmError("give IMAGE arguments or --vector-npy, not both")
        try:
            vectors = np.load(vector_npy, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise PlvmError(f"not a readable .npy file ({error}): {vector_npy}") from None
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        return vectors.astype(np.float32), [f"{vector_npy.name}[{i}]" for i in range(len(vectors))], None
    if not images:
        raise PlvmError("nothing to search for: give IMAGE arguments or --vector-npy FILE")
    from ..images import load_image

    embed, model_name = _embedder()
    blocks = []
    for begin in range(0, len(images), batch_size):
        blocks.append(embed([load_image(path) for path in images[begin:begin + batch_size]]))
    return np.concatenate(blocks), [str(path) for path in images], model_name


def _describe(metadata: dict[str, Any]) -> str:
    """url / caption / path of a hit, compactly."""
    parts = [str(metadata[key]) for key in ("path", "url") if metadata.get(key)]
    if metadata.get("caption"):
        caption = " ".join(str(metadata["caption"]).split())
        parts.append(repr(caption[:80] + ("…" if len(caption) > 80 else "")))
    return "  ".join(parts)


@index.command("search")
@click.argument("index_path", metavar="INDEX", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Hits per query.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per query.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="IVF lists visited per query.")
@click.option("--ef-search", type=click.IntRange(min=1), default=None, help="HNSW efSearch.")
@click.option("--dedup", type=click.FloatRange(0.0, 1.0), default=0.98, show_default=True,
              help="Cosine at which equal-score hits count as duplicates.")
@click.option("--no-dedup", is_flag=True, help="Keep near-duplicate hits.")
@click.option("--vector-npy", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Query vectors [q, d] from a .npy file instead of IMAGE arguments.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per embedder call.")
def search(index_path: Path, images: tuple[Path, ...], k: int, as_json: bool, nprobe: int | None,
           ef_search: int | None, dedup: float, no_dedup: bool, vector_npy: Path | None,
           batch_size: int) -> None:
    """Print the k nearest hits (id, score, url/caption/path) of each IMAGE."""
    from .. import image_index

    opened = image_index.open_index(index_path)
    if nprobe is not None or ef_search is not None:
        opened.set_search_params(nprobe=nprobe, efSearch=ef_search)
    queries, labels, model_name = _query_vectors(images, vector_npy, batch_size)
    built_with = opened.info.embedding_model
    if model_name and built_with and model_name != built_with:
        raise PlvmError(f"{index_path} holds embeddings of {built_with}, but this recipe's model "
                        f"is {model_name}; use the recipe the index was built with")
    results = opened.search(queries, k, dedup_threshold=None if no_dedup else dedup)
    for label, hits in zip(labels, results):
        if as_json:
            click.echo(json.dumps({"query": label, "hits": [hit.to_json() for hit in hits]},
                                  default=str, ensure_ascii=False))
            continue
        click.echo(label)
        for rank, hit in enumerate(hits, 1):
            click.echo(f"  {rank:>3}  id={hit.id}  score={hit.score:.4f}  {_describe(hit.metadata)}".rstrip())
