"""cl.widgets.TraceExplorer without a browser: its per-step tables checked against the
trace's own columns, then the widget driven programmatically (setting the slider in Python
fires the same observer a drag does)."""

from __future__ import annotations

from types import SimpleNamespace

import cortexlab as cl
from cortexlab.trace_blocks import CACHED, FREE, SHARED
from cortexlab.workloads import LogNormal

import numpy as np
import pandas as pd
import pytest

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def run(tiny):
    """A burst on an arena too small for it: requests queue and three are preempted."""
    workload = cl.workloads.burst(
        10, prompt_len=LogNormal(median=12, sigma=0.5, low=4, high=32), output_len=12, seed=1
    )
    return cl.run_workload(tiny, workload, num_blocks=16, block_size=4, max_num_seqs=4, blocks=True)


def owners(codes, owner_ids) -> list:
    """Block owner codes as request ids (FREE, CACHED and SHARED as they are)."""
    return [owner_ids[c] if c >= 0 else int(c) for c in codes]


def test_queue_table_replays_the_engine_queues(run):
    steps = run.trace.steps.set_index("step")
    assert steps["num_preempted"].sum() == 3
    table = cl.widgets.queue_table(run.trace)
    finish_step = run.trace.requests.set_index("request_id")["finish_step"]
    assert list(table.columns) == cl.widgets.QUEUE_COLUMNS
    for step, row in steps.iterrows():
        live = table[table["step"] == step]
        waiting, running = live[live["state"] == "waiting"], live[live["state"] == "running"]
        # The same counts the engine reported after the step.
        assert len(waiting) == row["num_waiting"] and len(running) == row["num_running"]
        # Those that ran in the step, less those that finished in it.
        ran = {rid for rid in row["request_ids"] if finish_step[rid] != step}
        assert set(live.loc[live["scheduled"], "request_id"]) == ran
    preempted = table[table["num_preemptions"] > 0]
    assert set(preempted["request_id"]) == set(
        run.trace.requests.query("num_preemptions > 0")["request_id"]
    )
    # Waiting rows follow the scheduler's queue: a preempted request goes back first in line.
    for step, row in steps.iterrows():
        live = table[(table["step"] == step) & (table["state"] == "waiting")]
        assert list(live["request_id"]) == list(row["waiting_ids"])
    victim_steps = steps[steps["num_preempted"] > 0]
    assert any(row["waiting_ids"][0] in row["preempted_ids"] for _, row in victim_steps.iterrows())


def test_block_codes_match_the_trace_block_map(run):
    trace = run.trace
    codes = cl.widgets.block_codes(trace.blocks, trace.steps["step"])
    assert (codes.num_blocks, codes.block_size, codes.allocator) == (16, 4, "paged")
    assert codes.recorded.all()
    for i, step in enumerate(codes.steps):
        expected = owners(trace.block_map(step), trace.block_owner_ids)
        assert owners(codes.codes[i], codes.owner_ids) == expected
        rows = trace.blocks_at(step)
        held = rows[rows["state"] == "held"]
        np.testing.assert_allclose(
            codes.fill[i, held["block_id"]], held["num_tokens"].to_numpy(float) / 4
        )
    image = cl.widgets.block_image(
        codes.codes[5], codes.fill[5], np.zeros((10, 3)), np.ones((10, 3)), columns=16
    )
    assert image.shape == (cl.widgets.CELL, 16 * cl.widgets.CELL, 3)


def test_explorer_follows_the_slider(run):
    trace = run.trace
    steps = trace.steps.set_index("step")
    explorer = cl.widgets.TraceExplorer(trace, step=0)
    assert explorer.step == explorer.play.value == 0  # the player starts where the slider does
    assert bytes(explorer.image.value).startswith(PNG)
    assert "redraw" in explorer.timings

    shown = {}
    for step in [0, 1, int(steps["num_preempted"].idxmax()), len(steps) - 1]:
        explorer.slider.value = step
        batch = explorer.batch_rows()
        assert list(batch["request_id"]) == list(steps.at[step, "request_ids"])
        assert list(batch["num_new_tokens"]) == list(steps.at[step, "num_new_tokens"])
        assert list(batch["is_prefill"]) == list(steps.at[step, "is_prefill"])
        assert len(explorer.waiting()) == steps.at[step, "num_waiting"]
        assert explorer.waiting() == sorted(explorer.waiting())  # arrival order
        for rid in batch["request_id"]:
            assert f"</span>{rid} <small" in explorer.batch.value
        assert f"waiting after step {step}</b>: {len(explorer.waiting())}" in explorer.queue.value
        assert f"after step {step}</b>" in explorer.kv.value
        used, total = steps.at[step, "kv_used_slots"], steps.at[step, "kv_num_slots"]
        assert f"{used} of {total} KV slots hold tokens" in explorer.kv.value
        assert owners(explorer.block_codes, explorer.blocks.owner_ids) == owners(
            trace.block_map(step), trace.block_owner_ids
        )
        assert f"KV blocks after step {step} (paged)" in explorer._title.get_text()
        shown[step] = (explorer.batch.value, explorer.queue.value, bytes(explorer.image.value))
    first, *others = shown.values()
    assert all(o[0] != first[0] and o[1] != first[1] and o[2] != first[2] for o in others)

    # The preemption step names its victims; the step buttons move by one.
    step = int(steps["num_preempted"].idxmax())
    explorer.slider.value = step
    victims = steps.at[step, "preempted_ids"]
    assert "preempted: " + ", ".join(map(str, victims)) in explorer.batch.value
    explorer.next.click()
    assert explorer.step == step + 1
    explorer.previous.click()
    explorer.previous.click()
    assert explorer.step == step - 1
    explorer.slider.value = 0
    explorer.previous.click()  # clamped at the first step
    assert explorer.step == 0


def test_explorer_reads_only_dataframes(run):
    """A trace loaded from disk: plain DataFrames, lists stored as arrays."""
    trace = run.trace
    steps = trace.steps.copy()
    for column in ["request_ids", "num_new_tokens", "is_prefill", "preempted_ids"]:
        steps[column] = [np.asarray(v) for v in steps[column]]
    loaded = SimpleNamespace(
        steps=steps,
        requests=trace.requests,
        request_events=trace.request_events,
        blocks=trace.blocks,
    )
    live, disk = cl.widgets.TraceExplorer(trace), cl.widgets.TraceExplorer(loaded)
    for step in [3, 12]:
        live.slider.value = disk.slider.value = step
        assert disk.batch.value == live.batch.value and disk.queue.value == live.queue.value
        assert disk.kv.value == live.kv.value
        assert bytes(disk.image.value) == bytes(live.image.value)
    pd.testing.assert_frame_equal(cl.widgets.queue_table(loaded), cl.widgets.queue_table(trace))


def test_without_blocks_a_note_replaces_the_map(tiny):
    workload = cl.workloads.burst(3, prompt_len=8, output_len=4, seed=0)
    trace = cl.run_workload(tiny, workload, max_num_seqs=2).trace
    explorer = cl.widgets.TraceExplorer(trace)
    assert explorer.figure is None and explorer.block_codes is None
    assert "Trace(blocks=True)" in explorer.note.value
    assert explorer.image.layout.display == "none"
    explorer.slider.value = 0
    assert list(explorer.batch_rows()["request_id"]) == [0, 1]
    assert explorer.waiting() == [2]
    assert "waiting after step 0</b>: 1" in explorer.queue.value
    assert FREE == -1 and CACHED == -2 and SHARED == -3  # the codes block_codes uses
    with pytest.raises(ValueError, match="empty"):
        cl.widgets.TraceExplorer(cl.Trace())
