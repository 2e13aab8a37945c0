"""Small models for the demo, the tests and the benchmarks, and a Lightning ``Classifier`` around them.

* :class:`SmallCNN`: conv-BN-ReLU blocks with max pooling, global average pooling and a linear head.
* :func:`small_resnet`: a CIFAR-style pre-activation ResNet (depth ``6n + 2``: 8, 14, 20, ...);
  :func:`resnet18_cifar`: the pre-activation ResNet-18 of the paper's CIFAR runs (benchmarks, GPU).
  With ``norm="ln"`` both use the paper's layer-normalized variant: ``GroupNorm(1, C)`` (a
  channel-first LayerNorm) and weight-standardized convolutions (:class:`WSConv2d`).
* :class:`TinyTransformer`: a pre-norm transformer (``batch_first``, ``LayerNorm`` over the last
  dimension) on image patches or token ids, for layer-norm ghost noise.

Example:
    >>> import torch
    >>> SmallCNN(width=8)(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> small_resnet(depth=8, width=8)(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> small_resnet(depth=8, width=8, norm="ln")(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> TinyTransformer(dim=16, depth=1, heads=2)(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ghostnoise.experiments.lr_schedule import WarmupCosine

__all__ = [
    "MODELS",
    "Classifier",
    "PreActBlock",
    "PreActResNet",
    "SmallCNN",
    "NORMS",
    "TinyTransformer",
    "WSConv2d",
    "build_model",
    "resnet18_cifar",
    "small_resnet",
]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Five conv-BN-ReLU blocks (widths ``w, w, 2w, 2w, 4w``), two 2x2 max pools, average pool, linear.

    Works for any input size ``>= 4`` pixels (28x28 Fashion-MNIST: 28 -> 14 -> 7 -> pooled).

    Args:
        num_classes: output logits.
        in_channels: input channels (1 for grey images).
        width: ``w``, the first block's channels.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w),
            _conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            _conv_bn_relu(w, 2 * w),
            _conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


#: Normalization families of :class:`PreActResNet`: ``"bn"`` (BatchNorm) or ``"ln"`` (GroupNorm(1, C) + WSConv2d).
NORMS = ("bn", "ln")
Norm = Literal["bn", "ln"]


class WSConv2d(nn.Conv2d):
    """A :class:`torch.nn.Conv2d` with weight standardization (Qiao et al., 2019).

    Each output filter's weights are standardized to zero mean and unit variance over
    ``(in_channels, kh, kw)`` before the convolution. Without batch statistics, this keeps a
    layer-normalized ResNet trainable; the paper pairs it with ``GroupNorm(1, C)``. Same parameters
    (and ``state_dict`` keys) as a plain ``Conv2d``.

    Example:
        >>> conv = WSConv2d(3, 8, 3, padding=1, bias=False)
        >>> conv(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 8, 8, 8])
    """

    def __init__(self, *args: Any, ws_eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def standardized_weight(self) -> Tensor:
        """The weight with each output filter standardized (zero mean, unit variance)."""
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) * torch.rsqrt(var + self.ws_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(repr(n) for n in NORMS)}, got {norm!r}.")
    return norm


def _norm_layer(norm: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "bn" else nn.GroupNorm(1, channels)


def _conv(norm: str, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    cls = nn.Conv2d if norm == "bn" else WSConv2d
    return cls(cin, cout, kernel, stride=stride, padding=padding, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation residual block: norm-ReLU-conv3x3-norm-ReLU-conv3x3 plus the shortcut.

    The shortcut is the identity, or a strided 1x1 convolution of the pre-activated input when the
    shape changes (He et al., 2016, "Identity Mappings in Deep Residual Networks"). ``norm="bn"``:
    BatchNorm and plain convolutions; ``norm="ln"``: ``GroupNorm(1, C)`` and :class:`WSConv2d`.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: Norm = "bn") -> None:
        super().__init__()
        _check_norm(norm)
        self.bn1 = _norm_layer(norm, cin)
        self.conv1 = _conv(norm, cin, cout, 3, stride=stride, padding=1)
        self.bn2 = _norm_layer(norm, cout)
        self.conv2 = _conv(norm, cout, cout, 3, padding=1)
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or cin != cout:
            self.shortcut = _conv(norm, cin, cout, 1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Pre-activation ResNet: a 3x3 stem conv, stages of :class:`PreActBlock` (stage ``i`` has width
    ``width * 2**i`` and stride 1 for the first stage, 2 after), then norm-ReLU, average pooling and
    a linear head.

    Args:
        stage_blocks: blocks per stage; an int ``n`` means three stages of ``n`` (CIFAR-style).
        width: the first stage's channels.
        in_channels: input channels.
        num_classes: output logits.
        norm: ``"bn"`` (BatchNorm2d) or ``"ln"`` (the paper's layer-normalized variant:
            ``GroupNorm(1, C)`` with weight-standardized convolutions).
    """

    def __init__(
        self,
        stage_blocks: Union[int, Sequence[int]] = 1,
        width: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
        norm: Norm = "bn",
    ) -> None:
        super().__init__()
        _check_norm(norm)
        stages = (stage_blocks,) * 3 if isinstance(stage_blocks, int) else tuple(stage_blocks)
        if not stages or any(n < 1 for n in stages):
            raise ValueError(f"PreActResNet: every stage needs >= 1 block, got {stage_blocks!r}.")
        self.norm = norm
        self.stem = _conv(norm, in_channels, width, 3, padding=1)
        layers = []
        cin = width
        for stage, n in enumerate(stages):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(PreActBlock(cin, width * 2**stage, stride, norm))
                cin = width * 2**stage
        self.blocks = nn.Sequential(*layers)
        self.bn = _norm_layer(norm, cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.stem(x))
        out = F.relu(self.bn(out))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def small_resnet(
    depth: int = 8, width: int = 16, in_channels: int = 1, num_classes: int = 10, norm: Norm = "bn"
) -> PreActResNet:
    """A CIFAR-style pre-activation ResNet of ``depth = 6n + 2`` layers (8, 14, 20, ...), ``n`` blocks per stage.

    ``norm="ln"`` gives the layer-normalized variant (``GroupNorm(1, C)``, weight-standardized convolutions).

    Example:
        >>> sum(p.numel() for p in small_resnet(8, 16).parameters())
        77562
        >>> sum(p.numel() for p in small_resnet(8, 16, norm="ln").parameters())
        77562
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"small_resnet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth!r}.")
    return PreActResNet((depth - 2) // 6, width, in_channels, num_classes, norm)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, width: int = 64, norm: Norm = "bn") -> PreActResNet:
    """Pre-activation ResNet-18 for 32x32 images (3x3 stem, no max pool; stages 2-2-2-2, widths 64-512).

    The network of the paper's CIFAR experiments and of the pilot in the design notes (11.2M parameters).

    Example:
        >>> sum(p.numel() for p in resnet18_cifar().parameters())
        11172170
    """
    return PreActResNet((2, 2, 2, 2), width, in_channels, num_classes, norm)


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A tiny pre-norm transformer classifier; every activation is ``(B, T, D)`` (``batch_first``).

    Inputs are images ``(B, C, H, W)`` cut into ``patch_size`` patches (a ViT), or, with
    ``vocab_size`` set, token ids ``(B, T)`` (at most ``max_tokens``). The ``LayerNorm`` layers
    normalize the last dimension, so layer-norm ghost noise treats tokens as spatial positions.
    Output: logits ``(B, num_classes)`` from the mean over tokens.

    Args:
        num_classes: output logits.
        in_channels: image channels (ignored with ``vocab_size``).
        image_size: image side; must be a multiple of ``patch_size``.
        patch_size: patch side.
        dim: token width ``D``.
        depth: transformer blocks.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden width over ``dim``.
        dropout: dropout in attention and MLP.
        vocab_size: token vocabulary; ``None`` for image input.
        max_tokens: the longest token sequence (token input only).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 7,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        vocab_size: Optional[int] = None,
        max_tokens: int = 64,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"TinyTransformer: heads ({heads}) must divide dim ({dim}).")
        self.vocab_size = vocab_size
        if vocab_size is None:
            if image_size % patch_size:
                raise ValueError(
                    f"TinyTransformer: image_size {image_size} is not a multiple of patch_size {patch_size}."
                )
            self.embed: nn.Module = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
            tokens = (image_size // patch_size) ** 2
        else:
            self.embed = nn.Embedding(vocab_size, dim)
            tokens = max_tokens
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.vocab_size is None:
            if x.dim() != 4:
                raise ValueError(f"TinyTransformer expects images (B, C, H, W), got shape {tuple(x.shape)}.")
            tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, T, D)
        else:
            if x.dim() != 2:
                raise ValueError(f"TinyTransformer expects token ids (B, T), got shape {tuple(x.shape)}.")
            tokens = self.embed(x)
        if tokens.shape[1] > self.pos.shape[1]:
            raise ValueError(f"TinyTransformer: {tokens.shape[1]} tokens, at most {self.pos.shape[1]} supported.")
        h = self.blocks(tokens + self.pos[:, : tokens.shape[1]])
        return self.head(self.norm(h).mean(1))


#: Model names accepted by :func:`build_model` and :class:`Classifier`. ``*_ln``: the layer-normalized
#: ResNets (``GroupNorm(1, C)`` + :class:`WSConv2d`); ``vit``: :class:`TinyTransformer` on 7x7 patches.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "small_resnet": small_resnet,
    "resnet8": lambda **kw: small_resnet(depth=8, **kw),
    "resnet8_ln": lambda **kw: small_resnet(depth=8, **{"norm": "ln", **kw}),
    "resnet18": resnet18_cifar,
    "resnet18_ln": lambda **kw: resnet18_cifar(**{"norm": "ln", **kw}),
    "tiny_transformer": TinyTransformer,
    "vit": TinyTransformer,
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, **kwargs: Any) -> nn.Module:
    """Build a model of :data:`MODELS` by name (``kwargs`` go to its constructor).

    Example:
        >>> type(build_model("resnet8", width=8)).__name__
        'PreActResNet'
    """
    key = name.lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"Unknown model {name!r}: choose one of {', '.join(MODELS)}.")
    return MODELS[key](num_classes=num_classes, in_channels=in_channels, **kwargs)


class Classifier(pl.LightningModule):
    """Image classification with cross-entropy, SGD and a per-step cosine (or one-cycle) learning rate.

    Logs ``train_loss`` and ``train_acc`` (per epoch, in training mode: with augmentation and noise),
    ``val_loss``/``val_acc`` and ``test_loss``/``test_acc``. Accuracies are torchmetrics'
    ``MulticlassAccuracy`` with ``average="micro"`` (the fraction of correct predictions).

    Args:
        model: a name from :data:`MODELS` (``"small_cnn"``, ``"small_resnet"``, ``"resnet8"``,
            ``"resnet8_ln"``, ``"resnet18"``, ``"resnet18_ln"``, ``"tiny_transformer"`` or its alias
            ``"vit"``) or a ready ``nn.Module``.
        num_classes: classes (10 for Fashion-MNIST).
        in_channels: image channels.
        model_kwargs: extra constructor arguments of the named model (e.g. ``{"width": 16}``).
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        nesterov: Nesterov momentum.
        scheduler: ``"cosine"`` (per-step cosine decay to 0), ``"onecycle"`` or ``"none"``.
        max_epochs_hint: epochs to plan the schedule for when the trainer has no finite length
            (``max_epochs=-1`` and no ``max_steps``); otherwise the trainer's length is used.
        label_smoothing: cross-entropy label smoothing.
        warmup_epochs: linear learning-rate warm-up from 0 over this many epochs (may be fractional),
            then the ``scheduler``'s decay over the remaining steps; ``0``: none.

    Example:
        >>> clf = Classifier("small_cnn", model_kwargs={"width": 8})
        >>> clf(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: Union[str, nn.Module] = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        model_kwargs: Optional[Dict[str, Any]] = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        scheduler: Literal["cosine", "onecycle", "none"] = "cosine",
        max_epochs_hint: Optional[int] = None,
        label_smoothing: float = 0.0,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        if not (isinstance(warmup_epochs, (int, float)) and math.isfinite(warmup_epochs) and warmup_epochs >= 0):
            raise ValueError(f"warmup_epochs must be a number >= 0, got {warmup_epochs!r}.")
        if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
        if scheduler not in ("cosine", "onecycle", "none"):
            raise ValueError(f"scheduler must be 'cosine', 'onecycle' or 'none', got {scheduler!r}.")
        if warmup_epochs and scheduler != "cosine":
            raise ValueError(
                f"warmup_epochs applies to the cosine scheduler, got scheduler={scheduler!r} (onecycle warms up by "
                "itself; 'none' keeps the learning rate constant)."
            )
        if isinstance(model, nn.Module):
            self.save_hyperparameters(ignore=["model"])
            self.model = model
        else:
            self.save_hyperparameters()
            self.model = build_model(model, num_classes, in_channels, **(model_kwargs or {}))
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams["label_smoothing"])
        metric(logits, y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "train", batch_size=len(y))
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def _total_steps(self) -> Optional[int]:
        total = self.trainer.estimated_stepping_batches
        if math.isfinite(total):
            return max(int(total), 1)
        hint = self.hparams["max_epochs_hint"]
        if hint is None:
            return None
        loader = self.trainer.train_dataloader
        try:
            per_epoch = len(loader)  # type: ignore[arg-type]  # a sized loader, or TypeError below
        except TypeError:
            return None
        return max(int(hint) * per_epoch // max(self.trainer.accumulate_grad_batches, 1), 1)

    def _warmup_steps(self, total: int) -> int:
        warmup = float(self.hparams.get("warmup_epochs", 0.0) or 0.0)
        if warmup == 0:
            return 0
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        epochs = epochs or self.hparams["max_epochs_hint"]
        if not epochs:
            rank_zero_warn(
                "Classifier: warmup_epochs needs max_epochs (or max_epochs_hint) to count steps: no warm-up."
            )
            return 0
        return min(int(round(total * warmup / epochs)), total)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay: List[nn.Parameter] = []
        no_decay: List[nn.Parameter] = []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        # no weight decay on norm-layer affines and biases (they are 1-d)
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp["lr"],
            momentum=hp["momentum"],
            nesterov=hp["nesterov"],
        )
        if hp["scheduler"] == "none":
            return optimizer
        total = self._total_steps()
        if total is None:
            rank_zero_warn(
                "Classifier: the training length is unknown (max_epochs=-1, no max_steps, no max_epochs_hint): "
                "using a constant learning rate."
            )
            return optimizer
        warmup = self._warmup_steps(total)
        if hp["scheduler"] == "cosine":
            sched: Any = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total))
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp["lr"], total_steps=total + 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
