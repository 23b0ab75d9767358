"""A calibration's checkpoint folder: one safetensors file per finished block, a state file saying
how many blocks count and with which settings and code, and a lock. Apart from the engine so that
what reads a checkpoint (the teacher pass keeps its targets here) does not depend on the code that
trains blocks (`stage_code` follows imports: an engine edit would flag every cached teacher pass).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..errors import QrealignError
from ..utils import read_json, remove_orphans_under, save_tensors, write_json

CHECKPOINT_STATE = "state.json"
LOCK_FILE = ".lock"
# The first-token objective's teacher pass, kept beside the blocks (`teacher-targets-<code digest>`):
# a resumed run reads it back instead of running it again (`targets.compute_teacher_targets`).
CHECKPOINT_TARGETS = "teacher-targets"


@contextlib.contextmanager
def checkpoint_lock(ckpt: Path | None):
    """One run per checkpoint: the same command started twice (two terminals, a re-submitted job)
    would write each other's blocks, or set the other's aside. Released when the run ends or dies
    (an OS lock on an open file, so a killed run leaves no stale lock)."""
    if ckpt is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    created = not ckpt.exists()
    ckpt.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(ckpt / LOCK_FILE, "w")
    except FileNotFoundError:  # the run before it removed its empty folder just now: take it again
        ckpt.mkdir(parents=True, exist_ok=True)
        handle = open(ckpt / LOCK_FILE, "w")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QrealignError(f"another run is calibrating with the checkpoint {ckpt} (the same --out); wait for "
                                "it to finish or stop it first") from None
        try:
            yield
        finally:
            if created:  # a run that failed before its first block leaves no folder of its own
                _remove_if_only_the_lock(ckpt)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_if_only_the_lock(ckpt: Path) -> None:
    """Called holding the lock: a folder this run created (its own `.<out>.checkpoint`, or a
    `checkpoint_dir` that did not exist) that holds nothing but the lock (no block, no teacher
    pass) is removed, not left hidden beside the output."""
    try:
        if {p.name for p in ckpt.iterdir()} == {LOCK_FILE}:
            (ckpt / LOCK_FILE).unlink()
            ckpt.rmdir()
    except OSError:  # gone already (a finished run clears it) or taken meanwhile: nothing to do
        pass


def block_file(ckpt: Path, layer: int) -> Path:
    return ckpt / f"block_{layer:04d}.safetensors"


def save_block(ckpt: Path, layer: int, tensors: dict[str, torch.Tensor]) -> None:
    """A block's learned parameters (a placeholder if it learned none). It counts as done only
    once `write_state` says so (a kill between the two leaves a file the state does not count:
    harmless)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / f".block_{layer:04d}.safetensors.tmp"
    save_tensors({k: v.contiguous() for k, v in tensors.items()} or {"_empty": torch.zeros(1)}, tmp)
    tmp.replace(block_file(ckpt, layer))


