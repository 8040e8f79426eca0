"""Which run directories hsci builds from as they are: signatures of this user's configs, and the check a config
from elsewhere must pass.

A run's `.hydra/config.yaml` names what to build (`_target_`), and building runs code: a run directory
received from someone else could name `shutil.copyfile` as its model. So hsci signs every config it saves
with a key of this user's (an HMAC-SHA256 of the file's bytes, in `.hydra/config.sig`; the key is 32
random bytes made on first use in `~/.config/hsci/key`, or under $XDG_CONFIG_HOME, readable by this user
only). `eval` and `resume` build a signed config as it is; any other config may name only what hsci's own
configs can: hsci's builders and torch/torchvision models, losses, optimizers and schedulers.
`hsci trust run=<dir>` (hsci/record/trust.py) signs a run that the user has read and trusts, so that it builds as
their own.
"""

import hashlib
import hmac
import importlib
import inspect
import logging
import os
import secrets
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hsci import UserError, flat

SIGNATURE = Path(".hydra") / "config.sig"
BUILDERS = ("hsci.data", "hsci.models", "hsci.schedulers")  # the modules behind hsci's config groups
log = logging.getLogger("hsci")


def key_file() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser() / "hsci" / "key"


def _key(create: bool) -> bytes | None:
    """This user's signing key; made on first use when `create`, else None until then."""
    path = key_file()
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".key.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic: of two processes making a key at once, one key wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return bytes.fromhex(path.read_text().strip())


def _mac(key: bytes, text: bytes) -> str:
    """This key's signature line for `text`: the key's id (a hash of it, not the key), then the HMAC."""
    return f"hmac-sha256:{hashlib.sha256(key).hexdigest()[:16]}:{hmac.new(key, text, hashlib.sha256).hexdigest()}"


def signatures(run_dir: Path, text: bytes, add: bool = False) -> str | None:
    """What the signature file should hold to sign the config bytes `text` as this user's: this user's line
    alone, or, with `add` (`hsci trust`: the config is unchanged), beside the other users' lines. None where
    no key can be kept: the run goes on unsigned, and must then pass the check a run from elsewhere does."""
    try:
        line = _mac(_key(create=True), text)
        path = run_dir / SIGNATURE
        others = [old for old in path.read_text().splitlines() if old.rsplit(":", 1)[0] != line.rsplit(":", 1)[0]] \
            if add and path.is_file() else []
    except (OSError, ValueError) as e:
        message = f"cannot sign {run_dir / '.hydra' / 'config.yaml'} with the key in {key_file()} ({e})"
        if add:
            raise UserError(f"trust: {message}: set XDG_CONFIG_HOME to a folder of yours that hsci can write") from e
        log.warning("%s: resume and eval will treat this run as one from elsewhere", message)
        return None
    return "".join(f"{entry}\n" for entry in [*others, line])


def signed(run_dir: Path, text: bytes) -> bool:
    """Whether `text`, the bytes of a run's config, carries this user's signature."""
    try:
        key = _key(create=False)
        lines = (run_dir / SIGNATURE).read_text().splitlines()
    except (OSError, ValueError):
        return False
    return key is not None and any(hmac.compare_digest(line, _mac(key, text)) for line in lines)


def check(cfg: DictConfig, path: Path, verb: str) -> None:
    """Refuse a config from elsewhere that names anything hsci's own configs cannot, or that holds an
    interpolation (resolvers can make folders; hsci saves configs resolved)."""
    values = list(walk(OmegaConf.to_container(cfg, resolve=False)))
    hidden = interpolation(values)
    if hidden:
        raise UserError(f"{verb}: refusing {path}: {hidden[0]} holds an interpolation ({hidden[1][:60]}), which hsci "
                        f"never saves; {_HINT.format(run=path.parent.parent)}")
    for where, key, value in values:
        if key == "_target_" and not allowed(str(value)):
            raise UserError(f"{verb}: refusing {path}: {where}_target_ names {value}, which hsci builds only from a "
                            f"config it wrote; {_HINT.format(run=path.parent.parent)}")


_HINT = "if you trust this run directory, run hsci trust run={run} first (README: Untrusted files)"


def interpolation(values: list) -> tuple[str, str] | None:
    """(where, text) of the first interpolation among a config's `walk`ed values, if any."""
    return next(((f"{where}{key}", value) for where, key, value in values
                 if isinstance(value, str) and "${" in value), None)


def walk(node, where: str = ""):
    """(path to the node, key, value) for every value in a config's plain container."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield where, key, value
        if isinstance(value, (dict, list)):
            yield from walk(value, f"{where}{key}.")


def allowed(target: str) -> bool:
    """Whether a config from elsewhere may build `target`: a public builder function of hsci's config-group
    modules, or a torch/torchvision model, loss, optimizer or scheduler class, or a torchvision model builder.
    Nothing outside hsci, torch and torchvision is even imported to decide."""
    module, _, name = target.rpartition(".")
    if module in BUILDERS:
        obj = getattr(importlib.import_module(module), name, None)
        return inspect.isfunction(obj) and obj.__module__ == module and not name.startswith("_")
    if target.split(".")[0] not in ("torch", "torchvision"):
        return False
    import torch
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # not there: nothing to build
        return False
    if inspect.isclass(obj):
        return issubclass(obj, (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler))
    import torchvision.models  # a function: torchvision's model builders are the only ones allowed

    return any(obj is torchvision.models.get_model_builder(m) for m in torchvision.models.list_models())
