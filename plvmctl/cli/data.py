"""`plvmctl data ...`: prepare training data (attribute answers written by the base model)."""

from __future__ import annotations

import sys

import click

from .app import App

pass_app = click.make_pass_decorator(App)


@click.group("data")
def data() -> None:
    """Prepare training manifests."""


@data.command("attributes")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Questions per forward pass [default: the recipe's generation.batch_size].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Answer length limit [default: the recipe's generation.max_new_tokens].")
@click.option("--every", "identities_per_write", type=click.IntRange(min=1), default=8,
              show_default=True, help="Rewrite the manifest after this many identities.")
@pass_app
def attributes(app: App, manifest: str, batch_size: int | None, max_new_tokens: int | None,
               identities_per_write: int) -> None:
    """Let the frozen base model answer the attribute questions about each reference photo.

    For every identity of MANIFEST without attribute answers, asks each of the shared
    attribute questions (with "the person" for the name) about its reference photo and
    writes the answers back into MANIFEST, atomically, every --every identities. Identities
    already answered are skipped, so an interrupted run resumes where it stopped.
    """
    from ..train.data import fill_attributes, read_manifest_rows

    read_manifest_rows(manifest)  # a missing or malformed manifest fails before the model loads
    report = fill_attributes(app.runtime, manifest, identities_per_write=identities_per_write,
                             batch_size=batch_size, max_new_tokens=max_new_tokens,
                             progress=sys.stderr.isatty())
    for line in report.failed:
        click.echo(f"failed: {line}", err=True)
    click.echo(f"{manifest}: {report.answered} identities answered, {report.already} already "
               f"answered, {len(report.failed)} failed")
    if report.failed:
        sys.exit(1)
