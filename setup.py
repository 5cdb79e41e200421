from setuptools import setup

setup(
    name="retmask",
    version="0.1.0",
    description="Masked-head attention engine and the RetMask retrieval-head DPO pipeline",
    python_requires=">=3.10",
    packages=["retmask", "retmask.kernels"],
    # kernels/ is a plain folder (no __init__.py) holding the package retmask_kernels, installed as
    # retmask.kernels. Python ranks a folder without __init__.py below any regular package of the
    # same name, so a process started in the checkout root (where `python -c`, `python -m` and
    # notebooks put the root first on sys.path) still imports Hugging Face's `kernels` package.
    package_dir={"retmask": "retmask", "retmask.kernels": "kernels/retmask_kernels"},
    package_data={"retmask": ["assets/toy/*", "assets/*.jsonl", "configs/*"]},
    install_requires=["torch>=2.11", "triton>=3.6; platform_system=='Linux'", "numpy", "tabulate", "transformers>=5.17",
                      "tqdm", "rouge-score", "matplotlib", "safetensors", "datasets"],
    extras_require={"test": ["pytest>=8", "ruff>=0.17"], "plot": ["matplotlib"],
                    "train": ["trl>=1.16", "accelerate", "peft"], "zero3": ["deepspeed"]},
    entry_points={"console_scripts": ["retmask=retmask.cli:main"]},
)
