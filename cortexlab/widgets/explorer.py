"""SamplerExplorer: sliders for the sampling parameters over one prompt's next token.

The widget is a thin layer over plain functions, each usable and tested without a browser:
``explorer_params`` (control values -> SamplingParams), ``params_line`` (the line to paste
into code), ``ExplorerState`` / ``prompt_state`` (a prompt's next-token logits, computed
once), ``render`` (state -> the candidates plot) and ``continuation`` (state -> a short
generation by the engine with exactly those params).
"""

from __future__ import annotations

import dataclasses
import html
import io
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cortexlab.engine import Engine, Result
from cortexlab.models import Model
from cortexlab.request import SamplingParams
from cortexlab.sampling.order import PRESETS
from cortexlab.viz.sampling import plot_token_distribution, token_html

import ipywidgets as widgets
import mlx.core as mx
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

# name -> (min, max, step): the SamplingParams fields the explorer offers, in display order.
CONTROLS: dict[str, tuple[float, float, float]] = {
    "temperature": (0.0, 2.0, 0.05),
    "top_k": (0, 100, 1),
    "top_p": (0.05, 1.0, 0.01),
    "min_p": (0.0, 0.5, 0.01),
    "typical_p": (0.05, 1.0, 0.01),
    "top_n_sigma": (0.0, 4.0, 0.1),
    "xtc_probability": (0.0, 1.0, 0.05),
    "xtc_threshold": (0.0, 0.5, 0.01),
    "mirostat_tau": (0.0, 10.0, 0.5),
    "repetition_penalty": (0.5, 2.0, 0.05),
    "presence_penalty": (-2.0, 2.0, 0.1),
    "frequency_penalty": (-2.0, 2.0, 0.1),
    "dry_multiplier": (0.0, 2.0, 0.1),
}
NUM_ALTERNATIVES = 5  # alternatives per token in the continuation's tooltips
_FIELDS = {f.name: f for f in dataclasses.fields(SamplingParams)}


def explorer_params(
    values: Mapping[str, float],
    *,
    order: str = "hf",
    seed: int = 0,
    max_tokens: int = 10,
) -> SamplingParams:
    """SamplingParams from control values (rounded to each control's step; others default)."""
    unknown = [k for k in values if k not in CONTROLS]
    if unknown:
        raise ValueError(f"unknown explorer control(s) {unknown}; known: {', '.join(CONTROLS)}")
    fields: dict[str, Any] = {}
    for name, value in values.items():
        step = CONTROLS[name][2]
        fields[name] = int(round(value)) if isinstance(step, int) else round(float(value), 6)
    return SamplingParams(**fields, order=order, seed=seed, max_tokens=max_tokens)


