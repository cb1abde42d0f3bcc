"""The Trace: hooks that record every step and request event, read back as DataFrames."""

from __future__ import annotations

import gzip
import html
import json
import math
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cortexlab.hooks import RequestEvent, SamplerEvent, StepEvent
from cortexlab.metrics import metrics_table, summary_row
from cortexlab.trace_blocks import BlockRecorder

import numpy as np
import pandas as pd


def request_metrics(request) -> dict:
    """Latency numbers of one request (seconds on the engine clock; NaN where undefined)."""
    nan = float("nan")
    arrival, first_token, finish = (
        request.arrival_time,
        request.first_token_time,
        request.finish_time,
    )
    times = request.token_times
    n = len(times)
    return {
        "queue_delay": (request.first_scheduled_time - arrival)
        if request.first_scheduled_time is not None
        else nan,
        "ttft": first_token - arrival if first_token is not None else nan,
        # Time per output token after the first: the decode rate a user sees.
        "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 else nan,
        "e2e": finish - arrival if finish is not None else nan,
    }


def request_row(request) -> dict:
    """A request's reported values now (a plain dict: keeps no reference to the request)."""
    return {
        "request_id": request.request_id,
        "state": request.state.value,
        "finish_reason": request.finish_reason.value if request.finish_reason else None,
        "num_prompt_tokens": request.num_prompt_tokens,
        "num_output_tokens": request.num_output_tokens,
        "num_preemptions": request.num_preemptions,
        "tenant": request.params.tenant,
        "priority": request.params.priority,
        "arrival_time": request.arrival_time,
        "first_scheduled_time": request.first_scheduled_time,
        "first_token_time": request.first_token_time,
        "finish_time": request.finish_time,
        **request_metrics(request),
        "error": request.error,
    }


# The engine step at which each request event happened, as a requests-table column.
_STEP_COLUMNS = {
    "request.arrived": "arrival_step",
    "request.scheduled": "first_scheduled_step",
    "request.first_token": "first_token_step",
    "request.finished": "finish_step",
}


_TOKEN_COLUMNS = ["step", "request_id", "position", "token_id", "text", "prob", "logprob"]
_TOKEN_COLUMNS += ["entropy", "rank", "fallback"]


