"""train_world.py -- the dynamics model: next-frame tokens from 4 frames of history and the action.

Seed-003 training (K-step rollouts on the model's own predictions with scheduled teacher
forcing, hybrid importance weighting of tokens that move, normalized discounted loss) on
a conv net over the token grid. Evaluates on frozen validation windows (token accuracy,
on changed tokens too, rollout accuracy, action sensitivity, decoded PSNR at 1/5/10/30
steps next to copy-last-frame) and writes a real | dream | difference GIF to assets/.

Examples:
  python train_world.py                                   # data/pong + checkpoints/pong/vqvae.pt
  python train_world.py --steps 4000 --dim 128            # longer, wider
  python train_world.py --resume --steps 6000             # continue with optimizer and step
"""
import argparse
import os
import sys
import time

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# flags

p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--data", default="data/pong", help="folder of episodes from collect.py")
p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: checkpoints/<data name>/vqvae.pt)")
p.add_argument("--out", default=None, help="world checkpoint (default: checkpoints/<data name>/world.pt)")
p.add_argument("--context", type=int, default=4, help="frames of history")
p.add_argument("--arch", default="conv", choices=["conv", "attn"], help="dynamics net: conv on the token grid, or attention over it")
p.add_argument("--dim", type=int, default=64, help="channels of the dynamics net")
p.add_argument("--emb", type=int, default=16, help="token embedding size per history frame")
p.add_argument("--blocks", type=int, default=3, help="residual FiLM blocks (2 convs each)")
p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
p.add_argument("--batch", type=int, default=16, help="windows per batch")
p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay)")
p.add_argument("--rollout", type=int, default=3, help="K: steps unrolled on the model's own predictions (seed 003: 5)")
p.add_argument("--teacher-forcing", type=float, default=0.1, help="final probability of feeding the true tokens (seed 003)")
p.add_argument("--discount", type=float, default=0.7, help="loss discount per rollout step (seed 003)")
p.add_argument("--motion-scale", type=float, default=2.0, help="importance: embedding-distance motion (seed 003)")
p.add_argument("--eventness-scale", type=float, default=2.0, help="importance: motion beyond the recent motion (seed 003)")
p.add_argument("--persistence-scale", type=float, default=1.0, help="importance: motion across the history (seed 003)")
p.add_argument("--max-ratio", type=float, default=6.0, help="cap of a token's weight over the median (seed 003)")
p.add_argument("--eval-every", type=int, default=250, help="evaluate and checkpoint every N steps")
p.add_argument("--eval-windows", type=int, default=48, help="frozen validation windows (each 30 steps)")
p.add_argument("--gif-steps", type=int, default=60, help="length of the real | dream | difference GIF")
p.add_argument("--val-frac", type=float, default=0.1, help="fraction of episodes held out (same split as the tokenizer)")
p.add_argument("--seed", type=int, default=0, help="random seed")
p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
p.add_argument("--compile", action="store_true", help="torch.compile the dynamics net for training")
p.add_argument("--resume", action="store_true", help="continue from --out with its optimizer and step")
p.add_argument("--skip-bad", action="store_true", help="skip unreadable episode files instead of stopping")
p.add_argument("--assets", default="assets", help="where the dream GIF goes")

HORIZONS = (1, 5, 10, 30)


# -----------------------------------------------------------------------------
# data: token windows

def windows(eps, length):
    """All (episode, start) with `length` frames available."""
    return [(i, s) for i, ep in enumerate(eps) for s in range(len(ep["tokens"]) - length + 1)]


def batch(eps, idx, T, K, device):
    """history (B, T, h, w), actions (B, K), targets (B, K, h, w) for windows idx."""
    tok = torch.stack([eps[i]["tokens"][s:s + T + K] for i, s in idx]).to(device)
    act = torch.stack([eps[i]["actions"][s + T - 1:s + T - 1 + K] for i, s in idx]).to(device)
    return tok[:, :T], act, tok[:, T:]


def importance(hist, target, emb, a):
    """Seed 003's hybrid weighting: 1 + motion + eventness + persistence, capped."""
    d = lambda x, y: (emb[x] - emb[y]).norm(dim=-1)
    motion = d(target, hist[:, -1])
    persistence = torch.stack([d(hist[:, t], hist[:, t - 1]) for t in range(1, hist.shape[1])]).mean(0)
    event = (motion - persistence).clamp_min(0)
    w = 1 + a.motion_scale * motion + a.eventness_scale * event + a.persistence_scale * persistence
    return w.clamp(max=a.max_ratio * w.median().item())


# -----------------------------------------------------------------------------
# eval on frozen windows

