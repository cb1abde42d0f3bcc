"""The Trace: saving and loading (gzip JSON lines), the notebook summary, and docs/hooks.md
kept in step with the hook points and the event data the engine really sends."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import cortexlab as cl
from cortexlab.hooks import HOOK_POINTS, KVEvent, RequestEvent, SamplerEvent, StepEvent
from cortexlab.trace import TRACE_FORMAT, TRACE_FORMAT_VERSION

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas.testing as pdt  # noqa: E402
import pytest  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"
HEAD = [5, 6, 7, 8, 9, 10, 11, 12]  # a shared prompt head: prefix cache hits and sharing


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def run(tiny):
    """One small run with everything in it: prefix caching, a fork (n=2), preemptions on a
    16-block arena, a request that can never fit, a str id; recorded by a full Trace, a
    plain one, and a hook that collects every event's data keys."""
    engine = cl.Engine(
        tiny, allocator="prefix", block_size=4, num_blocks=16, max_num_seqs=6, clock="measured"
    )
    full, plain = cl.Trace(tokens=True, blocks=True), cl.Trace()
    keys: dict[str, set] = defaultdict(set)

    def collect(event):
        keys[event.name] |= set(getattr(event, "data", None) or {})
        for row in getattr(event, "rows", ()):
            keys["sampler.row"] |= set(row)
            for stage in row["stages"]:
                keys["sampler.stage"] |= set(stage)

    with engine.hooks(full.hooks), engine.hooks(plain.hooks), engine.hooks({"*": collect}):
        for i in range(5):
            params = cl.SamplingParams(
                max_tokens=8, ignore_eos=True, temperature=0.8, seed=i, n=2 if i == 1 else 1
            )
            engine.submit(HEAD + [20 + i] * (i + 1), params)
        engine.submit(list(range(1, 100)), cl.SamplingParams(max_tokens=4))  # never fits
        engine.submit([3, 4], cl.SamplingParams(max_tokens=3), request_id="named")
        engine.run_until_done()
    return engine, full, plain, keys


def assert_same(a: cl.Trace, b: cl.Trace) -> None:
    """Every table and mapping of two Traces equal, dtypes and attrs included."""
    for name in ("steps", "requests", "request_events"):
        pdt.assert_frame_equal(getattr(a, name), getattr(b, name), obj=name)
    assert a.token_times == b.token_times
    assert a.output_token_ids == b.output_token_ids
    pdt.assert_frame_equal(a.metrics(), b.metrics())
    assert a.summary().keys() == b.summary().keys()
    assert a.records_tokens == b.records_tokens and a.records_blocks == b.records_blocks
    if a.records_tokens:
        pdt.assert_frame_equal(a.tokens, b.tokens, obj="tokens")
    if a.records_blocks:
        blocks_a, blocks_b = a.blocks, b.blocks
        pdt.assert_frame_equal(blocks_a, blocks_b, obj="blocks")
        assert blocks_a.attrs == blocks_b.attrs
        assert a.block_owner_ids == b.block_owner_ids
        for step in sorted(set(blocks_a["step"])):
            np.testing.assert_array_equal(a.block_map(step), b.block_map(step))


def test_round_trip_with_tokens_and_blocks(run, tmp_path):
    _, full, _, _ = run
    requests = full.requests
    # The run has what a format could lose: mixed int / str ids, a failure, preemptions.
    assert {type(r) for r in requests["request_id"]} == {int, str}
    assert (requests["state"] == "failed").sum() == 1
    assert full.steps["preempted_ids"].map(len).sum() > 0
    assert (full.blocks["state"] == "shared").any() and (full.blocks["state"] == "cached").any()

    path = full.save(tmp_path / "run.trace.jsonl.gz")
    assert path == tmp_path / "run.trace.jsonl.gz"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    loaded = cl.Trace.load(path)
    assert_same(full, loaded)
    assert loaded.source == str(path)
    assert loaded.metadata["recordings"] == {
        "steps": True,
        "requests": True,
        "tokens": True,
        "blocks": True,
    }
    assert loaded.metadata["blocks"]["allocator"] == "prefix"
    assert loaded.metadata["blocks"]["num_blocks"] == 16
    assert loaded.metadata["blocks"]["block_size"] == 4
    assert loaded.metadata["cortexlab_version"] == cl.__version__

    # Plots and tables read a loaded trace as they read the live one.
    cl.viz.plot_gantt(loaded)
    cl.viz.plot_cache_occupancy(loaded)
    cl.viz.plot_block_map(loaded)
    cl.viz.plot_block_map(loaded, step=int(loaded.blocks["step"].min()))
    cl.viz.plot_entropy(loaded)
    pdt.assert_frame_equal(cl.viz.kv_waste_table(loaded), cl.viz.kv_waste_table(full))


