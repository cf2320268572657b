"""collect.py and the parts of common.py it relies on: recording, file format, alignment,
determinism, appending, Ctrl-C, bad input, corrupt data, preprocessing, the split, the
tracker's RAM offsets, the keymap and the human policy. Headless and CPU-only, tiny budgets."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
from conftest import PONG_DATA_ARGS, ROOT, describe, run_script

PONG_MEANINGS = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
FULL_MEANINGS = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT",
                 "DOWNLEFT", "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE",
                 "DOWNRIGHTFIRE", "DOWNLEFTFIRE"]
FINAL_LINE = re.compile(r"^wrote (\d+) episodes, (\d+) transitions to (.+)/ \(mean return ")
ALL_KEYS = {"frames", "actions", "rewards", "terminated", "truncated", "episode", "game",
            "action_meanings", "policy", "seed", "frameskip", "sticky"}

def load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def episodes(folder):
    return sorted(folder.glob("ep_*.npz"))


def final_line(proc):
    lines = proc.stdout.strip().splitlines()
    assert lines, describe(proc)
    m = FINAL_LINE.match(lines[-1])
    assert m, f"unexpected last stdout line {lines[-1]!r}"
    return int(m.group(1)), int(m.group(2))


def check_dataset(folder, game, policy, steps, max_steps, seed, meanings=None, proc=None):
    """The on-disk format of a folder written by one collect.py run."""
    files = episodes(folder)
    assert files, f"no ep_*.npz in {folder}"
    assert [f.name for f in files] == [f"ep_{i:06d}.npz" for i in range(len(files))]
    if proc is not None:
        assert final_line(proc) == (len(files), steps)
    total = 0
    for i, f in enumerate(files):
        ep = load(f)
        assert set(ep) == ALL_KEYS, f.name
        n = len(ep["actions"])
        assert 1 <= n <= max_steps
        if i < len(files) - 1 and not ep["terminated"][-1]:
            assert n == max_steps, f"{f.name}: {n} steps, neither terminated nor at --max-episode-steps"
        assert ep["frames"].shape == (n + 1, 210, 160, 3) and ep["frames"].dtype == np.uint8
        assert ep["actions"].shape == (n,) and np.issubdtype(ep["actions"].dtype, np.integer)
        assert ep["rewards"].shape == (n,) and ep["rewards"].dtype == np.float32
        for k in ("terminated", "truncated"):
            assert ep[k].shape == (n,) and ep[k].dtype == bool
            assert not ep[k][:-1].any(), f"{f.name}: {k} set before the last step"
        assert ep["terminated"][-1] or ep["truncated"][-1], f"{f.name}: the last step ends nothing"
        assert str(ep["game"]) == f"ALE/{game}-v5"
        if meanings is not None:
            assert [str(m) for m in ep["action_meanings"]] == meanings
        assert ep["actions"].min() >= 0 and ep["actions"].max() < len(ep["action_meanings"])
        assert str(ep["policy"]) == policy and int(ep["seed"]) == seed and int(ep["episode"]) == i
        assert ep["frames"].max() > 0 and not (ep["frames"] == ep["frames"][0]).all(), "frames never change"
        total += n
    assert total == steps
    return files


# -----------------------------------------------------------------------------
# the collect.py runs of this file start together in the background, two or more at a time:
# each spends most of its time importing torch, and on a multi-core machine they overlap.
# In the arguments, {out} is the run's output folder and {dir} its own folder, which holds a
# regular file named `file`.

E2E_ARGS = ("--steps", "100", "--max-episode-steps", "40", "--seed", "3", "--out", "{out}")
RUNS = {
    **{f"{game}-{policy}": ["--game", game, "--policy", policy, *E2E_ARGS]
       for game, policy in [("Pong", "random"), ("Pong", "sticky"), ("Pong", "tracker"), ("Breakout", "tracker")]},
    "same-seed": [*PONG_DATA_ARGS, "--out", "{out}"],
    "other-seed": ["--steps", "100", "--max-episode-steps", "100", "--policy", "mix", "--seed", "1", "--out", "{out}"],
    "append": ["--steps", "120", "--max-episode-steps", "60", "--policy", "mix", "--seed", "0", "--out", "{out}"],
    "unknown-game": ["--game", "Pongg", "--steps", "20", "--out", "{out}"],
}
OLD_MTIME_NS = 10**18  # 2001-09-09: the files the append run must leave alone


@pytest.fixture(scope="module")
def runs(pong_data, tmp_path_factory):
    """name -> a function that waits for that run and returns (CompletedProcess, output folder)."""
    base = tmp_path_factory.mktemp("runs")
    futures = {}
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        for name, args in RUNS.items():
            d = base / name
            d.mkdir()
            (d / "file").write_text("a regular file")
            out = d / "out"
            if name == "append":  # a copy of the session dataset, 3 episodes
                out.mkdir()
                for f in episodes(pong_data):
                    shutil.copy(f, out / f.name)
                    os.utime(out / f.name, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
            args = [a.replace("{out}", str(out)).replace("{dir}", str(d)) for a in args]
            futures[name] = (pool.submit(run_script, "collect.py", *args), out)
        yield lambda name: (futures[name][0].result(), futures[name][1])
        for f, _ in futures.values():
            f.cancel()  # a test that ran alone needs none of the others


# -----------------------------------------------------------------------------
# 1. end to end

@pytest.mark.parametrize("game,policy", [("Pong", "random"), ("Pong", "sticky"), ("Pong", "tracker"),
                                         ("Pong", "mix"), ("Breakout", "tracker")])
def test_collect_end_to_end(runs, pong_data, game, policy):
    if (game, policy) == ("Pong", "mix"):  # the session dataset is exactly this run
        proc, out, steps, max_steps, seed = None, pong_data, 300, 100, 0
    else:
        (proc, out), steps, max_steps, seed = runs(f"{game}-{policy}"), 100, 40, 3
        assert proc.returncode == 0, describe(proc)
        assert "Traceback" not in proc.stderr
    meanings = PONG_MEANINGS if game == "Pong" else ["NOOP", "FIRE", "RIGHT", "LEFT"]
    files = check_dataset(out, game, policy, steps, max_steps, seed, meanings, proc)
    assert len(files) >= steps // max_steps


# -----------------------------------------------------------------------------
# 2. alignment: action[i] takes frames[i] to frames[i+1]

def replay_mismatch(path):
    """Re-simulate a recorded episode from its reset seed with its recorded actions; the first
    step whose frame, reward or terminated flag differs from the file (-1: the reset frame), or None."""
    ep = load(path)
    env_seed, _ = np.random.SeedSequence([int(ep["seed"]), int(ep["episode"])]).generate_state(2)
    env = common.make_env(str(ep["game"]), sticky=float(ep["sticky"]))
    try:
        obs, _ = env.reset(seed=int(env_seed))
        if not np.array_equal(obs, ep["frames"][0]):
            return -1
        for i, a in enumerate(ep["actions"]):
            obs, r, term, _, _ = env.step(int(a))
            if not (np.array_equal(obs, ep["frames"][i + 1]) and r == ep["rewards"][i]
                    and term == ep["terminated"][i]):
                return i
    finally:
        env.close()
    return None


def test_recorded_actions_replay_to_recorded_frames(pong_data, tmp_path):
    last = episodes(pong_data)[-1]
    assert replay_mismatch(last) is None
    # and the check has teeth: the same frames with the actions shifted by one do not replay
    ep = load(last)
    np.savez(tmp_path / "shifted.npz", **{**ep, "actions": np.roll(ep["actions"], 1)})
    assert replay_mismatch(tmp_path / "shifted.npz") is not None


def test_every_recorded_episode_replays(pong_data):
    bad = {f.name: i for f in episodes(pong_data) if (i := replay_mismatch(f)) is not None}
    assert not bad, f"episodes whose recorded actions do not reproduce their frames (first bad step): {bad}"


# -----------------------------------------------------------------------------
# 3. determinism

def test_same_seed_same_episodes_other_seed_different(runs, pong_data):
    proc, again = runs("same-seed")
    assert proc.returncode == 0, describe(proc)
    a, b = episodes(pong_data), episodes(again)
    assert [f.name for f in a] == [f.name for f in b]
    for fa, fb in zip(a, b):
        ea, eb = load(fa), load(fb)
        assert set(ea) == set(eb)
        for k in ea:
            assert ea[k].dtype == eb[k].dtype and ea[k].shape == eb[k].shape, (fa.name, k)
            assert ea[k].tobytes() == eb[k].tobytes(), f"{fa.name}: '{k}' differs between two runs with --seed 0"

    proc, other = runs("other-seed")
    assert proc.returncode == 0, describe(proc)
    e0, e1 = load(a[0]), load(episodes(other)[0])
    assert not np.array_equal(e0["actions"], e1["actions"]), "--seed 0 and --seed 1 recorded the same actions"
    assert not np.array_equal(e0["frames"], e1["frames"])


def test_same_seed_byte_identical_every_array(runs, pong_data):
    proc, again = runs("same-seed")
    assert proc.returncode == 0, describe(proc)
    a, b = episodes(pong_data), episodes(again)
    assert [f.name for f in a] == [f.name for f in b]
    for fa, fb in zip(a, b):
        ea, eb = load(fa), load(fb)
        assert set(ea) == set(eb)
        for k in ea:
            assert ea[k].tobytes() == eb[k].tobytes(), f"{fa.name}: '{k}' differs between two runs with --seed 0"


# -----------------------------------------------------------------------------
# 4. appending

def test_envs_2_writes_the_episodes_one_emulator_writes(pong_data, tmp_path):
    """--envs 2: the same files as one emulator, array for array, also where the budget cuts an
    episode short (the third, at 50 of its 100 steps); nothing recorded past the budget is left."""
    for steps, out in (("300", tmp_path / "all"), ("250", tmp_path / "cut")):
        args = list(PONG_DATA_ARGS)
        args[args.index("--steps") + 1] = steps
        proc = run_script("collect.py", *args, "--envs", "2", "--out", out)
        assert proc.returncode == 0, describe(proc)
        assert final_line(proc) == (3, int(steps))
        assert [f.name for f in episodes(out)] == [f.name for f in episodes(pong_data)]
        assert not [p.name for p in out.iterdir() if not p.name.startswith("ep_")]
    for f in episodes(pong_data):
        want, got = load(f), load(tmp_path / "all" / f.name)
        assert all(want[k].tobytes() == got[k].tobytes() for k in want), f.name
    want, got = load(episodes(pong_data)[2]), load(tmp_path / "cut" / "ep_000002.npz")
    assert len(got["actions"]) == 50 and got["truncated"][-1] and not got["terminated"].any()
    for k in ("frames", "actions", "rewards"):
        assert np.array_equal(got[k], want[k][:len(got[k])]), k


def test_second_run_appends_and_never_overwrites(runs, pong_data):
    # `runs` copied the 3 session episodes into the folder, dated them 2001, then ran the same
    # --seed again: only the episode index keeps the new episodes' seeds apart
    proc, out = runs("append")
    assert proc.returncode == 0, describe(proc)
    assert final_line(proc) == (2, 120)
    files = episodes(out)
    assert [f.name for f in files] == [f"ep_{i:06d}.npz" for i in range(5)]
    old = episodes(pong_data)
    for f in old:
        assert (out / f.name).read_bytes() == f.read_bytes(), f"{f.name} was rewritten"
        assert (out / f.name).stat().st_mtime_ns == OLD_MTIME_NS, f"{f.name} was touched"
    old = [load(f) for f in old]
    for f in files[3:]:
        new = load(f)
        assert int(new["episode"]) == int(f.name[3:9])
        assert len(new["actions"]) == 60 and len(new["frames"]) == 61
        for o in old:
            assert not np.array_equal(new["actions"], o["actions"][:60]), f"{f.name} repeats an old episode"
            assert not np.array_equal(new["frames"], o["frames"][:61]), f"{f.name} repeats an old episode"
    assert not list(out.glob(".tmp-*")) and not (out / ".write-test").exists()


# -----------------------------------------------------------------------------
# 5. Ctrl-C

def test_sigint_keeps_every_episode(tmp_path):
    out = tmp_path / "d"
    # a child inherits an ignored SIGINT (a CI job started in the background) and Python then
    # never turns it into KeyboardInterrupt: hand it a default disposition
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        try:
            proc = subprocess.Popen([sys.executable, str(ROOT / "collect.py"), "--steps", "200000",
                                     "--max-episode-steps", "200", "--policy", "random", "--seed", "0",
                                     "--out", str(out)], cwd=ROOT, stdout=so, stderr=se, text=True)
        finally:
            signal.signal(signal.SIGINT, old_handler)
        try:
            deadline = time.monotonic() + 60
            while not (out.is_dir() and episodes(out)):
                assert proc.poll() is None, f"collect.py exited early: {(tmp_path / 'stderr').read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no episode written within 60 s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert rc == 130, f"exit {rc}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr
    files = episodes(out)
    assert [f.name for f in files] == [f"ep_{i:06d}.npz" for i in range(len(files))]
    lengths = []
    for f in files:
        ep = load(f)  # a half-written file fails here
        n = len(ep["actions"])
        assert ep["frames"].shape == (n + 1, 210, 160, 3) and ep["rewards"].shape == (n,)
        assert ep["truncated"][-1] and not ep["truncated"][:-1].any()
        lengths.append(n)
    assert all(n == 200 for n in lengths[:-1])
    # Ctrl-C lands mid-episode or, as often when the writer thread is the bottleneck, while the
    # main thread waits at an episode start for a buffer: then nothing is in progress
    # (test_ctrl_c_saves_episode_in_progress pins the first case down)
    m = re.search(r"saved the episode in progress \((\d+) steps, marked truncated\)", stderr)
    assert lengths[-1] == (int(m.group(1)) if m else 200)
    assert final_line(subprocess.CompletedProcess([], rc, stdout, stderr)) == (len(files), sum(lengths))
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".tmp-") or p.name == ".write-test"]
    assert not leftovers


def run_main_interrupted(monkeypatch, out, interrupt, *args):
    """collect.main() in-process with a KeyboardInterrupt raised from inside the progress bar:
    `interrupt` is "update:<step>" (that many steps recorded) or "postfix" (right after the
    first episode is handed to the writer). Returns the exit code."""
    import collect
    where, _, at = interrupt.partition(":")

    class CtrlC(collect.tqdm):
        def update(self, n=1):
            super().update(n)
            if where == "update" and self.n == int(at):
                raise KeyboardInterrupt

        def set_postfix(self, *a, **kw):  # runs right after `ep += 1`
            if where == "postfix":
                raise KeyboardInterrupt
            super().set_postfix(*a, **kw)

    monkeypatch.setattr(collect, "tqdm", CtrlC)
    monkeypatch.setattr(sys, "argv", ["collect.py", "--policy", "random", "--out", str(out), *args])
    old_handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as e:
            collect.main()
    finally:
        signal.signal(signal.SIGINT, old_handler)  # main() ignores SIGINT once interrupted
    return e.value.code


def test_ctrl_c_saves_episode_in_progress(tmp_path, monkeypatch, capsys):
    code = run_main_interrupted(monkeypatch, tmp_path, "update:50", "--steps", "1000", "--max-episode-steps", "30")
    assert code == 130
    files = episodes(tmp_path)
    assert [f.name for f in files] == ["ep_000000.npz", "ep_000001.npz"]
    first, last = load(files[0]), load(files[1])
    assert len(first["actions"]) == 30 and len(last["actions"]) == 20 and len(last["frames"]) == 21
    assert last["truncated"][-1] and not last["truncated"][:-1].any() and not last["terminated"].any()
    captured = capsys.readouterr()
    assert "saved the episode in progress (20 steps, marked truncated)" in captured.err
    assert "wrote 2 episodes, 50 transitions" in captured.out
    assert not list(tmp_path.glob(".tmp-*"))


def test_ctrl_c_between_episodes_saves_no_duplicate(tmp_path, monkeypatch):
    code = run_main_interrupted(monkeypatch, tmp_path, "postfix", "--steps", "100", "--max-episode-steps", "30")
    assert code == 130
    assert [f.name for f in episodes(tmp_path)] == ["ep_000000.npz"]


# -----------------------------------------------------------------------------
# 6. bad input: one `error:` line, non-zero exit, no traceback

def test_bad_input_subprocess_one_error_line(runs):
    proc, out = runs("unknown-game")
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        "error: unknown game 'Pongg' (did you mean Pong?); any ALE game works, e.g. Pong, Breakout, SpaceInvaders"]
    assert not out.exists()


# The other cases call main() in-process, through the same common.run as the script: a subprocess
# each would spend 2 s importing torch. An exception other than SystemExit escaping common.run is
# the traceback the script would print.
BAD_INPUT = [  # (arguments, the expected error line's text; None: argparse's usage error)
    pytest.param(["--policy", "pong-master"], "is not a policy", id="unknown-policy"),
    pytest.param(["--out", "/proc/nope"], "cannot write to /proc/nope", id="out-in-proc"),
    pytest.param(["--out", "{tmp}/file/sub"], "cannot write to ", id="out-under-file"),
    pytest.param(["--mix", "0.5,0.3"], "--mix wants three non-negative weights", id="mix-two-weights"),
    pytest.param(["--mix", "a,b,c"], "--mix wants three non-negative weights", id="mix-not-numbers"),
    pytest.param(["--mix", "1,-1,1"], "--mix wants three non-negative weights", id="mix-negative"),
    pytest.param(["--steps", "0"], "must be positive", id="zero-steps"),
    pytest.param(["--mix", "inf,1,1"], "--mix wants three non-negative weights", id="mix-inf"),
    pytest.param(["--mix", "1,nan,1"], "--mix wants three non-negative weights", id="mix-nan"),
    pytest.param(["--policy", "human", "--envs", "2"], "--policy human plays one emulator", id="human-envs"),
    pytest.param(["--envs", "0"], "must be positive", id="zero-envs"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_is_one_error_line(tmp_path, monkeypatch, capfd, args, message):
    import collect
    (tmp_path / "file").write_text("a regular file")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", ["collect.py", "--steps", "20", *args])
    with pytest.raises(SystemExit) as e:
        common.run(collect.main)
    err = capfd.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    if message is None:  # argparse's own usage error
        assert "invalid choice" in err
        return
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], err[-3000:]
    if (tmp_path / "out").is_dir():
        assert not episodes(tmp_path / "out")


# -----------------------------------------------------------------------------
# 7. corrupt and missing data

def test_scan_dataset_names_corrupt_file(pong_data, tmp_path, capsys):
    good = episodes(pong_data)[0]
    shutil.copy(good, tmp_path / "ep_000000.npz")
    data = good.read_bytes()
    (tmp_path / "ep_000001.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(common.KitError) as e:
        common.scan_dataset(tmp_path)
    assert "ep_000001.npz" in str(e.value) and "--skip-bad" in str(e.value)
    assert "ep_000000.npz" not in str(e.value)

    train, val, meta = common.scan_dataset(tmp_path, skip_bad=True)
    assert train + val == [(str(tmp_path / "ep_000000.npz"), 101)] and train
    assert meta["game"] == "ALE/Pong-v5" and meta["action_meanings"] == PONG_MEANINGS
    assert "ep_000001.npz" in capsys.readouterr().err


def test_scan_dataset_empty_or_missing_folder(tmp_path):
    with pytest.raises(common.KitError, match="no episodes"):
        common.scan_dataset(tmp_path)
    with pytest.raises(common.KitError, match="no dataset folder"):
        common.scan_dataset(tmp_path / "missing")


def corrupt_frames(src, dst):
    """A copy of episode `src` whose small entries read and whose frames do not."""
    import zipfile
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = z.getinfo("frames.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 200:start + 400] = bytes(200)
    dst.write_bytes(bytes(data))


def test_frame_stream_draws_runs_of_real_frames(pong_data, tmp_path):
    train, val, _ = common.scan_dataset(pong_data)
    frames = {f: common.preprocess(common.load_episode(f)["frames"], "rgb84x64") for f, _ in train + val}
    batches = common.frame_stream(train, "rgb84x64", 5, length=3, workers=0, seed=1)
    x = next(batches)
    assert x.shape == (5, 3, 3, 84, 64) and x.dtype == torch.uint8
    for run in x:  # three consecutive frames of one training episode
        assert any(torch.equal(run, frames[f][s:s + 3]) for f, n in train for s in range(n - 2))
    again = next(common.frame_stream(train, "rgb84x64", 5, length=3, workers=0, seed=1))
    assert torch.equal(x, again)  # one seed, one stream
    assert not torch.equal(x, next(common.frame_stream(train, "rgb84x64", 5, length=3, workers=0, seed=2)))
    runs = common.frame_runs(val or train, "rgb84x64", 4, length=2)
    first = frames[(val or train)[0][0]]
    assert runs.shape == (4, 2, 3, 84, 64) and torch.equal(runs[0], first[:2])


def test_frame_stream_reads_the_same_batches_in_a_worker_as_in_process(pong_data):
    train, val, _ = common.scan_dataset(pong_data)
    here = common.frame_stream(train + val, "rgb84x64", 6, length=2, workers=0, seed=3)
    worker = common.frame_stream(train + val, "rgb84x64", 6, length=2, workers=1, seed=3)
    for _ in range(5):
        assert torch.equal(next(here), next(worker))
    worker.close()


def test_frame_stream_holds_at_most_hold_frames_and_swaps_episodes(pong_data, monkeypatch):
    eps = sum(common.scan_dataset(pong_data)[:2], [])
    frames = {f: common.preprocess(common.load_episode(f)["frames"], "rgb84x64") for f, _ in eps}
    loads, read = [], common.load_episode
    monkeypatch.setattr(common, "load_episode", lambda f, keys=None: loads.append(f) or read(f, keys))
    stream = iter(common.FrameStream(eps, "rgb84x64", 4, seed=0, hold=1, turn=2))  # one episode at a time
    for n in range(8):
        x = next(stream)
        assert len(loads) == n // 2 + 1  # the first batch reads one, then a swap every 2 batches
        assert all(any(torch.equal(f, g) for g in frames[loads[-1]]) for f in x[:, 0])  # only the held one
    assert len(set(loads)) > 1


def test_frame_stream_names_a_file_whose_frames_do_not_read(pong_data, tmp_path, capsys):
    good = episodes(pong_data)[0]
    shutil.copy(good, tmp_path / "ep_000000.npz")
    corrupt_frames(good, tmp_path / "ep_000001.npz")
    train, val, _ = common.scan_dataset(tmp_path)  # the small entries still read
    both = train + val
    assert len(both) == 2
    stream = common.frame_stream(both, "rgb84x64", 2, workers=0, seed=0)
    with pytest.raises(common.KitError, match="ep_000001.npz.*--skip-bad"):
        for _ in range(3):  # the stream opens one more episode per batch
            next(stream)
    stream = common.frame_stream(both, "rgb84x64", 2, workers=0, seed=0, skip_bad=True)
    assert all(next(stream).shape == (2, 1, 3, 84, 64) for _ in range(40))
    assert "skipping" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# 8. preprocessing

def test_preprocess_shapes_and_range(pong_data):
    frames = load(episodes(pong_data)[-1])["frames"]
    want = {"rgb84x64": (3, 84, 64), "rgb84x64max": (3, 84, 64), "gray84x84": (1, 84, 84), "gray64x64": (1, 64, 64)}
    assert set(common.FRAME_SPACES) == set(want)
    for space, chw in want.items():
        x = common.preprocess(frames, space)
        assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8
        assert x.shape == (len(frames), *chw)
        assert x.max() > x.min()
        one = common.preprocess(frames[5], space)
        assert one.shape == chw and torch.equal(one, x[5])
        assert torch.equal(common.preprocess(torch.from_numpy(frames[:3]), space), x[:3])
    with pytest.raises(common.KitError):
        common.preprocess(frames[:1], "rgb64x64")


def test_preprocess_in_integers_is_the_float_area_resampling(pong_data):
    frames = torch.from_numpy(load(episodes(pong_data)[-1])["frames"])
    noise = torch.randint(0, 256, (64, 210, 160, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for x in (frames, noise):
        area = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(84, 64), mode="area")
        assert torch.equal(common.preprocess(x, "rgb84x64", chunk=50), area.round().to(torch.uint8))
        brightest = F.adaptive_max_pool2d(x.permute(0, 3, 1, 2).float(), (84, 64)).to(torch.uint8)
        assert torch.equal(common.preprocess(x, "rgb84x64max", chunk=50), brightest)


def raw_pong_frames(steps=300):
    """Unpooled frames (frameskip 1), where the ball is exactly 2 pixels wide: the hard case."""
    env = common.make_env("Pong", seed=0, frameskip=1)
    rng = np.random.default_rng(0)
    frames = np.stack([env.step(int(rng.integers(env.action_space.n)))[0] for _ in range(steps)])
    env.close()
    return frames


def test_pong_ball_survives_rgb84x64_and_keeps_its_color_in_max(pong_data):
    seen = 0
    for frames in [load(f)["frames"] for f in episodes(pong_data)] + [raw_pong_frames()]:
        small = common.preprocess(frames, "rgb84x64").numpy().astype(int)  # (N, 3, 84, 64)
        brightest = common.preprocess(frames, "rgb84x64max").numpy().astype(int)
        for raw, x, b in zip(frames, small, brightest):
            ball = np.all(raw[34:194] == (236, 236, 236), axis=-1)
            if not ball.any():
                continue
            rows, cols = np.nonzero(ball)
            r0, r1 = rows.min() + 34, rows.max() + 34
            c0, c1 = cols.min(), cols.max()
            cells = (slice(None), slice(r0 * 84 // 210, -(-(r1 + 1) * 84 // 210)),
                     slice(c0 * 64 // 160, -(-(c1 + 1) * 64 // 160)))  # the output pixels the ball touches
            diff = np.abs(x[cells] - np.array([144, 72, 17]).reshape(3, 1, 1)).max()
            assert diff > 40, f"ball at raw rows {r0}..{r1}, cols {c0}..{c1} lost after preprocessing"
            assert (b[cells] == 236).all(0).any(), "rgb84x64max keeps the ball's own color wherever it is"
            seen += 1
    assert seen >= 100, f"only {seen} frames with the ball in play"


# -----------------------------------------------------------------------------
# 9. the train/validation split

NAMES = [f"data/pong/ep_{i:06d}.npz" for i in range(50)]


def test_split_by_episode():
    train, val = common.split_episodes(NAMES)
    assert not set(train) & set(val)
    assert sorted(train + val) == NAMES
    assert len(val) == 5
    assert (train, val) == common.split_episodes(list(NAMES))
    assert set(common.split_episodes(list(reversed(NAMES)))[1]) == set(val)  # nor on the order given
    # the side depends on the file name, not the folder
    _, val2 = common.split_episodes([n.replace("data/pong", "elsewhere") for n in NAMES])
    assert {n.split("/")[-1] for n in val2} == {n.split("/")[-1] for n in val}
    assert common.split_episodes(NAMES[:1]) == (NAMES[:1], [])
    assert len(common.split_episodes(NAMES[:2])[1]) == 1


def test_split_stable_when_episodes_are_added():
    train, val = common.split_episodes(NAMES)
    for extra in range(1, 61):
        more = NAMES + [f"data/pong/ep_{i:06d}.npz" for i in range(50, 50 + extra)]
        train2, val2 = common.split_episodes(more)
        moved = [n for n in NAMES if (n in val) != (n in val2)]
        assert not moved, f"adding {extra} episodes moved {moved} across the split"


# -----------------------------------------------------------------------------
# 10. the tracker: RAM offsets against pixels, and it plays better than random

def test_pong_ram_offsets_match_pixels():
    # frameskip 1: the max over two frames that the kit's env returns blurs moving sprites (a
    # moving paddle's green shrinks to the overlap, a moving ball spans two positions), while
    # the offsets are those of one raw frame
    env = common.make_env("Pong", seed=0, frameskip=1)
    rng = np.random.default_rng(0)
    paddles = balls = 0
    for _ in range(600):
        obs, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        ram = env.ale.getRAM()
        rows = np.nonzero(np.all(obs[34:194, 140:144] == (92, 186, 92), axis=-1).any(1))[0] + 34
        if len(rows) == 16 and rows[-1] - rows[0] == 15:  # fully visible
            assert abs(rows[0] - (int(ram[51]) - 13.5)) <= 2, (rows[0], ram[51])
            paddles += 1
        ball = np.all(obs[34:194] == (236, 236, 236), axis=-1)
        if ram[54] == 0:
            assert not ball.any(), "ram[54] == 0 (no ball in play) but a ball is drawn"
        if ball.any():
            r, c = np.nonzero(ball)
            if r.max() - r.min() == 3 and c.max() - c.min() == 1:  # the whole 4x2 ball
                assert abs(r.min() + 34 - (int(ram[54]) - 14)) <= 1, (r.min() + 34, ram[54])
                assert abs(c.min() - (int(ram[49]) - 49)) <= 1, (c.min(), ram[49])
                balls += 1
        if term or trunc:
            env.reset()
    env.close()
    assert paddles >= 100 and balls >= 100, (paddles, balls)


def test_breakout_ram_offsets_match_pixels():
    env = common.make_env("Breakout", seed=0, frameskip=1)
    rng = np.random.default_rng(0)
    paddles = balls = 0
    for _ in range(600):
        obs, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        ram = env.ale.getRAM()
        red = np.all(obs == (200, 72, 72), axis=-1)
        cols = np.nonzero(red[189:193, 8:152].any(0))[0] + 8
        if len(cols) == 16 and cols[-1] - cols[0] == 15:  # the whole paddle, inside the walls
            assert abs(cols[0] - (int(ram[72]) - 47)) <= 2, (cols[0], ram[72])
            paddles += 1
        ball = red[93:189]  # between the bricks and the paddle
        if ram[101] == 0:
            assert not ball.any(), "ram[101] == 0 (no ball in play) but a ball is drawn"
        if ball.any():
            r, c = np.nonzero(ball)
            if r.max() - r.min() == 3 and c.max() - c.min() == 1:
                assert abs(c.min() - (int(ram[99]) - 49)) <= 1, (c.min(), ram[99])
                assert abs(r.min() + 93 - (int(ram[101]) + 9)) <= 1, (r.min() + 93, ram[101])
                balls += 1
        if term or trunc:
            env.reset()
    env.close()
    assert paddles >= 100 and balls >= 100, (paddles, balls)


@pytest.mark.parametrize("game,margin", [("Pong", 10), ("Breakout", 20), ("SpaceInvaders", 100)])
def test_tracker_beats_random(game, margin):
    def total_reward(name, steps=1000):
        env = common.make_env(game, seed=0)
        policy = common.make_policy(name, env, np.random.default_rng(0))
        obs, _ = env.reset(seed=0)
        total = 0.0
        for _ in range(steps):
            obs, r, term, trunc, _ = env.step(policy(env, obs))
            total += r
            if term or trunc:
                obs, _ = env.reset()
        env.close()
        return total

    tracker, rand = total_reward("tracker"), total_reward("random")
    assert tracker > rand + margin, (tracker, rand)


# -----------------------------------------------------------------------------
# 11. keymap

def test_action_for_keys_pong():
    f = common.action_for_keys
    assert f(set(), PONG_MEANINGS) == 0
    assert f({"FIRE"}, PONG_MEANINGS) == 1
    assert f({"UP"}, PONG_MEANINGS) == PONG_MEANINGS.index("RIGHT") == 2  # no UP in Pong: UP is RIGHT
    assert f({"DOWN"}, PONG_MEANINGS) == PONG_MEANINGS.index("LEFT")
    assert f({"RIGHT", "FIRE"}, PONG_MEANINGS) == 4
    assert f({"UP", "FIRE"}, PONG_MEANINGS) == PONG_MEANINGS.index("RIGHTFIRE")
    assert f({"UP", "DOWN"}, PONG_MEANINGS) == 0


def test_action_for_keys_full_action_set():
    import ale_py
    import gymnasium as gym
    gym.register_envs(ale_py)
    env = gym.make("ALE/Pong-v5", full_action_space=True)
    assert env.unwrapped.get_action_meanings() == FULL_MEANINGS
    env.close()
    f = common.action_for_keys
    assert FULL_MEANINGS[f({"UP", "RIGHT", "FIRE"}, FULL_MEANINGS)] == "UPRIGHTFIRE"
    assert f({"LEFT", "RIGHT"}, FULL_MEANINGS) == 0
    assert FULL_MEANINGS[f({"LEFT", "RIGHT", "UP"}, FULL_MEANINGS)] == "UP"
    assert FULL_MEANINGS[f({"DOWN"}, FULL_MEANINGS)] == "DOWN"  # real UP/DOWN: no aliasing
    assert FULL_MEANINGS[f({"DOWN", "LEFT", "FIRE"}, FULL_MEANINGS)] == "DOWNLEFTFIRE"


# -----------------------------------------------------------------------------
# 12. the human policy, driven by posted pygame events

def test_human_policy_keys_and_quit(monkeypatch):
    import pygame
    import collect
    monkeypatch.setattr(common, "check_display", lambda hint: None)  # the dummy driver stands in for a screen
    policy = collect.HumanPolicy(PONG_MEANINGS, fps=1000, scale=1)
    try:
        frame = np.zeros((210, 160, 3), np.uint8)
        assert policy(None, frame) == 0
        pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_UP))
        assert policy(None, frame) == 2  # RIGHT moves Pong's paddle up
        assert policy(None, frame) == 2  # held until KEYUP
        pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_SPACE))
        assert policy(None, frame) == PONG_MEANINGS.index("RIGHTFIRE")
        pygame.event.post(pygame.event.Event(pygame.KEYUP, key=pygame.K_SPACE))
        pygame.event.post(pygame.event.Event(pygame.KEYUP, key=pygame.K_UP))
        assert policy(None, frame) == 0
        pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_ESCAPE))
        with pytest.raises(collect.Quit):
            policy(None, frame)
        pygame.event.post(pygame.event.Event(pygame.QUIT))
        with pytest.raises(collect.Quit):
            policy(None, None)
    finally:
        pygame.quit()


def test_human_policy_without_display_says_so():
    r = run_script("collect.py", "--policy", "human", "--steps", "10", "--out", "/tmp/never-written")
    assert r.returncode == 2 and "Traceback" not in r.stderr, describe(r)
    assert r.stderr.strip().splitlines()[-1].startswith("error: no window can open"), describe(r)
