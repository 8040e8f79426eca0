"""Who owns a run directory, and which directory a run or a sweep gets.

A process that trains or resumes a run holds an OS lock on `<run>/.lock` for as long as it runs; the
kernel drops it when the process ends, however it ends, so a killed run never stays locked and no two
processes ever write into one run. It is a POSIX record lock (lockf), which belongs to the process alone:
DataLoader workers forked from it do not hold it, so a run killed outright is free at once, even while its
workers are still winding down. (A POSIX lock also ends when its process closes any descriptor of the
file, which is why this process never opens the lock file of a folder it owns twice.)

`Guard`, a Hydra callback, settles a run's or a sweep's directory on its resolved path (interpolations,
`~`) before Hydra writes anything there, and refuses values that cannot work before that directory exists.
Nothing here imports torch: `hsci train resume=` looks runs up through it.
"""

import fcntl
import functools
import os
import re
import socket
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from hsci import Refused, UserError, flat, one_line, quote

LOCK = ".lock"
NAMED_JOBS = "${hydra.job.num}_${hydra.job.override_dirname}"  # conf/config.yaml's hydra.sweep.subdir
# What a folder holds once a run or a sweep has written into it.
RECORDS = (".hydra", "summary.json", "metrics.jsonl", "steps.jsonl", "checkpoints", "sweep_summary.json")
WRITTEN = (*RECORDS, LOCK, "train.log", "sweep_summary.csv", "multirun.yaml")  # and eval_<split>.json
_held: dict[Path, int] = {}  # the directories this process owns, with the descriptor that holds each lock


def claim(folder: Path, verb: str) -> None:
    """Own `folder` for the rest of this process (a no-op if it already does); refused, naming the owner,
    while another process owns it."""
    folder = folder.resolve()
    if folder in _held:
        return
    _refuse_links(folder, verb)
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except IsADirectoryError as e:
        raise UserError(f"{verb}: {folder / LOCK} is a folder, where hsci keeps its lock file: remove it") from e
    except OSError as e:
        raise UserError(f"{verb}: cannot write to {folder} ({e.strerror}): copy the run directory to a writable "
                        "folder and resume the copy, or start hsci where it can write") from e
    for attempt in range(5):  # another process may be probing the lock this very moment (see `owner`)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:  # EACCES or EAGAIN: held
            time.sleep(0.05)
    else:
        who = _read_owner(fd)
        os.close(fd)
        raise UserError(f"{verb}: {folder} is in use by {who}: wait for it to end, or stop it first "
                        f"({'kill -INT ' + who.split()[1] if who.startswith('process') else 'Ctrl-C'})")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _held[folder] = fd


def release(folder: Path) -> None:
    """Give up `folder` (a sweep's finished job); the kernel does the same for every folder at process exit."""
    fd = _held.pop(folder.resolve(), None)
    if fd is not None:
        os.close(fd)


def owner(folder: Path) -> str | None:
    """'process <pid> on <host>' while another process owns `folder`, else None."""
    if folder.resolve() in _held:
        return None
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # never owned (or not hsci's lock file)
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken and dropped (by the close) at once: a probe
        return None
    except OSError:
        return _read_owner(fd)
    finally:
        os.close(fd)


def _read_owner(fd: int) -> str:
    pid, _, host = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
    return f"process {pid} on {host}" if pid.isdigit() else "another process"


def _refuse_links(folder: Path, verb: str) -> None:
    """hsci writes plain files only, and never through a link: a run directory from elsewhere could link its
    train.log or summary.json to any file of yours (~/.bashrc), which writing the run would overwrite."""
    entries = [folder / name for name in WRITTEN] + list(folder.glob("eval_*.json"))
    for place in (folder / ".hydra", folder / "checkpoints"):
        entries += place.iterdir() if place.is_dir() and not place.is_symlink() else []
    link = next((entry for entry in entries if entry.is_symlink()), None)
    if link:
        raise UserError(f"{verb}: {link} is a link (to {os.readlink(link)}), and hsci writes into a run directory "
                        "only plain files of its own: replace the link with a copy of what it points to, or "
                        "remove it")


def requeued(folder: Path) -> bool:
    """Whether this sweep job runs again in the folder where it ran before (a cluster job requeued after
    preemption or a time limit), and so should carry on from its last checkpoint: the folder is this very job's
    (`same_job`) and holds its last.pt, saved after hsci saved the run's config. A job requeued before it saved
    any starts afresh in its folder."""
    return same_job(folder) and (folder / "checkpoints" / "last.pt").is_file()


