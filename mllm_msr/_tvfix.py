"""Make PyPI's torchvision importable beside the CPU build of torch.

The torchvision wheel that matches torch 2.13 on PyPI is a CUDA build whose compiled ops do not
load against ``torch==2.13.0+cpu``; its Python side then fails on import with
``operator torchvision::nms does not exist``. Image processors of transformers (Qwen2-VL) need
torchvision importable. Registering the two missing operator schemas, with a small pure-torch
NMS, before torchvision's first import fixes it; the transforms work unchanged.

The install step (``scripts/install.sh``) adds a ``.pth`` file to the venv that calls
:func:`install_import_hook`, so every Python process of the venv (Ray workers, vLLM) gets the fix
without importing torch at start-up: the registration runs only when torchvision is imported.
"""

from __future__ import annotations

import importlib.abc
import sys

_DONE = False


def _nms(boxes, scores, iou_threshold: float):
    import torch

    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        if order.numel() == 1:
            break
        rest = order[1:]
        xx1 = torch.maximum(x1[rest], x1[i])
        yy1 = torch.maximum(y1[rest], y1[i])
        xx2 = torch.minimum(x2[rest], x2[i])
        yy2 = torch.minimum(y2[rest], y2[i])
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return torch.stack(keep).to(torch.int64)


def register_missing_ops() -> None:
    """Define ``torchvision::nms`` / ``torchvision::qnms`` when torchvision's C++ ops are absent."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - raises when missing
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - keep alive
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms, "CPU")
    lib.impl("nms", _nms, "CompositeExplicitAutograd")
    _LIBS.append(lib)


_LIBS: list = []


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: D401
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            try:
                register_missing_ops()
            except Exception:  # never break an import because of the fix itself
                pass
        return None


def install_import_hook() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