def read_block(ckpt: Path, layer: int, apply: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Block `layer`'s saved parameters, given to `apply`; either failing (a cut file, parameters
    of another shape) is an error that says how to start over."""
    path = block_file(ckpt, layer)
    try:
        apply(load_file(str(path)))
    except Exception as exc:
        raise QrealignError(f"checkpoint file {path} is unreadable ({exc}); delete {ckpt} to start the run over") from None


def write_state(ckpt: Path, fingerprint: str, code: str, completed: int, logs: list[dict]) -> None:
    """Blocks 0..completed-1 are done; `logs`: their training logs, so a resumed run's metadata
    keeps them; `code`: the digest of the code that calibrated them (`calibration_code()` read
    at the run's start, not now: the files on disk may have changed since)."""
    write_json(ckpt / CHECKPOINT_STATE, {"fingerprint": fingerprint, "completed_blocks": completed, "logs": logs,
                                         "code": code})


def calibration_code() -> str:
    """The digest of the modules that decide a calibration's numbers. The fingerprint holds the
    inputs, not the code: without this, a run resumed after an upgrade would join blocks
    calibrated by two code versions."""
    from ..stage_code import code_digest

    return code_digest("quant")["digest"]


def resume_point(ckpt: Path | None, fingerprint: str, code: str, num_layers: int, joint_from: int | None = None,
                  say: Callable[[str], None] | None = None) -> tuple[int, list[dict]]:
    """Blocks already calibrated with these exact settings (their checkpoint) and their training
    logs, said out loud: a resumed run, and a checkpoint set aside because a setting changed, are
    both news to a user. A checkpoint of other settings is moved aside, not deleted, into a folder
    of its own settings (`stale_dir`): one mistyped flag must not destroy hours of blocks, nor
    a second one, and the run that made it, started again, takes it back and resumes."""
    if ckpt is None:
        return 0, []
    if (ckpt / CHECKPOINT_STATE).is_file():
        state = read_json(ckpt / CHECKPOINT_STATE)
        other_code = state.get("code", code) != code  # older checkpoints did not record it: not compared
        if state.get("fingerprint") != fingerprint or other_code:
            stale = stale_dir(ckpt, str(state.get("fingerprint")), str(state.get("code", "")))
            remove_checkpoint(stale)  # an older copy of those same settings' blocks
            _move(ckpt, stale)
            if say:
                made = "by other code (qrealign's calibration modules changed)" if other_code else \
                    "with other settings or inputs"
                sizes = {d: _mib(d) for d in set_aside(ckpt)}  # this one too
                say(f"[calibrate] the checkpoint in {ckpt} was made {made} "
                    f"({state.get('completed_blocks', 0)} blocks, {sizes.get(stale, 0.0):.0f} MiB): set aside in "
                    f"{stale} (the run that made it takes it back when it is started again; {len(sizes)} set aside "
                    f"beside this run, {sum(sizes.values()):.0f} MiB: delete the ones you no longer need)")
    if not (ckpt / CHECKPOINT_STATE).is_file():
        mine = stale_dir(ckpt, fingerprint, code)
        if not (mine / CHECKPOINT_STATE).is_file():
            return 0, []
        _move(mine, ckpt)
        remove_checkpoint(mine)
        if say:
            say(f"[calibrate] this run's checkpoint had been set aside in {mine}: taken back")
        state = read_json(ckpt / CHECKPOINT_STATE)
    done = int(state.get("completed_blocks", 0))
    missing = next((i for i in range(done) if not block_file(ckpt, i).is_file()), None)
    if missing is not None:  # a hand-deleted or lost block file: redo from there instead of failing
        done = missing
    if joint_from is not None and joint_from < done < num_layers:
        done = joint_from  # a joint stage is checkpointed whole: a part of it (a lost file) is trained again
    if say and done:
        say(f"[calibrate] resuming from {ckpt}: blocks 0-{done - 1} done, continuing at block {done}")
    return done, list(state.get("logs") or [])[:done]


def _mib(folder: Path) -> float:
    """Best effort, for a message: a folder another run removes meanwhile counts what is left."""
    total = 0
    try:
        for path in folder.rglob("*"):
            try:
                total += path.stat().st_size if path.is_file() else 0
            except OSError:
                pass
    except OSError:
        pass
    return total / 2 ** 20


def set_aside(ckpt: Path) -> list[Path]:
    """The checkpoints of other settings set aside beside `ckpt` (`stale_dir`), oldest name first."""
    return sorted(d for d in ckpt.parent.glob(f"{glob.escape(ckpt.name)}.stale-*") if d.is_dir())


def say_set_aside(ckpt: Path, say: Callable[[str], None]) -> None:
    """At the end of a finished run: the blocks of other settings still beside it are kept for the
    run that made them, and take disk until someone deletes them; say so once more."""
    aside = set_aside(ckpt)
    if aside:
        mib = sum(_mib(d) for d in aside)
        say(f"[calibrate] {len(aside)} checkpoint{'s' if len(aside) > 1 else ''} of other settings "
            f"{'are' if len(aside) > 1 else 'is'} still set aside beside this run ({mib:.0f} MiB): "
            f"{', '.join(str(d) for d in aside)}; a run with those settings resumes from them, otherwise delete "
            f"{'them' if len(aside) > 1 else 'it'}")


def stale_dir(ckpt: Path, fingerprint: str, code: str) -> Path:
    """Where a checkpoint of these settings is set aside: one folder per settings, so setting a
    second run aside never overwrites the first's blocks."""
    key = hashlib.sha256(f"{fingerprint}\n{code}".encode()).hexdigest()[:12]
    return ckpt.with_name(f"{ckpt.name}.stale-{key}")


def _move(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    (src / CHECKPOINT_STATE).replace(dst / CHECKPOINT_STATE)  # first: src no longer counts as a checkpoint
    for f in src.glob("block_*.safetensors"):
        f.replace(dst / f.name)


def kept_teacher_passes(ckpt: Path) -> list[Path]:
    """The teacher passes a run kept in `ckpt` (`teacher-targets-<12 hex digits>` holding teacher
    targets): nothing else, so a user's own folder of a similar name beside them is never removed.
    (Read here, not through `targets.is_targets_dir`: importing `targets` would make every stage
    that reads a run depend on the teacher pass's code.)"""
    pattern = re.compile(rf"{re.escape(CHECKPOINT_TARGETS)}-[0-9a-f]{{12}}")
    kept = []
    for d in ckpt.glob(f"{CHECKPOINT_TARGETS}-*"):
        try:
            kind = read_json(d / "qrealign.json").get("kind") if pattern.fullmatch(d.name) else None
        except (OSError, ValueError, AttributeError):  # not ours, or unreadable
            continue
        if kind == CHECKPOINT_TARGETS:  # targets.KIND: the folder's prefix is its kind
            kept.append(d)
    return kept


def remove_checkpoint(ckpt: Path) -> None:
    """Delete what the engine wrote in `ckpt` (state first, then block files) and the folder if
    nothing else is in it. Never the whole folder: a user's checkpoint_dir may hold other files."""
    if not ckpt.is_dir():
        return
    (ckpt / CHECKPOINT_STATE).unlink(missing_ok=True)
    for pattern in ("block_*.safetensors", ".block_*.safetensors.tmp", LOCK_FILE):
        for f in ckpt.glob(pattern):
            f.unlink(missing_ok=True)
    for kept in kept_teacher_passes(ckpt):
        shutil.rmtree(kept, ignore_errors=True)
    remove_orphans_under(ckpt)  # a teacher-pass copy whose writer died mid-write; a live writer's stays
    try:
        ckpt.rmdir()
    except OSError:  # other files: left alone
        pass
