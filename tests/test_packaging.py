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
    """After torch and triton are imported, retmask.kernels brings in nothing but itself."""
    code = (
        "import sys, json, torch, triton; before = set(sys.modules); import retmask.kernels as k; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(json.dumps({'file': k.__file__, 'new': sorted(new)}))"
    )
    info = json.loads(_py(code))
    assert Path(info["file"]).resolve() == ROOT / "kernels" / "__init__.py"
    assert set(info["new"]) <= {"retmask"} | set(sys.stdlib_module_names), info["new"]


def test_no_top_level_kernels_package_and_no_cuda_at_import():
    out = _py(
        "import importlib.util, torch, retmask.kernels; "
        "print(importlib.util.find_spec('kernels') is None or 'retmask' not in str(importlib.util.find_spec('kernels').origin)); "
        "print(torch.cuda.is_initialized())"
    ).split()
    assert out == ["True", "False"]
