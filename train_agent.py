"""train_agent.py -- an agent that learns only inside the dream, scored in the real game.

PPO (CleanRL's ppo_atari.py, one file) on common.DreamVecEnv: N dreams of the world model
stepped in one forward pass, the reward and the end drawn by the world's heads. The agent sees
the dream's tokens (its last 4 frames of them): the decoder is never run while it learns, and in
the real game its own copy of the world's tokenizer turns the emulator's frames into the same
tokens. No gradient step ever uses a real transition: the real game (common.make_env) is played
only by evaluate(), every --eval-every updates and at the end, next to the random policy.
Writes the agent, a CSV and a PNG of the curve, and a GIF of the agent in the real game.

--env real trains the reference a dream-trained agent is measured against: the same agent, PPO
and tokens, learning in the real game itself (N emulators, rewards clipped to their sign as the
dream's heads draw them), for the same wall clock (--minutes). It writes reference.pt and
<game>_reference_*.

Examples:
  python train_agent.py                                         # checkpoints/pong/world.pt, ~25 min
  python train_agent.py --world checkpoints/breakout/world.pt --total-steps 200000
  python train_agent.py --resume --total-steps 600000           # go on from checkpoints/pong/agent.pt
  python train_agent.py --env real --minutes 23 --total-steps 10000000   # the reference: the real game, 23 min
  torchrun --nproc_per_node 2 train_agent.py                    # 2 processes, 32 of the 64 dreams each
  python play.py --policy agent:checkpoints/pong/agent.pt       # watch it play the dream (and the shadow)
  python collect.py --policy agent:checkpoints/pong/agent.pt    # let it record more data
"""
import csv
import os
import sys
import time

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# flags

p = common.flags(__doc__)
p.add_argument("--world", default="checkpoints/pong/world.pt", help="world model with reward heads (train_world.py)")
p.add_argument("--game", default=None, help="a model of several games: the one to learn (None: its first)")
p.add_argument("--env", default="dream", choices=["dream", "real"],
               help="where the agent learns: the dream, or the real game as the reference a dream-trained agent "
                    "is compared with (the world then only lends its tokenizer)")
p.add_argument("--out", default=None, help="agent checkpoint (default: agent.pt, or reference.pt with --env real, "
                                           "beside the world)")
p.add_argument("--assets", default="assets", help="folder for <game>_agent_real.gif and <game>_agent_curve.png "
                                                  "(<game>_reference_* with --env real)")
p.add_argument("--total-steps", type=common.positive_int, default=300_000,
               help="steps to learn from, over all dreams (or real games with --env real)")
p.add_argument("--minutes", type=common.positive_float, default=None,
               help="stop after this many minutes of wall clock, evaluations included, if --total-steps has not "
                    "ended it first: agents compared at equal time (the learning rate anneals over the budget)")
p.add_argument("--envs", type=common.positive_int, default=64, help="dreams stepped together in one forward pass")
p.add_argument("--rollout", type=common.positive_int, default=32, help="steps of every dream per update")
p.add_argument("--start", default="data", choices=["data", "env"],
               help="where dreams start: windows of the world's training episodes (varied: mid-rally, "
                    "serves, scores), or a real emulator reset (the checkpoint alone is enough)")
p.add_argument("--start-pool", type=common.positive_int, default=2048,
               help="--start data: windows of the recorded episodes read once to start dreams from")
p.add_argument("--paying-starts", type=common.probability, default=0.5,
               help="--start data: share of the windows after which the recording paid a reward within "
                    "--dream-steps (Pong pays a point every ~70 steps: most 20-step dreams would never see one)")
p.add_argument("--dream-steps", type=common.positive_int, default=20,
               help="a dream is cut after this many steps and the critic's value of its last frame stands for the "
                    "rest (imagination horizon: IRIS 20, DIAMOND and DreamerV3 15): the dream drifts from the game "
                    "the longer it runs")
p.add_argument("--temperature", type=common.nonneg_float, default=common.TEMPERATURE,
               help="the world's sampling temperature (0: argmax; the argmax dream never serves again)")
