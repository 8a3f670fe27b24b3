"""Parity check of an exported graph against PyTorch (same as ``se-export validate``).

    .venv/bin/python tools/validate.py ONNX_DIR [--backend ort|trt] [--tokens N] [--json]
"""

from se_export.cli import main

if __name__ == "__main__":
    import sys

    sys.argv = [sys.argv[0], "validate", *sys.argv[1:]]
    main()
