"""Shared test helpers: headless SDL, a subprocess runner for the repo's scripts, one small Pong
dataset recorded once per session (reused by the tests of the training scripts), and tiny token
worlds trained on it once (the dream-as-environment and agent tests)."""
import atexit
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Headless before anything imports pygame: no window, no audio device, no banner.
os.environ["SDL_VIDEODRIVER"] = "dummy"
os.environ["SDL_AUDIODRIVER"] = "dummy"
os.environ["PYGAME_HIDE_SUPPORT_PROMPT"] = "1"

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the repository root (holds collect.py, common.py)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import common` / `import collect` in tests

# the arguments of the shared dataset, so tests can reproduce or extend it
PONG_DATA_ARGS = ("--steps", "300", "--max-episode-steps", "100", "--policy", "mix", "--seed", "0")


class ForkServer:
    """Scripts run in children of one process that imported torch once (tests/forkserver.py):
    ~4 s less per run on a 2-core CPU, where the suite starts ~250 of them. Each run is still its
    own process. KIT_TESTS_FORK=0 runs every script as a plain subprocess instead."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py")], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lock, self.replies, self.ids = threading.Lock(), {}, itertools.count()
        threading.Thread(target=self._read, daemon=True).start()
        atexit.register(self.proc.kill)

    def _read(self):
        for line in self.proc.stdout:
            msg = json.loads(line)
            (self.replies.pop if "rc" in msg else self.replies.get)(msg["id"]).put(msg)  # "rc" is a run's last reply

    def run(self, argv, timeout):
        rid, replies = next(self.ids), queue.Queue()
        self.replies[rid] = replies
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "out"), Path(tmp, "err")
            with self.lock:
                self.proc.stdin.write(json.dumps(dict(id=rid, argv=argv, cwd=str(ROOT), env=dict(os.environ),
                                                      out=str(out), err=str(err))) + "\n")
                self.proc.stdin.flush()
            pid = replies.get(timeout=60)["pid"]
            try:
                rc = replies.get(timeout=timeout)["rc"]
            except queue.Empty:
                os.kill(pid, signal.SIGKILL)
                replies.get(timeout=60)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
            text = [f.read_text(errors="replace") for f in (out, err)]
            return subprocess.CompletedProcess(argv, rc, *text)


_server = None


def run_script(script, *args, timeout=120):
    """Run `python <repo>/<script> *args` from the repo root; CompletedProcess with text stdout/stderr."""
    global _server
    argv = [str(ROOT / script), *map(str, args)]
    if os.environ.get("KIT_TESTS_FORK", "1") == "0" or not hasattr(os, "fork") or sys.platform == "darwin":
        return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    _server = _server or ForkServer()
    return _server.run(argv, timeout)


def describe(proc):
    """The tail of a CompletedProcess's output, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-2000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def first_frames(wm, n=None):
    """The first n (default: wm.context) frames of a seeded Pong reset under NOOP, in wm's space."""
    import common
    env = common.make_env("Pong", seed=0)
    obs, _ = env.reset(seed=0)
    frames = [wm.observe(obs)]
    for _ in range((n or wm.context) - 1):
        frames.append(wm.observe(env.step(0)[0]))
    env.close()
    return frames


@pytest.fixture(name="run_script")
def run_script_fixture():
    return run_script


@pytest.fixture(scope="session")
def pong_data(tmp_path_factory):
    """A folder of 3 Pong episodes x 100 steps (mix policy, seed 0), recorded once per session.
    Read-only for the tests that use it: copy it before changing anything."""
    out = tmp_path_factory.mktemp("pong_data")
    proc = run_script("collect.py", *PONG_DATA_ARGS, "--out", out)
    assert proc.returncode == 0, describe(proc)
    return out


# tiny budgets for the token pipeline: seconds each
TINY_VQ = ("--steps", "6", "--eval-every", "6", "--batch", "8")
TINY_WORLD = ("--steps", "4", "--eval-every", "4", "--eval-windows", "4", "--gif-steps", "5", "--batch", "4",
              "--memory", "8")


@pytest.fixture(scope="session")
def token_worlds(pong_data, tmp_path_factory):
    """Tiny token worlds on a copy of pong_data, trained once per session: one with reward and end
    heads (the default) and one without, over one VQ-VAE. -> dict of paths (tmp, data, vq, heads, bare)."""
    tmp = tmp_path_factory.mktemp("worlds")
    data = tmp / "pong"
    import shutil
    shutil.copytree(pong_data, data)
    paths = dict(tmp=tmp, data=data, vq=tmp / "vq.pt", heads=tmp / "world.pt", bare=tmp / "bare.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        for script, *flags in (("train_vqvae.py", "--out", paths["vq"], *TINY_VQ),
                               ("train_world.py", "--tokenizer", paths["vq"], "--out", paths["heads"], *TINY_WORLD),
                               ("train_world.py", "--tokenizer", paths["vq"], "--out", paths["bare"], "--no-heads",
                                *TINY_WORLD)):
            r = run_script(script, "--data", data, "--assets", tmp, *flags)
            assert r.returncode == 0, describe(r)
            if script == "train_world.py" and "--no-heads" not in flags:
                assert "reward_precision@1" in r.stdout and "reward_recall@10" in r.stdout
    return paths
