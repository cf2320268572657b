"""play.py: keys posted to pygame's event queue drive the dream (a stub world keeping the contract
records the actions), pause / restart / sync / quit, the shadow's actions, the overlay colours,
the window loop with --record, the headless GIF, --benchmark, and bad input as one error line.
Headless and CPU-only; one tiny real world model is trained once for the module."""
import importlib.util
import re
import shutil
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

import common
import play
from conftest import describe, run_script

PONG_MEANINGS = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]


# -----------------------------------------------------------------------------
# a tiny real world checkpoint (seconds to train: it only has to keep the contract)

@pytest.fixture(scope="module")
def tiny(pong_data, tmp_path_factory):
    """{'world': world.pt, 'vqvae': vq.pt} trained on a copy of pong_data (the tokenizer writes
    its token cache into the data folder, and pong_data is shared read-only)."""
    out = tmp_path_factory.mktemp("play_world")
    data = out / "data"
    shutil.copytree(pong_data, data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # tiny batches on a shared 2-core machine: threads only contend
        proc = run_script("train_vqvae.py", "--data", data, "--steps", 5, "--eval-every", 5, "--batch", 4,
                          "--hidden", 8, "--code-dim", 16, "--codes", 16, "--out", out / "vq.pt", "--assets", out)
        assert proc.returncode == 0, describe(proc)
        proc = run_script("train_world.py", "--data", data, "--tokenizer", out / "vq.pt", "--out", out / "world.pt",
                          "--steps", 4, "--eval-every", 4, "--eval-windows", 4, "--gif-steps", 5, "--assets", out,
                          "--batch", 2, "--dim", 16, "--emb", 8, "--blocks", 1, "--rollout", 1)
        assert proc.returncode == 0, describe(proc)
    return {"world": out / "world.pt", "vqvae": out / "vq.pt"}


# -----------------------------------------------------------------------------
# a stub world: the contract and nothing else

class StubWorld:
    """Keeps the world-model contract; its dream is the action painted as a grey level (40 per
    index), so the frame shown tells which action was taken. Records resets and actions."""
    context, n_actions, game, space = 4, 6, "ALE/Pong-v5", "rgb84x64"
    action_meanings = PONG_MEANINGS

    def __init__(self):
        self.actions, self.resets = [], []

    def observe(self, obs):
        return np.ascontiguousarray(obs[::5, ::5])  # (42, 32, 3) uint8

    def reset(self, frames):
        assert len(frames) == self.context
        self.resets.append([f.copy() for f in frames])

    def step(self, action):
        self.actions.append(action)
        return np.full((42, 32, 3), 40 * action, np.uint8)


@pytest.fixture
def pg():
    import pygame
    pygame.display.init()  # the event queue needs the (dummy) video driver
    pygame.event.clear()
    yield pygame
    pygame.quit()


@pytest.fixture
def session(pg):
    wm, env = StubWorld(), common.make_env("Pong", seed=0)
    s = play.Session(wm, env, play.p.parse_args([]))
    yield s, wm
    env.close()


def frame(s, *events):
    """Post (type, key) events to pygame's queue and run one window frame on what the queue holds."""
    import pygame
    for kind, key in events:
        pygame.event.post(pygame.event.Event(kind, key=key))
    s.update(pygame.event.get())


def dream_panel(s):
    """The dream's panel of the canvas (real | dream | overlay, 1-pixel gaps)."""
    w = s.dream.shape[1]
    return play.canvas(s)[:, w + 1:2 * w + 1]


# -----------------------------------------------------------------------------
# 1. keys -> actions -> frames

def test_start_from_real_frames(session):
    s, wm = session
    assert len(wm.resets) == 1 and wm.actions == []  # reset once from warm-up frames, no step yet
    env = common.make_env("Pong")
    obs, _ = env.reset(seed=0)
    want = [wm.observe(obs)] + [wm.observe(env.step(0)[0]) for _ in range(wm.context - 1)]
    assert all(np.array_equal(a, b) for a, b in zip(wm.resets[0], want))


def test_keys_drive_the_dream(session, pg):
    s, wm = session
    frame(s)
    assert wm.actions == [0]  # no key: NOOP
    frame(s, (pg.KEYDOWN, pg.K_UP))
    assert wm.actions[-1] == 2  # Pong: the UP arrow is RIGHT, which moves the paddle up
    assert (dream_panel(s) == 80).all()  # the frame shown is the one step returned
    frame(s)
    assert wm.actions[-1] == 2  # held until KEYUP
    frame(s, (pg.KEYDOWN, pg.K_SPACE))
    assert PONG_MEANINGS[wm.actions[-1]] == "RIGHTFIRE"
    frame(s, (pg.KEYUP, pg.K_SPACE), (pg.KEYUP, pg.K_UP))
    assert wm.actions[-1] == 0 and (dream_panel(s) == 0).all()
    frame(s, (pg.KEYDOWN, pg.K_DOWN))
    assert PONG_MEANINGS[wm.actions[-1]] == "LEFT" and (dream_panel(s) == 120).all()
    frame(s, (pg.KEYDOWN, pg.K_UP))
    assert wm.actions[-1] == 0  # up and down at once cancel
    assert s.t == 7 and len(wm.actions) == 7


class StubLatentWorld(StubWorld):
    """A latent-action world: step_latent_action(i) paints 40 * (i + 1) and is recorded too."""
    n_latent_actions, mapped = 4, True

    def __init__(self):
        super().__init__()
        self.latent = []

    def step_latent_action(self, i):
        self.latent.append(i)
        return np.full((42, 32, 3), 40 * (i + 1), np.uint8)


def test_number_keys_fire_latent_actions(pg):
    wm, env = StubLatentWorld(), common.make_env("Pong", seed=0)
    args = play.p.parse_args(["--latent-actions"])
    args.shadow = False  # main() does this for --latent-actions: a real game cannot take a latent action
    s = play.Session(wm, env, args)
    frame(s)
    assert wm.actions == [0] and wm.latent == []  # no key: the real NOOP through the map
    frame(s, (pg.KEYDOWN, pg.K_2))
    assert wm.latent == [2] and (play.canvas(s) == 120).all()
    frame(s)
    assert wm.latent == [2, 2]  # held until KEYUP
    frame(s, (pg.KEYDOWN, pg.K_UP))
    assert wm.latent[-1] == 2 and wm.actions == [0]  # arrows are not latent actions
    frame(s, (pg.KEYUP, pg.K_2), (pg.KEYDOWN, pg.K_9))
    assert len(wm.actions) == 2 and wm.latent == [2, 2, 2]  # 9 is none of a 4-latent-action model: NOOP
    assert "KEYS 0-3" in play.latent_legend(wm)
    env.close()


def test_shadow_gets_the_same_actions(session, pg):
    s, wm = session
    sent, real_step = [], s.env.step
    s.env.step = lambda a: sent.append(a) or real_step(a)
    frame(s, (pg.KEYDOWN, pg.K_UP))
    frame(s)
    frame(s, (pg.KEYUP, pg.K_UP), (pg.KEYDOWN, pg.K_LEFT))
    assert sent == wm.actions == [2, 2, 3]
    assert np.array_equal(s.real, wm.observe(s.obs)) and np.array_equal(s.history[-1], s.real)
    assert s.err == pytest.approx(np.abs(s.dream.astype(float) - s.real).mean())


def test_pause(session, pg):
    s, wm = session
    frame(s, (pg.KEYDOWN, pg.K_p))
    frame(s)
    frame(s, (pg.KEYDOWN, pg.K_UP))
    assert s.paused and wm.actions == []  # no step while paused, keys still tracked
    frame(s, (pg.KEYDOWN, pg.K_p))
    assert not s.paused and wm.actions == [2]


def test_sync_resets_the_dream_from_the_last_real_frames(session, pg):
    s, wm = session
    for _ in range(6):
        frame(s, (pg.KEYDOWN, pg.K_UP))
    last_real = [f.copy() for f in s.history]
    frame(s, (pg.KEYDOWN, pg.K_s))
    assert len(wm.resets) == 2 and all(np.array_equal(a, b) for a, b in zip(wm.resets[-1], last_real))
    assert len(wm.actions) == 7  # the dream went on from there


def test_restart_from_a_fresh_reset(session, pg):
    s, wm = session
    for _ in range(5):
        frame(s, (pg.KEYDOWN, pg.K_UP))
    frame(s, (pg.KEYDOWN, pg.K_r))
    assert len(wm.resets) == 2 and s.t == 1  # restarted, then this frame's step
    env = common.make_env("Pong")
    obs, _ = env.reset(seed=1)  # the second start uses seed + 1
    want = [wm.observe(obs)] + [wm.observe(env.step(0)[0]) for _ in range(wm.context - 1)]
    assert all(np.array_equal(a, b) for a, b in zip(wm.resets[-1], want))


@pytest.mark.parametrize("quit_event", ["q", "escape", "close"])
def test_quit(session, pg, quit_event):
    s, wm = session
    frame(s)
    if quit_event == "close":
        pg.event.post(pg.event.Event(pg.QUIT))
        s.update(pg.event.get())
    else:
        frame(s, (pg.KEYDOWN, pg.K_q if quit_event == "q" else pg.K_ESCAPE))
    assert not s.running and wm.actions == [0]  # no step after quitting


def test_overlay_colours(session):
    s, _ = session
    bg = np.full((42, 32, 3), 87, np.uint8)
    s.real, s.dream = bg.copy(), bg.copy()
    s.real[5, 5] = s.real[20, 20] = 236
    s.dream[10, 10] = s.dream[20, 20] = 236
    c = play.canvas(s)
    assert c.shape == (42, 3 * 32 + 2, 3)
    ov = c[:, 2 * 33:].astype(int)
    assert ov[5, 5, 1] > 100 and ov[5, 5, 0] == 0       # real only: green
    assert ov[10, 10, 0] > 100 and ov[10, 10, 1] == 0   # dream only: red
    assert ov[20, 20, 0] > 100 and ov[20, 20, 1] > 100  # both: yellow
    assert ov[30, 30].sum() == 0 and (ov[..., 2] == 0).all()


def test_gray_world_draws(pg, tmp_path):
    class GrayWorld(StubWorld):  # gray frame spaces give H x W frames
        space = "gray64x64"

        def observe(self, obs):
            return np.ascontiguousarray(obs[::5, ::5, 1])

        def step(self, action):
            return super().step(action)[..., 0]

    wm, env = GrayWorld(), common.make_env("Pong", seed=0)
    s = play.Session(wm, env, play.p.parse_args(["--scale", "2"]))
    frame(s, (pg.KEYDOWN, pg.K_DOWN))
    assert play.canvas(s).shape == (42, 3 * 32 + 2, 3) and (dream_panel(s) == 120).all()
    screen = pg.display.set_mode((200, 200))
    play.draw(screen, s, 2)
    args = play.p.parse_args(["--gif", str(tmp_path / "g.gif"), "--steps", "3", "--scale", "1"])
    play.dream_gif(wm, env, args, lambda env, obs: 2)
    assert len(imageio.mimread(tmp_path / "g.gif")) == 3


def test_dreamed_score_and_game_over(session, pg):
    s, wm = session
    draws = iter([(1.0, False), (0.0, False), (-1.0, False), (1.0, True)] + [(0.0, False)] * 9)

    def step(action):  # a world with heads: each step draws a reward and an end
        wm.reward, wm.terminated = next(draws)
        return StubWorld.step(wm, action)

    wm.step = step
    for _ in range(3):
        frame(s)
    assert s.score["dream"] == [1, 1] and not s.over
    frame(s)
    assert s.score["dream"] == [2, 1] and s.over and s.paused
    frame(s)
    assert len(wm.actions) == 4  # the dream waits
    assert any("SCORE 2:1" in t and "GAME OVER" in t for row in play.hud(s, 1) for _, t in row)
    assert play.status(s)[1] == "SCORE 2:1  REAL 0:0"  # the headless GIF shows the same line
    frame(s, (pg.KEYDOWN, pg.K_r))
    assert s.score["dream"] == [0, 0] and not s.over and not s.paused and len(wm.actions) == 5


def test_legend_follows_the_action_meanings():
    pong = play.legend(PONG_MEANINGS)
    assert "UP=RIGHT" in pong and "DOWN=LEFT" in pong and "SPACE=FIRE" in pong and "Q QUIT" in pong
    full = play.legend(["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN"])
    assert "UP=UP" in full and "DOWN=DOWN" in full and "LEFT=LEFT" in full  # real UP/DOWN: no aliasing
    text = np.zeros((7, 200, 3), np.uint8)
    play.text(text, "STEP 12", 1, 1, 1)
    assert text.any() and text[:, 30:].sum() == 0  # 7 glyphs of 4 pixels


# -----------------------------------------------------------------------------
# 2. the window loop, driven through the event queue, recording what it shows

def test_window_loop_and_record(pg, tmp_path, monkeypatch, capsys):
    script = iter([[(pg.KEYDOWN, pg.K_UP)], [], [(pg.KEYDOWN, pg.K_p)], [], [(pg.KEYDOWN, pg.K_p)],
                   [(pg.KEYUP, pg.K_UP)], [(pg.KEYDOWN, pg.K_q)], [(pg.KEYDOWN, pg.K_UP)]])
    real_get = pg.event.get

    def get():  # each frame, the next scripted batch goes through the real queue
        for kind, key in next(script, []):
            pg.event.post(pg.event.Event(kind, key=key))
        return real_get()

    monkeypatch.setattr(pg.event, "get", get)
    wm, env = StubWorld(), common.make_env("Pong", seed=0)
    args = play.p.parse_args(["--fps", "1000", "--record", str(tmp_path / "rec.gif")])
    play.window(wm, env, args, None)
    assert wm.actions == [2, 2, 2, 0]  # two frames paused, then quit
    assert "wrote 6 frames" in capsys.readouterr().out  # every frame shown, paused ones too
    # Pillow stores the two identical paused frames as one with their durations added
    assert len(imageio.mimread(tmp_path / "rec.gif")) in (5, 6)


# -----------------------------------------------------------------------------
# 3. headless: the GIF and the benchmark

def test_gif_stub_actions_repeat(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pygame", None)  # headless GIFs never import pygame
    wm, env = StubWorld(), common.make_env("Pong", seed=0)
    args = play.p.parse_args(["--gif", str(tmp_path / "d.gif"), "--steps", "7", "--scale", "1"])
    script = iter([2, 3, 0] * 3)
    play.dream_gif(wm, env, args, lambda env, obs: next(script))
    frames = imageio.mimread(tmp_path / "d.gif")
    assert len(frames) == 7 and wm.actions == [2, 3, 0, 2, 3, 0, 2]
    for f, a in zip(frames, wm.actions):  # the first frame is after the first step
        assert abs(int(f[-20, 33 + 16, 0]) - 40 * a) <= 8  # the dream panel (GIF palette: approximately)
    assert not np.array_equal(frames[0][:14], frames[1][:14])  # the counter on top changes
    assert "wrote" in capsys.readouterr().out


def test_gif_end_to_end(tiny, tmp_path):
    gif = tmp_path / "sub" / "dream.gif"
    proc = run_script("play.py", "--world", tiny["world"], "--gif", gif, "--steps", 9, "--actions", "2,2,3", "--scale", 2)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, describe(proc)
    frames = imageio.mimread(gif)
    assert len(frames) == 9
    assert frames[0].shape[1] == (64 + 1 + 64) * 2  # real | gap | dream in rgb84x64, --scale 2
    assert f"wrote {gif}" in proc.stdout and "9 frames" in proc.stdout


def test_gif_policy_without_shadow(tiny, tmp_path, monkeypatch, capsys):
    gif = tmp_path / "d.gif"
    monkeypatch.setattr(sys, "argv", ["play.py", "--world", str(tiny["world"]), "--gif", str(gif), "--steps", "5",
                                      "--policy", "random", "--no-shadow", "--scale", "1"])
    common.run(play.main)
    frames = imageio.mimread(gif)
    assert len(frames) == 5 and frames[0].shape[1] == 64  # the dream alone


def test_benchmark(tiny, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["play.py", "--world", str(tiny["world"]), "--benchmark", "20"])
    common.run(play.main)
    out = capsys.readouterr().out
    m = re.search(r"benchmark: 20 frames in [\d.]+ s: ([\d.]+) FPS", out)
    assert m and float(m.group(1)) > 0, out
    assert re.search(r"model step [\d.]+ ms, env step \+ observe [\d.]+ ms, drawing [\d.]+ ms", out), out


# -----------------------------------------------------------------------------
# 4. bad input: one `error:` line, non-zero exit, no traceback

BAD_INPUT = [  # (arguments, the expected error line's text; None: argparse's usage error)
    pytest.param(["--world", "{tmp}/nope.pt"], "no checkpoint at", id="no-checkpoint"),
    pytest.param(["--world", "{vqvae}"], "is a 'vqvae' checkpoint; expected world", id="tokenizer-checkpoint"),
    pytest.param(["--world", "{tmp}/junk.pt"], "cannot read checkpoint", id="junk-file"),
    pytest.param(["--gif", None], "no window can open with SDL_VIDEODRIVER=dummy", id="no-display"),
    pytest.param(["--actions", "2,9"], "--actions: 9 is not an action of ALE/Pong-v5 (0 NOOP, 1 FIRE, ", id="action-range"),
    pytest.param(["--actions", "-1"], "--actions: -1 is not an action", id="action-negative"),
    pytest.param(["--actions", "up,down"], "--actions wants comma-separated action indices", id="actions-text"),
    pytest.param(["--actions", ","], "--actions wants comma-separated action indices", id="actions-empty"),
    pytest.param(["--actions", "2", "--policy", "random"], None, id="actions-and-policy"),
    pytest.param(["--warmup", "1"], "needs at least 3 steps", id="warmup-too-short"),
    pytest.param(["--gif", "{tmp}/d.png"], "must end in .gif", id="gif-name"),
    pytest.param(["--gif", "/proc/d.gif"], "cannot write /proc/d.gif", id="gif-in-proc"),
    pytest.param(["--steps", "0"], "--steps: must be positive", id="zero-steps"),
    pytest.param(["--scale", "0"], "--scale: must be positive", id="zero-scale"),
    pytest.param(["--gif", None, "--benchmark", "0"], "--benchmark: must be positive", id="zero-benchmark"),
    pytest.param(["--world", "{tmp}/empty.pt"], "cannot read checkpoint", id="empty-file"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_is_one_error_line(tiny, tmp_path, monkeypatch, capfd, args, message):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    # defaults: the tiny world, headless into tmp; a None value drops its flag
    given = dict(zip(args[::2], args[1::2]))
    flags = {"--world": "{world}", "--gif": "{tmp}/d.gif", "--steps": "3", **given}
    fill = {"{world}": str(tiny["world"]), "{vqvae}": str(tiny["vqvae"]), "{tmp}": str(tmp_path)}
    argv = [x for k, v in flags.items() if v is not None for x in (k, re.sub(r"\{\w+\}", lambda m: fill[m[0]], v))]
    monkeypatch.setattr(sys, "argv", ["play.py", *argv])
    with pytest.raises(SystemExit) as e:
        common.run(play.main)
    err = capfd.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err[-3000:]
    if message is not None:  # None: argparse's own usage error
        assert errors[0].startswith("error: ") and message in errors[0], err[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="DISPLAY is how Linux finds a window system")
def test_no_display_subprocess(tiny, monkeypatch):
    monkeypatch.delenv("SDL_VIDEODRIVER")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    proc = run_script("play.py", "--world", tiny["world"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        "error: no display to open a window on (DISPLAY is not set); use --gif out.gif for a headless dream "
        "(or --benchmark N)"]


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("imageio_ffmpeg", "av")), reason="a video backend is installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imageio's search for a backend
def test_record_mp4_without_backend(tiny, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(sys, "argv", ["play.py", "--world", str(tiny["world"]), "--benchmark", "2",
                                      "--record", str(tmp_path / "play.mp4")])
    with pytest.raises(SystemExit) as e:
        common.run(play.main)
    err = capfd.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "error: cannot record to" in err and "imageio[ffmpeg]" in err
