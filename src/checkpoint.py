"""A run's checkpoints: what one holds (`Checkpoint`, the one description of the format), written
atomically with the previous one kept, read back (offering the previous one when the latest is
corrupt), the flags a resume may change, the RNG states that make a resume exact, and the lock
that keeps two runs out of one folder."""
import argparse
import contextlib
import dataclasses
import os
import shutil

import torch

import distributed
from data import DataError, load_torch_file


@dataclasses.dataclass
class Checkpoint:
    """Everything a resume needs; checkpoint.pt is a dict of these fields."""
    model: dict            # the network's state_dict
    optimizer: list        # each optimiser's state_dict: [SGD], or [SGD, Muon]
    scheduler: list        # each optimiser's LR schedule's state_dict
    epoch: int             # the last epoch completed, counted from 0 (-1: none yet)
    rng: dict              # `rng_states`: the batch order's and every process's generators
    args: dict             # the run's flags
    train_size: int        # training images: a resume on other data is refused
    lookahead: dict        # the lookahead's slow weights ({} without lookahead)
    conv_plans: dict       # the conv variants the run chose (conv/plans.py), kept on a resume
    precision: str         # "bf16" or "fp32": what a resume with --precision auto runs in
    seconds: dict          # the run's time so far, summed over its starts: `no_seconds()`
    partial: dict | None   # a stop within an epoch: its steps, batch order and loss sums (in
    #                        the file only then)


# What marks a file as a training checkpoint (of any version of the repo).
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "rng", "args")


def save_checkpoint(ckpt, folder):
    """FOLDER/checkpoint.pt, written atomically, the previous one kept beside it."""
    saved = {k: v for k, v in vars(ckpt).items() if k != "partial" or v is not None}
    atomic_save(saved, os.path.join(folder, "checkpoint.pt"), keep_previous=True)


def as_checkpoint(saved, path):
    """The `Checkpoint` of a loaded file; a file of another layout is one line."""
    names = {f.name for f in dataclasses.fields(Checkpoint)}
    saved = {"partial": None, **saved}
    if set(saved) != names or "processes" not in saved["rng"]:
        raise DataError(f"{path} was written by another version of train.py (another "
                        f"checkpoint layout): it cannot resume here; start a new run")
    return Checkpoint(**saved)


def no_seconds():
    """A new run's time: wall (its processes' time from the end of their set-up), timed
    (whitening, training steps and test evaluations), held_out (the test curve's evaluations,
    apart), and how many processes it took (starts: a resumed run adds one)."""
    return {"wall": 0.0, "timed": 0.0, "held_out": 0.0, "starts": 0}


