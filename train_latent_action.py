"""train_latent_action.py -- learn the controls from video alone (seed 001, Genie).

Stage one never reads the recorded actions. An inverse-dynamics encoder looks at 4 frames of
tokens and the next frame's tokens and names the transition with one of --latent-actions
latent actions; a forward model (train_world.py's token dynamics, conditioned on the latent
action instead of the real one) predicts the next tokens from the history and that latent
action. Their small number is the bottleneck: log2(n) bits per step can say "the paddle went
up", not what the next frame looks like. Stage two fits a map from the real action and the
last --map-frames (4) frames to the latent action the encoder gives, on labelled episodes.
Map + forward model is a world driven by real actions: common.load_world loads it like any
other (play.py, bench.py), and `play.py --latent-actions` fires them with the number keys.

Examples:
  python collect.py --game Breakout && python train_vqvae.py --data data/breakout
  python train_latent_action.py --data data/breakout          # -> checkpoints/breakout/lam.pt
  torchrun --nproc_per_node 2 train_latent_action.py --data data/breakout  # stage one on 2 processes
  python train_latent_action.py --data data/pong --latent-actions 64 --out checkpoints/pong/lam64.pt  # the leak
  python train_latent_action.py --data data/breakout --map-only --map-data data/breakout_human
  python play.py --world checkpoints/breakout/lam.pt --latent-actions
"""
import argparse
import os
import sys
import time

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# flags

p = common.flags(__doc__)
p.add_argument("--data", default="data/breakout", help="episodes whose frames train stage one (actions unread)")
p.add_argument("--tokenizer", default=None,
               help="VQ-VAE from train_vqvae.py (default: checkpoints/<data name>/vqvae.pt)")
p.add_argument("--out", default=None, help="checkpoint (default: checkpoints/<data name>/lam.pt)")
p.add_argument("--latent-actions", type=common.positive_int, default=None,
               help="how many latent actions (default: the game's number of real actions)")
p.add_argument("--context", type=common.positive_int, default=4,
               help="frames of history, for the encoder and the forward model")
p.add_argument("--enc-dim", type=common.positive_int, default=64, help="encoder: conv channels")
p.add_argument("--dim", type=common.positive_int, default=64, help="forward model: channels (as train_world.py)")
p.add_argument("--emb", type=common.positive_int, default=16, help="forward model: token embedding per history frame")
p.add_argument("--blocks", type=common.positive_int, default=3, help="forward model: residual FiLM blocks")
p.add_argument("--steps", type=common.positive_int, default=1200, help="stage one: optimizer steps")
p.add_argument("--batch", type=common.positive_int, default=16, help="stage one: windows per batch")
p.add_argument("--lr", type=common.positive_float, default=1e-3, help="AdamW learning rate (cosine decay)")
p.add_argument("--rollout", type=common.positive_int, default=3,
               help="K: steps the forward model unrolls on its own predictions")
p.add_argument("--teacher-forcing", type=common.probability, default=0.1, help="floor of the teacher-forcing schedule")
p.add_argument("--discount", type=common.positive_float, default=0.7, help="loss discount per rollout step (seed 003)")
p.add_argument("--changed-weight", type=common.nonneg_float, default=10.0,
               help="extra loss weight of tokens that change: the paddle is ~1%% of the grid and all the action is")
p.add_argument("--diversity", type=common.nonneg_float, default=0.1,
               help="weight of the batch usage-entropy bonus (wav2vec 2.0): without it every transition gets "
                    "one latent action")
p.add_argument("--map-data", default=None, help="labelled episodes for the map (default: --data)")
p.add_argument("--map-steps", type=common.nonneg_int, default=1500,
               help="stage two: optimizer steps of the map, and of the heads (0: no map, no heads)")
p.add_argument("--map-frames", type=common.nonneg_int, default=4,
               help="frames the map sees besides the action (0: the action alone)")
p.add_argument("--map-only", action="store_true",
               help="keep --out's encoder and forward model, fit the map (and the heads) again")
p.add_argument("--heads", action=argparse.BooleanOptionalAction, default=True,
               help="stage two also fits reward and game-over heads on the labelled episodes (train_world.py's, "
                    "half of each batch near a reward or an end)")
p.add_argument("--eval-every", type=common.positive_int, default=300,
               help="stage one: validation and checkpoint every N steps")
