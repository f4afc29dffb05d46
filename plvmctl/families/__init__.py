"""Model families behind the `Backbone` interface, one module each, chosen by `model_type`.

A family module defines a `Backbone` subclass that says which transformers class loads the
model, what the model's own chat template is, how many `<image>` slots a photo fills and what
the model's forward takes for photos. Adding a family is one module plus one line here.
"""

from __future__ import annotations

from ..errors import PlvmError
from .llava15 import Llava15Backbone
from .onevision import OneVisionBackbone

FAMILIES = (Llava15Backbone, OneVisionBackbone)


def family_for(model_type: str, source: str = "the model"):
    """The Backbone subclass for a config's `model_type`, or a one-line error."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for family in FAMILIES for t in family.model_types)
    raise PlvmError(f"model {source!r} is a {model_type!r} model; supported: {supported}")
