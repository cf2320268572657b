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

p = common.flags(__doc__)
p.add_argument("what", nargs="?", default="all", choices=["collect", "world", "all"], help="which benchmark")
p.add_argument("--game", default="Pong", help="collect: game")
p.add_argument("--steps", type=common.positive_int, default=10000, help="collect: transitions per policy")
p.add_argument("--world", default="checkpoints/pong/world.pt", help="world: checkpoint")
p.add_argument("--data", default="data/pong", help="world: dataset (its validation episodes are used)")
p.add_argument("--windows", type=common.positive_int, default=64, help="world: open-loop windows of 30 steps")
p.add_argument("--device", default="cpu", help="world: device for the speed test")
p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="world: also time torch.compile")
p.add_argument("--threads", type=common.positive_int, default=1,
               help="world: torch threads (play.py's default: a batch-1 step barely splits)")
p.add_argument("--speed-steps", type=common.positive_int, default=300,
               help="world: wm.step calls timed for the speed test")


# -----------------------------------------------------------------------------

def bench_collect(args):
    import gymnasium as gym  # common has registered the ALE games
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
    print("| policy | steps/s (recorded to disk) | share of raw |\n|---|---|---|")
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
    T, H = wm.context, max(common.HORIZONS)
    files = common.episode_files(args.data)
    _, val = common.split_episodes(files, ck["args"].get("val_frac", 0.1), ck["args"].get("seed", 0))
    eps = [common.load_episode(f, keys=["frames", "actions", "game"]) for f in val]
    if eps and str(eps[0]["game"]) != wm.game:
        raise common.KitError(f"{args.world} is a {wm.game} model, {args.data} holds {eps[0]['game']}")
    pool = common.windows([len(ep["frames"]) for ep in eps], T + H)
    rng = np.random.default_rng(0)
    picks = [pool[j] for j in sorted(rng.choice(len(pool), min(args.windows, len(pool)), replace=False))]
    frames = torch.stack([common.preprocess(eps[i]["frames"][s:s + T + H], wm.space) for i, s in picks])
    actions = torch.stack([torch.as_tensor(eps[i]["actions"][s + T - 1:s + T - 1 + H]) for i, s in picks])
    m = common.open_loop(wm, frames, actions)
    print(f"world {args.world} ({ck['step']} steps), {len(picks)} validation windows from {len(val)} episodes "
          f"of {args.data}")
    print("| horizon | dream PSNR (dB) | copy-last PSNR (dB) |\n|---|---|---|")
    for h in common.HORIZONS:
        print(f"| {h} | {m[f'psnr@{h}']:.2f} | {m[f'copy_psnr@{h}']:.2f} |")
    if wm.game == "ALE/Pong-v5":
        for k in (10, 30):
            print(f"paddle error @{k}: mean {m[f'paddle_px@{k}']:.2f} px, median {m[f'paddle_median@{k}']:.2f} px, "
                  f"within 2 px {m[f'paddle_2px@{k}']:.0%}; ball within 8 px @{k}: {m[f'ball_8px@{k}']:.0%}")

    # speed: wm.step at batch 1, eager and (where it measures faster) compiled
    start = [wm.observe(f) for f in eps[0]["frames"][:T]]

    def rate(n=args.speed_steps):
        wm.reset(start)
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
        wm.reset(start)
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
