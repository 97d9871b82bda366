"""Drift profiles and PSI on real data: Fashion-MNIST images, rotten-tomatoes texts against
another corpus (the GPL), and the served decoder agreeing with the profile's arithmetic."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import png_bytes

from dlpipe.config import PreprocessingConfig
from dlpipe.data import DataPreprocessor
from dlpipe.quality.drift import (
    DRIFT_THRESHOLD,
    MIN_SAMPLES,
    DriftProfile,
    DriftWindow,
    StatisticReference,
    cut_points,
    load_profile,
    psi,
)
from dlpipe.quality.profile import build_profile, inherit_profile
from dlpipe.quality.summary import summarize
from dlpipe.serving.inputs import InputDecoder

sys.path.insert(0, str(Path(__file__).parent))
from conftest import PROFILE_IMAGES

IMAGES = PreprocessingConfig(task_type="image_classification", augment=False)


def _scores(profile: DriftProfile, inputs: list, pre: DataPreprocessor, size: int) -> dict:
    """PSI of a window of `inputs` as the server computes it: one summary per input."""
    window = DriftWindow(size)
    for sample in inputs:
        tensor = pre.preprocess_inference_batch([sample])
        if isinstance(tensor, dict):
            one = {k: v[0] for k, v in tensor.items()}
            window.add(summarize(one, None, profile.table), 0)
        else:
            window.add(summarize(tensor[0], int(np.prod(np.shape(sample)[:2])), None), 0)
    return profile.scores(*window.columns())


def test_psi_matches_a_hand_computation() -> None:
    ref, live = [50, 30, 20], [20, 30, 50]
    r = (np.array(ref) + 0.5) / 101.5
    a = (np.array(live) + 0.5) / 101.5
    assert psi(ref, live) == pytest.approx(float(np.sum((a - r) * np.log(a / r))))
    assert psi(ref, ref) == 0.0
    assert psi([1000, 0, 0], [0, 0, 1000]) > 5  # an empty bin is finite, not infinite
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])


def test_a_constant_statistic_has_a_bin_of_its_own() -> None:
    """28 x 28 everywhere: larger or smaller images land outside the reference's one value."""
    ref = StatisticReference.of(np.full(1000, 784.0))
    assert len(ref.counts) == 3 and ref.counts[1] == 1000
    assert ref.score(np.full(200, 784.0)) < 0.01
    assert ref.score(np.full(200, 1024.0)) > DRIFT_THRESHOLD
    assert ref.score(np.full(200, 400.0)) > DRIFT_THRESHOLD
    cuts = cut_points(np.arange(100.0))
    assert cuts[0] == 0.0 and 99.0 < cuts[-1] < 99.0001 and len(cuts) == 11


def test_served_inputs_summarize_like_the_profile(fashion) -> None:
    """The decoder's PNG -> tensor path gives the statistics the profile was built with."""
    pre = DataPreprocessor(IMAGES)
    decoder = InputDecoder(IMAGES)
    images = fashion["train"][:50]
    profile = build_profile(pre, list(images))
    batch = pre.preprocess_inference_batch(list(images))
    for i, image in enumerate(images):
        served = summarize(decoder.image(png_bytes(image)), 784, None)
        direct = summarize(batch[i], 784, None)
        assert served == direct
    assert set(profile.statistics) == {"mean_intensity", "contrast", "pixels"}


def test_test_images_do_not_drift_and_inverted_images_do(fashion) -> None:
    pre = DataPreprocessor(IMAGES)
    profile = build_profile(pre, list(fashion["train"][:PROFILE_IMAGES]))
    same = _scores(profile, list(fashion["test"][:1000]), pre, 1000)
    inverted = _scores(profile, list(255 - fashion["test"][:1000]), pre, 1000)
    print("test set PSI", same, "\ninverted PSI", inverted)
    assert max(same.values()) < 0.1, same
    assert inverted["mean_intensity"] > DRIFT_THRESHOLD
    # Inversion keeps the spread (std is symmetric) and the size: only the mean moves.
    assert inverted["contrast"] < 0.1 and inverted["pixels"] < 0.01


