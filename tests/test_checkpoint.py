"""Checkpoints: pickle-free format, corruption detection, exact resume, refusal of mismatches."""

from __future__ import annotations

import io
import json
import re
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from helpers import as_format_1, small_config

from dpbp import checkpoint as ckpt
from dpbp import rundir
from dpbp.comm import SerialComm
from dpbp.errors import CheckpointError, DpbpError
from dpbp.train import Trainer, TrainingError, prepare_data

TIMING = ("samples_per_s", "seconds")


def trainer(cfg, run_dir=None):
    return Trainer(cfg, SerialComm(), run_dir, echo=lambda text: None)


def comparable(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A float64 run with checkpoints every 7 steps (mid-epoch: 16 steps per epoch)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = small_config("train.epochs=3", "checkpoint.every_steps=7", "checkpoint.keep=100",
                       "train.schedule=cosine", f"run.dir={run_dir}")
    t = trainer(cfg, run_dir)
    run_dir.mkdir(exist_ok=True)
    result = t.run()
    return cfg, run_dir, result


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop", "adam"])
def test_resume_mid_epoch_is_bit_identical(tmp_path, dtype, optimizer):
    cfg = small_config("train.epochs=3", "checkpoint.every_steps=5", "checkpoint.keep=100",
                       f"train.optimizer={optimizer}", "train.warmup_epochs=1", dtype=dtype)
    full = trainer(cfg, tmp_path).run()
    checkpoints = ckpt.periodic_checkpoints(tmp_path / "checkpoints")
    mid = [p for p in checkpoints if int(p.stem[5:]) % 16 not in (0,)]  # 16 steps per epoch
    assert mid, "expected mid-epoch checkpoints"
    for path in (mid[0], mid[len(mid) // 2], mid[-1]):
        resumed = trainer(cfg, None)
        resumed.restore(path)
        assert 0 < resumed.state.step_in_epoch < resumed.steps_per_epoch
        out = resumed.run()
        np.testing.assert_array_equal(out.model.params, full.model.params)
        assert comparable(out.history) == comparable(full.history)
        assert out.state.global_step == full.state.global_step


def test_checkpoint_holds_everything_documented(saved_run):
    cfg, run_dir, result = saved_run
    path, skipped = rundir.find_latest(run_dir, ckpt.load_checkpoint)
    assert skipped == [] and path.name == ckpt.checkpoint_name(result.state.global_step)
    arrays, meta = ckpt.load_checkpoint(path)
    for key in ("format", "format_version", "dpbp_version", "config", "model", "state", "optimizer",
                "schedule", "rng", "history", "world_size", "data_digest", "normalize", "targets", "run"):
        assert key in meta, key
    assert meta["format_version"] == ckpt.CHECKPOINT_VERSION == 4
    assert meta["targets"] == {"task": "classification", "outputs": 3, "classes": [0, 1, 2], "normalize": "none",
                               "label_column": "last", "label_name": None, "header": "auto"}
    record = json.loads((run_dir / "run.json").read_text())
    assert meta["run"]["run_id"] == record["run_id"] and meta["run"]["seq"] < record["next_seq"]
    assert set(meta["state"]) >= {"epoch", "step_in_epoch", "global_step", "best_val_loss"}
    assert set(arrays) == {"params", "optim_m", "optim_v", "optim_t", "norm_shift", "norm_scale"}
    fitted = prepare_data(cfg).normalizer  # the normaliser the run applied, float64 whatever the model dtype
    assert meta["normalize"] == fitted.kind == "standard"
    np.testing.assert_array_equal(arrays["norm_shift"], fitted.shift)
    np.testing.assert_array_equal(arrays["norm_scale"], fitted.scale)
    assert arrays["norm_shift"].dtype == arrays["params"].dtype == np.float64
    with zipfile.ZipFile(path) as zf:
        assert "sha256.npy" in zf.namelist()
    with np.load(path, allow_pickle=False) as npz:  # loads without pickle, no object arrays
        assert all(npz[name].dtype != object for name in npz.files)
    assert (run_dir / "checkpoints" / "best.npz").is_file()


def test_keep_prunes_old_checkpoints(tmp_path):
    cfg = small_config("train.epochs=2", "checkpoint.every_steps=3", "checkpoint.keep=2")
    trainer(cfg, tmp_path).run()
    names = [p.name for p in ckpt.periodic_checkpoints(tmp_path / "checkpoints")]
    assert names == [ckpt.checkpoint_name(30), ckpt.checkpoint_name(32)]


def test_truncated_checkpoints_are_refused(saved_run, tmp_path):
    _, run_dir, _ = saved_run
    good = ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1].read_bytes()
    bad = tmp_path / "bad.npz"
    for length in sorted({0, 1, 10, 100, len(good) // 3, len(good) // 2, len(good) - 100, len(good) - 1}):
        bad.write_bytes(good[:length])
        with pytest.raises(CheckpointError, match="bad.npz"):
            ckpt.load_checkpoint(bad)


@pytest.mark.parametrize("seed", range(40))
def test_random_byte_flips_are_refused_or_harmless(saved_run, tmp_path, seed):
    """A flip either raises CheckpointError or lands where it changes nothing we read."""
    _, run_dir, _ = saved_run
    path = ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1]
    good = path.read_bytes()
    ref_arrays, ref_meta = ckpt.load_checkpoint(path)
    rng = np.random.default_rng(seed)
    data = bytearray(good)
    for pos in rng.integers(0, len(data), size=1 + seed % 3):
        data[pos] ^= 1 << int(rng.integers(0, 8))
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    try:
        arrays, meta = ckpt.load_checkpoint(bad)
    except CheckpointError:
        return
    assert meta == ref_meta
    assert arrays.keys() == ref_arrays.keys()
    for name in arrays:
        assert arrays[name].tobytes() == ref_arrays[name].tobytes()


def test_tampered_checkpoint_fails_its_checksum(saved_run, tmp_path):
    _, run_dir, _ = saved_run
    arrays, meta = ckpt.load_checkpoint(ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1])
    with np.load(ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1]) as npz:
        raw = {name: npz[name] for name in npz.files}
    raw["params"] = raw["params"].copy()
    raw["params"][0] += 1.0  # a consistent zip with changed numbers
    np.savez(tmp_path / "tampered.npz", **raw)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt.load_checkpoint(tmp_path / "tampered.npz")
    meta_bytes = json.dumps({**meta, "state": {**meta["state"], "global_step": 1}}).encode()
    raw["params"][0] -= 1.0
    raw["meta"] = np.frombuffer(meta_bytes, np.uint8)
    np.savez(tmp_path / "tampered_meta.npz", **raw)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt.load_checkpoint(tmp_path / "tampered_meta.npz")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError, match="not a dpbp checkpoint file \\(not an .npz archive\\)"):
        ckpt.load_checkpoint(tmp_path / "text.npz")
    np.savez(tmp_path / "plain.npz", params=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a dpbp checkpoint"):
        ckpt.load_checkpoint(tmp_path / "plain.npz")
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "missing.npz")