def test_round_trip_without_tokens_or_blocks(run, tmp_path):
    _, _, plain, _ = run
    loaded = cl.Trace.load(plain.save(str(tmp_path / "plain.gz")))
    assert_same(plain, loaded)
    with pytest.raises(ValueError, match="does not record tokens"):
        _ = loaded.tokens
    with pytest.raises(ValueError, match="does not record KV blocks"):
        _ = loaded.blocks
    cl.viz.plot_gantt(loaded)
    assert loaded.metadata["blocks"] is None


def test_loaded_trace_is_read_only(run, tmp_path):
    engine, _, plain, _ = run
    loaded = cl.Trace.load(plain.save(tmp_path / "t.gz"))
    with pytest.raises(RuntimeError, match="read-only"):
        _ = loaded.hooks
    with pytest.raises(RuntimeError, match="read-only"), engine.hooks(loaded.hooks):
        pass


def test_file_is_strict_gzip_json_lines(run, tmp_path):
    _, full, _, _ = run
    path = full.save(tmp_path / "t.gz")
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()

    def strict(text):
        raise ValueError(f"not strict JSON: {text}")

    rows = [json.loads(line, parse_constant=strict) for line in lines]  # no NaN / Infinity
    header = rows[0]
    assert header["format"] == TRACE_FORMAT and header["format_version"] == TRACE_FORMAT_VERSION
    names = [t["name"] for t in header["tables"]]
    assert names == ["steps", "requests", "request_events", "outputs", "tokens", "blocks"]
    at = 1
    for table in header["tables"]:  # each table: a marker line, then its rows
        assert rows[at] == {"table": table["name"], "rows": table["rows"]}
        at += 1 + table["rows"]
    assert at == len(rows)


def test_non_finite_and_numpy_values_round_trip(tmp_path):
    trace = cl.Trace()
    trace.hooks["step.*"](StepEvent("step.begin", 0.0, 0, {}))
    data = {"duration": math.inf, "kv_utilization": np.float64("nan"), "num_running": np.int64(2)}
    trace.hooks["step.*"](StepEvent("step.end", 1.0, 0, data))
    trace.hooks["step.*"](StepEvent("step.begin", 1.0, 1, {"duration": -math.inf}))
    trace.hooks["step.*"](StepEvent("step.begin", 2.0, 2, {}))  # a step with keys missing
    loaded = cl.Trace.load(trace.save(tmp_path / "t.gz"))
    pdt.assert_frame_equal(trace.steps, loaded.steps)
    assert list(loaded.steps["duration"][:2]) == [math.inf, -math.inf]


