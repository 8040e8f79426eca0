"""Every key of a composed config is one hsci reads: a key that no builder, the trainer, a logger or hsci itself
takes is refused before any work, naming the nearest key hsci knows and where the key came from (the command line,
or a file); so is a builder's setting whose value does not fit the type the builder declares (hsci/parts/annotated.py),
and a key that the config lacks (`misnamed`, for Hydra's own refusal). Which keys the top level, `trainer` and
`logger` hold is read off their dataclasses in hsci/parts/schema.py, so a key added there is known here at once.
The builders' modules are imported to read their signatures; nothing here imports torch itself."""

from dataclasses import fields
from difflib import get_close_matches
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hsci import UserError, config_dir, flat, quote
from hsci.parts import annotated
from hsci.parts.schema import TUNING, Config, Loggers, MLflow, TensorBoard, Trainer

# What hsci passes each group's builder at the call site (hsci/parts/build.py): never a config key.
PASSED = {"data": (), "model": ("input_shape", "num_outputs"), "loss": (), "optimizer": ("params",),
          "scheduler": ("opt", "epochs", "steps_per_epoch")}
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")  # read by instantiate itself
# What each logger of conf/logger/ is, and the package that `pip install "hsci[<logger>]"` brings.
LOGGERS = {"tensorboard": (TensorBoard, "tensorboard"), "mlflow": (MLflow, "mlflow")}
# The primary config and group options that `hsci train from=<run>` composes from the run's saved config
# (hsci/record/rerun.py).
FROM_RUN = "_from_run"
FROM_WHERE = "in the saved config of the run given as from="
LISTED = "hsci train --cfg job lists the keys"


def check_keys(cfg: DictConfig, hydra_cfg: DictConfig, skip: tuple[str, ...] = ()) -> None:
    """Refuse a key hsci does not read: at the top level and in `trainer` (`check_known`), in `logger`
    (`check_loggers`), and in data, model, loss, optimizer or scheduler, a key that its `_target_` does not take or
    whose value does not fit the type the target declares, or a `_target_` that cannot be imported (`check_builder`);
    naming the file the key came from (`hydra_cfg`, Hydra's node, says which files were used). Keys in `skip` (and
    under them) are left to a sweep's jobs. It imports the targets: call it on a config the user composed, never on
    a received run's."""
    if any(s in hydra_cfg.runtime.choices and s not in PASSED for s in skip):
        return  # a swept overlay (experiment=a,b) may choose and set any group, job by job
    check_known(cfg, hydra_cfg, skip)
    check_loggers(cfg, skip)
    for group in PASSED:
        check_builder(cfg, hydra_cfg, group, skip)


def _skipped(key: str, skip: tuple[str, ...]) -> bool:
    return any(key == s or key.startswith(s + ".") or s.startswith(key + ".") for s in skip)


def check_known(cfg: DictConfig, hydra_cfg: DictConfig, skip: tuple[str, ...] = ()) -> None:
    """Refuse a top-level or `trainer.*` key that hsci does not read: `Config` and `Trainer` name each one it does.
    A top-level key of the user's own (`+foo=1`, or a config group of theirs that lands at the top level rather
    than inside a group hsci builds) is refused too: hsci keeps no key it never reads."""
    trainer = OmegaConf.select(cfg, "trainer", default=None, throw_on_missing=False)
    for prefix, kind, node in (("", Config, cfg), ("trainer.", Trainer, trainer)):
        known = [f.name for f in fields(kind)]
        for key in node if isinstance(node, DictConfig) else ():
            full = prefix + key
            if key not in known and full != "hydra" and not _skipped(full, skip):
                raise UserError(_unread(full, known, _origin(hydra_cfg, full)))


def _unread(full: str, known: list[str], where: str) -> str:
    """The refusal of a key hsci does not read, from the keys it reads beside it."""
    prefix, _, key = full.rpartition(".")
    close = get_close_matches(key, known, n=1)
    fix = (f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else "remove it" if prefix else
           "remove it: hsci reads no top-level key of that name (a label for the run goes in tags=[...])")
    return f"{full} is not a key hsci reads ({where}): {fix} ({LISTED})"


def check_loggers(cfg: DictConfig, skip: tuple[str, ...] = ()) -> None:
    """Refuse a logger hsci does not have (`+logger.csv.x=1`), a key that a chosen logger does not take
    (`+logger.tensorboard.foo=1`) and a logger whose package is missing, naming the pip command; a swept `logger`
    is left to each job. No logger is imported here."""
    from importlib.util import find_spec

    if any(s == "logger" or s.startswith("logger.") for s in skip) or not cfg.get("logger"):
        return
    loggers = [f.name for f in fields(Loggers)]
    for name in cfg.logger:
        if name not in loggers:
            close = get_close_matches(name, loggers, n=1)
            raise UserError(f"logger.{name} is not a logger hsci has: "
                            f"{f'did you mean logger.{close[0]}?' if close else 'remove it'} (the loggers: "
                            f"{', '.join(loggers)}, chosen with logger=<name>)")
    for name, (kind, package) in LOGGERS.items():
        node = cfg.logger.get(name)
        if node is None:
            continue
        settings = [f.name for f in fields(kind)]
        for key in node:
            if key not in settings:
                close = get_close_matches(key, settings, n=1)
                raise UserError(f"logger.{name}.{key} is not a setting of the {name} logger: "
                                f"{f'did you mean logger.{name}.{close[0]}?' if close else 'remove it'} "
                                f"(its settings: {', '.join(settings)})")
        if find_spec(package) is None:
            raise UserError(f'logger={name} needs the {package} package: pip install "hsci[{name}]"')


