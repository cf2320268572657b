"""collect.py -- record Atari episodes from the Arcade Learning Environment.

One compressed npz per episode: frames (N+1, 210, 160, 3) uint8 exactly as the env returns
them, actions/rewards/terminated/truncated (N,); action[i] takes frames[i] to frames[i+1].

Examples:
  python collect.py                                        # Pong, mix policy, 20k steps -> data/pong/
  python collect.py --game Breakout --policy tracker --steps 50000 --seed 1
  python collect.py --game SpaceInvaders --policy sticky --out data/si
  python collect.py --game Pong,Breakout,SpaceInvaders     # each game into its own folder, data/<game>/
  python collect.py --policy human --steps 3000            # you play, at 15 FPS, arrows + space
  python collect.py --policy agent:checkpoints/pong/agent.pt --out data/pong2   # the agent train_agent.py made
  python collect.py --agent checkpoints/pong/agent.pt      # mix, the agent in place of the tracker
  python collect.py --envs 2 --steps 100000                # one emulator per core: the same episodes, faster

Ctrl-C keeps every finished episode and saves the one in progress (marked truncated).
Running again into the same folder adds episodes; it never overwrites.
"""
import concurrent.futures
import math
import os
import re
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# flags

p = common.flags(__doc__)
p.add_argument("--game", default="Pong",
               help="ALE game: short name (Pong, Breakout, ...) or full id (ALE/Pong-v5); a comma list records each")
p.add_argument("--steps", type=common.positive_int, default=20000, help="transitions to record in total (per game)")
p.add_argument("--policy", default="mix", type=common.policy_flag("random", "sticky", "tracker", "human", "mix"),
               help="who plays: uniform random, held random actions, RAM ball-tracker, you, a mix, or agent:PATH "
                    "(an agent from train_agent.py)")
p.add_argument("--mix", default="0.5,0.3,0.2", help="mix policy weights: tracker,sticky,random")
p.add_argument("--agent", default=None, help="mix: this train_agent.py agent plays the tracker's share")
p.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical episodes")
p.add_argument("--out", default=None, help="output folder (default: data/<game>; several games: OUT/<game>)")
p.add_argument("--max-episode-steps", type=common.positive_int, default=1000,
               help="truncate longer episodes; short episodes give more varied starts and a real validation split")
p.add_argument("--sticky", type=common.probability, default=0.0,
               help="sticky-action probability (0.25 in Machado et al. 2018)")
p.add_argument("--envs", type=common.positive_int, default=1,
               help="emulators, each in its own process (one per core): the same episodes as one, sooner")
p.add_argument("--fps", type=common.positive_int, default=15, help="human policy: frames per second")
p.add_argument("--scale", type=common.positive_int, default=3, help="human policy: window scale")


# -----------------------------------------------------------------------------
# the human policy: keyboard in a pygame window, recorded like any other policy

class Quit(Exception):
    """The player ended the recording (Esc, Q, window closed): kept like Ctrl-C, exit 0."""


class HumanPolicy:
    """Arrows and space, mapped through the game's action meanings; Esc or closing the window
    ends the recording like Ctrl-C. Held keys are tracked from KEYDOWN/KEYUP events, so a
    scripted event sequence drives it exactly as a keyboard does (tests)."""

    def __init__(self, meanings, fps=15, scale=3):
        common.check_display("--policy human needs a window; record with another policy headless")
        import pygame
        pygame.init()
        self.pg, self.meanings, self.fps, self.scale = pygame, meanings, fps, scale
        self.keys, self.held = common.pygame_keys(), set()
        self.screen = pygame.display.set_mode((160 * scale, 210 * scale))
        pygame.display.set_caption("collect.py: arrows move, space fires, Esc stops")
        self.clock = pygame.time.Clock()

    def __call__(self, env, obs=None):
        pg = self.pg
        for e in pg.event.get():
            if e.type == pg.QUIT or (e.type == pg.KEYDOWN and e.key in (pg.K_ESCAPE, pg.K_q)):
                raise Quit
            if e.type in (pg.KEYDOWN, pg.KEYUP) and e.key in self.keys:
                (self.held.add if e.type == pg.KEYDOWN else self.held.discard)(self.keys[e.key])
        if obs is not None:
            surf = pg.surfarray.make_surface(obs.transpose(1, 0, 2))
            self.screen.blit(pg.transform.scale(surf, self.screen.get_size()), (0, 0))
            pg.display.flip()
        self.clock.tick(self.fps)
        return common.action_for_keys(self.held, self.meanings)


# -----------------------------------------------------------------------------
# --envs N: N emulators in N processes. Episode i is recorded from its own seeds whichever
# process plays it, and episodes are kept in index order up to the budget, so the files are
# those that one emulator writes (its episodes after the first are unseeded resets, which
# without sticky actions start exactly where a seeded reset does).

def end_flags(n, terminated, truncated):
    """terminated and truncated (n,): how the episode's last step ended, False before it."""
    term, trunc = np.zeros(n, bool), np.zeros(n, bool)
    term[-1], trunc[-1] = terminated, truncated
    return term, trunc


