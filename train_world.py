"""train_world.py -- the token dynamics: the next frame's tokens from 4 frames of tokens and the action.

Seed-003 training over a VQ-VAE's tokens (train_vqvae.py): K-step rollouts on the model's own
argmax with scheduled teacher forcing, hybrid importance weighting of the tokens that move,
normalized discounted loss; a conv net over the token grid (or, for the measured comparison,
attention over it). Evaluates on frozen validation windows (token accuracy, overall and on the
tokens that change; rollout accuracy; action sensitivity; and, through the world-model
contract, decoded PSNR at 1/5/10/30 steps next to copy-last-frame and the Pong paddle and
ball) and writes a real | dream | difference GIF to assets/.

Examples:
  python train_world.py                                   # data/pong + checkpoints/pong/vqvae.pt
  python train_world.py --steps 4000 --dim 128            # longer, wider
  python train_world.py --resume --steps 6000             # continue with optimizer and step
  python train_world.py --steps 5800 --corrupt 0.1 --hard-share 0.5 --attend --sides   # max-pooled tokens: README
  python train_world.py --arch attn --dim 128 --blocks 4  # the attention layout of the README
  torchrun --nproc_per_node 2 train_world.py              # 2 processes, same global --batch
  python train_world.py --data data/pong data/breakout data/spaceinvaders   # one model of 3 games (seed 004)
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# flags

p = common.flags(__doc__)
p.add_argument("--data", default=["data/pong"], nargs="+",
               help="folder of episodes from collect.py; several folders (one game each): one model of them all, "
                    "the game an input, the actions ALE's 18")
p.add_argument("--tokenizer", default=None,
               help="VQ-VAE from train_vqvae.py (default: checkpoints/<data name>/vqvae.pt; several: joined by +)")
p.add_argument("--out", default=None, help="world checkpoint (default: checkpoints/<data name>/world.pt)")
p.add_argument("--context", type=common.positive_int, default=4, help="frames of history")
p.add_argument("--arch", default="conv", choices=["conv", "attn"], help="conv on the token grid, or attention over it")
p.add_argument("--dim", type=common.positive_int, default=32, help="channels of the net")
p.add_argument("--emb", type=common.positive_int, default=32,
               help="token embedding size per history frame (16 left the paddle 6-10 px off at 10 steps: README)")
p.add_argument("--blocks", type=common.positive_int, default=3, help="residual FiLM blocks (2 convs each)")
p.add_argument("--game-actions", action=argparse.BooleanOptionalAction, default=True,
               help="several games: each game its own meaning of ALE's 18 actions (--no-game-actions: one for all)")
p.add_argument("--attend", action=argparse.BooleanOptionalAction, default=False,
               help="conv: each block's global context is attention-pooled, not the mean")
p.add_argument("--sides", action=argparse.BooleanOptionalAction, default=False,
               help="conv: each row also sees the attention-pooled rows above it and below it")
p.add_argument("--memory", type=common.nonneg_int, default=32,
               help="conv: also see the steps since each cell last changed, up to N (0: no memory beyond the context)")
p.add_argument("--actions", type=common.positive_int, default=2,
               help="conv: the last N actions the dynamics see (Pong's paddle answers a key over two steps)")
p.add_argument("--masked", action=argparse.BooleanOptionalAction, default=True,
               help="conv: also see the next frame as far as it is decided, so that sampling can decide uncertain "
                    "cells one after another (MaskGIT)")
p.add_argument("--heads", action=argparse.BooleanOptionalAction, default=True,
               help="also learn each transition's reward (its sign) and whether it ends the episode: "
                    "world.reward, world.terminated, DreamEnv")
p.add_argument("--event-share", type=common.probability, default=0.5,
               help="share of the heads' batch drawn from the transitions within 2 steps of a reward or an end "
                    "(Pong pays a point every ~70 steps: uniform batches would hardly ever show one)")
p.add_argument("--fresh-starts", type=common.probability, default=0.25,
               help="share of training windows that start as a dream from real frames does: no memory, "
                    "no earlier action")
p.add_argument("--corrupt", type=common.probability, default=0.0,
               help="most share of cells that go wrong in a training window's history and stay wrong (they turn "
                    "into the background): the model learns to repair what its own dream feeds it "
                    "(GameNGen's context noise)")
p.add_argument("--dash", type=common.probability, default=0.0,
               help="share of training windows whose newest history frame (and in half as many, the one before) "
                    "draws the cells its moving objects entered twice, one cell apart, as a dream draws a dashed or "
                    "doubled ball: the model learns to go on with the one ball the older frames tell")
p.add_argument("--hard-share", type=common.probability, default=0.0,
               help="share of each batch drawn in proportion to each window's loss when last trained on (the rare "
                    "moments, such as a ball meeting a paddle, come back more often)")
p.add_argument("--steps", type=common.positive_int, default=2900, help="optimizer steps")
p.add_argument("--batch", type=common.positive_int, default=16, help="windows per batch")
p.add_argument("--lr", type=common.positive_float, default=3e-3,
               help="AdamW learning rate, cosine decay (the small net underfits at 1e-3: README, what was tried)")
p.add_argument("--rollout", type=common.positive_int, default=2,
               help="K: steps unrolled on the model's own predictions (seed 003: 5)")
p.add_argument("--teacher-forcing", type=common.probability, default=0.1,
               help="final probability of feeding the true tokens (seed 003)")
p.add_argument("--discount", type=common.positive_float, default=0.7, help="loss discount per rollout step (seed 003)")
p.add_argument("--motion-scale", type=common.nonneg_float, default=2.0, help="importance: embedding-distance motion")
p.add_argument("--eventness-scale", type=common.nonneg_float, default=2.0,
               help="importance: motion beyond the recent motion (seed 003)")
p.add_argument("--persistence-scale", type=common.nonneg_float, default=1.0,
               help="importance: motion across the history (seed 003)")
p.add_argument("--max-ratio", type=common.positive_float, default=6.0, help="cap of a token's weight over the median")
p.add_argument("--eval-every", type=common.positive_int, default=800, help="evaluate and checkpoint every N steps")
p.add_argument("--eval-windows", type=common.positive_int, default=48, help="frozen validation windows (each 30 steps)")
p.add_argument("--gif-steps", type=common.positive_int, default=48, help="length of the real | dream | difference GIF")
p.add_argument("--val-frac", type=common.probability, default=0.1,
               help="fraction of episodes held out (same split as the tokenizer)")
p.add_argument("--seed", type=int, default=0, help="random seed")
p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
p.add_argument("--compile", action="store_true", help="torch.compile the dynamics net for training")
p.add_argument("--resume", action="store_true", help="continue from --out with its optimizer and step")
p.add_argument("--skip-bad", action="store_true", help="skip unreadable episode files instead of stopping")
p.add_argument("--assets", default="assets", help="where the dream GIF goes")


# -----------------------------------------------------------------------------
# data: windows of tokens, and the actions between them

def pack(eps, device, to_full=None):
    """Every episode's tokens, actions, rewards and ends on the device once (common.pack): a
    batch is then gathered there, without a copy from the host each step. Several games: each
    episode's game, and `to_full` (games, most actions), each game's actions among ALE's 18."""
    keys = [k for k in ("tokens", "actions", "rewards", "terminated") if k in eps[0]]
    data = {k: common.pack([ep[k] for ep in eps], device) for k in keys}
    if to_full is not None:
        data["game"], data["to_full"] = torch.tensor([ep["game"] for ep in eps], device=device), to_full.to(device)
    return data


