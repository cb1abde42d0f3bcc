"""KV allocator zoo data and plots on hand-fired events: Trace(blocks=True), the block map,
cache occupancy (new and old step columns), kv_waste and plot_fragmentation."""

from __future__ import annotations

import cortexlab as cl
from cortexlab.experiment import Comparison, Run
from cortexlab.hooks import StepEvent
from cortexlab.metrics import KV_PARTS, kv_breakdown, kv_waste
from cortexlab.trace_blocks import BLOCK_COLUMNS, CACHED, FREE, SHARED

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE = 16, 4
NUM_SLOTS = NUM_BLOCKS * BLOCK_SIZE


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def fire_blocks(trace, step, tables, num_tokens, cached=()):
    """One `kv.blocks` event as the engine will send it."""
    data = {
        "num_blocks": NUM_BLOCKS,
        "block_size": BLOCK_SIZE,
        "tables": {rid: tuple(t) for rid, t in tables.items()},
        "num_tokens": dict(num_tokens),
        "cached": tuple(cached),
        "allocator": "prefix",
    }
    trace.hooks["kv.blocks"](StepEvent("kv.blocks", float(step), step, data))


@pytest.fixture
def block_trace():
    """Step 0: a and b share blocks 0-1, 5-6 cached; step 1: b gone, c arrived, 5 cached."""
    trace = cl.Trace(blocks=True)
    fire_blocks(trace, 0, {"a": (0, 1, 2), "b": (0, 1, 3)}, {"a": 10, "b": 9}, cached=(5, 6))
    fire_blocks(trace, 1, {"a": (0, 1, 2), "c": (7,)}, {"a": 11, "c": 3}, cached=(5,))
    return trace


def kv_steps(new: bool = True) -> pd.DataFrame:
    """Three steps of a 100-slot arena: idle, then two busy ones (external past free in
    the last, so plots must clip it); `new=False` keeps only the columns of older traces."""
    df = pd.DataFrame(
        {
            "step": [0, 1, 2],
            "num_running": [0, 2, 3],
            "kv_num_slots": [100, 100, 100],
            "kv_used_slots": [0, 40, 60],
            "kv_reserved_slots": [0, 20, 20],
            "kv_internal_slots": [0, 5, 10],
            "kv_fragmented_slots": [0, 5, 10],
            "kv_cached_slots": [0, 10, 0],
            "kv_external_slots": [0, 5, 50],
            "kv_free_slots": [100, 30, 20],
            "kv_utilization": [0.0, 0.4, 0.6],
            "kv_hit_tokens": [0, 8, 16],
            "kv_lookup_tokens": [0, 20, 40],
            "kv_evicted_blocks": [0, 0, 3],
            "kv_max_sharing": [0, 2, 3],
        }
    )
    if not new:  # what the engine emitted before the allocator zoo
        df = df.drop(columns=[c for c in df if c.startswith("kv_") and c not in OLD])
        df["kv_free_slots"] += [0, 10, 0]  # no cache: cached slots were free
    return df


OLD = ["kv_num_slots", "kv_used_slots", "kv_reserved_slots", "kv_fragmented_slots"]
OLD += ["kv_free_slots", "kv_utilization"]


def steps_trace(steps: pd.DataFrame) -> cl.Trace:
    """A Trace fed `step.end` events carrying each row of `steps`."""
    trace = cl.Trace()
    for row in steps.to_dict("records"):
        step = int(row.pop("step"))
        trace.hooks["step.*"](StepEvent("step.end", float(step), step, row))
    return trace