def same_job(folder: Path) -> bool:
    """Whether this submitit job made `folder` before it was requeued: Hydra's record of the job that made it
    (.hydra/hydra.yaml) names this job's id and overrides. Submitit requeues a job under its own id (SLURM's
    job id, or the local executor's controller) and runs the same call again, which composes the same folder;
    no other job of the sweep has that id, and outside submitit no job is requeued."""
    if "SUBMITIT_EXECUTOR" not in os.environ:  # set by submitit in every job it runs
        return False
    try:
        made_by = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra
        this = HydraConfig.get()
        return (made_by.job.id == this.job.id and OmegaConf.to_container(made_by.overrides.task)
                == OmegaConf.to_container(this.overrides.task))
    except Exception:  # no record, or not one of Hydra's
        return False


def job_record(folder: str) -> str | None:
    """Resolver of a sweep job's `hydra.output_subdir` (set by `Guard`): `.hydra`, where Hydra records the job
    before it starts, except for a requeued job, whose record is there already and stays as hsci saved it (the
    run's config, resolved and signed: Hydra's would be neither), and for the tasks of a job other than its
    rank 0, which records it."""
    return None if task_rank() or requeued(Path(folder)) else ".hydra"


def task_rank() -> int:
    """This process's rank among the tasks of a cluster job that submitit runs as several tasks (nodes, or
    tasks_per_node), else 0: rank 0 owns the job's folder, and the other tasks train in it as its ranks."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 0
    import submitit

    return submitit.JobEnvironment().global_rank


def holds_record(folder: Path) -> bool:
    """Whether a run or a sweep has written into `folder` (a sweep: a job folder with .hydra in it)."""
    if not folder.is_dir():
        return False
    return (any((folder / name).exists() for name in RECORDS)
            or any((job / ".hydra").is_dir() for job in folder.iterdir() if job.is_dir()))


def find_run(name: str, key: str, needs: str = ".hydra/config.yaml", skip_owned: bool = False) -> Path:
    """The run directory that `key=name` names: a path (`~` expanded) or `latest`, the most recently started
    or resumed run under ./outputs that holds `needs` (and, with `skip_owned`, that no process owns), which the
    console names."""
    if name == "latest":
        runs = [p.parent.parent for p in Path("outputs").glob("**/.hydra/config.yaml")
                if (p.parent.parent / needs).exists() and not (skip_owned and owner(p.parent.parent))]
        if not runs:
            raise UserError(f"{key}=latest: no run under {Path('outputs').resolve()}"
                            f"{' that is not in use' if skip_owned else ''} holds {needs}; pass {key}=<run dir>")
        from hsci import report

        latest = max(runs, key=lambda run: (run / ".hydra" / "config.yaml").stat().st_mtime).resolve()
        report.say(f"{key}=latest: {latest}")
        return latest
    run = Path(name).expanduser().resolve()
    if not (run / ".hydra" / "config.yaml").is_file():
        raise UserError(f"{key}={name}: {run} is not a run directory (it holds no hsci run: no .hydra/config.yaml); "
                        f"pass a folder under outputs/ or {key}=latest")
    return run


def _strict(check):
    """Hydra's callback runner turns an exception into a warning and goes on: a check that breaks must stop."""

    @functools.wraps(check)
    def run(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except Exception as e:
            raise Refused(f"hsci could not check where this run writes ({type(e).__name__}: {flat(e)})") from e

    return run


class Guard(Callback):
    """Hydra callback: every run and every sweep starts in a directory of its own, owned by this process."""

    @_strict
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # `name` and the run directory read hydra's runtime choices
        if config.resume:  # the run's own directory, found by `hsci train`; its saved config is checked later
            _own(Path(config.resume), "resume")
            return
        _check(config)
        _own(_settle(config, "run"), "train")

    @_strict
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
        _check(config, tuple(swept))  # the values every job shares; a value swept over is checked by its job
        sweep_dir = _settle(config, "sweep")
        _own(sweep_dir, "sweep")
        subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"])
        unnamable = any(re.search(r"[/\\'\"\s]", o.input_line) for o in parsed if o.is_sweep_override())
        if subdir == NAMED_JOBS and (unnamable or not swept):  # nothing to name, or a value no folder name holds
            subdir = "${hydra.job.num}"
        if "'" in subdir:
            raise Refused(f"hydra.sweep.subdir={subdir}: a job's folder name cannot hold a quote", 2)
        # Each job's folder is checked by `job_dir` before Hydra writes there; the expression is quoted for
        # OmegaConf in double quotes, and the override for Hydra in single ones.
        guarded = "${hsci_job_dir:" + quote(subdir, '"') + "}"
        overrides = [f"hydra.sweep.dir={quote(str(sweep_dir))}", f"hydra.sweep.subdir={quote(guarded)}",
                     "hydra.job.config.override_dirname.exclude_keys=["  # what every job shares names none
                     + ",".join(quote(o.key_or_group) for o in parsed if not o.is_sweep_override()) + "]"]
        if config.hydra.output_subdir == ".hydra":  # left alone for a requeued job: see `job_record`
            OmegaConf.register_new_resolver("hsci_job_record", job_record, replace=True)  # travels to every job
            overrides.append("hydra.output_subdir='${hsci_job_record:${hydra.runtime.output_dir}}'")
        with read_write(config.hydra.overrides):  # each job's config is composed anew from these overrides
            config.hydra.overrides.hydra += overrides

    @_strict
    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if not task_rank():  # the other tasks of a job on several are its rank 0's
            _own(Path(config.hydra.runtime.output_dir), "train")

    @_strict
    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            release(Path(config.hydra.runtime.output_dir))


def _own(folder: Path, verb: str) -> None:
    try:
        claim(folder, verb)
    except UserError as e:
        raise Refused(str(e)) from e


def job_dir(subdir: str) -> str:
    """Resolver of a sweep job's folder (`hydra.sweep.subdir`, wrapped by `Guard`), before Hydra writes there:
    a new folder inside the sweep's, never one that holds a run, another job's or one outside the sweep; a
    requeued job gets its own folder back (`same_job`)."""
    if task_rank():  # a task of a job on several: rank 0's folder, which rank 0 checks
        return str(subdir)
    sweep_dir = Path(HydraConfig.get().sweep.dir).resolve()
    folder = (sweep_dir / str(subdir)).resolve()
    if sweep_dir not in folder.parents:
        raise Refused(f"hydra.sweep.subdir={subdir} leads out of the sweep's folder {sweep_dir}: give each job a "
                      "folder of its own inside it (the default is the job's number)", 2)
    who = owner(folder)
    if who or holds_record(folder) and not same_job(folder):
        raise Refused(f"hydra.sweep.subdir={subdir}: {folder} already holds "
                      f"{'a run in use by ' + who if who else 'a run'}: give each job a folder of its own (the "
                      "default is the job's number)", 2)
    return str(subdir)


def _check(config: DictConfig, swept: tuple[str, ...] = ()) -> None:
    """Values that compose but cannot train, and keys no builder takes, are refused before the run directory
    exists; the cheap checks first."""
    from hsci.parts.keys import check_keys
    from hsci.parts.schema import check_values

    task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])  # hydra's keys resolve late
    try:
        check_values(task, swept)
        if task.trainer.device not in ("auto", "cpu"):  # is it there? torch can tell (and the run needs it next)
            from hsci.parts.build import pick_device

            pick_device(task.trainer.device)
        if task.trainer.devices != 1:  # and that many devices?
            from hsci.parts.build import count_devices

            count_devices(task.trainer.devices, task.trainer.device)
        check_keys(config, config.hydra, swept)  # imports the builders, as the run does next
        if not any(key == "model" or key.startswith("model.") for key in swept):
            from hsci.parts.pretrained import fetch

            fetch(task.model._target_, task.model)  # pretrained weights out of reach: refused before the run dir
    except UserError as e:
        raise Refused(str(e), 2) from e


