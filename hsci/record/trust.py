"""`hsci trust run=<run dir>`: sign a run directory's config as this user's, so that eval and resume build what
it names (hsci/record/signing.py says which configs build as they are)."""

from omegaconf import OmegaConf

from hsci import UserError, flat
from hsci.record import rundir
from hsci.record.owner import find_run
from hsci.record.signing import SIGNATURE, interpolation, signatures, walk


def run_trust(args: list[str]) -> int:
    """`hsci trust run=<run dir>`: sign a run directory's config as this user's."""
    if len(args) != 1 or not args[0].startswith("run="):
        raise UserError("usage: hsci trust run=<run dir> (signs its .hydra/config.yaml as yours: read it first)")
    run = find_run(args[0].split("=", 1)[1], "run")
    path = run / ".hydra" / "config.yaml"
    text = path.read_bytes()
    try:
        config = OmegaConf.to_container(OmegaConf.create(text.decode()), resolve=False)
    except Exception as e:  # not YAML, or not a mapping: nothing hsci could build from
        raise UserError(f"trust: cannot read {path} ({flat(e)[:200]})") from e
    values = list(walk(config))
    hidden = interpolation(values)
    if hidden:  # what an interpolation builds cannot be read off the file
        raise UserError(f"trust: {path} holds an interpolation at {hidden[0]}, which hsci never saves and whose "
                        "result cannot be read off the file: remove or resolve it, then trust the run")
    rundir.write_atomic(run / SIGNATURE, lambda f: f.write(signatures(run, text, add=True).encode()))
    targets = sorted({str(value) for _, key, value in values if key == "_target_"})
    print(f"trusted {run}: eval and resume will build what its config names: {', '.join(targets)}")
    return 0
