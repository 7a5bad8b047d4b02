"""Checkpoints: written atomically by rank 0, sealed with a checksum, the last k kept.

Layout under ``<out_dir>/checkpoints/``: ``step-00000120.pt`` (rotating), ``last.pt`` (a hard
link to the newest) and ``best.pt`` (a hard link to the best by mAP). Every file is written to a
temporary name in the same folder, fsynced and renamed, so a killed job never leaves a
truncated checkpoint behind (only a hidden ``.*.tmp``, removed by :func:`clean_temp`).

A checkpoint is ``torch.save``'s zip archive plus one record, ``<archive>/hvd_yolo.sha256``: the
sha256 of every other record (name and bytes). ``torch.load`` ignores that record; :func:`load`
checks it first, so a corrupted file is named instead of resumed.

Loading never runs code: ``torch.load(weights_only=True)`` accepts tensors and plain values
only (dict, list, tuple, str, int, float, bool, None), and :func:`save` converts what a run
hands it (numpy scalars and arrays, paths) into those types. A file without the checksum
record is refused unless the user trusts it (``--trust-checkpoint``, :func:`trust_unsealed`).

Over 350 lines on purpose: one job, sealed atomic writes; the write, the seal, the verified
read and the resume checks share one file layout and one record format, and split apart each
would describe them again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
_TEMP_FILE = re.compile(r"^\.(step-\d+|last|best)\.pt\..+\.tmp$")
_DIGEST = "hvd_yolo.sha256"
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupted, not ours, or not matching this run."""


# Entries a training checkpoint must hold for a resume (nested: the keys of that entry).
RESUME_FIELDS: dict[str, tuple[str, ...]] = {
    "model": (), "optimizer": (), "epoch": (), "step": (), "config": (), "class_names": (),
    "sampler": ("epoch", "offset"),
}
_TRUST_UNSEALED = False  # --trust-checkpoint: load files without the checksum record


def trust_unsealed(trust: bool) -> None:
    """``--trust-checkpoint``: let :func:`load` read files that have no checksum record (they are
    still read as data only: tensors and plain values, never code)."""
    global _TRUST_UNSEALED
    _TRUST_UNSEALED = bool(trust)


# ------------------------------------------------------------------ plain types
_SCALARS = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def plain(obj: Any, where: str = "state") -> Any:
    """``obj`` in types ``torch.load(weights_only=True)`` reads: numpy scalars become Python
    numbers, numpy arrays tensors, paths strings; containers are rebuilt only when a member
    changed (a module's ``state_dict`` keeps its ``_metadata``). Anything else is a TypeError
    naming its place (``where``), found when the checkpoint is written, not when it is read."""
    if isinstance(obj, np.generic):  # first: np.float64 is also a float
        return obj.item()
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True))
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, dict):
        out = {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
        bad = [k for k in out if not isinstance(k, (str, int))]
        if bad:
            raise TypeError(f"{where}: key {bad[0]!r} is not a str or int")
        if type(obj) in (dict, OrderedDict) and all(out[k] is obj[k] for k in obj):
            return obj  # unchanged: a state_dict keeps its _metadata
        return OrderedDict(out) if isinstance(obj, OrderedDict) else out
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj)) and type(obj) in (list, tuple):
            return obj
        return tuple(items) if isinstance(obj, tuple) else items
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be "
                    "stored in a checkpoint (tensors and plain values only)")


# ------------------------------------------------------------------ checksum
def _digest(archive: zipfile.ZipFile) -> str:
    """sha256 over every record but the digest itself (name, then bytes; archive order).
    Reading through zipfile also checks each record's CRC-32."""
    h = hashlib.sha256()
    for info in archive.infolist():
        if info.filename.endswith("/" + _DIGEST):
            continue
        h.update(info.filename.encode() + b"\0")
        with archive.open(info) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _seal(path: Path | str) -> None:
    """Append the digest record to a ``torch.save`` archive."""
    with zipfile.ZipFile(path, "a") as z:
        prefix = z.infolist()[0].filename.split("/", 1)[0]
        z.writestr(f"{prefix}/{_DIGEST}", _digest(z))