def batch(data, idx, T, K, past=0, unknown=0, memory=0):
    """history (B, T, h, w), actions (B, past + K): the `past` before the first step (`unknown`
    before the episode starts) and the K of the steps, targets (B, K, h, w) of the windows idx
    ((B, 2) long: episode, start), the memory at the last history frame (B, h, w) (None without
    `memory`), and the game (B,), or None. The episodes keep their game's own actions; a model
    of several games sees them among ALE's 18."""
    ep, s = idx[:, 0], idx[:, 1]
    tok = common.take(data["tokens"], ep, s, T + K).long()
    act = common.take(data["actions"], ep, s + T - 1 - past, past + K, fill=unknown)
    age = None
    if memory:  # the ages at the last history frame, from the memory + 2 frames up to it: a cell still
        # through all of them is "longer ago" either way; before the episode, a token no frame has (a reset)
        age = common.ages(common.take(data["tokens"], ep, s + T - memory - 2, memory + 2, fill=-1).long(),
                          memory, unknown=True)[:, -1]
    game = data["game"][ep] if "game" in data else None
    if game is not None:
        table = data["to_full"]
        act = torch.where(act == unknown, unknown, table[game[:, None], act.clamp(max=table.shape[1] - 1)])
    return tok[:, :T], act, tok[:, T:], age, game