class Trace:
    """Records engine events; `.steps` and `.requests` give them as DataFrames.

    With ``tokens=True`` it also listens at ``sampler.distribution`` and `.tokens` gives one
    row per sampled token (probability, entropy, rank, tokens kept per stage). That hook
    makes the sampler compute per-stage summaries every step, so it is off by default.
    With ``blocks=True`` it listens at ``kv.blocks``: `.blocks` and `block_map` show which
    request held which KV block after each step (the engine then snapshots every block table
    each step, so it is off by default too).
    It keeps the values it reports, never the `Request` objects, so a finished request is
    freed once the engine lets go of it.
    """

    def __init__(self, *, tokens: bool = False, blocks: bool = False) -> None:
        for name, value in (("tokens", tokens), ("blocks", blocks)):
            if not isinstance(value, bool):
                raise ValueError(f"Trace({name}=...) must be a bool, got {value!r}")
        self.records_tokens = tokens
        self.records_blocks = blocks
        self._blocks = BlockRecorder() if blocks else None
        self._steps: dict[int, dict] = {}
        self._requests: dict = {}
        self._token_times: dict = {}
        self._output_token_ids: dict = {}
        self._tokens: list[dict] = []
        self._num_tokens: dict = {}
        self.events: list = []
        self.source: str | None = None  # the file a loaded Trace came from
        self.metadata: dict | None = None  # a loaded Trace's file header

    def __repr__(self) -> str:
        origin = f", loaded from {self.source!r}" if self.source else ""
        return (
            f"Trace({len(self._requests)} requests, {len(self._steps)} steps, "
            f"tokens={self.records_tokens}, blocks={self.records_blocks}{origin})"
        )

    @property
    def hooks(self) -> dict:
        """The hook mapping to pass to `engine.hooks(...)` or `engine.add_hook`."""
        if self.source is not None:
            raise RuntimeError(
                f"this Trace was loaded from {self.source!r} and is read-only: it has no hooks, "
                f"so no later event can mix into the saved run; record a new run with cl.Trace()"
            )
        hooks = {"step.*": self._on_step, "request.*": self._on_request}
        if self.records_tokens:
            hooks["sampler.distribution"] = self._on_sampler
        if self._blocks is not None:
            hooks["kv.blocks"] = self._blocks.on_blocks
        return hooks

    def _on_step(self, event: StepEvent) -> None:
        row = self._steps.setdefault(event.step, {"step": event.step})
        if event.name == "step.begin":
            row["start"] = event.time
        elif event.name == "step.end":
            row["end"] = event.time
        row.update(event.data)

    def _on_request(self, event: RequestEvent) -> None:
        request = event.request
        rid = request.request_id
        self.events.append((event.time, event.step, event.name, rid))
        steps = {k: v for k, v in self._requests.get(rid, {}).items() if k.endswith("_step")}
        column = _STEP_COLUMNS.get(event.name)
        if column is not None:
            steps.setdefault(column, event.step)
        self._requests[rid] = request_row(request) | steps
        if event.name == "request.finished":
            self._token_times[rid] = tuple(request.token_times)
            self._output_token_ids[rid] = tuple(request.output_token_ids)

    def _on_sampler(self, event: SamplerEvent) -> None:
        for row in event.rows:
            rid = row["request_id"]
            position = self._num_tokens.get(rid, 0)
            self._num_tokens[rid] = position + 1
            stages = row["stages"]
            logprob = row["logprob"]
            self._tokens.append(
                {
                    "step": event.step,
                    "request_id": rid,
                    "position": position,
                    "token_id": row["token"],
                    "text": row.get("text"),
                    "prob": math.exp(logprob) if logprob is not None else np.nan,
                    "logprob": logprob if logprob is not None else np.nan,
                    "entropy": row["entropy"],
                    "rank": row.get("rank"),
                    "fallback": row["fallback"],
                    **{f"kept_{s['stage']}": s["num_kept"] for s in stages},
                    "top_ids": stages[-1]["top_ids"] if stages else [],
                    "top_probs": stages[-1]["top_probs"] if stages else [],
                }
            )

    @property
    def steps(self) -> pd.DataFrame:
        """One row per engine step: batch composition, tokens, KV usage, measured duration."""
        return pd.DataFrame(list(self._steps.values()))

    @property
    def requests(self) -> pd.DataFrame:
        """One row per request: lengths, timestamps, latencies, outcome (as last seen)."""
        df = pd.DataFrame(list(self._requests.values()))
        for column in _STEP_COLUMNS.values():
            if not df.empty and column not in df:
                df[column] = float("nan")
        return df

    @property
    def tokens(self) -> pd.DataFrame:
        """One row per sampled token (``Trace(tokens=True)`` only): step, request_id,
        position in the output, token_id, text, prob / logprob / rank under the final
        distribution, entropy (nats), fallback, ``kept_<stage>`` (tokens left after each
        stage that acted, ``kept_input`` first) and the final top candidates (top_ids,
        top_probs)."""
        if not self.records_tokens:
            raise ValueError(
                "this Trace does not record tokens: use cl.Trace(tokens=True) (it listens at "
                "sampler.distribution, which costs the sampler extra work every step)"
            )
        df = pd.DataFrame(self._tokens)
        kept = [c for c in df.columns if c.startswith("kept_")]
        df = df.reindex(columns=[*_TOKEN_COLUMNS, *kept, "top_ids", "top_probs"])
        return df.astype({c: "Int64" for c in ["rank", *kept]})

    def _block_recorder(self) -> BlockRecorder:
        if self._blocks is None:
            raise ValueError(
                "this Trace does not record KV blocks: use cl.Trace(blocks=True) (it listens at "
                "kv.blocks, which makes the engine snapshot every block table each step)"
            )
        return self._blocks

    @property
    def blocks(self) -> pd.DataFrame:
        """One row per held block per block-table entry after each step (``Trace(blocks=True)``
        only): step, block_id, request_id, index (position in that table), num_tokens (that
        request's tokens in the block), ref_count (tables holding the block), state ("held",
        or "shared" when ref_count > 1); plus a row per cached unreferenced block (state
        "cached", request_id None, ref_count 0, num_tokens <NA>, index its LRU position).
        ``.attrs`` has num_blocks, block_size, allocator and last_step."""
        return self._block_recorder().frame()

    def blocks_at(self, step: int | None = None) -> pd.DataFrame:
        """The `.blocks` rows of one step (default the last recorded), with the same attrs."""
        recorder = self._block_recorder()
        return recorder.frame([recorder.snapshot(step).step])

    def block_map(self, step: int | None = None) -> np.ndarray:
        """Per KV block after `step` (default the last): its owner's code, an index into
        `block_owner_ids`, or -1 free, -2 cached, -3 shared (``Trace(blocks=True)`` only)."""
        return self._block_recorder().block_map(step)

    @property
    def block_owner_ids(self) -> tuple:
        """Request ids by `block_map` owner code, in the order they first held a block."""
        return self._block_recorder().owner_ids

    @property
    def token_times(self) -> dict:
        """Per finished request id: the engine-clock time of each output token."""
        return dict(self._token_times)

    @property
    def output_token_ids(self) -> dict:
        """Per finished request id: its generated token ids (to check that two policies
        produced the same outputs)."""
        return dict(self._output_token_ids)

    def metrics(self, slo: Mapping[str, float] | None = None) -> pd.DataFrame:
        """One row per statistic (mean, p50, p90, p99): latencies in seconds and in steps,
        throughput, goodput under `slo` (e.g. ``{"ttft": 1.0, "tpot": 0.1}``), preemptions,
        per-tenant service. Definitions: `cortexlab.metrics`."""
        return metrics_table(self.requests, self.steps, self._token_times, slo=slo)

    def summary(self, slo: Mapping[str, float] | None = None) -> dict[str, float]:
        """`metrics()` flattened to one dict (`ttft_p50`, `throughput_rps`, ...)."""
        return summary_row(self.requests, self.steps, self._token_times, slo=slo)

    @property
    def request_events(self) -> pd.DataFrame:
        """Every request event in order: time, step, event name, request id."""
        return pd.DataFrame(self.events, columns=["time", "step", "event", "request_id"])

    # -- saving and loading ----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write everything this Trace holds to `path` as gzip JSON lines; returns the path.

        `cl.Trace.load(path)` reads it back (format: docs/hooks.md, "Saved traces").
        """
        path = _as_path(path, "Trace.save")
        if path.is_dir():
            raise IsADirectoryError(f"Trace.save: {str(path)!r} is a folder; give a file name")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"Trace.save: folder {str(path.parent)!r} does not exist")
        _check_ids(self)
        sections = _sections(self)
        lines = [_line(_header(self, sections), "the header")]
        for name, rows, _ in sections:
            lines.append(_line({"table": name, "rows": len(rows)}, name))
            lines.extend(_line(row, f"{name} row {i}") for i, row in enumerate(rows))
        # Written beside the target and renamed: an interrupted save leaves no half file.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as raw:
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=raw, compresslevel=_GZIP_LEVEL, mtime=0
                ) as f:
                    f.write("\n".join(lines).encode("utf-8"))
                    f.write(b"\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """A read-only Trace from a file `trace.save` wrote (its `.hooks` raise)."""
        path = _as_path(path, "Trace.load")
        lines = _read_lines(path)
        header = _parse(lines[0], path, 1)
        _check_header(header, path)
        try:
            trace = _restored(cls, header, _read_tables(header, lines, path))
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(
                f"Trace.load: {str(path)!r} is a cortexlab trace but it is damaged "
                f"({type(exc).__name__}: {exc})"
            ) from None
        trace.source, trace.metadata = str(path), header
        return trace

    # -- notebook display ------------------------------------------------------------------
    def _repr_html_(self) -> str:
        """A compact summary for notebooks: requests by state, steps, tokens, key latencies."""
        return _summary_html(self)


# -- the file format (docs/hooks.md, "Saved traces") ----------------------------------------
TRACE_FORMAT = "cortexlab.trace"
TRACE_FORMAT_VERSION = 1
# Level 4: on a 200-request trace with tokens and blocks (5.9 MB of JSON) it compresses in
# half level 6's time for a 5% larger file; the JSON encoding itself costs about as much.
_GZIP_LEVEL = 4


def _as_path(path: Any, where: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path).expanduser()


def _check_ids(trace: Trace) -> None:
    """Refuse ids JSON would turn into something else (a tuple comes back a list)."""
    ids = [*trace._requests, *trace._token_times, *(e[3] for e in trace.events)]
    if trace._blocks is not None:
        ids += trace._blocks.owner_ids
    for rid in dict.fromkeys(ids):
        if not isinstance(rid, str | int) or isinstance(rid, bool):
            raise ValueError(
                f"Trace.save: request id {rid!r} is a {type(rid).__name__}; a saved trace holds "
                f"str and int request ids only (the ones the engine gives)"
            )


def _read_tables(header: dict, lines: list[str], path: Path) -> dict[str, list]:
    """Each table's rows, in the order and counts the header gives, floats restored."""
    tables, at = {}, 1
    for entry in header["tables"]:
        name, count = entry["name"], int(entry["rows"])
        marker = _parse(lines[at], path, at + 1) if at < len(lines) else None
        if marker != {"table": name, "rows": count} or at + 1 + count > len(lines):
            raise ValueError(
                f"Trace.load: {str(path)!r} is a cortexlab trace but it is truncated or "
                f"damaged: table {name!r} ({count} rows) does not follow at line {at + 1}"
            )
        rows = [
            _parse(line, path, at + 2 + i) for i, line in enumerate(lines[at + 1 : at + 1 + count])
        ]
        tables[name] = _restore_floats(rows, entry.get("float_keys", ()))
        at += 1 + count
    return tables


