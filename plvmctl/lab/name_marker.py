"""A shared learned part in every name vector: name = marker + a random identity part.

A name token's vector (`lvlm.name_vectors`) is fresh and random per row, so nothing in it says
"this is a name": the LM cannot tell a name from a word it has not learned well, nor find the
latest name before a word (which person a sentence is about). `NameMarker` holds one learned
vector, `marker` [H], added to every name's random part; the random part carries who it is
(scaled by `identity_scale` times the word embeddings' scale). The same sum is the name's
input embedding and its output-head row, as with plain name vectors. At ask time a concept
table would add the same learned marker to each concept's vector.
"""

from __future__ import annotations

import torch


class NameMarker(torch.nn.Module):
    """The learned marker shared by all names, and how large their random identity part is."""

    def __init__(self, hidden: int, scale: float, identity_scale: float = 1.0) -> None:
        super().__init__()
        self.marker = torch.nn.Parameter(torch.randn(hidden) * scale)
        self.identity_scale = identity_scale

    def vectors(self, model, rows: int, count: int) -> torch.Tensor:
        """[rows, count, H] fresh names: the marker plus a random part at `identity_scale`
        times the word embeddings' scale (what `lvlm.name_vectors` draws)."""
        scale = model.get_input_embeddings().weight.detach().float().std() * self.identity_scale
        return self.marker + torch.randn(rows, count, self.marker.shape[0]) * scale
