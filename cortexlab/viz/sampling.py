"""Sampling pictures: one row's candidates through the chain, entropy over a generation, and
generated text coloured by each token's probability."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from cortexlab.request import SamplingParams
from cortexlab.sampling.explain import explain
from cortexlab.viz._common import new_axes, request_colors

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import ScaledTranslation

RAW_COLOR = "#9ecae1"  # the model's distribution
FINAL_COLOR = "#08519c"  # the distribution the token is drawn from
REMOVED_COLOR = "0.82"  # candidates a stage cut


def token_label(text: Any, *, max_chars: int = 12) -> str:
    """A token's text made visible on an axis: spaces as '␣', control characters escaped
    (newline as \\n)."""
    shown = "".join("␣" if c == " " else c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return shown if len(shown) <= max_chars else shown[: max_chars - 1] + "…"


def plot_token_distribution(
    data: Any,
    params: SamplingParams | None = None,
    *,
    tokenizer: Any = None,
    top: int = 20,
    cumulative: bool = True,
    ax: Axes | None = None,
    **explain_options: Any,
) -> Axes:
    """The top candidates of one logits row, raw (light) beside final (dark) probability.

    `data` is a logits row ``[V]`` (with `params`) or a table from
    ``cl.sampling.explain(..., stages=True)``. Candidates a stage removed are grey and
    labelled with that stage; the line (right axis) is the cumulative mass, in this order, of
    the distribution top-p saw, with the top-p threshold dashed. Other keywords (history,
    prompt, order, ...) go to ``explain``. Returns the bars' Axes.
    """
    if isinstance(data, pd.DataFrame):
        table = data
        top_p = table.attrs.get("top_p", 1.0)
    else:
        if params is None:
            raise ValueError("plot_token_distribution needs params with a logits row")
        table = explain(data, params, top=top, stages=True, tokenizer=tokenizer, **explain_options)
        top_p = params.top_p if not params.is_greedy else 1.0
    for column in ("token_id", "raw_prob", "raw_rank", "final_prob", "removed_by"):
        if column not in table.columns:
            raise ValueError(f"the candidates table lacks {column!r}: pass cl.sampling.explain()")
    table = table.sort_values("raw_rank", kind="stable").reset_index(drop=True)
    ax = new_axes(ax, (max(7.5, 0.42 * len(table) + 3.5), 3.6))
    x = np.arange(len(table))
    removed = table["removed_by"].notna().to_numpy()
    raw_colors = [REMOVED_COLOR if r else RAW_COLOR for r in removed]
    ax.bar(x - 0.2, table["raw_prob"], 0.4, color=raw_colors, gid="raw")
    ax.bar(x + 0.2, table["final_prob"], 0.4, color=FINAL_COLOR, gid="final")
    ceiling = float(max(table["raw_prob"].max(), table["final_prob"].max(), 1e-12))
    for xi, (stage, p) in enumerate(zip(table["removed_by"], table["raw_prob"], strict=True)):
        if isinstance(stage, str):
            ax.text(
                xi - 0.2,
                p + 0.02 * ceiling,
                stage,
                rotation=90,
                ha="center",
                va="bottom",
                fontsize="x-small",
                color="0.35",
                gid="removed_by",
            )
    ax.set_ylim(0, 1.3 * ceiling)
    labels = table["token"] if "token" in table.columns else table["token_id"]
    ax.set_xticks(x, [token_label(t) for t in labels], rotation=60, ha="right", fontsize="small")
    ax.set_xlim(-0.7, len(table) - 0.3)
    ax.set_ylabel("probability")
    handles = [
        Patch(color=RAW_COLOR, label="raw"),
        Patch(color=FINAL_COLOR, label="final"),
        Patch(color=REMOVED_COLOR, label="removed by"),
    ]
    # Outside, right of the twin axis: inside it would hide bars or the cumulative line.
    gap = 0.05  # inches between the axes (or the twin axis' label) and the legend
    if cumulative:
        handles += _cumulative(ax, table, top_p)
        gap = 0.8
    shift = ScaledTranslation(gap, 0, ax.figure.dpi_scale_trans)
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        bbox_transform=ax.transAxes + shift,
        fontsize="small",
    )
    kept = table.attrs.get("num_kept")
    if kept:
        ax.set_title("kept: " + " → ".join(f"{k} {v}" for k, v in kept.items()), fontsize="small")
    return ax


def _cumulative(ax: Axes, table: pd.DataFrame, top_p: float) -> list:
    """The cumulative mass (right axis) of the distribution top-p received, and p; returns
    legend handles."""
    columns = ["raw_prob"] + [c for c in table.columns if c.startswith("p_")]
    seen, label = "raw_prob", "cumulative\n(raw)"
    if "p_top_p" in columns:  # the distribution just before top-p acted
        seen, label = columns[columns.index("p_top_p") - 1], "cumulative\n(top-p input)"
    twin = ax.twinx()
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("cumulative mass")
    x = np.arange(len(table))
    twin.step(x, np.cumsum(table[seen]), where="mid", color="C3", lw=1.5, gid="cumulative")
    handles = [Line2D([], [], color="C3", label=label)]
    if top_p < 1.0:
        twin.axhline(top_p, color="C3", ls="--", lw=1, gid="top_p")
        handles.append(Line2D([], [], color="C3", ls="--", label=f"top_p = {top_p:g}"))
    return handles


def _tokens_table(data: Any) -> pd.DataFrame:
    tokens = data.tokens if hasattr(data, "tokens") and not isinstance(data, pd.DataFrame) else data
    if not isinstance(tokens, pd.DataFrame):
        raise TypeError(f"expected a Trace(tokens=True) or its .tokens table, got {data!r}")
    missing = [c for c in ("request_id", "position", "entropy") if c not in tokens.columns]
    if missing or tokens.empty:
        raise ValueError(
            "no sampled tokens: record them with cl.Trace(tokens=True) around the generation"
        )
    return tokens


def plot_entropy(
    trace: Any,
    *,
    x: str = "position",
    request_ids: Sequence | None = None,
    labels: Mapping | None = None,
    surprise: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Entropy (nats) of each request's final distribution over its tokens (`x`:
    "position" in the output or engine "step"); dots: each drawn token's surprise
    (-log p). Reads a ``Trace(tokens=True)`` or its `.tokens` table; `labels` maps request
    ids to legend names."""
    if x not in ("position", "step"):
        raise ValueError(f"x must be 'position' or 'step', got {x!r}")
    tokens = _tokens_table(trace)
    ids = list(dict.fromkeys(tokens["request_id"]))
    colors = request_colors(ids if isinstance(trace, pd.DataFrame) else trace)
    colors = {rid: colors.get(rid, "0.3") for rid in ids}
    if request_ids is not None:
        unknown = [r for r in request_ids if r not in colors]
        if unknown:
            raise ValueError(f"request_ids {unknown} have no sampled tokens; known: {ids}")
        ids = list(request_ids)
    ax = new_axes(ax, (9, 3.2))
    for rid in ids:
        rows = tokens[tokens["request_id"] == rid].sort_values(x)
        label = (labels or {}).get(rid, f"request {rid}")
        ax.plot(rows[x], rows["entropy"], color=colors[rid], lw=1.5, label=label)
        if surprise:
            ax.scatter(rows[x], -rows["logprob"], s=10, color=colors[rid], alpha=0.6, lw=0)
    ax.set_xlabel("output token" if x == "position" else "engine step")
    ax.set_ylabel("nats")
    handles, _ = ax.get_legend_handles_labels()
    if surprise:
        handles.append(
            Line2D([], [], ls="", marker="o", ms=4, color="0.4", label="surprise −log p (dots)")
        )
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.set_title("entropy of the distribution each token was drawn from", fontsize="small")
    return ax


