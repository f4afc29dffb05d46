"""`plvmctl serve`: the OpenAI-compatible HTTP server (plvmctl/serve), and its users' keys."""

from __future__ import annotations

import click

from ..errors import PlvmError
from .app import App

pass_app = click.make_pass_decorator(App)
EXTRA_MISSING = 'plvmctl serve needs the serve extra: pip install -e ".[serve]" (FastAPI and uvicorn)'


@click.group(invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--users", "users_file", type=click.Path(dir_okay=False),
              help="Users file (`serve add-user`): requests need a key, each user has a store. "
                   "Without it: one local user, the --store folder, 127.0.0.1 only.")
@click.option("--stores", type=click.Path(file_okay=False),
              help="With --users: the folder of the users' stores, one STORES/NAME each "
                   "[default: stores/ beside the users file].")
@click.option("--photos", "photo_folder", type=click.Path(file_okay=False),
              help="Let requests name photos in this folder by path (otherwise data: URLs only).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.pass_context
def serve(ctx, host, port, users_file, stores, photo_folder, log_level):
    """Serve the recipe's model over HTTP with OpenAI's chat API (see docs/serving.md).

    \b
    POST /v1/chat/completions   text and image_url parts, <name>s from the caller's store
    GET  /v1/models, /health
    POST /v1/concepts, GET /v1/concepts, DELETE /v1/concepts/NAME
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        from ..serve.server import build_service, check_host, uvicorn_server
    except ImportError as error:
        raise PlvmError(f"{EXTRA_MISSING} ({error})") from None
    app: App = ctx.find_object(App)
    check_host(host, users_file is not None)
    service = build_service(app.runtime, app.store, users_file, stores, photo_folder)
    who = f"users of {users_file}" if users_file else f"one local user, store {app.store.root}"
    click.echo(f"serving {service.model_id} on http://{host}:{port} ({who})", err=True)
    uvicorn_server(service, host, port, log_level).run()


@serve.command("add-user")
@click.argument("name")
@click.option("--users", "users_file", type=click.Path(dir_okay=False), default="users.json", show_default=True,
              help="The users file to add to (made if missing).")
@click.option("--replace", is_flag=True, help="Give an existing user a new key (the old one stops working).")
def add_user(name, users_file, replace):
    """Add user NAME and print their new API key, once: only its hash is kept."""
    from ..serve.users import add_user as add

    key = add(users_file, name, replace=replace)
    click.echo(key)
    click.echo(f"user {name!r} in {users_file}: the key above is shown only now", err=True)
