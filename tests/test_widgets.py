"""cl.widgets.SamplerExplorer without a browser: its plain functions, then the widget driven
programmatically (values set in Python fire the same observers a slider does)."""

from __future__ import annotations

import cortexlab as cl

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

PNG = b"\x89PNG"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_params_from_controls_and_the_line_to_copy():
    params = cl.widgets.explorer_params(
        {"temperature": 0.7000000001, "top_k": 12.0, "min_p": 0.05}, order="llama.cpp", seed=3
    )
    assert params.temperature == 0.7 and params.top_k == 12 and isinstance(params.top_k, int)
    line = cl.widgets.params_line(params)
    assert line == (
        "cl.SamplingParams(max_tokens=10, temperature=0.7, top_k=12, seed=3, min_p=0.05, "
        "order='llama.cpp')"
    )
    assert eval(line, {"cl": cl}) == params  # it really reproduces them
    assert cl.widgets.params_line(cl.SamplingParams()) == "cl.SamplingParams()"
    with pytest.raises(ValueError, match="unknown explorer control"):
        cl.widgets.explorer_params({"top_q": 1})
    with pytest.raises(ValueError, match="top_p"):
        cl.widgets.explorer_params({"top_p": 0.0})


def test_render_and_continuation_are_plain_functions(tiny):
    params = cl.SamplingParams(temperature=1.0, top_k=5, seed=1, max_tokens=4, ignore_eos=True)
    state = cl.widgets.prompt_state(tiny, "hello", params, chat=False)
    assert state.prompt_ids == tiny.encode_prompt("hello") and state.logits.shape == (259,)
    ax = cl.widgets.render(state, top=8)
    assert len(ax.patches) == 16 and "top_k 5" in ax.get_title()
    engine = cl.Engine(tiny, max_num_seqs=1)
    result = cl.widgets.continuation(engine, state)
    [plain] = cl.Engine(tiny).generate(["hello"], params)
    assert result.token_ids == plain.token_ids  # the params line gives the same text
    assert len(result.logprobs) == 4  # asked for the colouring only


def test_explorer_redraws_when_a_control_changes(tiny):
    explorer = cl.widgets.SamplerExplorer(tiny, "hello", chat=False, max_tokens=4, top=8)
    assert bytes(explorer.image.value).startswith(PNG)
    assert "temperature=0.8" in explorer.code.value
    assert explorer.text.value.count("<span") == len(explorer.result.token_ids) > 0
    assert set(explorer.timings) == {"redraw", "continuation"}
    before_image, before_text = bytes(explorer.image.value), explorer.result.token_ids

    explorer.controls["top_k"].value = 3
    assert explorer.params.top_k == 3 and "top_k=3" in explorer.code.value
    assert bytes(explorer.image.value) != before_image
    assert "top_k 3" in explorer.figure.axes[0].get_title()
    expected = cl.Engine(tiny).generate(["hello"], explorer.params)[0].token_ids
    assert explorer.result.token_ids == expected

    explorer.order.value = "llama.cpp"
    assert "order=&#x27;llama.cpp&#x27;" in explorer.code.value
    assert explorer.params.order == "llama.cpp"

    explorer.controls["temperature"].value = 0.0  # greedy: the argmax, whatever the seed
    greedy = cl.Engine(tiny).generate(["hello"], cl.SamplingParams(max_tokens=4))[0]
    assert explorer.result.token_ids == greedy.token_ids and before_text is not None

    logits = explorer.state.logits.copy()
    explorer.prompt.value = "another prompt"
    assert not np.array_equal(explorer.state.logits, logits)
    assert explorer.state.prompt_ids == tiny.encode_prompt("another prompt")


def test_explorer_reports_bad_values_instead_of_raising(tiny):
    explorer = cl.widgets.SamplerExplorer(tiny, "hi", chat=False, continuation=False)
    assert explorer.engine is None and set(explorer.timings) == {"redraw"}
    explorer.prompt.value = ""
    assert "empty" in explorer.status.value
    assert explorer.state.prompt_ids == tiny.encode_prompt("hi")
