"""Multi-process (multi-GPU, multi-node) run setup and the few collectives the training loop needs.

Launchers understood by :func:`init_distributed_mode`:

* ``torchrun`` / ``torch.distributed.launch``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT`` (set by the launcher, on every node).
* Slurm ``srun`` (one task per GPU): ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS`` (or
  ``SLURM_NPROCS``) and ``SLURM_NODELIST``; the first host of the node list becomes ``MASTER_ADDR``
  (unless set), ``MASTER_PORT`` defaults to :data:`DEFAULT_MASTER_PORT`. Start the training with
  ``srun``: inside a bare ``sbatch`` script every task count refers to the whole allocation.

When both are present, the torchrun variables win (torchrun started from inside a Slurm job). A world
of one process, or neither launcher, means a plain single-process run (``args.distributed = False``).

Every helper below also works, as the identity, in a single-process run.
"""
import builtins
import os
import re
import subprocess
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist


DEFAULT_MASTER_PORT = 29500

_builtin_print = builtins.print


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on non-master processes; ``print(..., force=True)`` still prints everywhere."""

    def print_on_master(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            _builtin_print(*args, **kwargs)

    builtins.print = print_on_master


def collective_device() -> torch.device:
    """Where tensors handed to a collective must live: the current GPU for NCCL, the CPU otherwise."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(obj: Any) -> List[Any]:
    """Every process's picklable ``obj``, in rank order (``[obj]`` in a single-process run)."""
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_dict(input_dict: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """Sum (or average) a dict of scalar tensors over all processes with one collective.

    Meant for logging: the results are detached. Every process must pass the same keys; they are
    reduced in sorted order so that the dict's insertion order does not matter.
    """
    names = sorted(input_dict)
    for name in names:
        if input_dict[name].numel() != 1:
            raise ValueError(f"reduce_dict: {name!r} has shape {tuple(input_dict[name].shape)}, expected a scalar")
    world_size = get_world_size()
    if world_size == 1:
        return {name: input_dict[name].detach() for name in input_dict}
    with torch.no_grad():
        values = torch.stack([input_dict[name].detach().reshape(()) for name in names])  # [K]
        dist.all_reduce(values)
        if average:
            values /= world_size
    return dict(zip(names, values.unbind(0)))


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (a new tensor; the input is unchanged). No host sync."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced)
    return reduced / world_size


def first_host_in_nodelist(nodelist: str) -> str:
    """The first host name of a Slurm node list, e.g. ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``.

    Used when ``scontrol`` is not available. Handles several bracket groups per name
    (``"rack[1-2]-n[07-08]"`` -> ``"rack1-n07"``) and keeps zero padding.
    """
    first_entry = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if first_entry is None:
        raise ValueError(f"SLURM_NODELIST {nodelist!r}: cannot read a host name from it")
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first_entry.group(0))


def slurm_master_addr(nodelist: str) -> str:
    """First host of ``SLURM_NODELIST``, via ``scontrol show hostnames`` when available."""
    try:
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                check=True, timeout=30)
        hosts = result.stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return first_host_in_nodelist(nodelist)


def launcher_environment(environ=os.environ) -> Optional[Dict[str, Any]]:
    """Rank layout read from the launcher's variables, or None when no launcher set any.

    Returns ``rank``, ``world_size``, ``local_rank``, ``master_addr``, ``master_port`` and ``launcher``.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {"launcher": "torchrun", "rank": int(environ["RANK"]), "world_size": int(environ["WORLD_SIZE"]),
                "local_rank": int(environ.get("LOCAL_RANK", 0)),
                "master_addr": environ.get("MASTER_ADDR", "127.0.0.1"),
                "master_port": int(environ.get("MASTER_PORT", DEFAULT_MASTER_PORT))}
    if "SLURM_PROCID" in environ:
        world_size = environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS"))
        if world_size is None:
            raise RuntimeError("SLURM_PROCID is set but neither SLURM_NTASKS nor SLURM_NPROCS: start the run with srun")
        master_addr = environ.get("MASTER_ADDR")
        if master_addr is None:
            nodelist = next((environ[name] for name in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
                             if environ.get(name)), None)
            master_addr = slurm_master_addr(nodelist) if nodelist else "127.0.0.1"
        return {"launcher": "slurm", "rank": int(environ["SLURM_PROCID"]), "world_size": int(world_size),
                "local_rank": int(environ.get("SLURM_LOCALID", 0)), "master_addr": master_addr,
                "master_port": int(environ.get("MASTER_PORT", DEFAULT_MASTER_PORT))}
    return None


def _uses_cuda(device_name: Optional[str]) -> bool:
    if device_name is None:
        return torch.cuda.is_available()
    return torch.device(device_name).type == "cuda"


def _local_gpu(local_rank: int, launcher: str, device_name: Optional[str]) -> int:
    """This process's GPU: ``local_rank``, or 0 when the launcher made only one GPU visible per task."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {device_name}: CUDA is not available on this machine (use --device cpu)")
    visible = torch.cuda.device_count()
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"{launcher}: local rank {local_rank} but only {visible} GPUs are visible on this node; "
                           "start one process per GPU")
    return local_rank


def init_distributed_mode(args) -> None:
    """Join the process group described by the launcher's environment variables (see module doc).

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.local_rank``, ``args.gpu`` and
    ``args.dist_backend``: NCCL when the run uses CUDA (``args.device`` cuda, or unset with a GPU
    present), Gloo otherwise (CPU, MPS). With CUDA the process is bound to GPU ``args.gpu`` (its local
    rank, or 0 when the launcher exposes one GPU per task) and ``args.device`` becomes ``cuda:<gpu>``.
    Non-main processes stop printing.
    """
    layout = launcher_environment()
    if layout is None or layout["world_size"] == 1:
        args.distributed = False
        args.rank = 0 if layout is None else layout["rank"]
        args.world_size = 1
        args.local_rank = args.gpu = 0 if layout is None else layout["local_rank"]
        return

    args.distributed = True
    args.rank, args.world_size, args.local_rank = layout["rank"], layout["world_size"], layout["local_rank"]
    args.gpu = args.local_rank
    # env:// reads these; for Slurm they are not set by the launcher.
    os.environ.update({"RANK": str(args.rank), "WORLD_SIZE": str(args.world_size),
                       "LOCAL_RANK": str(args.local_rank), "MASTER_ADDR": layout["master_addr"],
                       "MASTER_PORT": str(layout["master_port"])})

    device_name = getattr(args, "device", None)
    use_cuda = _uses_cuda(device_name)
    if use_cuda:
        args.gpu = _local_gpu(args.local_rank, layout["launcher"], device_name)
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    dist_url = getattr(args, "dist_url", None) or "env://"
    _builtin_print(f"| distributed init ({layout['launcher']}): rank {args.rank}/{args.world_size}, "
                   f"local rank {args.local_rank}, {args.dist_backend}, {dist_url} "
                   f"(master {layout['master_addr']}:{layout['master_port']})", flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=dist_url, world_size=args.world_size,
                            rank=args.rank)
    barrier()
    setup_for_distributed(args.rank == 0)
