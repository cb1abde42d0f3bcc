"""Build the HTML docs (`make docs`): the API reference from the docstrings, with pdoc, and
every guide in docs/*.md as a page beside it, under the module name `guides`.

Each guide becomes a stub module whose docstring is the page (Markdown, links to other
guides pointed at their HTML pages), so pdoc renders, indexes and searches it like the
API. Exits non-zero when pdoc fails or warns (an import error, a docstring it cannot
convert), except for the known warnings listed in KNOWN_WARNINGS.

    python docs/build.py [OUTPUT_DIR]     # default: build/docs
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pdoc
import pdoc.render

ROOT = Path(__file__).resolve().parent.parent
GUIDES = ROOT / "docs"
# pdoc cannot resolve the postponed annotations of the __new__ that typing.NamedTuple
# generates (it is compiled outside the module); the fields themselves are documented.
KNOWN_WARNINGS = (r"Error parsing type annotation .* for cortexlab\.workloads\.\w+\.__init__",)
# The package, plus modules its __all__ leaves out that user code still needs (hook events).
MODULES = ("cortexlab", "cortexlab.hooks")
LINK = re.compile(r"\]\((\w+)\.md(#[\w-]+)?\)")


def guide_modules(package: Path) -> list[str]:
    """Write the `guides` stub package into `package`; returns notes on broken links."""
    pages = sorted(GUIDES.glob("*.md"))
    names = {p.stem for p in pages}
    notes = []

    def relink(page: Path, text: str) -> str:
        def html(m: re.Match) -> str:
            if m.group(1) not in names:
                notes.append(f"docs/{page.name} links to {m.group(1)}.md, which does not exist")
                return m.group(0)
            return f"]({m.group(1)}.html{m.group(2) or ''})"

        return LINK.sub(html, text)

    package.mkdir()
    index = ["Guides to the contracts and parameters (`docs/*.md` in the repository).", ""]
    for page in pages:
        text = relink(page, page.read_text())
        title = next((line[2:] for line in text.splitlines() if line.startswith("# ")), page.stem)
        index.append(f"- [{title}](guides/{page.stem}.html)")
        (package / f"{page.stem}.py").write_text(
            f'__docformat__ = "markdown"\n__doc__ = {text!r}\n'
        )
    doc = "\n".join(index)
    (package / "__init__.py").write_text(f'__docformat__ = "markdown"\n__doc__ = {doc!r}\n')
    return notes


def main(output: Path) -> int:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        notes = guide_modules(Path(tmp) / "guides")
        pdoc.render.configure(docformat="google", footer_text="cortexlab")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pdoc.pdoc(*MODULES, Path(tmp) / "guides", output_directory=output)
    failures = []
    for w in caught:
        message = str(w.message)
        if not any(re.search(known, message) for known in KNOWN_WARNINGS):
            failures.append(f"{w.category.__name__}: {message} ({w.filename}:{w.lineno})")
    for note in notes:
        print(f"docs: note: {note}", file=sys.stderr)
    for failure in failures:
        print(f"docs: {failure}", file=sys.stderr)
    if failures:
        print(f"docs: {len(failures)} warning(s) from pdoc: failing", file=sys.stderr)
        return 1
    print(f"docs: {output}/index.html in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build" / "docs")))
