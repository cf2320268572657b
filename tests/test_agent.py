"""train_agent.py: a smoke run writes the agent, its curve and a real-game evaluation; --resume
goes on counting; the agent plays in play.py and records in collect.py; what it learns is bit
for bit the same whether or not it played the real game in between (the real game never reaches
a gradient); GAE across ends and cuts; bad input."""
import csv
import shutil

import numpy as np
import pytest
import torch

import common
import train_agent
from conftest import describe, run_script

AGENT = ("--envs", "4", "--rollout", "8", "--total-steps", "64", "--dream-steps", "12", "--eval-episodes", "2",
         "--eval-max-steps", "20", "--gif-steps", "5", "--minibatches", "2", "--epochs", "2")


@pytest.fixture(scope="module")
def agent(token_worlds, tmp_path_factory):
    """An agent trained in the session's tiny world with heads (world), and the world without (bare)."""
    tmp = tmp_path_factory.mktemp("agent")
    paths = dict(tmp=tmp, world=token_worlds["heads"], bare=token_worlds["bare"], agent=tmp / "agent.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        r = run_script("train_agent.py", "--world", paths["world"], "--out", paths["agent"], "--assets", tmp,
                       "--eval-every", "1", *AGENT)
    assert r.returncode == 0, describe(r)
    paths["stdout"] = r.stdout
    return paths


def test_smoke_run_writes_agent_curve_and_real_evaluation(agent):
    tmp = agent["tmp"]
    assert "random policy, real game:" in agent["stdout"] and "real game" in agent["stdout"]
    ck = common.load_checkpoint(agent["agent"], ("agent",))
    assert ck["step"] == 64 and ck["game"] == "ALE/Pong-v5" and ck["frame_space"] == "rgb84x64"
    with open(tmp / "agent_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["policy"] for r in rows] == ["random", "agent", "agent"]  # 2 updates, evaluated after each
    assert all(np.isfinite(float(r["real_mean"])) for r in rows)
    assert (tmp / "pong_agent_real.gif").stat().st_size > 0 and (tmp / "pong_agent_curve.png").stat().st_size > 0


def test_reference_learns_in_the_real_game_for_given_minutes(agent, tmp_path):
    """--env real: the world lends only its tokenizer (a world without heads will do), the files are
    the reference's (an agent beside it is not overwritten), and --minutes ends the run long
    before --total-steps would."""
    r = run_script("train_agent.py", "--world", agent["bare"], "--assets", tmp_path, "--env", "real",
                   *AGENT, "--total-steps", "10000000", "--minutes", "0.05")
    assert r.returncode == 0, describe(r)
    assert "real game: 4 x pong" in r.stdout and "stepping the emulators" in r.stdout
    out = agent["bare"].parent / "reference.pt"
    ck = common.load_checkpoint(out, ("agent",))
    assert 0 < ck["step"] < 10_000_000 and ck["step"] % 32 == 0 and ck["args"]["env"] == "real"
    assert (tmp_path / "pong_reference_real.gif").is_file() and (tmp_path / "pong_reference_curve.png").is_file()
    with open(agent["bare"].parent / "reference_curve.csv") as f:
        assert [row["policy"] for row in csv.DictReader(f)][0] == "random"
    out.unlink()
    out.with_name("reference_curve.csv").unlink()


def test_resume_goes_on_counting(agent, tmp_path):
    out = tmp_path / "agent.pt"
    shutil.copy(agent["agent"], out)
    r = run_script("train_agent.py", "--world", agent["world"], "--out", out, "--assets", tmp_path, "--resume",
                   *AGENT, "--total-steps", "128")
    assert r.returncode == 0, describe(r)
    assert "resumed" in r.stdout
    ck = common.load_checkpoint(out, ("agent",))
    assert ck["step"] == 128
    assert [row["policy"] for row in ck["metrics"]["curve"]] == ["random", "agent", "agent", "agent"]


def test_the_real_game_never_reaches_a_gradient(agent, tmp_path, monkeypatch):
    """Train twice from the same seed, once playing the real game after every update and once only
    at the end, with a different number of real episodes: the agents come out bit-identical. And
    every real emulator the run makes is made inside evaluate()."""
    inside = []
    make_env, evaluate = common.make_env, train_agent.evaluate

    def guarded_make_env(*args, **kw):
        assert inside, "a real env was made outside evaluate()"
        return make_env(*args, **kw)

    def flagged_evaluate(*args, **kw):
        inside.append(True)
        try:
            return evaluate(*args, **kw)
        finally:
            inside.pop()

    monkeypatch.setattr(common, "make_env", guarded_make_env)
    monkeypatch.setattr(train_agent, "evaluate", flagged_evaluate)
    weights = []
    for i, (every, episodes) in enumerate((("1", "2"), ("100", "3"))):
        out = tmp_path / f"{i}.pt"
        argv = ["train_agent.py", "--world", str(agent["world"]), "--out", str(out), "--assets", str(tmp_path),
                "--eval-every", every, *AGENT]
        argv[argv.index("--eval-episodes") + 1] = episodes
        monkeypatch.setattr("sys.argv", argv)
        train_agent.main()
        weights.append(common.load_checkpoint(out, ("agent",))["model"])
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_advantages_stop_at_ends_and_bootstrap_cuts():
    """Dream 0 ends by the heads' draw at t=1, dream 1 is cut at t=1 (truncated); t=2 starts them afresh."""
    T, gamma, lam = 4, 0.9, 1.0
    b = dict(rewards=torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]),
             values=torch.tensor([[0.5, 0.5], [0.5, 0.5], [7.0, 7.0], [0.0, 0.0]]),
             terminated=torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]),
             done=torch.tensor([[False, False], [True, True], [False, False], [False, False]]),
             last_value=torch.tensor([2.0, 2.0]))
    adv, ret = train_agent.advantages(b, gamma, lam)
    assert adv.shape == (T, 2)
    assert ret[1, 0] == pytest.approx(1.0)  # ended: nothing after
    assert ret[1, 1] == pytest.approx(1.0 + gamma * 7.0)  # cut: the critic's value of its last frame
    assert ret[0, 0] == pytest.approx(gamma * 1.0) and ret[0, 1] == pytest.approx(gamma * (1 + gamma * 7.0))
    assert ret[3, 0] == pytest.approx(gamma * 2.0)  # the rollout's end: bootstrapped