def _restored(cls: type[Trace], header: dict, tables: dict[str, list]) -> Trace:
    """A Trace holding `tables` as if it had recorded them."""
    recordings = header["recordings"]
    trace = cls(tokens=bool(recordings["tokens"]), blocks=bool(recordings["blocks"]))
    trace._steps = {row["step"]: row for row in tables.get("steps", ())}
    trace._requests = {row["request_id"]: row for row in tables.get("requests", ())}
    trace.events = [tuple(row) for row in tables.get("request_events", ())]
    for rid, times, token_ids in tables.get("outputs", ()):
        trace._token_times[rid] = tuple(times)
        trace._output_token_ids[rid] = tuple(token_ids)
    if trace.records_tokens:
        trace._tokens = tables.get("tokens", [])
    if trace.records_blocks:
        owners = (header.get("blocks") or {}).get("owner_ids", [])
        trace._blocks = BlockRecorder.from_records(tables.get("blocks", []), owners)
    return trace


def _float_keys(rows: list[dict]) -> list[str]:
    """The keys whose column is float in the DataFrame these rows make (their None is NaN)."""
    if not rows:
        return []
    df = pd.DataFrame(rows)
    return [str(c) for c in df.columns if pd.api.types.is_float_dtype(df[c].dtype)]


def _sections(trace: Trace) -> list[tuple[str, list, list[str]]]:
    """(table name, JSON-ready rows, float keys) in file order."""
    steps, requests = list(trace._steps.values()), list(trace._requests.values())
    outputs = [
        [rid, list(times), list(trace._output_token_ids.get(rid, ()))]
        for rid, times in trace._token_times.items()
    ]
    sections = [
        ("steps", steps, _float_keys(steps)),
        ("requests", requests, _float_keys(requests)),
        ("request_events", [list(e) for e in trace.events], []),
        ("outputs", outputs, []),
    ]
    if trace.records_tokens:
        sections.append(("tokens", trace._tokens, _float_keys(trace._tokens)))
    if trace._blocks is not None:
        sections.append(("blocks", trace._blocks.records(), []))
    return sections