def test_save_and_load_errors(run, tmp_path):
    _, _, plain, _ = run
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        plain.save(3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plain.save(tmp_path / "no" / "such" / "t.gz")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        plain.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="no file at"):
        cl.Trace.load(tmp_path / "missing.gz")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        cl.Trace.load(tmp_path)

    def write(name, content: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path

    not_trace = "is not a cortexlab trace"
    with pytest.raises(ValueError, match=f"{not_trace}: it is neither gzip nor JSON"):
        cl.Trace.load(write("a.png", b"\x89PNG\r\n"))
    with pytest.raises(ValueError, match=f"{not_trace}: it is empty"):
        cl.Trace.load(write("empty.gz", gzip.compress(b"")))
    with pytest.raises(ValueError, match=f'{not_trace}: its first line lacks "format"'):
        cl.Trace.load(write("other.jsonl", b'{"a": 1}\n'))
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        cl.Trace.load(write("text.gz", gzip.compress(b"hello\n")))

    good = plain.save(tmp_path / "good.gz")
    raw = gzip.decompress(good.read_bytes())
    with pytest.raises(ValueError, match="damaged"):  # the gzip stream cut short
        cl.Trace.load(write("cut.gz", good.read_bytes()[: good.stat().st_size // 2]))
    lines = raw.decode().splitlines()
    with pytest.raises(ValueError, match="truncated or damaged: table 'request_events'"):
        short = lines[: 3 + len(plain.steps) + len(plain.requests)]
        cl.Trace.load(write("short.gz", gzip.compress("\n".join(short).encode())))
    broken = "\n".join([*lines[:2], "[1, 2]", *lines[3:]]).encode()  # a step row, damaged
    with pytest.raises(ValueError, match="is a cortexlab trace but it is damaged"):
        cl.Trace.load(write("broken.gz", gzip.compress(broken)))
    header = json.loads(lines[0]) | {"format_version": TRACE_FORMAT_VERSION + 1}
    newer = "\n".join([json.dumps(header), *lines[1:]]).encode()
    with pytest.raises(ValueError, match=f"format_version {TRACE_FORMAT_VERSION + 1}"):
        cl.Trace.load(write("newer.gz", gzip.compress(newer)))
    # A gunzipped trace reads as well.
    assert_same(plain, cl.Trace.load(write("plain.jsonl", raw)))


def test_empty_traces_round_trip(tmp_path):
    for trace in (cl.Trace(), cl.Trace(tokens=True, blocks=True)):
        loaded = cl.Trace.load(trace.save(tmp_path / "empty.gz"))
        for name in ("steps", "requests", "request_events"):
            pdt.assert_frame_equal(getattr(trace, name), getattr(loaded, name))
        if trace.records_tokens:
            pdt.assert_frame_equal(trace.tokens, loaded.tokens)
            pdt.assert_frame_equal(trace.blocks, loaded.blocks)
        assert "empty" in loaded._repr_html_()


def test_save_refuses_ids_json_cannot_keep(tmp_path):
    trace = cl.Trace(blocks=True)
    data = {"num_blocks": 4, "block_size": 2, "tables": {("a", 1): (0,)}, "num_tokens": {}}
    trace.hooks["kv.blocks"](StepEvent("kv.blocks", 0.0, 0, data))
    with pytest.raises(ValueError, match=r"request id \('a', 1\) is a tuple"):
        trace.save(tmp_path / "t.gz")
    assert not list(tmp_path.iterdir())


def test_html_summary(run, tmp_path):
    _, full, plain, _ = run
    page = full._repr_html_()
    steps, requests = full.steps, full.requests
    assert f"<td style='text-align:left'>{len(steps)}</td>" in page
    assert f"{len(requests)} (1 failed, {len(requests) - 1} finished)" in page
    assert f">{int(requests['num_output_tokens'].sum())}</td>" in page
    assert "req/s" in page and "tokens/s" in page
    for metric in ("ttft", "tpot", "e2e"):
        assert f">{metric}</th>" in page
    assert "<th>p50</th>" in page and "<th>p99</th>" in page
    assert f"tokens ({len(full.tokens)} rows)" in page and "blocks (prefix, 16 x 4" in page
    assert "tokens (" not in plain._repr_html_() and "blocks" not in plain._repr_html_()
    assert "empty" in cl.Trace()._repr_html_()
    # Text from outside (here a file name) is escaped.
    loaded = cl.Trace.load(plain.save(tmp_path / "<b>x&y.gz"))
    page = loaded._repr_html_()
    assert "&lt;b&gt;x&amp;y.gz" in page and "<b>x&y" not in page
    assert "loaded from" in repr(loaded)


def test_docs_cover_every_hook_point_and_data_key(run):
    """docs/hooks.md names every hook point, event field and data key the engine sends."""
    _, _, _, keys = run
    doc = DOC.read_text()
    documented = set(re.findall(r"`([^`\s]+)`", doc))
    missing = [p for p in HOOK_POINTS if p not in documented]
    assert not missing, f"docs/hooks.md lacks hook points {missing}"
    assert set(HOOK_POINTS) <= set(keys), "the run missed a hook point"
    events = (RequestEvent, StepEvent, KVEvent, SamplerEvent)
    fields = {f.name for e in events for f in dataclasses.fields(e)}
    missing = sorted(fields - documented)
    assert not missing, f"docs/hooks.md lacks event fields {missing}"
    for point, names in keys.items():
        missing = sorted(str(k) for k in names if str(k) not in documented)
        assert not missing, f"docs/hooks.md lacks {point} data keys {missing}"
