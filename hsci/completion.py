"""Shell completion: `hsci completion bash|zsh` prints the script a shell sources, and the script asks
`hsci completion --bash|--zsh ...` for the words that may follow what is typed: the verbs, config groups and
their options, the keys of the config that the line composes, a verb's own keys.

An answer reads conf/ (and a `--config-dir` on the line) as plain YAML, following the defaults lists the way
Hydra composes them, without importing Hydra or torch: a whole answer takes about 0.1 s, Hydra's compose alone
about 1 s (benchmarks/completion.py).
"""

import os
from pathlib import Path

from hsci import config_dir

CONFIG_VERBS = ("train", "eval", "bench", "tune")  # the verbs that compose a config from key=value words
FLAGS = {"train": ("-m", "--multirun", "--cfg", "--config-dir", "--resolve", "--info", "--help"),
         "tune": ("--config-dir",), "runs": ("--json",)}
FLAG_VALUES = {"--cfg": ("job", "hydra", "all")}
DIRS = ("--config-dir", "-cd")
PATH, RUN = "path", "run"  # a value that is a file or folder; a run directory or `latest`
OWN = {"train": {"resume": RUN},
       "eval": {"run": RUN, "checkpoint": PATH, "split": ("test", "val")},
       "bench": {"steps": (), "warmup": ()},
       "tune": {"trials": (), "pruner": ("median", "none"), "resume": RUN},
       "trust": {"run": PATH},
       "plot": {"run": RUN},
       "runs": {"status": ("completed", "running", "interrupted", "diverged", "failed", "pruned"), "name": (),
                "sweep": (), "last": ()},
       "compare": {"metric": (), "baseline": (), "out": PATH}}
PLACES = ("runs", "compare")  # verbs that also take runs and folders as words of their own
SHELLS = ("bash", "zsh")


def run(args: list[str], verbs) -> int:
    """`hsci completion bash|zsh`: the script; `--bash WORDBREAKS LINE` and `--zsh -- WORDS...`: the candidates,
    one a line (the shell's script asks)."""
    if args[:1] == ["--bash"] and len(args) == 3:
        print(*for_bash(args[2], args[1], verbs), sep="\n")
    elif args[:2] == ["--zsh", "--"] and len(args) > 2:
        print(*candidates(args[2:], verbs), sep="\n")
    elif len(args) == 1 and args[0] in SHELLS:
        print(SCRIPTS[args[0]], end="")
    else:
        from hsci import UserError

        raise UserError('usage: hsci completion bash|zsh; put eval "$(hsci completion bash)" in ~/.bashrc '
                        '(zsh: eval "$(hsci completion zsh)" in ~/.zshrc)')
    return 0


def candidates(words: list[str], verbs) -> list[str]:
    """The words that may stand where the last of `words` (what is typed of it so far) is; `words` follow `hsci`."""
    return sorted(set(_candidates(words, verbs))) if words else []


def _candidates(words: list[str], verbs) -> list[str]:
    *before, word = words
    if not before:
        return [v for v in (*verbs, "--help") if v.startswith(word)]
    verb = before[0]
    if before[-1] in DIRS:
        return paths(word, folders_only=True)
    if before[-1] in FLAG_VALUES:
        return [v for v in FLAG_VALUES[before[-1]] if v.startswith(word)]
    if word.startswith(tuple(f"{d}=" for d in DIRS)):
        flag, _, typed = word.partition("=")
        return [f"{flag}={p}" for p in paths(typed, folders_only=True)]
    if verb == "completion":
        return [s for s in SHELLS if s.startswith(word)] if len(before) == 1 else []
    if word.startswith("-") and "=" not in word:
        return [f for f in FLAGS.get(verb, ()) if f.startswith(word)]
    found = own(verb, word)
    if verb in CONFIG_VERBS:
        found += Config(before[1:]).candidates(word)
    elif verb in PLACES and "=" not in word:
        found += paths(word)
    return found


def own(verb: str, word: str) -> list[str]:
    """A verb's own keys (`split=`, `resume=` ...) and their values."""
    keys = OWN.get(verb, {})
    key, eq, value = word.partition("=")
    if not eq:
        return [f"{k}=" for k in keys if k.startswith(word)]
    if key not in keys:
        return []
    values = keys[key]
    if values in (PATH, RUN):
        return [f"{key}={p}" for p in (["latest"] if values == RUN and "latest".startswith(value) else [])
                + paths(value, folders_only=values == RUN)]
    return [f"{key}={v}" for v in values if v.startswith(value)]


