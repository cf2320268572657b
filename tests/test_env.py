"""The dream as an environment: reward and end heads (they learn a synthetic rule; a world
without them pays 0 and says so), DreamEnv through gymnasium's own checker and gymnasium.make,
DreamVecEnv dream for dream equal to separate DreamEnvs (autoreset included), bench.py envs,
and bad input."""
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import common
import train_world
from conftest import describe, run_script

AE = ("--steps", "3", "--eval-every", "3", "--batch", "4", "--hidden", "8", "--fc", "32", "--frame-space", "gray64x64",
      "--latent-dim", "8", "--dynamics", "gru", "--dynamics-steps", "3", "--dynamics-eval-every", "3",
      "--eval-windows", "4", "--gif-steps", "5", "--dynamics-batch", "4", "--dynamics-dim", "32")


@pytest.fixture(scope="module")
def worlds(token_worlds):
    """The session's tiny token worlds (with heads, without) and a latent world on the same data."""
    paths = dict(token_worlds, latent=token_worlds["tmp"] / "latent.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        r = run_script("train_ae.py", "--data", paths["data"], "--assets", paths["tmp"], "--out",
                       paths["tmp"] / "ae.pt", "--world-out", paths["latent"], *AE)
    assert r.returncode == 0, describe(r)
    return paths


