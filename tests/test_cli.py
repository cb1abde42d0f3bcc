"""The `cortexlab` command."""

from __future__ import annotations

from cortexlab.cli import main


def test_generate_streams_text(capsys):
    assert main(["generate", "--model", "tiny-random", "--max-tokens", "5", "--no-chat", "hi"]) == 0
    out = capsys.readouterr()
    assert "5 generated" in out.err and "finish: length" in out.err


def test_generate_rejects_bad_params(capsys):
    assert main(["generate", "--model", "tiny-random", "--temperature", "-1", "hi"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "blas" in out and "fp32_matmul_gflops" in out
