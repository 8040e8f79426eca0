"""The `hsci` command. Verbs hand their arguments to Hydra apps; `hsci --help` answers without importing
torch or Hydra, so it is instant."""

import sys
from pathlib import Path

VERBS = {
    "train": "train a model, validate every epoch, test the best checkpoint; "
             "hsci train [key=value ...], sweeps with hsci train -m key=a,b",
}


def config_dir() -> Path:
    """The shipped configs: inside the installed package, or the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    return next(d for d in (here / "conf", here.parent / "conf") if d.is_dir())


def usage() -> str:
    lines = ["usage: hsci <command> [key=value ...]", "", "commands:"]
    lines += [f"  {verb:<8}{text}" for verb, text in VERBS.items()]
    lines += ["", "config groups (choose one option each: hsci train data=cifar10 model=resnet18):"]
    for group in sorted(d for d in config_dir().iterdir() if d.is_dir()):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name:<11}{', '.join(options)}")
    lines += ["", "any value can be overridden: hsci train optimizer.lr=0.01 trainer.epochs=5",
              "hsci train --help shows Hydra's help; hsci train --cfg job prints the composed config",
              "your own configs: hsci train --config-dir my_conf data=my_data"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"hsci: unknown command '{verb}'; commands: {', '.join(VERBS)} (see hsci --help)", file=sys.stderr)
        return 2
    sys.argv = [f"hsci {verb}", *rest]  # Hydra reads its arguments from sys.argv
    _hydra_app(_train)()
    return 0


def _train(cfg) -> None:
    from hsci import train  # imports torch: kept out of `hsci --help`

    train.main(cfg)


def _hydra_app(task):
    import hydra

    from hsci import schema

    schema.register()
    return hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(task)
