"""`hsci train from=<run dir>|latest [key=value ...]`: a new run whose config is a saved run's, with the command
line on top: `hsci train -m from=<run> seed=1,2,3,4` replicates a run with other seeds.

The saved config (`<run>/.hydra/config.yaml`, checked as `resume=` checks it: one from elsewhere may name only what
hsci's own configs can) is handed to Hydra as a primary config and an option of each group, all named `_from_run`,
kept in Hydra's ConfigStore (a launcher that runs a sweep's jobs elsewhere takes the store with them). The primary
is hsci's conf/config.yaml with the saved top-level values and each group's choice set to the saved section; so the
command line works as on a fresh run: `seed=1` or `optimizer.lr=0.1` change a saved value, an overlay
(`experiment=smoke`) applies on top, and a group chosen (`model=vit`), or chosen by an option chosen
(`data=diabetes` chooses `loss=mse`), takes the place of the saved section, with that option's own values. The
saved `trainer` extends today's conf/trainer/default.yaml, so a key added since keeps its default.

A run's saved config given to Hydra as its primary config (`--config-dir <run>/.hydra --config-name config`) is
refused, pointing here: Hydra would compose hsci's own config.yaml in its place, or the saved one without hsci's
settings."""

from pathlib import Path

import yaml
from omegaconf import OmegaConf

from hsci import Refused, UserError, config_dir
from hsci.parts.keys import FROM_RUN, flag
from hsci.record.owner import find_run

GROUPS = ("loss", "data", "model", "optimizer", "scheduler", "trainer", "logger")  # as conf/config.yaml lists them


def arguments(args: list[str]) -> tuple[list[str], Path | None]:
    """`hsci train`'s arguments with `from=<run>` made Hydra's (its saved config stored as the primary config
    `_from_run`), and the run it names, if any."""
    _refuse_saved_primary(args)
    given = [a for a in args if a.split("=", 1)[0] == "from"]
    if not given:
        return args, None
    name = given[0].split("=", 1)[1]
    if len(given) > 1 or "," in name:
        raise UserError(f"{' '.join(given)}: from= takes one run directory; to run several, start one hsci train "
                        "from= for each")
    if any(a.startswith("resume=") for a in args):
        raise UserError("from= starts a new run from a run's config, resume= continues a run: give one of them")
    if flag(args, "--config-name", "-cn"):
        raise UserError("from= names the config a run starts from: leave out --config-name")
    run = find_run(name, "from")
    _store(run)
    return [a for a in args if a not in given] + [f"--config-name={FROM_RUN}"], run


def _store(run: Path) -> None:
    """Keep the run's saved config in Hydra's ConfigStore as the primary config `_from_run` and an option of each
    group it sets."""
    from hydra.core.config_store import ConfigStore

    from hsci.record.rundir import load_config  # imports torch

    saved = _present(OmegaConf.to_container(load_config(run, [], (), "from"), resolve=False, enum_to_str=True))
    saved.pop("resume", None)  # a resumed run's config names itself: a new run resumes nothing
    primary = OmegaConf.to_container(OmegaConf.load(config_dir() / "config.yaml"), resolve=False)
    store = ConfigStore.instance()
    for group in GROUPS:
        section = saved.pop(group, None)
        if section is None:  # logger: null stays conf/config.yaml's choice
            continue
        if group == "trainer":
            section = {"defaults": ["default", "_self_"], **section}
        store.store(group=group, name=FROM_RUN, node=section, provider="hsci")
        primary["defaults"] = [{group: FROM_RUN} if isinstance(entry, dict) and group in entry else entry
                               for entry in primary["defaults"]]
    store.store(name=FROM_RUN, node={**primary, **saved}, provider="hsci")


def _present(node):
    """A plain config without its missing values (`???`: a key a run saved before it existed, left to its default)."""
    if isinstance(node, dict):
        return {k: _present(v) for k, v in node.items() if v != "???"}
    return [_present(v) for v in node] if isinstance(node, list) else node


def _refuse_saved_primary(args: list[str]) -> None:
    """Refuse `--config-dir D --config-name N` where D/N.yaml is a run's saved config (composed: no defaults list,
    every group's section in it), pointing at from=."""
    folder = flag(args, "--config-dir", "-cd")
    if not folder:
        return
    name = (flag(args, "--config-name", "-cn") or "config").removesuffix(".yaml")
    path = Path(folder).expanduser() / f"{name}.yaml"
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return  # not there, or not a saved config: Hydra says what it makes of it
    if not isinstance(doc, dict) or "defaults" in doc or not all(isinstance(doc.get(g), dict) for g in GROUPS[:5]):
        return
    run = path.parent.parent if path.parent.name == ".hydra" else "<the run directory it was saved in>"
    raise Refused(f"--config-dir {folder} --config-name {name}: {path} is a run's saved config, which is not one "
                  "Hydra composes a run from (it has no defaults list, nor hsci's settings for Hydra): start a new run "
                  f"from it with hsci train from={run} [key=value ...]", 2)
