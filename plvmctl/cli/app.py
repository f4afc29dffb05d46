"""What every command shares: global options, the recipe, the concept store, the runtime."""

from __future__ import annotations

import errno
import functools
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..methods import check_recipe_sections
from ..recipe import DEFAULT_RECIPE

STORE_ENV = "PLVMCTL_STORE"
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


class ReportingGroup(click.Group):
    """A command group that turns PlvmError into `error: <message>` and exit status 1.

    Used for `plvmctl` itself and for groups that tests invoke on their own, so they
    behave the same either way.
    """

    def invoke(self, ctx: click.Context):
        from ..errors import PlvmError, io_reason

        try:
            return super().invoke(ctx)
        except (PlvmError, OSError) as error:
            if isinstance(error, OSError):  # a write or read outside fileio's writers
                reason = io_reason(error)
                where = f"{error.filename}: " if error.filename else ""
                message = f"cannot {'write' if error.errno in WRITE_ERRNOS else 'use'} {where}{reason}"
            else:
                message = str(error)
            if getattr(ctx.find_root().obj, "verbose", 0) and (isinstance(error, OSError)
                                                                or error.__cause__ is not None):
                traceback.print_exception(error)
            click.echo(f"error: {message}", err=True)
            ctx.exit(1)


@dataclass
class App:
    """The `ctx.obj` of every command. Heavy things load lazily, once."""

    recipe_name: str = DEFAULT_RECIPE
    overrides: list[str] = field(default_factory=list)
    store_dir: str | None = None
    device: str = "auto"
    dtype: str | None = None
    verbose: int = 0

    @functools.cached_property
    def recipe(self):
        from ..recipe import load_recipe

        overrides = list(self.overrides)
        if self.dtype:
            overrides.append(f"model.dtype={self.dtype}")
        recipe = load_recipe(self.recipe_name, overrides)
        check_recipe_sections(recipe)
        return recipe

    @functools.cached_property
    def store(self):
        from ..store import ConceptStore

        directory = self.store_dir or os.environ.get(STORE_ENV) or self.recipe.store
        return ConceptStore(Path(directory))

    @functools.cached_property
    def runtime(self):
        """Backbone + reference encoder + Aligner, loaded as the recipe says."""
        from ..runtime import load_runtime

        quiet_model_loading(self.verbose)
        return load_runtime(self.recipe, device=self.device, verbose=self.verbose)

    def trainer_config(self, section: str, cls, overrides=(), **options):
        """The recipe's `section:` as dataclass `cls`, with the command's own `--set
        SECTION.KEY=VALUE` (nothing else is allowed after the command) and its options that
        were given (not None) applied, then validated."""
        from ..errors import PlvmError
        from ..recipe import apply_overrides, build_dataclass

        for text in overrides:
            if not text.split("=", 1)[0].strip().startswith(f"{section}."):
                raise PlvmError(f"--set {text}: after `train {section}` only {section}.KEY=VALUE is "
                                f"allowed (put other settings before the command: plvmctl --set ... "
                                f"train {section})")
        data = apply_overrides({section: dict(self.recipe.sections.get(section, {}))}, list(overrides))
        data[section].update({key: value for key, value in options.items() if value is not None})
        config = build_dataclass(cls, data[section], section)
        config.validate()
        return config

    def log(self, message: str, level: int = 1) -> None:
        if self.verbose >= level:
            click.echo(message, err=True)


def quiet_model_loading(verbose: int) -> None:
    """Without -v, transformers' "Loading weights" bars and advisory log lines stay silent."""
    if verbose:
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def global_options(function):
    """The options that stand before the command name: `plvmctl [OPTIONS] COMMAND`."""

    @click.option("--recipe", "recipe_name", default=DEFAULT_RECIPE, show_default=True,
                  help="Recipe NAME (see `plvmctl recipes`) or path to a YAML file.")
    @click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None,
                  help=f"Concept store folder [default: the recipe's store, or ${STORE_ENV}].")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                  show_default=True, help="Where to run the models.")
    @click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                  default=None,
                  help="Model dtype [default: bf16 on GPU (fp16 with the released Aligner), fp32 on CPU].")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a recipe value, e.g. --set generation.max_new_tokens=32.")
    @click.option("-v", "--verbose", count=True, help="More log lines on stderr (-vv for more).")
    @click.pass_context
    @functools.wraps(function)
    def wrapper(ctx, recipe_name, store_dir, device, dtype, overrides, verbose, **kwargs):
        ctx.obj = App(recipe_name=recipe_name, overrides=list(overrides), store_dir=store_dir,
                      device=device, dtype=dtype, verbose=verbose)
        ctx.obj.recipe  # read and validate the recipe before any command runs
        return ctx.invoke(function, **kwargs)

    return wrapper