def test_paying_starts_are_windows_a_reward_follows():
    rewards = np.zeros(30)
    rewards[[1, 10, 25]] = [1, 1, -1]
    starts = common.DreamStarts.paying(rewards, 4, 3)
    assert list(starts) == [5, 6, 7, 20, 21, 22]  # the reward at 1 comes before any window of 4 frames ends
    assert all(rewards[s + 3:s + 6].any() for s in starts)  # a dream from frames s..s+3 pays at s+3, s+4, s+5


def test_frame_stack_starts_afresh():
    stack = torch.arange(2 * 4 * 2 * 2).view(2, 4, 2, 2)
    codes = torch.full((2, 2, 2), 99)
    out = common.push_frames(stack, codes, torch.tensor([False, True]))
    assert torch.equal(out[0, :3], stack[0, 1:]) and torch.equal(out[0, 3], codes[0])
    assert (out[1] == 99).all()


def test_agent_plays_in_play_and_collect(agent, tmp_path):
    spec = f"agent:{agent['agent']}"
    r = run_script("play.py", "--world", agent["world"], "--policy", spec, "--gif", tmp_path / "a.gif", "--steps", "6")
    assert r.returncode == 0, describe(r)
    out = tmp_path / "data"
    r = run_script("collect.py", "--policy", spec, "--steps", "30", "--max-episode-steps", "15", "--out", out)
    assert r.returncode == 0, describe(r)
    r = run_script("collect.py", "--agent", agent["agent"], "--steps", "30", "--max-episode-steps", "15", "--out", out)
    assert r.returncode == 0, describe(r)
    files = common.episode_files(out)
    assert len(files) == 4 and str(common.load_episode(files[0])["policy"]) == spec


def test_bad_input(agent, tmp_path):
    r = run_script("train_agent.py", "--world", agent["bare"], "--out", tmp_path / "a.pt", *AGENT)
    assert r.returncode == 2 and "no reward" in r.stderr and "Traceback" not in r.stderr, describe(r)
    r = run_script("train_agent.py", "--world", agent["world"], *AGENT, "--eval-episodes", "0")
    assert r.returncode == 2 and "--eval-episodes" in r.stderr, describe(r)
    r = run_script("collect.py", "--game", "Breakout", "--policy", f"agent:{agent['agent']}", "--steps", "5",
                   "--out", tmp_path / "b")
    assert r.returncode == 2 and "plays ALE/Pong-v5" in r.stderr and "Traceback" not in r.stderr, describe(r)
    r = run_script("play.py", "--world", agent["world"], "--policy", "agent:", "--gif", tmp_path / "x.gif")
    assert r.returncode == 2 and "not a policy" in r.stderr, describe(r)
    r = run_script("play.py", "--world", agent["bare"], "--policy", f"agent:{tmp_path / 'none.pt'}", "--gif",
                   tmp_path / "x.gif")
    assert r.returncode == 2 and "no checkpoint" in r.stderr, describe(r)
