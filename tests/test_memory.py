"""A model or built-in data set that cannot fit in memory is refused (exit 2) before anything is allocated.

The estimates are checked against what tracemalloc sees NumPy allocate, the refusals through the
real command line under an address-space limit far below the refused sizes (so an attempt to
allocate would fail with MemoryError instead of the one-line refusal), and the README's runs pass.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import mpirun, small_config

import dpbp
from dpbp import data as data_mod
from dpbp import memory
from dpbp.comm import SerialComm
from dpbp.config import default_config, load_config
from dpbp.errors import ConfigError, DataError
from dpbp.train import AgreedError, Trainer, check_memory, prepare_data

REPO = Path(dpbp.__file__).resolve().parent.parent
GiB = 2**30
HUGE_MODEL = "model.layers=[2,100000000000,5]"  # 8e11 parameters: terabytes on any machine
HUGE_DATA = "data.train=spirals:n=10000000000000"
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MV2_", "SLURM_", "MPI_LOCAL")


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k != "DPBP_COMM"}
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [out.get("PYTHONPATH")])])
    out["OPENBLAS_NUM_THREADS"] = "1"  # BLAS thread stacks are address space too
    return out


@pytest.fixture
def single_rank(monkeypatch):
    """Estimates for one process, also when the tests themselves run under mpirun."""
    for name in list(os.environ):
        if name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)


# ----------------------------------------------------------------------------- what is available


def fake_proc(root: Path, mountinfo: list[str], cgroup: list[str], mem_available_kb: int | None = 2_000_000) -> str:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    if mem_available_kb is not None:
        (proc / "meminfo").write_text(f"MemTotal:       9999999 kB\nMemAvailable:   {mem_available_kb} kB\n")
    (proc / "self" / "mountinfo").write_text("".join(line + "\n" for line in mountinfo))
    (proc / "self" / "cgroup").write_text("".join(line + "\n" for line in cgroup))
    return str(proc)


def write_files(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_mem_available_alone(tmp_path):
    proc = fake_proc(tmp_path, [], [])
    assert memory.available_bytes(proc) == (2_000_000 * 1024, "MemAvailable")


def test_nothing_known_means_no_check(tmp_path):
    assert memory.available_bytes(fake_proc(tmp_path, [], [], mem_available_kb=None)) is None


def test_cgroup_v2_limit_minus_usage_without_page_cache(tmp_path):
    point = tmp_path / "cg2"
    write_files(point / "job", memory_max="1000000000\n", memory_current="400000000\n",
                memory_stat="anon 300000000\ninactive_file 100000000\n")
    write_files(point, memory_max="max\n", memory_current="5000000000\n")  # the root: unlimited
    proc = fake_proc(tmp_path, [f"41 31 0:38 / {point} rw,relatime - cgroup2 cgroup2 rw"], ["0::/job"])
    assert memory.available_bytes(proc) == (1_000_000_000 - 300_000_000, "the memory cgroup's limit minus its usage")


def test_cgroup_v2_a_tighter_parent_wins(tmp_path):
    point = tmp_path / "cg2"
    write_files(point / "slurm" / "job", memory_max="max\n", memory_current="100\n")
    write_files(point / "slurm", memory_max="500000000\n", memory_current="200000000\n")
    proc = fake_proc(tmp_path, [f"41 31 0:38 / {point} rw - cgroup2 cgroup2 rw"], ["0::/slurm/job"])
    assert memory.available_bytes(proc)[0] == 300_000_000


def test_cgroup_v1_with_the_container_subtree_mounted(tmp_path):
    point = tmp_path / "memory"  # the container sees its own cgroup (/docker/abc) at the mount point
    write_files(point, memory_limit_in_bytes="800000000\n", memory_usage_in_bytes="300000000\n",
                memory_stat="cache 1\ntotal_inactive_file 50000000\n")
    proc = fake_proc(tmp_path, [f"35 31 0:32 /docker/abc {point} rw - cgroup cgroup rw,memory",
                                f"36 31 0:33 / {tmp_path / 'cpu'} rw - cgroup cgroup rw,cpu"],
                     ["5:cpu:/docker/abc", "4:memory:/docker/abc"])
    assert memory.available_bytes(proc)[0] == 800_000_000 - 250_000_000


def test_cgroup_v1_without_a_limit_leaves_mem_available(tmp_path):
    point = tmp_path / "memory"
    write_files(point / "p" / "x", memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes="6295552\n")
    write_files(point / "p", memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes="6295552\n")
    proc = fake_proc(tmp_path, [f"35 31 0:32 / {point} rw - cgroup cgroup rw,memory"], ["4:memory:/p/x", "0::/"])
    assert memory.available_bytes(proc) == (2_000_000 * 1024, "MemAvailable")


def test_this_machine_reports_something():
    found = memory.available_bytes()
    assert found is not None and found[0] > 0  # Linux: /proc/meminfo exists


# ----------------------------------------------------------------------------- honest estimates


@pytest.mark.parametrize("layers,dtype,optimizer,batch", [
    ("[2,20000,5]", "float32", "adam", 64),
    ("[50,1000,1000,5]", "float64", "sgd", 32),
    ("[2,1500,1500,5]", "float32", "momentum", 16),
    ("[2,1200,1200,1200,5]", "float32", "sgd", 8),
    ("[2,600,600,600,5]", "float64", "rmsprop", 128),
])
def test_model_estimate_covers_what_training_allocates(single_rank, layers, dtype, optimizer, batch):
    sizes = [int(s) for s in layers.strip("[]").split(",")]
    source = f"highdim:n=400,d={sizes[0]},classes=5" if sizes[0] != 2 else "spirals:n=400,classes=5"
    cfg = small_config(f"model.layers={layers}", f"train.optimizer={optimizer}", f"train.batch_size={batch}",
                       f"data.train={source}", "train.check_sync_every=0", dtype=dtype)
    data = prepare_data(cfg)
    order = np.arange(data.train.n_samples)
    tracemalloc.start()
    try:
        trainer = Trainer(cfg, SerialComm(), None, echo=lambda s: None, data=data)
        trainer.step(order, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    states = len(trainer.optimizer.state_names)
    estimate = memory.model_bytes(sizes, np.dtype(dtype).itemsize, states, batch)
    assert peak - 2**20 <= estimate <= 1.25 * peak, (estimate, peak)  # 1 MiB: imports and the like


@pytest.mark.parametrize("source,dtype", [
    ("spirals:n=1000000", "float32"), ("xor:repeat=250000", "float64"),
    ("highdim:n=50000,d=100", "float32"), ("highdim:n=50000,d=100", "float64"), ("highdim:n=20,d=50000", "float32"),
])
def test_builtin_estimate_covers_loading_splitting_and_normalising(single_rank, source, dtype):
    task = ["model.loss=mse", "model.output=sigmoid"] if source.startswith("xor") else []
    cfg = small_config(f"data.train={source}", "model.layers=[]", "model.hidden=[4]", *task, dtype=dtype)
    tracemalloc.start()
    try:
        data = prepare_data(cfg)  # load, check, split, encode, normalise: what training holds and made on the way
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.train.x.dtype == np.dtype(dtype)
    estimate = data_mod.builtin_bytes(source, dtype)
    assert peak - 2**20 <= estimate <= 1.5 * peak, (estimate, peak)


def test_ranks_on_a_node_multiply_the_need():
    one = memory.model_bytes([784, 256, 10], 4, 2, 64, ranks=1)
    four = memory.model_bytes([784, 256, 10], 4, 2, 64, ranks=4)
    n = 784 * 256 + 256 + 256 * 10 + 10
    assert four == 4 * one + 3 * n * 4  # plus the node-shared window's parameters and Adam state


def test_readme_runs_are_never_refused(single_rank, monkeypatch):
    # MNIST 784-256-10 (batch 128), the default 2-128-128-5, and the benchmark's 784-1024-1024-10 at 8 ranks
    assert memory.model_bytes([784, 256, 10], 4, 2, 128) < 8 * 2**20
    assert memory.model_bytes([2, 128, 128, 5], 4, 2, 64) < 2**20
    assert memory.model_bytes([784, 1024, 1024, 10], 4, 2, 64, ranks=8) < 400 * 2**20
    assert data_mod.builtin_bytes("highdim") < 64 * 2**20
    monkeypatch.setattr(memory, "available_bytes", lambda proc="/proc": (1 * GiB, "a small laptop"))
    check_memory(default_config())
    check_memory(load_config(None, ["model.layers=[784,256,10]", "train.batch_size=128", "data.train=highdim",
                                    "model.layers=[100,256,10]"]))


# ----------------------------------------------------------------------------- refusals


def test_library_callers_are_refused_before_allocating(single_rank, monkeypatch):
    """Trainer and load_source check on their own (for callers that skip the CLI's early check)."""
    monkeypatch.setattr(memory, "available_bytes", lambda proc="/proc": (2**20, "test"))
    with pytest.raises(DataError, match=r"built-in spirals:n=100000,.* needs about 6.1 MiB .*1 MiB are available"):
        data_mod.load_source("spirals:n=100000")
    cfg = small_config("model.layers=[2,100000,3]")
    data = prepare_data(small_config())
    with pytest.raises(AgreedError, match=r"config model.layers: \[2, 100000, 3\] needs about .* 1 MiB are available"):
        Trainer(cfg, SerialComm(), None, echo=lambda s: None, data=data)
    with pytest.raises(ConfigError, match="model.layers"):
        check_memory(cfg)


def limited_address_space() -> None:
    limit = 2 * GiB  # far below every refused size, far above what a refusal needs
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.parametrize("setting,needles", [
    (HUGE_MODEL, ["config model.layers: [2, 100000000000, 5] needs about", "TiB of memory", "are available"]),
    (HUGE_DATA, ["data.train: 'spirals:n=10000000000000' needs about", "TiB of memory", "are available"]),
], ids=["model", "data"])
def test_cli_refuses_before_allocating_or_writing(tmp_path, setting, needles):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dpbp.cli", "train", "--set", setting, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=60, env=env(), preexec_fn=limited_address_space)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not run_dir.exists()


def test_cli_refusal_under_mpirun_is_one_message(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", "--set", HUGE_MODEL,
                           "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("needs about") == 1 and "2 ranks on this node" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()
