"""Replay a recorded workload from a DataFrame or a CSV file, checked cell by cell."""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path

from cortexlab.workloads.distributions import check_int
from cortexlab.workloads.workload import Workload, WorkloadRequest

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("arrival_time", "output_len")
# A str cell that looks like this is a token id list (how to_csv writes a list of ints).
_TOKEN_LIST = re.compile(r"^\s*\[\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*\]\s*$")


class _Cell:
    """Checks one column's cells; errors name the column and the row (0-based, header excluded)."""

    def __init__(self, column: str) -> None:
        self.column = column

    def fail(self, row: int, rule: str, value: object) -> ValueError:
        return ValueError(f"replay: column {self.column!r} row {row} must be {rule}, got {value!r}")

    def integer(self, row: int, value: object, rule: str, low: int | None) -> int:
        # CSV columns with a gap read as float: 3.0 is accepted as 3, 3.5 and NaN are not.
        is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not is_real or not math.isfinite(value) or float(value) != int(value):
            raise self.fail(row, rule, value)
        if low is not None and int(value) < low:
            raise self.fail(row, rule, value)
        return int(value)

    def prompt(self, row: int, value: object) -> str | tuple[int, ...]:
        rule = "a non-empty str, or a non-empty list of token ids >= 0"
        if isinstance(value, str) and _TOKEN_LIST.match(value):
            value = json.loads(value)
        if isinstance(value, str):
            if not value:
                raise self.fail(row, rule, value)
            return value
        if isinstance(value, list | tuple | np.ndarray) and len(value) > 0:
            ids = list(value)
            if all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in ids
            ):
                return tuple(int(t) for t in ids)
        raise self.fail(row, rule, value)


def _missing(value: object) -> bool:
    # A CSV's empty cell reads as NaN; a nullable pandas column holds pd.NA.
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _prompt_of(
    row: int, record: dict, lengths: _Cell
) -> tuple[str | tuple[int, ...] | None, int | None]:
    """The row's prompt (text or ids, None to cut from the corpus) and its length if known."""
    given_len = record.get("prompt_len")
    if not _missing(record.get("prompt")):
        prompt = _Cell("prompt").prompt(row, record["prompt"])
        if not isinstance(prompt, tuple):
            return prompt, None  # a text prompt's length depends on the tokenizer
        if not _missing(given_len) and given_len != len(prompt):
            raise lengths.fail(
                row, f"the number of token ids in 'prompt' ({len(prompt)})", given_len
            )
        return prompt, len(prompt)
    if "prompt_len" not in record:
        raise _Cell("prompt").fail(
            row, "a non-empty str or list of token ids", record.get("prompt")
        )
    return None, lengths.integer(row, given_len, "an int >= 1", 1)


def replay(table: pd.DataFrame | str | os.PathLike, *, seed: int = 0) -> Workload:
    """A workload from a table with one row per request.

    Columns: `arrival_time` (seconds >= 0; rows are sorted by it), `output_len` (>= 1), and
    per row a `prompt` (text, or a list of token ids; in a CSV a cell like "[1, 2, 3]" is
    read as ids) or, where that column is absent or the cell empty, a `prompt_len` (>= 1:
    corpus text of that many tokens is cut at materialize time, seeded by `seed`). With
    both, a token-id prompt must have prompt_len ids; a text prompt's length is up to the
    tokenizer. Optional: `tenant` (str), `priority` (int). Other columns are ignored, so
    `Workload.to_frame()` reads back as it was written.
    """
    seed = check_int("replay", "seed", seed, "an int >= 0", lambda v: v >= 0)
    if isinstance(table, str | os.PathLike):
        path = Path(table)
        if not path.is_file():
            raise ValueError(f"replay: no CSV file at {str(path)!r}")
        frame, name = pd.read_csv(path), f"replay({path.name})"
    elif isinstance(table, pd.DataFrame):
        frame, name = table, "replay(DataFrame)"
    else:
        raise ValueError(
            f"replay: table must be a DataFrame or a CSV path, got {type(table).__name__}"
        )
    columns = set(frame.columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"replay: missing column {missing[0]!r} (columns: {sorted(map(str, columns))})"
        )
    if "prompt" not in columns and "prompt_len" not in columns:
        raise ValueError(
            "replay: missing column 'prompt' (text or token ids) or 'prompt_len' "
            f"(columns: {sorted(map(str, columns))})"
        )
    if frame.empty:
        raise ValueError("replay: the table has no rows")
    checks = {
        c: _Cell(c) for c in ("arrival_time", "output_len", "prompt_len", "tenant", "priority")
    }
    requests = []
    for row, record in enumerate(frame.to_dict("records")):
        arrival = record["arrival_time"]
        is_real = isinstance(arrival, numbers.Real) and not isinstance(arrival, bool)
        if not is_real or not math.isfinite(arrival) or arrival < 0:
            raise checks["arrival_time"].fail(row, "a finite number of seconds >= 0", arrival)
        output_len = checks["output_len"].integer(row, record["output_len"], "an int >= 1", 1)
        prompt, prompt_len = _prompt_of(row, record, checks["prompt_len"])
        tenant = record.get("tenant", "default")
        if isinstance(tenant, numbers.Integral) and not isinstance(tenant, bool):
            tenant = str(tenant)  # a CSV column of numeric tenant ids reads as ints
        if not isinstance(tenant, str) or not tenant:
            raise checks["tenant"].fail(row, "a non-empty str", tenant)
        priority = checks["priority"].integer(row, record.get("priority", 0), "an int", None)
        requests.append(
            WorkloadRequest(row, float(arrival), prompt_len, output_len, tenant, priority, prompt)
        )
    return Workload(requests, name=name, seed=seed)
