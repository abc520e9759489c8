"""Model adapters: load diffusers pipelines (tiny, hub id or local folder), name their parts, sample them."""
from diffq.models.generate import dit_label_ids, dit_resolution, generate_images, sample_seeds
from diffq.models.loading import (
    denoiser_of,
    family_of_pipeline,
    load_pipeline,
    resolve_dtype,
    set_denoiser,
    text_encoders_of,
)
from diffq.models.sampling import Sampling, model_key, sampling_of, weights_fingerprint
from diffq.models.tiny import FAMILIES, PIPELINE_CLASSES, build_tiny_pipeline
from diffq.models.tokenizers import build_word_tokenizer, unknown_words

__all__ = [
    "FAMILIES", "PIPELINE_CLASSES", "build_tiny_pipeline", "build_word_tokenizer", "unknown_words", "load_pipeline",
    "resolve_dtype", "denoiser_of", "set_denoiser", "text_encoders_of", "family_of_pipeline",
    "generate_images", "sample_seeds", "dit_label_ids", "dit_resolution", "Sampling", "sampling_of", "model_key",
    "weights_fingerprint",
]
