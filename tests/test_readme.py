"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# A ```python block right after an HTML comment that says "not run" is skipped.
BLOCKS = [
    block
    for comment, block in re.findall(
        r"(<!--[^>]*-->\n)?```python\n(.*?)```", README.read_text(), flags=re.S
    )
    if "not run" not in comment
]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
