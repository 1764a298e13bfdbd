"""Every benchmark script imports and parses its flags: a script broken by a refactor fails here, not in
``make bench`` (the measurements themselves are not tests)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "common")


@pytest.mark.timeout(300)
def test_every_benchmark_imports_and_prints_its_help():
    assert {"guidance_cost", "sd_cost", "edm2_cost"} <= set(SCRIPTS)
    code = ("import contextlib, importlib, io, sys\n"
            f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
            f"for name in {SCRIPTS!r}:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "        importlib.import_module(name).main(['--help'])\n"
            "    assert 'usage' in out.getvalue(), name\n"
            "    print('ok', name)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [word for name in SCRIPTS for word in ("ok", name)]