p.add_argument("--eval-windows", type=common.positive_int, default=512, help="validation transitions scored")
p.add_argument("--val-frac", type=common.probability, default=0.1,
               help="fraction of episodes held out (same split as the tokenizer)")
p.add_argument("--seed", type=int, default=0, help="random seed")
p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
p.add_argument("--resume", action="store_true", help="continue stage one from --out with its optimizer and step")
p.add_argument("--skip-bad", action="store_true", help="skip unreadable episode files instead of stopping")
p.add_argument("--assets", default="assets", help="where the latent-action PNG goes")
common.renamed(p, "--n-codes", "--latent-actions", type=common.positive_int)


# -----------------------------------------------------------------------------
# the inverse-dynamics encoder: only stage one and its evaluation use it

class ActionEncoder(nn.Module):
    """(T frames of tokens, the next frame's tokens) -> one of n_latent_actions. It is given
    token grids and nothing else: the recorded actions never reach it.

    The forward model's table of latent-action embeddings is the codebook; the encoder scores
    the latent actions and the argmax is the transition's. The forward model gets it as a
    one-hot whose gradient is the softmax's (straight-through, Bengio et al. 2013; Jang et al.
    2017). The first version was a VQ bottleneck (nearest of n vectors, seed 001): in a
    300-step probe it put every transition on one latent action for 200 steps, and they then
    carried nothing; scores with a usage-entropy bonus cannot collapse that way."""

    def __init__(self, n_codes, n_latent_actions, context=4, emb=8, dim=64):
        super().__init__()
        self.n_latent_actions = n_latent_actions
        self.tok = nn.Embedding(n_codes, emb)
        conv = lambda i, o, s: [nn.Conv2d(i, o, 3, stride=s, padding=1), nn.GroupNorm(common.groups(o), o), nn.GELU()]
        self.net = nn.Sequential(*conv((context + 1) * emb + context, dim, 1), *conv(dim, dim, 2), *conv(dim, dim, 2))
        self.head = nn.Linear(2 * dim, n_latent_actions)

    def forward(self, hist, nxt):
        """-> (straight-through one-hot (B, n), latent action (B,), softmax (B, n))"""
        x = torch.cat([hist, nxt[:, None]], 1)
        moved = (x[:, 1:] != x[:, :-1]).to(self.head.weight.dtype)  # where each step changed: motion, spelled out
        f = self.net(torch.cat([self.tok(x).permute(0, 1, 4, 2, 3).flatten(1, 2), moved], 1))
        prob = F.softmax(self.head(torch.cat([f.amax((2, 3)), f.mean((2, 3))], 1)), 1)
        idx = prob.argmax(1)
        return F.one_hot(idx, self.n_latent_actions).to(prob.dtype) + prob - prob.detach(), idx, prob


# -----------------------------------------------------------------------------
# data: token windows (common.windows), gathered on the device as in train_world.py

def pack(eps, device):
    """Episodes' tokens (and actions, rewards and ends, where loaded) on the device once, and their
    windows of `length` frames, (n, 2) long (episode, start): batches are gathered there."""
    keys = [k for k in ("tokens", "actions", "rewards", "terminated") if k in eps[0]]
    data = {k: common.pack([ep[k] for ep in eps], device) for k in keys}
    data["windows"] = lambda length: torch.tensor(common.windows([len(ep["tokens"]) for ep in eps], length),
                                                  dtype=torch.long, device=device).view(-1, 2)
    return data


def gather(data, idx, length, actions=False):
    """tokens (B, length, h, w) of the windows idx ((B, 2): episode, start), and the action taken
    at the last history frame."""
    tok = common.take(data["tokens"], idx[:, 0], idx[:, 1], length).long()
    if not actions:
        return tok
    return tok, common.take(data["actions"], idx[:, 0], idx[:, 1] + length - 2, 1)[:, 0]


@torch.no_grad()
def label(enc, data, pool, T, bs=512):
    """The encoder's latent action for every window (T frames + the next) of pool."""
    out = [enc(tok[:, :T], tok[:, T])[1] for tok in (gather(data, rows, T + 1) for rows in pool.split(bs))]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=pool.device)


