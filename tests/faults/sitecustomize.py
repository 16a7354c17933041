"""Fault injection for tests/test_make.py: Python imports this module at start-up when this folder
is on PYTHONPATH. With ATLAS_FAULT="<script>:<point>", the process running stage script <script>
(e.g. 02_mosaics.py) is killed with SIGKILL — with its whole process group (make too), or alone
when ATLAS_FAULT_WHO=stage — at <point>:
  meta       once its outputs are in place, just before its .meta.json is moved into place
  replace=N  just before the N-th file it writes is moved into place (temporaries exist then)
With ATLAS_FAULT="<script>:pause=S" that stage instead sleeps S seconds before its first
os.replace (to hold it running while a test starts a second make). Every output of the project is moved into place by os.replace, so that is where it strikes.
"""
import os
import signal
import sys
import time

_SPEC = os.environ.get("ATLAS_FAULT", "")
if _SPEC:
    _SCRIPT, _, _POINT = _SPEC.partition(":")
    _REAL_REPLACE = os.replace
    _CALLS = [0]

    def _replace(src, dst, *args, **kwargs):
        """os.replace that kills this process (group) at the chosen point of the chosen stage."""
        if sys.argv and os.path.basename(sys.argv[0]) == _SCRIPT:
            _CALLS[0] += 1
            if _POINT.startswith("pause=") and _CALLS[0] == 1:
                time.sleep(float(_POINT.split("=")[1]))
            if _POINT == f"replace={_CALLS[0]}" or \
                    (_POINT == "meta" and str(dst).endswith(".meta.json")):
                if os.environ.get("ATLAS_FAULT_WHO") == "stage":
                    os.kill(os.getpid(), signal.SIGKILL)
                os.killpg(os.getpgrp(), signal.SIGKILL)
        return _REAL_REPLACE(src, dst, *args, **kwargs)

    os.replace = _replace
