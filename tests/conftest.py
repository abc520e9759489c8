"""Test set-up: offline, small thread count, a private cache folder."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["DIFFQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("diffq_cache"))


@pytest.fixture(scope="session")
def compose():
    """Compose the app's config with overrides, as the CLI would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from diffq.config import register_configs

    register_configs()

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_module("diffq.conf", version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=False)

    return _compose
