"""Shell completion: what `hsci completion` offers after each kind of word, the composed keys it reads from conf/
against Hydra's own composition, a user's --config-dir, and the scripts in the real shells (bash always; zsh where
it is installed), typed at an interactive prompt with a Tab."""

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import hsci
from hsci import completion
from hsci.cli import VERBS

ROOT = Path(__file__).resolve().parents[1]
WORDBREAKS = " \t\n\"'><=;|&(:"  # bash's default COMP_WORDBREAKS


def offered(*words: str, cwd: Path) -> list[str]:
    """What the completion offers for the last of `words` (those after `hsci`), asked as zsh's script asks."""
    result = hsci("completion", "--zsh", "--", *words, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def flat(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key}
    return keys


@pytest.mark.parametrize("words, expected", [
    ([""], [*VERBS, "--help"]),
    (["tr"], ["train", "trust"]),
    (["train", "data=cif"], ["data=cifar10", "data=cifar100"]),
    (["train", "+data=dig"], ["+data=digits"]),
    (["train", "optimizer=adam,s"], ["optimizer=adam,sgd"]),  # a sweep: after the comma
    (["train", "data=ba"], []),  # data/base holds bases, not options
    (["train", "trainer.ep"], ["trainer.epochs="]),
    (["train", "optimizer."], ["optimizer.betas=", "optimizer.lr=", "optimizer.weight_decay="]),
    (["train", "optimizer=sgd", "optimizer."], ["optimizer.lr=", "optimizer.momentum=", "optimizer.nesterov=",
                                                "optimizer.weight_decay="]),
    (["train", "model=vit", "model.num_"], ["model.num_heads=", "model.num_layers="]),
    (["train", "experiment=cifar10_resnet18", "model.ar"], ["model.arch="]),  # the experiment picks resnet18
    (["train", "data=diabetes", "loss."], []),  # the dataset picks mse, which has no keys of its own
    (["train", "data._t"], ["data._target_="]),  # keys with a leading _ only when asked for
    (["train", "~model.dr"], ["~model.dropout"]),
    (["train", "trainer.deterministic="], ["trainer.deterministic=false", "trainer.deterministic=true"]),
    (["train", "hydra.run."], ["hydra.run.dir="]),
    (["train", "--c"], ["--cfg", "--config-dir"]),
    (["train", "--cfg", ""], ["job", "hydra", "all"]),
    (["train", "re"], ["resume="]),
    (["eval", "split="], ["split=test", "split=val"]),
    (["tune", "pruner="], ["pruner=median", "pruner=none"]),
    (["runs", "status=c"], ["status=completed"]),
    (["completion", ""], ["bash", "zsh"]),
])
def test_what_each_word_completes_to(words, expected, tmp_path):
    assert offered(*words, cwd=tmp_path) == sorted(expected)


def test_groups_options_and_keys_on_an_empty_word(tmp_path):
    found = offered("train", "", cwd=tmp_path)
    groups = ["data", "experiment", "loss", "model", "optimizer", "scheduler", "trainer"]
    assert {f"{g}=" for g in groups} | {"seed=", "name=", "resume=", "trainer.", "data."} <= set(found)
    assert "base=" not in found and "experiment." not in found


def same_keys_as_hydra(cfg_of, *overrides: str) -> None:
    hydras = OmegaConf.to_container(cfg_of(*overrides), resolve=False)
    composed = completion.Config(list(overrides)).keys()
    del composed["hydra"]  # hsci's own hydra.* settings: cfg_of leaves Hydra's node out
    groups, ours = completion.Config([]).groups(), flat(composed)
    # What hsci's schema types but nothing chose (logger: null; logger.tensorboard: null beside logger=mlflow) is a
    # key of Hydra's; Tab offers the choice itself (logger=, logger=[tensorboard,mlflow]).
    unchosen = {key for key in flat(hydras) if key not in ours and key.split(".")[0] in groups
                and OmegaConf.select(OmegaConf.create(hydras), key) is None}
    assert ours == flat(hydras) - unchosen, overrides


# The defaults, a base merged in (cifar10: torchvision's, which merges images'), a dataset that picks its loss, an
# experiment of the global package that picks four groups, and a group choice on the line that wins over it.
@pytest.mark.parametrize("overrides", [(), ("model=vit",), ("data=cifar10",), ("data=breast_cancer",),
                                       ("experiment=cifar10_resnet18",),
                                       ("experiment=cifar10_resnet18", "optimizer=adam", "data=diabetes")])
def test_the_composed_keys_are_hydras(cfg_of, overrides):
    same_keys_as_hydra(cfg_of, *overrides)


@pytest.mark.slow
def test_the_composed_keys_are_hydras_for_every_option_of_every_group(cfg_of):
    for group, options in completion.Config([]).groups().items():
        for option in options:
            same_keys_as_hydra(cfg_of, f"{group}={option}")


def test_a_users_config_dir_adds_groups_options_and_keys_from_any_folder(tmp_path):
    mine = tmp_path / "my_conf"
    (mine / "data").mkdir(parents=True)
    (mine / "augment").mkdir()
    (mine / "data" / "my_data.yaml").write_text("# hsci train --config-dir my_conf data=my_data\ndefaults:\n"
                                                "  - /data/base/images@_here_\n  - _self_\n"
                                                "_target_: my.data\nmy_key: 1\n")
    (mine / "augment" / "strong.yaml").write_text("strength: 3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for flag in (["--config-dir", str(mine)], [f"--config-dir={mine}"], ["-cd", "../my_conf"]):
        assert offered("train", *flag, "data=my", cwd=elsewhere) == ["data=my_data"]
        assert "augment=" in offered("train", *flag, "", cwd=elsewhere)
        keys = offered("train", *flag, "data=my_data", "data.", cwd=elsewhere)
        assert "data.my_key=" in keys and "data.batch_size=" in keys  # its own and its base's
        assert offered("train", *flag, "augment=strong", "augment.", cwd=elsewhere) == ["augment.strength="]
    assert offered("train", "data=my", cwd=elsewhere) == []  # without the flag, hsci's own only
    assert offered("train", "--config-dir", "../my", cwd=elsewhere) == ["../my_conf/"]


def test_paths_complete_for_the_keys_that_name_runs_and_files(tmp_path):
    (tmp_path / "outputs" / "2026-01-02").mkdir(parents=True)
    (tmp_path / "model.pt").write_bytes(b"")
    assert offered("eval", "run=", cwd=tmp_path) == ["run=latest", "run=outputs/"]
    assert offered("eval", "run=outputs/", cwd=tmp_path) == ["run=outputs/2026-01-02/"]
    assert offered("eval", "checkpoint=mo", cwd=tmp_path) == ["checkpoint=model.pt"]
    assert offered("runs", "out", cwd=tmp_path) == ["outputs/"]


def test_the_script_verb_and_its_usage(tmp_path):
    for shell in ("bash", "zsh"):
        result = hsci("completion", shell, cwd=tmp_path)
        assert result.returncode == 0 and f"completion --{shell}" in result.stdout
    wrong = hsci("completion", "fish", cwd=tmp_path)
    assert wrong.returncode == 1 and 'eval "$(hsci completion bash)"' in wrong.stderr


def test_an_answer_imports_neither_torch_nor_hydra(tmp_path):
    code = ("import sys; from hsci.cli import main; main(['completion', '--zsh', '--', 'train', 'model=vit', "
            "'model.']); print(*sorted(m for m in ('torch', 'hydra', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.splitlines() == ["model.backbone_lr_scale=", "model.dropout=", "model.freeze=", "model.hidden_dim=",
                                "model.mlp_dim=", "model.num_heads=", "model.num_layers=", "model.patch_size=",
                                "model.unfreeze_at_epoch=", "model.weights=", ""]


@pytest.fixture
def shell_env(tmp_path) -> dict:
    """An environment whose `hsci` on PATH is this tree's, as the console script would run it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hsci").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m hsci "$@"\n')
    (bin_dir / "hsci").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
            "TERM": "dumb", "PS1": "$ ", "LANG": "C.UTF-8"}


BASH_CASES = {  # a line up to the cursor: the COMPREPLY that bash's completion function leaves
    "hsci tr": ["train", "trust"],
    "hsci train data=cif": ["cifar10", "cifar100"],  # bash replaces what follows the `=` (a word break)
    "hsci train optimizer=adam,s": ["adam,sgd"],
    "hsci train trainer.ep": ["trainer.epochs="],
    "hsci train 'optimizer.l": ["optimizer.lr="],  # inside quotes: from the quote on
    "hsci train --config-dir=conf/da": ["conf/data/"],
    "hsci train model=vit model.num_l": ["model.num_layers="],
    "hsci train data=ba": [],  # nothing: the word stays as it is
}


def test_bash_completes_from_the_script_it_sources(tmp_path, shell_env):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    calls = []
    for line in BASH_CASES:  # COMP_WORDS as bash splits them at its word breaks
        words = [w for w in re.split(r"([=:'\"])|\s+", line) if w]
        calls.append(f"COMP_LINE={shlex_quote(line)}; COMP_POINT=${{#COMP_LINE}}; "
                     f"COMP_WORDS=({' '.join(shlex_quote(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
                     "_hsci_complete; (( ${#COMPREPLY[@]} )) && printf '%s|' \"${COMPREPLY[@]}\"; echo")
    script = 'eval "$(hsci completion bash)"\n' + "\n".join(calls)
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], cwd=tmp_path, env=shell_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    replies = [line.split("|")[:-1] for line in out.stdout.splitlines()]
    assert dict(zip(BASH_CASES, replies)) == BASH_CASES


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def typed_at_a_prompt(argv: list[str], setup: str, typed: str, expect: str, env: dict, cwd: Path) -> str:
    """The line an interactive shell holds after `setup` and `typed` (Tabs included), once it shows `expect`."""
    main, child = pty.openpty()
    proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, env=env, cwd=cwd)
    os.close(child)
    out = b""

    def until(pattern: bytes, seconds: float = 30) -> None:
        nonlocal out
        end = time.monotonic() + seconds
        while not re.search(pattern, out) and time.monotonic() < end:
            if select.select([main], [], [], 0.1)[0]:
                try:
                    out += os.read(main, 65536)
                except OSError:
                    return

    try:
        os.write(main, setup.encode() + b"; echo READ''Y\n")
        until(rb"(?m)^READY\r$")
        os.write(main, typed.encode())
        until(re.escape(expect.encode()))
        os.write(main, b"\x01echo SHOWN \x05 END\n")  # to the line's start (Ctrl-A), then echo what it holds
        until(rb"(?m)^SHOWN .* END\r$", 10)
        os.write(main, b"exit\n")
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    shown = re.findall(r"(?m)^SHOWN (.*) END\r$", out.decode(errors="replace"))
    return shown[0] if shown else out.decode(errors="replace")


def test_tab_at_a_bash_prompt_completes_a_key_and_lets_its_value_follow(tmp_path, shell_env):
    line = typed_at_a_prompt(["bash", "--norc", "--noprofile", "-i"], 'eval "$(hsci completion bash)"',
                             "hsci train data=dig\ttrainer.ep\t5", "epochs=5", shell_env, tmp_path)
    assert line == "hsci train data=digits trainer.epochs=5"  # a space after an option, none after `=`


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh is not installed")
def test_tab_at_a_zsh_prompt_completes_a_key_and_lets_its_value_follow(tmp_path, shell_env):
    script = hsci("completion", "zsh", cwd=tmp_path).stdout
    assert subprocess.run(["zsh", "-n", "-c", script], capture_output=True).returncode == 0  # its syntax
    line = typed_at_a_prompt(["zsh", "-f", "-i"], 'eval "$(hsci completion zsh)"',
                             "hsci train data=dig\ttrainer.ep\t5", "epochs=5", shell_env, tmp_path)
    assert line == "hsci train data=digits trainer.epochs=5"