def atomic_save(obj, path, keep_previous=False):
    """Write to a temp file beside `path`, then rename: a crash or a failed write (disk full,
    file-size limit, read-only folder) never leaves half a file, and a file already at `path`
    stays as it was. keep_previous: that file stays on as `previous_path(path)` (a hard link,
    not a copy), so that a checkpoint found corrupt later has a good one beside it."""
    tmp = f"{path}.tmp"
    try:
        torch.save(obj, tmp)
        if keep_previous and os.path.exists(path):
            keep_as(path, previous_path(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch.save reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else \
            f"the write failed: disk full or a file-size limit? {str(e).splitlines()[0]}"
        kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
        raise OSError(f"could not write {path} ({why}); {kept}") from None


def previous_path(path):
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def keep_as(path, kept):
    """`kept` becomes another name of the file at `path` (a copy where the filesystem has no
    hard links), in one rename: it is never half there."""
    tmp = f"{kept}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)                        # left by a run killed right here
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, kept)


def lock_run_folder(folder):
    """Hold an exclusive lock on FOLDER/.lock while the returned file stays open, so that a
    second run on the same folder refuses to start. The OS drops the lock when the process
    ends, however it ends: a killed run leaves none behind, and no process id is trusted.
    Where there is no flock (Windows, some network filesystems), runs go unlocked (None)."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise OSError(f"another run (process {holder}) is writing {folder}; wait for it to "
                      f"end or give another --out") from None
    except OSError:   # the filesystem has no locks
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def accelerator_rng(device):
    """torch.cuda or torch.xpu for a device of theirs (they keep a generator per device), else
    None."""
    backend = getattr(torch, device.type, None) if device.type in ("cuda", "xpu") else None
    return backend if hasattr(backend, "get_rng_state") else None


def process_rng_state(device):
    """This process's own generators: the CPU's (dropout on the CPU, and every seed) and its
    accelerator's (dropout there). Under torchrun each rank has its own."""
    backend = accelerator_rng(device)
    return {"cpu": torch.get_rng_state(), "device_type": device.type,
            "device": backend.get_rng_state(device) if backend is not None else None}


def rng_states(data_gen, processes):
    """What a checkpoint keeps of the random generators: the batch order's (on the training
    device, in that device type's format) and every process's (`process_rng_state` of each
    rank, in rank order)."""
    return {"data": data_gen.get_state(), "data_device": data_gen.device.type,
            "processes": processes}


def set_rng_states(states, data_gen, device, rank, world, reseed):
    """Restore the states of `rng_states` as far as this machine can; what it could not, in
    words (nothing on the device type and process count the run was saved with).

    On another device type the generators of the device are re-seeded (the batch order's from
    `reseed`; a CPU generator's state is 5,056 bytes, a CUDA one's 16, and neither takes the
    other's); with another number of processes every process's own generators are (rank r's
    from reseed + 1 + r)."""
    notes, saved_on, processes = [], states["data_device"], states["processes"]
    if saved_on == data_gen.device.type:
        data_gen.set_state(states["data"])
    else:                               # another device type's state does not fit
        data_gen.manual_seed(reseed)
        notes.append(f"the batch order's generator (saved on {saved_on}) re-seeded")
    backend = accelerator_rng(device)
    if len(processes) != world:
        torch.manual_seed(reseed + 1 + rank)      # the CPU's and every device's
        notes.append(f"the generators of {len(processes)} processes, now {world}, re-seeded")
        return notes
    own = processes[rank]
    torch.set_rng_state(own["cpu"])
    if backend is not None and own["device_type"] == device.type and own["device"] is not None:
        backend.set_rng_state(own["device"], device)
    elif backend is not None:
        backend.manual_seed(reseed + 1 + rank)
        notes.append(f"the {device.type} generator (saved on {own['device_type']}) re-seeded")
    elif own["device_type"] != device.type:
        notes.append(f"the {own['device_type']} generator left behind")
    return notes


def saved_flags(args):
    """The flags a checkpoint keeps (`Checkpoint.args`): all but which ones the command line
    typed."""
    return {k: v for k, v in vars(args).items() if k != "given"}


def restore(ckpt, model, optimizers, schedulers, lookahead, data_gen, device, reseed):
    """A resumed run's weights, optimiser, LR schedule, lookahead and RNG states, loaded into
    its objects; what could not be restored on this machine, in words (`set_rng_states`)."""
    model.load_state_dict(ckpt.model)
    if [len(s["param_groups"]) for s in ckpt.optimizer] != [len(o.param_groups)
                                                           for o in optimizers]:
        raise ValueError("its checkpoint was written by another version of this repo (other "
                         "optimiser parameter groups): it cannot resume here; start a new run")
    for obj, state in zip(optimizers + schedulers, ckpt.optimizer + ckpt.scheduler):
        obj.load_state_dict(state)
    if lookahead is not None:
        lookahead.load_state_dict(ckpt.lookahead)
    return set_rng_states(ckpt.rng, data_gen, device, distributed.rank(),
                          distributed.world_size(), reseed)


def checkpoint_file(resume):
    """The file --resume names, when it names a file rather than a run folder."""
    return resume if resume.endswith(".pt") else None


def read_checkpoint(resume):
    """The checkpoint --resume names (RUN_DIR/checkpoint.pt, or a checkpoint file) and the run
    folder it continues. One that cannot be read names the previous one kept beside it, when
    that one reads."""
    path = checkpoint_file(resume) or os.path.join(resume, "checkpoint.pt")
    try:
        saved = load_torch_file(path, "checkpoint", CHECKPOINT_KEYS)
    except DataError as error:
        previous = previous_path(path)
        kept = intact_checkpoint(previous) if os.path.isfile(path) else None
        if kept is None:
            raise
        raise DataError(f"{error}; the previous checkpoint ({checkpoint_position(kept)}) is "
                        f"intact: python src/train.py --resume {previous} continues from it"
                        ) from None
    return as_checkpoint(saved, path), os.path.dirname(path) or "."


def set_aside_other_checkpoint(run_dir, resume_file):
    """A run resumed from another file (checkpoint.prev.pt) keeps the checkpoint.pt it leaves
    behind as checkpoint.set-aside.pt: its first save would otherwise make that one (corrupt,
    maybe) the previous checkpoint, and the file it resumed from would be gone."""
    current = os.path.join(run_dir, "checkpoint.pt")
    if resume_file and os.path.exists(current) and not os.path.samefile(resume_file, current):
        os.replace(current, os.path.join(run_dir, "checkpoint.set-aside.pt"))


def intact_checkpoint(path):
    """The checkpoint at `path` (a dict) if there is one that reads, else None."""
    try:
        return load_torch_file(path, "checkpoint", CHECKPOINT_KEYS)
    except DataError:
        return None


# The flags a resume may set: where and how it runs, not what it trains.
RESUME_FLAGS = ("resume", "device", "precision", "grad_clip", "data_dir", "dist_timeout",
                "no_conv_measure", "test_every")


def check_resume_flags(args, given, saved):
    """A resumed run continues with the flags it was started with: one given on the command
    line with another value is an error, not silently ignored."""
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved[k]})"
               for k in given if k not in RESUME_FLAGS and k in saved
               and getattr(args, k) != saved[k]]
    if changed:
        allowed = [f"--{k.replace('_', '-')}" for k in RESUME_FLAGS if k != "resume"]
        raise ValueError(f"a resumed run keeps its own flags: {', '.join(changed)}; a resume "
                         f"takes only {', '.join(allowed[:-1])} and {allowed[-1]} (start a new "
                         f"run in another --out to change the rest)")


def checkpoint_position(ckpt):
    """Where the checkpoint (a dict) stands: "after epoch 3/8", "epoch 4/8, step 12"."""
    epochs = ckpt["args"].get("epochs", "?")
    if ckpt.get("partial"):
        return f"epoch {ckpt['epoch'] + 2}/{epochs}, step {ckpt['partial']['steps']}"
    return f"after epoch {ckpt['epoch'] + 1}/{epochs}"


def resumed_run(args):
    """With --resume: (the checkpoint, the file --resume named or None, the run's own flags as
    new values: those of the checkpoint, but where and how it runs as typed now, the device as
    typed or auto, see check_resume_flags; a flag the checkpoint lacks as parsed now).
    Otherwise (None, None, args)."""
    if not args.resume:
        return None, None, args
    ckpt, run_dir = read_checkpoint(args.resume)
    check_resume_flags(args, args.given, ckpt.args)
    typed = {k: getattr(args, k) for k in RESUME_FLAGS if k in args.given or k == "device"}
    return ckpt, checkpoint_file(args.resume), argparse.Namespace(
        **{**vars(args), **ckpt.args, **typed, "resume": run_dir, "out": run_dir})
