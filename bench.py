"""bench.py -- the kit's speed and quality numbers, as reported in the README.

  python bench.py collect                     # collection rate per policy vs the raw emulator
  python bench.py world                       # dream fidelity + wm.step speed of checkpoints/pong/world.pt
  python bench.py world --world checkpoints/pong/world_long.pt --data data/pong
  python bench.py all

Dream fidelity (Pong): open loop from 4 real frames with the true actions on validation
episodes: the player's paddle error (raw pixels of the 210x160 frame) at 10 and 30 steps,
the share of frames at 10 steps whose dreamed ball is within 8 raw pixels of the real one,
and decoded PSNR next to the copy-last-frame baseline at 1/5/10/30 steps.
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import common

p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("what", nargs="?", default="all", choices=["collect", "world", "all"], help="which benchmark")
p.add_argument("--game", default="Pong", help="collect: game")
p.add_argument("--steps", type=int, default=10000, help="collect: transitions per policy")
p.add_argument("--world", default="checkpoints/pong/world.pt", help="world: checkpoint")
p.add_argument("--data", default="data/pong", help="world: dataset (its validation episodes are used)")
p.add_argument("--windows", type=int, default=64, help="world: open-loop windows of 30 steps")
p.add_argument("--device", default="cpu", help="world: device for the speed test")
p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="world: also time torch.compile")
p.add_argument("--threads", type=int, default=1, help="world: torch threads (play.py's default: a batch-1 step barely splits)")
p.add_argument("--speed-steps", type=int, default=300, help="world: wm.step calls timed for the speed test")
HORIZONS = (1, 5, 10, 30)


# -----------------------------------------------------------------------------

def bench_collect(args):
    import gymnasium as gym
    import ale_py
    gym.register_envs(ale_py)
    env = gym.make(common.resolve_game(args.game), repeat_action_probability=0.0)
    env.reset(seed=0)
    env.action_space.seed(0)
    t = time.perf_counter()
    for _ in range(args.steps):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    raw = args.steps / (time.perf_counter() - t)
    print(f"raw emulator (gym.make, random actions, no recording): {raw:.0f} steps/s")
    env = common.make_env(args.game, seed=0)  # + the max of the last two frames (a second screen grab)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(args.steps):
        _, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        if term or trunc:
            env.reset()
    kit = args.steps / (time.perf_counter() - t)
    print(f"kit env (common.make_env: max-pooled frames, no recording): {kit:.0f} steps/s, {kit / raw:.0%} of raw")
    print(f"| policy | steps/s (recorded to disk) | share of raw |\n|---|---|---|")
    for policy in ("random", "sticky", "tracker", "mix"):
        out = tempfile.mkdtemp()
        try:
            r = subprocess.run([sys.executable, "collect.py", "--game", args.game, "--policy", policy, "--steps",
                                str(args.steps), "--out", out], capture_output=True, text=True, check=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rate = float(r.stdout.strip().split()[-2].lstrip("("))
        print(f"| {policy} | {rate:.0f} | {rate / raw:.0%} |")


# -----------------------------------------------------------------------------

def bench_world(args):
    torch.set_num_threads(args.threads)
    wm = common.load_world(args.world, device=args.device)
    ck = common.load_checkpoint(args.world, ("world",))
    T, H = wm.context, max(HORIZONS)
    files = common.episode_files(args.data)
    _, val = common.split_episodes(files, ck["args"].get("val_frac", 0.1), ck["args"].get("seed", 0))
    eps = [common.load_episode(f, keys=["frames", "actions", "game"]) for f in val]
    if eps and str(eps[0]["game"]) != wm.game:
        raise common.KitError(f"{args.world} is a {wm.game} model, {args.data} holds {eps[0]['game']}")
    pool = [(i, s) for i, ep in enumerate(eps) for s in range(len(ep["actions"]) - T - H + 2)]
    rng = np.random.default_rng(0)
    picks = [pool[j] for j in sorted(rng.choice(len(pool), min(args.windows, len(pool)), replace=False))]
    pong = wm.game == "ALE/Pong-v5"
    psnr = {h: [] for h in HORIZONS}
    copy = {h: [] for h in HORIZONS}
    pad_err = {10: [], 30: []}
    ball_hit, ball_n = [], 0
    mse = lambda a, b: np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    db = lambda m: 10 * np.log10(255 ** 2 / max(m, 1e-3))
    for i, s in picks:
        ep = eps[i]
        frames = [wm.observe(f) for f in ep["frames"][s:s + T + H]]
        wm.reset(frames[:T])
        for k in range(1, H + 1):
            dream, real = wm.step(int(ep["actions"][s + T - 2 + k])), frames[T - 1 + k]
            if k in HORIZONS:
                psnr[k].append(db(mse(dream, real)))
                copy[k].append(db(mse(frames[T - 1], real)))
            if pong and k in (10, 30):
                rp, rb, rc = common.pong_objects(real, wm.space)
                dp, db_, dc = common.pong_objects(dream, wm.space)
                if rp is not None:
                    pad_err[k].append(abs(dp - rp) if dp is not None else 210.0)
                if k == 10 and rb is not None:
                    ball_hit.append(db_ is not None and np.hypot(db_ - rb, dc - rc) <= 8)
    print(f"world {args.world} ({ck['step']} steps), {len(picks)} validation windows from {len(val)} episodes of {args.data}")
    print("| horizon | dream PSNR (dB) | copy-last PSNR (dB) |\n|---|---|---|")
    for h in HORIZONS:
        print(f"| {h} | {np.mean(psnr[h]):.2f} | {np.mean(copy[h]):.2f} |")
    if pong:
        for k in (10, 30):
            e = np.array(pad_err[k])
            print(f"paddle error @{k}: mean {e.mean():.2f} px, median {np.median(e):.2f} px, "
                  f"within 2 px {np.mean(e <= 2):.0%} (n={len(e)})")
        print(f"ball within 8 px @10: {np.mean(ball_hit):.0%} of {len(ball_hit)} frames with a visible ball")

    # speed: wm.step at batch 1, eager and (where it measures faster) compiled
    frames = [wm.observe(f) for f in eps[0]["frames"][:T]]

    def rate(n=args.speed_steps):
        wm.reset(frames)
        for a in range(20):
            wm.step(a % wm.n_actions)
        t = time.perf_counter()
        for a in range(n):
            wm.step(a % wm.n_actions)
        return n / (time.perf_counter() - t)

    eager = rate()
    print(f"wm.step batch 1 on {args.device} ({torch.get_num_threads()} threads): {eager:.0f} steps/s eager")
    if not args.compile:
        return
    try:
        wm.compile()
        t = time.perf_counter()
        wm.reset(frames)
        wm.step(0)
        compiled = rate()
        print(f"  torch.compile: {compiled:.0f} steps/s (compile took {time.perf_counter() - t:.0f} s)")
    except Exception as e:  # no C++ compiler, unsupported platform
        print(f"  torch.compile unavailable here: {type(e).__name__}")


def main():
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    if args.what in ("collect", "all"):
        bench_collect(args)
    if args.what in ("world", "all"):
        bench_world(args)


if __name__ == "__main__":
    common.run(main)
