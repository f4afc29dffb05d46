"""The `plvmctl` command line: thin click commands over the library.

Each command or group lives in a module of this package and is registered on `main` below,
all the same way (a method's `train` command lives in its folder, plvmctl/methods/NAME/cli.py,
and comes from the methods registry); commands parse arguments, call the library and print.
`PlvmError` becomes a one-line `error: ...` and exit status 1.
"""

from __future__ import annotations

import click

from ..methods import REGISTRY
from .app import ReportingGroup, global_options
from .commands import aligner, ask, chat, concepts, encode, recipes
from .data import data
from .evaluate import eval_command
from .find import find
from .index import index
from .serve import serve
from .toy import toy
from .train import train


@click.group(cls=ReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@global_options
def main(**_):
    """Personalize LLaVA-family vision-language models.

    One reference photo -> a .concept file (PLVM's Aligner, milliseconds, no training);
    then ask questions that mention <name> about any photo.

    \b
    Quick start (offline: the pocket model, trained on the toy world, is the default):
      plvmctl encode ref.jpg --name avril
      plvmctl ask photo.jpg "Is <avril> in this photo?"
      plvmctl recipes          (the others: llava15-7b, tiny, ...)
    """


for method in REGISTRY:  # each method's own `plvmctl train NAME`, when it has one
    if method.train_command is not None:
        train.add_command(method.train_command)
for command in (encode, ask, recipes, concepts, chat, aligner, train, data, index, toy, eval_command, find,
                serve):
    main.add_command(command)