# -- Trace(blocks=True) ----------------------------------------------------------------
def test_blocks_table_has_a_row_per_table_entry_and_cached_block(block_trace):
    df = block_trace.blocks
    assert list(df.columns) == BLOCK_COLUMNS
    assert df.attrs == {"num_blocks": 16, "block_size": 4, "allocator": "prefix", "last_step": 1}
    first = df[df["step"] == 0].set_index(["request_id", "block_id"], drop=False)
    held = first[first["state"] != "cached"]
    assert len(held) == 6 and len(first) == 8
    assert held.loc[("a", 0), "ref_count"] == held.loc[("b", 0), "ref_count"] == 2
    assert set(held.loc[held["ref_count"] == 2, "state"]) == {"shared"}
    assert held.loc[("a", 2), ["ref_count", "state", "index"]].tolist() == [1, "held", 2]
    # a holds 10 tokens in (0, 1, 2): 4, 4, 2; b holds 9 in (0, 1, 3): 4, 4, 1
    assert held.loc["a", "num_tokens"].tolist() == [4, 4, 2]
    assert held.loc["b", "num_tokens"].tolist() == [4, 4, 1]
    cached = df[df["state"] == "cached"]
    assert cached["request_id"].isna().all() and cached["num_tokens"].isna().all()
    assert cached[cached["step"] == 0][["block_id", "index", "ref_count"]].values.tolist() == [
        [5, 0, 0],
        [6, 1, 0],
    ]
    assert set(df["state"]) <= {"held", "shared", "cached"}


def test_block_map_codes_owners_free_cached_shared(block_trace):
    assert block_trace.block_owner_ids == ("a", "b", "c")
    first = block_trace.block_map(0)
    assert first.shape == (NUM_BLOCKS,)
    assert first[:8].tolist() == [SHARED, SHARED, 0, 1, FREE, CACHED, CACHED, FREE]
    last = block_trace.block_map()  # the last step
    assert last[:8].tolist() == [0, 0, 0, FREE, FREE, CACHED, FREE, 2]
    assert (last[8:] == FREE).all()
    with pytest.raises(ValueError, match="step 7 was not recorded"):
        block_trace.block_map(7)


def test_unchanged_tables_are_stored_once(block_trace):
    recorder = block_trace._blocks
    assert recorder.snapshot(0).tables[0][1] is recorder.snapshot(1).tables[0][1]


def test_blocks_need_blocks_true():
    trace = cl.Trace()
    assert "kv.blocks" not in trace.hooks
    for read in (lambda: trace.blocks, trace.block_map, lambda: cl.viz.plot_block_map(trace)):
        with pytest.raises(ValueError, match=r"cl\.Trace\(blocks=True\)"):
            read()
    with pytest.raises(ValueError, match="must be a bool"):
        cl.Trace(blocks="yes")
    empty = cl.Trace(blocks=True).blocks
    assert list(empty.columns) == BLOCK_COLUMNS and empty.empty


# -- plot_block_map --------------------------------------------------------------------
def _collections(ax) -> dict:
    return {c.get_gid(): c for c in ax.collections}


def _widths(collection) -> list:
    return [round(np.ptp(p.vertices[:4, 0]), 6) for p in collection.get_paths()]


def test_block_map_marks_owners_shared_and_cached(block_trace):
    ax = cl.viz.plot_block_map(block_trace, 0)
    cells = _collections(ax)
    counts = {gid: len(c.get_paths()) for gid, c in cells.items()}
    assert counts == {
        "free": 10,
        "cached": 2,
        "reserved:a": 1,
        "tokens:a": 1,
        "reserved:b": 1,
        "tokens:b": 1,
        "shared": 2,
        "tokens:shared": 2,
    }
    assert cells["cached"].get_hatch() and cells["shared"].get_hatch()
    assert [t.get_text() for t in ax.texts] == ["2", "2"]  # ref counts on the shared blocks
    full = _widths(cells["shared"])[0]
    assert _widths(cells["tokens:a"]) == [round(full / 2, 6)]  # 2 of 4 slots hold tokens
    assert _widths(cells["tokens:b"]) == [round(full / 4, 6)]
    palette = cl.viz.REQUEST_PALETTE
    for rid, i in (("a", 0), ("b", 1)):
        np.testing.assert_allclose(cells[f"tokens:{rid}"].get_facecolor()[0][:3], palette[i])
    assert "step 0" in ax.get_title() and "prefix" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "request a" in legend and "request b" in legend and "cached" in legend