# -----------------------------------------------------------------------------
# the loss: K steps on the model's own argmax, importance-weighted, from a past that may be damaged

def importance(hist, target, emb, a):
    """Seed 003's hybrid weighting: 1 + motion + eventness + persistence, capped."""
    d = lambda x, y: (emb[x] - emb[y]).norm(dim=-1)
    motion = d(target, hist[:, -1])
    persistence = torch.stack([d(hist[:, t], hist[:, t - 1]) for t in range(1, hist.shape[1])]).mean(0)
    event = (motion - persistence).clamp_min(0)
    w = 1 + a.motion_scale * motion + a.eventness_scale * event + a.persistence_scale * persistence
    return w.clamp(max=a.max_ratio * w.median())  # a tensor bound: no sync with the device


def field(hist):
    """Each window's background, (B, 1, 1): the newest frame's most common token."""
    return hist[:, -1].flatten(1).mode(1).values[:, None, None]


def corrupt(hist, age, most):
    """GameNGen's noise on the context (Valevski et al. 2024), in tokens: in each window a share
    q ~ U(0, most) of the cells go wrong at a random frame of the history and stay wrong, turning
    into the background (the newest frame's most common token), so objects lose cells, as a
    dream's own errors do. The ages say when they changed; the targets stay true, so the model
    learns to repair what its dream feeds it. Nothing is planted: a token copied into an empty
    cell (an earlier version) taught the model that a ball appearing from nowhere may be noise,
    and so to doubt its own serves (README: the serve the model doubts)."""
    B, T, h, w = hist.shape
    q = torch.rand(B, 1, 1, device=hist.device) * most
    other = field(hist).expand(B, h, w)
    hit = (torch.rand(B, h, w, device=hist.device) < q) & (other != hist[:, -1])
    since = torch.randint(T, (B, h, w), device=hist.device)  # the first wrong frame
    wrong = hit[:, None] & (torch.arange(T, device=hist.device)[:, None, None] >= since[:, None])
    age = None if age is None else torch.where(hit, T - 1 - since, age)
    return torch.where(wrong, other[:, None], hist), age


def dash(hist, age, share):
    """A dream's odd ball in the history: in a share of the windows the newest frame (in half as
    many, the frame before) draws the cells its moving objects entered again, one cell beside them
    (one direction of the 8 per window) where the field is empty: a dashed or doubled ball, as the
    frames before a blink show (EXPERIMENTS.md). Their ages restart; the targets stay true, so
    the model learns to go on with the ball the older frames tell of, not to end it."""
    B, T, h, w = hist.shape
    other = field(hist)
    hist = hist.clone()
    moves = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for t, p in [(t, p) for t, p in ((T - 1, share), (T - 2, share / 2)) if t >= 1]:  # a frame and the one before it
        hit = torch.rand(B, 1, 1, device=hist.device) < p
        pick = torch.randint(len(moves), (B, 1, 1), device=hist.device)
        entered = (hist[:, t] != hist[:, t - 1]) & (hist[:, t] != other)
        drawn = F.pad(torch.where(entered, hist[:, t], -1), (1, 1, 1, 1), value=-1)
        for k, (dy, dx) in enumerate(moves):
            beside = drawn[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]  # moved by (dy, dx); nothing wraps round
            put = hit & (pick == k) & (beside >= 0) & (hist[:, t] == other)
            hist[:, t] = torch.where(put, beside, hist[:, t])
            age = None if age is None else torch.where(put, 0, age)
    return hist, age


