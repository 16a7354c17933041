"""Fault injection for tests/test_make.py: Python imports this module at start-up when this folder
is on PYTHONPATH. With ATLAS_FAULT="<script>:<point>", the process running stage script <script>
(e.g. 02_mosaics.py, or "13_audit.py audit" for one command of a script) is killed with SIGKILL — with its whole process group (make too), or alone
when ATLAS_FAULT_WHO=stage — at <point>:
  start      as it starts, before it does anything (the run lock is already taken)
  replace=N  just before the N-th file it writes is moved into place (temporaries exist then)
  meta       once its outputs are in place, just before its .meta.json is moved into place
  worker     by one of the processes it forked (a pool worker, the 03 that 09 and 11 start) once
             its work is done, while the stage waits for it: the child kills the stage (alone)
             and lingers, and must then die with it
  worker-dies  the first of its forked processes kills itself as it begins (the stage lives on and
             must fail at once, not wait for the lost worker)
With ATLAS_FAULT="<script>:pause=S" that stage instead sleeps S seconds before its first
os.replace (to hold it running while a test starts a second make). Every output of the project is
moved into place by os.replace, so that is where it strikes.

With ATLAS_FAULT_COUNT=<file>, every stage process appends "<script>[ <command>]\t<number of its
os.replace calls>" to that file as it exits, and the same under the script's name alone (the test
takes the middle of a stage's writes from it).
"""
import atexit
import os
import signal
import sys
import time

_SPEC = os.environ.get("ATLAS_FAULT", "")
_COUNT = os.environ.get("ATLAS_FAULT_COUNT", "")
_NAME = os.path.basename(sys.argv[0]) if sys.argv else ""
_COMMAND = " ".join([_NAME] + [a for a in sys.argv[1:2] if not a.startswith("-")])  # "13_audit.py audit"


def _kill():
    """SIGKILL this stage: alone with ATLAS_FAULT_WHO=stage, else with its process group."""
    if os.environ.get("ATLAS_FAULT_WHO") == "stage":
        os.kill(os.getpid(), signal.SIGKILL)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _then_kill_the_stage(target, stage_pid):
    """``target`` (a forked child's work), after which the child SIGKILLs the stage alone and
    lingers, as a worker still alive when its stage dies: it must then die with the stage."""
    def run(*args, **kwargs):
        """The child's work, the kill, the linger."""
        target(*args, **kwargs)
        os.kill(stage_pid, signal.SIGKILL)
        time.sleep(60)
    return run


if _SPEC or _COUNT:
    _SCRIPT, _, _POINT = _SPEC.partition(":")
    _CHOSEN = _SCRIPT in (_NAME, _COMMAND)  # this process is the stage to strike
    _REAL_REPLACE = os.replace
    _CALLS = [0]
    _STAGE_PID = os.getpid()

    if _COUNT and _NAME[:2].isdigit():
        def _report():
            """Append this stage's number of os.replace calls to the count file."""
            with open(_COUNT, "a") as fh:
                for key in dict.fromkeys([_COMMAND, _NAME]):
                    fh.write(f"{key}\t{_CALLS[0]}\n")
        atexit.register(_report)

    if _CHOSEN and _POINT == "start":
        _kill()

    def _replace(src, dst, *args, **kwargs):
        """os.replace that kills this process (group) at the chosen point of the chosen stage."""
        if os.getpid() == _STAGE_PID:  # the stage's own writes, not its workers'
            _CALLS[0] += 1
            if _CHOSEN:
                if _POINT.startswith("pause=") and _CALLS[0] == 1:
                    time.sleep(float(_POINT.split("=")[1]))
                if _POINT == f"replace={_CALLS[0]}" or \
                        (_POINT == "meta" and str(dst).endswith(".meta.json")):
                    _kill()
        return _REAL_REPLACE(src, dst, *args, **kwargs)

    os.replace = _replace

    if _CHOSEN and _POINT in ("worker", "worker-dies"):
        import multiprocessing.process

        _REAL_BOOTSTRAP = multiprocessing.process.BaseProcess._bootstrap

        def _bootstrap(self, *args, **kwargs):
            """A forked child of the stage: kill the stage, or this child if it comes first."""
            if _POINT == "worker":
                self._target = _then_kill_the_stage(self._target, _STAGE_PID)
            else:
                try:
                    os.close(os.open(os.environ["ATLAS_FAULT_MARK"],
                                     os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    os.kill(os.getpid(), signal.SIGKILL)
                except FileExistsError:
                    pass  # another child died already
            return _REAL_BOOTSTRAP(self, *args, **kwargs)

        multiprocessing.process.BaseProcess._bootstrap = _bootstrap
