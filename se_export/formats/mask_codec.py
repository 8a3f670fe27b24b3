"""Checkpoint storage of expert masks: one deflate-coded bitmap per linear, indices rebuilt at load.

In memory (and in ONNX) experts keep the index format their kernel runs fastest (a raw bitmap, or
16-bit columns for experts at most 20% dense) plus ``row_ptr``, so every backend finds a row at
once. On disk none of that is needed as is: both formats describe the same mask, a 30%-dense
mask carries 0.88 bits of information per bit (its entropy; 10%-dense: 0.47), which deflate's
Huffman stage gets close to, and ``row_ptr`` is the running sum of the mask's row popcounts. So
the checkpoint stores the mask as a coded bitmap whatever the format, and load rebuilds the
module's format from it: K=16 at 70% goes from 1.21x to 1.18x of ``K (1 - s)`` dense bytes, and a
csr16 expert stops paying 16 bits per kept weight on disk (BENCHMARKS.md, "Stored bytes"). zlib's
checksum catches a damaged stream; the decoded size and population are checked against the
manifest and the values. int4 codes are stored two per byte (``quantization.pack_int4``).
"""

from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import SEError
from .quantization import pack_int4, unpack_int4
from .sparse_format import (
    FORMATS,
    PackedExperts,
    bitmap_row_counts,
    bitmap_to_mask,
    csr16_columns,
    row_ptr_from_counts,
)

CODEC = "deflate"
INT4 = "int4"  # storage of int4 codes: two per byte
_LEVEL = 6  # level 9 codes real masks no smaller; 1 is ~0.7% larger


def row_ptr_from_bitmap(bitmap: torch.Tensor) -> torch.Tensor:
    """int32 offsets of every row's first value: the exclusive running sum of row popcounts."""
    return row_ptr_from_counts(bitmap_row_counts(bitmap))


def _bitmap_of(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """The module's mask as a ``[K, out, ceil(in/8)]`` bitmap, from either index format."""
    return PackedExperts(meta["format"], int(meta["experts"]), int(meta["out"]), int(meta["in"]),
                         tensors[f"{name}.values"], tensors[f"{name}.indices"], tensors[f"{name}.row_ptr"]).bitmap()


def _coded(bitmap: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(zlib.compress(bitmap.contiguous().numpy(), _LEVEL), dtype=np.uint8).copy())


def encode_masks(tensors: dict[str, torch.Tensor], modules: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """Replace each module's ``indices`` and ``row_ptr`` by the deflate stream of its bitmap.

    Returns the tensors to store and the manifest's ``storage`` entry (one per coded module)."""
    names = [name for name, meta in modules.items() if meta.get("format") in FORMATS]
    stored = dict(tensors)
    with ThreadPoolExecutor() as pool:  # zlib releases the GIL
        coded = list(pool.map(lambda n: _coded(_bitmap_of(n, tensors, modules[n])), names))
    storage = {}
    for name, stream in zip(names, coded, strict=True):
        del stored[f"{name}.indices"], stored[f"{name}.row_ptr"]
        stored[f"{name}.mask.{CODEC}"] = stream
        storage[name] = {"mask": CODEC}
        if modules[name].get("value_dtype") == INT4:
            stored[f"{name}.values.{INT4}"] = pack_int4(stored.pop(f"{name}.values"))
            storage[name]["values"] = INT4
    return stored, storage


def _decoded(name: str, meta: dict, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices in the module's format, row_ptr) from its coded bitmap."""
    inn = int(meta["in"])
    shape = (int(meta["experts"]), int(meta["out"]), math.ceil(inn / 8))
    try:
        raw = zlib.decompress(stream.contiguous().numpy())
    except zlib.error as exc:
        raise SEError(f"corrupt checkpoint: the mask of {name} cannot be decoded ({exc}); re-run se-export expand") from None
    if len(raw) != math.prod(shape):
        raise SEError(f"corrupt checkpoint: the mask of {name} decodes to {len(raw)} bytes, expected "
                      f"{math.prod(shape)}; re-run se-export expand")
    bitmap = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(shape)
    indices = bitmap if meta["format"] == "bitmap" else torch.cat(  # one expert's bool mask at a time
        [csr16_columns(bitmap_to_mask(expert, inn)) for expert in bitmap])
    return indices, row_ptr_from_bitmap(bitmap)


def decode_masks(tensors: dict[str, torch.Tensor], modules: dict[str, dict], storage: dict) -> dict[str, torch.Tensor]:
    """Inverse of ``encode_masks``: indices and row pointers back under their usual names."""
    for name, how in storage.items():
        if how not in ({"mask": CODEC}, {"mask": CODEC, "values": INT4}) or modules.get(name, {}).get("format") not in FORMATS:
            raise SEError(f"checkpoint stores {name} as {how}, which this se-export cannot read; upgrade se-export")
    names = list(storage)
    try:
        streams = [tensors.pop(f"{n}.mask.{CODEC}") for n in names]
    except KeyError as exc:
        raise SEError(f"corrupt checkpoint: tensor {exc} is missing; re-run se-export expand") from None
    with ThreadPoolExecutor() as pool:
        decoded = list(pool.map(lambda a: _decoded(*a), [(n, modules[n], s) for n, s in zip(names, streams, strict=True)]))
    for name, (indices, row_ptr) in zip(names, decoded, strict=True):
        tensors[f"{name}.indices"], tensors[f"{name}.row_ptr"] = indices, row_ptr
        if storage[name].get("values") == INT4:
            try:
                tensors[f"{name}.values"] = unpack_int4(tensors.pop(f"{name}.values.{INT4}"), int(modules[name]["nnz"]))
            except KeyError as exc:
                raise SEError(f"corrupt checkpoint: tensor {exc} is missing; re-run se-export expand") from None
    return tensors


def stored_expert_bytes(stored: dict[str, torch.Tensor], modules: dict[str, dict]) -> int:
    """Bytes the checkpoint file spends on experts (values, coded masks, anything stored raw)."""
    suffixes = ("values", f"values.{INT4}", "scales", "indices", f"mask.{CODEC}", "row_ptr")
    keys = [f"{m}.{s}" for m in modules for s in suffixes]
    return sum(stored[k].numel() * stored[k].element_size() for k in keys if k in stored)
