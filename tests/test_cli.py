"""The `cortexlab` command: info, generate, compare; bad input is one line and exit 2."""

from __future__ import annotations

import json

import cortexlab as cl
from cortexlab.cli import build_parser, main

import pandas as pd
import pytest


def test_generate_streams_text(capsys):
    assert main(["generate", "--model", "tiny-random", "--max-tokens", "5", "--no-chat", "hi"]) == 0
    out = capsys.readouterr()
    assert "5 generated" in out.err and "finish: length" in out.err


def test_generate_takes_sampling_and_engine_flags(capsys):
    argv = ["generate", "--model", "tiny-random", "--no-chat", "--max-tokens", "6"]
    argv += ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    argv += ["--scheduler", "sjf", "--allocator", "contiguous", "--block-size", "4", "hello"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first, "seeded sampling repeats"


def test_generate_n_prints_every_sample(capsys):
    argv = ["generate", "--model", "tiny-random", "--no-chat", "--max-tokens", "6", "--n", "3"]
    argv += ["--temperature", "1.0", "--seed", "4", "--allocator", "prefix", "hello"]
    assert main(argv) == 0
    out = capsys.readouterr()
    headers = [line for line in out.out.splitlines() if line.startswith("--- sample")]
    assert headers == [
        "--- sample 0 (seed 4)",
        "--- sample 0#1 (seed 5)",
        "--- sample 0#2 (seed 6)",
    ]
    assert "[18 tokens in" in out.err
    assert main([*argv[:-3], "--n", "0", "hello"]) == 2
    assert "n must be an int in [1, 64]" in capsys.readouterr().err


def test_generate_sampling_flags_reach_the_sampler(capsys):
    base = ["generate", "--model", "tiny-random", "--no-chat", "--max-tokens", "12"]
    base += ["--temperature", "1.5", "--top-p", "0.9"]
    outputs = {}
    for name, extra in {
        "plain": [],
        "min_p": ["--min-p", "0.3"],
        "repetition_penalty": ["--repetition-penalty", "1.5"],
        "order": ["--order", "llama.cpp"],
    }.items():
        assert main([*base, *extra, "hello hello hello"]) == 0
        outputs[name] = capsys.readouterr().out
    assert len(set(outputs.values())) == 4, outputs  # each flag changes the text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--model", "tiny-random", "--temperature", "-1", "hi"], "temperature"),
        (["generate", "--model", "tiny-random", "--top-p", "0", "hi"], "top_p"),
        (["generate", "--model", "tiny-random", "--min-p", "2", "hi"], "min_p"),
        (["generate", "--model", "tiny-random", "--repetition-penalty", "0", "hi"], "repetition"),
        (["generate", "--order", "nope", "hi"], "--order must be one of hf, llama.cpp, mlx-lm"),
        (["generate", "--model", "tiny-random", ""], "a PROMPT is empty"),
        (["generate", "--model", "no/such/model", "hi"], "--model: no model at"),
        (["generate", "--model", "tiny-random", "--scheduler", "nope", "hi"], "unknown scheduler"),
        (["generate", "--model", "tiny-random", "--block-size", "0", "hi"], "block_size"),
        (["generate", "--max-tokens", "many", "hi"], "invalid int value"),
        (["generate"], "the following arguments are required: PROMPT"),
        (["compare", "--schedulers", "fcfs,nope"], "unknown scheduler 'nope'"),
        (["compare", "--rate", "0"], "--rate must be > 0"),
        (["compare", "--loads", "1,-2"], "--loads must be positive"),
        (["compare", "--tenants", "a:x"], "--tenants"),
        (["frobnicate"], "invalid choice"),
        (["calibrate", "--model", "tiny-random"], "no calibration ships for 'tiny-random'"),
        (["calibrate", "--model", "no/such/model"], "--model: no model at"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cortexlab {cl.__version__}"


def test_every_flag_has_help_with_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("generate", "compare", "calibrate"):
        for action in subparsers[name]._actions:
            if action.dest in ("help", "prompts") or not action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            if action.default is not None and action.dest != "chat":
                assert "default" in action.help, f"{name} {action.option_strings}"


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "blas" in out and "fp32_matmul_gflops" in out


def test_compare_writes_results(tmp_path, capsys):
    argv = ["compare", "--model", "tiny-random", "--out", str(tmp_path), "--name", "t"]
    argv += ["--schedulers", "fcfs,sjf", "--num-requests", "6", "--loads", "1,2", "--rate", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fcfs" in out and "sjf" in out and "report:" in out
    folder = tmp_path / "t"
    summary = pd.read_csv(folder / "summary.csv", index_col=0)
    assert list(summary.index) == ["fcfs", "sjf"] and (summary.num_finished == 6).all()
    loads = pd.read_csv(folder / "load.csv")
    assert sorted(set(loads.rate)) == [2.0, 4.0] and len(loads) == 4
    for policy in ("fcfs", "sjf"):
        requests = pd.read_csv(folder / "traces" / policy / "requests.csv")
        assert len(requests) == 6
    figures = sorted(p.name for p in (folder / "figures").iterdir())
    assert figures == [
        "batch_composition_per_policy.png",
        "goodput_vs_load.png",
        "latency_cdfs_per_policy.png",
        "request_gantt_per_policy.png",
    ]
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "http" not in html
    assert json.loads((folder / "options.json").read_text())["schedulers"] == ["fcfs", "sjf"]
    # A second run reads the other loads from the cache.
    assert any((tmp_path / ".cache").iterdir())


def test_calibrate_writes_a_cost_model(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    assert main(["calibrate", "--model", "tiny-random", "--output", str(out)]) == 0
    cm = cl.sim.CostModel.load(out, cl.load_model("tiny-random"))
    assert cm.info["method"] == "engine"
    captured = capsys.readouterr()
    assert "step_s" in captured.out and f"wrote {out}" in captured.err
