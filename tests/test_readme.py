"""README.md's Python snippets run as written (in order, in one namespace, in a temp folder)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {}
    try:
        exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    # The snippet ran to its end: every name it binds exists (its own asserts ran too).
    bound = set(re.findall(r"^(\w+)\s*=", SNIPPETS[index], flags=re.M))
    assert bound <= set(namespace), f"snippet {index} did not bind {bound - set(namespace)}"