def episode_seeds(seed, idx):
    """(emulator seed, policy rng) of episode idx: same --seed -> same files, and episodes
    appended to a folder later get fresh seeds."""
    env_seed, pol_seed = np.random.SeedSequence([seed, idx]).generate_state(2)
    return int(env_seed), np.random.default_rng(pol_seed)


_worker_env, _frames = None, None  # each worker process's emulator and frame buffer, made on its first episode


def quiet_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it keeps what is done
    torch.set_num_threads(1)


def record_episode(args, mix, idx, cap, path, meta):
    """In a worker: play episode idx for at most `cap` steps and write it to path (compressing
    here, on this core) -> (steps, return, terminated)."""
    global _worker_env, _frames
    fresh = _worker_env is None
    if fresh:
        _worker_env = common.make_env(args.game, sticky=args.sticky)
        _frames = np.zeros((cap + 1, 210, 160, 3), np.uint8)
    env_seed, rng = episode_seeds(args.seed, idx)
    policy = common.make_policy(args.policy, _worker_env, rng, mix, warn=False, agent=args.agent)
    # as in the one-emulator loop: a seeded reset reloads the ROM (~90 ms), needed first and with sticky actions
    obs, _ = _worker_env.reset(seed=env_seed) if fresh or args.sticky > 0 else _worker_env.reset()
    actions, rewards, terminated, truncated = [], [], False, False
    _frames[0] = obs
    while not (terminated or truncated) and len(actions) < cap:
        a = policy(_worker_env, obs)
        obs, r, terminated, truncated, _ = _worker_env.step(a)
        actions.append(a), rewards.append(r)
        _frames[len(actions)] = obs
    n = len(actions)
    common.save_episode(path, _frames[:n + 1], np.array(actions, np.int64), np.array(rewards, np.float32),
                        *end_flags(n, terminated, not terminated), episode=idx, **meta)
    return n, float(np.sum(rewards)), terminated


def cut(path, n):
    """Rewrite an episode as its first n steps, truncated: where one emulator stops at the budget."""
    ep = common.load_episode(path)
    arrays = {k: ep.pop(k) for k in ("frames", "actions", "rewards", "terminated", "truncated")}
    common.save_episode(path, arrays["frames"][:n + 1], arrays["actions"][:n], arrays["rewards"][:n],
                        *end_flags(n, False, True), **ep)
    return float(np.sum(arrays["rewards"][:n]))


def record_in_parallel(args, mix, out, first, meta, keep):
    """Episodes first, first + 1, ... on args.envs processes, N in flight, kept in index order
    (keep(path, steps, return)) up to the budget, the last one cut where one emulator would have
    stopped; episodes still in flight then (past the budget, or at a Ctrl-C) are removed."""
    import multiprocessing
    cap, done, idx, nxt, flight = min(args.max_episode_steps, args.steps), 0, first, first, {}
    path = lambda i: os.path.join(out, f"ep_{i:06d}.npz")
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with concurrent.futures.ProcessPoolExecutor(args.envs, mp_context=ctx, initializer=quiet_worker) as pool:
        try:
            while done < args.steps:
                while len(flight) < args.envs:
                    flight[nxt], nxt = pool.submit(record_episode, args, mix, nxt, cap, path(nxt), meta), nxt + 1
                n, ret, _ = flight[idx].result()
                del flight[idx]
                if n > args.steps - done:
                    n, ret = args.steps - done, cut(path(idx), args.steps - done)
                keep(path(idx), n, ret)
                done, idx = done + n, idx + 1
        finally:
            for f in flight.values():
                f.cancel()
            pool.shutdown(wait=True)
            for i in flight:
                if os.path.exists(path(i)):
                    os.remove(path(i))
            if done < args.steps and flight:
                print(f"stopped: the {len(flight)} episodes in progress were not kept", file=sys.stderr)


# -----------------------------------------------------------------------------
# the recording loop

def main():
    args = p.parse_args()
    try:
        mix = tuple(float(w) for w in args.mix.split(","))
        assert len(mix) == 3 and all(math.isfinite(w) and w >= 0 for w in mix)
    except (ValueError, AssertionError):
        raise common.KitError(f"--mix wants three non-negative weights tracker,sticky,random, got '{args.mix}'") \
            from None
    if args.agent and args.policy != "mix":
        raise common.KitError(f"--agent plays a share of --policy mix; the agent alone is --policy agent:{args.agent}")
    if args.agent or args.policy.startswith("agent:"):
        torch.set_num_threads(1)  # the agent acts at batch 1 beside the writer thread: a 2nd torch thread stalls
    games = [common.resolve_game(g.strip()) for g in args.game.split(",")]
    if len(set(games)) < len(games):
        raise common.KitError(f"--game {args.game} names a game twice")
    if len(games) > 1 and (args.agent or args.policy.startswith("agent:") or args.policy == "human"):
        raise common.KitError("an agent or a human plays one game: record several games with another --policy")
    for game in games:  # one after another, each into its own folder, as if collected alone
        args.game = game
        record(args, mix, os.path.join(args.out, game[4:-3].lower()) if args.out and len(games) > 1 else args.out)