def test_latest_skips_a_corrupt_newest(tmp_path):
    cfg = small_config("train.epochs=1", "checkpoint.every_steps=5", "checkpoint.keep=100",
                       "checkpoint.keep_best=false")
    trainer(cfg, tmp_path).run()
    paths = ckpt.periodic_checkpoints(tmp_path / "checkpoints")
    with np.load(paths[-1]) as npz:
        raw = {name: npz[name] for name in npz.files}
    raw["params"][0] += 1.0  # the metadata still reads, the checksum fails
    np.savez(paths[-1], **raw)
    found, skipped = rundir.find_latest(tmp_path, ckpt.load_checkpoint)
    assert found == paths[-2]
    assert len(skipped) == 1 and paths[-1].name in skipped[0] and "checksum" in skipped[0]
    assert rundir.find_latest(tmp_path / "nothing", ckpt.load_checkpoint) == (None, [])


@pytest.mark.parametrize("override,match", [
    ("model.layers=[2,9,8,3]", r"different model \(sizes: checkpoint \[2, 8, 8, 3\], config \[2, 9, 8, 3\]\)"),
    ("model.activation=tanh", "activation: checkpoint 'relu', config 'tanh'"),
    ("model.dtype=float32", "dtype: checkpoint 'float64', config 'float32'"),
    ("train.optimizer=sgd", "trained with optimizer 'adam'"),
    ("train.batch_size=16", r"cannot resume with changed train.batch_size"),
    ("train.seed=3", r"changed .*train.seed"),
])
def test_resume_refuses_another_model_or_data_order(saved_run, override, match):
    cfg, run_dir, _ = saved_run
    other = small_config("train.epochs=3", "checkpoint.every_steps=7", "checkpoint.keep=100",
                         "train.schedule=cosine", f"run.dir={run_dir}", override)
    with pytest.raises(DpbpError, match=match) as info:  # agreed across ranks, exit code kept
        trainer(other).restore(ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1])
    assert info.value.exit_code == 2