def verify(path: Path | str) -> bool:
    """True when ``path``'s checksum matches; False for a checkpoint written without one
    (older versions). Raises :class:`CheckpointError` naming the file when it is corrupted."""
    try:
        with zipfile.ZipFile(path) as z:
            recorded = [i for i in z.infolist() if i.filename.endswith("/" + _DIGEST)]
            if not recorded:
                return False
            want = z.read(recorded[-1]).decode("ascii", "replace").strip()
            got = _digest(z)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted checkpoint ({exc})") from exc
    if got != want:
        raise CheckpointError(f"{path}: corrupted checkpoint (sha256 {got[:16]}... does not "
                              f"match the recorded {want[:16]}...)")
    return True


# ------------------------------------------------------------------ writing
def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, seal, fsync, then rename over ``path``.
    ``obj`` is first converted to plain types (:func:`plain`). A full disk (or any failed
    write) removes the temp file and raises :class:`CheckpointError` naming the folder and the
    space needed; the files already there are untouched."""
    obj = plain(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        _seal(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(_write_failure(exc, path, obj)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (about what ``torch.save`` writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _write_failure(exc: BaseException, path: Path, obj: Any) -> str:
    """One line for a failed checkpoint write: the folder, the space needed and free."""
    need = _nbytes(obj) + (1 << 20)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or 0 <= free < need \
        or "No space left" in str(exc)
    what = "no space left on the device" if full else text
    return (f"{path.parent}: writing {path.name} failed ({what}): it needs about "
            f"{need / 1e6:.1f} MB and {free / 1e6:.1f} MB are free; the checkpoints already there "
            "(last.pt) are unchanged. Free some space (or lower run.keep_last), then resume with "
            "--resume auto")


def atomic_link(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src``'s data: a hard link renamed over ``dst`` (no second write);
    a fsynced copy where the file system has no hard links."""
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(4)}.tmp"
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)


BEST_FILE = "best.json"  # rank 0's record of best.pt's mAP (written after the evaluation)


def record_best(ckpt_dir: Path, path: Path, figures: dict[str, Any], step: int) -> None:
    """Point ``best.pt`` at the step file ``path`` just evaluated, and record its mAP."""
    atomic_link(path, ckpt_dir / "best.pt")
    tmp = ckpt_dir / f".{BEST_FILE}.tmp"
    tmp.write_text(json.dumps({"mAP": figures["mAP"], "mAP50": figures["mAP50"], "step": step,
                               "file": path.name}))
    tmp.replace(ckpt_dir / BEST_FILE)


def recorded_best(ckpt_dir: Path) -> float:
    """The mAP of ``best.pt`` (-1 if none): a checkpoint is written before its evaluation, so
    its own ``best_map`` may not count that evaluation."""
    try:
        return float(json.loads((ckpt_dir / BEST_FILE).read_text())["mAP"])
    except (OSError, ValueError, KeyError):
        return -1.0


def step_files(ckpt_dir: Path) -> list[Path]:
    """``step-*.pt`` files, oldest write first (modification time, then step number)."""
    found = []
    for p in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        m = _STEP_FILE.match(p.name)
        if m:
            try:
                found.append((p.stat().st_mtime_ns, int(m.group(1)), p))
            except FileNotFoundError:  # pruned meanwhile
                continue
    return [p for _, _, p in sorted(found)]