def record(args, mix, out):
    """Record args.steps transitions of args.game into `out` (None: data/<game>)."""
    env = common.make_env(args.game, sticky=args.sticky)
    out = out or os.path.join("data", env.game[4:-3].lower())
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, ".write-test"), "w"):
            pass
        os.remove(os.path.join(out, ".write-test"))
    except OSError as e:
        raise common.KitError(f"cannot write to {out}: {e.strerror}") from None
    existing = [int(m.group(1)) for f in os.listdir(out) if (m := re.fullmatch(r"ep_(\d+)\.npz", f))]
    first = max(existing, default=-1) + 1
    if args.policy == "human" and args.envs > 1:
        raise common.KitError("--policy human plays one emulator: leave --envs at 1")
    human = HumanPolicy(env.action_meanings, args.fps, args.scale) if args.policy == "human" else None

    # Two reused frame buffers: the writer thread compresses one episode (zlib releases the
    # GIL, so it runs on the other core) while the emulator fills the next.
    cap = min(args.max_episode_steps, args.steps)
    buffers = [np.zeros((cap + 1, 210, 160, 3), np.uint8) for _ in range(2)]
    pending = [None, None]
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    meta = dict(game=env.game, action_meanings=np.array(env.action_meanings), policy=args.policy,
                seed=args.seed, frameskip=4, sticky=args.sticky)
    done_steps, returns, written = 0, [], []

    def save(k, idx, n, actions, rewards, terminated, truncated, wait=False):
        path = os.path.join(out, f"ep_{idx:06d}.npz")
        # actions/rewards are copied: the next episode refills those arrays while this one compresses
        job = writer.submit(common.save_episode, path, buffers[k][:n + 1], actions[:n].copy(), rewards[:n].copy(),
                            *end_flags(n, terminated, truncated), episode=idx, **meta)
        pending[k] = job
        written.append(path)
        returns.append(float(np.sum(rewards[:n])))
        if wait:
            job.result()

    def kept(path, n, ret):  # --envs N: an episode another process recorded and wrote
        nonlocal done_steps
        done_steps += n
        written.append(path), returns.append(ret)
        bar.update(n)
        bar.set_postfix(episodes=len(written), ret=f"{np.mean(returns):.1f}")

    interrupted = False
    bar = tqdm(total=args.steps, unit="step", desc=f"collect {env.game[4:-3]} ({args.policy})", smoothing=0.05)
    t0, ep = time.time(), 0
    k = n = 0
    actions = np.zeros(cap, np.int64)
    rewards = np.zeros(cap, np.float32)
    try:
        if args.envs > 1:  # N emulators elsewhere; the policy is made here once for its errors and warnings
            common.make_policy(args.policy, env, np.random.default_rng(0), mix, agent=args.agent)
            record_in_parallel(args, mix, out, first, meta, kept)
        while done_steps < args.steps:  # one emulator here, the writer thread on the other core
            idx, k, n = first + ep, ep % 2, 0
            if pending[k] is not None:
                pending[k].result()  # that buffer's episode is on disk; reuse it
            env_seed, rng = episode_seeds(args.seed, idx)
            policy = human or common.make_policy(args.policy, env, rng, mix, warn=ep == 0, agent=args.agent)
            # a seeded reset reloads the ROM (~90 ms); without sticky actions the emulator is
            # deterministic given the actions, so only the first episode needs it
            obs, _ = env.reset(seed=env_seed) if ep == 0 or args.sticky > 0 else env.reset()
            buf, n, terminated, truncated = buffers[k], 0, False, False
            buf[0] = obs
            limit = min(cap, args.steps - done_steps)
            while not (terminated or truncated) and n < limit:
                a = policy(env, obs)
                obs, r, terminated, truncated, _ = env.step(a)
                buf[n + 1], actions[n], rewards[n] = obs, a, r
                n += 1
                bar.update(1)
            truncated = truncated or not terminated
            done_steps += n
            save(k, idx, n, actions, rewards, terminated, truncated)
            n = 0  # saved: a Ctrl-C from here on must not save it again
            ep += 1
            bar.set_postfix(episodes=ep, ret=f"{np.mean(returns):.1f}")
    except (KeyboardInterrupt, Quit) as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the save
        interrupted = isinstance(e, KeyboardInterrupt)
        bar.close()
        if n > 0 and len(written) == ep:  # an episode was in progress
            done_steps += n
            save(k, first + ep, n, actions, rewards, False, True)
            print(f"stopped: saved the episode in progress ({n} steps, marked truncated)", file=sys.stderr)
    finally:
        bar.close()
        writer.shutdown(wait=True)
        env.close()
    dt = time.time() - t0
    print(f"wrote {len(written)} episodes, {done_steps} transitions to {out}/ "
          f"(mean return {np.mean(returns) if returns else float('nan'):.2f}, {done_steps / dt:.0f} steps/s)")
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    common.run(main)
