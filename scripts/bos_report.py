"""BOS token of a pipeline's text sequence: its activation range against the other tokens', and the
cross-attention K/V output error with and without BOS-aware quantization (MixDQ).

    python scripts/bos_report.py                        # the testbed UNet, W8A8 and W4A8
    python scripts/bos_report.py model=sd15 device=cuda # any model config (Hydra overrides)

The K/V layers are calibrated and evaluated on the text encoder's sequences for the GenEval-shapes
prompts plus the empty (unconditional) prompt; errors are relative MSE vs the FP layer over all
tokens and over tokens 1.. (the prompt's own words).
"""
from __future__ import annotations

import os
import sys

import torch
from hydra import compose, initialize_config_module

from diffq.config import register_configs
from diffq.layers import attach_quantizers
from diffq.models import denoiser_of, load_pipeline
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import resolve_spec
from diffq.testbed.prompts import evaluation_prompts

FORMATS = {"W8A8": (8, 8), "W4A8": (4, 8)}


@torch.no_grad()
def text_sequences(pipe, prompts: list[str]) -> torch.Tensor:
    """The encoder_hidden_states the denoiser cross-attends to, [N, T, D]."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float().cpu()


@torch.no_grad()
def kv_error(layer: torch.nn.Linear, role: str, text: torch.Tensor, bits: tuple[int, int], bos: bool) -> tuple:
    """(relative MSE over all tokens, over tokens 1..) of the quantized copy of ``layer``."""
    import copy

    q = copy.deepcopy(layer)
    weight = {"format": "int", "bits": bits[0], "granularity": "channel"}
    act = {"format": "int", "bits": bits[1], "granularity": "tensor", "symmetric": False}
    specs = resolve_spec({"kv": (role, q)}, weight, act, [{"roles": [role], "bos": bos}], ROLES)
    attach_quantizers(torch.nn.ModuleDict({"kv": q}), specs)
    q.weight_quantizer.calibrate_weight(q.weight)
    q.input_quantizer.begin_calibration()
    q(text)
    q.input_quantizer.end_calibration()
    ref, out = layer(text), q(text)
    rel = lambda a, b: float((a - b).square().mean() / b.square().mean())  # noqa: E731
    return rel(out, ref), rel(out[:, 1:], ref[:, 1:])


def main(overrides: list[str]) -> None:
    register_configs()
    with initialize_config_module("diffq.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    pipe = load_pipeline(cfg.model, device="cpu")
    prompts = sorted(evaluation_prompts()) + [""]
    text = text_sequences(pipe, prompts)
    amax = text.abs().amax(-1)  # [N, T]
    print(f"{cfg.model.name}: text sequences {tuple(text.shape)}")
    print(f"  |activation| max, BOS token 0: {amax[:, 0].max():.2f} (mean over prompts {amax[:, 0].mean():.2f}); "
          f"tokens 1..: {amax[:, 1:].max():.2f} (mean of per-prompt max {amax[:, 1:].amax(1).mean():.2f})")
    print(f"  BOS row identical across prompts: {bool((text[:, 0] - text[0, 0]).abs().max() == 0)}")
    _, denoiser = denoiser_of(pipe)
    kv = {n: m for n, (role, m) in quantizable_layers(denoiser, cfg.model.family).items() if role == "cross_attn_kv"}
    print("  K/V output relative MSE vs FP, mean over the %d cross-attention K/V layers (all tokens / tokens 1..):"
          % len(kv))
    for name, bits in FORMATS.items():
        rows = {bos: [kv_error(m, "cross_attn_kv", text, bits, bos) for m in kv.values()] for bos in (False, True)}
        mean = {bos: [sum(r[i] for r in v) / len(v) for i in (0, 1)] for bos, v in rows.items()}
        print(f"    {name}: plain {mean[False][0]:.3e} / {mean[False][1]:.3e}   "
              f"BOS-aware {mean[True][0]:.3e} / {mean[True][1]:.3e}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
