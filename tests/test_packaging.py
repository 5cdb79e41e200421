"""Packaging: retmask.kernels maps the kernels/ folder, imports only torch and triton, touches no GPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _py(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd="/", timeout=300).stdout


def test_kernels_import_only_torch_and_triton():
    code = (
        "import sys, json; before = set(sys.modules); import retmask.kernels as k; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(json.dumps({'file': k.__file__, 'new': sorted(new)}))"
    )
    info = json.loads(_py(code))
    assert Path(info["file"]).resolve() == ROOT / "kernels" / "__init__.py"
    third_party = {m for m in info["new"] if not m.startswith("_") and m not in sys.stdlib_module_names}
    assert third_party <= {"retmask", "torch", "triton", "numpy", "typing_extensions", "sympy", "mpmath",
                           "filelock", "fsspec", "jinja2", "markupsafe", "networkx", "torchgen"}, third_party
    assert "transformers" not in third_party


def test_no_top_level_kernels_package_and_no_cuda_at_import():
    out = _py(
        "import importlib.util, torch, retmask.kernels; "
        "print(importlib.util.find_spec('kernels') is None or 'retmask' not in str(importlib.util.find_spec('kernels').origin)); "
        "print(torch.cuda.is_initialized())"
    ).split()
    assert out == ["True", "False"]
