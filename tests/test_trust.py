"""Untrusted run directories: a config this user's hsci signed builds as it is; one from elsewhere builds only
what hsci's own configs can name, until `hsci trust` signs it."""

import shutil

import pytest
from omegaconf import OmegaConf

from conftest import hsci, run_dirs, summary_of
from hsci import UserError
from hsci.record import signing, trust

MY_MODEL = '''"""A user's own model, named by their own --config-dir."""
from torch import nn


def tiny(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_outputs))
'''


def test_own_targets_build_as_ones_own_and_a_received_run_once_trusted(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "mymodels.py").write_text(MY_MODEL)
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "tiny.yaml").write_text("# my model\n_target_: mymodels.tiny\n")
    code = {"PYTHONPATH": str(tmp_path / "code")}
    other = {**code, "XDG_CONFIG_HOME": str(tmp_path / "another_user")}  # another user: another key
    trained = hsci("train", "--config-dir", "my_conf", "model=tiny", "experiment=smoke", cwd=tmp_path, env=code)
    assert trained.returncode == 0, trained.stderr
    [run] = run_dirs(tmp_path)
    mine, theirs = (hsci("eval", f"run={run}", cwd=tmp_path, env=env) for env in (code, other))
    assert mine.returncode == 0, mine.stderr  # signed by this user: no ceremony
    assert theirs.returncode == 1
    assert theirs.stderr.strip() == (f"error: eval: refusing {run}/.hydra/config.yaml: model._target_ names "
                                     "mymodels.tiny, which hsci builds only from a config it wrote; if you trust this "
                                     f"run directory, run hsci trust run={run} first (README: Untrusted files)")
    trusted = hsci("trust", f"run={run}", cwd=tmp_path, env=other)
    assert trusted.returncode == 0 and "mymodels.tiny" in trusted.stdout
    theirs, mine = (hsci("eval", f"run={run}", "split=val", cwd=tmp_path, env=env) for env in (other, code))
    assert theirs.returncode == 0 and mine.returncode == 0, theirs.stderr + mine.stderr  # both signatures hold
    assert f"acc {summary_of(run)['best_val']['val_acc']:.4f}" in theirs.stdout


@pytest.mark.parametrize("target, ok", [
    ("hsci.data.digits", True), ("hsci.models.resnet", True), ("hsci.schedulers.cosine", True),
    ("torch.nn.CrossEntropyLoss", True), ("torch.optim.AdamW", True), ("torch.optim.lr_scheduler.StepLR", True),
    ("torchvision.models.resnet18", True), ("torchvision.models.VisionTransformer", True),
    ("shutil.copyfile", False), ("os.system", False), ("builtins.eval", False), ("torch.save", False),
    ("torch.load", False), ("torch.hub.load", False), ("torch.os.system", False), ("hsci.rundir.write_json", False),
    ("hsci.data.Tensors", False), ("hsci.data.np.save", False), ("hsci.models._download", False),
    ("torchvision.datasets.utils.download_url", False), ("antigravity.fly", False)])
def test_what_a_config_from_elsewhere_may_build(target, ok):
    assert signing.allowed(target) is ok


def test_a_config_from_elsewhere_may_not_hold_interpolations(tmp_path):
    cfg = OmegaConf.create({"data": {"_target_": "hsci.data.digits", "root": "${hsci_new_dir:/tmp/made}"}})
    with pytest.raises(UserError, match=r"data.root holds an interpolation \(\$\{hsci_new_dir:/tmp/made\}\)"):
        signing.check(cfg, tmp_path / ".hydra" / "config.yaml", "eval")


def test_hsci_trust_refuses_a_config_whose_interpolations_hide_what_it_builds(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    config = run / ".hydra" / "config.yaml"
    hidden = "\n  note: \"${oc.create:'{_target_: shutil.copyfile, _args_: [a, b]}'}\""
    config.write_text(config.read_text().replace("_target_: hsci.models.cnn", "_target_: hsci.models.cnn" + hidden))
    with pytest.raises(UserError, match="holds an interpolation at model.note"):
        trust.run_trust([f"run={run}"])
    assert not signing.signed(run, config.read_bytes())


def test_signatures_are_per_user_and_per_content(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    text = b"seed: 0\n"

    def sign(text: bytes, add: bool = False) -> None:
        (run / signing.SIGNATURE).write_text(signing.signatures(run, text, add))

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "a"))
    sign(text)
    assert signing.signed(run, text) and not signing.signed(run, b"seed: 1\n")
    assert (tmp_path / "a" / "hsci" / "key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "b"))
    assert not signing.signed(run, text)
    sign(text, add=True)  # `hsci trust` by a second user keeps the first user's signature
    assert signing.signed(run, text)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "a"))
    assert signing.signed(run, text)
    sign(b"seed: 1\n")  # a config written anew: only its writer's signature
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "b"))
    assert not signing.signed(run, b"seed: 1\n")
