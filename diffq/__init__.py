"""diffq: quantize diffusion models to low bit-widths, evaluate them, export them."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_quantized", "export_quantized"]


def __getattr__(name: str):
    if name in ("load_quantized", "export_quantized"):
        from diffq import export

        return getattr(export, name)
    raise AttributeError(name)
