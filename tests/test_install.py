"""Reproducible installs: the lock of tested versions, and the README commands CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.]*$")


def _pins() -> dict[str, str]:
    lines = (ROOT / "requirements-lock.txt").read_text().splitlines()
    body = [line for line in lines if line.strip() and not line.startswith("#")]
    bad = [line for line in body if not PIN.match(line)]
    assert not bad, f"not a plain name==version pin: {bad}"
    pins = {n.lower().replace("_", "-"): v for n, v in (line.split("==") for line in body)}
    assert len(pins) == len(body), "a package is pinned twice"
    return pins


def test_the_lock_pins_every_package_plainly_and_torch_to_its_cpu_build() -> None:
    pins = _pins()
    assert pins["torch"] == "2.13.0"  # the 2.13.0+cpu wheel satisfies it; PyPI's pulls CUDA
    cuda = [n for n in pins if n.startswith(("nvidia-", "cuda")) or n in ("triton", "tensorrt")]
    assert not cuda, cuda
    assert "scopecast" not in pins
    for needed in ("numpy", "pyzmq", "pymmcore-plus", "onnxruntime", "scikit-image", "pytest",
                   "onnx", "safetensors"):  # fmt: skip
        assert needed in pins, needed


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def test_the_readme_commands_install_with_the_lock_and_ci_runs_the_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    first, second = _code_blocks(readme)[:2]
    assert first == (
        "python3 -m venv .venv && .venv/bin/pip install -c requirements-lock.txt -e . && "
        ".venv/bin/scopecast demo\n"
    )
    assert second == (
        "python3 -m venv .venv && .venv/bin/pip install -c requirements-lock.txt -e "
        "'.[dev,train]' && .venv/bin/python -m pytest\n"
    )
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci.splitlines(keepends=True), "CI must run the README's test command"
    for text in (readme, ci):
        assert "constraints-cpu.txt" not in text
