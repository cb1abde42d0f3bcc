"""TraceExplorer: step through a recorded Trace (KV block map, batch, waiting queue, KV line).

It reads only a Trace's DataFrame properties (`.steps`, `.request_events`, `.blocks`), never
live Request objects, so a Trace loaded from disk works as well as one just recorded. Every
per-step table is computed once up front by plain functions, each testable without a
browser: ``queue_table`` (who was waiting or running after each step, replayed from the
request events), ``block_codes`` (each block's owner and fill per step), ``kv_line`` (one
step's KV accounting) and ``block_image`` (one step's block map as RGB pixels). A redraw then
only indexes those tables and blits one image into a figure drawn once.
"""

from __future__ import annotations

import html
import io
import math
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cortexlab.metrics import kv_breakdown
from cortexlab.trace_blocks import CACHED, FREE, SHARED
from cortexlab.viz._common import KV_COLORS, as_steps, request_colors, request_order
from cortexlab.viz.steps import batch_tokens

import ipywidgets as widgets
import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

# Pixels per block in the map image: CELL content columns (the token fill's resolution)
# plus one white gap column, and as many rows, so blocks stay apart at any zoom.
CELL = 8
_DPI = 100
_SHARED, _SHARED_LIGHT = "0.3", "0.65"  # as cl.viz.plot_block_map draws shared blocks
_SPECIAL = (SHARED, CACHED, FREE)
NO_BLOCKS_NOTE = (
    "This Trace did not record KV blocks, so there is no block map: record one with "
    "<code>cl.Trace(blocks=True)</code>, <code>cl.run_workload(..., blocks=True)</code> or "
    "<code>cl.compare_allocators(..., blocks=True)</code>."
)

QUEUE_COLUMNS = ["step", "request_id", "state", "since_step", "num_preemptions", "scheduled"]


def _ids(cell: Any) -> list:
    """A `.steps` list cell as a list ([] for a step without a batch; arrays from disk too)."""
    if isinstance(cell, list | tuple | np.ndarray | pd.Series):
        return list(cell)
    return []


def queue_table(trace: Any) -> pd.DataFrame:
    """One row per (step, request) live after that step: state "waiting" or "running",
    since_step (when it entered that state), num_preemptions so far, and scheduled (in that
    step's batch). Replayed from `.request_events` and the steps' `request_ids`; waiting
    requests in the scheduler's queue order (`waiting_ids`), or arrival order in traces
    recorded before that column existed."""
    steps = as_steps(trace, ["step"])
    events = trace.request_events
    cells = steps["request_ids"] if "request_ids" in steps else [None] * len(steps)
    batches = {int(s): _ids(ids) for s, ids in zip(steps["step"], cells, strict=True)}
    # Within a step the engine admits arrivals and preempts before the batch runs; the
    # scheduled, first-token and finished events (and forks' arrivals) come after it.
    before = events["event"].isin(["request.arrived", "request.preempted"])
    by_step: dict[int, tuple[list, list]] = {}
    for step, event, rid, early in zip(
        events["step"], events["event"], events["request_id"], before, strict=True
    ):
        by_step.setdefault(int(step), ([], []))[0 if early else 1].append((event, rid))
    live: dict[Hashable, list] = {}  # request id -> [state, since_step, num_preemptions]
    rows: list[tuple] = []
    for step in sorted(set(batches) | set(by_step)):
        early, late = by_step.get(step, ([], []))
        for event, rid in early:
            if event == "request.arrived":
                live[rid] = ["waiting", step, 0]
            elif rid in live:  # preempted: back in the queue
                entry = live[rid]
                entry[0], entry[1], entry[2] = "waiting", step, entry[2] + 1
        scheduled = set()
        for rid in batches.get(step, ()):
            scheduled.add(rid)
            entry = live.setdefault(rid, ["waiting", step, 0])  # arrived before the trace
            if entry[0] != "running":
                entry[0], entry[1] = "running", step
        for event, rid in late:
            if event == "request.arrived":
                live[rid] = ["waiting", step, 0]
            elif event == "request.scheduled" and rid in live and live[rid][0] != "running":
                live[rid][0], live[rid][1] = "running", step
            elif event == "request.finished":
                live.pop(rid, None)
        if step in batches:
            rows += [(step, rid, *entry, rid in scheduled) for rid, entry in live.items()]
    table = pd.DataFrame(rows, columns=QUEUE_COLUMNS)
    if "waiting_ids" in steps and not table.empty:
        # The engine records the scheduler's own queue order: waiting rows follow it.
        rank = {
            (int(s), rid): i
            for s, ids in zip(steps["step"], steps["waiting_ids"], strict=True)
            for i, rid in enumerate(_ids(ids))
        }
        pairs = zip(table["step"], table["request_id"], strict=True)
        key = [rank.get((s, r), len(rank)) for s, r in pairs]
        table = table.assign(_rank=key).sort_values(["step", "_rank"], kind="stable")
        table = table.drop(columns="_rank").reset_index(drop=True)
    return table


