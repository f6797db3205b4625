"""The ViT classifier: the network (`ViTClassifier`), building it (hub id, local folder,
or from scratch) and the `vit_model.pth` format, `SavedModel`: this module is the only
place that knows it.

A checkpoint is a plain dict of tensors, strings and numbers, so it loads with
`torch.load(..., weights_only=True)`: opening a model file never runs code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fashion_vit.config import FashionVitError, TrainConfig
from fashion_vit.files import atomic_open
from fashion_vit.transforms import Preprocessing

FORMAT = "fashion-vit/1"
# (hidden size, attention heads); all sizes use 12 layers and an MLP 4x hidden (patches: --patch-size),
# the DeiT tiny/small and ViT base shapes.
VIT_DIMS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
# ViT's own default; google/vit-base-patch16-224-in21k uses the same.
DEFAULT_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# transformers' ViTConfig defaults: a vit_config dict may leave any of them out.
VIT_DEFAULTS = {
    "model_type": "vit",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
}
# transformers' names for the activations ViT checkpoints use.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


class ModelError(FashionVitError):
    """The model or a checkpoint could not be had."""


class ClassifierOutput(NamedTuple):
    logits: torch.Tensor


class ViTClassifier(nn.Module):
    """transformers' ViTForImageClassification in plain torch: the same layers, parameter
    names, initialisation and arithmetic (scaled-dot-product attention), called the same
    way (`model(pixel_values=x).logits`), so a vit_model.pth is the same file either way.
    Train workers, predictor actors and Serve replicas build it without importing
    transformers, which would cost each of those processes seconds of start-up
    (docs/training.md); only reading a hub checkpoint or a save_pretrained folder needs it.

    `config` is a transformers ViTConfig as a dict (missing keys take its defaults), and
    `model.config` the same values as attributes, with id2label keyed by int."""

    def __init__(self, config: dict):
        super().__init__()
        c = SimpleNamespace(**{**VIT_DEFAULTS, **config})
        c.id2label = {int(k): v for k, v in c.id2label.items()}
        c.label2id = {v: k for k, v in c.id2label.items()}
        c.num_labels = len(c.id2label)
        if c.hidden_act not in ACTIVATIONS:
            raise ModelError(f"a ViT with activation {c.hidden_act!r} is not supported (only {sorted(ACTIVATIONS)})")
        self.config = c
        d, grid = c.hidden_size, c.image_size // c.patch_size
        self.vit = nn.Module()
        self.vit.embeddings = nn.Module()
        self.vit.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.vit.embeddings.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.vit.embeddings.patch_embeddings = nn.Module()
        self.vit.embeddings.patch_embeddings.projection = nn.Conv2d(c.num_channels, d, c.patch_size, c.patch_size)
        self.vit.layers = nn.ModuleList(_Block(c) for _ in range(c.num_hidden_layers))
        self.vit.layernorm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.classifier = nn.Linear(d, c.num_labels)
        self._initialise(c.initializer_range)

    def _initialise(self, std: float) -> None:
        """As transformers initialises a new ViT (what the scratch recipes were tuned with)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:  # qkv_bias=False
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.vit.embeddings.position_embeddings, std=std)
        nn.init.trunc_normal_(self.vit.embeddings.cls_token, std=std)

    def set_attn_implementation(self, name: str) -> None:
        """ "sdpa" (the default: torch's fused kernel) or "eager" (MatMul and Softmax, the
        same maths, which ONNX Runtime fuses better: engines.to_onnx), as in transformers."""
        if name not in ("sdpa", "eager"):
            raise ValueError(f"attention implementation {name!r}: 'sdpa' or 'eager'")
        for block in self.vit.layers:
            block.sdpa = name == "sdpa"

    def forward(self, pixel_values: torch.Tensor) -> ClassifierOutput:
        e, dropout = self.vit.embeddings, self.config.hidden_dropout_prob
        x = e.patch_embeddings.projection(pixel_values.to(e.cls_token.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([e.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + e.position_embeddings
        x = F.dropout(x, dropout, self.training)
        for block in self.vit.layers:
            x = block(x)
        return ClassifierOutput(self.classifier(self.vit.layernorm(x)[:, 0]))


class _Block(nn.Module):
    """One pre-norm encoder layer, named as transformers 5 names ViTLayer's parameters."""

    def __init__(self, c: SimpleNamespace):
        super().__init__()
        d = c.hidden_size
        self.heads, self.act, self.sdpa = c.num_attention_heads, ACTIVATIONS[c.hidden_act], True
        self.dropout, self.attention_dropout = c.hidden_dropout_prob, c.attention_probs_dropout_prob
        self.layernorm_before = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.attention = nn.ModuleDict(
            {name: nn.Linear(d, d, bias=c.qkv_bias) for name in ("q_proj", "k_proj", "v_proj")}
        )
        self.attention["o_proj"] = nn.Linear(d, d)
        self.layernorm_after = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(d, c.intermediate_size), "fc2": nn.Linear(c.intermediate_size, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.layernorm_before(x)
        q, k, v = [
            self.attention[p](h).view(b, n, self.heads, -1).transpose(1, 2) for p in ("q_proj", "k_proj", "v_proj")
        ]
        p_drop = self.attention_dropout if self.training else 0.0
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop)
        else:
            weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1, dtype=torch.float32).to(q.dtype)
            a = F.dropout(weights, p_drop, self.training) @ v
        x = x + F.dropout(self.attention["o_proj"](a.transpose(1, 2).reshape(b, n, d)), self.dropout, self.training)
        h = self.mlp["fc2"](self.act(self.mlp["fc1"](self.layernorm_after(x))))
        return x + F.dropout(h, self.dropout, self.training)


def create_model(cfg: TrainConfig, labels: list[str], init: SavedModel | None = None):
    """Build a ViTClassifier with a len(labels)-way head at cfg.image_size:
    from `init` (a saved model: --init-from's, or the pretrained checkpoint as
    `load_pretrained` returned it), from scratch, or from cfg.model (hub id or folder).

    Returns (model, (mean, std)): the normalisation the backbone was trained with.
    """
    if init is not None:
        prep = init.preprocessing
        return _continue_from(init, labels, cfg), (prep.mean, prep.std)
    if cfg.from_scratch:
        hidden, heads = VIT_DIMS[cfg.vit_size]
        config = {
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_hidden_layers": 12,
            "intermediate_size": 4 * hidden,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "id2label": dict(enumerate(labels)),
        }
        return ViTClassifier(config), DEFAULT_MEAN_STD
    init = load_pretrained(cfg.model, labels)
    return _continue_from(init, labels, cfg), (init.preprocessing.mean, init.preprocessing.std)


def load_pretrained(name: str, labels: list[str]) -> SavedModel:
    """A pretrained checkpoint (hub id or save_pretrained folder) at its own input size,
    with a new len(labels)-way head and its own mean/std; everything else (patch size,
    LayerNorm eps, depth, width) is the checkpoint's. The tune driver loads it once and
    hands it to every trial's workers, which need neither the hub nor the driver's disk."""
    import transformers
    from transformers import ViTForImageClassification

    verbosity = transformers.logging.get_verbosity()
    # Its load report lists the dropped head as a size mismatch, which is the intent here.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = ViTForImageClassification.from_pretrained(
            name,
            # id2label alone sets the head's size: with num_labels beside a checkpoint's
            # 1000-entry map, transformers warns that they disagree.
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,  # the checkpoint's head (1000 ImageNet classes, or none) is not ours
            attn_implementation="sdpa",
        )
    except (OSError, ValueError) as e:
        raise ModelError(
            f"could not load model {name!r} from the Hugging Face hub or a local folder "
            f"({_first_line(e)}). Without network access, pass --model DIR with a model saved by "
            "save_pretrained, or --from-scratch --vit-size {tiny,small,base} to train from random weights."
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    mean, std = _mean_std(name)
    size = model.config.image_size
    prep = Preprocessing(image_size=size, source_size=(size, size), mean=mean, std=std)
    return SavedModel.from_model(model, prep, train_config={}, metrics={})


def _continue_from(init: SavedModel, labels: list[str], cfg: TrainConfig):
    """The saved model, checked against the data's label set, at cfg.image_size."""
    model, _ = init.build()
    saved = init.labels
    if saved != list(labels):
        if not cfg.reinit_head:
            raise ModelError(
                f"--init-from {cfg.init_from!r} was trained on labels {saved}, but the data has {list(labels)}; "
                "pass --reinit-head to train a new classifier head on the data's labels"
            )
        model.classifier = nn.Linear(model.config.hidden_size, len(labels))
        model.config.num_labels = len(labels)
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    if model.config.image_size != cfg.image_size:
        model = resize_image_size(model, cfg.image_size)
    return model.train()


def resize_image_size(model, image_size: int):
    """Rebuild `model` for a new input size, resampling its position embeddings bicubically
    once here (instead of interpolating them on every forward pass)."""
    config = model.config
    state = model.state_dict()
    key = "vit.embeddings.position_embeddings"
    pos = state[key]  # (1, 1 + n*n, D): class token first, then the patch grid
    n_old = math.isqrt(pos.shape[1] - 1)
    n_new = image_size // config.patch_size
    grid = pos[:, 1:].reshape(1, n_old, n_old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(n_new, n_new), mode="bicubic", align_corners=False)
    state[key] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, n_new * n_new, -1)], dim=1)
    resized = ViTClassifier({**vars(config), "image_size": image_size})
    resized.load_state_dict(state)
    return resized


