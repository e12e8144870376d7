"""Train a tiny CLIP on synthetic image-caption pairs with DistributedDataParallel.

The example shows that the losses of this package replace an open_clip-style ``ClipLoss`` in one line:
both take the same distributed constructor arguments and the same ``(image_features, text_features,
logit_scale)`` call. ``--loss`` picks the loss, and everything else stays the same::

    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    loss_fn = VarianceAwareInfoNCE(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

Launch on two CPU processes (gloo on the loopback interface)::

    GLOO_SOCKET_IFNAME=lo .venv/bin/torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29500 \\
        examples/clip_ddp/train.py --loss variance --steps 200

Without ``torchrun`` it trains in one process. The data are synthetic and generated offline: each image
is a 3x16x16 tensor rendered from a random latent vector, and each of its two captions is a bag of 8
tokens drawn from a distribution set by the same latent. ``--image-ids`` passes each pair's image index
as ``image_ids``, so that two captions of one image in a global batch are positives of each other.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_functional
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import adaptive_contrastive as ac

IMAGE_SHAPE = (3, 16, 16)
LATENT_SIZE = 16
VOCABULARY_SIZE = 256
CAPTION_LENGTH = 8
CAPTIONS_PER_IMAGE = 2
EMBEDDING_SIZE = 32


class ClipLoss(nn.Module):
    """The CLIP loss with open_clip's distributed options, written out for comparison.

    Every rank gathers the features of all ranks. With ``local_loss`` it scores its own rows against
    all columns, otherwise the whole ``N x N`` matrix. With ``gather_with_grad`` the gather
    (``torch.distributed.nn.functional.all_gather``) passes gradients back to the other ranks. Without it
    the gathered rows of other ranks are constants. All ranks must have the same batch size.
    """

    def __init__(self, *, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def gather(self, features: Tensor) -> Tensor:
        if self.gather_with_grad:
            with warnings.catch_warnings():
                # torch 2.13 marks this autograd-aware all_gather as deprecated, but it is still correct on gloo.
                warnings.simplefilter("ignore", FutureWarning)
                return torch.cat(distributed_functional.all_gather(features))

        gathered = [torch.empty_like(features) for _ in range(self.world_size)]
        dist.all_gather(gathered, features.detach())
        gathered[self.rank] = features
        return torch.cat(gathered)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        batch_size = image_features.shape[0]
        labels = torch.arange(batch_size, device=image_features.device)
        if self.world_size == 1:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logits_per_image.T
        else:
            all_image_features = self.gather(image_features)
            all_text_features = self.gather(text_features)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text_features.T
                logits_per_text = logit_scale * text_features @ all_image_features.T
                labels = labels + self.rank * batch_size
            else:
                logits_per_image = logit_scale * all_image_features @ all_text_features.T
                logits_per_text = logits_per_image.T
                labels = torch.arange(logits_per_image.shape[0], device=image_features.device)

        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


# The one line that changes between losses: every entry takes the same constructor arguments.
LOSSES = {
    "clip": ClipLoss,
    "symmetric": ac.SymmetricInfoNCE,
    "variance": ac.VarianceAwareInfoNCE,
    "entropy": ac.EntropyWeighted,
    "spread": ac.SpreadWeighted,
}


class TinyClip(nn.Module):
    """A two-layer CNN image tower, a bag-of-tokens text tower and CLIP's learned logit scale."""

    def __init__(self) -> None:
        super().__init__()
        self.image_tower = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, EMBEDDING_SIZE),
        )
        self.token_embedding = nn.EmbeddingBag(VOCABULARY_SIZE, 64, mode="mean")
        self.text_head = nn.Sequential(nn.ReLU(), nn.Linear(64, EMBEDDING_SIZE))
        # CLIP initialises the temperature to 0.07 and learns its log.
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images: Tensor, captions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image_features = F.normalize(self.image_tower(images), dim=-1)
        text_features = F.normalize(self.text_head(self.token_embedding(captions)), dim=-1)
        return image_features, text_features, self.log_logit_scale.exp()


def make_pairs(num_images: int, captions_per_image: int, seed: int) -> TensorDataset:
    """Render ``num_images`` synthetic images with ``captions_per_image`` captions each.

    Returns:
        A dataset of ``(image, caption, image_id)``: float32 ``IMAGE_SHAPE`` images, int64
        ``(CAPTION_LENGTH,)`` token ids and the int64 index of the image.
    """
    # The renderers are fixed by a constant seed, so that training and evaluation data share them.
    renderer = torch.Generator().manual_seed(0)
    image_renderer = torch.randn(math.prod(IMAGE_SHAPE), LATENT_SIZE, generator=renderer) / math.sqrt(LATENT_SIZE)
    token_renderer = 3.0 * torch.randn(VOCABULARY_SIZE, LATENT_SIZE, generator=renderer) / math.sqrt(LATENT_SIZE)

    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(num_images, LATENT_SIZE, generator=generator)
    images = torch.tanh(latents @ image_renderer.T).reshape(num_images, *IMAGE_SHAPE)
    token_probabilities = torch.softmax(latents @ token_renderer.T, dim=-1)

    image_ids = torch.arange(num_images).repeat_interleave(captions_per_image)
    pair_images = images[image_ids] + 0.1 * torch.randn(len(image_ids), *IMAGE_SHAPE, generator=generator)
    captions = torch.multinomial(token_probabilities[image_ids], CAPTION_LENGTH, replacement=True, generator=generator)
    return TensorDataset(pair_images, captions, image_ids)


