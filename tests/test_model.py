from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from fashion_vit.config import TrainConfig
from fashion_vit.model import (
    ModelError,
    ViTClassifier,
    create_model,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from fashion_vit.transforms import Preprocessing
from tests.conftest import ROOT, Exploit

LABELS = ["Apparel", "Accessories", "Footwear"]
PREP = Preprocessing(image_size=32, source_size=(80, 60), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny ViT saved with save_pretrained, as a stand-in for a hub checkpoint."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64, patch_size=16
    )
    folder = tmp_path_factory.mktemp("tiny-vit")
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.9, 0.8, 0.7]})
    )
    return folder


def test_pretrained_folder_loads_its_weights_and_mean_std(pretrained_dir):
    from safetensors.torch import load_file

    model, (mean, std) = create_model(TrainConfig(model=str(pretrained_dir), image_size=64), LABELS)
    saved = load_file(pretrained_dir / "model.safetensors")
    for key in (
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.position_embeddings",
        "embeddings.cls_token",
    ):
        torch.testing.assert_close(model.state_dict()["vit." + key], saved[key])
    assert model.config.num_labels == 3 and model.config.id2label[2] == "Footwear"
    assert mean == (0.1, 0.2, 0.3) and std == (0.9, 0.8, 0.7)


def test_lower_image_size_resamples_position_embeddings(pretrained_dir):
    model, _ = create_model(TrainConfig(model=str(pretrained_dir), image_size=32), LABELS)
    assert model.config.image_size == 32
    assert model.vit.embeddings.position_embeddings.shape == (1, 1 + 2 * 2, 64)
    logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 3)


def test_from_scratch_sizes():
    model, mean_std = create_model(TrainConfig(from_scratch=True, vit_size="tiny", image_size=32), LABELS)
    assert model.config.hidden_size == 192 and model.config.num_hidden_layers == 12
    assert mean_std == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_checkpoint_round_trip_is_weights_only_and_exact(tmp_path):
    model, _ = create_model(TrainConfig(from_scratch=True, vit_size="tiny", image_size=32), LABELS)
    path = tmp_path / "vit_model.pth"
    save_checkpoint(str(path), model, PREP, {"lr": 1e-3}, {"val_accuracy": 0.5})
    assert os.listdir(tmp_path) == ["vit_model.pth"]  # no temp file left beside it
    raw = torch.load(path, weights_only=True)  # plain data: loads with the safe unpickler
    assert raw["id2label"] == {0: "Apparel", 1: "Accessories", 2: "Footwear"}
    assert raw["preprocessing"]["source_size"] == (80, 60) or list(raw["preprocessing"]["source_size"]) == [80, 60]
    loaded, prep = load_checkpoint(str(path)).build()
    assert prep == PREP
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(pixel_values=x).logits, model.eval()(pixel_values=x).logits)


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"format": "fashion-vit/1", "state_dict": Exploit(marker)}, path)  # as torch.save writes a .pth
    with pytest.raises(ModelError, match=r"holds code and was refused, never run \(.*GLOBAL posix\.system") as e:
        read_checkpoint(str(path))
    assert not marker.exists()
    assert "weights_only` set to `False`" not in str(e.value)  # torch's advice to load it unsafely is not passed on
    with open(path, "wb") as f:  # a bare pickle: not even torch.save's layout
        pickle.dump({"format": "fashion-vit/1", "state_dict": Exploit(marker)}, f)
    with pytest.raises(ModelError, match="is not a fashion-vit checkpoint"):
        read_checkpoint(str(path))
    assert not marker.exists()


def test_non_checkpoint_files_are_refused(tmp_path, shared_data):
    """In one line each: the unpickler fails on arbitrary bytes in arbitrary ways."""
    (tmp_path / "text.pth").write_text("not a model")
    (tmp_path / "hello.pth").write_text("hello")  # a KeyError inside torch's unpickler
    (tmp_path / "empty.pth").write_bytes(b"")
    photo = next((shared_data / "images").iterdir())
    for path in [tmp_path / "text.pth", tmp_path / "hello.pth", tmp_path / "empty.pth", photo]:
        with pytest.raises(ModelError, match="is not a fashion-vit checkpoint") as e:
            read_checkpoint(str(path))
        assert len(str(e.value).splitlines()) == 1 and "weights_only" not in str(e.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="format tag"):
        read_checkpoint(str(tmp_path / "other.pth"))
    with pytest.raises(ModelError, match="does not exist"):
        read_checkpoint(str(tmp_path / "missing.pth"))


