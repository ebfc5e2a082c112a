"""
Execute colab_tpu.ipynb headlessly, top to bottom, the way CI's XLA lane does: on XLA's CPU
backend (PJRT_DEVICE=CPU), with QUICK=1 (tiny sizes) and the clone cell pointed at this checkout.

    .venv-xla/bin/python tests/xla/run_notebook.py [--keep DIR]   # needs nbclient + ipykernel

The notebook runs in a fresh temporary folder, as in Colab's /content; it clones this checkout's
committed HEAD (uncommitted changes are not in the clone). Any cell that raises, including a shell
command that fails (the notebook's sh() raises on a non-zero exit), fails this script, which
prints that cell's source and output. Exit status 0 = every cell ran.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "colab_tpu.ipynb")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="run in this (new) folder and keep it, with the executed notebook")
    args = parser.parse_args()
    if subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                      capture_output=True, text=True).stdout.strip():
        print("notebook: note: uncommitted changes here are not in the notebook's clone of HEAD")
    work = args.keep or tempfile.mkdtemp(prefix="colab-notebook-")
    os.makedirs(work, exist_ok=True)
    # the kernel inherits this environment: the notebook reads QUICK and REPO_URL, and its
    # "python ..." shell commands must find this venv's python first
    os.environ.update(QUICK="1", REPO_URL=ROOT, PJRT_DEVICE="CPU",
                      PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": work}})
    start = time.time()
    try:
        client.execute()
        failed = None
    except CellExecutionError as e:
        failed = e
    finally:
        nbformat.write(notebook, os.path.join(work, "colab_tpu.executed.ipynb"))
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    ran = sum(1 for c in cells if c.get("execution_count"))
    if failed:
        print(f"notebook: FAILED after {time.time() - start:.0f} s, at code cell {ran} of {len(cells)}:\n{failed}")
        print(f"notebook: the executed notebook is {os.path.join(work, 'colab_tpu.executed.ipynb')}")
        sys.exit(1)
    images = sum(1 for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    print(f"notebook: all {len(cells)} code cells ran in {time.time() - start:.0f} s ({images} images) in {work}")
    if images < 2:   # the loss curve and compare.py's plot
        print("notebook: FAILED: expected the loss curve and compare.py's plot among the outputs")
        sys.exit(1)


if __name__ == "__main__":
    main()
