"""The tests' fork server: a process that has imported torch and the kit once, and forks a child
for each script a test runs (conftest.run_script). A fresh `python script.py` spends ~4 s of a
2-core CPU importing torch before its first line; the suite starts ~250 of them, so most of its
time was imports. Each child is still its own process, with its own argv, environment, working
folder, stdout, stderr and exit status, and it runs the script as `python script.py` would
(runpy, __name__ == "__main__"), then exits as the interpreter does, less the module teardown.

Protocol, one JSON object a line: requests on stdin {id, argv, cwd, env, out, err}; replies on
stdout {id, pid} when a child starts, {id, rc} when it ends. Requests may overlap (a test that
runs several collections at once); the server only forks and waits, so that no thread of it
ever holds a lock a child could inherit mid-use.
"""
import atexit
import json
import os
import runpy
import sys
import threading
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # as `python script.py` from the repository sees it

import imageio  # noqa: E402,F401  what the scripts import, paid once here
import torch  # noqa: E402
import torch.distributed  # noqa: E402,F401
import tqdm  # noqa: E402,F401

import common  # noqa: E402,F401

REPLIES = os.dup(1)  # the children's fd 1 becomes their stdout file


def reply(msg):
    os.write(REPLIES, (json.dumps(msg) + "\n").encode())  # one write a line: no lock to inherit


def wait(rid, pid):
    _, status = os.waitpid(pid, 0)
    reply({"id": rid, "rc": os.waitstatus_to_exitcode(status)})


def child(req):
    """Become `python argv...` in req's folder and environment; returns its exit code."""
    os.close(REPLIES)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    if "OMP_NUM_THREADS" in os.environ:  # read by a fresh process at import, which this one did before
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = list(req["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def main():
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = child(req)
            # the interpreter's own exit, less the module teardown (1 s with torch loaded): wait for the
            # script's threads, run its atexit hooks, flush
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        reply({"id": req["id"], "pid": pid})
        threading.Thread(target=wait, args=(req["id"], pid), daemon=True).start()


if __name__ == "__main__":
    main()
