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
from hsci.parts.pretrained import known_model, timm_file, torch_hub_file

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
            path = torch_hub_file(weights.url, f"model.arch={arch} model.pretrained=true")
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
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


def timm(input_shape: tuple[int, ...], num_outputs: int, name: str, pretrained: bool, drop_rate: float) -> nn.Module:
    """Any of timm's models by name (`timm.list_models()`), for the dataset's channels and classes.

    Without pretrained weights, a model that takes an image size (vision transformers and their kin) is made for the
    dataset's; other architectures take any size their downsampling leaves room for (tried here on one image). With
    `pretrained`, timm's weights are loaded and the model carries `pretrained_input`: inputs get the weights' own
    resize and normalisation, grayscale repeated to RGB.
    """
    from timm import create_model
    from timm.data import resolve_data_config

    c, h, w = _image_shape(input_shape, "timm")
    known_model(name)
    settings = {"num_classes": num_outputs, "drop_rate": drop_rate}
    if pretrained:
        loads = not _restoring.get()
        overlay = {"file": str(timm_file(name))} if loads else None
        model = create_model(name, pretrained=loads, pretrained_cfg_overlay=overlay, **settings)
        size = resolve_data_config({}, model=model)
        model.pretrained_input = {"size": size["input_size"][-1], "channels": 3, "mean": tuple(size["mean"]),
                                  "std": tuple(size["std"])}
        return model
    try:
        try:
            model = create_model(name, in_chans=c, img_size=(h, w), **settings)
        except TypeError as e:  # an architecture without a fixed image size
            if "img_size" not in str(e):
                raise
            model = create_model(name, in_chans=c, **settings)
        with torch.no_grad():
            model.eval()(torch.zeros(1, c, h, w))
    except (RuntimeError, AssertionError, ValueError) as e:  # what timm's layers raise for sizes they cannot take
        raise UserError(f"model=timm model.name={name} cannot take {h}x{w} images ({str(e).splitlines()[0][:120]}): "
                        "use larger images (data.image_size for imagefolder), another model, or model.pretrained=true "
                        "(inputs resized to the weights' size)") from e
    return model.train()
