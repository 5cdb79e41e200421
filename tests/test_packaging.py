"""Packaging: retmask.kernels is the folder kernels/retmask_kernels, imports only torch and triton, touches no
GPU, and never hides Hugging Face's `kernels` package, even for a process started in the checkout root."""

import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kernels" / "retmask_kernels"


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
    assert Path(info["file"]).resolve() == PACKAGE / "__init__.py"
    assert set(info["new"]) <= {"retmask"} | set(sys.stdlib_module_names), info["new"]


def test_no_top_level_kernels_package_and_no_cuda_at_import():
    out = _py(
        "import importlib.util, torch, retmask.kernels; "
        "print(importlib.util.find_spec('kernels') is None "
        "or 'retmask' not in str(importlib.util.find_spec('kernels').origin)); "
        "print(torch.cuda.is_initialized())"
    ).split()
    assert out == ["True", "False"]


def test_kernels_folder_is_not_a_package():
    """The rule that keeps the root safe: kernels/ itself has no __init__ (a folder without one ranks below
    any regular package of the same name on sys.path)."""
    assert not any((ROOT / "kernels").glob("__init__.*"))
    assert (PACKAGE / "__init__.py").is_file()


@pytest.fixture(scope="module")
def hf_kernels(tmp_path_factory) -> dict:
    """An environment in which Hugging Face's `kernels` is importable: the installed one, or else a stand-in
    with the names transformers imports from it, on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", "import kernels, sys; sys.stdout.write(kernels.__file__)"],
                           capture_output=True, text=True, cwd="/", env=env)
    if found.returncode == 0:
        return {"env": env, "file": found.stdout}
    stand_in = tmp_path_factory.mktemp("hf") / "kernels"
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("class CUDAProperties:\n    pass\n")
    return {"env": {**env, "PYTHONPATH": str(stand_in.parent)}, "file": str(stand_in / "__init__.py")}


def _from_root(args, env, **kw):
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, **kw)
    assert done.returncode == 0, f"{args} in {ROOT}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_checkout_root_imports_hf_kernels_and_retmask_kernels(hf_kernels):
    """`python -c` from the root: transformers loads, `kernels` is Hugging Face's, `retmask.kernels` ours."""
    out = _from_root([sys.executable, "-c", "import json, transformers, kernels, retmask.kernels as k; "
                      "print(json.dumps([kernels.__file__, k.__file__, k.masked_attention.__module__]))"],
                     hf_kernels["env"])
    theirs, ours, module = json.loads(out)
    assert Path(theirs).resolve() == Path(hf_kernels["file"]).resolve()
    assert ROOT / "kernels" not in Path(theirs).resolve().parents
    assert Path(ours).resolve() == PACKAGE / "__init__.py" and module == "retmask.kernels"


def test_checkout_root_runs_the_cli_pytest_and_an_interactive_import(hf_kernels):
    env = hf_kernels["env"]
    assert "detect" in _from_root([sys.executable, "-m", "retmask.cli", "--help"], env)
    # pytest collects a module that imports transformers (this is where a shadowing folder broke)
    out = _from_root([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                      "tests/test_engine.py"], env)
    assert "tests collected" in out and "error" not in out.splitlines()[-1]
    # Jupyter and a REPL put '' (the current folder) first on sys.path, as `python -` does
    out = _from_root([sys.executable, "-"], env, input="import retmask, transformers, kernels, sys\n"
                     "print(sys.path[0] == '', kernels.__file__)\n")
    flag, theirs = out.split()
    assert flag == "True" and Path(theirs).resolve() == Path(hf_kernels["file"]).resolve()


@pytest.mark.parametrize("isolation", [True, False], ids=["build-isolation", "no-build-isolation"])
def test_checkout_root_pip_install_editable(hf_kernels, tmp_path, isolation):
    """`pip install -e .` from the root, into a scratch venv that sees this one's packages (setuptools' build
    loads the entry points of installed distributions, Hugging Face's `kernels` among them)."""
    venv.create(tmp_path / "v", with_pip=False)
    py = str(tmp_path / "v" / "bin" / "python")
    own = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True,
                         check=True).stdout.strip()
    Path(own, "parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # this venv's packages, after its own
    args = [py, "-m", "pip", "install", "-q", "--no-deps", "-e", "."] + ([] if isolation else ["--no-build-isolation"])
    lock = ROOT / "constraints.txt"
    env = {**hf_kernels["env"], "PIP_CONSTRAINT": str(lock)} if isolation else hf_kernels["env"]
    _from_root(args, env)
    out = _from_root([py, "-c", "import sys, kernels, retmask.kernels as k; print(sys.prefix, k.__file__)"], env)
    prefix, ours = out.split()
    assert Path(prefix).resolve() == (tmp_path / "v").resolve() and Path(ours).resolve() == PACKAGE / "__init__.py"
