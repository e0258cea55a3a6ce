"""Tables printed at the end of training and by eval.py."""

from __future__ import annotations

import json
from collections.abc import Mapping

from rich.console import Console
from rich.table import Table


def print_table(title: str, rows: Mapping[str, Mapping[str, float | None]], columns: list[str]) -> None:
    table = Table(title=title)
    table.add_column("encoder")
    for c in columns:
        table.add_column(c, justify="right")
    for name, values in rows.items():
        table.add_row(name, *[("-" if values.get(c) is None else f"{values[c]:.2f}") for c in columns])
    Console().print(table)


def print_json_line(metrics: Mapping[str, object]) -> None:
    print(json.dumps(dict(metrics), sort_keys=True), flush=True)
