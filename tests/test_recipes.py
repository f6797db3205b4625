"""Recipes: where the training values a user did not give come from, and what a search
over them varies. The short real run of the scratch recipe is the `trained` fixture
(tests/conftest.py), checked in tests/test_tune.py."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from fashion_vit.config import (
    HYPERPARAMETERS,
    MASTER_CATEGORIES,
    RECIPE_FIELDS,
    RECIPES,
    ConfigError,
    TrainConfig,
    for_cluster,
)
from fashion_vit.train import class_weights
from fashion_vit.tune import baseline, search_space
from jobs.tune import parse_args
from tests.conftest import run_main


def _recipe_values(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in RECIPE_FIELDS}


def test_the_pretrained_baseline_is_the_seed_recipe_unchanged():
    cfg = parse_args([])
    assert cfg.recipe == "pretrained" and cfg.from_scratch is False
    assert (cfg.model, cfg.image_size, cfg.epochs, cfg.lr, cfg.batch_size) == (
        "google/vit-base-patch16-224-in21k",
        224,
        3,
        2e-5,
        32,
    )
    assert (cfg.weight_decay, cfg.warmup_ratio, cfg.label_smoothing, cfg.augment, cfg.class_weights) == (
        0.0,
        0.0,
        0.0,
        "flip",
        "none",
    )
    # The library's defaults are the same recipe: TrainConfig() is the baseline too.
    assert asdict(cfg) == asdict(TrainConfig(user_set=()))


def test_from_scratch_takes_the_scratch_recipe():
    cfg = parse_args(["--from-scratch"])
    assert cfg.recipe == "scratch" and cfg.from_scratch
    assert _recipe_values(cfg) == RECIPES["scratch"]
    # --recipe scratch implies --from-scratch, and is kept on GPUs (see below).
    explicit = parse_args(["--recipe", "scratch"])
    assert _recipe_values(explicit) == RECIPES["scratch"] and explicit.from_scratch


def test_gpu_workers_take_the_scratch_gpu_recipe_where_nothing_was_given():
    from dataclasses import replace

    on_gpus = lambda argv: for_cluster(replace(parse_args(argv), use_gpu=True))
    cfg = on_gpus(["--from-scratch"])
    assert cfg.recipe == "scratch-gpu" and _recipe_values(cfg) == RECIPES["scratch-gpu"]
    assert (cfg.vit_size, cfg.image_size, cfg.patch_size) == ("small", 64, 8)  # 64 tokens, not 4
    # A flag given still wins, and the rest follows the GPU recipe.
    cfg = on_gpus(["--from-scratch", "--epochs", "6", "--patch-size", "16"])
    assert (cfg.epochs, cfg.patch_size, cfg.image_size) == (6, 16, 64)
    # An explicit --recipe is kept, so is the pretrained recipe, and CPU workers keep the CPU one.
    assert _recipe_values(on_gpus(["--recipe", "scratch"])) == RECIPES["scratch"]
    assert on_gpus([]).recipe == "pretrained" and on_gpus([]).image_size == 224
    cpu = parse_args(["--from-scratch"])
    assert for_cluster(replace(cpu, use_gpu=False)) == replace(cpu, use_gpu=False)
    # And the GPU recipe can be asked for anywhere.
    assert _recipe_values(parse_args(["--recipe", "scratch-gpu"])) == RECIPES["scratch-gpu"]
    # A config built in code keeps its values: nothing says which were chosen.
    built = TrainConfig(from_scratch=True, recipe="scratch", vit_size="tiny", image_size=32, use_gpu=True)
    assert for_cluster(built) == built
    # A given size that the GPU recipe's patches do not divide fails in one line.
    with pytest.raises(ConfigError, match="multiple of the patch size 8"):
        on_gpus(["--from-scratch", "--image-size", "36"])


def test_explicit_flags_win_over_the_recipe():
    cfg = parse_args(
        ["--from-scratch", "--lr", "3e-4", "--epochs", "2", "--image-size", "64", "--class-weights", "sqrt"]
    )
    assert (cfg.lr, cfg.epochs, cfg.image_size, cfg.class_weights) == (3e-4, 2, 64, "sqrt")
    rest = {k: v for k, v in RECIPES["scratch"].items() if k not in ("lr", "epochs", "image_size", "class_weights")}
    assert {k: getattr(cfg, k) for k in rest} == rest
    # A value equal to the other recipe's default still counts as given.
    assert parse_args(["--from-scratch", "--epochs", "3"]).epochs == 3
    # And the pretrained recipe can be asked for with random weights.
    cfg = parse_args(["--from-scratch", "--recipe", "pretrained", "--vit-size", "tiny"])
    assert cfg.from_scratch and (cfg.lr, cfg.epochs, cfg.image_size, cfg.vit_size) == (2e-5, 3, 224, "tiny")


def test_scratch_recipe_with_pretrained_weights_is_refused_in_one_line(tmp_path, capsys):
    from jobs import tune as tune_job

    with pytest.raises(ConfigError, match="random weights"):
        parse_args(["--recipe", "scratch", "--model", str(tmp_path)])
    code, err = run_main(tune_job.main, ["--recipe", "scratch", "--model", str(tmp_path)], capsys)
    assert code == 2 and "random weights" in err and "Traceback" not in err


def test_search_spaces_vary_what_each_recipe_needs():
    from ray.tune.search.sample import Domain

    scratch = search_space(parse_args(["--from-scratch"]))
    assert set(scratch) == set(HYPERPARAMETERS)
    varied = {k for k, v in scratch.items() if isinstance(v, Domain)}
    assert varied == {"lr", "weight_decay", "label_smoothing", "augment", "class_weights", "image_size", "patch_size"}
    assert sorted(scratch["patch_size"].categories) == [8, 16]
    assert sorted(scratch["image_size"].categories) == sorted(RECIPES["scratch"]["search_image_sizes"])
    lr = RECIPES["scratch"]["lr"]
    assert scratch["lr"].lower == pytest.approx(lr / 3) and scratch["lr"].upper == pytest.approx(lr * 3)
    assert set(scratch["class_weights"].categories) == {"none", "sqrt"}

    gpu = search_space(parse_args(["--recipe", "scratch-gpu"]))
    assert sorted(gpu["patch_size"].categories) == [4, 8]  # 64 or 256 tokens at 64 px
    assert sorted(gpu["image_size"].categories) == [48, 64, 80]

    pretrained = search_space(parse_args([]))
    varied = {k for k, v in pretrained.items() if isinstance(v, Domain)}
    assert varied == {"lr", "batch_size", "weight_decay", "warmup_ratio", "label_smoothing", "layer_decay"}
    assert pretrained["image_size"] == 224 and pretrained["augment"] == "flip"
    with_sizes = search_space(parse_args(["--search-image-sizes", "224", "112", "160"]))
    assert sorted(with_sizes["image_size"].categories) == [112, 160, 224]
    # The baseline trial is the recipe itself.
    assert baseline(parse_args(["--from-scratch"]))["image_size"] == RECIPES["scratch"]["image_size"]


def test_search_image_sizes_must_fit_the_patch_size():
    with pytest.raises(ConfigError, match="--search-image-sizes must be a multiple of the patch size"):
        parse_args(["--search-image-sizes", "32", "40"]).validate()


def test_class_weights_balance_the_training_counts():
    counts = [15000, 8000, 6500, 1500, 80, 18]
    assert class_weights(counts, "none") is None
    balanced = np.array(class_weights(counts, "balanced"))
    # Every class then carries the same total weight, and the total is unchanged.
    totals = balanced * counts
    assert np.allclose(totals, totals[0]) and totals.sum() == pytest.approx(sum(counts))
    sqrt = np.array(class_weights(counts, "sqrt"))
    assert np.allclose(sqrt, np.sqrt(balanced)) and np.all(np.diff(sqrt) > 0)
    # A class absent from the training split weighs nothing instead of dividing by zero.
    assert class_weights([10, 0, 30], "balanced")[1] == 0.0


def test_class_weighted_loss_weights_images_not_the_smoothing_term():
    import torch

    from fashion_vit.train import _loss

    torch.manual_seed(0)
    logits, y = torch.randn(32, 6), torch.randint(0, 6, (32,))
    # No weights: plain (smoothed) cross-entropy.
    torch.testing.assert_close(
        _loss(logits, y, None, 0.1), torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    )
    # Equal weights change nothing, whatever their scale.
    torch.testing.assert_close(_loss(logits, y, torch.full((6,), 7.0), 0.1), _loss(logits, y, None, 0.1))
    # A class's weight scales only its own images' share.
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 20.0])
    per_image = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(_loss(logits, y, w, 0.1), (per_image * w[y]).sum() / w[y].sum())
    # A weighted class with no image in the batch leaves the loss as it was.
    y_common = y.clamp(max=4)
    torch.testing.assert_close(_loss(logits, y_common, w, 0.1), _loss(logits, y_common, None, 0.1))


def test_patch_size_is_a_scratch_dial():
    from fashion_vit.model import create_model

    cfg = parse_args(["--from-scratch", "--patch-size", "8"]).validate()
    model, _ = create_model(cfg, list(MASTER_CATEGORIES))
    assert model.config.patch_size == 8
    assert model.vit.embeddings.position_embeddings.shape[1] == 1 + (32 // 8) ** 2  # 16 tokens instead of 4
    with pytest.raises(ConfigError, match="--patch-size applies to --from-scratch"):
        parse_args(["--patch-size", "8"])
    with pytest.raises(ConfigError, match="--image-size must be a multiple of the patch size 8"):
        parse_args(["--from-scratch", "--patch-size", "8", "--image-size", "36"]).validate()


def test_layer_decay_gives_each_block_its_own_rate_and_keeps_the_head_at_lr():
    from fashion_vit.model import create_model
    from fashion_vit.train import _adamw

    cfg = TrainConfig(from_scratch=True, vit_size="tiny", image_size=32)
    model, _ = create_model(cfg, list(MASTER_CATEGORIES))
    rate = {id(p): g["lr"] for g in _adamw(model, 1e-3, 0.05, 0.5).param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in _adamw(model, 1e-3, 0.05, 0.5).param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(rate) == len(params)  # every parameter in exactly one group
    # Block i's parameters, whichever way this transformers version names them.
    block = lambda i, kind: next(p for n, p in params.items() if f"layer.{i}." in n or f"layers.{i}." in n if kind(p))
    matrix, vector = (lambda p: p.ndim == 2), (lambda p: p.ndim == 1)
    assert rate[id(params["classifier.weight"])] == pytest.approx(1e-3)
    assert rate[id(block(11, matrix))] == pytest.approx(1e-3 * 0.5)
    assert rate[id(block(0, matrix))] == pytest.approx(1e-3 * 0.5**12)
    assert rate[id(params["vit.embeddings.patch_embeddings.projection.weight"])] == pytest.approx(1e-3 * 0.5**13)
    # As transformers' Trainer: no decay on biases and LayerNorm weights.
    assert decay[id(block(3, matrix))] == 0.05
    assert decay[id(block(3, vector))] == 0.0
    assert decay[id(params["vit.layernorm.weight"])] == 0.0
    # Without it, one rate throughout.
    assert {g["lr"] for g in _adamw(model, 1e-3, 0.05).param_groups} == {1e-3}