def _settle(config: DictConfig, kind: str) -> Path:
    """The directory `hydra.<kind>.dir` names, resolved and written back as a plain path, so that what is
    checked is where Hydra writes; created when absent, refused when a run or sweep already wrote there."""
    if config.hydra.output_subdir not in (None, ".hydra"):  # Hydra would write the run's config elsewhere
        raise Refused(f"hydra.output_subdir={config.hydra.output_subdir}: hsci keeps a run's config in "
                      "<run dir>/.hydra, where resume, eval and the sweep summary read it: leave it as it is", 2)
    node = config.hydra[kind]
    try:
        folder = Path(str(node.dir)).expanduser().resolve()  # the default makes a fresh folder (hsci_new_dir)
    except Exception as e:  # an interpolation that cannot resolve, or a folder that cannot be made
        raise Refused(one_line(str(e)), 2) from e
    who = owner(folder)
    if who:
        raise Refused(f"hydra.{kind}.dir={folder} is in use by {who}: choose a new directory", 2)
    if holds_record(folder):
        raise Refused(f"hydra.{kind}.dir={folder} already holds a {'run' if kind == 'run' else 'run or sweep'}: "
                      + (f"continue it with resume={folder}, or " if (folder / '.hydra').is_dir() else "")
                      + "choose a new directory", 2)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Refused(f"cannot create the run directory {folder} ({e.strerror}): start hsci in a writable folder or "
                      f"set hydra.{kind}.dir=<writable folder>", 2) from e
    with read_write(node):
        node.dir = str(folder)
    return folder