def check_builder(cfg: DictConfig, hydra_cfg: DictConfig, group: str, skip: tuple[str, ...] = ()) -> None:
    """Refuse a key of `group` that its `_target_` does not take, a value that does not fit the type the target
    declares for it (hsci/parts/annotated.py says what is checked), and a `_target_` that cannot be imported."""
    from hydra._internal.utils import _locate  # finds a `_target_` as hydra.utils.instantiate does

    target = OmegaConf.select(cfg, f"{group}._target_", throw_on_missing=False, throw_on_resolution_failure=False)
    if group in skip or f"{group}._target_" in skip or not isinstance(target, str):
        return
    try:
        builder = _locate(target)
    except Exception as e:  # not there, or its module fails to import
        cause = e.__cause__ or e  # what Hydra's ImportError wraps
        raise UserError(f"{group}._target_={target} cannot be imported ({_origin(hydra_cfg, f'{group}._target_')}): "
                        f"{type(cause).__name__}: {flat(cause)}; correct the name, or make its module importable "
                        "(PYTHONPATH)") from e
    sig = annotated.signature(builder)
    if sig is None:  # no signature to read: left to the call
        return
    passed = PASSED[group]
    params = sig.parameters.values()
    settings = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in passed}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    node = cfg[group]
    for key in node:
        full = f"{group}.{key}"
        if key in HYDRA_KEYS or full in skip or group == "model" and key in TUNING:
            continue
        if key not in settings:
            if takes_any:
                continue
            close = get_close_matches(key, list(settings), n=1)
            fix = ("hsci passes it itself: remove it" if key in passed
                   else f"did you mean {group}.{close[0]}?" if close else "remove it")
            raise UserError(f"{full} is not a setting of {target} ({_origin(hydra_cfg, full)}): {fix} "
                            f"(its settings: {', '.join(settings)})")
        wrong = annotated.misfit(node, key, settings[key])
        if wrong:
            raise UserError(f"{full}={wrong[0]} is invalid: {target} takes {key}: {wrong[1]} "
                            f"({_origin(hydra_cfg, full)})")


def _origin(hydra_cfg: DictConfig, full: str) -> str:
    """Where the key `full` (model.hidden, trainer.epochs, or a top-level key) came from: the command line; or, for
    a group's key, the first file that holds it of the chosen option's own and those it extends (its defaults
    list); for a top-level key, the option of a group of that name (a user's own group); then the chosen global
    overlays (experiment=...) and the primary config; else the option's own file. A config's file is the first of
    its name on Hydra's search path."""
    import yaml

    given = next((o for o in hydra_cfg.overrides.task if o.lstrip("+~").split("=")[0] == full), None)
    if given:
        return f"given on the command line as {given}"
    group, _, key = full.rpartition(".")
    runtime = hydra_cfg.runtime
    roots = [Path(source.path) for source in runtime.config_sources if source.schema == "file"]

    def file(name: str) -> Path | None:  # name: data/mnist
        return next((root / f"{name}.yaml" for root in roots if (root / f"{name}.yaml").is_file()), None)

    def read(path: Path) -> tuple[str, dict]:
        text = path.read_text()
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:  # Hydra read it, so this is unlikely; then the file is not searched
            doc = None
        return text, doc if isinstance(doc, dict) else {}

    if runtime.choices.get(group) == FROM_RUN:
        return FROM_WHERE
    files = []
    if group:  # the option's own file, then the files its defaults list extends
        names = [f"{group}/{runtime.choices.get(group)}"]
        while names:
            name = names.pop(0)
            path = file(name)
            if path is None or path in files:
                continue
            files.append(path)
            doc = read(path)[1]
            if key in doc:
                return f"in {path}"
            for entry in doc.get("defaults") or []:
                if isinstance(entry, str) and entry != "_self_":  # not a group's choice (a mapping)
                    extended = entry.removeprefix("optional ").split("@")[0].strip()
                    names.append(extended[1:] if extended.startswith("/")
                                 else f"{name.rpartition('/')[0]}/{extended}")
    elif runtime.choices.get(key):  # a top-level key that a group of the user's brings
        path = file(f"{key}/{runtime.choices[key]}")
        return f"in {path}" if path else f"from the option {key}={runtime.choices[key]}"
    for other, choice in runtime.choices.items():
        path = file(f"{other}/{choice}") if choice and other != group and not other.startswith("hydra") else None
        text, doc = read(path) if path else ("", {})
        node = (doc.get(group) if group else doc) if text.startswith("# @package _global_") else None  # an overlay
        if isinstance(node, dict) and key in node:
            return f"in {path}"
    if not group:  # the primary config
        primary = hydra_cfg.job.config_name
        path = file(primary) if primary != FROM_RUN else None
        return FROM_WHERE if primary == FROM_RUN else f"in {path}" if path else "in the composed config"
    return f"in {files[0]}" if files else f"in the option {group}/{runtime.choices.get(group)}"


