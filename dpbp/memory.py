"""How much memory this process may still use, and the refusal of work that cannot fit.

``available_bytes()`` reads the kernel's own figures: ``MemAvailable`` from
/proc/meminfo and, when the process runs in a memory-limited cgroup (v2 or v1, e.g. a
container or a Slurm job), that cgroup's limit minus its usage (reclaimable page cache
not counted as used), for every level up the hierarchy; the smallest wins. None means
unknown (not Linux): then nothing is refused.

The estimates are made before allocating, from sizes alone, so an impossible model or
data set is refused with a message naming it instead of a MemoryError or the OOM killer.
Each rank on a node holds its own copy of the data and of its private model buffers, so
needs are multiplied by the ranks the launcher started on this node.
"""

from __future__ import annotations

import math
import os

from dpbp.errors import ConfigError, DataError

# A cgroup limit at or above this is "no limit" (v1 writes 2**63 rounded down to a page).
_NO_LIMIT = 2**60


def format_bytes(n: float) -> str:
    """``n`` bytes for a message, three significant digits: '512 MiB', '37.3 GiB', '1.2 TiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 1000 else f"{value:.3g} {unit}"
    return f"{int(n)} bytes"


# ----------------------------------------------------------------------------- what is available


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _meminfo_available(proc: str) -> int | None:
    """MemAvailable in bytes (the kernel's estimate of memory usable without swapping)."""
    text = _read(os.path.join(proc, "meminfo"))
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            try:
                return int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
            except (IndexError, ValueError):
                return None
    return None


def _int_file(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None  # "max": no limit


def _stat_value(path: str, key: str) -> int:
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _cgroup_mounts(proc: str) -> dict[str, tuple[str, str]]:
    """{'v2' | 'v1': (mount point, root of the hierarchy seen there)} from mountinfo."""
    mounts: dict[str, tuple[str, str]] = {}
    for line in (_read(os.path.join(proc, "self", "mountinfo")) or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point, fstype, options = fields[3], fields[4], tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            mounts.setdefault("v2", (point, root))
        elif fstype == "cgroup" and "memory" in options:
            mounts.setdefault("v1", (point, root))
    return mounts


def _inside(path: str, folder: str) -> bool:
    """True if ``path`` is ``folder`` or below it (both absolute)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # a relative or empty path: not ours to follow
        return False


def _cgroup_headroom(proc: str) -> int | None:
    """The smallest (limit - usage) over this process's memory cgroup and its ancestors; None if unlimited.

    Usage excludes inactive page cache (the kernel drops it before it kills anyone).
    """
    mounts = _cgroup_mounts(proc)
    best: int | None = None
    for line in (_read(os.path.join(proc, "self", "cgroup")) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and "v2" in mounts:
            point, root = mounts["v2"]
            limit_file, usage_file, cache_key = "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(",") and "v1" in mounts:
            point, root = mounts["v1"]
            limit_file, usage_file, cache_key = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
        else:
            continue
        # The cgroup path is relative to the root of the hierarchy; the mount may show a subtree of it.
        rel = os.path.relpath(path, root) if _inside(path, root) else "."
        folder = os.path.normpath(os.path.join(point, rel))
        if not _inside(folder, point) or not os.path.isdir(folder):
            folder = point  # a cgroup namespace shows the process's own cgroup at the mount point
        while True:
            limit = _int_file(os.path.join(folder, limit_file))
            usage = _int_file(os.path.join(folder, usage_file))
            if limit is not None and limit < _NO_LIMIT and usage is not None:
                used = max(0, usage - _stat_value(os.path.join(folder, "memory.stat"), cache_key))
                room = max(0, limit - used)
                best = room if best is None else min(best, room)
            if folder == point or folder == os.path.dirname(folder):
                break
            folder = os.path.dirname(folder)
    return best


def available_bytes(proc: str = "/proc") -> tuple[int, str] | None:
    """(bytes this process may still allocate, where that figure comes from), or None when unknown.

    The smaller of ``MemAvailable`` and the memory cgroup's headroom (see the module
    docstring). ``proc`` is the procfs root (tests point it at a fake tree). Reads
    files only; never raises.
    """
    found = []
    mem = _meminfo_available(proc)
    if mem is not None:
        found.append((mem, "MemAvailable"))
    room = _cgroup_headroom(proc)
    if room is not None:
        found.append((room, "the memory cgroup's limit minus its usage"))
    return min(found) if found else None


def shortfall(need: int) -> str | None:
    """None when ``need`` bytes fit in what is available (or that is unknown); else 'X are available (source)'."""
    avail = available_bytes()
    if avail is None or need <= avail[0]:
        return None
    return f"{format_bytes(avail[0])} are available ({avail[1]})"


def _ranks_note(ranks: int) -> str:
    return f"; {ranks} ranks on this node, each with its own copy" if ranks > 1 else ""


# ----------------------------------------------------------------------------- the model


def workspace_bytes(sizes: list[int], rows: int, itemsize: int) -> int:
    """Bytes of the activation buffers ``MLP`` keeps for a batch of ``rows`` rows (see model._Workspace).

    Pre-activations of every layer, four output-sized buffers, two row vectors and
    the ones vector, three buffers of the widest layer (two deltas, one scratch) and,
    for float32, a bool mask of that width.
    """
    widths = sizes[1:]
    elements = rows * (sum(widths) + 4 * sizes[-1] + 3 + 3 * max(widths))
    return elements * itemsize + (rows * max(widths) if itemsize == 4 else 0)


def _model_parts(sizes: list[int], itemsize: int, state_vectors: int, rows: int) -> tuple[int, int, int, int]:
    """(n_params, bytes while drawing the weights, bytes of parameter-sized vectors, bytes of activations)."""
    from dpbp.model import n_params
    from dpbp.optim import CHUNK_ELEMENTS

    n = n_params(sizes)
    weights = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    drawing = n * itemsize + 8 * max(w + prev for w, prev in zip(weights, [0, *weights]))
    vectors = ((2 + state_vectors) * n + 4 + (min(n, CHUNK_ELEMENTS) if state_vectors else 0)) * itemsize
    activations = workspace_bytes(sizes, rows, itemsize) + rows * (sizes[0] * itemsize + 8)  # + the shard's rows
    return n, drawing, vectors, activations


def model_bytes(sizes: list[int], itemsize: int, state_vectors: int, rows: int, ranks: int = 1) -> int:
    """Bytes of memory training an MLP of ``sizes`` takes on one node, before it allocates any.

    Per rank: parameters, the exchange's gradient buffer (the gradient sum plus four
    numbers), ``state_vectors`` optimizer state vectors (Adam 2,
    momentum and RMSprop 1, SGD 0) and one chunk of optimizer scratch; the activation
    buffers and the copied rows of one training shard of ``rows`` rows. While the
    weights are drawn (float64: this layer's draw and the previous layer's) only the
    parameters exist, so that is a separate peak. Times ``ranks`` on the
    node, plus, for several ranks, the node-shared window's copy of the parameters and
    optimizer state. Not counted: evaluation's activations (chunks of up to
    model.EVAL_CHUNK rows), the data, the interpreter and its libraries.
    """
    n, drawing, vectors, activations = _model_parts(sizes, itemsize, state_vectors, rows)
    window = (1 + state_vectors) * n * itemsize if ranks > 1 else 0
    return max(drawing, vectors + activations) * ranks + window


def check_model(cfg, sizes: list[int] | None = None) -> None:
    """Raise ConfigError (model.layers) if training ``cfg``'s model cannot fit in the memory available.

    ``sizes``: the layer sizes (default: ``model.layers``; when that is empty, the widths come
    from the data and nothing is checked before it is loaded). Call before building the model,
    on every rank (the answer depends on this node). Uses ``model_bytes`` with the rows of one
    rank's shard of the global batch (an upper bound when the data set is smaller than the batch)
    and the ranks the launcher started on this node.
    """
    from dpbp.comm import launcher_local_size
    from dpbp.optim import make_optimizer

    m, t = cfg.model, cfg.train
    sizes = [int(s) for s in (sizes if sizes is not None else m.layers)]
    if not sizes:
        return
    itemsize = 8 if m.dtype == "float64" else 4
    ranks = launcher_local_size()
    states = len(make_optimizer(t.optimizer, 0, m.dtype).state_names)
    rows = math.ceil(t.batch_size / ranks)
    need = model_bytes(sizes, itemsize, states, rows, ranks)
    short = shortfall(need)
    if short is None:
        return
    _, _, vectors, activations = _model_parts(sizes, itemsize, states, rows)
    if states == 0:
        vector_names = "gradient and reduction buffer"
    elif states == 1:
        vector_names = f"gradient, reduction buffer and the {t.optimizer} state vector"
    else:
        vector_names = f"gradient, reduction buffer and {states} {t.optimizer} state vectors"
    batch = f"train.batch_size {t.batch_size}" + (f" over {ranks} ranks" if ranks > 1 else "")
    raise ConfigError("model.layers", (
        f"{sizes} needs about {format_bytes(need)} of memory ({format_bytes(vectors)} for the {m.dtype} parameters, "
        f"{vector_names}, {format_bytes(activations)} for the activations of {rows} rows ({batch})"
        f"{_ranks_note(ranks)}); {short}"))


# ----------------------------------------------------------------------------- data


def check_data(name: str, need_per_rank: int, what: str) -> None:
    """Raise DataError naming ``name`` if ``need_per_rank`` bytes, on every rank of this node, cannot fit.

    ``what`` says what the estimate counts (for the message).
    """
    from dpbp.comm import launcher_local_size

    ranks = launcher_local_size()
    need = need_per_rank * ranks
    short = shortfall(need)
    if short is not None:
        raise DataError(f"{name} needs about {format_bytes(need)} of memory ({what}{_ranks_note(ranks)}); {short}")
