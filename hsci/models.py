"""Models. Each `conf/model/<name>.yaml` calls one function here.

Every builder takes the dataset's `input_shape` and `num_outputs` (passed by hsci/parts/build.py, never typed
by the user) and returns an `nn.Module` that maps a batch to logits (or to regression values). torchvision is
imported by the builders of its models, when they run.
"""

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from hsci import UserError

# Set while a model is built to take a checkpoint's weights (eval, resume, predict): pretrained weights are not
# fetched, as the checkpoint holds them; the model keeps the input those weights expect.
_restoring = ContextVar("restoring", default=False)


@contextmanager
def restoring():
    """Build models whose weights a checkpoint will give: no pretrained weights are fetched meanwhile."""
    token = _restoring.set(True)
    try:
        yield
    finally:
        _restoring.reset(token)


def mlp(input_shape: tuple[int, ...], num_outputs: int, hidden: list[int], dropout: float) -> nn.Module:
    """A multilayer perceptron on the flattened input."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], num_outputs: int, hidden: int, dropout: float, conv_dropout: float) -> nn.Module:
    """The classic MNIST network: two 3x3 convs (32, 64 channels), 2x2 max-pool, a hidden layer, logits."""
    c, h, w = _image_shape(input_shape, "cnn")
    if min(h, w) < 6:
        raise UserError(f"model=cnn needs images of at least 6x6 pixels, got {h}x{w}: use model=mlp")
    flat = 64 * ((h - 4) // 2) * ((w - 4) // 2)  # two unpadded 3x3 convs, then the 2x2 pool
    return nn.Sequential(
        nn.Conv2d(c, 32, 3), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(conv_dropout), nn.Flatten(),
        nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_outputs))


def resnet(input_shape: tuple[int, ...], num_outputs: int, arch: str, pretrained: bool) -> nn.Module:
    """A torchvision ResNet. Small inputs without pretrained weights get the CIFAR stem (3x3 conv, no pool).

    With `pretrained`, the ImageNet weights are loaded and the model carries `pretrained_input`, the
    resize and normalisation those weights expect, which hsci/parts/build.py applies to every batch.
    """
    from torchvision import models as tvm

    c, h, w = _image_shape(input_shape, arch)
    if pretrained:
        weights = tvm.get_model_weights(arch).DEFAULT
        model = tvm.get_model(arch)
        if not _restoring.get():
            model.load_state_dict(_download(weights.url, arch))
        model.fc = nn.Linear(model.fc.in_features, num_outputs)
        t = weights.transforms()
        model.pretrained_input = {"size": t.crop_size[0], "channels": 3, "mean": tuple(t.mean), "std": tuple(t.std)}
        return model
    model = tvm.get_model(arch, num_classes=num_outputs)
    if min(h, w) < 64:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def vit(input_shape: tuple[int, ...], num_outputs: int, patch_size: int | None, num_layers: int, num_heads: int,
        hidden_dim: int, mlp_dim: int, dropout: float) -> nn.Module:
    """A small torchvision VisionTransformer; `patch_size: null` cuts the image into about 8 x 8 patches."""
    from torchvision.models import VisionTransformer

    c, h, w = _image_shape(input_shape, "vit")
    if h != w:
        raise UserError(f"model=vit needs square images, got {h}x{w}: resize them (data.image_size for imagefolder)")
    patch = patch_size or min((p for p in range(1, h + 1) if h % p == 0), key=lambda p: abs(h // p - 8))
    if h % patch:
        raise UserError(f"model.patch_size={patch} does not divide the image size {h}: pick a divisor or null")
    model = VisionTransformer(image_size=h, patch_size=patch, num_layers=num_layers, num_heads=num_heads,
                              hidden_dim=hidden_dim, mlp_dim=mlp_dim, dropout=dropout, num_classes=num_outputs)
    if c != 3:
        model.conv_proj = nn.Conv2d(c, hidden_dim, kernel_size=patch, stride=patch)
    return model


def _image_shape(input_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise UserError(f"model={name} needs images, but this dataset gives feature vectors of shape "
                        f"{tuple(input_shape)}: use model=mlp")
    return input_shape


def _download(url: str, arch: str) -> dict:
    """Pretrained weights from torch's hub cache, downloaded once; loaded as tensors only, never as code."""
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
    except OSError as e:
        raise UserError(f"model.pretrained=true: could not get the {arch} ImageNet weights ({e}); put "
                        f"{url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints or set model.pretrained=false") from e