def _mean_std(model_name: str):
    """The checkpoint's own normalisation, from its preprocessor_config.json."""
    try:
        if os.path.isdir(model_name):
            path = os.path.join(model_name, "preprocessor_config.json")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model_name, "preprocessor_config.json")
        with open(path) as f:
            d = json.load(f)
        return tuple(d["image_mean"]), tuple(d["image_std"])
    except Exception:
        # No processor config saved with the weights: ViT's documented default.
        return DEFAULT_MEAN_STD


@dataclass
class SavedModel:
    """What `vit_model.pth` holds: everything needed to rebuild and use the model without
    the hub and without Ray. This module is the only place that knows the file's layout;
    everything else reads these attributes."""

    state_dict: dict  # parameter name -> CPU tensor
    vit_config: dict  # transformers ViTConfig as a dict
    labels: list[str]  # class index -> label
    preprocessing: Preprocessing
    train_config: dict = field(default_factory=dict)  # asdict(TrainConfig) of the run that made it; {} for a HF folder
    metrics: dict = field(default_factory=dict)  # validation metrics of its epoch, and "test" once scored

    def build(self):
        """(model in eval mode on CPU, Preprocessing)."""
        model = ViTClassifier({**self.vit_config, "id2label": dict(enumerate(self.labels))})
        model.load_state_dict(self.state_dict)
        return model.eval(), self.preprocessing

    def to_transformers(self):
        """The same model as transformers' ViTForImageClassification in eval mode (for its
        save_pretrained, pipelines or push_to_hub); imports transformers."""
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig.from_dict({**self.vit_config, "id2label": dict(enumerate(self.labels))})
        config.label2id = {label: i for i, label in enumerate(self.labels)}
        model = ViTForImageClassification(config)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def trained_with(self) -> TrainConfig | None:
        """The TrainConfig that made it (fields this version knows), or None if unknown."""
        known = {f.name for f in fields(TrainConfig)}
        values = {k: v for k, v in self.train_config.items() if k in known}
        return TrainConfig(**values) if values else None

    def save(self, path: str) -> None:
        """Write atomically, as a plain dict that loads with torch.load(weights_only=True)."""
        payload = {
            "format": FORMAT,
            "state_dict": self.state_dict,
            "vit_config": self.vit_config,
            "id2label": dict(enumerate(self.labels)),
            "preprocessing": self.preprocessing.to_dict(),
            "train_config": self.train_config,
            "metrics": self.metrics,
        }
        with atomic_open(path, "wb") as f:
            torch.save(payload, f)

    @classmethod
    def from_model(cls, model, prep: Preprocessing, train_config: dict, metrics: dict) -> SavedModel:
        model = getattr(model, "module", model)  # unwrap DDP
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        config = model.config  # a ViTClassifier's, or a transformers model's (a hub checkpoint or a folder)
        text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else json.dumps(vars(config))
        return cls(
            state_dict={k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            vit_config=json.loads(text),
            labels=[id2label[i] for i in range(len(id2label))],
            preprocessing=prep,
            train_config=train_config,
            metrics=metrics,
        )


def save_checkpoint(path: str, model, prep: Preprocessing, train_config: dict, metrics: dict) -> None:
    SavedModel.from_model(model, prep, train_config, metrics).save(path)


def read_checkpoint(path: str) -> SavedModel:
    """Load a vit_model.pth safely (weights_only=True); ModelError if it is not one."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"model file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"{path!r} is a folder without a Hugging Face model in it") from None
    except pickle.UnpicklingError as e:
        raise ModelError(_refusal(path, e)) from None
    except EOFError:
        raise ModelError(f"{path!r} is not a fashion-vit checkpoint (empty, or cut short)") from None
    except Exception as e:  # on arbitrary bytes the unpickler fails in arbitrary ways (seen: KeyError)
        raise ModelError(
            f"{path!r} is not a fashion-vit checkpoint ({type(e).__name__}: {_first_line(e)[:120]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path!r} is not a fashion-vit checkpoint (no {FORMAT!r} format tag)")
    id2label = {int(k): v for k, v in payload["id2label"].items()}
    return SavedModel(
        state_dict=payload["state_dict"],
        vit_config=payload["vit_config"],
        labels=[id2label[i] for i in range(len(id2label))],
        preprocessing=Preprocessing.from_dict(payload["preprocessing"]),
        train_config=payload.get("train_config") or {},
        metrics=payload.get("metrics") or {},
    )


def load_checkpoint(path: str) -> SavedModel:
    """A vit_model.pth, or a Hugging Face model folder turned into the same form, so
    everything downstream has one path."""
    if os.path.isdir(path):
        return _from_hf_folder(path)
    return read_checkpoint(path)


def _from_hf_folder(path: str) -> SavedModel:
    from transformers import ViTForImageClassification

    try:
        model = ViTForImageClassification.from_pretrained(path, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load a Hugging Face model from folder {path!r} ({_first_line(e)})") from None
    mean, std = _mean_std(path)
    size = model.config.image_size
    # A folder does not say what size its training images had: decode straight to the input size.
    prep = Preprocessing(image_size=size, source_size=(size, size), mean=mean, std=std)
    return SavedModel.from_model(model, prep, train_config={}, metrics={})


def _refusal(path: str, e: pickle.UnpicklingError) -> str:
    """torch's weights-only refusal opens with advice to load the file unsafely; the one
    line keeps only its reason: code in the file, or bytes that are no pickle at all."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    code = next((line for line in lines if "GLOBAL" in line), None)
    if code:
        return f"{path!r} holds code and was refused, never run ({code[:160]})"
    marker = "WeightsUnpickler error:"
    after = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.endswith(marker)]
    return (
        f"{path!r} is not a fashion-vit checkpoint (not a file torch.save wrote: {(after or lines or ['?'])[0][:120]})"
    )


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