def test_block_map_from_the_dataframe(block_trace):
    df = block_trace.blocks
    ax = cl.viz.plot_block_map(df)  # the last step; num_blocks from .attrs
    counts = {c.get_gid(): len(c.get_paths()) for c in ax.collections}
    assert counts == {
        "free": 11,
        "cached": 1,
        "reserved:a": 3,
        "tokens:a": 3,
        "reserved:c": 1,
        "tokens:c": 1,
    }
    assert "step 1" in ax.get_title() and not ax.texts  # nothing shared
    bare = df.copy()
    bare.attrs = {}
    ax = cl.viz.plot_block_map(bare, 1, num_blocks=32, block_size=4, columns=8)
    assert len(_collections(ax)["free"].get_paths()) == 27
    assert ax.get_ylim() == (4.0, 0.0)  # 32 blocks in rows of 8
    # c keeps its colour from the whole table, not from the one step drawn
    colors = cl.viz.request_colors(["a", "b", "c"])
    np.testing.assert_allclose(
        _collections(ax)["reserved:c"].get_facecolor()[0][:3],
        [v + (1 - v) * 0.6 for v in colors["c"]],
    )


# -- plot_cache_occupancy --------------------------------------------------------------
def _layer_tops(ax, n: int) -> list[np.ndarray]:
    # fill_between's polygon: the start point, n bottom points, the end, n top points reversed
    return [c.get_paths()[0].vertices[n + 2 : 2 * n + 2, 1][::-1] for c in ax.collections]


@pytest.mark.parametrize("new", [True, False])
def test_cache_occupancy_stacks_every_kind_of_slot(new):
    steps = kv_steps(new)
    ax = cl.viz.plot_cache_occupancy(steps_trace(steps))
    gids = [c.get_gid() for c in ax.collections]
    if new:
        assert gids == list(KV_PARTS)
    else:
        assert gids == ["holding", "reserved", "internal", "free"]
    tops = _layer_tops(ax, len(steps))
    np.testing.assert_allclose(tops[-1], 100)  # the stack fills the arena
    heights = np.diff(np.vstack([np.zeros(3), *tops]), axis=0)
    expected = kv_breakdown(steps)[gids].to_numpy().T
    np.testing.assert_allclose(heights, expected)
    if new:  # external is clipped to free: 50 claimed, 20 free in the last step
        np.testing.assert_allclose(heights[gids.index("external")], [0, 5, 20])
    assert "100 slots" in ax.get_title() and "60%" in ax.get_title()


def test_kv_breakdown_rows_sum_to_the_arena():
    for new in (True, False):
        parts = kv_breakdown(kv_steps(new))
        np.testing.assert_allclose(parts[list(KV_PARTS)].sum(axis=1), parts["num_slots"])
        assert (parts[list(KV_PARTS)] >= 0).all().all()


# -- kv_waste and plot_fragmentation ---------------------------------------------------
def test_kv_waste_means_over_busy_steps():
    waste = kv_waste(kv_steps())
    expected = {
        "utilization": 0.5,  # (40 + 60) / 2 / 100; the idle step 0 does not count
        "reserved_share": 0.125,  # (15 + 10) / 2
        "internal_share": 0.075,
        "external_share": 0.125,  # (5 + min(50, 20)) / 2
        "cached_share": 0.05,
        "free_share": 0.125,
        "token_utilization": (40 / 60 + 60 / 80) / 2,
        "peak_utilization": 0.6,
        "peak_reserved_share": 0.15,
        "peak_internal_share": 0.1,
        "peak_external_share": 0.2,
        "peak_cached_share": 0.1,
        "num_busy_steps": 2,
        "max_num_running": 3,
        "hit_tokens": 16,
        "hit_rate": 0.4,
        "evicted_blocks": 3,
        "max_sharing": 3,
    }
    assert waste.keys() == expected.keys()
    for key, value in expected.items():
        assert waste[key] == pytest.approx(value), key
    old = kv_waste(kv_steps(new=False))
    assert old["internal_share"] == pytest.approx(0.075)
    assert old["cached_share"] == old["external_share"] == 0.0
    assert np.isnan(old["hit_rate"]) and np.isnan(old["max_sharing"])
    # without num_running, a step that holds slots counts as busy
    assert kv_waste(kv_steps().drop(columns="num_running"))["utilization"] == pytest.approx(0.5)