def pong_scores(dream, real, space, k):
    """Paddle error (raw pixels) and ball-within-8-pixels rate, over frames where the real
    paddle / ball is visible. A dream that lost the paddle counts as 210 pixels off."""
    pad, ball = [], []
    for d, r in zip(dream, real):
        (rp, rb, rc), (dp, db, dc) = [common.pong_objects(common.to_image(x), space) for x in (r, d)]
        if rp is not None:
            pad.append(abs(dp - rp) if dp is not None else 210.0)
        if rb is not None:
            ball.append(db is not None and np.hypot(db - rb, dc - rc) <= 8)
    return {f"paddle_px@{k}": float(np.mean(pad)) if pad else float("nan"),
            f"ball_8px@{k}": float(np.mean(ball)) if ball else float("nan")}


@torch.no_grad()
def evaluate(dyn, tok, val, fixed, T, device, space, pong):
    dyn.eval()
    H = max(HORIZONS)
    hist, act, tgt = batch(val, fixed, T, H, device)
    real = torch.stack([val[i]["frames"][s + T:s + T + H] for i, s in fixed]).float()  # (B, H, C, H, W)
    last = torch.stack([val[i]["frames"][s + T - 1] for i, s in fixed]).float()
    m = {}
    logits = dyn(hist, act[:, 0])
    changed = tgt[:, 0] != hist[:, -1]
    pred = logits.argmax(1)
    m["acc"] = (pred == tgt[:, 0]).float().mean().item()
    m["acc_changed"] = (pred == tgt[:, 0])[changed].float().mean().item() if changed.any() else float("nan")
    per_action = torch.stack([dyn(hist, torch.full_like(act[:, 0], a)).argmax(1) for a in range(dyn.n_actions)])
    diff = [(per_action[i] != per_action[j]).flatten(1).sum(1).float().mean()
            for i in range(dyn.n_actions) for j in range(i + 1, dyn.n_actions)]
    m["action_sensitivity"] = torch.stack(diff).mean().item() if diff else 0.0
    h = hist
    for k in range(H):
        nxt = dyn(h, act[:, k]).argmax(1)
        h = torch.cat([h[:, 1:], nxt[:, None]], 1)
        if k + 1 in (5, 10):
            m[f"rollout_acc@{k + 1}"] = (nxt == tgt[:, k]).float().mean().item()
        if k + 1 in HORIZONS:
            dream = common.to_uint8(tok.decode(nxt)).cpu()
            psnr = lambda x: (10 * torch.log10(255 ** 2 / ((x.float() - real[:, k]) ** 2).mean((1, 2, 3)).clamp_min(1e-3))).mean().item()
            m[f"psnr@{k + 1}"], m[f"copy_psnr@{k + 1}"] = psnr(dream), psnr(last)
            if pong and k + 1 in (10, 30):
                m.update(pong_scores(dream, real[:, k].to(torch.uint8), space, k + 1))
    dyn.train()
    return m


def dream_gif(dyn, tok, ep, T, steps, path, device, fps=15):
    """real | dream | |difference| for one validation rollout, 3x upscaled."""
    steps = min(steps, len(ep["actions"]) - T + 1)
    with torch.no_grad():
        h = ep["tokens"][None, :T].to(device)
        frames = []
        for k in range(steps):
            nxt = dyn(h, ep["actions"][T - 1 + k:T + k].to(device)).argmax(1)
            h = torch.cat([h[:, 1:], nxt[:, None]], 1)
            dream = common.to_image(common.to_uint8(tok.decode(nxt))[0].cpu())
            real = common.to_image(ep["frames"][T + k])
            diff = np.abs(real.astype(int) - dream.astype(int)).astype(np.uint8)
            sep = np.full((real.shape[0], 2, 3), 255, np.uint8)
            frames.append(np.concatenate([real, sep, dream, sep, diff], 1).repeat(3, 0).repeat(3, 1))
    imageio.mimsave(path, frames, duration=1000 / fps, loop=0)  # milliseconds since imageio 2.28


# -----------------------------------------------------------------------------

