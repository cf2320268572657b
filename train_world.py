"""train_world.py -- the dynamics model: the next frame's code from 4 frames of history and the action.

Trains over whichever tokenizer it is given. Over a VQ-VAE (train_vqvae.py): seed-003
training (K-step rollouts on the model's own predictions with scheduled teacher forcing,
hybrid importance weighting of tokens that move, normalized discounted loss) of a conv net
over the token grid. Over an autoencoder (train_ae.py): an MLP (seed 000) or a GRU (seed
004) on latent vectors, K-step rollouts fed back with their gradient, scheduled sampling,
MSE on standardized latents. Evaluates both on the same frozen validation windows (decoded
PSNR at 1/5/10/30 steps next to copy-last-frame, Pong paddle and ball, action sensitivity;
token or latent accuracy) and writes a real | dream | difference GIF to assets/.

Examples:
  python train_world.py                                   # data/pong + checkpoints/pong/vqvae.pt
  python train_world.py --steps 4000 --dim 128            # longer, wider
  python train_world.py --resume --steps 6000             # continue with optimizer and step
  python train_world.py --tokenizer checkpoints/pong/ae.pt                    # -> world_ae.pt, MLP
  python train_world.py --tokenizer checkpoints/pong/vae.pt --dynamics gru    # -> world_vae.pt
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
p.add_argument("--tokenizer", default=None,
               help="a VQ-VAE (train_vqvae.py: token dynamics) or an autoencoder (train_ae.py: latent dynamics) "
                    "(default: checkpoints/<data name>/vqvae.pt)")
p.add_argument("--out", default=None, help="world checkpoint (default: checkpoints/<data name>/world.pt, or world_ae.pt / "
                                           "world_vae.pt over an autoencoder)")
p.add_argument("--context", type=int, default=4, help="frames of history (over a stacked autoencoder: at least its stack)")
p.add_argument("--arch", default=None, choices=["conv", "attn"],
               help="token dynamics: conv on the token grid, or attention over it (%(default)s: conv)")
p.add_argument("--dim", type=int, default=64, help="token dynamics: channels of the net")
p.add_argument("--emb", type=int, default=16, help="token dynamics: token embedding size per history frame")
p.add_argument("--blocks", type=int, default=3, help="token dynamics: residual FiLM blocks (2 convs each)")
p.add_argument("--dynamics", default=None, choices=["mlp", "gru"],
               help="latent dynamics: MLP on the last latents, concatenated (seed 000), or GRU (seed 004) (%(default)s: mlp)")
p.add_argument("--hidden", type=int, default=256, help="latent dynamics: MLP width, GRU hidden units (seed 004: 256)")
p.add_argument("--pixel-loss", type=float, default=0.0,
               help="latent dynamics: weight of an MSE on the newest frame, decoded by the frozen decoder")
p.add_argument("--steps", type=int, default=None, help="optimizer steps (%(default)s: 1000 over tokens, 10000 over latents)")
p.add_argument("--batch", type=int, default=None, help="windows per batch (%(default)s: 16 over tokens, 64 over latents)")
p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay)")
p.add_argument("--rollout", type=int, default=3, help="K: steps unrolled on the model's own predictions (seed 003: 5)")
p.add_argument("--teacher-forcing", type=float, default=None,
               help="final probability of feeding the true codes (%(default)s: 0.1 over tokens, seed 003; 0.5 over latents, seed 004)")
p.add_argument("--discount", type=float, default=0.7, help="loss discount per rollout step (seed 003)")
p.add_argument("--motion-scale", type=float, default=2.0, help="importance: embedding-distance motion (seed 003)")
p.add_argument("--eventness-scale", type=float, default=2.0, help="importance: motion beyond the recent motion (seed 003)")
p.add_argument("--persistence-scale", type=float, default=1.0, help="importance: motion across the history (seed 003)")
p.add_argument("--max-ratio", type=float, default=6.0, help="cap of a token's weight over the median (seed 003)")
p.add_argument("--eval-every", type=int, default=None,
               help="evaluate and checkpoint every N steps (%(default)s: 250 over tokens, 1000 over latents)")
p.add_argument("--eval-windows", type=int, default=48, help="frozen validation windows (each 30 steps)")
p.add_argument("--gif-steps", type=int, default=48, help="length of the real | dream | difference GIF")
p.add_argument("--val-frac", type=float, default=0.1, help="fraction of episodes held out (same split as the tokenizer)")
p.add_argument("--seed", type=int, default=0, help="random seed")
p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
p.add_argument("--compile", action="store_true", help="torch.compile the dynamics net for training")
p.add_argument("--resume", action="store_true", help="continue from --out with its optimizer and step")
p.add_argument("--skip-bad", action="store_true", help="skip unreadable episode files instead of stopping")
p.add_argument("--assets", default="assets", help="where the dream GIF goes")

HORIZONS = (1, 5, 10, 30)
# the flags above whose default is None: (over tokens, over latents). A latent step is cheap
PATH_DEFAULTS = dict(steps=(1000, 10000), batch=(16, 64), teacher_forcing=(0.1, 0.5), eval_every=(250, 1000))


# -----------------------------------------------------------------------------
# data: windows of codes (token grids (h, w) long, or latents (D,) float), one per step.
# Over a stacked autoencoder, code j encodes frames j .. j + stack - 1: its episodes'
# frames and actions start at frame stack - 1, so that code j, frames[j] and actions[j]
# line up as they do for tokens, and the windows are the same frames as the token path's.

def batch(eps, idx, T, K, device):
    """history (B, T, ...), actions (B, K), targets (B, K, ...) for windows idx."""
    tok = torch.stack([eps[i]["codes"][s:s + T + K] for i, s in idx]).to(device)
    act = torch.stack([eps[i]["actions"][s + T - 1:s + T - 1 + K] for i, s in idx]).to(device)
    return tok[:, :T], act, tok[:, T:]


def predict(dyn, hist, action, h=None):
    """One step of either path -> (next codes, GRU state): the argmax tokens, or the next latent
    (latents are float, tokens are long)."""
    if hist.is_floating_point():
        return dyn(hist, action, h)
    return dyn(hist, action).argmax(1), None


def importance(hist, target, emb, a):
    """Seed 003's hybrid weighting: 1 + motion + eventness + persistence, capped."""
    d = lambda x, y: (emb[x] - emb[y]).norm(dim=-1)
    motion = d(target, hist[:, -1])
    persistence = torch.stack([d(hist[:, t], hist[:, t - 1]) for t in range(1, hist.shape[1])]).mean(0)
    event = (motion - persistence).clamp_min(0)
    w = 1 + a.motion_scale * motion + a.eventness_scale * event + a.persistence_scale * persistence
    return w.clamp(max=a.max_ratio * w.median().item())


