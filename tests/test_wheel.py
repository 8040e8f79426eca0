"""An installed wheel carries its configs: `hsci train experiment=smoke` works from outside the repository."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_installed_wheel_trains_from_another_folder(tmp_path):
    dist, site, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True)
    [wheel] = dist.glob("hsci-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    assert (site / "hsci" / "conf" / "config.yaml").is_file()
    # The wheel's package comes first on the path: the source tree's hsci is not importable from `work`.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import hsci.cli; print(hsci.cli.config_dir())"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(site / "hsci" / "conf")
    result = subprocess.run([str(site / "bin" / "hsci"), "train", "experiment=smoke"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [run] = (work / "outputs").glob("*/*_digits_cnn")
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
