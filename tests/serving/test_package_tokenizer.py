"""A text package is served with the tokenizer.json it carries, not the one it was trained with."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from serving_helpers import ready_client

from dlpipe.data import DataPreprocessor
from dlpipe.serving import ServeSettings, create_app
from dlpipe.serving.sources import LocalSource

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from text_helpers import CLASS_NAMES, long_probability, make_text_package


def test_text_package_serves_after_its_training_tokenizer_is_gone(tmp_path: Path) -> None:
    from dlpipe.models.pretrained import minilm_dir

    trained_with = tmp_path / "minilm-copy"
    shutil.copytree(minilm_dir(), trained_with, ignore=shutil.ignore_patterns("*.safetensors"))
    package = make_text_package(tmp_path, trained_with, length=12)
    texts = ["ok", "a fine film", "word " * 40]
    expected = DataPreprocessor.from_file(package / "preprocessing.json").tokenize(texts)
    shutil.rmtree(trained_with)  # serving must rely on the package's own tokenizer.json

    settings = ServeSettings(
        model_name="text",
        registry_refresh_s=3600,
        gpu_poll_interval_s=3600,
        access_log=False,
        max_wait_ms=1.0,
    )
    app = create_app(settings, source=LocalSource.from_path("text", package))
    with ready_client(app) as client:
        for i, text in enumerate(texts):
            r = client.post("/predict", json={"text": text})
            assert r.status_code == 200, r.text
            probs = {p["label"]: p["probability"] for p in r.json()["predictions"]}
            tokens = int(expected["attention_mask"][i].sum())
            # The graph's logits count the tokens: [CLS] ok [SEP] = 3, truncated text = 12.
            assert probs[CLASS_NAMES[1]] == long_probability(tokens), (text, tokens, probs)
        assert int(expected["attention_mask"][0].sum()) == 3
        assert int(expected["attention_mask"][2].sum()) == 12