def token_loss(dyn, hist, act, tgt, age, game, tf, emb, disc, args):
    """Seed 003: K steps on the model's own argmax with scheduled teacher forcing; importance-
    weighted cross-entropy, discounted over the steps. The memory follows the tokens fed back.
    -> (the loss, each window's share of it before normalizing, detached: what --hard-share draws by)"""
    loss, surprise, B, n = 0.0, 0.0, len(hist), args.actions
    for k in range(len(disc)):
        w = importance(hist, tgt[:, k], emb, args)
        partial, hide = None, torch.ones_like(w, dtype=torch.bool)
        if args.masked and k == 0:  # MaskGIT: half the first steps see a random share of the next frame
            r = torch.rand(2, B, 1, 1, device=hist.device)
            hide = torch.rand(w.shape, device=hist.device) < torch.where(r[0] < 0.5, 1.0, r[1])
            partial = torch.where(hide, dyn.n_codes, tgt[:, 0])
        logits = dyn(hist, act[:, k:k + n], age, partial, game)
        ce = F.cross_entropy(logits, tgt[:, k], reduction="none")
        loss = loss + disc[k] * (w * hide * ce).sum() / (w * hide).sum()  # the shown cells are no question
        surprise = surprise + disc[k] * (w * hide * ce).detach().sum((1, 2))
        keep = (torch.rand(B, 1, 1, device=hist.device) < tf) | ~hide
        nxt = torch.where(keep, tgt[:, k], logits.detach().argmax(1))
        age = common.next_age(age, hist[:, -1], nxt, args.memory) if args.memory else None
        hist = torch.cat([hist[:, 1:], nxt[:, None]], 1)
    return loss, surprise


# -----------------------------------------------------------------------------
# eval on frozen windows

@torch.no_grad()
def evaluate(wm, val, fixed, to_full=None):
    """Token accuracy at one step (all tokens, and the tokens that change), rollout accuracy at
    5 and 10 steps, action sensitivity (tokens whose prediction changes when only the action
    does, averaged over the pairs of the game's actions); then common.open_loop through the
    world: decoded PSNR next to copy-last-frame, and the Pong objects. One game's episodes."""
    dyn, T, H, n = wm.dyn.eval(), wm.context, max(common.HORIZONS), getattr(wm.dyn, "actions", 1)
    data, idx = pack(val, wm.device, to_full), torch.tensor(fixed, device=wm.device)
    hist, act, tgt, age, game = batch(data, idx, T, H, n - 1, dyn.n_actions, dyn.memory)
    pred = dyn(hist, act[:, :n], age, None, game).argmax(1)
    changed = tgt[:, 0] != hist[:, -1]
    m = {"acc": (pred == tgt[:, 0]).float().mean().item(),
         "acc_changed": (pred == tgt[:, 0])[changed].float().mean().item() if changed.any() else float("nan")}
    actions = range(dyn.n_actions) if wm.to_full is None else wm.to_full.tolist()
    per_action = [dyn(hist, torch.cat([act[:, :n - 1], torch.full_like(act[:, :1], a)], 1), age, None, game).argmax(1)
                  for a in actions]
    diff = [(per_action[i] != per_action[j]).flatten(1).sum(1).float().mean()
            for i in range(len(actions)) for j in range(i + 1, len(actions))]
    m["action_sensitivity"] = torch.stack(diff).mean().item() if diff else 0.0
    h = hist
    for k in range(10):
        nxt = dyn(h, act[:, k:k + n], age, None, game).argmax(1)
        age = common.next_age(age, h[:, -1], nxt, dyn.memory) if dyn.memory else None
        h = torch.cat([h[:, 1:], nxt[:, None]], 1)
        if k + 1 in (5, 10):
            m[f"rollout_acc@{k + 1}"] = (h[:, -1] == tgt[:, k]).float().mean().item()
    frames = torch.stack([val[i]["frames"][s:s + T + H] for i, s in fixed])
    m.update(common.open_loop(wm, frames, common.take(data["actions"], idx[:, 0], idx[:, 1] + T - 1, H)))
    if wm.heads is not None:
        wm.heads.eval()
        m.update(common.outcome_scores(wm, val))
        wm.heads.train()
    dyn.train()
    return m