def test_a_key_newer_than_the_checkpoint_counts_as_its_default():
    """A config saved before model.dropout/model.batch_norm existed resumes under the same settings."""
    from dpbp import config as config_mod
    from dpbp.runstate import frozen_changes

    cfg = small_config("train.epochs=3")
    older = config_mod.to_dict(cfg)
    for key in ("dropout", "batch_norm", "precision", "products"):
        del older["model"][key]
    assert frozen_changes(older, cfg) == []
    assert frozen_changes(older, small_config("train.epochs=3", "model.dropout=0.2")) == ["model.dropout"]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    cfg = small_config("checkpoint.every_steps=1", "train.epochs=5", "checkpoint.keep=1000")
    t = trainer(cfg, tmp_path)
    t.data.train.x[100] = np.nan  # reached somewhere in the first epoch
    with pytest.raises(TrainingError, match=r"step (\d+) \(epoch 1\): loss is nan") as info:
        t.run()
    assert f"step {t.state.global_step + 1} " in str(info.value)
    newest, skipped = rundir.find_latest(tmp_path, ckpt.load_checkpoint)
    arrays, meta = ckpt.load_checkpoint(newest)
    assert np.all(np.isfinite(arrays["params"])) and skipped == []
    assert meta["state"]["global_step"] == t.state.global_step


def test_nonfinite_skip_skips_the_update_on_all_ranks():
    cfg = small_config("train.on_nonfinite=skip", "train.optimizer=sgd", "train.epochs=1")
    t = trainer(cfg)
    t.data.train.x[5] = np.inf  # poison one row: the batches holding it are skipped
    before = t.model.params.copy()
    order = np.arange(t.data.train.n_samples)
    loss_sum, _, _ = t.step(order, 0)
    assert not np.isfinite(loss_sum)
    np.testing.assert_array_equal(t.model.params, before)
    t.step(order, 1)  # a clean batch updates again
    assert not np.array_equal(t.model.params, before)


def test_unwritable_checkpoint_folder_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    t = trainer(small_config("checkpoint.every_steps=2"), tmp_path)
    with pytest.raises(DpbpError, match="could not write checkpoint") as info:
        t.run()
    assert info.value.exit_code == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_second_signal_exits_at_once(tmp_path):
    import subprocess
    import sys

    script = ("import os, signal, time\n"
              "from dpbp.signals import StopRequest\n"
              "stop = StopRequest().install()\n"
              "os.kill(os.getpid(), signal.SIGUSR1)\n"
              "assert stop.requested and stop.name == 'SIGUSR1'\n"
              "print('flag set', flush=True)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert proc.stdout == "flag set\n"
    assert proc.returncode == 128 + 15


def test_nonfinite_gradient_names_the_layer(tmp_path):
    cfg = small_config("train.epochs=1")
    t = trainer(cfg, tmp_path)
    real = t.model.loss_and_grad_sum

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        t.model.layer_views(t.exchange.grad)[0][1][0, 0] = np.inf  # layer 2's weight gradient
        return stats

    t.model.loss_and_grad_sum = poisoned
    with pytest.raises(TrainingError, match=r"step 1 \(epoch 1\): gradient of layer 2 is not finite"):
        t.run()


@pytest.mark.parametrize("edit", [
    lambda m: m["state"].update(bogus=1),
    lambda m: m["state"].update(step_in_epoch=10_000),
    lambda m: m.update(history=5),
    lambda m: m.update(model="not a dict"),
    lambda m: m["optimizer"].pop("name"),
])
def test_well_formed_but_nonsensical_checkpoints_are_refused(saved_run, tmp_path, edit):
    """A hand-made file with a valid checksum but broken metadata: a clear error, never a traceback."""
    cfg, run_dir, _ = saved_run
    arrays, meta = ckpt.load_checkpoint(ckpt.periodic_checkpoints(run_dir / "checkpoints")[-2])
    edit(meta)
    ckpt.save_checkpoint(tmp_path / "crafted.npz", arrays, meta)
    with pytest.raises(DpbpError, match="crafted.npz") as info:
        trainer(cfg).restore(tmp_path / "crafted.npz")
    assert info.value.exit_code == 2


# ----------------------------------------------------------------------------- reading crafted files


def write_zip(path, members: dict[str, tuple[bytes, int, int]]) -> None:
    """Hand-write a zip: member name -> (raw bytes, method, the uncompressed size it declares).

    Stored members get their real CRC; deflated ones CRC 0 (a reader that checks sizes
    first never decompresses them). A name may repeat if given as ``name#k``.
    """
    out, central = bytearray(), bytearray()
    for key, (data, method, size) in members.items():
        name = key.split("#")[0].encode()
        crc = zlib.crc32(data) if method == zipfile.ZIP_STORED else 0
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(data), size,
                               len(name), 0, 0, 0, 0, 0, len(out)) + name
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), size, len(name), 0)
        out += name + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))


def npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def stored(data: bytes, size: int | None = None) -> tuple[bytes, int, int]:
    return data, zipfile.ZIP_STORED, len(data) if size is None else size


def real_members(path) -> dict[str, tuple[bytes, int, int]]:
    with zipfile.ZipFile(path) as zf:
        return {name: stored(zf.read(name)) for name in zf.namelist()}


def refused_unread(path, match: str, limit: int = 1 << 20) -> None:
    """load_checkpoint refuses ``path`` with ``match`` while allocating less than ``limit`` bytes."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            ckpt.load_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"{peak} bytes allocated while refusing {path.name}: {info.value}"
    assert re.search(match, str(info.value)), str(info.value)
    assert str(path) in str(info.value)


def test_decompression_bomb_is_refused_before_decompressing(saved_run, tmp_path):
    """3 MB on disk, 3 GiB of zeros declared in ``params``: refused from the zip directory alone."""
    _, run_dir, _ = saved_run
    members = real_members(ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1])
    n = 3 * 2**30 // 8
    header = npy_header((n,))
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = co.compress(header) + co.flush(zlib.Z_FULL_FLUSH)
    mib = bytes(1 << 20)  # after a full flush, every MiB of zeros compresses to the same bytes
    piece = co.compress(mib) + co.flush(zlib.Z_FULL_FLUSH)
    stream = head + piece * 3072 + co.flush()
    members["params.npy"] = (stream, zipfile.ZIP_DEFLATED, len(header) + 8 * n)
    bomb = tmp_path / "bomb.npz"
    write_zip(bomb, members)
    assert bomb.stat().st_size < 4 << 20
    refused_unread(bomb, r"\['params'\] are compressed")


def test_sizes_the_zip_directory_cannot_hold_are_refused(saved_run, tmp_path):
    _, run_dir, _ = saved_run
    members = real_members(ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1])
    data = members["params.npy"][0]
    members["params.npy"] = stored(data, size=3 * 2**30)  # the directory claims 3 GiB of stored bytes
    write_zip(tmp_path / "liar.npz", members)
    refused_unread(tmp_path / "liar.npz", r"declares 32\d+ bytes of members in a \d+-byte file")


def test_metadata_over_the_limit_is_refused_before_parsing(saved_run, tmp_path, monkeypatch):
    _, run_dir, _ = saved_run
    path = ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1]
    monkeypatch.setattr(ckpt, "META_MAX_BYTES", 1000)  # real metadata here is a few kB
    monkeypatch.setattr(ckpt.json, "loads", lambda *a, **k: pytest.fail("metadata parsed"))
    refused_unread(path, r"metadata of \d+ bytes is over the 1000-byte limit")


def crafted(saved_run, tmp_path, edit) -> object:
    """A checkpoint with a VALID checksum whose arrays/metadata ``edit(arrays, meta)`` changed."""
    _, run_dir, _ = saved_run
    arrays, meta = ckpt.load_checkpoint(ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1])
    edit(arrays, meta)
    path = tmp_path / "crafted.npz"
    ckpt.atomic_write_npz(path, arrays, meta)
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda a, m: a.update(extra=np.zeros(3)), r"unexpected member\(s\) \['extra'\]"),
    (lambda a, m: a.pop("optim_v"), r"missing array\(s\) \['optim_v'\]"),
    (lambda a, m: a.update(params=a["params"].astype(np.float32)),
     r"array 'params' is \(123,\) float32; its metadata implies \(123,\) float64"),
    (lambda a, m: a.update(norm_shift=a["norm_shift"][:1]), r"array 'norm_shift' is \(1,\) float64; .* \(2,\)"),
    (lambda a, m: a.update(optim_t=np.array([3])), r"array 'optim_t' is \(1,\) int64; .* \(\) int64"),
    (lambda a, m: a.update(params=a["params"].astype(object)), r"array 'params.npy' declares shape \(123,\) object"),
    (lambda a, m: m.update(normalize="none"), r"unexpected member\(s\) \['norm_scale', 'norm_shift'\]"),
    (lambda a, m: m["model"].update(sizes=[2, 10**5, 10**5, 3]), r"describes arrays of \d+ bytes, more than the whole"),
    (lambda a, m: m["model"].update(sizes=[2, 0, 3]), "malformed checkpoint metadata .*positive integers"),
    (lambda a, m: m["optimizer"].update(name="lbfgs"), "malformed checkpoint metadata .*unknown optimizer"),
])
def test_members_that_do_not_fit_the_metadata_are_refused_unread(saved_run, tmp_path, edit, match):
    refused_unread(crafted(saved_run, tmp_path, edit), match)


@pytest.mark.parametrize("change,match", [
    ("huge-header", r"array 'params.npy' declares shape \(1000000000,\) float64 \(8000000000 bytes\) but holds"),
    ("duplicate", r"unexpected member\(s\) \['params.npy'\]"),
    ("not-npy", r"unexpected member\(s\) \['params.bin'\]"),
    ("two-sizes", r"gives stored member\(s\) \['params'\] two different sizes"),
])
def test_forged_zip_members_are_refused_unread(saved_run, tmp_path, change, match):
    _, run_dir, _ = saved_run
    members = real_members(ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1])
    if change == "huge-header":  # a header promising 8 GB in a member of a few hundred bytes
        members["params.npy"] = stored(npy_header((10**9,)) + bytes(64))
    elif change == "two-sizes":  # fewer bytes declared than stored: each size alone fits the file
        members["params.npy"] = stored(members["params.npy"][0], size=len(members["params.npy"][0]) - 8)
    elif change == "duplicate":
        members["params.npy#2"] = members["params.npy"]
    else:
        members["params.bin"] = members.pop("params.npy")
    write_zip(tmp_path / "forged.npz", members)
    refused_unread(tmp_path / "forged.npz", match)


def test_resume_checks_the_model_before_reading_any_array(saved_run, monkeypatch):
    cfg, run_dir, _ = saved_run
    real = ckpt._read_arrays

    def metadata_only(zf, members):
        assert set(members) == {"meta"}, f"read {sorted(members)} before the model check"
        return real(zf, members)

    monkeypatch.setattr(ckpt, "_read_arrays", metadata_only)
    other = small_config("train.epochs=3", "model.layers=[2,9,8,3]")
    with pytest.raises(DpbpError, match=r"holds a different model \(sizes"):
        trainer(other).restore(ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1])


# ----------------------------------------------------------------------------- checkpoints as models


def test_format_1_checkpoint_still_resumes_exactly(saved_run, tmp_path):
    cfg, run_dir, result = saved_run
    mid = [p for p in ckpt.periodic_checkpoints(run_dir / "checkpoints") if int(p.stem[5:]) % 16][1]
    resumed = trainer(cfg)
    resumed.restore(as_format_1(mid, tmp_path / "v1.npz"))
    assert 0 < resumed.state.step_in_epoch
    np.testing.assert_array_equal(resumed.run().model.params, result.model.params)


def test_format_1_checkpoint_is_a_model_only_without_normalisation(saved_run, tmp_path):
    _, run_dir, _ = saved_run
    path = ckpt.periodic_checkpoints(run_dir / "checkpoints")[-1]
    with pytest.raises(CheckpointError, match=r"v1.npz is a format-1 checkpoint: it does not store the input "
                                              r"normaliser \('standard'\) .* cannot be used as a model"):
        ckpt.load_model(as_format_1(path, tmp_path / "v1.npz"))
    plain = ckpt.load_model(as_format_1(path, tmp_path / "v1-none.npz", normalize="none"))
    np.testing.assert_array_equal(plain.params, ckpt.load_checkpoint(path)[0]["params"])


@pytest.mark.parametrize("which", ["best", "mid-epoch step"])
def test_any_checkpoint_is_a_model_taking_raw_inputs(saved_run, which):
    cfg, run_dir, _ = saved_run
    folder = run_dir / "checkpoints"
    path = folder / ckpt.BEST_NAME if which == "best" else [
        p for p in ckpt.periodic_checkpoints(folder) if int(p.stem[5:]) % 16][0]
    arrays, meta = ckpt.load_checkpoint(path)
    fitted = prepare_data(cfg).normalizer  # fitted again here, not read from the file
    net, inputs, _ = ckpt.load_network(path)
    np.testing.assert_array_equal(net.params, arrays["params"])
    np.testing.assert_array_equal(inputs.shift, fitted.shift)
    np.testing.assert_array_equal(inputs.scale, fitted.scale)
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(64, 2))  # raw inputs, far from normalised
    expected = net.predict(fitted.apply(x))
    assert not np.allclose(net.predict(x), expected, rtol=1e-3)  # the normaliser matters here
    np.testing.assert_allclose(ckpt.load_model(path).predict(x), expected, rtol=1e-12, atol=1e-15)
    with pytest.raises(CheckpointError, match="not a dpbp training checkpoint"):
        ckpt.load_checkpoint(run_dir / "model.npz")


def test_model_file_holds_the_normaliser_and_the_targets_record(saved_run):
    cfg, run_dir, result = saved_run
    arrays, meta = ckpt.read_npz(run_dir / "model.npz", "model", lambda m: ckpt._model_layout(m, "model.npz"))
    assert meta["format_version"] == ckpt.FORMAT_VERSION == 3 and meta["normalize"] == "standard"
    assert set(arrays) == {"params", "norm_shift", "norm_scale"}
    assert arrays["norm_shift"].dtype == np.float64
    np.testing.assert_array_equal(arrays["params"], result.model.params)  # as trained: the map is beside it
    assert meta["targets"]["classes"] == [0, 1, 2]


def test_format_1_model_file_still_loads_with_class_ids_as_labels(saved_run, tmp_path):
    """Model files of earlier dpbp: the normaliser folded into the first layer, no targets record."""
    _, run_dir, _ = saved_run
    folded = ckpt.load_model(run_dir / "model.npz")
    old = tmp_path / "old.npz"
    ckpt.atomic_write_npz(old, {"params": folded.params}, {"format": ckpt.MODEL_FORMAT, "format_version": 1,
                                                            "model": folded.describe()})
    model, inputs, targets = ckpt.load_network(old)
    assert inputs.kind == "none" and (targets.task, targets.classes, targets.outputs) == ("classification", None, 3)
    np.testing.assert_array_equal(model.params, folded.params)
    np.testing.assert_array_equal(targets.encode(np.array([2, 0])), [2, 0])
    with pytest.raises(DpbpError, match=r"class ids must be integers in \[0, 2\]"):
        targets.encode(np.array([3]))


def test_a_targets_record_that_does_not_fit_its_model_is_refused_unread(saved_run, tmp_path):
    _, run_dir, _ = saved_run
    arrays, meta = ckpt.read_npz(run_dir / "model.npz", "model", lambda m: ckpt._model_layout(m, "model.npz"))
    meta["targets"]["outputs"], meta["targets"]["classes"] = 4, [0, 1, 2, 3]
    ckpt.atomic_write_npz(tmp_path / "m.npz", arrays, meta)
    with pytest.raises(CheckpointError, match=r"targets record \(classification, 4 outputs\) does not fit its model"):
        ckpt.load_network(tmp_path / "m.npz")