# The dataclasses that type the top level, `trainer` and `logger` (hsci/parts/schema.py), by where they sit.
TYPED = {"": Config, "trainer": Trainer, "logger": Loggers, "logger.tensorboard": TensorBoard, "logger.mlflow": MLflow}


def misnamed(report: str, args: list[str]) -> str | None:
    """What `hsci train` says instead of Hydra's refusal (`report`) of a key: for a key a file sets where the
    dataclasses allow none ("Key 'max_epochs' not in 'Trainer'"), the refusal `check_known` makes; for a key the
    command line sets and the config lacks ("Could not override 'optimizer.lrr'"), the nearest key it has, composed
    from the same command line (`args`, Hydra's) without the override, or a `+` where the group's builder takes the
    key. None when Hydra refused something else. It composes the config, about a second: on this error only."""
    import re

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    typed = re.search(r"In '([^']+)': ConfigKeyError raised while composing config:\s*Key '[^']+' not in '\w+'\s*"
                      r"full_key: (\S+)", report)
    if typed and typed[2].rpartition(".")[0] in TYPED:
        option, full = typed[1], typed[2]
        folders = [config_dir(), *[Path(d).expanduser().resolve() for d in [flag(args, "--config-dir", "-cd")] if d]]
        path = next((f / f"{option}.yaml" for f in folders if (f / f"{option}.yaml").is_file()), None)
        known = [f.name for f in fields(TYPED[full.rpartition(".")[0]])]
        return _unread(full, known, f"in {path}" if path else f"in the option {option}")
    found = re.search(r"Could not override '([^']+)'", report)
    if not found:
        return None
    key = found[1]
    given = [a for a in args if "=" in a and not a.startswith("-")]
    bad = next((a for a in given if a.lstrip("+~").split("=")[0] == key), f"{key}=...")
    overrides = []
    for arg in given:
        try:
            [parsed] = OverridesParser.create().parse_overrides([arg])
        except Exception:
            continue
        if arg != bad and not parsed.is_sweep_override():
            overrides.append(arg)
    extra = flag(args, "--config-dir", "-cd")
    if extra:
        overrides.append(f"hydra.searchpath=[{quote('file://' + str(Path(extra).expanduser().resolve()))}]")
    name = flag(args, "--config-name", "-cn") or "config"
    cfg = None
    for attempt in (overrides, [o for o in overrides if "." not in o.split("=")[0]]):
        try:
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose(name, overrides=attempt)
            break
        except Exception:  # another override Hydra refuses too: then the groups chosen alone
            continue
    if cfg is None or OmegaConf.select(cfg, key, default="absent", throw_on_missing=False) != "absent":
        return None  # a key the config has: Hydra refused its value, and says why
    return f"{key} is not a key of this config (given on the command line as {bad}): {_nearest(cfg, key, bad)} " \
           f"({LISTED})"


def _nearest(cfg: DictConfig, key: str, bad: str) -> str:
    """`did you mean <the nearest key>?`, first among the key's siblings; else the `+` that adds a setting the
    group's builder takes and its option leaves out (importing the builder: torch's, for an optimizer), else the
    keys beside it."""
    from hydra._internal.utils import _locate

    near = nearest(cfg, key)
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if near or not isinstance(node, DictConfig):
        return f"did you mean {near}?" if near else "check its spelling"
    target = node.get("_target_")
    if parent in PASSED and isinstance(target, str):
        try:
            sig = annotated.signature(_locate(target))
        except Exception:
            sig = None
        if sig and leaf in sig.parameters and leaf not in PASSED[parent]:
            return f"{target} takes {leaf}, which this option leaves at its default: add it with +{bad.lstrip('+~')}"
    return f"check its spelling (the keys of {parent or 'the top level'}: {', '.join(map(str, node))})"


def nearest(cfg: DictConfig, key: str) -> str | None:
    """The key of `cfg` nearest to `key`, a key it lacks: among the key's siblings where its node is there, else
    among all of them."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if isinstance(node, DictConfig):
        close = get_close_matches(leaf, [str(k) for k in node], n=1)
        return f"{parent + '.' if parent else ''}{close[0]}" if close else None
    close = get_close_matches(key, [k for k in _dotted(cfg) if k != "hydra"], n=1, cutoff=0.7)
    return close[0] if close else None


def _dotted(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        keys.append(f"{prefix}{key}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            keys += _dotted(child, f"{prefix}{key}.")
    return keys


def flag(args: list[str], *names: str) -> str | None:
    """The value of a Hydra flag (`--config-dir D`, `--config-dir=D`, `-cd D`), or None."""
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in names:
            return value if eq else args[i + 1] if i + 1 < len(args) else None
    return None
