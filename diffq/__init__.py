"""diffq: quantize diffusion models to low bit-widths, evaluate them, export them.

The Python API (:mod:`diffq.api`)::

    import diffq
    diffq.presets()                                        # {name: one line}
    pipe = diffq.quantize(pipe, "w4a8", calib=prompts)     # in place; pipe.diffq_report
    diffq.save_pipeline(pipe, "out/w4a8")                  # its pair: diffq.load_pipeline
    pipe = diffq.load_pipeline("out/w4a8")                 # a runnable diffusers pipeline
    diffq.evaluate(pipe, fp_pipe, prompts, metrics=["psnr", "ssim"])
    report = diffq.deploy(pipe, backend="torchao")         # real low-bit kernels; report.table()
    diffq.save_deployed(pipe, "out/w8a8-torchao")          # plain diffusers + torchao loads it
"""
from __future__ import annotations

__version__ = "0.1.0"

_API = ("quantize", "save_pipeline", "load_pipeline", "save_quantized", "presets", "evaluate", "compose_config",
        "Report")
_EXPORT = ("save_denoiser", "load_denoiser", "export_quantized", "load_quantized")
_DEPLOY = ("deploy", "save_deployed", "load_deployed")
__all__ = ["__version__", *_API, *_EXPORT, *_DEPLOY]


def __getattr__(name: str):
    if name == "api":  # the module, on first use (``diffq.api.quantize``)
        import importlib

        return importlib.import_module("diffq.api")
    if name in _API:
        from diffq import api

        return getattr(api, name)
    if name in _EXPORT:
        from diffq import export

        return getattr(export, name)
    if name in _DEPLOY:
        from diffq import deployment

        return getattr(deployment, name)
    raise AttributeError(name)