def token_loss(dyn, hist, act, tgt, tf, emb, disc, args):
    """Seed 003: K steps on the model's own argmax with scheduled teacher forcing; importance-
    weighted cross-entropy, discounted over the steps."""
    loss = 0.0
    for k in range(len(disc)):
        logits = dyn(hist, act[:, k])
        w = importance(hist, tgt[:, k], emb, args)
        ce = F.cross_entropy(logits, tgt[:, k], reduction="none")
        loss = loss + disc[k] * (w * ce).sum() / w.sum()
        keep = torch.rand(len(hist), 1, 1, device=hist.device) < tf
        nxt = torch.where(keep, tgt[:, k], logits.detach().argmax(1))
        hist = torch.cat([hist[:, 1:], nxt[:, None]], 1)
    return loss


def latent_loss(dyn, decode, hist, act, tgt, tf, disc, scale, pixel):
    """K steps with scheduled sampling, each prediction fed back with its gradient (there is no
    argmax to cut it), so the loss at step k also trains the steps that led there. MSE on
    standardized latents, plus `pixel` x MSE of the decoded newest frame against the decoding
    of the true latent (no frames needed: the decoder is frozen and cannot beat that anyway)."""
    loss, h = 0.0, None
    for k in range(len(disc)):
        pred, h = dyn(hist, act[:, k], h)
        err = (((pred - tgt[:, k]) / scale) ** 2).mean()
        if pixel:
            with torch.no_grad():
                want = decode(tgt[:, k])
            err = err + pixel * F.mse_loss(decode(pred), want)
        loss = loss + disc[k] * err
        keep = torch.rand(len(hist), 1, device=hist.device) < tf
        hist = torch.cat([hist[:, 1:], torch.where(keep, tgt[:, k], pred)[:, None]], 1)
    return loss


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
def evaluate(dyn, decode, val, fixed, T, device, space, pong):
    """Tokens: accuracy (all, changed), rollout accuracy, action sensitivity in tokens. Latents:
    standardized MSE (and copying the last latent's), the same at 5 and 10 steps, action
    sensitivity in pixels (action_px: pixels of the decoded 1-step prediction that move by more
    than 25 of 255 when only the action changes, averaged over action pairs). Both: decoded
    PSNR next to copy-last-frame, and the Pong objects."""
    dyn.eval()
    H = max(HORIZONS)
    hist, act, tgt = batch(val, fixed, T, H, device)
    real = torch.stack([val[i]["frames"][s + T:s + T + H] for i, s in fixed]).float()  # (B, H, C, H, W)
    last = torch.stack([val[i]["frames"][s + T - 1] for i, s in fixed]).float()
    m, latent = {}, hist.is_floating_point()
    err = lambda z, k: (((z - tgt[:, k]) / dyn.scale) ** 2).mean().item()
    if latent:
        m["latent_mse"], m["copy_latent_mse"] = err(dyn(hist, act[:, 0])[0], 0), err(hist[:, -1], 0)
    else:
        logits = dyn(hist, act[:, 0])
        changed = tgt[:, 0] != hist[:, -1]
        pred = logits.argmax(1)
        m["acc"] = (pred == tgt[:, 0]).float().mean().item()
        m["acc_changed"] = (pred == tgt[:, 0])[changed].float().mean().item() if changed.any() else float("nan")
    per_action = [predict(dyn, hist, torch.full_like(act[:, 0], a))[0] for a in range(dyn.n_actions)]
    if latent:
        per_action = [common.to_uint8(decode(z)).int() for z in per_action]
    differ = (lambda x, y: (x - y).abs() > 25) if latent else (lambda x, y: x != y)
    diff = [differ(per_action[i], per_action[j]).flatten(1).sum(1).float().mean()
            for i in range(dyn.n_actions) for j in range(i + 1, dyn.n_actions)]
    m["action_px" if latent else "action_sensitivity"] = torch.stack(diff).mean().item() if diff else 0.0
    h, state = hist, None
    for k in range(H):
        nxt, state = predict(dyn, h, act[:, k], state)
        h = torch.cat([h[:, 1:], nxt[:, None]], 1)
        if k + 1 in (5, 10):
            if latent:
                m[f"latent_mse@{k + 1}"] = err(nxt, k)
            else:
                m[f"rollout_acc@{k + 1}"] = (nxt == tgt[:, k]).float().mean().item()
        if k + 1 in HORIZONS:
            dream = common.to_uint8(decode(nxt)).cpu()
            psnr = lambda x: (10 * torch.log10(255 ** 2 / ((x.float() - real[:, k]) ** 2).mean((1, 2, 3)).clamp_min(1e-3))).mean().item()
            m[f"psnr@{k + 1}"], m[f"copy_psnr@{k + 1}"] = psnr(dream), psnr(last)
            if pong and k + 1 in (10, 30):
                m.update(pong_scores(dream, real[:, k].to(torch.uint8), space, k + 1))
    dyn.train()
    return m


