"""Putting the server together: the service of a loaded runtime, and uvicorn running it.

uvicorn handles SIGTERM and Ctrl-C gracefully: it stops accepting connections, lets the
requests in flight finish, then the app's shutdown stops the model thread.
"""

from __future__ import annotations

from pathlib import Path

import uvicorn

from ..errors import PlvmError
from .app import Service, create_app
from .batcher import Batcher
from .concepts import ConceptCache
from .settings import serve_settings
from .users import KeyedUsers, LocalUser

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_service(runtime, store, users_file: str | None = None, stores: str | None = None,
                  photo_folder: str | None = None) -> Service:
    """The service over `runtime`: with a users file, each user's store is `stores/NAME`
    (default: the folder `stores` beside the users file); without, one local user whose store
    is `store`."""
    settings = serve_settings(runtime.recipe)
    if users_file is not None:
        folder = Path(stores) if stores else Path(users_file).resolve().parent / "stores"
        users = KeyedUsers(users_file, folder)
    else:
        if stores is not None:
            raise PlvmError("--stores is for --users (without, the one local user has the --store folder)")
        users = LocalUser(store)
    photos = None
    if photo_folder is not None:
        photos = Path(photo_folder)
        if not photos.is_dir():
            raise PlvmError(f"photo folder not found: {photo_folder}")
    runtime.aligner  # load the reference encoder and the Aligner now, not on the first request
    return Service(runtime, settings, users, Batcher(runtime, settings), ConceptCache(runtime), photos)


def check_host(host: str, keyed: bool) -> None:
    if not keyed and host not in LOOPBACK_HOSTS:
        raise PlvmError(f"--host {host}: without --users the server has one local user and no keys, so it "
                        "listens on 127.0.0.1 only (make keys: plvmctl serve add-user NAME)")


def uvicorn_server(service: Service, host: str, port: int, log_level: str = "info") -> uvicorn.Server:
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                            access_log=log_level == "debug", lifespan="on")
    return uvicorn.Server(config)
