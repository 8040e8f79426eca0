"""Where pretrained weights come from, fetched before a run directory is made (`fetch`) and found again by the
builders (hsci/models.py): torch's hub cache for torchvision's weights (and timm's older ones), the Hugging Face
hub's cache for timm's. A file in the cache is used without asking the network; one that is not is downloaded
when the network answers within `PROBE_S` seconds, and refused in one line naming the cache when it does not
(rather than after the minute of retries a hub client spends offline). Weights are read as tensors only."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from hsci import UserError

PROBE_S = 5  # how long the network may take to answer before the weights count as out of reach
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hugging Face repositories hold, in its order


def reachable(url: str) -> bool:
    """Whether `url`'s server answers at all (any HTTP status counts), through the user's proxies."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_S).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def torch_hub_file(url: str, what: str) -> Path:
    """The file at `url` in torch's hub cache (<TORCH_HOME>/hub/checkpoints), downloaded once."""
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    if not reachable(url):
        raise UserError(f"{what}: the weights are not in {path.parent} and {url.split('/')[2]} does not answer: "
                        f"put {path.name} there (from a machine with a network), or give a local file with "
                        "model.weights=<file>, or set model.pretrained=false")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=None, progress=False)
    except Exception as e:  # a download cut short leaves no file behind (torch writes to a temporary file)
        raise UserError(f"{what}: downloading {url} failed ({type(e).__name__}: {e}); try again, or give a local "
                        "file with model.weights=<file>") from e
    return path


def hf_hub_file(repo: str, what: str) -> Path:
    """A timm repository's weights file in the Hugging Face hub's cache, downloaded once."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    for name in HF_FILES:
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return Path(cached)
    if constants.HF_HUB_OFFLINE or not reachable(constants.ENDPOINT):
        raise UserError(f"{what}: the weights of {repo} are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                        f"and {constants.ENDPOINT} cannot be reached: fetch them there on a machine with a network "
                        f"(python -c \"import timm; timm.create_model('{repo.split('/')[-1]}', pretrained=True)\") and "
                        "copy the cache, or give a local file with model.weights=<file>, or set model.pretrained=false")
    errors = []
    for name in HF_FILES:
        try:
            return Path(hf_hub_download(repo, name))
        except Exception as e:  # not in this repository (the next name may be), or the download failed
            errors.append(f"{name}: {type(e).__name__}")
    raise UserError(f"{what}: could not download the weights of {repo} ({'; '.join(errors)}); try again, or give a "
                    "local file with model.weights=<file>")


def timm_file(name: str) -> Path:
    """The pretrained weights file of timm model `name` (its default tag, or the one the name gives)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    what = f"model.name={name} model.pretrained=true"
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"{what}: timm has no pretrained weights for {name}: pick a name that has them "
                        "(timm.list_models(pretrained=True)) or set model.pretrained=false")
    return hf_hub_file(cfg.hf_hub_id, what) if cfg.hf_hub_id else torch_hub_file(cfg.url, what)


def torchvision_url(arch: str) -> str:
    """Where torchvision's default ImageNet weights for `arch` are downloaded from."""
    from torchvision import models as tvm

    return tvm.get_model_weights(arch).DEFAULT.url


def fetch(target: str, settings: dict) -> None:
    """Get the pretrained weights that hsci's own model builders will load (a user's builder fetches its own), so
    that weights out of reach are refused before the run directory is made."""
    if target == "hsci.models.timm":
        known_model(settings["name"])
    if settings.get("pretrained") is not True or settings.get("weights"):  # a local file replaces the download
        return
    if target == "hsci.models.resnet":
        torch_hub_file(torchvision_url(settings["arch"]), f"model.arch={settings['arch']} model.pretrained=true")
    elif target == "hsci.models.timm":
        timm_file(settings["name"])


def known_model(name: str) -> None:
    """Refuse a name timm does not know, with the nearest names it does."""
    from difflib import get_close_matches

    try:
        import timm
    except ImportError as e:
        raise UserError(f'model=timm needs timm, which is not installed ({e}): pip install "hsci[timm]"') from e
    if timm.is_model(name) or timm.is_model(name.split(".")[0]):
        return
    close = get_close_matches(name, timm.list_models(), n=3)
    raise UserError(f"model.name={name} is not a timm model: "
                    + (f"did you mean {', '.join(close)}?" if close else "timm.list_models('*pattern*') lists them"))
