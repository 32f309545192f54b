"""MGDD's building blocks (PROTOCOL §8): the generator, analytical labels, the training loss,
and the adapter that brings a source dataset into the target's image space.

Kept apart from ``methods/mgdd.py`` (the method, its config and its meta-training) because
each piece is used in three places: meta-training, adaptation and deployment. Nothing here
draws from the global RNG on its own: callers pass seeds or generators.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd_bench.errors import ConfigError
from dd_bench.eval.krr import least_squares, linear_krr_predict
from dd_bench.nets import create_model, standard_layout

#: Images per no-grad forward pass on the CPU, where small chunks stay in cache (as DM's
#: ``CPU_REAL_CHUNK``); on a GPU the chunk is :data:`DEVICE_CHUNK`.
CPU_CHUNK = 32
DEVICE_CHUNK = 1024
#: ITU-R BT.601 luma weights: how the source adapter turns colour into grey.
LUMA = (0.299, 0.587, 0.114)


# -- the conditional generator ----------------------------------------------------------------
class ResidualGenerator(nn.Module):
    """g_ω: a small residual encoder-decoder (U-Net shaped) that starts as the identity.

    ``g(x) = x + head(decoder(encoder(x)))`` with ``head`` zero-initialised, so an unadapted
    generator returns its input exactly. The encoder halves the resolution ``levels`` times
    (stride-2 convolutions, doubling the width); the decoder upsamples back to the skip's exact
    size (nearest), so any image size works, odd ones included, and any channel count.
    Each image is mapped on its own (the set conditions the generator through its images).
    No normalisation layer: a per-image norm would erase the intensity the labels depend on.

    ``condition_dim`` > 0 also conditions each image's map on a vector of that length, its
    analytical soft label Y_s* = f_θ(X_s) W (a function of the initial image, so the generator
    still sees nothing but the initial set): a learned per-channel bias on the stem and on each
    encoder level, so one map can move images of different classes differently.
    """

    def __init__(self, channels: int, width: int = 32, levels: int = 2, condition_dim: int = 0):
        super().__init__()
        if channels < 1 or width < 1 or levels < 0 or condition_dim < 0:
            raise ConfigError(f"generator: invalid shape (channels={channels}, width={width}, levels={levels}, "
                              f"condition_dim={condition_dim})")
        self.channels, self.width, self.levels = int(channels), int(width), int(levels)
        self.condition_dim = int(condition_dim)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        widths = [width * 2**i for i in range(levels + 1)]
        self.down = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(levels))
        self.up = nn.ModuleList(nn.Conv2d(widths[i + 1] + widths[i], widths[i], 3, padding=1)
                                for i in reversed(range(levels)))
        self.head = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # One bias per level, from the condition (none when unconditioned).
        self.condition = (nn.ModuleList(nn.Linear(condition_dim, w, bias=False) for w in widths)
                          if condition_dim else None)

    def _bias(self, level: int, condition: Tensor | None) -> Tensor | float:
        if self.condition is None:
            return 0.0
        return self.condition[level](condition)[:, :, None, None]

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        if self.condition is not None and (condition is None or condition.shape != (x.shape[0], self.condition_dim)):
            got = None if condition is None else tuple(condition.shape)
            raise ValueError(f"generator: needs a ({x.shape[0]}, {self.condition_dim}) condition, got {got}")
        h = F.relu(self.stem(x) + self._bias(0, condition))
        skips = [h]
        for level, conv in enumerate(self.down, start=1):
            h = F.relu(conv(h) + self._bias(level, condition))
            skips.append(h)
        skips.pop()  # the deepest map is h itself
        for conv in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = F.relu(conv(torch.cat([h, skip], dim=1)))
        return x + self.head(h)

    def describe(self) -> dict[str, int]:
        return {"channels": self.channels, "width": self.width, "levels": self.levels,
                "condition_dim": self.condition_dim}


def make_generator_net(channels: int, width: int, levels: int, seed: int, condition_dim: int = 0) -> ResidualGenerator:
    """A generator whose initial weights are a function of ``seed`` (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResidualGenerator(channels, width, levels, condition_dim)


@torch.no_grad()
def generate(generator: nn.Module, images: Tensor, labels: Tensor, chunk: int = 256) -> Tensor:
    """``generator(images, labels)`` without a graph, in chunks (deployment at large IPCs);
    ``labels`` (Y_s*) are used only by a conditioned generator."""
    starts = range(0, images.shape[0], chunk)
    return torch.cat([generator(images[i : i + chunk], labels[i : i + chunk]) for i in starts])


# -- random feature nets ----------------------------------------------------------------------
def random_feature_net(model: str, channels: int, image_size: tuple[int, int], seed: int,
                       device: torch.device | str = "cpu") -> nn.Module:
    """A randomly initialised, frozen net (f_θ or θ*) whose ``embed`` gives the features.

    Drawn from ``seed`` alone (the global RNG is untouched), in train mode as DM's embedding
    net is (the default instance norm computes per image either way).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_model(model, channels, 2, tuple(image_size))  # the classifier is never used
    if not hasattr(net, "embed"):
        raise ConfigError(f"feature_model: invalid value {model!r} (the net has no embed(); use a ConvNet variant)")
    net.requires_grad_(False)
    return net.to(device).train()


@torch.no_grad()
def embed_in_chunks(net: nn.Module, images: Tensor, chunk: int | None = None) -> Tensor:
    """``net.embed(images)`` without a graph, a chunk at a time (all of a 60,000-image train
    set fits: only the (n, d) features are kept)."""
    if chunk is None:
        chunk = CPU_CHUNK if images.device.type == "cpu" else DEVICE_CHUNK
    return torch.cat([net.embed(standard_layout(images[i : i + chunk])) for i in range(0, images.shape[0], chunk)])


# -- analytical labels (poster Eq. 3) ---------------------------------------------------------
def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(labels.long(), num_classes).float()


def label_weights(features: Tensor, targets: Tensor, reg: float,
                  form: Literal["auto", "primal", "dual"] = "auto") -> Tensor:
    """W_t^θ of Eq. 3: ridge least squares from real features to one-hot labels, (d, K).

    ``dd_bench.eval.krr.least_squares`` with the trace-scaled ridge; ``auto`` solves the
    smaller system (primal d×d when there are more images than features, so all of a large
    train set costs one d×d Cholesky). Solved in float64: the Gram of 60,000 images is summed
    over many terms.
    """
    return least_squares(features.double(), targets.double(), reg=reg, form=form).float()


def analytical_labels(net: nn.Module, images: Tensor, weights: Tensor) -> Tensor:
    """Y_s* = f_θ(X_s) W_t^θ (Eq. 3): soft labels of the synthetic initialisation."""
    return embed_in_chunks(net, images) @ weights


# -- the training loss (poster Eq. 1) ---------------------------------------------------------
def krr_loss(net: nn.Module, real: Tensor, real_targets: Tensor, synthetic: Tensor, synthetic_targets: Tensor,
             reg: float) -> Tensor:
    """Eq. 1: ‖K_ts (K_ss + λI)⁻¹ Y_s* − Y_t‖² in the features of ``net`` (a fresh θ*).

    Kernel ridge regression from the synthetic set (with its analytical labels) predicts the
    real batch's one-hot labels; the squared error is summed over classes and averaged over
    real images. Differentiable w.r.t. ``synthetic`` only (the real features carry no graph).
    """
    return krr_loss_given_real(net, embed_in_chunks(net, real), real_targets, synthetic, synthetic_targets, reg)


def krr_loss_given_real(net: nn.Module, real_features: Tensor, real_targets: Tensor, synthetic: Tensor,
                        synthetic_targets: Tensor, reg: float) -> Tensor:
    """:func:`krr_loss` with the real batch's features in ``net`` already computed (a probe that
    scores many sets against one fixed real batch embeds it once)."""
    synthetic_features = net.embed(standard_layout(synthetic))
    predicted = linear_krr_predict(real_features, synthetic_features, synthetic_targets, reg=reg)
    return (predicted - real_targets).pow(2).sum(dim=1).mean()


# -- the source adapter -----------------------------------------------------------------------
def target_space(data) -> dict:
    """What the source adapter maps into: the target's channels, size, normalisation and ZCA
    (the ZCA transform is fit on the target's train set, so it is named by the target's
    fingerprint)."""
    space = {"channels": int(data.channels), "image_size": list(data.image_size),
             "mean": [float(m) for m in data.mean], "std": [float(s) for s in data.std], "zca": None}
    if data.zca is not None:
        space["zca"] = {"mode": data.zca.mode, "reg": float(data.zca.reg), "target_fingerprint": data.fingerprint()}
    return space


def adapt_images(images: Tensor, source, target, chunk: int = 4096) -> Tensor:
    """Bring normalised ``images`` of dataset ``source`` into ``target``'s normalised space.

    1. back to pixels in [0, 1] (``source.denormalise``: undoes the source's ZCA and mean/std);
    2. grey ↔ colour: grey is repeated to every channel, colour becomes BT.601 luma (other
       channel mismatches are an error);
    3. resized to the target's size (bilinear, antialiased when shrinking);
    4. normalised with the target's mean/std, then the target's ZCA when it has one.
    """
    c_in, c_out = source.channels, target.channels
    if c_in != c_out and (c_in, c_out) not in ((1, 3), (3, 1)):
        raise ConfigError(f"source: cannot adapt {c_in}-channel images of '{source.name}' to {c_out} channels")
    size = tuple(target.image_size)
    mean = torch.tensor(target.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(target.std, dtype=torch.float32).view(1, -1, 1, 1)
    out = []
    for start in range(0, images.shape[0], chunk):
        x = source.denormalise(images[start : start + chunk].cpu().float())
        if c_in == 1 and c_out > 1:
            x = x.expand(-1, c_out, -1, -1)
        elif c_in == 3 and c_out == 1:
            x = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != size:
            shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        x = (x - mean) / std
        if target.zca is not None:
            x = target.zca.to("cpu").transform(x)
        out.append(x.contiguous())
    return torch.cat(out)