def _comparison() -> Comparison:
    tight = kv_steps()
    loose = tight.assign(kv_internal_slots=0, kv_used_slots=tight["kv_used_slots"] - 5)
    loose["kv_free_slots"] += [0, 5, 5]
    runs = {
        name: Run(name=name, config={}, trace=steps_trace(df), summary={}, wall_seconds=0.0)
        for name, df in (("paged", tight), ("buddy", loose))
    }
    return Comparison(runs)


def test_fragmentation_bars_per_allocator():
    comparison = _comparison()
    ax = cl.viz.plot_fragmentation(comparison)
    assert len(ax.patches) == 2 * 5
    table = cl.viz.kv_waste_table(comparison)
    assert list(table.index) == ["paged", "buddy"]
    internal = [p.get_height() for p in ax.patches if p.get_gid() == "internal"]
    np.testing.assert_allclose(internal, table["internal_share"])
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["paged", "buddy"]
    assert "71% of held slots" in ax.get_xticklabels()[0].get_text()
    # a dict of traces and the table itself draw the same bars
    for data in (comparison.traces, table):
        heights = [p.get_height() for p in cl.viz.plot_fragmentation(data).patches]
        np.testing.assert_allclose(heights, [p.get_height() for p in ax.patches])


def test_each_kv_plot_returns_the_axes_it_drew_on(block_trace):
    steps = steps_trace(kv_steps())
    calls = [
        lambda ax: cl.viz.plot_block_map(block_trace, ax=ax),
        lambda ax: cl.viz.plot_cache_occupancy(steps, ax=ax, utilization=False),
        lambda ax: cl.viz.plot_fragmentation({"paged": steps}, ax=ax),
    ]
    fig, axes = plt.subplots(1, len(calls))
    for call, ax in zip(calls, axes, strict=True):
        assert call(ax) is ax
        assert ax.has_data() and ax.get_title()
    assert plt.get_fignums() == [fig.number]
    for call in calls:
        ax = call(None)
        assert ax.figure.number != fig.number and ax.get_title()


# -- against the engine, once it fires kv.blocks ---------------------------------------
@pytest.mark.skipif(
    "kv.blocks" not in cl.hooks.HOOK_POINTS, reason="the engine does not fire kv.blocks yet"
)
@pytest.mark.parametrize("allocator", ["paged", "prefix"])
def test_engine_blocks_agree_with_the_step_columns(tiny, allocator):
    engine = cl.Engine(tiny, block_size=4, num_blocks=12, allocator=allocator)
    trace = cl.Trace(blocks=True)
    prompts = [[7] * 9 + [1 + i] for i in range(3)]  # a shared 2-block prefix
    with engine.hooks(trace.hooks):
        engine.generate(prompts[:1], cl.SamplingParams(max_tokens=2))  # fills the cache
        engine.generate(prompts, cl.SamplingParams(max_tokens=4, ignore_eos=True))
    blocks, steps = trace.blocks, trace.steps.set_index("step")
    assert blocks.attrs["num_blocks"] == 12 and blocks.attrs["allocator"] == allocator
    for step, rows in blocks.groupby("step"):
        held = rows[rows["state"] != "cached"].groupby("block_id")
        kv = steps.loc[step]
        assert held["num_tokens"].max().sum() == kv["kv_used_slots"]
        assert held.ngroups * 4 == kv["kv_used_slots"] + kv["kv_reserved_slots"]
        for state in ("cached", "shared"):
            if f"kv_{state}_slots" in kv:
                assert (
                    rows.loc[rows["state"] == state, "block_id"].nunique() * 4
                    == (kv[f"kv_{state}_slots"])
                )
        codes = trace.block_map(step)
        assert (codes == -1).sum() * 4 == kv["kv_free_slots"]