class TokenHTML:
    """Generated text, one ``<span>`` per token coloured by its probability (a tooltip lists
    the likeliest alternatives). Displays itself in Jupyter; `.html` is the markup."""

    def __init__(self, tokens: list[dict], *, cmap: str = "RdYlGn") -> None:
        self.tokens, self.cmap = tokens, cmap

    @property
    def html(self) -> str:
        """The markup: a block of spans, then a one-line key."""
        colormap = colormaps[self.cmap]
        spans = []
        for t in self.tokens:
            p = t["prob"]
            color = "#eeeeee" if not math.isfinite(p) else _tint(colormap(p))
            tip = f"p = {p:.3f}" + (f", rank {t['rank']}" if t.get("rank") else "")
            tip += "".join(f"\n{token_label(a, max_chars=20)}  {q:.3f}" for a, q in t["top"])
            spans.append(
                f'<span style="background:{color}" title="{html.escape(tip, quote=True)}">'
                f"{html.escape(t['text'])}</span>"
            )
        low, high = _tint(colormap(0.0)), _tint(colormap(1.0))
        return (
            '<div style="white-space:pre-wrap;font-family:monospace;line-height:1.7">'
            + "".join(spans)
            + "</div>"
            + f'<div style="font-size:smaller;color:#555">token probability: '
            f'<b style="background:{low}">&nbsp;0&nbsp;</b> … '
            f'<b style="background:{high}">&nbsp;1&nbsp;</b> (hover for alternatives)</div>'
        )

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        body = "".join(f"[{t['text']}|{t['prob']:.2f}]" for t in self.tokens)
        return f"TokenHTML({body})"

    def __len__(self) -> int:
        return len(self.tokens)