def main():
    args = p.parse_args()
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    name = os.path.basename(os.path.normpath(args.data))
    tok_path = args.tokenizer or os.path.join("checkpoints", name, "vqvae.pt")
    out = args.out or os.path.join("checkpoints", name, "world.pt")
    T, K = args.context, args.rollout

    # -------------------------------------------------------------------------
    # data: cached tokens for every episode, frames only for validation
    tok, tck = common.load_tokenizer(tok_path)
    tok_key = common.file_key(tok_path)
    files = common.episode_files(args.data)
    space = tck["frame_space"]
    tokens = common.token_cache(args.data, tok_path, tok, space, device, tck["game"], args.skip_bad)
    meanings = tck["action_meanings"]
    train_f, val_f = common.split_episodes([f for f in files if os.path.basename(f) in tokens], args.val_frac, args.seed)
    if not val_f:
        val_f = train_f[-1:]
        print("warning: one episode only: validating on training data", file=sys.stderr)

    def episode(f, frames):
        ep = common.load_episode(f, keys=["frames", "actions"] if frames else ["actions"])
        d = {"tokens": tokens[os.path.basename(f)], "actions": torch.as_tensor(ep["actions"])}
        if frames:
            d["frames"] = common.preprocess(ep["frames"], space)
        return d

    train = [episode(f, False) for f in train_f]
    val = [episode(f, True) for f in val_f]
    pool = windows(train, T + K)
    if not pool:
        raise common.KitError(f"episodes in {args.data} are shorter than context + rollout ({T + K} frames)")
    rng = np.random.default_rng(1234)  # frozen eval indices (seed 003's gold eval)
    vpool = windows(val, T + max(HORIZONS))
    if not vpool:
        raise common.KitError(f"validation episodes are shorter than {T + max(HORIZONS)} frames")
    fixed = [vpool[i] for i in sorted(rng.choice(len(vpool), min(args.eval_windows, len(vpool)), replace=False))]
    print(f"data: {sum(len(e['actions']) for e in train)} train transitions ({len(train)} episodes), "
          f"{len(val)} val episodes, {len(fixed)} frozen eval windows; tokens {tuple(tokens[os.path.basename(files[0])].shape[1:])}")

    # -------------------------------------------------------------------------
    # model
    grid = tuple(train[0]["tokens"].shape[1:])
    model_args = dict(arch=args.arch, n_codes=tok.n_codes, n_actions=len(meanings), grid=grid, context=T,
                      emb=args.emb, dim=args.dim, n_blocks=args.blocks)
    dyn = common.make_dynamics(**model_args).to(device)
    tok = tok.to(device)
    opt = torch.optim.AdamW(dyn.parameters(), lr=args.lr, weight_decay=0.01)
    step, metrics = 0, {}
    if args.resume:
        ck = common.load_checkpoint(out, ("world",))
        if ck["model_args"] != model_args:
            raise common.KitError(f"--resume: {out} was trained with other model flags ({ck['model_args']})")
        if ck["tokenizer_key"] != tok_key:
            raise common.KitError(f"--resume: {out} was trained over another tokenizer than {tok_path}")
        dyn.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, metrics = ck["step"], ck.get("metrics", {})
        print(f"resumed {out} at step {step}")
    fwd = torch.compile(dyn) if args.compile else dyn
    emb = tok.quantizer.embed / tok.quantizer.embed.norm(dim=1).max()
    print(f"model: {sum(p.numel() for p in dyn.parameters()) / 1e6:.2f}M parameters on {device}")

    def save():
        common.save_checkpoint(out, dict(
            kind="world", model_args=model_args, model=dyn.state_dict(), optimizer=opt.state_dict(),
            tokenizer_args=tck["model_args"], tokenizer=tok.state_dict(), tokenizer_path=tok_path, tokenizer_key=tok_key,
            frame_space=space, game=tck["game"], action_meanings=meanings, step=step, args=vars(args), metrics=metrics))

    # -------------------------------------------------------------------------
    # loop: K-step rollouts on the model's own argmax, with scheduled teacher forcing
    g = np.random.default_rng(args.seed)
    disc = torch.tensor([args.discount ** k for k in range(K)])
    disc = disc / disc.sum()  # normalized discounted loss (seed 003)
    bar = tqdm(total=args.steps, initial=step, desc="world", unit="step")
    t0 = time.time()
    try:
        while step < args.steps:
            frac = step / args.steps
            lr = float(args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr
            # teacher forcing decays from 1 to its floor over the first 30% (scheduled sampling)
            tf = max(args.teacher_forcing, 1 - frac / 0.3)
            hist, act, tgt = batch(train, [pool[i] for i in g.integers(len(pool), size=args.batch)], T, K, device)
            loss = 0.0
            for k in range(K):
                logits = fwd(hist, act[:, k])
                w = importance(hist, tgt[:, k], emb, args)
                ce = F.cross_entropy(logits, tgt[:, k], reduction="none")
                loss = loss + disc[k] * (w * ce).sum() / w.sum()
                keep = torch.rand(len(hist), 1, 1, device=device) < tf
                nxt = torch.where(keep, tgt[:, k], logits.detach().argmax(1))
                hist = torch.cat([hist[:, 1:], nxt[:, None]], 1)
            common.check_finite(loss, step, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dyn.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", tf=f"{tf:.2f}")
            if step % args.eval_every == 0 or step == args.steps:
                metrics = evaluate(dyn, tok, val, fixed, T, device, space, tck["game"] == "ALE/Pong-v5")
                tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                save()
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"interrupted at step {step}: checkpoint saved to {out} (continue with --resume)", file=sys.stderr)
        sys.exit(130)
    bar.close()

    # -------------------------------------------------------------------------
    # outputs
    os.makedirs(args.assets, exist_ok=True)
    gif = os.path.join(args.assets, f"{name}_dream.gif")
    dream_gif(dyn, tok, val[0], T, args.gif_steps, gif, device)
    print(f"trained {step} steps in {(time.time() - t0) / 60:.1f} min; wrote {out} and {gif}")
    print("PSNR dream vs copy-last-frame: " + "  ".join(
        f"@{h} {metrics[f'psnr@{h}']:.2f}/{metrics[f'copy_psnr@{h}']:.2f}" for h in HORIZONS))


if __name__ == "__main__":
    common.run(main)