def dream_gif(dyn, decode, val, T, steps, path, device, fps=15):
    """real | dream | |difference| for the busiest validation window (most tokens changing, or
    the longest way in latent space: a rally, not a pause between points), 3x upscaled."""
    best = (-1, 0, 0)
    for i, ep in enumerate(val):
        n = min(steps, len(ep["actions"]) - T + 1)
        c = ep["codes"]
        moving = (c[1:] - c[:-1]).norm(dim=1) if c.is_floating_point() else (c[1:] != c[:-1]).flatten(1).sum(1).float()
        busy = F.conv1d(moving[None, None], torch.ones(1, 1, n))[0, 0]  # changes in each window
        s = int(busy.argmax())
        best = max(best, (busy[s].item(), i, s))
    _, i, s = best
    ep = val[i]
    steps = min(steps, len(ep["actions"]) - s - T + 1)
    with torch.no_grad():
        h, state = ep["codes"][None, s:s + T].to(device), None
        frames = []
        for k in range(steps):
            nxt, state = predict(dyn, h, ep["actions"][s + T - 1 + k:s + T + k].to(device), state)
            h = torch.cat([h[:, 1:], nxt[:, None]], 1)
            dream = common.to_image(common.to_uint8(decode(nxt))[0].cpu())
            real = common.to_image(ep["frames"][s + T + k])
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

    # -------------------------------------------------------------------------
    # the tokenizer picks the path; the other path's flags are a mistake, not something to ignore
    tok, tck = common.load_tokenizer(tok_path, ("vqvae", "ae"))
    latent = tck["kind"] == "ae"
    if latent and args.arch:
        raise common.KitError(f"--arch {args.arch} is for token dynamics, and {tok_path} is an autoencoder: "
                              f"use --dynamics mlp|gru")
    if not latent and args.dynamics:
        raise common.KitError(f"--dynamics {args.dynamics} is for latent dynamics, and {tok_path} is a VQ-VAE: "
                              f"use --arch conv|attn, or an autoencoder from train_ae.py")
    args.arch, args.dynamics = (None, args.dynamics or "mlp") if latent else (args.arch or "conv", None)
    for flag, defaults in PATH_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, defaults[latent])
    S = tok.stack if latent else 1  # frames per code
    if args.context < S:
        raise common.KitError(f"--context {args.context} is shorter than the stack of {tok_path}: each latent "
                              f"encodes {S} frames, so the world needs at least {S} frames of history")
    kind = ("vae" if tok.vae else "ae") if latent else ""
    out = args.out or os.path.join("checkpoints", name, f"world_{kind}.pt" if latent else "world.pt")
    T, K = args.context - S + 1, args.rollout  # T: codes of history

    # -------------------------------------------------------------------------
    # data: cached codes for every episode, frames only for validation
    tok_key = common.file_key(tok_path)
    files = common.episode_files(args.data)
    space = tck["frame_space"]
    cache = common.latent_cache if latent else common.token_cache
    codes = cache(args.data, tok_path, tok, space, device, tck["game"], args.skip_bad)
    meanings = tck["action_meanings"]
    train_f, val_f = common.split_episodes([f for f in files if os.path.basename(f) in codes], args.val_frac, args.seed)
    if not val_f:
        val_f = train_f[-1:]
        print("warning: one episode only: validating on training data", file=sys.stderr)

    def episode(f, frames):
        ep = common.load_episode(f, keys=["frames", "actions"] if frames else ["actions"])
        d = {"codes": codes[os.path.basename(f)], "actions": torch.as_tensor(ep["actions"])[S - 1:]}
        if frames:
            d["frames"] = common.preprocess(ep["frames"], space)[S - 1:]
        return d

    train = [episode(f, False) for f in train_f]
    val = [episode(f, True) for f in val_f]
    pool = common.windows(train, T + K)
    if not pool:
        raise common.KitError(f"episodes in {args.data} are shorter than context + rollout ({T + S - 1 + K} frames)")
    rng = np.random.default_rng(1234)  # frozen eval indices (seed 003's gold eval)
    vpool = common.windows(val, T + max(HORIZONS))
    if not vpool:
        raise common.KitError(f"validation episodes are shorter than {T + S - 1 + max(HORIZONS)} frames")
    fixed = [vpool[i] for i in sorted(rng.choice(len(vpool), min(args.eval_windows, len(vpool)), replace=False))]
    shape = tuple(train[0]["codes"].shape[1:])
    print(f"data: {sum(len(e['actions']) for e in train)} train transitions ({len(train)} episodes), "
          f"{len(val)} val episodes, {len(fixed)} frozen eval windows; " +
          (f"{shape[0]}-D latents of {S} frame(s)" if latent else f"token grid {shape}"))

    # -------------------------------------------------------------------------
    # model
    if latent:
        model_args = dict(arch=args.dynamics, latent_dim=tok.latent_dim, n_actions=len(meanings), context=T,
                          hidden=args.hidden)
    else:
        model_args = dict(arch=args.arch, n_codes=tok.n_codes, n_actions=len(meanings), grid=shape, context=T,
                          emb=args.emb, dim=args.dim, n_blocks=args.blocks)
    dyn = common.make_dynamics(**model_args).to(device)
    tok = tok.to(device).requires_grad_(False)  # frozen: a pixel loss trains the dynamics only
    if latent:
        dyn.standardize_with(torch.cat([ep["codes"] for ep in train]).to(device))
    opt = torch.optim.AdamW(dyn.parameters(), lr=args.lr, weight_decay=0.01)
    step, metrics = 0, {}
    if args.resume:
        ck = common.load_checkpoint(out, ("world",))
        was = ck.get("tokenizer_kind", "vqvae")
        if was != tck["kind"]:
            raise common.KitError(f"--resume: {out} was trained over a {was} tokenizer, {tok_path} is an {tck['kind']}")
        if latent and ck["model_args"].get("latent_dim") != tok.latent_dim:
            raise common.KitError(f"--resume: {out} predicts {ck['model_args'].get('latent_dim')}-D latents, "
                                  f"{tok_path} encodes {tok.latent_dim}-D latents")
        if ck["model_args"] != model_args:
            raise common.KitError(f"--resume: {out} was trained with other model flags ({ck['model_args']})")
        if ck["tokenizer_key"] != tok_key:
            raise common.KitError(f"--resume: {out} was trained over another tokenizer than {tok_path}")
        dyn.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, metrics = ck["step"], ck.get("metrics", {})
        print(f"resumed {out} at step {step}")
    fwd = torch.compile(dyn) if args.compile else dyn
    decode = (lambda z: tok.decode(z, last=True)) if latent else tok.decode
    emb = None if latent else tok.quantizer.embed / tok.quantizer.embed.norm(dim=1).max()
    print(f"model: {args.dynamics or args.arch}, {sum(p.numel() for p in dyn.parameters()) / 1e6:.2f}M parameters on {device}")

    def save():
        ck = dict(kind="world", model_args=model_args, model=dyn.state_dict(), optimizer=opt.state_dict(),
                  tokenizer_args=tck["model_args"], tokenizer=tok.state_dict(), tokenizer_path=tok_path, tokenizer_key=tok_key,
                  frame_space=space, game=tck["game"], action_meanings=meanings, step=step, args=vars(args), metrics=metrics)
        if latent:  # a world without tokenizer_kind is over a VQ-VAE (common.load_world)
            ck["tokenizer_kind"] = "ae"
        common.save_checkpoint(out, ck)

    # -------------------------------------------------------------------------
    # loop: K-step rollouts on the model's own predictions, with scheduled teacher forcing
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
            if latent:
                loss = latent_loss(fwd, decode, hist, act, tgt, tf, disc, dyn.scale, args.pixel_loss)
            else:
                loss = token_loss(fwd, hist, act, tgt, tf, emb, disc, args)
            common.check_finite(loss, step, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dyn.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", tf=f"{tf:.2f}")
            if step % args.eval_every == 0 or step == args.steps:
                metrics = evaluate(dyn, decode, val, fixed, T, device, space, tck["game"] == "ALE/Pong-v5")
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
    gif = os.path.join(args.assets, f"{name}_dream_{kind}.gif" if latent else f"{name}_dream.gif")
    dream_gif(dyn, decode, val, T, args.gif_steps, gif, device)
    print(f"trained {step} steps in {(time.time() - t0) / 60:.1f} min; wrote {out} and {gif}")
    print("PSNR dream vs copy-last-frame: " + "  ".join(
        f"@{h} {metrics[f'psnr@{h}']:.2f}/{metrics[f'copy_psnr@{h}']:.2f}" for h in HORIZONS))


if __name__ == "__main__":
    common.run(main)