def paths(typed: str, folders_only: bool = False) -> list[str]:
    """Files and folders that complete `typed` (folders end in /); hidden ones only when asked for with a dot."""
    folder, _, start = typed.rpartition("/")
    where = Path(os.path.expanduser(folder + "/" if folder or typed.startswith("/") else "."))
    try:
        entries = sorted(where.iterdir())
    except OSError:
        return []
    head = folder + "/" if folder or typed.startswith("/") else ""
    found = []
    for entry in entries:
        if entry.name.startswith(start) and (start.startswith(".") or not entry.name.startswith(".")):
            if entry.is_dir():
                found.append(f"{head}{entry.name}/")
            elif not folders_only:
                found.append(f"{head}{entry.name}")
    return found


class Config:
    """The config groups, their options and the composed keys that a line of `key=value` words selects, read from
    hsci's conf/ and a `--config-dir` of the line (which Hydra searches after hsci's own)."""

    def __init__(self, words: list[str]):
        self.dirs, self.words, self.composed = [config_dir()], words, None
        for i, w in enumerate(words):
            if w in DIRS and i + 1 < len(words) or w.startswith(tuple(f"{d}=" for d in DIRS)):
                folder = Path(os.path.expanduser(w.split("=", 1)[1] if "=" in w else words[i + 1]))
                if folder.is_dir():
                    self.dirs.append(folder)

    def groups(self) -> dict[str, list[str]]:
        """Each group (a folder of YAML files) and its options; folders inside a group (data/base) hold bases."""
        found: dict[str, set[str]] = {}
        for d in self.dirs:
            for group in (g for g in d.iterdir() if g.is_dir() and not g.name.startswith((".", "_"))):
                options = {f.stem for f in group.glob("*.yaml")}
                if options:
                    found.setdefault(group.name, set()).update(options)
        return {group: sorted(options) for group, options in sorted(found.items())}

    def candidates(self, word: str) -> list[str]:
        sign = next((s for s in ("++", "+", "~") if word.startswith(s)), "")
        word = word[len(sign):]
        groups = self.groups()
        key, eq, value = word.partition("=")
        if eq:  # a group's options (after a comma too: a sweep), or true/false for a key that holds a boolean
            done, _, typed = value.rpartition(",")
            done = done + "," if done else ""
            options = groups.get(key.split("@")[0]) or (["true", "false"] if isinstance(at(self.keys(), key), bool)
                                                        else [])
            return [f"{sign}{key}={done}{o}" for o in options if o.startswith(typed)]
        prefix, dot, word = word.rpartition(".")
        node = at(self.keys(), prefix + dot)
        if not isinstance(node, dict):
            return []
        suffix = "" if sign == "~" else "="
        found = [] if dot else [g + suffix for g in groups]
        for name, value in node.items():
            if name.startswith("_") and not word.startswith("_"):
                continue  # _target_ and the like, when asked for
            if isinstance(value, dict):
                found.append(f"{prefix}{dot}{name}.")
            if not isinstance(value, dict) or sign == "~":
                found.append(f"{prefix}{dot}{name}{suffix}")
        return [f"{sign}{c}" for c in found if c.startswith(prefix + dot + word)]

    def keys(self) -> dict:
        """The composed config as nested dicts (values as the YAML gives them), hydra's own settings left out except
        those hsci's config.yaml sets."""
        if self.composed is None:
            self.composed = compose(self.dirs, self.groups(), self.words)
        return self.composed


def at(tree: dict, key: str):
    """What a dotted `key` (`optimizer.lr`; `model.` is the model's node) names in a nested `tree`, or None."""
    for part in key.split(".") if key else ():
        if part:
            tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def compose(dirs: list[Path], groups: dict, words: list[str]) -> dict:
    """The keys that Hydra would compose from conf/config.yaml's defaults and the line's group choices: each
    option's own defaults (a base merged in, another group overridden) followed as Hydra does."""
    top = read(dirs, "config")
    chosen, given = {}, {}
    for entry in top.get("defaults") or []:
        if isinstance(entry, dict):
            [(group, option)] = entry.items()
            chosen[group.split("@")[0].removeprefix("optional ")] = option
    for word in words:
        key, eq, value = word.lstrip("+~").partition("=")
        group = key.split("@")[0]
        if group in groups:
            given[group] = None if word.startswith("~") else value.split(",")[0] if eq else None
    picked = chosen | given
    for _ in range(len(groups)):  # an experiment picks a dataset, which picks a loss ...
        overridden = dict(picked)
        for group, option in picked.items():
            body = read(dirs, f"{group}/{option}") if option else {}
            for entry in body.get("defaults") or []:
                if isinstance(entry, dict):
                    [(target, opt)] = entry.items()
                    target = target.removeprefix("override ").strip().lstrip("/").split("@")[0]
                    if target in groups and target not in given:
                        overridden[target] = opt
        if overridden == picked:
            break
        picked = overridden
    keys = {k: v for k, v in top.items() if k not in ("defaults", "hydra")} | {"hydra": top.get("hydra") or {}}
    for group, option in picked.items():
        if option and group in groups:
            body = flattened(dirs, f"{group}/{option}")
            if body.pop("_global_", False):
                merge(keys, body)
            else:
                merge(keys.setdefault(group, {}), body)
    return keys


