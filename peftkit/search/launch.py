"""``python -m peftkit.search.launch [--nproc N] ARGS``: run ``peftkit ARGS`` in this process, set to die with the search.

On Linux the kernel sends SIGKILL to this process when the search process that started it dies (prctl
PR_SET_PDEATHSIG, which survives exec), so that killing a search never leaves its trials training on as orphans.
Elsewhere this is a plain ``python -m peftkit.cli ARGS``.

With ``--nproc N`` (N > 1) the trial is distributed: this process becomes torchrun's agent (``python -m
torch.distributed.run --standalone --nproc_per_node N``; ``--standalone`` picks a free rendezvous port, so trials
run side by side never meet), and each of its N workers is this module again, set to die with the agent. torchrun
starts every worker in a session of its own, out of reach of the trial's process group: the death signal is what
takes them down when the agent is killed (a pruned trial) or dies with the search.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PARENT_VARIABLE = "PEFTKIT_SEARCH_PARENT"
#: what torchrun tells its workers: a trial started from a search that itself runs under torchrun must not see it,
#: or its ranks would join the outer group
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def outer_torchrun() -> tuple[int, int, int] | None:
    """(rank, world size, processes on this node) when this process is a torchrun worker of several, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


def trial_environment(parent: int) -> dict[str, str]:
    """The environment of a trial's process: ours without torchrun's variables, naming its parent (the search)."""
    env = {key: value for key, value in os.environ.items()
           if key not in TORCHRUN_VARIABLES and not key.startswith("TORCHELASTIC_")}
    env[PARENT_VARIABLE] = str(parent)
    return env


def command(args: list[str], processes: int) -> list[str]:
    """The command line of a trial: ``peftkit ARGS`` through this module, under torchrun when distributed."""
    extra = ["--nproc", str(processes)] if processes > 1 else []
    return [sys.executable, "-m", "peftkit.search.launch", *extra, *args]


def main() -> None:
    args = sys.argv[1:]
    processes = 1
    if args[:1] == ["--nproc"]:
        processes, args = int(args[1]), args[2:]
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        parent = os.environ.get(PARENT_VARIABLE, "")
        if parent.isdigit() and os.getppid() != int(parent):  # the parent died before prctl took effect
            os._exit(1)
    env = dict(os.environ)
    if processes > 1:
        env[PARENT_VARIABLE] = str(os.getpid())  # the workers' parent: this process, once it is torchrun's agent
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "-m", "peftkit.search.launch", *args]
    else:
        argv = [sys.executable, "-m", "peftkit.cli", *args]
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