def test_a_file_in_the_first_format_still_loads(tmp_path):
    """vit_model.pth as the first release wrote it: a plain dict with these keys."""
    from transformers import ViTConfig

    model, _ = create_model(TrainConfig(from_scratch=True, vit_size="tiny", image_size=32), LABELS)
    # Its vit_config was transformers' whole ViTConfig, with keys this package never reads.
    hf_config = ViTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768, image_size=32, num_labels=3)
    path = tmp_path / "old.pth"
    torch.save(
        {
            "format": "fashion-vit/1",
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "vit_config": json.loads(hf_config.to_json_string(use_diff=False)),
            "id2label": {0: "Apparel", 1: "Accessories", 2: "Footwear"},
            "preprocessing": {
                "image_size": 32,
                "source_size": (80, 60),
                "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5),
            },
            "train_config": {"lr": 1e-3, "epochs": 2, "a_field_from_another_version": 1},
            "metrics": {"val": {"accuracy": 0.5}},
        },
        path,
    )
    saved = read_checkpoint(str(path))
    assert saved.labels == LABELS and saved.preprocessing == PREP and saved.metrics["val"]["accuracy"] == 0.5
    assert saved.trained_with().lr == 1e-3  # unknown fields are left out, not an error
    loaded, _ = saved.build()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(pixel_values=x).logits, model.eval()(pixel_values=x).logits)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_network_is_transformers_vit_with_the_same_names_and_arithmetic(train, attention):
    """ViTClassifier against transformers' ViTForImageClassification with the same weights:
    the same parameter names, and the same logits (dropout is 0 in ViT's configs), with
    either attention (the ONNX export uses eager)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                       image_size=48, patch_size=8, layer_norm_eps=1e-6, num_labels=6)  # fmt: skip
    theirs = ViTForImageClassification(config).train(train)
    theirs.set_attn_implementation(attention)
    ours = ViTClassifier(json.loads(config.to_json_string(use_diff=False))).train(train)
    ours.set_attn_implementation(attention)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 3, 48, 48)
    torch.testing.assert_close(ours(pixel_values=x).logits, theirs(pixel_values=x).logits)


def test_a_worker_builds_and_runs_a_saved_model_without_importing_transformers(tmp_path):
    """What every Train worker, predictor actor and Serve replica does: importing
    transformers would cost each of them seconds (the point of ViTClassifier)."""
    model, _ = create_model(TrainConfig(from_scratch=True, vit_size="tiny", image_size=32), LABELS)
    save_checkpoint(str(tmp_path / "vit_model.pth"), model, PREP, {}, {})
    script = (
        "import sys, torch\n"
        "from fashion_vit.model import load_checkpoint\n"
        f"model, _ = load_checkpoint({str(tmp_path / 'vit_model.pth')!r}).build()\n"
        "print(model(pixel_values=torch.zeros(1, 3, 32, 32)).logits.shape[1], 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["3", "False"], out.stderr[-2000:]


def test_a_checkpoint_becomes_a_transformers_model_with_the_same_logits(tmp_path):
    from transformers import ViTForImageClassification

    model, _ = create_model(TrainConfig(from_scratch=True, vit_size="tiny", image_size=32), LABELS)
    save_checkpoint(str(tmp_path / "vit_model.pth"), model, PREP, {}, {})
    load_checkpoint(str(tmp_path / "vit_model.pth")).to_transformers().save_pretrained(tmp_path / "hf")
    theirs = ViTForImageClassification.from_pretrained(tmp_path / "hf")
    assert theirs.config.id2label == dict(enumerate(LABELS))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(theirs(pixel_values=x).logits, model.eval()(pixel_values=x).logits)