p.add_argument("--lr", type=common.positive_float, default=2.5e-4, help="Adam learning rate, annealed to 0 (CleanRL)")
p.add_argument("--gamma", type=common.probability, default=0.99, help="discount")
p.add_argument("--gae-lambda", type=common.probability, default=0.95, help="GAE lambda")
p.add_argument("--epochs", type=common.positive_int, default=4, help="PPO epochs over each rollout")
p.add_argument("--minibatches", type=common.positive_int, default=4, help="minibatches per epoch")
p.add_argument("--clip", type=common.positive_float, default=0.1, help="PPO ratio clip (CleanRL's Atari value)")
p.add_argument("--ent-coef", type=common.nonneg_float, default=0.01, help="entropy bonus")
p.add_argument("--vf-coef", type=common.nonneg_float, default=0.5, help="value loss weight")
p.add_argument("--max-grad-norm", type=common.positive_float, default=0.5, help="gradient clipping")
p.add_argument("--eval-every", type=common.positive_int, default=50, help="play the real game every N updates")
p.add_argument("--eval-episodes", type=common.positive_int, default=20, help="real-game episodes per evaluation")
p.add_argument("--eval-max-steps", type=common.positive_int, default=4500,
               help="cap of a real episode: 18,000 frames, 5 minutes of play (Machado et al. 2018)")
p.add_argument("--gif-steps", type=common.positive_int, default=600, help="length of the real-game GIF")
p.add_argument("--threads", type=common.positive_int, default=None, help="torch CPU threads (default: torch's)")
p.add_argument("--seed", type=int, default=0, help="random seed")
p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
p.add_argument("--resume", action="store_true", help="continue from --out with its optimizer and step")

CURVE = ("update", "step", "minutes", "policy", "real_mean", "real_std", "dream_return", "dream_episodes")


# -----------------------------------------------------------------------------
# where the agent learns, and the real game, which evaluate() plays and only the reference
# (--env real) learns from