def _header(trace: Trace, sections: list) -> dict:
    import cortexlab  # here: the package imports this module

    blocks = None
    if trace._blocks is not None:
        steps = trace._blocks.steps
        last = trace._blocks.snapshot() if steps else None
        blocks = {
            "num_blocks": last.num_blocks if last else None,
            "block_size": last.block_size if last else None,
            "allocator": last.allocator if last else None,
            "num_snapshots": len(steps),
            "last_step": steps[-1] if steps else None,
            "owner_ids": list(trace._blocks.owner_ids),
        }
    return {
        "format": TRACE_FORMAT,
        "format_version": TRACE_FORMAT_VERSION,
        "cortexlab_version": cortexlab.__version__,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recordings": {
            "steps": True,
            "requests": True,
            "tokens": trace.records_tokens,
            "blocks": trace.records_blocks,
        },
        "num_steps": len(trace._steps),
        "num_requests": len(trace._requests),
        "blocks": blocks,
        "tables": [{"name": n, "rows": len(r), "float_keys": k} for n, r, k in sections],
    }


def _finite(value: Any) -> Any:
    """`value` with NaN as null and infinities as "Infinity" / "-Infinity" (strict JSON)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is pd.NA:
        return None
    raise TypeError(f"{type(value).__name__} {value!r:.60}")


_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":"), default=_plain).encode


def _line(obj: Any, where: str) -> str:
    try:
        try:
            return _ENCODE(obj)
        except ValueError:  # a NaN or infinity: rare, so only then the slower clean copy
            return _ENCODE(_finite(obj))
    except (TypeError, ValueError) as exc:
        key = ""
        if isinstance(obj, dict):
            bad = [k for k, v in obj.items() if not _encodes(v)]
            key = f" under {bad[0]!r}" if bad else ""
        raise ValueError(
            f"Trace.save: {where} holds a value JSON cannot store{key}: {exc}"
        ) from None


def _encodes(value: Any) -> bool:
    try:
        _ENCODE(_finite(value))
    except (TypeError, ValueError):
        return False
    return True


def _restore_floats(rows: list, keys: Any) -> list:
    """Undo `_finite` in the float columns: null back to NaN, "Infinity" back to inf."""
    for key in keys:
        for row in rows:
            value = row.get(key, 0.0)
            if value is None:
                row[key] = math.nan
            elif isinstance(value, str):
                row[key] = float(value)
    return rows


def _read_lines(path: Path) -> list[str]:
    if path.is_dir():
        raise IsADirectoryError(f"Trace.load: {str(path)!r} is a folder, not a trace file")
    if not path.exists():
        raise FileNotFoundError(f"Trace.load: no file at {str(path)!r}")
    with path.open("rb") as f:
        magic = f.read(2)
    not_trace = f"Trace.load: {str(path)!r} is not a cortexlab trace"
    # Gzip as save writes it; a gunzipped copy (plain JSON lines) reads too.
    if magic == b"\x1f\x8b":
        opener: Any = gzip.open
    elif magic[:1] == b"{":
        opener = open
    else:
        raise ValueError(f"{not_trace}: it is neither gzip nor JSON lines (trace.save writes one)")
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{not_trace}, or it is damaged: {exc}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{not_trace}: it is empty")
    return lines


def _parse(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise ValueError(
            f"Trace.load: {str(path)!r} line {number} is not JSON ({exc}); "
            f"the file is not a cortexlab trace or it is damaged"
        ) from None


def _check_header(header: Any, path: Path) -> None:
    if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
        raise ValueError(
            f"Trace.load: {str(path)!r} is not a cortexlab trace: its first line lacks "
            f'"format": "{TRACE_FORMAT}" (write one with trace.save)'
        )
    version = header.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= TRACE_FORMAT_VERSION:
        raise ValueError(
            f"Trace.load: {str(path)!r} has format_version {version!r}; this cortexlab reads "
            f"1..{TRACE_FORMAT_VERSION} (it was written by cortexlab "
            f"{header.get('cortexlab_version', '?')})"
        )
    recordings, tables = header.get("recordings"), header.get("tables")
    if not isinstance(recordings, dict) or not isinstance(tables, list):
        raise ValueError(f"Trace.load: {str(path)!r} has a damaged header (recordings, tables)")


# -- notebook display ---------------------------------------------------------------------
_HTML_METRICS = ("ttft", "tpot", "itl", "e2e", "queue_delay")


def _seconds(value: Any) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value * 1e3:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"


def _metrics_html(trace: Trace) -> tuple[list[tuple[str, str]], str]:
    """The throughput line and the latency table (mean, p50, p99, n) from `metrics()`."""
    metrics = trace.metrics()
    facts = []
    mean = metrics["mean"] if "mean" in metrics else pd.Series(dtype=float)
    if "throughput_rps" in mean and "output_tps" in mean:
        facts.append(
            (
                "throughput",
                f"{mean['throughput_rps']:.2f} req/s, {mean['output_tps']:.1f} tokens/s "
                f"over {_seconds(mean.get('duration'))}",
            )
        )
    rows = [m for m in _HTML_METRICS if m in metrics.index]
    if not rows:
        return facts, ""
    head = "".join(f"<th>{c}</th>" for c in ("", "mean", "p50", "p99", "n"))
    body = "".join(
        f"<tr><th style='text-align:left'>{html.escape(m)}</th>"
        + "".join(f"<td>{_seconds(metrics.at[m, c])}</td>" for c in ("mean", "p50", "p99"))
        + f"<td>{metrics.at[m, 'count']:.0f}</td></tr>"
        for m in rows
    )
    return facts, f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_html(trace: Trace) -> str:
    """The `_repr_html_` table: counts from the rows, latencies from `metrics()`; no plots."""
    esc = html.escape
    requests = list(trace._requests.values())
    states: dict[str, int] = {}
    for row in requests:
        states[str(row.get("state"))] = states.get(str(row.get("state")), 0) + 1
    generated = sum(int(r.get("num_output_tokens") or 0) for r in requests)
    title = "cortexlab Trace" + (f" (loaded from {trace.source})" if trace.source else "")
    by_state = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
    recorded = ["steps", "requests"]
    if trace.records_tokens:
        recorded.append(f"tokens ({len(trace._tokens)} rows)")
    if trace._blocks is not None:
        steps = trace._blocks.steps
        if steps:
            snap = trace._blocks.snapshot()
            recorded.append(
                f"blocks ({snap.allocator}, {snap.num_blocks} x {snap.block_size}, "
                f"{len(steps)} snapshots)"
            )
        else:
            recorded.append("blocks (none yet)")
    facts = [
        ("requests", f"{len(requests)} ({by_state})"),
        ("steps", f"{len(trace._steps)}"),
        ("generated tokens", f"{generated}"),
    ]
    table = ""
    if requests:
        try:
            more, table = _metrics_html(trace)
        except Exception as exc:  # a display must not raise, even on a hand-made trace
            more = [("metrics", f"unavailable: {type(exc).__name__}: {exc}")]
        facts += more
    facts.append(("recorded", ", ".join(recorded)))
    if not requests and not trace._steps:
        facts.append(("", "empty: pass trace.hooks to engine.hooks(...) while the engine runs"))
    items = "".join(
        f"<tr><th style='text-align:left'>{esc(k)}</th><td style='text-align:left'>{esc(v)}</td></tr>"
        for k, v in facts
    )
    return f"<div class='cortexlab-trace'><b>{esc(title)}</b><table>{items}</table>{table}</div>"
