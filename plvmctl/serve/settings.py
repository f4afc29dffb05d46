"""The recipe's `serve:` section: batching and the limits on what one request may send."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlvmError


@dataclass
class ServeSettings:
    """How the server gathers requests and what it accepts (413 above the byte and pixel
    limits, 400 above the others)."""

    max_batch: int = 16  # rows in one batched `ask`
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others
    max_body_bytes: int = 20_000_000  # a whole request body (base64 photos inside)
    max_image_bytes: int = 10_000_000  # one photo's file bytes
    max_image_pixels: int = 25_000_000  # one photo's width x height, read before decoding
    max_images: int = 4  # photos in one request (models that take one photo: 1)
    max_tokens: int = 1024  # the largest `max_tokens` a request may ask for
    max_question_chars: int = 20_000  # the question's text

    def validate(self) -> "ServeSettings":
        for key in ("max_batch", "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images",
                    "max_tokens", "max_question_chars"):
            if getattr(self, key) < 1:
                raise PlvmError(f"serve.{key}: must be at least 1")
        if self.max_wait_ms < 0:
            raise PlvmError("serve.max_wait_ms: must be 0 or more")
        return self


def serve_settings(recipe) -> ServeSettings:
    """The recipe's `serve:` section, defaults filled in, checked."""
    return recipe.section("serve", ServeSettings).validate()
