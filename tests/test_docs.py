"""The guides' examples run and say what they produce; the engine page lists every parameter.

A fenced ```python block in ``docs/*.md`` preceded by the line ``<!-- test -->`` is an
example this file runs. The tested blocks of one page run in order in one namespace, like
a notebook's cells, with ``cl.load_model()`` loading ``tiny-random`` instead of the
embedded SmolLM2 (and ``model`` bound to it beforehand), so a page must not promise what
only SmolLM2 produces. A top-level expression followed by a comment holding a Python
literal, ``x.tolist()  # [1, 2]``, is checked: the test asserts that it equals the
literal. Plain ``assert`` lines check the rest. Whatever a page registers (schedulers,
allocators, sampling stages) is unregistered afterwards.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import cortexlab as cl

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
MARKER = "<!-- test -->"
EMBEDDED = "cl.load_model()"
TINY = 'cl.load_model("tiny-random")'
CHECK = "__check_equal__"
# Pages whose examples must exist and be tested (a lost marker would silently test nothing).
GUIDES = ("engine.md", "schedulers.md", "kv.md", "sampling.md", "sim.md")


def example_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block that follows a `<!-- test -->` line."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == MARKER:
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j == len(lines) or lines[j].strip() != "```python":
                raise AssertionError(f"{page.name}:{i + 1}: {MARKER} not followed by ```python")
            end = lines.index("```", j + 1)
            blocks.append((j + 2, "\n".join(lines[j + 1 : end])))
            i = end
        i += 1
    return blocks


def with_checked_comments(code: str) -> str:
    """`code` with each top-level `expr  # literal` line turned into an equality assert."""
    lines = code.splitlines()
    for node in reversed(ast.parse(code).body):
        if not isinstance(node, ast.Expr) or node.lineno != node.end_lineno:
            continue
        line = lines[node.lineno - 1].encode()  # ast's column offsets count UTF-8 bytes
        comment = line[node.end_col_offset :].decode().strip()
        if not comment.startswith("#"):
            continue
        try:
            expected = ast.literal_eval(comment[1:].strip())
        except (ValueError, SyntaxError):
            continue  # a prose comment
        indent = line[: node.col_offset].decode()
        expr = line[node.col_offset : node.end_col_offset].decode()
        lines[node.lineno - 1] = f"{indent}{CHECK}(({expr}), {expected!r}, {expr!r})"
    return "\n".join(lines)


def check_equal(value, expected, expr: str) -> None:
    """What a checked comment runs: `expr` evaluated to `value` must equal the comment."""
    assert value == expected, f"{expr} is {value!r}; the page says {expected!r}"


def registries():
    """Every registry a page may add to (restored after it runs)."""
    return [cl.schedulers.schedulers, cl.kv.allocators, cl.sampling.stages]


def pages_with_examples() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if example_blocks(p))


def test_every_guide_has_tested_examples():
    for name in GUIDES:
        assert example_blocks(DOCS / name), f"docs/{name} has no {MARKER} example"


def test_checked_comments():
    code = with_checked_comments("x = ['µ']\n(x, 'µ')  # (['µ'], 'µ')\nx  # a prose\nlen(x)  # 2")
    assert code.splitlines()[1] == f"{CHECK}(((x, 'µ')), (['µ'], 'µ'), \"(x, 'µ')\")"
    assert code.splitlines()[2] == "x  # a prose"
    with pytest.raises(AssertionError, match="len\\(x\\) is 1; the page says 2"):
        exec(compile(code, "<check>", "exec"), {CHECK: check_equal})


@pytest.mark.parametrize("page", pages_with_examples(), ids=lambda p: p.name)
def test_page_examples_run(page, tiny):
    namespace = {"__name__": f"docs.{page.stem}", "cl": cl, "model": tiny, CHECK: check_equal}
    saved = [dict(r._factories) for r in registries()]
    try:
        for lineno, code in example_blocks(page):
            code = with_checked_comments(code.replace(EMBEDDED, TINY))
            # Pad so that a traceback's line numbers are the page's.
            exec(compile("\n" * (lineno - 1) + code, str(page), "exec"), namespace)
    finally:
        for registry, factories in zip(registries(), saved, strict=True):
            registry._factories.clear()
            registry._factories.update(factories)


# -- docs/engine.md lists every parameter, with its real default --------------------------


def table_rows(section: str) -> dict[str, list[str]]:
    """First-column names (in backticks) of every table row in a `## section` of engine.md."""
    text = (DOCS / "engine.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def documented_default(cell: str):
    code = re.match(r"`([^`]*)`", cell)
    return eval(code.group(1), {"__builtins__": {}}) if code else inspect.Parameter.empty


def test_engine_page_lists_every_argument_with_its_default():
    signature = inspect.signature(cl.Engine.__init__)
    expected = {name: p.default for name, p in signature.parameters.items() if name != "self"}
    rows = table_rows("Engine")
    assert list(rows) == list(expected)
    for name, default in expected.items():
        assert documented_default(rows[name][0]) == default, name
        assert f"\n        {name}: " in cl.Engine.__doc__, f"Engine docstring lacks {name}"


def test_engine_page_lists_every_sampling_field_with_its_default():
    fields = dataclasses.fields(cl.SamplingParams)
    expected = {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in fields
    }
    rows = table_rows("SamplingParams")
    assert sorted(rows) == sorted(expected)
    for name, default in expected.items():
        assert documented_default(rows[name][0]) == default, name
        assert f"\n        {name}: " in cl.SamplingParams.__doc__, f"docstring lacks {name}"
