"""What the tests that run the scripts share: a subprocess runner and a small offline corpus."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd=ROOT, env=None, check=True):
    """python args... in the repo (one thread); fails the test with the output unless it exits 0."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The offline default corpus (this Python's standard library), capped to stay fast."""
    d = tmp_path_factory.mktemp("data")
    run(["prepare_data.py", f"--data_dir={d}", "--max_tokens=400000"])
    return d
