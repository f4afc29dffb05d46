"""The chat-completions request and response, in OpenAI's shapes.

A request becomes one question for the engine: the last message, which must be the user's,
is the question (its text parts joined by a newline) with its photos; when it has none, the
photos of the latest earlier user message that had some (as `plvmctl chat` keeps the photo
across questions). The engine's prompt is one turn, so earlier texts and system messages do
not reach the model.

Decoding: without `temperature` (or with 0) the answer is greedy, the recipe's decoding and
the answer `plvmctl ask` gives; `temperature` > 0 samples (with `top_p`), and a `seed` makes
a sampled answer repeatable.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from ..answers import conclusion
from .faults import bad_request
from .settings import ServeSettings

ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass(frozen=True)
class Decoding:
    """How one request is decoded; requests with equal decoding can share a batch."""

    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


@dataclass
class ChatRequest:
    """What the engine needs of a chat-completions body, checked."""

    question: str
    image_urls: list[str]
    decoding: Decoding
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    extra: dict = field(default_factory=dict)


def _number(body: dict, key: str, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise bad_request(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not low <= value <= high:
        raise bad_request(f"{key} must be between {low} and {high}, got {value!r}", key)
    return value


def _parts(content, where: str) -> tuple[list[str], list[str]]:
    """(texts, image urls) of one message's content: a string or a list of typed parts."""
    if isinstance(content, str):
        return [content], []
    if content is None:
        return [], []
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", "messages")
    texts, urls = [], []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise bad_request(f"{where}.content[{number}].image_url.url must be a string", "messages")
            urls.append(url)
        else:
            raise bad_request(f"{where}.content[{number}]: expected a part {{\"type\": \"text\", \"text\": ...}} "
                              "or {\"type\": \"image_url\", \"image_url\": {\"url\": ...}}", "messages")
    return texts, urls


def parse_chat(body: dict, settings: ServeSettings, default_max_tokens: int) -> ChatRequest:
    """The checked request; ApiError (400) naming the first thing wrong."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages is required: a non-empty list of {\"role\", \"content\"}", "messages")
    photos: list[str] = []
    texts: list[str] = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad_request(f"{where} must be an object with a role ({', '.join(ROLES)}) and content",
                              "messages")
        texts, urls = _parts(message.get("content"), where)
        if message["role"] == "user" and urls:
            photos = urls
    last = messages[-1]
    if last["role"] != "user":
        raise bad_request("the last message must be the user's question", "messages")
    question = "\n".join(texts).strip()
    if not question:
        raise bad_request("the last user message has no text: ask a question", "messages")
    if len(question) > settings.max_question_chars:
        raise bad_request(f"the question is longer than {settings.max_question_chars:,} characters", "messages")
    if len(photos) > settings.max_images:
        raise bad_request(f"too many images ({len(photos)}; at most {settings.max_images})", "messages",
                          "too_many_images")
    if body.get("n") not in (None, 1):
        raise bad_request("n must be 1 (one answer per request)", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({key: limit}, key, 1, settings.max_tokens, integer=True) or default_max_tokens
    temperature = _number(body, "temperature", 0, 2) or 0.0
    top_p = _number(body, "top_p", 0, 1)
    if top_p is not None and top_p <= 0:
        raise bad_request("top_p must be above 0", "top_p")
    seed = _number(body, "seed", -2 ** 63, 2 ** 63 - 1, integer=True)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    decoding = Decoding(max_tokens=int(max_tokens), temperature=float(temperature),
                        top_p=float(top_p if top_p is not None else 1.0),
                        seed=None if seed is None else int(seed))
    return ChatRequest(question, photos, decoding, model, stream, bool(options.get("include_usage")))


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(completion_tokens: int, decoding: Decoding) -> str:
    return "length" if completion_tokens >= decoding.max_tokens else "stop"


def split_reasoning(answer: str, reasoning: str) -> tuple[str, str | None]:
    """(content, reasoning_content) of an answer: for a model that compares before it answers
    (recipe model.reasoning), the content is what it concludes (what `plvmctl ask` prints) and
    the comparison before it goes into `reasoning_content`, the field OpenAI-compatible servers
    (vLLM's reasoning parsers) use for it; otherwise the whole answer and None."""
    content = conclusion(answer, reasoning)
    if content == answer:
        return answer, None
    return content, answer[:answer.rindex(content)].strip() if content in answer else None


def completion(ident: str, model: str, answer: str, prompt_tokens: int, completion_tokens: int,
               decoding: Decoding, reasoning: str = "none") -> dict:
    """A whole `chat.completion` object."""
    content, thought = split_reasoning(answer, reasoning)
    message = {"role": "assistant", "content": content}
    if thought is not None:
        message["reasoning_content"] = thought
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": finish_reason(completion_tokens, decoding), "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(ident: str, model: str, delta: dict | None, finish: str | None = None,
          usage_: dict | None = None) -> dict:
    """One `chat.completion.chunk` of a stream (no choices: the closing usage chunk)."""
    body = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                  "logprobs": None}]}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def pieces(answer: str) -> list[str]:
    """The answer cut into words with their following spaces: a stream's content deltas
    (joined, they are the answer exactly)."""
    return re.findall(r"\s*\S+\s*?(?=\s|$)|\s+$", answer) or [answer]