@torch.no_grad()
def recall_at_1(model: TinyClip, pairs: TensorDataset) -> float:
    """Return the image-to-text recall@1 on ``pairs``, one caption per image."""
    images, captions, _ = pairs.tensors
    image_features, text_features, _ = model(images, captions)
    predictions = (image_features @ text_features.T).argmax(dim=1)
    return (predictions == torch.arange(len(predictions))).float().mean().item()


def mean_over_ranks(value: Tensor, world_size: int) -> float:
    """Return the mean of a 0-d tensor over all ranks, for logging."""
    value = value.detach().clone()
    if world_size > 1:
        dist.all_reduce(value)
        value /= world_size
    return value.item()


@torch.no_grad()
def compare_with_clip_loss(model: TinyClip, images: Tensor, captions: Tensor, args: argparse.Namespace, rank: int, world_size: int) -> None:
    """Print ClipLoss and SymmetricInfoNCE on one batch: with equal weights they are the same loss.

    Every rank must call this, because both losses gather across ranks.
    """
    options = {"local_loss": args.local_loss, "gather_with_grad": args.gather_with_grad, "rank": rank, "world_size": world_size}
    image_features, text_features, logit_scale = model(images, captions)
    clip_loss = mean_over_ranks(ClipLoss(**options)(image_features, text_features, logit_scale), world_size)
    symmetric_loss = mean_over_ranks(ac.SymmetricInfoNCE(**options)(image_features, text_features, logit_scale), world_size)
    if rank == 0:
        print(
            f"first batch: ClipLoss={clip_loss:.6f} SymmetricInfoNCE={symmetric_loss:.6f} "
            f"difference={abs(clip_loss - symmetric_loss):.1e}",
            flush=True,
        )


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=sorted(LOSSES), default="variance", help="loss to train with (default: variance)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per rank and step (default: 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    parser.add_argument("--num-images", type=int, default=2048, help="training images, two captions each (default: 2048)")
    parser.add_argument("--local-loss", action="store_true", help="score each rank's rows against all columns only")
    parser.add_argument(
        "--no-gather-with-grad",
        dest="gather_with_grad",
        action="store_false",
        help="detach the features gathered from other ranks, as open_clip does by default",
    )
    parser.add_argument(
        "--image-ids",
        action="store_true",
        help="pass each pair's image index as image_ids, so captions of one image are positives (not with --loss clip)",
    )
    parser.add_argument("--log-every", type=int, default=50, help="steps between log lines (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the model (default: 0)")
    args = parser.parse_args(argv)

    if args.image_ids and args.loss == "clip":
        parser.error("--image-ids needs one of this package's losses, because ClipLoss has no image_ids argument.")
    if args.steps < 1 or args.batch_size < 2:
        parser.error(f"--steps must be >= 1 and --batch-size >= 2, got {args.steps} and {args.batch_size}.")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)

    # torchrun sets WORLD_SIZE and the rendezvous variables. Without torchrun this is a single process.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1

    torch.manual_seed(args.seed)
    model = TinyClip()
    trained: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    loss_fn = LOSSES[args.loss](local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, rank=rank, world_size=world_size)

    train_pairs = make_pairs(args.num_images, CAPTIONS_PER_IMAGE, seed=args.seed)
    test_pairs = make_pairs(512, 1, seed=args.seed + 1)
    sampler = DistributedSampler(train_pairs, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_pairs, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    if rank == 0:
        print(
            f"loss={args.loss} world_size={world_size} batch={args.batch_size}x{world_size} local_loss={args.local_loss} "
            f"gather_with_grad={args.gather_with_grad} image_ids={args.image_ids} recall@1 before={recall_at_1(model, test_pairs):.3f}",
            flush=True,
        )

    first_images, first_captions, _ = next(iter(loader))
    compare_with_clip_loss(model, first_images, first_captions, args, rank, world_size)

    step = 0
    epoch = 0
    start = time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for images, captions, image_ids in loader:
            image_features, text_features, logit_scale = trained(images, captions)
            if args.image_ids:
                loss = loss_fn(image_features, text_features, logit_scale, image_ids=image_ids)
            else:
                loss = loss_fn(image_features, text_features, logit_scale)

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                # CLIP clamps the scale at 100 so that the logits cannot grow without bound.
                model.log_logit_scale.clamp_(0.0, math.log(100.0))
            step += 1

            # In the local-loss layout each rank returns its share, and the mean over ranks is the loss.
            mean_loss = mean_over_ranks(loss, world_size)
            if rank == 0 and (step % args.log_every == 0 or step == args.steps):
                weights = ""
                if isinstance(loss_fn, ac.AdaptiveInfoNCE):
                    weights = " weights=({:.3f}, {:.3f})".format(*loss_fn.weights.tolist())
                print(f"step {step:4d} loss={mean_loss:.4f} logit_scale={logit_scale.item():.2f}{weights}", flush=True)
            if step == args.steps:
                break
        epoch += 1

    if rank == 0:
        elapsed = time.perf_counter() - start
        print(f"done: {args.steps} steps in {elapsed:.1f} s, recall@1 after={recall_at_1(model, test_pairs):.3f}", flush=True)

    if distributed:
        # gloo can abort at teardown while a peer still sends, so meet before destroying the group.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