def test_profile_round_trips_and_variants_inherit_it(tmp_path: Path, fashion) -> None:
    pre = DataPreprocessor(IMAGES)
    profile = build_profile(pre, list(fashion["train"][:300]), predicted_counts=[3, 0, 297])
    parent, child = tmp_path / "parent", tmp_path / "child"
    parent.mkdir()
    child.mkdir()
    assert load_profile(parent) is None
    assert not inherit_profile(parent, child)
    profile.save(parent)
    assert inherit_profile(parent, child)
    loaded = load_profile(child)
    assert loaded is not None
    assert loaded.to_json() == profile.to_json()
    assert loaded.classes == [3, 0, 297] and loaded.samples == 300
    values, predicted = {"mean_intensity": np.zeros(0)}, np.array([2] * 150 + [0] * 150)
    scores = loaded.scores(values, predicted)
    assert "mean_intensity" not in scores  # no values, no score
    assert scores["predicted_class"] > DRIFT_THRESHOLD  # class 0 went from 1 % to half


def test_window_reports_once_it_has_enough_inputs() -> None:
    window = DriftWindow(1000)
    for i in range(MIN_SAMPLES - 1):
        window.add({"pixels": 784.0}, i % 3)
    assert not window.ready()
    window.add({"pixels": 784.0, "contrast": 1.0}, 1)
    assert window.ready()
    values, predicted = window.columns()
    assert len(values["pixels"]) == MIN_SAMPLES and len(values["contrast"]) == 1
    for _ in range(2000):  # wraps around: the oldest go
        window.add({"pixels": 1.0}, 2)
    values, predicted = window.columns()
    assert window.count == 1000 and set(values["pixels"]) == {1.0} and set(predicted) == {2}
    assert len(values["contrast"]) == 0  # overwritten by inputs without it


def _license_sentences() -> list[str]:
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    parts = [" ".join(p.split()) for p in text.replace("\n\n", ".").split(".")]
    return [p for p in parts if len(p) > 20]


def test_texts_from_another_corpus_drift(tmp_path: Path) -> None:
    """Vocabulary from rotten-tomatoes training texts; held-out snippets do not drift, GPL
    sentences do (their words are not the critics')."""
    from dlpipe.data.sources import load_rotten_tomatoes, rotten_tomatoes_path

    try:
        rotten_tomatoes_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    if not Path("/usr/share/common-licenses/GPL-3").is_file():
        pytest.skip("no GPL-3 text in /usr/share/common-licenses")

    config = PreprocessingConfig(
        task_type="text_classification", tokenizer_name="minilm", max_sequence_length=64
    )
    pre = DataPreprocessor(config)
    texts = list(load_rotten_tomatoes().samples)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    train = [texts[i] for i in order[:8000]]
    held_out = [texts[i] for i in order[8000:10000]]
    live = [texts[i] for i in order[10000:11000]]
    profile = build_profile(pre, held_out, vocabulary_texts=train)
    assert profile.vocabulary and profile.table is not None
    same = _scores(profile, live, pre, 1000)
    other = _scores(profile, _license_sentences()[:1000], pre, 1000)
    print("rotten tomatoes PSI", same, "\nGPL-3 PSI", other)
    assert max(same.values()) < 0.1, same
    assert other["vocab_coverage"] > DRIFT_THRESHOLD
    assert not math.isnan(other["tokens"])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 96, 96)])
def test_summaries_of_a_served_group_equal_the_profiles_batch_statistics(
    shape: tuple[int, ...],
) -> None:
    """Small images are stacked and summarized in one call, large ones one at a time: either
    way each value equals the one the profile computes over its whole batch."""
    from dlpipe.quality.summary import image_statistics, summarize_many

    batch = np.random.default_rng(0).standard_normal((7, *shape)).astype(np.float32)
    sizes = [100 + i for i in range(7)]
    served = summarize_many([(batch[i], sizes[i], None) for i in range(7)])
    profile = image_statistics(batch, sizes)
    means = np.round(profile["mean_intensity"], 5).tolist()
    contrasts = np.round(profile["contrast"], 5).tolist()
    for i, summary in enumerate(served):
        assert summary == {"mean_intensity": means[i], "contrast": contrasts[i], "pixels": sizes[i]}