# -----------------------------------------------------------------------------

def load_games(args, tok_path, tok, tck, rank, device):
    """Each --data folder's episodes as tokens, split as the tokenizer split them -> (train, vals,
    games): the training episodes of every game, each game's validation episodes, and {game id:
    its actions}, in the order of the model's game input (an episode's "game")."""
    trained, train, vals, games = common.trained_games(tck), [], {}, {}
    scans = common.scan_datasets(args.data, args.val_frac, args.seed, args.skip_bad)  # one line for a bad file
    for folder, (_, _, meta) in zip(args.data, scans):
        game, meanings = meta["game"], meta["action_meanings"]
        if game not in trained:
            raise common.KitError(f"tokenizer {tok_path} was trained on {', '.join(g[4:-3] for g in trained)}; "
                                  f"{folder} is {game[4:-3]}")
        games[game] = meanings
        tokens = common.rank_zero_first(rank, lambda: common.token_cache(
            folder, tok_path, tok, tck["frame_space"], device, list(trained), args.skip_bad))
        t, v = common.coded_episodes(folder, tokens, "tokens", tck["frame_space"], args.val_frac, args.seed)
        for ep in t + v:
            ep["game"] = len(games) - 1
        train, vals[game] = train + t, v
    return train, vals, games


def main():
    args = p.parse_args()
    common.seed_everything(args.seed)
    rank, ranks, device = common.distributed(args.device)  # torchrun: one process per rank
    rank_batch = common.per_rank(args.batch, ranks)
    name = "+".join(os.path.basename(os.path.normpath(d)) for d in args.data)
    tok_path = args.tokenizer or os.path.join("checkpoints", name, "vqvae.pt")
    out = args.out or os.path.join("checkpoints", name, "world.pt")
    T, K, H = args.context, args.rollout, max(common.HORIZONS)

    # -------------------------------------------------------------------------
    # data: cached tokens for every episode, frames only for validation
    tok, tck = common.load_tokenizer(tok_path)
    tok_key, space = common.file_key(tok_path), tck["frame_space"]
    train, vals, games = load_games(args, tok_path, tok, tck, rank, device)
    joint, first = len(games) > 1, next(iter(games))
    if joint and args.arch != "conv":
        raise common.KitError("--arch attn models one game: several --data folders want --arch conv")
    # several games share ALE's 18 actions (seed 004); each game's own actions are a row of to_full
    meanings = list(common.FULL_ACTIONS) if joint else games[first]
    most = max(len(m) for m in games.values())
    to_full = torch.tensor([common.full_actions(m) + [0] * (most - len(m)) for m in games.values()]) if joint else None
    if args.arch != "conv":  # the attention layout is kept as it was measured: one action, no memory
        args.memory, args.masked, args.actions, args.attend, args.sides = 0, False, 1, False, False
    pool = common.windows([len(ep["tokens"]) for ep in train], T + K)
    if not len(pool):
        raise common.KitError(f"episodes in {' '.join(args.data)} are shorter than context + rollout ({T + K} frames)")
    rng, fixed = np.random.default_rng(1234), {}  # frozen eval indices (seed 003's gold eval)
    for game, val in vals.items():
        vpool = common.windows([len(ep["tokens"]) for ep in val], T + H)
        if not len(vpool):
            raise common.KitError(f"{game[4:-3]}'s validation episodes are shorter than {T + H} frames")
        fixed[game] = vpool[np.sort(rng.choice(len(vpool), min(args.eval_windows, len(vpool)), replace=False))]
    grid = tuple(train[0]["tokens"].shape[1:])
    transitions, events, paid = common.outcome_transitions(train)
    print(f"data: {sum(len(e['actions']) for e in train)} train transitions ({len(train)} episodes, "
          f"{paid} with a reward or an end), {sum(map(len, vals.values()))} val episodes, "
          f"{sum(map(len, fixed.values()))} frozen eval windows; token grid {grid}; {', '.join(games)}")
    data = pack(train, device, to_full)  # on the device once: batches are gathered there
    del train  # the packed copy is the only one kept
    common.release_heap()
    pool, transitions, events = (torch.from_numpy(rows).to(device) for rows in (pool, transitions, events))

    # -------------------------------------------------------------------------
    # model
    model_args = dict(arch=args.arch, n_codes=tok.n_codes, n_actions=len(meanings), grid=grid, context=T,
                      emb=args.emb, dim=args.dim, n_blocks=args.blocks)
    if args.memory:
        model_args["memory"] = args.memory
    if args.masked:
        model_args["masked"] = True
    if args.actions > 1:
        model_args["actions"] = args.actions
    if args.attend:
        model_args["attend"] = True
    if args.sides:
        model_args["sides"] = True
    if joint:
        model_args["games"] = len(games)
        if args.game_actions:
            model_args["game_actions"] = True

    dyn = common.make_dynamics(**model_args).to(device)
    heads_args = dict(n_codes=tok.n_codes, grid=grid) if args.heads else None
    with torch.random.fork_rng(devices=[]):  # the heads draw from their own streams: the dynamics train
        torch.manual_seed(args.seed + 1)  # exactly as they would without them
        heads = common.Outcome(**heads_args).to(device) if args.heads else None
    tok = tok.to(device).requires_grad_(False)
    opt = torch.optim.AdamW(list(dyn.parameters()) + list(heads.parameters() if heads else []), lr=args.lr,
                            weight_decay=0.01)
    step, metrics = 0, {}
    if args.resume:
        ck, step, metrics = common.resume(out, "world", dyn, opt, model_args=model_args, tokenizer_key=tok_key,
                                          heads_args=heads_args)
        if heads:
            heads.load_state_dict(ck["heads"])
    fwd = common.compiled(dyn, device) if args.compile else dyn
    worlds = {game: common.TokenWorld(tok, dyn, space, game, actions, device, games=list(games))
              for game, actions in games.items()}  # one per game, sharing the model: evaluation and the GIFs
    for wm in worlds.values():
        wm.heads = heads
    emb = tok.quantizer.embed / tok.quantizer.embed.norm(dim=1).max()
    print(f"model: {args.arch}, {sum(p.numel() for p in dyn.parameters()) / 1e6:.2f}M parameters on {device}")

    watch = common.LossWatch()

    def save():
        watch.check(out)  # a NaN is never saved over the last good checkpoint
        if rank:  # one writer
            return
        common.save_checkpoint(out, dict(
            kind="world", model_args=model_args, model=dyn.state_dict(), optimizer=opt.state_dict(),
            tokenizer_args=tck["model_args"], tokenizer=tok.state_dict(), tokenizer_path=tok_path,
            tokenizer_key=tok_key, frame_space=space, game=first, action_meanings=meanings,
            step=step, args=vars(args), metrics=metrics, **({"games": games} if joint else {}),
            **({"heads_args": heads_args, "heads": heads.state_dict()} if heads else {})))

    # -------------------------------------------------------------------------
    # loop: K-step rollouts on the model's own predictions, with scheduled teacher forcing
    g, g_heads = np.random.default_rng(args.seed + 2 * rank), np.random.default_rng(args.seed + 1 + 2 * rank)
    disc = torch.tensor([args.discount ** k for k in range(K)])
    disc = disc / disc.sum()  # normalized discounted loss (seed 003)
    surprise = torch.zeros(len(pool), device=device)  # each window's loss when last trained on
    bar = tqdm(total=args.steps, initial=step, desc="world", unit="step")
    t0 = time.time()
    try:
        while step < args.steps:
            frac = step / args.steps
            lr = float(args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr
            tf = max(args.teacher_forcing, 1 - frac / 0.3)  # from 1 to its floor over the first 30%
            hard = round(rank_batch * args.hard_share)
            rows = torch.from_numpy(g.integers(len(pool), size=rank_batch - hard)).to(device)
            if hard:  # windows not trained on yet have no loss: the uniform share finds them
                rows = torch.cat([rows, torch.multinomial(surprise + 1e-12, hard, replacement=True)])
            idx = pool[rows]
            hist, act, tgt, age, game = batch(data, idx, T, K, args.actions - 1, len(meanings), args.memory)
            # some windows remember only themselves, as a dream started from real frames does
            fresh = torch.rand(len(hist), 1, 1, device=device) < args.fresh_starts
            if args.memory:
                age = torch.where(fresh, common.ages(hist, args.memory, unknown=True)[:, -1], age)
            act[:, :args.actions - 1] = torch.where(fresh[:, :, 0], len(meanings), act[:, :args.actions - 1])
            if args.corrupt:
                hist, age = corrupt(hist, age, args.corrupt)
            if args.dash:
                hist, age = dash(hist, age, args.dash)
            loss, surprise[rows] = token_loss(fwd, hist, act, tgt, age, game, tf, emb, disc, args)
            if heads:
                loss = loss + common.outcome_loss(heads, data, transitions, events, g_heads, 2 * rank_batch,
                                                   args.event_share)
            read = watch(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            common.average_gradients(opt.param_groups[0]["params"], ranks)
            torch.nn.utils.clip_grad_norm_(dyn.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if read:  # the loss leaves the device every few steps, not every step
                watch.check(out)
                bar.set_postfix(loss=f"{loss.item():.4f}", tf=f"{tf:.2f}")
            if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
                per_game = {game: evaluate(worlds[game], vals[game], fixed[game], to_full) for game in games}
                for game, m in per_game.items():
                    tqdm.write(f"step {step}: {game[4:-3] + ': ' if joint else ''}"
                               + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
                metrics = per_game if joint else per_game[first]
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
    os.makedirs(args.assets, exist_ok=True)
    gifs = []
    for game, val in vals.items():
        gif = f"{name}_{game[4:-3].lower()}_dream.gif" if joint else f"{name}_dream.gif"
        gifs.append(os.path.join(args.assets, gif))
        i, s = common.busiest([ep["frames"] for ep in val], T + args.gif_steps)
        n = min(args.gif_steps, len(val[i]["actions"]) - s - T + 1)
        common.dream_gif(worlds[game], val[i]["frames"][s:s + T + n], val[i]["actions"][s + T - 1:s + T - 1 + n],
                         gifs[-1])
    print(f"trained {step} steps in {(time.time() - t0) / 60:.1f} min; wrote {out} and {', '.join(gifs)}")
    for game, m in (metrics.items() if joint else [(first, metrics)]):
        print(f"{game[4:-3]} PSNR dream vs copy-last-frame: " + "  ".join(
            f"@{h} {m[f'psnr@{h}']:.2f}/{m[f'copy_psnr@{h}']:.2f}" for h in common.HORIZONS))


if __name__ == "__main__":
    common.run(main)
