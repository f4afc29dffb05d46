"""A shared learned part in every name vector: name = marker + a random identity part.

A name token's vector (`lvlm.name_vectors`) is fresh and random per row, so nothing in it says
"this is a name": the LM cannot tell a name from a word it has not learned well, nor find the
latest name before a word (which person a sentence is about). `NameMarker` holds one learned
vector, `marker` [H], added to every name's random part; the random part carries who it is
(scaled by `identity_scale` times the word embeddings' scale). The same sum is the name's
input embedding and its output-head row, as with plain name vectors. At ask time a concept
table would add the same learned marker to each concept's vector.

With `slots` above 1 there is one learned marker per name slot: the i-th name of a prompt
(name token `name_id + i`, as `lvlm.encode_rows` and the concept table number concepts) gets
the i-th marker, so the part that tells names apart is learned like a word's embedding, and
the random part only says which concept it is to the output head.
"""

from __future__ import annotations

import torch


class NameMarker(torch.nn.Module):
    """The learned marker shared by all names, and how large their random identity part is."""

    def __init__(self, hidden: int, scale: float, identity_scale: float = 1.0, slots: int = 1) -> None:
        super().__init__()
        shape = (hidden,) if slots == 1 else (slots, hidden)
        self.marker = torch.nn.Parameter(torch.randn(*shape) * scale)
        self.identity_scale = identity_scale

    def vectors(self, model, rows: int, count: int) -> torch.Tensor:
        """[rows, count, H] fresh names: the marker plus a random part at `identity_scale`
        times the word embeddings' scale (what `lvlm.name_vectors` draws); the i-th name gets
        the i-th slot's marker when there are several."""
        scale = model.get_input_embeddings().weight.detach().float().std() * self.identity_scale
        marker = self.marker if self.marker.dim() == 1 else self.marker[:count]
        return marker + torch.randn(rows, count, self.marker.shape[-1]) * scale