def quiet(make, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(*args, **kw)


# -----------------------------------------------------------------------------
# heads

def edge_episode(rng, n=120):
    """3x4 token frames: a ball (token 1) moves along the middle row one cell a step, left or right,
    and leaves at an edge: the step on which it leaves pays +1 on the right, -1 on the left."""
    frames, rewards = [np.zeros((3, 4), np.int64)], []
    while len(rewards) < n:
        step, c = (1, 0) if rng.random() < 0.5 else (-1, 3)
        while 0 <= c < 4:
            f = np.zeros((3, 4), np.int64)
            f[1, c] = 1
            frames.append(f)
            rewards.append(0.0)
            c += step
        frames.append(np.zeros((3, 4), np.int64))
        rewards.append(float(step))
    return dict(tokens=torch.as_tensor(np.stack(frames[:n + 1])), rewards=torch.tensor(rewards[:n]),
                terminated=torch.zeros(n, dtype=torch.bool))


def test_heads_learn_a_reward_rule():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    eps = [edge_episode(rng) for _ in range(4)]
    heads = common.Outcome(2, (3, 4))
    opt = torch.optim.AdamW(heads.parameters(), lr=3e-3)
    transitions = [(i, j) for i, ep in enumerate(eps) for j in range(1, len(ep["rewards"]))]
    events = torch.tensor([(i, j) for i, j in transitions if eps[i]["rewards"][j]])
    args, data = train_world.p.parse_args(["--batch", "16"]), train_world.pack(eps, "cpu")
    for _ in range(300):
        loss = common.outcome_loss(heads, data, torch.tensor(transitions), events, rng, 2 * args.batch,
                                   args.event_share)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = edge_episode(np.random.default_rng(1))
    j = torch.arange(1, len(test["rewards"]))
    with torch.no_grad():
        logits = heads(torch.stack([test["tokens"][k - 1:k + 2] for k in j]))
    got = torch.tensor(common.REWARD_CLASSES)[logits[:, :3].argmax(1)]
    assert torch.equal(got, test["rewards"][j])
    assert (logits[:, 3] < 0).all()  # nothing ever ends


def test_heads_leave_the_dynamics_as_they_were(worlds):
    with_heads, without = (common.load_checkpoint(worlds[k], ("world",)) for k in ("heads", "bare"))
    assert "heads" in with_heads and "heads" not in without
    for k, v in without["model"].items():
        assert torch.equal(with_heads["model"][k], v), k


def test_the_world_draws_reward_and_end(worlds):
    wm = common.load_world(worlds["heads"], temperature=0)
    assert wm.heads is not None and wm.reward == 0.0 and wm.terminated is False
    frames = [f.permute(1, 2, 0).numpy() for f in common.DreamStarts(wm, "data", worlds["data"])(np.random.default_rng(0))]
    wm.reset(frames)
    wm.step(0)
    assert isinstance(wm.reward, float) and wm.reward in common.REWARD_CLASSES and isinstance(wm.terminated, bool)
    with torch.inference_mode():  # the argmax of the heads on the tokens the step drew
        logits = wm.heads(wm.hist[:, -3:])
    assert wm.reward == common.REWARD_CLASSES[int(logits[0, :3].argmax())]
    assert wm.terminated == bool(logits[0, 3] > 0)


def test_a_world_without_heads_pays_nothing_and_says_so(worlds):
    with pytest.warns(UserWarning, match="no reward/end heads"):
        env = common.DreamEnv(str(worlds["bare"]), start="data")
    env.reset(seed=0)
    for a in [0, 1, 2, 3] * 3:
        _, reward, terminated, truncated, _ = env.step(a)
        assert reward == 0.0 and terminated is False
    assert env.world.reward == 0.0 and env.world.terminated is False


# -----------------------------------------------------------------------------
# DreamEnv

@pytest.mark.parametrize("kind", ["heads", "latent"])
def test_check_env(worlds, kind):
    env = quiet(common.DreamEnv, str(worlds[kind]), max_episode_steps=20, render_mode="rgb_array")
    check_env(env, skip_render_check=False)
    obs, _ = env.reset(seed=1)
    assert obs.shape == env.observation_space.shape and env.render().shape[-1] == 3
    assert env.unwrapped.get_action_meanings()[:2] == ["NOOP", "FIRE"]


def test_gymnasium_make_and_truncation(worlds):
    env = quiet(gym.make, "AtariDream-v0", world=str(worlds["heads"]), start="data", max_episode_steps=5)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    ends = [env.step(env.action_space.sample())[3] for _ in range(5)]
    assert ends == [False] * 4 + [True]


def test_reset_from_given_frames(worlds):
    env = quiet(common.DreamEnv, str(worlds["heads"]), start="data", temperature=0)
    frames = np.stack([f.permute(1, 2, 0).numpy() for f in env.starts(np.random.default_rng(3))])
    obs, _ = env.reset(seed=0, options={"frames": frames})
    assert np.array_equal(obs, frames[-1])
    with pytest.raises(ValueError, match="frames"):
        env.reset(options={"frames": frames[:2]})


# -----------------------------------------------------------------------------
# DreamVecEnv: each dream is exactly a DreamEnv; gymnasium's NEXT_STEP autoreset

def one_by_one(path, seed, actions, temperature, steps):
    """What a DreamEnv reset with `seed` does under `actions`, replayed with the vector env's
    autoreset: the step after an end is the next episode's reset (reward 0, no end)."""
    env = quiet(common.DreamEnv, str(path), start="data", temperature=temperature, max_episode_steps=steps)
    out, ended = [env.reset(seed=seed)[0]], False
    for a in actions:
        if ended:
            out.append(env.reset()[0])
            rows, ended = (0.0, False, False), False
        else:
            obs, reward, terminated, truncated, _ = env.step(int(a))
            out.append(obs)
            rows, ended = (reward, terminated, truncated), terminated or truncated
        out[-1] = (out[-1], *rows)
    return out


@pytest.fixture
def one_thread():
    """Bit for bit needs the same arithmetic: with two threads a batch splits its sums otherwise
    than a single dream does, the logits differ by ~1e-7, and a near tie can draw either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("temperature,chunk", [(0.0, 64), (1.0, 64), (1.0, 2)])
def test_vector_env_is_dreams_one_by_one(worlds, temperature, chunk, one_thread):
    n, steps = 3, 4
    vec = quiet(common.DreamVecEnv, str(worlds["heads"]), num_envs=n, start="data", temperature=temperature,
                max_episode_steps=steps)
    vec.world.DYNAMICS_CHUNK = vec.world.DECODER_CHUNK = chunk  # 2: the dreams in pieces, as 64 of 256 are
    rng = np.random.default_rng(0)
    actions = rng.integers(0, vec.single_action_space.n, size=(11, n))
    obs, _ = vec.reset(seed=5)
    got = [[(obs[i],)] for i in range(n)]
    for a in actions:
        obs, reward, terminated, truncated, _ = vec.step(a)
        for i in range(n):
            got[i].append((obs[i], reward[i], terminated[i], truncated[i]))
    for i in range(n):
        want = one_by_one(worlds["heads"], 5 + i, actions[:, i], temperature, steps)
        assert np.array_equal(got[i][0][0], want[0])
        for k, (g, w) in enumerate(zip(got[i][1:], want[1:])):  # the same dream: the same draws, ends and pay;
            # the decoder's batched convs may round a pixel one level otherwise on some CPUs (oneDNN picks by batch)
            assert np.abs(g[0].astype(int) - w[0]).max() <= 1 and tuple(g[1:]) == tuple(w[1:]), (i, k)
    for i in range(n):  # the first end: a drawn game over, or the truncation after `steps`; then a fresh start
        end = next(k for k, g in enumerate(got[i][1:]) if g[2] or g[3])
        assert end == steps - 1 or got[i][1 + end][2]
        assert tuple(got[i][2 + end][1:]) == (0.0, False, False)


def test_vector_env_tokens_and_make_vec(worlds):
    vec = quiet(common.DreamVecEnv, str(worlds["heads"]), num_envs=2, start="data", obs="tokens")
    obs, _ = vec.reset(seed=0)
    assert obs.dtype == np.int64 and vec.observation_space.contains(obs)
    obs, reward, *_ = vec.step(np.zeros(2, int))
    assert vec.observation_space.contains(obs) and reward.shape == (2,)
    v = quiet(gym.make_vec, "AtariDream-v0", num_envs=2, vectorization_mode="vector_entry_point",
              world=str(worlds["heads"]), start="data")
    assert v.reset(seed=0)[0].shape == (2, 84, 64, 3)


def test_bench_envs_runs(worlds):
    r = run_script("bench.py", "envs", "--world", worlds["heads"], "--speed-steps", "5", "--envs", "1,3")
    assert r.returncode == 0, describe(r)
    assert "DreamEnv" in r.stdout and "| 3 |" in r.stdout


# -----------------------------------------------------------------------------
# bad input: a ValueError in the API

def test_bad_input(worlds, tmp_path):
    env = quiet(common.DreamEnv, str(worlds["heads"]), start="data")
    env.reset(seed=0)
    for bad in (env.action_space.n, -1, 1.5):
        with pytest.raises(ValueError, match="action"):
            env.step(bad)
    with pytest.raises(ValueError, match="start='data'"):
        quiet(common.DreamEnv, str(worlds["heads"]), start="data", data=tmp_path)  # no episodes there
    with pytest.raises(ValueError, match="start"):
        quiet(common.DreamEnv, str(worlds["heads"]), start="somewhere")
    with pytest.raises(ValueError, match="obs"):
        quiet(common.DreamVecEnv, str(worlds["latent"]), num_envs=2, obs="tokens")
    with pytest.raises(ValueError, match="not a world|cannot read|no checkpoint"):
        common.DreamEnv(str(tmp_path / "missing.pt"))
    vec = quiet(common.DreamVecEnv, str(worlds["heads"]), num_envs=2, start="data")
    vec.reset(seed=0)
    with pytest.raises(ValueError, match="actions"):
        vec.step([0, 99])
    breakout = tmp_path / "breakout"
    r = run_script("collect.py", "--game", "Breakout", "--steps", "20", "--out", breakout)
    assert r.returncode == 0, describe(r)
    with pytest.raises(ValueError, match="Breakout"):
        quiet(common.DreamEnv, str(worlds["heads"]), start="data", data=breakout)
