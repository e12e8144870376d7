"""Projection heads over frozen features, trained with one of the four contrastive losses.

One run trains an image head and a caption head that map the cached encoder features into a
shared L2-normalised space, with a learnable temperature (``LogitScale``, clamped after each
step). AdamW follows a linear warm-up then a cosine decay to zero. After every epoch the dev split
is scored, and the epoch with the highest dev rsum is kept. The test split is scored once, with
that epoch's weights.

A run's seed fixes the head initialisation, the order of the training pairs and dropout, so runs
with equal seeds but different losses see identical batches and start from identical weights.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_contrastive import (
    EntropyWeighted,
    LogitScale,
    SpreadWeighted,
    SymmetricInfoNCE,
    VarianceAwareInfoNCE,
)

from .metrics import retrieval_metrics

logger = logging.getLogger(__name__)

BASELINE = "symmetric"
LOSS_NAMES = ("symmetric", "variance", "entropy", "spread")
LOSS_LABELS = {
    "symmetric": "SymmetricInfoNCE (fixed 1:1)",
    "variance": "VarianceAwareInfoNCE",
    "entropy": "EntropyWeighted",
    "spread": "SpreadWeighted",
}


def build_loss(name: str, options: dict[str, Any] | None = None) -> nn.Module:
    """Create a fresh loss module by short name; ``options`` go to its constructor (not for "symmetric")."""
    options = dict(options or {})
    if name == "symmetric":
        if options:
            raise ValueError(f"SymmetricInfoNCE takes no options, got {options}.")
        return SymmetricInfoNCE()
    if name == "variance":
        return VarianceAwareInfoNCE(**options)
    if name == "entropy":
        return EntropyWeighted(**options)
    if name == "spread":
        return SpreadWeighted(**options)
    raise ValueError(f"Unknown loss {name!r}: expected one of {', '.join(LOSS_NAMES)}.")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every run of a study."""

    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    embed_dim: int = 256
    hidden_dim: int = 512
    head: str = "linear"
    dropout: float = 0.1
    decay: float = 0.9


@dataclass
class TrainData:
    """Training pairs over cached features.

    Attributes:
        image_features: (num_images, image_dim) float32, one row per training image, or
            (num_images, H, W, 3) uint8 pixels when the run fine-tunes an image tower.
        pair_image: (num_pairs,) int64 row of ``image_features`` for each pair; equal rows are positives.
        pair_text_features: (num_pairs, text_dim) float32 caption features of each pair.
    """

    image_features: torch.Tensor
    pair_image: torch.Tensor
    pair_text_features: torch.Tensor


@dataclass
class EvalData:
    """A retrieval split: image features (or uint8 pixels, as in TrainData), caption features and caption_image."""

    image_features: torch.Tensor
    text_features: torch.Tensor
    caption_image: torch.Tensor


@dataclass
class RunResult:
    """Outcome of one run: test and best-dev metrics, per-step curves and per-epoch dev scores."""

    loss: str
    loss_options: dict[str, Any]
    seed: int
    best_epoch: int
    test: dict[str, float]
    dev: dict[str, float]
    seconds: float
    steps: dict[str, list[float]] = field(default_factory=dict)
    epochs: dict[str, list[float]] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] | None = None


class ProjectionHead(nn.Module):
    """LayerNorm, then Linear (``head="linear"``) or Linear-GELU-Dropout-Linear (``head="mlp"``), then L2 norm."""

    def __init__(self, input_dim: int, config: TrainConfig) -> None:
        super().__init__()
        if config.head == "linear":
            layers: list[nn.Module] = [nn.LayerNorm(input_dim), nn.Linear(input_dim, config.embed_dim)]
        elif config.head == "mlp":
            layers = [
                nn.LayerNorm(input_dim),
                nn.Linear(input_dim, config.hidden_dim),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden_dim, config.embed_dim),
            ]
        else:
            raise ValueError(f"Invalid head {config.head!r}: expected 'linear' or 'mlp'.")
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map (N, input_dim) features to (N, embed_dim) unit vectors."""
        return F.normalize(self.layers(features), dim=-1)


class AlignmentModel(nn.Module):
    """Image head, caption head and the learnable logit scale, with an optional trainable image tower.

    Without a tower the image inputs are cached features. With one, they are uint8 pixels that
    the tower encodes first.
    """

    def __init__(self, image_dim: int, text_dim: int, config: TrainConfig,
                 image_tower: nn.Module | None = None) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.image_head = ProjectionHead(image_dim, config)
        self.text_head = ProjectionHead(text_dim, config)
        self.logit_scale = LogitScale()

    def encode_images(self, inputs: torch.Tensor) -> torch.Tensor:
        """Map (N, image_dim) features, or (N, H, W, 3) pixels when a tower is set, to (N, D) embeddings."""
        device = self.logit_scale().device
        features = inputs.to(device)
        if self.image_tower is not None:
            features = self.image_tower(features)
        return self.image_head(features)

    @torch.inference_mode()
    def embed(self, data: EvalData, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (num_images, D) and (num_captions, D) embeddings of a split, on the CPU."""
        device = self.logit_scale().device
        image_batch = 128 if self.image_tower is not None else batch_size
        images = torch.cat([self.encode_images(chunk).cpu() for chunk in data.image_features.split(image_batch)])
        texts = torch.cat([self.text_head(chunk.to(device)).cpu() for chunk in data.text_features.split(batch_size)])
        return images, texts


def evaluate(model: AlignmentModel, data: EvalData) -> dict[str, float]:
    """Return the retrieval metrics of ``model`` on a split; the model is left in eval mode."""
    model.eval()
    images, texts = model.embed(data)
    return retrieval_metrics(images, texts, data.caption_image)


