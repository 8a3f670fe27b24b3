"""Installs like a user: build the wheel from this checkout (scikit-build-core, build isolation),
install it into a fresh virtualenv outside the checkout, and from a temporary folder expand a
tiny model, export it with the custom op, validate it in ONNX Runtime and load it through
transformers' AutoModelForCausalLM. Every library the commands use must come from the installed
package (``se-export doctor`` says where each came from), none from the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def user_env(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(the virtualenv's bin folder, a work folder outside the checkout, the environment)."""
    root = tmp_path_factory.mktemp("install")
    assert REPO not in root.parents, "the install test must run outside the checkout"
    env = {k: v for k, v in os.environ.items() if k not in ("SE_EXPORT_LIB_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    # one CUDA architecture where nvcc is present: the wheel's CUDA libraries are built, quickly
    _run([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "-q", "-w", root / "wheels",
          "-C", "cmake.define.SE_CUDA_ARCHITECTURES=90"], root, env)
    wheel = next((root / "wheels").glob("se_export-*.whl"))
    _run([sys.executable, "-m", "venv", root / "venv"], root, env)
    bin_dir = root / "venv" / "bin"
    # the tested torch (a CPU build) first, as the README's install section says, then the wheel
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "torch==2.13.0"], root, env)
    _run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], root, env)
    work = root / "work"
    work.mkdir()
    return bin_dir, work, env


def test_the_installed_wheel_runs_expand_onnx_validate_and_from_pretrained(user_env, tiny_llama_dir, calib_file):
    bin_dir, work, env = user_env
    found = _run([bin_dir / "python", "-c", "import se_export; print(se_export.__file__)"], work, env).stdout
    assert str(bin_dir.parent) in found, f"se_export imported from {found}, not the virtualenv"

    _run([bin_dir / "se-export", "doctor", "--json", work / "doctor.json"], work, env)
    doctor = json.loads((work / "doctor.json").read_text())
    for lib in ("libse_kernels.so", "libse_ort_ops.so"):
        assert doctor["library_origins"][lib] == "package", doctor["libraries"]
        assert str(bin_dir.parent) in doctor["libraries"][lib]
    assert doctor["cpu_kernels"]["isa"] is not None and doctor["cpu_kernels"]["used_by_pytorch"]

    _run([bin_dir / "se-export", "expand", tiny_llama_dir, "--out", "ckpt", "--experts", "2", "--calib", calib_file,
          "--calib-samples", "8", "--seqlen", "32", "--min-cluster-tokens", "8", "--quiet"], work, env)
    _run([bin_dir / "se-export", "onnx", "ckpt", "--out", "onnx"], work, env)
    manifest = json.loads((work / "onnx" / "se_onnx.json").read_text())
    assert manifest["custom_op_nodes"] > 0, "the export runs our op, whose library the package carries"
    report = json.loads(_run([bin_dir / "python", "-m", "se_export", "validate", "onnx", "--tokens", "4",
                              "--ppl-windows", "0", "--json"], work, env).stdout)
    assert report["passed"], report

    check = ("import torch, se_export\n"
             "from transformers import AutoModelForCausalLM\n"
             "auto = AutoModelForCausalLM.from_pretrained('ckpt', trust_remote_code=True)\n"
             "x = torch.randint(0, auto.config.vocab_size, (2, 16))\n"
             "print(torch.equal(auto(x).logits, se_export.load('ckpt')(x).logits))\n")
    assert _run([bin_dir / "python", "-c", check], work, env).stdout.strip().endswith("True")
