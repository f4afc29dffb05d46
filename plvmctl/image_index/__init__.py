"""FAISS indexes of image embeddings, searched for nearest neighbours: Yo'LLaVA's hard negatives.

Embeddings come in shards of `[n, d]` `.npy` files with row-aligned metadata (sources.py): a
LAION / clip-retrieval folder, a folder of images embedded into that layout (embed.py), or one
plain `.npy` file. `build_index` (build.py) picks an index type for the size (factory.py), trains
and fills it, and writes `INDEX` plus the sidecar `INDEX.json` (sidecar.py). `open_index`
(search.py) memory-maps it for `search`, `hard_negatives` and `random_negatives`.

This package indexes pools of photos by what they look like; who is in a photo is
recognise.py's and concept_index.py's question.
"""

from .build import build_index
from .embed import EmbeddedFolder, Embedder, all_shards_complete, describe_skipped, embed_image_folder, shard_sizes
from .factory import EXACT_LIMIT, LARGE_LIMIT, METRICS, SQ_LIMIT, check_gpu, choose_factory
from .search import DEDUP_SCORE_EPSILON, Hit, OpenedIndex, hard_negatives, open_index, random_negatives
from .sidecar import IndexInfo, read_sidecar, sidecar_path
from .sources import EmbeddingSource, Shard, open_laion, open_npy, open_source, source_kind

__all__ = [
    "DEDUP_SCORE_EPSILON", "EXACT_LIMIT", "LARGE_LIMIT", "METRICS", "SQ_LIMIT",
    "EmbeddedFolder", "Embedder", "EmbeddingSource", "Hit", "IndexInfo", "OpenedIndex", "Shard",
    "all_shards_complete", "build_index", "check_gpu", "choose_factory", "describe_skipped", "embed_image_folder",
    "hard_negatives", "open_index", "open_laion", "open_npy", "open_source", "random_negatives",
    "read_sidecar", "shard_sizes", "sidecar_path", "source_kind",
]