@torch.no_grad()
def scores(lam, enc, val, fixed, T, device, mapped):
    """One-step token accuracy on changed tokens when the forward model gets the encoder's
    latent action (posterior), the latent actions shuffled across transitions, the map's
    (mapped), or the map's with the real action shuffled (the last two once the map is
    trained). posterior - shuffled is what the latent actions carry; posterior - mapped is
    what they carry that the real action does not (the leak)."""
    lam.eval(), enc.eval()
    tok, act = gather(val, fixed, T + 1, actions=True)
    hist, nxt = tok[:, :T], tok[:, T]
    post = enc(hist, nxt)[1]
    changed = nxt != hist[:, -1]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(post), generator=g).to(device)

    def acc(latent_action):
        right = lam.dynamics(hist, latent_action).argmax(1) == nxt
        return right[changed].float().mean().item() if changed.any() else float("nan")

    used = torch.bincount(post, minlength=enc.n_latent_actions).float() / len(post)
    m = {"acc_changed_posterior": acc(post), "acc_changed_shuffled": acc(post[perm]),
         "perplexity": torch.exp(-(used * used.clamp_min(1e-12).log()).sum()).item()}
    if mapped:
        via_map = lam.latent_action(hist, act)
        m.update(acc_changed_mapped=acc(via_map), acc_changed_action_shuffled=acc(lam.latent_action(hist, act[perm])),
                 map_accuracy=(via_map == post).float().mean().item())
    lam.train(), enc.train()
    return m


# -----------------------------------------------------------------------------
# the picture: one start frame, the next frame under each latent action

def names(table, meanings):
    """Each latent action's label: the real action most likely to get it, P(latent | real), so
    that a frequent action (NOOP in most data) does not name every latent action."""
    t = np.asarray(table, np.float64)
    p = t / np.maximum(t.sum(1, keepdims=True), 1)
    return [f"{meanings[int(p[:, c].argmax())]} {p[:, c].max():.0%}" if t[:, c].sum() else "unused"
            for c in range(t.shape[1])]


@torch.no_grad()
def picture(lam, tok, val, T, device, labels, path, tries=256):
    """Row 1: the start frame, then the next frame under each latent action; row 2: what
    changed (x3). The start is the validation window where their predictions differ the most."""
    pool = val["windows"](T)
    g = np.random.default_rng(0)
    hist = gather(val, pool[torch.from_numpy(g.choice(len(pool), min(tries, len(pool)), replace=False)).to(device)], T)
    nxt = torch.stack([lam.dynamics(hist, torch.full((len(hist),), c, device=device)).argmax(1)
                       for c in range(lam.n_latent_actions)], 1)  # (B, n, h, w)
    b = int((nxt[:, :, None] != nxt[:, None]).flatten(1).sum(1).argmax())  # where the latent actions differ most
    start = common.to_uint8(tok.decode(hist[b, -1:])).cpu()
    outs = common.to_uint8(tok.decode(nxt[b])).cpu()
    img = lambda x: common.to_image(x).repeat(3, 0).repeat(3, 1)
    diff = lambda x: np.clip(np.abs(img(x).astype(int) - img(start[0]).astype(int)) * 3, 0, 255).astype(np.uint8)
    cols = [(img(start[0]), np.zeros_like(img(start[0])), "start")]
    cols += [(img(o), diff(o), f"{c}: {labels[c]}") for c, o in enumerate(outs)]
    sep = lambda h: np.full((h, 3, 3), 255, np.uint8)
    grid = [np.concatenate([np.zeros((22, a.shape[1], 3), np.uint8), a, b_]) for a, b_, _ in cols]  # room for a label
    sheet = np.concatenate([x for c in grid for x in (sep(c.shape[0]), c)][1:], 1)
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    import pygame  # the kit's one drawing library
    pygame.font.init()
    font, surf, x = pygame.font.Font(None, 20), pygame.surfarray.make_surface(sheet.swapaxes(0, 1)), 0
    for a, _, text in cols:
        surf.blit(font.render(text, True, (255, 255, 255)), (x + 2, 2), pygame.Rect(0, 0, a.shape[1] - 4, 20))
        x += a.shape[1] + 3
    imageio.imwrite(path, pygame.surfarray.array3d(surf).swapaxes(0, 1))


# -----------------------------------------------------------------------------
# stage one: encoder + forward model from frames alone

