"""The README's Python snippet runs as written."""

import re
from pathlib import Path

import torch


def test_readme_snippet_trains_and_samples(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    samples = namespace["samples"]
    assert samples.shape == (512, 2)
    assert torch.isfinite(samples).all()
    assert "torch.Size([512, 2])" in capsys.readouterr().out
