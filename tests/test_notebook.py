"""
colab_tpu.ipynb, checked without running it (CI's XLA lane executes it: tests/xla/run_notebook.py):
it is a valid notebook, committed without outputs, every code cell is Python, and the model it
compares is one train.py knows.
"""

import ast
import json
import re
from pathlib import Path

import gpt

NOTEBOOK = Path(__file__).resolve().parent.parent / "colab_tpu.ipynb"


def code_cells():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_code_cells_are_python_and_have_no_outputs():
    cells = code_cells()
    assert len(cells) >= 6
    for cell in cells:
        source = "".join(cell["source"])
        ast.parse(source)  # plain Python: shell commands go through sh(), which fails loudly
        assert not re.search(r"^\s*[!%]", source, re.M), "IPython magics and ! commands do not fail a cell"
        assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook cleared"


def test_notebook_trains_on_xla_and_compares_a_registered_model():
    source = "\n".join("".join(cell["source"]) for cell in code_cells())
    model = re.search(r'^MODEL = "(\w+)"', source, re.M).group(1)
    assert model in gpt.all_models() and model != "gpt"
    assert "--device=xla" in source and "compare.py" in source and "sample.py" in source