def flattened(dirs: list[Path], name: str) -> dict:
    """An option's keys with the bases its defaults merge in `@_here_`; `_global_: True` when its package is
    global (an experiment)."""
    body = read(dirs, name)
    keys: dict = {"_global_": True} if body.pop("_global_", False) else {}
    for entry in body.pop("defaults", None) or []:
        if isinstance(entry, str) and entry.endswith("@_here_"):
            base = entry.removesuffix("@_here_")
            base = base.lstrip("/") if base.startswith("/") else f"{name.rpartition('/')[0]}/{base}"
            merge(keys, {k: v for k, v in flattened(dirs, base).items() if k != "_global_"})
    merge(keys, body)
    return keys


def read(dirs: list[Path], name: str) -> dict:
    """`name`.yaml from the first folder that has it, as plain values; `_global_: True` for `@package _global_`."""
    import yaml  # PyYAML, which OmegaConf reads YAML with

    for d in dirs:
        path = d / f"{name}.yaml"
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
                body = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}  # C when built
            except (OSError, ValueError, yaml.YAMLError):
                return {}
            if not isinstance(body, dict):
                return {}
            head = [line for line in text.splitlines() if line.startswith("#")][:3]
            return body | ({"_global_": True} if any("@package _global_" in line for line in head) else {})
    return {}


def merge(into: dict, body: dict) -> None:
    for key, value in body.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def for_bash(line: str, wordbreaks: str, verbs) -> list[str]:
    """The candidates for bash, whose readline replaces only the part of a word after its last COMP_WORDBREAKS
    character (`cif` of `data=cif`): each candidate from that point on, escaped outside quotes."""
    words, raw, quoted = split(line)
    word = words[-1]
    tail = raw[max((raw.rfind(c) for c in wordbreaks), default=-1) + 1:]
    cut = len(word) - len(tail) if word.endswith(tail) else 0
    special = set(" \t\n'\"\\$&;|<>()*?[]!`")
    return [c[cut:] if quoted else "".join("\\" + ch if ch in special else ch for ch in c[cut:])
            for c in candidates(words[1:], verbs)]


def split(line: str) -> tuple[list[str], str, bool]:
    """A command line up to the cursor as the shell reads its words (quotes and backslashes removed), the last
    word as typed, and whether the cursor is inside quotes. A line ending in a space ends in an empty word."""
    words, raw, word, quote, escaped, started = [], "", "", "", False, False
    for ch in line:
        if escaped:
            word, raw, escaped = word + ch, raw + ch, False
        elif ch == "\\" and quote != "'":
            raw, escaped, started = raw + ch, True, True
        elif quote:
            raw += ch
            if ch == quote:
                quote = ""
            else:
                word += ch
        elif ch in "'\"":
            raw, quote, started = raw + ch, ch, True
        elif ch in " \t\n":
            if started:
                words.append(word)
            word, raw, started = "", "", False
        else:
            word, raw, started = word + ch, raw + ch, True
    return words + [word], raw, bool(quote)


BASH = r"""# hsci's completion for bash: eval "$(hsci completion bash)" in ~/.bashrc
_hsci_complete() {
    local line
    COMPREPLY=()
    while IFS= read -r line; do
        [[ -n $line ]] && COMPREPLY+=("$line")
    done < <("${COMP_WORDS[0]}" completion --bash "$COMP_WORDBREAKS" "${COMP_LINE:0:COMP_POINT}" 2>/dev/null)
    if [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *[=./] ]]; then
        compopt -o nospace 2>/dev/null  # key=, optimizer., a folder/: the word goes on
    fi
    return 0
}
complete -F _hsci_complete hsci
"""

ZSH = r"""# hsci's completion for zsh: eval "$(hsci completion zsh)" in ~/.zshrc
_hsci() {
    local -a found whole going
    local c
    found=("${(@f)$("${words[1]}" completion --zsh -- "${(@Q)words[2,CURRENT-1]}" "${(Q)PREFIX}" 2>/dev/null)}")
    for c in "${found[@]}"; do
        [[ -z $c ]] && continue
        if [[ $c == *[=./] ]]; then going+=("$c"); else whole+=("$c"); fi
    done
    (( ${#whole} )) && compadd -- "${whole[@]}"
    (( ${#going} )) && compadd -S '' -- "${going[@]}"  # key=, optimizer., a folder/: the word goes on
    return 0
}
(( ${+functions[compdef]} )) || { autoload -Uz compinit && compinit -u; }
compdef _hsci hsci
"""

SCRIPTS = {"bash": BASH, "zsh": ZSH}