def evaluate(act, game, episodes, max_steps, gif_steps=0, seed=10_000):
    """Play `episodes` real games in lockstep through common.make_env, act(raw frames (B, 210, 160, 3),
    fresh (B,) bool) -> actions (B,) choosing every move. -> (returns (episodes,), the first game's
    first `gif_steps` frames). Seeds 10000+i, the same at every evaluation."""
    envs = [common.make_env(game) for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns, live, fresh, gif = np.zeros(episodes), np.ones(episodes, bool), np.ones(episodes, bool), [obs[0]]
    for _ in range(max_steps):
        actions = act(obs, fresh)
        for i in np.nonzero(live)[0]:
            obs[i], r, terminated, truncated, _ = envs[i].step(int(actions[i]))
            returns[i] += r
            live[i] = not (terminated or truncated)
        if len(gif) < gif_steps:
            gif.append(obs[0].copy())
        fresh[:] = False
        if not live.any():
            break
    for env in envs:
        env.close()
    return returns, gif


def dreams(wm, n, args):
    """n dreams of the world, started from real frames (--start), paid and ended by its heads,
    cut at --dream-steps; their observations are tokens."""
    if wm.heads is None:
        raise common.KitError(f"{args.world} has no reward heads (train_world.py --heads): "
                              f"the dream gives no reward to learn from")
    try:
        return common.DreamVecEnv(wm, n, start=args.start, obs="tokens", max_episode_steps=args.dream_steps,
                                  pool=args.start_pool, paying=args.paying_starts)
    except ValueError as e:
        raise common.KitError(f"{e} (--start env starts dreams from the emulator instead)") from None


def real_games(wm, n, max_steps, device):
    """--env real: n emulators (gymnasium's SyncVectorEnv, the dream's NEXT_STEP autoreset), each
    game cut at max_steps, its rewards clipped to their sign (the dream's heads draw -1/0/+1, and
    CleanRL clips Atari rewards the same way), its frames turned into the tokens the agent reads."""
    def one():
        return gym.wrappers.TransformReward(gym.wrappers.TimeLimit(common.make_env(wm.game), max_steps), np.sign)

    @torch.no_grad()
    def encode(frames):
        return wm.tok.encode(common.preprocess(frames, wm.space).to(device)).cpu().numpy()

    grid = encode(np.zeros((1, 210, 160, 3), np.uint8)).shape[1:]
    space = gym.spaces.Box(0, wm.tok.n_codes - 1, grid, np.int64)
    return gym.wrappers.vector.TransformObservation(gym.vector.SyncVectorEnv([one] * n), encode,
                                                    gym.vector.utils.batch_space(space, n), space)


def curve_png(rows, path, game, env="dream"):
    """The learning curve: real return (mean and ± std) and the return where it learns (`env`) against its steps,
    the random policy's real return as a line. Drawn with pygame, the kit's one drawing library."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    import pygame
    pygame.font.init()
    W, H, pad = 640, 360, 48
    img = pygame.Surface((W, H))
    img.fill((255, 255, 255))
    font = pygame.font.Font(None, 20)
    agent = [r for r in rows if r["policy"] == "agent"]
    rand = [r for r in rows if r["policy"] == "random"]
    ys = [v for r in agent for v in (r["real_mean"] - r["real_std"], r["real_mean"] + r["real_std"], r["dream_return"])
          if np.isfinite(v)] + [r["real_mean"] for r in rand]
    lo, hi = min(ys, default=0) - 0.5, max(ys, default=1) + 0.5
    x_max = max([r["step"] for r in agent] + [1])
    px = lambda s: pad + (W - 2 * pad) * s / x_max  # noqa: E731
    py = lambda v: H - pad - (H - 2 * pad) * (v - lo) / (hi - lo)  # noqa: E731
    pygame.draw.rect(img, (0, 0, 0), (pad, pad, W - 2 * pad, H - 2 * pad), 1)
    for r in rand:
        pygame.draw.line(img, (150, 150, 150), (pad, py(r["real_mean"])), (W - pad, py(r["real_mean"])), 2)
    for key, color in (("real_mean", (200, 40, 40)), ("dream_return", (40, 80, 200))):
        pts = [(px(r["step"]), py(r[key])) for r in agent if np.isfinite(r[key])]
        if len(pts) > 1:
            pygame.draw.lines(img, color, False, pts, 2)
        for x, y in pts:
            pygame.draw.circle(img, color, (x, y), 3)
    for r in agent:  # the spread of the real episodes
        pygame.draw.line(img, (200, 40, 40), (px(r["step"]), py(r["real_mean"] - r["real_std"])),
                         (px(r["step"]), py(r["real_mean"] + r["real_std"])), 1)
    labels = [(f"{game[4:-3]}: return vs {env} steps", (0, 0, 0), (pad, 14)),
              ("real game (mean, std)", (200, 40, 40), (pad, H - 30)),
              ("dream (per dream)" if env == "dream" else "its games, clipped", (40, 80, 200), (pad + 170, H - 30)),
              ("random policy, real game", (120, 120, 120), (pad + 320, H - 30)),
              (f"{hi:.1f}", (0, 0, 0), (4, pad - 6)), (f"{lo:.1f}", (0, 0, 0), (4, H - pad - 6)),
              (f"{x_max:,}", (0, 0, 0), (W - pad - 30, H - pad + 4))]
    for text, color, at in labels:
        img.blit(font.render(text, True, color), at)
    imageio.imwrite(path, pygame.surfarray.array3d(img).swapaxes(0, 1))


# -----------------------------------------------------------------------------
# PPO on the dream (CleanRL's ppo_atari.py, for a gymnasium vector env that autoresets a step later)

def rollout(envs, agent, state, n_steps, device):
    """n_steps of every dream under the current policy -> the batch PPO learns from.

    With gymnasium's NEXT_STEP autoreset, the step after a dream ends only starts the next one:
    its action is ignored and its reward is 0, so it is marked invalid and never learned from."""
    obs, ended = state["obs"], state["ended"]
    keys = ("obs", "actions", "logprobs", "values", "rewards", "terminated", "done", "valid")
    buf = {k: [] for k in keys}
    world_s = 0.0
    for _ in range(n_steps):
        with torch.no_grad():
            logits, value = agent(obs)
        dist = torch.distributions.Categorical(logits=logits)
        action = dist.sample()
        t0 = time.perf_counter()
        codes, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
        world_s += time.perf_counter() - t0
        for k, v in zip(keys, (obs, action, dist.log_prob(action), value, reward, terminated,
                               terminated | truncated, ~ended)):
            buf[k].append(torch.as_tensor(v, device=device))
        state["returns"][~ended] += reward[~ended]
        for i in np.nonzero((terminated | truncated) & ~ended)[0]:
            state["finished"].append(float(state["returns"][i]))
            state["returns"][i] = 0.0
        obs = common.push_frames(obs, torch.as_tensor(codes, device=device), torch.as_tensor(ended, device=device))
        ended = terminated | truncated
    state["obs"], state["ended"] = obs, ended
    with torch.no_grad():
        buf["last_value"] = agent(obs)[1]
    batch = {k: torch.stack(v) if k != "last_value" else v for k, v in buf.items()}
    batch["rewards"], batch["terminated"] = batch["rewards"].float(), batch["terminated"].float()
    return batch, world_s


def advantages(b, gamma, lam):
    """GAE (Schulman et al. 2016). A dream that ended by the heads' draw (terminated) is worth 0
    after; one cut at --dream-steps (truncated) is worth what the critic says of its last frame,
    which the next, invalid, step holds."""
    T = len(b["rewards"])
    adv = torch.zeros_like(b["rewards"])
    last = torch.zeros_like(b["last_value"])
    for t in reversed(range(T)):
        next_value = b["values"][t + 1] if t + 1 < T else b["last_value"]
        delta = b["rewards"][t] + gamma * next_value * (1 - b["terminated"][t]) - b["values"][t]
        last = delta + gamma * lam * (1 - b["done"][t].float()) * last
        adv[t] = last
    return adv, adv + b["values"]


def update(agent, opt, b, ranks, args):
    """PPO's clipped objective over the valid steps of the rollout -> the last minibatch's numbers."""
    adv, ret = advantages(b, args.gamma, args.gae_lambda)
    keep = b["valid"].flatten()
    obs, act = b["obs"].flatten(0, 1)[keep], b["actions"].flatten()[keep]
    old_logp, adv, ret = b["logprobs"].flatten()[keep], adv.flatten()[keep], ret.flatten()[keep]
    n, m = len(act), args.minibatches
    for _ in range(args.epochs):
        order = torch.randperm(n, device=act.device)
        for i in range(m):  # exactly m steps, whatever n: under torchrun every rank must take as many
            mb = order[i * n // m:(i + 1) * n // m]
            logits, value = agent(obs[mb])
            logp = F.log_softmax(logits, -1)
            new_logp = logp.gather(1, act[mb, None])[:, 0]
            ratio = (new_logp - old_logp[mb]).exp()
            a = (adv[mb] - adv[mb].mean()) / (adv[mb].std() + 1e-8)
            pg_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - args.clip, 1 + args.clip)).mean()
            v_loss = 0.5 * (value - ret[mb]).pow(2).mean()
            entropy = -(logp.exp() * logp).sum(-1).mean()
            loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            common.average_gradients(agent.parameters(), ranks)
            torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            opt.step()
    return dict(pg=pg_loss.item(), v=v_loss.item(), ent=entropy.item(), clipfrac=((ratio - 1).abs() > args.clip)
                .float().mean().item())


# -----------------------------------------------------------------------------

def main():
    args = p.parse_args()
    common.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, ranks, device = common.distributed(args.device)  # torchrun: one process per rank
    n_envs = common.per_rank(args.envs, ranks, "--envs")  # this rank's share of the dreams
    stem = "agent" if args.env == "dream" else "reference"  # the files' names: a reference never overwrites an agent
    out = args.out or os.path.join(os.path.dirname(args.world) or ".", f"{stem}.pt")
    world_key = common.file_key(args.world) if os.path.isfile(args.world) else None

    # -------------------------------------------------------------------------
    # where it learns: N dreams of the world, or N real games (--env real)
    wm = common.load_world(args.world, device, args.temperature, args.game)
    if not isinstance(wm, common.TokenWorld) or isinstance(wm, common.LatentActionWorld):
        raise common.KitError(f"{args.world} is not a token world (train_world.py): the agent reads its tokens")
    name = wm.game[4:-3].lower()
    if args.env == "real":
        envs = real_games(wm, n_envs, args.eval_max_steps, device)
        print(f"real game: {args.envs} x {name}, tokens of {args.world}'s tokenizer, rewards clipped to their sign; "
              f"actions {wm.action_meanings}")
    else:
        envs = dreams(wm, n_envs, args)
        print(f"dream: {args.envs} x {name} in {args.world} at temperature {args.temperature:g}, starts from "
              f"{args.start}, cut at {args.dream_steps} steps; actions {wm.action_meanings}")

    # -------------------------------------------------------------------------
    # the agent
    grid = tuple(envs.single_observation_space.shape)
    model_args = dict(n_codes=wm.tok.n_codes, grid=grid, n_actions=wm.n_actions)
    agent = common.Agent(**model_args).to(device)
    opt = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)
    step, metrics = 0, {"curve": []}
    if args.resume:
        _, step, metrics = common.resume(out, "agent", agent, opt, model_args=model_args, world_key=world_key)
    tok, tok_args = wm.tok, common.load_checkpoint(args.world)["tokenizer_args"]  # the agent carries its eyes
    policy = common.AgentPolicy(agent, tok, wm.space, seed=args.seed)
    print(f"agent: {sum(p.numel() for p in agent.parameters()) / 1e6:.2f}M parameters on {device}; "
          f"{args.envs} x {args.rollout} {args.env} steps per update")

    def save():
        if rank:  # one writer
            return
        common.save_checkpoint(out, dict(
            kind="agent", model_args=model_args, model=agent.state_dict(), optimizer=opt.state_dict(),
            tokenizer_args=tok_args, tokenizer=tok.state_dict(), world=args.world, world_key=world_key,
            frame_space=wm.space, game=wm.game, action_meanings=wm.action_meanings, step=step, args=vars(args),
            metrics=metrics))

    def real_eval(update, gif_steps=0):
        t0 = time.perf_counter()
        returns, gif = evaluate(lambda obs, fresh: policy.act_batch(common.preprocess(obs, wm.space).to(device),
                                                                     fresh),
                                wm.game, args.eval_episodes, args.eval_max_steps, gif_steps)
        dream = state["finished"][-50:]
        row = dict(update=update, step=step, minutes=minutes(), policy="agent",
                   real_mean=float(returns.mean()), real_std=float(returns.std()),
                   dream_return=float(np.mean(dream)) if dream else float("nan"), dream_episodes=len(state["finished"]))
        metrics["curve"].append(row)
        tqdm.write(f"update {update} ({step:,} {args.env} steps): real game {returns.mean():+.2f} ± "
                   f"{returns.std():.2f} over {len(returns)} episodes (random {rand['real_mean']:+.2f} ± "
                   f"{rand['real_std']:.2f}); {args.env} {row['dream_return']:+.2f} ({time.perf_counter() - t0:.0f} s "
                   f"to play)")
        return gif

    # -------------------------------------------------------------------------
    # the random policy's real return, once, for scale
    if rank == 0 and not any(r["policy"] == "random" for r in metrics["curve"]):
        rng = np.random.default_rng(args.seed)
        returns, _ = evaluate(lambda obs, fresh: rng.integers(wm.n_actions, size=len(obs)), wm.game,
                              args.eval_episodes, args.eval_max_steps)
        metrics["curve"].append(dict(update=0, step=0, minutes=0.0, policy="random", real_mean=float(returns.mean()),
                                     real_std=float(returns.std()), dream_return=float("nan"), dream_episodes=0))
    rand = next((r for r in metrics["curve"] if r["policy"] == "random"), None)  # None on ranks other than 0
    if rand:
        print(f"random policy, real game: {rand['real_mean']:+.2f} ± {rand['real_std']:.2f} "
              f"over {args.eval_episodes} episodes")

    # -------------------------------------------------------------------------
    # loop: rollouts in the dream, PPO updates, the real game every --eval-every updates
    per_update = args.envs * args.rollout
    total_updates = -(-args.total_steps // per_update)

    def minutes():  # of wall clock since the loop began: what --minutes bounds
        return (time.time() - t_start) / 60

    def spent():
        """The share of the budget used: of the updates, or of --minutes if that ends first (the
        ranks' mean, so that every rank anneals to the same rate and stops at the same update)."""
        share = update_n / total_updates
        if args.minutes:
            clock = torch.tensor(minutes() / args.minutes, device=device)
            share = max(share, common.all_sum(clock, ranks).item() / ranks)
        return share

    if rank:  # the weights above came from one seed on every rank; from here the ranks dream and act apart
        torch.manual_seed(args.seed + rank)
    codes, _ = envs.reset(seed=args.seed + step + rank)
    codes = torch.as_tensor(codes, device=device)
    state = dict(obs=codes[:, None].repeat(1, agent.stack, 1, 1), ended=np.zeros(n_envs, bool),
                 returns=np.zeros(n_envs), finished=[])
    update_n = step // per_update
    bar = tqdm(total=None if args.minutes else total_updates * per_update, initial=step, desc=f"agent {name}",
               unit="step", smoothing=0.1)  # under --minutes the clock ends the run: its postfix counts down
    t_start, world_s, agent_s = time.time(), 0.0, 0.0
    try:
        while (done := spent()) < 1:
            for group in opt.param_groups:
                group["lr"] = args.lr * (1 - done)
            t0 = time.perf_counter()
            batch, w = rollout(envs, agent, state, args.rollout, device)
            stats = update(agent, opt, batch, ranks, args)
            world_s, agent_s = world_s + w, agent_s + time.perf_counter() - t0 - w
            update_n, step = update_n + 1, step + per_update
            bar.update(per_update)
            dream = state["finished"][-50:]
            left = {"left": f"{args.minutes - minutes():.1f}min"} if args.minutes else {}
            bar.set_postfix(ret=f"{np.mean(dream):+.2f}" if dream else "-", env=f"{world_s / (world_s + agent_s):.0%}",
                            ent=f"{stats['ent']:.2f}", **left)
            out_of_time = args.minutes and minutes() >= args.minutes  # the end evaluates anyway
            if rank == 0 and update_n % args.eval_every == 0 and update_n < total_updates and not out_of_time:
                real_eval(update_n)
                save()
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"interrupted at step {step}: checkpoint saved to {out} (continue with --resume)", file=sys.stderr)
        sys.exit(130)
    bar.close()
    if rank:
        return

    # -------------------------------------------------------------------------
    # outputs
    gif = real_eval(update_n, args.gif_steps)
    save()
    os.makedirs(args.assets, exist_ok=True)
    paths = [os.path.splitext(out)[0] + "_curve.csv", os.path.join(args.assets, f"{name}_{stem}_real.gif"),
             os.path.join(args.assets, f"{name}_{stem}_curve.png")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, CURVE)
        w.writeheader()
        w.writerows(metrics["curve"])
    imageio.mimsave(paths[1], gif, duration=1000 / 30, loop=0)
    curve_png(metrics["curve"], paths[2], wm.game, args.env)
    last = metrics["curve"][-1]
    share = world_s / max(world_s + agent_s, 1e-9)
    print(f"trained {step:,} {args.env} steps in {minutes():.1f} min ({share:.0%} stepping the "
          f"{'world model' if args.env == 'dream' else 'emulators'}); "
          f"real game {last['real_mean']:+.2f} ± {last['real_std']:.2f} vs random "
          f"{rand['real_mean']:+.2f} ± {rand['real_std']:.2f}; wrote {out}, " + ", ".join(paths))


if __name__ == "__main__":
    common.run(main)
