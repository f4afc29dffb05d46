"""The HTTP routes (FastAPI): chat completions, models, health and the caller's concepts.

Every route that touches concepts authenticates first (users.py) and then works in the
caller's own store only. Photos are decoded and concepts loaded in the thread pool, never
on the event loop; the model runs only on the batcher's thread. Every refusal is an
OpenAI-style error object (faults.py), and an unexpected failure a plain 500 whose
traceback stays in the server's log.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..concept import Concept, validate_name
from ..engine import AskRequest
from ..errors import PlvmError
from ..prompt import mentioned_names
from .batcher import AskJob, Batcher
from .chat import (ChatRequest, chunk, completion, completion_id, finish_reason, parse_chat, pieces, split_reasoning,
                   usage)
from .concepts import ConceptCache
from .faults import ApiError, bad_request, conflict, internal, not_found, too_large, unauthorized
from .photos import photo_from_url
from .settings import ServeSettings
from .users import Caller

log = logging.getLogger(__name__)


@dataclass
class Service:
    """What the routes share: the loaded model, the settings, the users, the model thread."""

    runtime: object
    settings: ServeSettings
    users: object  # users.LocalUser or users.KeyedUsers
    batcher: Batcher
    concepts: ConceptCache
    photo_folder: Path | None = None
    in_flight: int = 0  # chat requests being answered now (changed on the event loop only)

    @property
    def model_id(self) -> str:
        return self.runtime.recipe.name


def _own_names(caller: Caller) -> str:
    names = caller.store.names()
    return ", ".join(f"<{n}>" for n in names) if names else "none yet (add one: POST /v1/concepts)"


def _concept_name(name, param: str) -> str:
    if not isinstance(name, str):
        raise bad_request("name must be a string", param, "invalid_concept_name")
    try:
        return validate_name(name)
    except PlvmError as error:
        raise bad_request(str(error), param, "invalid_concept_name") from None


def _load_concepts(service: Service, caller: Caller, question: str) -> dict[str, Concept]:
    """The question's `<name>`s from the caller's store, checked against the model; a name the
    caller does not have is an error that lists the caller's names only."""
    concepts = {}
    for name in mentioned_names(question):
        _concept_name(name, "messages")
        if name not in caller.store:
            raise bad_request(f"unknown concept <{name}> (your concepts: {_own_names(caller)})", "messages",
                              "unknown_concept")
        try:
            concepts[name] = service.concepts.load(caller.store, name)
        except PlvmError as error:
            raise bad_request(f"concept <{name}> cannot be used: "
                              f"{str(error).replace(str(caller.store.root), 'your store')}", "messages",
                              "unusable_concept") from None
    return concepts


def _prepare(service: Service, caller: Caller, chat: ChatRequest) -> AskJob:
    """The job for one chat request: its concepts loaded and its photos decoded."""
    if len(chat.image_urls) > 1 and not service.runtime.backbone.multi_image:
        raise bad_request(f"too many images ({len(chat.image_urls)}): this model takes one photo per question",
                          "messages", "too_many_images")
    concepts = _load_concepts(service, caller, chat.question)
    photos = [photo_from_url(url, service.settings, service.photo_folder) for url in chat.image_urls]
    image = None if not photos else photos[0] if len(photos) == 1 else photos
    return AskJob(caller.name, AskRequest(chat.question, image), concepts, chat.decoding)


