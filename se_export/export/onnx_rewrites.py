"""Graph rewrites applied to every export so ONNX Runtime's own fusions recognise what the
exporter decomposed, without leaving the standard opset (TensorRT parses the same graph).

``torch.rsqrt`` exports as ``Reciprocal(Sqrt(v))`` and RMSNorm as ``x * Reciprocal(Sqrt(...))``;
ONNX Runtime fuses ``x / Sqrt(mean(x^2) + eps) * w`` into one ``SimplifiedLayerNormalization`` but
not the reciprocal form, so a decode step ran six nodes per norm instead of one. The rewrite is
exact up to one rounding (``x / s`` instead of ``x * (1 / s)``).
"""

from __future__ import annotations

from typing import TypeVar

ModelT = TypeVar("ModelT")


def _times_rsqrt(op, x, v):
    return op.Mul(x, op.Reciprocal(op.Sqrt(v)))


def _divide_by_sqrt(op, x, v):
    return op.Div(x, op.Sqrt(v))


def rewrite_rules():
    """The rule set (``Mul`` matched in both argument orders); the reciprocal must have no other use."""
    from onnxscript.rewriter import pattern

    return pattern.RewriteRuleSet([pattern.RewriteRule(_times_rsqrt, _divide_by_sqrt, name="MulRsqrtToDiv")],
                                  commute=True)


def simplify_for_runtimes(model: ModelT) -> ModelT:
    """``model`` (``onnx.ModelProto`` or ``onnx_ir.Model``) with the rewrites applied."""
    from onnxscript import rewriter

    return rewriter.rewrite(model, pattern_rewrite_rules=rewrite_rules())