def stage_one_loss(lam, enc, tok_w, T, K, tf, disc, args):
    """The encoder names each of the K transitions of the windows from the real frames; the
    forward model unrolls K steps on its own argmax (scheduled teacher forcing, as
    train_world.py), conditioned on those latent actions. Tokens that change weigh more; a batch
    usage-entropy bonus keeps every latent action in use."""
    B, n = len(tok_w), enc.n_latent_actions
    onehot, _, prob = enc(torch.cat([tok_w[:, k:k + T] for k in range(K)]),
                          torch.cat([tok_w[:, T + k] for k in range(K)]))
    onehot = onehot.view(K, B, n)
    usage = prob.mean(0)  # entropy of the batch's average distribution: 1 when all are used equally
    loss, hist = args.diversity * (1 + (usage * usage.clamp_min(1e-9).log()).sum() / np.log(n)), tok_w[:, :T]
    for k in range(K):
        tgt = tok_w[:, T + k]
        logits = lam.dynamics(hist, onehot[k])
        w = 1 + args.changed_weight * (tgt != tok_w[:, T + k - 1]).float()
        loss = loss + disc[k] * (w * F.cross_entropy(logits, tgt, reduction="none")).sum() / w.sum()
        keep = torch.rand(B, 1, 1, device=tok_w.device) < tf
        hist = torch.cat([hist[:, 1:], torch.where(keep, tgt, logits.detach().argmax(1))[:, None]], 1)
    return loss


# -----------------------------------------------------------------------------
# stage two: the map from the real action (+ recent frames) to the encoder's latent action

def fit_map(lam, enc, map_train, val, T, steps, g, device):
    """Fit lam.map on labelled episodes; the encoder is frozen and only labels transitions.
    -> (validation counts of real action x latent action, the accuracy of the best map that
    sees the action alone (each action -> its most frequent latent action), steps taken)"""
    enc.eval()
    n_actions, n = lam.n_actions, lam.n_latent_actions
    mpool, vpool = map_train["windows"](T + 1), val["windows"](T + 1)
    y, yv = label(enc, map_train, mpool, T), label(enc, val, vpool, T)
    act, actv = gather(map_train, mpool, T + 1, actions=True)[1], gather(val, vpool, T + 1, actions=True)[1]
    counts, table = torch.zeros(2, n_actions, n, dtype=torch.long, device=device)
    counts.index_put_((act, y), torch.ones_like(y), accumulate=True)
    table.index_put_((actv, yv), torch.ones_like(yv), accumulate=True)
    table_acc = (counts.argmax(1)[actv] == yv).float().mean().item()
    map_step = 0
    if steps > 0:
        mopt = torch.optim.AdamW(lam.map.parameters(), lr=3e-3, weight_decay=0.01)
        for map_step in tqdm(range(1, steps + 1), desc="map", unit="step", leave=False):
            j = torch.from_numpy(g.integers(len(mpool), size=256)).to(device)
            loss = F.cross_entropy(lam.map(gather(map_train, mpool[j], T), act[j]), y[j])
            mopt.zero_grad(set_to_none=True)
            loss.backward()
            mopt.step()
    return table.tolist(), table_acc, map_step