async def _read_json(request: Request, limit: int) -> dict:
    """The request's JSON object, read up to `limit` bytes (413 beyond)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(f"request body larger than {limit:,} bytes")
    body = bytearray()
    async for piece in request.stream():
        body.extend(piece)
        if len(body) > limit:
            raise too_large(f"request body larger than {limit:,} bytes")
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"malformed JSON body: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the JSON body must be an object", code="invalid_json")
    return data


def _sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def create_app(service: Service) -> FastAPI:
    """The FastAPI application over `service`; it starts and stops the batcher's thread."""

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        await run_in_threadpool(service.batcher.stop)  # in-flight requests are done by now

    app = FastAPI(title="plvmctl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(ApiError(error.status_code, str(error.detail), code=code).body(),
                            status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        return JSONResponse(bad_request("invalid request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):
        log.exception("unexpected failure on %s %s", request.method, request.url.path)
        return JSONResponse(internal().body(), status_code=500)

    async def caller_of(request: Request) -> Caller:
        if not service.users.keyed:
            return service.users.authenticate(None)
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized("missing API key: send the header Authorization: Bearer KEY")
        caller = await run_in_threadpool(service.users.authenticate, key.strip())
        if caller is None:
            raise unauthorized("invalid API key")
        return caller

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_id, "in_flight": service.in_flight,
                "waiting": service.batcher.waiting, **service.batcher.counts}

    @app.get("/v1/models")
    async def models(request: Request):
        await caller_of(request)
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": 0,
                                            "owned_by": "plvmctl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        caller = await caller_of(request)
        body = await _read_json(request, service.settings.max_body_bytes)
        chat = parse_chat(body, service.settings, service.runtime.recipe.generation.max_new_tokens)
        if chat.model is not None and chat.model != service.model_id:
            raise not_found(f"unknown model {chat.model!r} (this server serves {service.model_id!r})",
                            "model_not_found")
        job = await run_in_threadpool(_prepare, service, caller, chat)
        future = service.batcher.submit(job)
        ident = completion_id()
        if chat.stream:
            return StreamingResponse(_stream(service, chat, future, ident), media_type="text/event-stream")
        service.in_flight += 1
        try:
            result = await asyncio.wrap_future(future)
        finally:
            service.in_flight -= 1
        if not result.ok:
            raise internal(f"the model failed on this request: {result.error}")
        return completion(ident, service.model_id, result.answer, result.prompt_tokens, result.completion_tokens,
                          chat.decoding, service.runtime.recipe.model.reasoning)

    @app.get("/v1/concepts")
    async def list_concepts(request: Request):
        caller = await caller_of(request)
        return {"object": "list", "data": await run_in_threadpool(_describe_all, caller)}

    @app.post("/v1/concepts", status_code=201)
    async def add_concept(request: Request):
        caller = await caller_of(request)
        body = await _read_json(request, service.settings.max_body_bytes)
        name = _concept_name(body.get("name"), "name")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise bad_request("force must be true or false", "force")
        if not isinstance(body.get("image"), str):
            raise bad_request("image is required: a data: URL of the reference photo", "image")
        if name in caller.store and not force:
            raise conflict(f"concept <{name}> already exists (send \"force\": true to replace it)",
                           "concept_exists")
        photo = await run_in_threadpool(photo_from_url, body["image"], service.settings, service.photo_folder,
                                        "image")
        try:
            concept = await asyncio.wrap_future(service.batcher.call(
                lambda: service.runtime.encode_concept(name, photo)))
            await run_in_threadpool(caller.store.save, concept, force)
        except PlvmError as error:
            if name in caller.store and not force:  # another request saved it meanwhile
                raise conflict(f"concept <{name}> already exists (send \"force\": true to replace it)",
                               "concept_exists") from None
            raise internal(f"could not encode <{name}>: {str(error).replace(str(caller.store.root), 'your store')}") \
                from None
        return _describe(concept)

    @app.delete("/v1/concepts/{name}")
    async def delete_concept(name: str, request: Request):
        caller = await caller_of(request)
        _concept_name(name, "name")
        if name not in caller.store:
            raise not_found(f"unknown concept <{name}> (your concepts: {_own_names(caller)})", "unknown_concept")
        try:
            await run_in_threadpool(caller.store.remove, name)
        except PlvmError:  # removed by another request meanwhile
            raise not_found(f"unknown concept <{name}>", "unknown_concept") from None
        return {"id": name, "object": "concept", "deleted": True}

    return app


def _describe(concept: Concept) -> dict:
    return {"id": concept.name, "object": "concept", "method": concept.meta.method, "k": concept.num_context,
            "created": concept.meta.created}


def _describe_all(caller: Caller) -> list[dict]:
    described = []
    for name in caller.store.names():
        try:
            described.append(_describe(caller.store.load(name)))
        except PlvmError:
            described.append({"id": name, "object": "concept", "error": "unreadable"})
    return described


async def _stream(service: Service, chat: ChatRequest, future, ident: str):
    """Server-sent events as OpenAI streams them. The answer comes whole from the batch; its
    words follow one event each (a comparison the model makes first as `reasoning_content`
    deltas, then the conclusion as `content`). A client that leaves before its answer cancels
    its job."""
    model = service.model_id
    service.in_flight += 1
    try:
        yield _sse(chunk(ident, model, {"role": "assistant", "content": ""}))
        result = await asyncio.wrap_future(future)
        if not result.ok:
            yield _sse(internal(f"the model failed on this request: {result.error}").body())
            return
        content, thought = split_reasoning(result.answer, service.runtime.recipe.model.reasoning)
        for piece in pieces(thought) if thought else []:
            yield _sse(chunk(ident, model, {"reasoning_content": piece}))
        for piece in pieces(content):
            yield _sse(chunk(ident, model, {"content": piece}))
        yield _sse(chunk(ident, model, {}, finish_reason(result.completion_tokens, chat.decoding)))
        if chat.include_usage:
            yield _sse(chunk(ident, model, None, usage_=usage(result.prompt_tokens, result.completion_tokens)))
        yield _sse("[DONE]")
    finally:
        service.in_flight -= 1
        future.cancel()  # no effect once the job ran