def _as_float(value: torch.Tensor | None) -> float:
    """Return a 0-d tensor as a float; None (the fixed-weight loss has no statistic) becomes NaN."""
    return float("nan") if value is None else float(value)


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """Return a LambdaLR factor: linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train_run(
    loss_name: str,
    train: TrainData,
    dev: EvalData,
    test: EvalData,
    config: TrainConfig,
    seed: int,
    loss_options: dict[str, Any] | None = None,
    keep_embeddings: bool = False,
    image_tower: nn.Module | None = None,
    tower_learning_rate: float = 1e-4,
    device: str | torch.device = "cpu",
) -> RunResult:
    """Train heads with one loss and one seed, select the best dev epoch and score it on test.

    Args:
        loss_name: one of :data:`LOSS_NAMES`.
        train: training pairs; every epoch visits each pair once in a seeded random order.
        dev: split for model selection (highest rsum).
        test: split for the reported metrics.
        config: optimisation settings.
        seed: fixes initialisation, pair order and dropout.
        loss_options: constructor options of the loss; adaptive losses default to ``decay=config.decay``.
        keep_embeddings: also return the test embeddings (for t-SNE plots).
        image_tower: a fresh trainable image encoder with an ``output_dim`` attribute, for end-to-end
            fine-tuning. The image inputs of ``train``, ``dev`` and ``test`` are then uint8 pixels.
        tower_learning_rate: peak AdamW learning rate of the tower's trainable parameters.
        device: where the model and the batches live, e.g. "cuda" for fine-tuning.
    """
    started = time.perf_counter()
    options = dict(loss_options or {})
    if loss_name != BASELINE:
        options.setdefault("decay", config.decay)

    torch.manual_seed(seed)
    image_dim = image_tower.output_dim if image_tower is not None else train.image_features.shape[1]
    model = AlignmentModel(image_dim, train.pair_text_features.shape[1], config, image_tower).to(device)
    loss_fn = build_loss(loss_name, options).to(device)

    head_parameters = [
        parameter for name, parameter in model.named_parameters()
        if not name.startswith(("logit_scale", "image_tower"))
    ]
    groups = [
        {"params": head_parameters, "weight_decay": config.weight_decay},
        {"params": model.logit_scale.parameters(), "weight_decay": 0.0},
    ]
    if image_tower is not None:
        tower_parameters = [parameter for parameter in image_tower.parameters() if parameter.requires_grad]
        groups.append({"params": tower_parameters, "weight_decay": config.weight_decay, "lr": tower_learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    num_pairs = len(train.pair_image)
    steps_per_epoch = math.ceil(num_pairs / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = max(1, int(config.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup_steps))
    order_rng = np.random.default_rng(seed)

    steps: dict[str, list[float]] = {key: [] for key in (
        "loss", "loss_i2t", "loss_t2i", "weight_i2t", "weight_t2i", "statistic_i2t", "statistic_t2i", "logit_scale",
    )}
    epochs: dict[str, list[float]] = {"train_loss": [], "train_symmetric_loss": [], "dev_rsum": []}
    best_rsum, best_epoch, best_state, best_dev = -math.inf, -1, None, {}

    for epoch in range(config.epochs):
        model.train()
        loss_fn.train()
        order = torch.from_numpy(order_rng.permutation(num_pairs))
        epoch_loss, epoch_symmetric = 0.0, 0.0

        for batch in order.split(config.batch_size):
            image_rows = train.pair_image[batch]
            image_embeddings = model.encode_images(train.image_features[image_rows])
            text_embeddings = model.text_head(train.pair_text_features[batch].to(device))
            output = loss_fn(
                image_embeddings, text_embeddings, model.logit_scale(), image_ids=image_rows.to(device),
                return_details=True,
            )

            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            scheduler.step()
            model.logit_scale.clamp_()

            steps["loss"].append(output.loss.item())
            steps["loss_i2t"].append(output.loss_i2t.item())
            steps["loss_t2i"].append(output.loss_t2i.item())
            steps["weight_i2t"].append(float(output.weight_i2t))
            steps["weight_t2i"].append(float(output.weight_t2i))
            steps["statistic_i2t"].append(_as_float(output.statistic_i2t))
            steps["statistic_t2i"].append(_as_float(output.statistic_t2i))
            steps["logit_scale"].append(model.logit_scale().item())
            epoch_loss += output.loss.item() * len(batch)
            epoch_symmetric += 0.5 * (output.loss_i2t.item() + output.loss_t2i.item()) * len(batch)

        epochs["train_loss"].append(epoch_loss / num_pairs)
        epochs["train_symmetric_loss"].append(epoch_symmetric / num_pairs)
        dev_metrics = evaluate(model, dev)
        epochs["dev_rsum"].append(dev_metrics["rsum"])
        if dev_metrics["rsum"] > best_rsum:
            best_rsum, best_epoch, best_dev = dev_metrics["rsum"], epoch, dev_metrics
            best_state = copy.deepcopy(model.state_dict())

    model.load_state_dict(best_state)
    test_metrics = evaluate(model, test)
    embeddings = None
    if keep_embeddings:
        images, texts = model.embed(test)
        embeddings = {"images": images.numpy(), "texts": texts.numpy()}

    return RunResult(
        loss=loss_name,
        loss_options=options,
        seed=seed,
        best_epoch=best_epoch,
        test=test_metrics,
        dev=best_dev,
        seconds=time.perf_counter() - started,
        steps=steps,
        epochs=epochs,
        embeddings=embeddings,
    )
