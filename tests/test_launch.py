"""launch/: the sbatch scripts are valid bash and give Lightning's SLURM environment what it needs."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from distill_forget.config import CONFIG_DIR, load_config
from distill_forget.requests import load_requests

LAUNCH_DIR = Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = sorted(LAUNCH_DIR.glob("*.sbatch"))
MODEL_CONFIGS = sorted((CONFIG_DIR / "models").glob("*.yaml"))


def directives(script: Path) -> dict[str, str]:
    """`#SBATCH --key=value` lines as {key: value}."""
    found = re.findall(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", script.read_text(), flags=re.M)
    return dict(found)


def test_there_are_scripts_for_one_node_and_several():
    nodes = {script.name: int(directives(script)["nodes"]) for script in SCRIPTS}
    assert nodes.get("one-node.sbatch") == 1 and nodes.get("multi-node.sbatch", 0) > 1, nodes


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_and_fits_lightnings_slurm_environment(script):
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    sbatch = directives(script)
    # one process per GPU: Lightning refuses devices != --ntasks-per-node
    assert sbatch["ntasks-per-node"] == sbatch["gpus-per-node"], sbatch
    assert "ntasks" not in sbatch  # Lightning rejects --ntasks without --ntasks-per-node
    signal, lead = re.fullmatch(r"(?:B:)?(\w+)@(\d+)", sbatch["signal"]).groups()
    assert signal in ("SIGUSR1", "USR1") and int(lead) >= 30, sbatch["signal"]  # time to save a checkpoint
    assert not sbatch["signal"].startswith("B:")  # the signal must reach the srun tasks, where Lightning listens
    assert "requeue" in sbatch
    body = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    launch = " ".join(line.rstrip("\\") for line in body if line.strip())
    assert re.search(r"\bsrun\b[^;&|]*python -m distill_forget\.train\b", launch), "srun must start the loop"
    assert "torchrun" not in launch and "torch.distributed.run" not in launch


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_config_requests_and_run_folder_to_the_loop(script, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/bash\necho "srun $*"\n')
    (fake_bin / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "REPO": str(LAUNCH_DIR.parent),
           "CONFIG": "configs/models/sd15.yaml", "REQUESTS": "configs/requests/sd-example.yaml",
           "RUN_DIR": str(tmp_path / "run")}  # fmt: skip
    out = subprocess.run(["bash", str(script), "step.steps=5"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert (f"python -m distill_forget.train config=configs/models/sd15.yaml "
            f"requests=configs/requests/sd-example.yaml run_dir={tmp_path / 'run'} "
            "step.steps=5") in out.stdout  # fmt: skip

    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "RUN_DIR"}, check=False)  # fmt: skip
    assert missing.returncode != 0 and "RUN_DIR" in missing.stderr


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_model_configs_load_with_their_example_requests(path):
    cfg = load_config("train", [f"config={path}"], sections=("step", "evaluate"))
    assert cfg.step.world == "none" and cfg.step.trainable == "full" and cfg.step.lr <= 5e-5
    assert cfg.step.strategy == ("fsdp" if path.stem == "sdxl" else "ddp")
    assert cfg.step.batch % 8 == 0  # splits over 8 GPUs per node
    assert cfg.step.retain.prompts and cfg.model
    example = re.search(r"requests=(\S+)", path.read_text()).group(1)
    requests = load_requests(LAUNCH_DIR.parent / example, cfg.step)
    assert requests and all(r.prompts for r in requests)  # world: none needs them
    assert cfg.evaluate.seeds == load_config("evaluate", []).seeds  # the other settings keep their home


def test_a_config_file_with_an_unknown_setting_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("step:\n  stratgy: ddp\n")
    with pytest.raises(SystemExit, match=r"bad.yaml: unknown setting\(s\) \['step.stratgy'\]"):
        load_config("train", [f"config={bad}"], sections=("step", "evaluate"))
    with pytest.raises(SystemExit, match="config=models/nope: no such file"):
        load_config("train", ["config=models/nope"], sections=("step", "evaluate"))