def prune(ckpt_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` most recently written step files (write order, not
    step number: a resume may re-derive a smaller step). Returns the deleted paths."""
    steps = step_files(ckpt_dir)
    old = steps[: max(0, len(steps) - max(1, keep_last))]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def save(state: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int,
         is_best: bool = False) -> Path:
    """Write ``step-<step>.pt``, link ``last.pt`` (and ``best.pt``) to it; prune to ``keep_last``."""
    path = ckpt_dir / f"step-{step:08d}.pt"
    atomic_save(state, path)
    atomic_link(path, ckpt_dir / "last.pt")
    if is_best:
        atomic_link(path, ckpt_dir / "best.pt")
    prune(ckpt_dir, keep_last)
    return path


def clean_temp(ckpt_dir: Path) -> list[tuple[Path, int]]:
    """Remove the hidden temp files of checkpoint writes that were killed (rank 0, holding the
    out_dir lock). Returns ``(path, bytes)`` of each file removed."""
    removed = []
    for p in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        if _TEMP_FILE.match(p.name) and p.is_file():
            size = p.stat().st_size
            p.unlink(missing_ok=True)
            removed.append((p, size))
    return removed


# ------------------------------------------------------------------ reading
def load(path: Path | str, trust: bool | None = None) -> dict[str, Any]:
    """Verify ``path``'s checksum, then load it onto the CPU as data only (tensors and plain
    values: ``weights_only=True``, no code runs). A file without the checksum record is refused
    unless ``trust`` (default: :func:`trust_unsealed`'s setting). Raises
    :class:`CheckpointError` naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not verify(path):
        if not (_TRUST_UNSEALED if trust is None else trust):
            raise CheckpointError(
                f"{path}: no hvd_yolo.sha256 record (not sealed by hvd-yolo train, or written "
                "by a version before checkpoints were sealed): refused. If you trust where the "
                "file came from, pass --trust-checkpoint (it is still read as tensors and plain "
                "values only)")
        warnings.warn(f"{path}: no checksum record: loaded unverified (--trust-checkpoint)",
                      stacklevel=2)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: holds objects other than tensors and plain values{what}: "
                              "refused, hvd-yolo never runs code from a checkpoint") from exc
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an hvd-yolo checkpoint (holds a {type(state).__name__})")
    return state


def load_resume(resume: str, out_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``--resume`` asks for, verified and loaded (call it on rank 0 only).

    A path: that file, or :class:`CheckpointError`. ``auto``: the most recently written of
    ``last.pt`` and the step files (a job killed between writing a step file and linking
    ``last.pt`` to it leaves the step file newer), or when that is corrupted the next that is
    not (with a warning per bad file); None when ``<out_dir>/checkpoints`` holds no
    checkpoint; :class:`CheckpointError` when it holds only corrupted ones.
    """
    if resume != "auto":
        return Path(resume), require_fields(load(resume), resume)
    ckpt_dir = Path(out_dir) / "checkpoints"
    last = ckpt_dir / "last.pt"
    candidates = step_files(ckpt_dir)[::-1]
    if last.is_file():  # before the step files written no later than it
        mtime = last.stat().st_mtime_ns
        at = next((i for i, p in enumerate(candidates) if p.stat().st_mtime_ns <= mtime),
                  len(candidates))
        candidates.insert(at, last)
    seen: set[tuple[int, int]] = set()
    failures = []
    for path in candidates:
        st = path.stat()
        if (st.st_dev, st.st_ino) in seen:  # last.pt is a link to a step file
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            state = require_fields(load(path), path)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        if failures:
            warnings.warn("; ".join(failures) + f": resuming from {path} instead", stacklevel=2)
        return path, state
    if failures:
        raise CheckpointError("no usable checkpoint for --resume auto: " + "; ".join(failures)
                              + " (resume from an explicit --resume PATH, or move "
                              f"{ckpt_dir} away to start afresh)")
    return None


def require_fields(state: dict[str, Any], path: Path | str,
                   fields: dict[str, tuple[str, ...]] = RESUME_FIELDS) -> dict[str, Any]:
    """``state`` when it holds every entry a resume reads, else :class:`CheckpointError`
    naming the first missing one."""
    for key, inner in fields.items():
        if key not in state:
            raise CheckpointError(f"{path}: not a complete hvd-yolo training checkpoint: it has "
                                  f"no {key!r} entry (it holds {sorted(map(str, state))})")
        for sub in inner:
            if not isinstance(state[key], dict) or sub not in state[key]:
                raise CheckpointError(f"{path}: not a complete hvd-yolo training checkpoint: its "
                                      f"{key!r} entry has no {sub!r}")
    return state


def restore_model(path: str | Path, use_ema: bool = True, trust: bool | None = None
                  ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint (EMA weights when present and asked for;
    ``trust``: see :func:`load`). Returns ``(model in eval mode on the CPU, checkpoint dict)``.
    """
    from hvd_yolo.model.yolov3 import anchors_in_weights, build_model

    state = load(Path(path), trust=trust)
    for key in ("model", "class_names", "model_name", "config"):
        if key not in state:
            raise CheckpointError(f"{path}: not an hvd-yolo training checkpoint (no {key!r} entry)")
    weights = state["ema"]["model"] if use_ema and state.get("ema") else state["model"]
    model = build_model(state["model_name"], len(state["class_names"]),
                        anchors=anchors_in_weights(weights))  # the anchors trained with
    # Checkpoints of SyncBatchNorm runs load into plain BatchNorm: same parameter names.
    model.load_state_dict(weights)
    return model.eval(), state


# ------------------------------------------------------------------ resume compatibility
# Keys whose change makes a checkpoint's sampler state and data order meaningless.
REFUSED = ("run.seed", "data.tail", "model.name", "optim.name", "model.anchors")
# Keys that set the global batch: the epoch's unread samples are re-dealt, the step re-derived.
REDERIVED = ("optim.batch_size", "optim.accumulate")
# Keys that only change how this run executes, not what it computes.
RUNTIME = ("data.workers", "data.val", "dist.threads", "dist.cycle_time_ms",
           "dist.fusion_threshold_mb", "dist.cuda", "run.out_dir", "run.progress",
           "run.max_steps", "run.tensorboard", "run.log_every", "run.checkpoint_every",
           "run.keep_last", "model.checkpoint")


def _flat(cfg: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in cfg.items() if isinstance(sec, dict) for k, v in sec.items()}


def _anchor_refusal(state: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The refusal when the anchors held with a checkpoint's weights differ from this run's."""
    from hvd_yolo.config import resolve_anchors
    from hvd_yolo.model.yolov3 import anchors_in_weights

    saved = anchors_in_weights(state.get("model") or {})
    now = resolve_anchors(new["model.name"], new.get("model.anchors"))
    if saved is None or saved == now:
        return []
    as_lists = [[list(p) for p in s] for s in saved]
    return [f"model.anchors is {as_lists!r} in the checkpoint but {new.get('model.anchors')!r} now"]


def compare_run(state: dict[str, Any], config: dict[str, Any], world_size: int,
                class_names: list[str], num_images: int, num_shards: int
                ) -> tuple[list[str], list[str]]:
    """What a checkpoint recorded against this run: ``(refusals, warnings)``, each naming the
    key with the checkpoint's value and the current one."""
    old = _flat(state.get("config") or {})
    new = _flat(config)
    refusals, notes = [], []
    for key in REFUSED:
        if key in old and old[key] != new.get(key):
            refusals.append(f"{key} is {old[key]!r} in the checkpoint but {new.get(key)!r} now")
    if "model.anchors" not in old and old.get("model.name") == new.get("model.name"):
        refusals += _anchor_refusal(state, new)  # a checkpoint from before model.anchors
    if state.get("class_names") is not None and list(state["class_names"]) != list(class_names):
        refusals.append(f"the classes are {list(state['class_names'])} in the checkpoint but "
                        f"{list(class_names)} in data.train")
    saved = state.get("sampler") or {}
    if saved.get("num_total", num_images) != num_images or \
            saved.get("num_shards", num_shards) != num_shards:
        refusals.append(f"data.train held {saved.get('num_total')} images in "
                        f"{saved.get('num_shards')} shards for the checkpoint but "
                        f"{new.get('data.train')} holds {num_images} in {num_shards}")
    old_world = state.get("world_size", world_size)
    if old_world != world_size:
        notes.append(f"world size is {old_world} in the checkpoint but {world_size} now")
    for key in REDERIVED:
        if key in old and old[key] != new.get(key):
            notes.append(f"{key} is {old[key]!r} in the checkpoint but {new.get(key)!r} now")
    if notes:
        notes = ["; ".join(notes) + ": the epoch's unread samples are re-dealt and the step and "
                 "LR re-derived for the new global batch"]
    changed = [f"{k} {old[k]!r} -> {new.get(k)!r}" for k in sorted(old)
               if k not in REFUSED + REDERIVED + RUNTIME and old[k] != new.get(k)]
    if changed:
        notes.append("changed since the checkpoint (used as given now): " + ", ".join(changed))
    return refusals, notes