@dataclass(frozen=True, slots=True)
class BlockCodes:
    """Every recorded step's block map: owner codes and token fill, one row per step."""

    steps: np.ndarray  # [S] the step of each row
    codes: np.ndarray  # [S, num_blocks] index into owner_ids, or FREE, CACHED, SHARED
    fill: np.ndarray  # [S, num_blocks] tokens in the block / block_size (0 for free, cached)
    recorded: np.ndarray  # [S] bool: the step is not past the trace's last snapshot
    owner_ids: tuple  # request ids by code
    num_blocks: int
    block_size: int
    allocator: str


def block_codes(blocks: pd.DataFrame, steps: Sequence[int], *, num_slots: int = 0) -> BlockCodes:
    """`Trace.blocks` as one owner-code row per step of `steps` (the codes of
    `Trace.block_map`, owners in first-held order), computed once for all steps."""
    attrs = dict(blocks.attrs)
    steps = np.asarray(sorted(steps), np.int64)
    num_blocks = int(
        attrs.get("num_blocks") or (blocks["block_id"].max() + 1 if len(blocks) else 0)
    )
    block_size = int(attrs.get("block_size") or (num_slots // num_blocks if num_blocks else 1))
    codes = np.full((len(steps), num_blocks), FREE, np.int64)
    fill = np.zeros((len(steps), num_blocks))
    rows = blocks[blocks["step"].isin(steps)]
    position = np.searchsorted(steps, rows["step"].to_numpy(np.int64))
    block = rows["block_id"].to_numpy(np.int64)
    state = rows["state"].to_numpy(object)
    owners: dict[Hashable, int] = {}
    held = state == "held"
    # One by one: a tuple request id must stay one key.
    code = [
        owners.setdefault(rid, len(owners)) if h else -1
        for rid, h in zip(rows["request_id"], held, strict=True)
    ]
    code = np.asarray(code, np.int64)
    codes[position[held], block[held]] = code[held]
    codes[position[state == "cached"], block[state == "cached"]] = CACHED
    codes[position[state == "shared"], block[state == "shared"]] = SHARED
    holds = state != "cached"
    tokens = rows["num_tokens"].to_numpy(dtype=float, na_value=0.0)[holds] / max(block_size, 1)
    # Holders of a shared block agree on its tokens except while a copy-on-write is pending.
    np.maximum.at(fill, (position[holds], block[holds]), tokens)
    # A step whose arena was empty has no rows: every step up to the last snapshot counts.
    last = attrs.get("last_step", blocks["step"].max() if len(blocks) else -1)
    recorded = steps <= last
    return BlockCodes(
        steps, codes, fill, recorded, tuple(owners), num_blocks, block_size,
        str(attrs.get("allocator", "")),
    )  # fmt: skip


def _rgb(color: Any) -> np.ndarray:
    return np.asarray(mcolors.to_rgb(color))


def _palettes(owner_ids: Sequence, colors: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Full and light (reserved, no token) colours indexed by code + 3 (SHARED is -3)."""
    specials = [_SHARED, KV_COLORS["cached"], KV_COLORS["free"]]
    full = np.array([_rgb(c) for c in specials] + [_rgb(colors.get(r, "0.5")) for r in owner_ids])
    light = full + (1.0 - full) * 0.6  # the tint cl.viz.plot_block_map gives reserved slots
    light[:3] = [_rgb(_SHARED_LIGHT), full[1], full[2]]
    return full, light


def block_image(
    codes: np.ndarray,
    fill: np.ndarray,
    full: np.ndarray,
    light: np.ndarray,
    columns: int,
) -> np.ndarray:
    """One step's block map as RGB pixels [rows * CELL, columns * CELL, 3]: block 0 top left,
    each cell coloured by owner, the tokens' share of it solid and the rest light."""
    n = len(codes)
    index = codes + 3
    # Columns of the cell drawn solid: any token shows; free and cached blocks are plain.
    width = np.ceil(fill * (CELL - 1) - 1e-9).astype(np.int64)
    width[(codes == FREE) | (codes == CACHED)] = CELL - 1
    solid = np.arange(CELL - 1)[None, :] < width[:, None]  # [n, CELL - 1]
    cells = np.where(solid[..., None], full[index][:, None], light[index][:, None])
    rows = math.ceil(n / columns)
    image = np.ones((rows * columns, CELL, CELL, 3))  # white gaps and unused cells
    image[:n, : CELL - 1, : CELL - 1] = cells[:, None]
    image = image.reshape(rows, columns, CELL, CELL, 3).transpose(0, 2, 1, 3, 4)
    return image.reshape(rows * CELL, columns * CELL, 3)


def grid_columns(num_blocks: int) -> int:
    """Blocks per row of the map (as cl.viz.plot_block_map lays them out)."""
    return max(1, min(num_blocks, max(32, 2 ** math.ceil(math.log2(math.sqrt(2 * num_blocks))))))


def kv_line(row: Mapping[str, Any]) -> str:
    """One step's KV accounting in a line, from its `kv_breakdown` parts (slots)."""
    total = int(row["num_slots"])
    if not total:
        return "no KV slots"
    held = int(row["holding"])
    text = (
        f"{held} of {total} KV slots hold tokens ({held / total:.0%}); "
        f"{int(row['reserved'] + row['internal'])} reserved "
        f"({int(row['internal'])} internal fragmentation), {int(row['cached'])} cached, "
        f"{int(row['free'] + row['external'])} free"
    )
    if row["external"]:
        text += f" ({int(row['external'])} too scattered for the next waiting request)"
    return text


def _swatch(color: Any) -> str:
    return (
        f"<span style='display:inline-block;width:0.8em;height:0.8em;margin-right:3px;"
        f"vertical-align:middle;background:{mcolors.to_hex(color)}'></span>"
    )


def _chip(rid: Any, color: Any, note: str = "") -> str:
    note = f" <small style='color:#666'>{note}</small>" if note else ""
    return (
        f"<span style='white-space:nowrap;margin-right:10px'>{_swatch(color)}"
        f"{html.escape(str(rid))}{note}</span>"
    )


class TraceExplorer(widgets.VBox):
    """A step slider over a recorded Trace: after the chosen step, the KV block map (a
    ``Trace(blocks=True)``; otherwise a note), the batch (who ran, prefill or decode
    tokens each), the waiting queue and a line of KV accounting.

    Every table is computed once at construction; moving the slider indexes them and
    blits one image. `timings["redraw"]` holds the last update's seconds. Request colours
    are those of every `cl.viz` plot of the same trace.
    """

    def __init__(self, trace: Any, *, step: int | None = None, max_width: int = 640) -> None:
        steps = as_steps(trace, ["step"])
        if steps.empty:
            raise ValueError("the trace has no steps: did its hooks see the engine run?")
        self.trace = trace
        self.steps = steps.sort_values("step").set_index("step", drop=False).rename_axis(None)
        step_ids = [int(s) for s in self.steps["step"]]
        self.timings: dict[str, float] = {}

        batches = batch_tokens(self.steps) if "request_ids" in self.steps else None
        self._batches = {} if batches is None else dict(list(batches.groupby("step")))
        queue = queue_table(trace)
        self._queues = dict(list(queue.groupby("step")))
        self._kv = {}
        if "kv_used_slots" in self.steps:
            parts = kv_breakdown(self.steps)
            for s, row in zip(parts.index, parts.to_dict("records"), strict=True):
                self._kv[int(s)] = kv_line(row)
        self.blocks = self._read_blocks(trace, step_ids)
        owners = () if self.blocks is None else self.blocks.owner_ids
        order = list(dict.fromkeys([*request_order(trace), *owners]))
        self.colors = request_colors(order)

        first, last = step_ids[0], step_ids[-1]
        step = min(max(last if step is None else step, first), last)
        self.slider = widgets.IntSlider(
            value=step, min=first, max=last, description="step", continuous_update=True,
            layout=widgets.Layout(width="480px"),
        )  # fmt: skip
        # Linked in the browser, which first copies the player's value to the slider: both
        # start at `step`.
        self.play = widgets.Play(value=step, min=first, max=last, interval=250, description="play")
        widgets.jslink((self.play, "value"), (self.slider, "value"))
        self.previous = widgets.Button(description="◀", layout=widgets.Layout(width="36px"))
        self.next = widgets.Button(description="▶", layout=widgets.Layout(width="36px"))
        self.previous.on_click(lambda _: self._move(-1))
        self.next.on_click(lambda _: self._move(+1))
        self.image = widgets.Image(format="png", layout=widgets.Layout(object_fit="none"))
        self.note = widgets.HTML()
        self.kv = widgets.HTML()
        self.batch = widgets.HTML(layout=widgets.Layout(width="48%"))
        self.queue = widgets.HTML(layout=widgets.Layout(width="48%"))
        self.status = widgets.HTML()
        self.block_codes: np.ndarray | None = None  # the shown step's owner codes
        if self.blocks is None:
            self.note.value = f"<i>{NO_BLOCKS_NOTE}</i>"
            self.image.layout.display = "none"
            self.figure = None
        else:
            self._setup_figure(max_width)
        self.slider.observe(lambda _: self.update(), names="value")
        super().__init__(
            [
                widgets.HBox([self.play, self.previous, self.slider, self.next]),
                self.image,
                self.note,
                self.kv,
                widgets.HBox([self.batch, self.queue]),
                self.status,
            ]
        )
        self.update()

    @staticmethod
    def _read_blocks(trace: Any, steps: list[int]) -> BlockCodes | None:
        if getattr(trace, "records_blocks", True) is False:
            return None
        try:
            blocks = trace.blocks
        except (AttributeError, ValueError):  # a Trace without blocks=True says so
            return None
        if not isinstance(blocks, pd.DataFrame) or blocks.empty:
            return None
        slots = trace.steps.get("kv_num_slots", pd.Series([0])).max()
        return block_codes(blocks, steps, num_slots=int(slots) if pd.notna(slots) else 0)

    def _setup_figure(self, max_width: int) -> None:
        """The figure, drawn once: axes and ticks are the background every redraw restores;
        only the image and the title are drawn per step (drawing ticks and text anew costs
        most of a full matplotlib redraw). Each image pixel covers whole screen pixels, so
        the cells stay crisp and evenly spaced."""
        blocks = self.blocks
        self._full, self._light = _palettes(blocks.owner_ids, self.colors)
        self._columns = grid_columns(blocks.num_blocks)
        rows = math.ceil(blocks.num_blocks / self._columns)
        left, top, bottom, right = 44, 20, 2, 2  # margins in pixels: row labels, title
        scale = max(1, (max_width - left - right) // (self._columns * CELL))
        width, height = self._columns * CELL * scale, rows * CELL * scale
        size = (width + left + right, height + top + bottom)
        self.figure = Figure(figsize=(size[0] / _DPI, size[1] / _DPI), dpi=_DPI)
        self._canvas = FigureCanvasAgg(self.figure)
        ax = self.figure.add_axes(
            (left / size[0], bottom / size[1], width / size[0], height / size[1])
        )
        self._map = ax.imshow(
            np.ones((rows * CELL, self._columns * CELL, 3)), interpolation="nearest",
            aspect="auto", animated=True, extent=(0, self._columns, rows, 0),
        )  # fmt: skip
        every = max(1, math.ceil(rows / 8))
        starts = range(0, rows, every)
        ax.set_yticks(np.array(starts) + 0.5, [str(r * self._columns) for r in starts])
        ax.set_xticks([])
        ax.tick_params(length=0, labelsize="x-small")
        for spine in ax.spines.values():
            spine.set_visible(False)
        self._title = self.figure.text(
            4 / size[0], 1 - 3 / size[1], "", va="top", fontsize="small", animated=True
        )
        self._canvas.draw()
        self._background = self._canvas.copy_from_bbox(self.figure.bbox)
        light = mcolors.to_hex(self._light[3] if len(self._light) > 3 else (0.8, 0.8, 0.8))
        full = mcolors.to_hex(self._full[3] if len(self._full) > 3 else (0.3, 0.3, 0.3))
        self.note.value = (
            "<small>"
            + _swatch(KV_COLORS["free"])
            + "free "
            + _swatch(KV_COLORS["cached"])
            + "cached (prefix, evictable) "
            + _swatch(_SHARED)
            + "shared by several requests "
            + _swatch(full)
            + _swatch(light)
            + "a request's block: solid share holds tokens, "
            "light share reserved; colours as in every cl.viz plot of this trace</small>"
        )

    def _move(self, delta: int) -> None:
        self.slider.value = min(max(self.slider.value + delta, self.slider.min), self.slider.max)

    def __repr__(self) -> str:
        blocks = "no blocks" if self.blocks is None else f"{self.blocks.num_blocks} blocks"
        return (
            f"TraceExplorer(step={self.step}, steps={self.slider.min}..{self.slider.max}, {blocks})"
        )

    @property
    def step(self) -> int:
        """The step shown."""
        return int(self.slider.value)

    def batch_rows(self, step: int | None = None) -> pd.DataFrame:
        """The batch of `step` (default the shown one): request_id, num_new_tokens, is_prefill."""
        rows = self._batches.get(self.step if step is None else step)
        if rows is None:
            return pd.DataFrame(columns=["request_id", "num_new_tokens", "is_prefill"])
        return rows[["request_id", "num_new_tokens", "is_prefill"]].reset_index(drop=True)

    def waiting(self, step: int | None = None) -> list:
        """Request ids waiting after `step` (default the shown one), next in line first."""
        rows = self._queues.get(self.step if step is None else step)
        return [] if rows is None else list(rows.loc[rows["state"] == "waiting", "request_id"])

    def update(self) -> None:
        """Redraw everything for the slider's step."""
        t0 = time.perf_counter()
        step = self.step
        recorded = step in self.steps.index
        self.kv.value = (
            f"<b>after step {step}</b>: {self._kv.get(step, 'no KV columns recorded')}"
            if recorded
            else f"<b>step {step}</b> was not recorded"
        )
        self.batch.value = self._batch_html(step)
        self.queue.value = self._queue_html(step)
        if self.figure is not None:
            self._draw_blocks(step)
        self.timings["redraw"] = time.perf_counter() - t0
        self.status.value = (
            f"<small style='color:#666'>redraw {self.timings['redraw'] * 1000:.0f} ms</small>"
        )

    def _batch_html(self, step: int) -> str:
        rows = self.batch_rows(step)
        if rows.empty:
            return f"<b>batch of step {step}</b>: nothing ran"
        prefill = rows[rows["is_prefill"]]
        decode = rows[~rows["is_prefill"]]
        lines = [
            f"<b>batch of step {step}</b>: {int(rows['num_new_tokens'].sum())} tokens, "
            f"{int(prefill['num_new_tokens'].sum())} prefill ({len(prefill)} requests) + "
            f"{int(decode['num_new_tokens'].sum())} decode ({len(decode)} requests)"
        ]
        for rid, n, is_prefill in rows.itertuples(index=False):
            kind = f"prefill {n} tokens" if is_prefill else f"decode {n}"
            lines.append(_chip(rid, self.colors.get(rid, "0.5"), kind))
        preempted = (
            _ids(self.steps.at[step, "preempted_ids"]) if "preempted_ids" in self.steps else []
        )
        if preempted:
            lines.append("<br>preempted: " + ", ".join(html.escape(str(r)) for r in preempted))
        return lines[0] + "<br>" + "".join(lines[1:])

    def _queue_html(self, step: int) -> str:
        rows = self._queues.get(step)
        if rows is None or rows.empty:
            return f"<b>waiting after step {step}</b>: 0"
        waiting = rows[rows["state"] == "waiting"]
        idle = rows[(rows["state"] == "running") & ~rows["scheduled"]]
        chips = []
        for rid, since, preemptions in zip(
            waiting["request_id"], waiting["since_step"], waiting["num_preemptions"], strict=True
        ):
            waited = step - since + 1
            note = f"{waited} step{'s' if waited > 1 else ''}" + (
                f", preempted {preemptions}x" if preemptions else ""
            )
            chips.append(_chip(rid, self.colors.get(rid, "0.5"), note))
        text = f"<b>waiting after step {step}</b>: {len(waiting)}<br>" + "".join(chips)
        if len(idle):
            text += "<br><b>running, not in this batch</b>: " + "".join(
                _chip(rid, self.colors.get(rid, "0.5")) for rid in idle["request_id"]
            )
        return text

    def _draw_blocks(self, step: int) -> None:
        blocks = self.blocks
        i = int(np.searchsorted(blocks.steps, step))
        if i < len(blocks.steps) and blocks.steps[i] == step and blocks.recorded[i]:
            self.block_codes = blocks.codes[i]
            pixels = block_image(
                blocks.codes[i], blocks.fill[i], self._full, self._light, self._columns
            )
            codes = blocks.codes[i]
            counts = [int((codes >= 0).sum())] + [int((codes == c).sum()) for c in _SPECIAL]
            title = f"KV blocks after step {step}" + (
                f" ({blocks.allocator})" if blocks.allocator else ""
            )
            title += ": {} held, {} shared, {} cached, {} free".format(*counts)
            title += f" of {blocks.num_blocks}x{blocks.block_size}"
        else:
            self.block_codes = None
            pixels = np.ones_like(self._map.get_array())
            title = f"no block snapshot of step {step}"
        self._canvas.restore_region(self._background)
        self._map.set_data(pixels)
        self._title.set_text(title)
        self.figure.draw_artist(self._map)
        self.figure.draw_artist(self._title)
        buffer = io.BytesIO()
        # Fast zlib: the image is mostly flat colour, so size barely changes.
        Image.fromarray(np.asarray(self._canvas.buffer_rgba())).save(
            buffer, format="png", compress_level=1
        )
        self.image.value = buffer.getvalue()