def fit_heads(heads, data, transitions, events, steps, g):
    """train_world.py's reward and end heads (they read tokens, never latent actions), fitted on
    the labelled episodes, the only ones whose rewards are read."""
    hopt = torch.optim.AdamW(heads.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in tqdm(range(steps), desc="heads", unit="step", leave=False):
        loss = common.outcome_loss(heads, data, transitions, events, g, 64, 0.5)
        hopt.zero_grad(set_to_none=True)
        loss.backward()
        hopt.step()
    return heads.eval()


def load_data(args, tok_path, tok, tck, prev, device):
    """(train, map_train, val): tokens of --data's training episodes without their actions (stage
    one), and tokens with actions, rewards and ends of --map-data's training and validation
    episodes (with --heads, the validation frames too: the heads are scored in the dream)."""
    caches, meanings = {}, list(tck["action_meanings"])  # --map-data is usually --data: one token cache read

    def load(folder, actions, space=None):
        if folder not in caches:
            caches[folder] = common.token_cache(folder, tok_path, tok, tck["frame_space"], device, tck["game"],
                                                args.skip_bad)
        return common.coded_episodes(folder, caches[folder], "tokens", space, args.val_frac, args.seed, actions)

    train, _ = load(args.data, actions=False)
    map_data = args.map_data or args.data
    for f in common.episode_files(map_data)[:1]:  # one game per folder (token_cache checks the game)
        have = [str(m) for m in common.load_episode(f, ["action_meanings"])["action_meanings"]]
        if have != meanings or (prev is not None and have != list(prev["action_meanings"])):
            raise common.KitError(f"{map_data} has actions {have}, the model's game has {meanings}")
    map_train, val = load(map_data, actions=True, space=tck["frame_space"] if args.heads else None)
    return train, map_train, val


def report(table, meanings, metrics):
    """The validation table of real action x latent action, then the scores."""
    print("validation transitions, real action x latent action (the encoder's):")
    w = max(len(m) for m in meanings)
    print(" " * w + "".join(f"{c:>7}" for c in range(len(table[0]))))
    for a, row in enumerate(table):
        print(f"{meanings[a]:>{w}}" + "".join(f"{v:>7}" for v in row))
    print("  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


# -----------------------------------------------------------------------------

def main():
    args = p.parse_args()
    common.seed_everything(args.seed)
    rank, ranks, device = common.distributed(args.device)  # torchrun: one process per rank
    rank_batch = common.per_rank(args.batch, ranks)
    name = os.path.basename(os.path.normpath(args.data))
    out = args.out or os.path.join("checkpoints", name, "lam.pt")
    prev = common.load_checkpoint(out, ("world",)) if (args.map_only or args.resume) else None
    if prev is not None and prev["model_args"].get("arch") != "lam":
        raise common.KitError(f"{out} is not a latent-action model (it is a '{prev['model_args'].get('arch')}' world)")
    tok_path = args.tokenizer or (prev or {}).get("tokenizer_path") or os.path.join("checkpoints", name, "vqvae.pt")
    if not os.path.exists(tok_path) and not args.tokenizer:
        raise common.KitError(f"no tokenizer at {tok_path}: train one with python train_vqvae.py --data {args.data}")
    tok, tck = common.load_tokenizer(tok_path)
    tok_key = common.file_key(tok_path)
    if prev is not None and prev["tokenizer_key"] != tok_key:
        raise common.KitError(f"{out} was trained over another tokenizer than {tok_path}")
    meanings, game, space = tck["action_meanings"], tck["game"], tck["frame_space"]
    n = prev["model_args"]["n_latent_actions"] if prev is not None else args.latent_actions or len(meanings)
    if n < 2:
        raise common.KitError(f"--latent-actions {n}: at least 2 latent actions are needed (one carries no action)")
    T, K = (prev["model_args"]["context"] if prev is not None else args.context), args.rollout
    if args.map_frames > T:
        raise common.KitError(f"--map-frames {args.map_frames}: the map sees 0 to {T} (the context) frames")

    # -------------------------------------------------------------------------
    # data: stage one reads token grids only; actions are loaded for the map and the eval
    train, map_train, val = common.rank_zero_first(rank, lambda: load_data(args, tok_path, tok, tck, prev, device))
    pool = common.windows([len(ep["tokens"]) for ep in train], T + K)
    vpool = common.windows([len(ep["tokens"]) for ep in val], T + 1)
    if not len(pool) or not len(vpool):
        raise common.KitError(f"episodes are shorter than context + rollout ({T + K} frames): record longer ones")
    g = np.random.default_rng(args.seed + rank)  # each rank its own draws
    pick = np.random.default_rng(1234).choice(len(vpool), min(args.eval_windows, len(vpool)), replace=False)
    fixed = vpool[np.sort(pick)]  # frozen validation transitions (seed 003's gold eval)
    grid = tuple(train[0]["tokens"].shape[1:])
    print(f"data: {sum(len(e['tokens']) - 1 for e in train)} transitions of {args.data} (frames only), "
          f"{len(map_train)} labelled episodes for the map, {len(val)} validation episodes; token grid {grid}")
    outcomes = [torch.from_numpy(rows).to(device) for rows in common.outcome_transitions(map_train)[:2]]
    val_eps, (train, map_train, val) = val, (pack(eps, device) for eps in (train, map_train, val))  # on the device once
    pool, fixed = train["windows"](T + K), torch.tensor(fixed, dtype=torch.long, device=device)

    # -------------------------------------------------------------------------
    # model
    model_args = dict(arch="lam", n_codes=tok.n_codes, n_actions=len(meanings), n_latent_actions=n, grid=grid,
                      context=T, emb=args.emb, dim=args.dim, n_blocks=args.blocks, map_frames=args.map_frames)
    enc_args = dict(n_codes=tok.n_codes, n_latent_actions=n, context=T, dim=args.enc_dim)
    heads_args = dict(n_codes=tok.n_codes, grid=grid)
    if prev is not None:
        model_args = dict(prev["model_args"], map_frames=args.map_frames) if args.map_only else prev["model_args"]
        enc_args = prev["encoder_args"]
    lam = common.make_dynamics(**model_args).to(device)
    enc = ActionEncoder(**enc_args).to(device)
    tok = tok.to(device)
    params = list(lam.dynamics.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    step, map_step, metrics, table, heads = 0, 0, {}, [], None  # heads: fitted in stage two
    if prev is not None:
        lam.dynamics.load_state_dict({k[9:]: v for k, v in prev["model"].items() if k.startswith("dynamics.")})
        enc.load_state_dict(prev["encoder"])
        step, metrics = prev["step"], prev.get("metrics", {})
        if args.resume and not args.map_only:
            opt.load_state_dict(prev["optimizer"])
            print(f"resumed {out} at step {step}")
    n_dyn, n_enc = sum(p.numel() for p in lam.dynamics.parameters()), sum(p.numel() for p in enc.parameters())
    print(f"model: {n} latent actions; encoder {n_enc / 1e6:.2f}M, forward model {n_dyn / 1e6:.2f}M on {device}")

    watch = common.LossWatch()

    def save():
        watch.check(out)  # a NaN is never saved over the last good checkpoint
        if rank:  # one writer
            return
        common.save_checkpoint(out, dict(
            kind="world", model_args=model_args, model=lam.state_dict(), optimizer=opt.state_dict(),
            encoder_args=enc_args, encoder=enc.state_dict(), tokenizer_args=tck["model_args"],
            tokenizer=tok.state_dict(), tokenizer_path=tok_path, tokenizer_key=tok_key, frame_space=space,
            game=game, action_meanings=meanings, step=step, map_step=map_step, args=vars(args),
            metrics=metrics, table=table, **({"heads_args": heads_args, "heads": heads.state_dict()} if heads else {})))

    # -------------------------------------------------------------------------
    # stage one: encoder + forward model from frames alone
    disc = torch.tensor([args.discount ** k for k in range(K)])
    disc = disc / disc.sum()  # normalized discounted loss (seed 003)
    bar = tqdm(total=args.steps, initial=min(step, args.steps), desc="latent actions", unit="step",
               disable=args.map_only or step >= args.steps)
    t0 = time.time()
    try:
        while step < args.steps and not args.map_only:
            frac = step / args.steps
            lr = float(args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr
            tf = max(args.teacher_forcing, 1 - frac / 0.3)  # from 1 to its floor over the first 30%
            tok_w = gather(train, pool[torch.from_numpy(g.integers(len(pool), size=rank_batch)).to(device)], T + K)
            loss = stage_one_loss(lam, enc, tok_w, T, K, tf, disc, args)
            read = watch(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            common.average_gradients(params, ranks)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if read:  # the loss leaves the device every few steps, not every step
                watch.check(out)
                bar.set_postfix(loss=f"{loss.item():.4f}", tf=f"{tf:.2f}")
            if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
                metrics = scores(lam, enc, val, fixed, T, device, mapped=False)
                tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                save()
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"interrupted at step {step}: checkpoint saved to {out} (continue with --resume)", file=sys.stderr)
        sys.exit(130)
    bar.close()
    if rank:  # the map is small: rank 0 fits it alone
        return

    # -------------------------------------------------------------------------
    # stage two: the map, then the scores with it, and the report
    t1 = time.time()
    table, table_acc, map_step = fit_map(lam, enc, map_train, val, T, args.map_steps, g, device)
    metrics = dict(scores(lam, enc, val, fixed, T, device, mapped=map_step > 0), table_accuracy=table_acc)
    if args.heads and map_step:  # the world the checkpoint loads as, with heads: reward and end scored in its dream
        heads = fit_heads(common.Outcome(**heads_args).to(device), map_train, *outcomes, map_step, g)
        wm = common.LatentActionWorld(tok, lam, space, game, meanings, device)
        wm.heads = heads
        metrics.update(common.outcome_scores(wm, val_eps))
    save()
    os.makedirs(args.assets, exist_ok=True)
    png = os.path.join(args.assets, f"{name}_latent_actions.png")
    picture(lam, tok, val, T, device, names(table, meanings), png)
    report(table, meanings, metrics)
    print(f"stage one {step} steps in {(t1 - t0) / 60:.1f} min, map {map_step} steps in {(time.time() - t1) / 60:.1f} "
          f"min; wrote {out} and {png}")


if __name__ == "__main__":
    common.run(main)