def params_line(params: SamplingParams) -> str:
    """``cl.SamplingParams(...)`` with every field that differs from its default."""
    parts = []
    for name, f in _FIELDS.items():
        value = getattr(params, name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if value == default or (name == "order" and value is None):
            continue
        # Six significant digits: a slider's 0.30000000000000004 reads 0.3.
        shown = repr(float(format(value, ".6g"))) if isinstance(value, float) else repr(value)
        parts.append(f"{name}={shown}")
    return f"cl.SamplingParams({', '.join(parts)})"


@dataclass(slots=True)
class ExplorerState:
    """What the explorer draws from: a prompt, its next-token logits, and the params."""

    prompt_ids: list[int]
    logits: np.ndarray  # [V] float32, the model's logits for the token after the prompt
    params: SamplingParams
    tokenizer: Any = None


def prompt_state(
    model: Model, prompt: str, params: SamplingParams, *, chat: bool = True
) -> ExplorerState:
    """The prompt's token ids and next-token logits (one forward pass)."""
    ids = model.encode_prompt(prompt, chat=chat)
    if not ids:
        raise ValueError("the prompt is empty")
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    return ExplorerState(ids, np.array(logits), params, model.tokenizer)


def render(state: ExplorerState, *, top: int = 20, ax: Axes | None = None) -> Axes:
    """The next-token candidates under `state.params` (``plot_token_distribution``)."""
    return plot_token_distribution(
        state.logits, state.params, tokenizer=state.tokenizer, prompt=state.prompt_ids,
        top=top, ax=ax,
    )  # fmt: skip


def continuation(engine: Engine, state: ExplorerState) -> Result:
    """`state.params` generating from the prompt on `engine` (with per-token logprobs for the
    colouring; they do not change the tokens)."""
    params = dataclasses.replace(state.params, logprobs=NUM_ALTERNATIVES)
    [result] = engine.generate([state.prompt_ids], params)
    return result


class SamplerExplorer(widgets.VBox):
    """Sliders per sampling parameter and an order preset over one prompt's next token.

    Each change redraws the candidates (raw vs final, which stage removed which) and, unless
    ``continuation=False``, generates `max_tokens` tokens with those params on a one-seat
    engine (seeded, so a setting always gives the same text), coloured by token probability.
    The ``cl.SamplingParams(...)`` line below reproduces it in code. Sliders update on
    release; `timings` holds the last redraw and continuation times (s).
    """

    def __init__(
        self,
        model: Model,
        prompt: str = "Write a short poem about the sea.",
        *,
        chat: bool = True,
        order: str = "hf",
        seed: int = 0,
        max_tokens: int = 10,
        top: int = 20,
        continuation: bool = True,
        **values: float,
    ) -> None:
        self.model, self.chat, self.top = model, chat, top
        self.has_continuation = continuation
        self.max_tokens = max_tokens
        values = {"temperature": 0.8, **values}
        params = explorer_params(values, order=order, seed=seed, max_tokens=max_tokens)
        self.state = prompt_state(model, prompt, params, chat=chat)
        self.engine = Engine(model, max_num_seqs=1) if continuation else None
        self.timings: dict[str, float] = {}
        self.result: Result | None = None

        self.controls: dict[str, widgets.ValueWidget] = {}
        for name, (low, high, step) in CONTROLS.items():
            value = getattr(params, name)
            kind = widgets.IntSlider if isinstance(step, int) else widgets.FloatSlider
            self.controls[name] = kind(
                value=value, min=low, max=high, step=step, description=name,
                continuous_update=False, style={"description_width": "120px"},
                layout=widgets.Layout(width="340px"),
            )  # fmt: skip
        self.order = widgets.Dropdown(options=list(PRESETS), value=order, description="order")
        self.seed = widgets.BoundedIntText(value=seed, min=0, max=2**31, description="seed")
        self.prompt = widgets.Text(
            value=prompt, description="prompt", continuous_update=False,
            layout=widgets.Layout(width="700px"),
        )  # fmt: skip
        self.image = widgets.Image(format="png")
        self.code = widgets.HTML()
        self.text = widgets.HTML()
        self.status = widgets.HTML()
        self.figure = Figure(figsize=(9, 3.6), layout="constrained")

        for control in [*self.controls.values(), self.order, self.seed]:
            control.observe(self._on_change, names="value")
        self.prompt.observe(self._on_prompt, names="value")
        sliders = list(self.controls.values())
        half = (len(sliders) + 1) // 2
        super().__init__(
            [
                self.prompt,
                widgets.HBox([widgets.VBox(sliders[:half]), widgets.VBox(sliders[half:])]),
                widgets.HBox([self.order, self.seed]),
                self.image,
                self.code,
                self.text,
                self.status,
            ]
        )
        self.update()

    @property
    def params(self) -> SamplingParams:
        """The params the controls describe now."""
        return self.state.params

    def _on_change(self, _change: Any = None) -> None:
        values = {name: c.value for name, c in self.controls.items()}
        try:
            params = explorer_params(
                values, order=self.order.value, seed=self.seed.value, max_tokens=self.max_tokens
            )
        except ValueError as exc:
            self.status.value = f"<span style='color:#b00'>{exc}</span>"
            return
        self.state.params = params
        self.update()

    def _on_prompt(self, change: Any) -> None:
        try:
            self.state = prompt_state(self.model, change["new"], self.params, chat=self.chat)
        except ValueError as exc:
            self.status.value = f"<span style='color:#b00'>{exc}</span>"
            return
        self.update()

    def update(self) -> None:
        """Redraw the candidates, then (if on) the continuation, for the current state."""
        t0 = time.perf_counter()
        self.figure.clear()
        render(self.state, top=self.top, ax=self.figure.add_subplot())
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=80)
        self.image.value = buffer.getvalue()
        self.code.value = f"<code>{html.escape(params_line(self.params))}</code>"
        self.timings["redraw"] = time.perf_counter() - t0
        if self.engine is not None:
            t0 = time.perf_counter()
            self.result = continuation(self.engine, self.state)
            self.text.value = token_html(self.result).html
            self.timings["continuation"] = time.perf_counter() - t0
        shown = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.timings.items())
        self.status.value = f"<small style='color:#666'>{shown}</small>"