def _tint(rgba: Any) -> str:
    """A pale version of a colormap colour (text on it stays readable)."""
    r, g, b = (0.45 * c + 0.55 for c in rgba[:3])
    return mcolors.to_hex((r, g, b))


def token_html(
    source: Any,
    *,
    request_id: Any = None,
    tokenizer: Any = None,
    num_alternatives: int = 5,
    cmap: str = "RdYlGn",
) -> TokenHTML:
    """Generated text coloured by each token's probability under the distribution it was
    drawn from. `source`: a Result of ``SamplingParams(logprobs=k)`` (or its `.logprobs`),
    or a ``Trace(tokens=True)`` / its `.tokens` table with `request_id` (default: the
    first request; alternatives are spelled with `tokenizer` if given, else ids)."""
    if isinstance(source, list) or hasattr(source, "logprobs"):
        entries = source if isinstance(source, list) else source.logprobs
        if entries is None:
            raise ValueError(
                "this Result has no logprobs: generate with cl.SamplingParams(logprobs=k)"
            )
        tokens = [
            {
                "text": e["token"],
                "prob": math.exp(e["logprob"]),
                "rank": e.get("rank"),
                "top": [
                    (a["token"], math.exp(a["logprob"]))
                    for a in e.get("top_logprobs", [])[:num_alternatives]
                ],
            }
            for e in entries
        ]
        return TokenHTML(tokens, cmap=cmap)
    table = _tokens_table(source)
    ids = list(dict.fromkeys(table["request_id"]))
    rid = ids[0] if request_id is None else request_id
    if rid not in ids:
        raise ValueError(f"request_id {rid!r} has no sampled tokens; known: {ids}")
    rows = table[table["request_id"] == rid].sort_values("position")

    def spell(token_id: int) -> str:
        return tokenizer.decode([int(token_id)]) if tokenizer is not None else str(token_id)

    tokens = [
        {
            "text": row.text if isinstance(row.text, str) else spell(row.token_id),
            "prob": float(row.prob),
            "rank": None if pd.isna(row.rank) else int(row.rank),
            "top": [
                (spell(i), float(q))
                for i, q in zip(row.top_ids, row.top_probs, strict=True)
                if q > 0
            ][:num_alternatives],
        }
        for row in rows.itertuples()
    ]
    return TokenHTML(tokens, cmap=cmap)
