"""What every ``hms`` verb shares: the engine's API and the output format, and ``-o``."""

from __future__ import annotations

import json
from typing import Any

import click

from hms_mgmt.cli_api import EngineHttp


class Context:
    def __init__(self, api: EngineHttp, output: str) -> None:
        self.api = api
        self.output = output

    @property
    def json(self) -> bool:
        return self.output == "json"

    def emit(self, value: Any, text: str) -> None:
        click.echo(json.dumps(value, indent=2, default=str) if self.json else text)


def output_option(command: Any) -> Any:
    """``-o`` after the command too (``hms workflow list -o json``), besides before it."""

    def chosen(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.find_object(Context).output = value  # type: ignore[union-attr]

    return click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "json"]),
        expose_value=False,
        callback=chosen,
        help="Tables for people, json for scripts.",
    )(command)
