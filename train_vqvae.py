"""train_vqvae.py -- the discrete tokenizer: frames -> a grid of codebook indices (tokens).

The seed-003 VQ-VAE (conv encoder, EMA codebook with dead-code reset, nearest-upsample
decoder) with CPU-sized widths. Logs reconstruction loss, validation PSNR, codebook usage,
perplexity and stability; writes a real-vs-reconstruction PNG to assets/ and the token cache
that train_world.py reads (data/<game>/tokens.npy + .json, keyed by this checkpoint).

Examples:
  python train_vqvae.py                                    # data/pong -> checkpoints/pong/vqvae.pt
  python train_vqvae.py --data data/breakout --steps 3000 --codes 128
  python train_vqvae.py --frame-space gray84x84 --hidden 32 --code-dim 128 --down 2
  python train_vqvae.py --resume                           # continue from --out
  python train_vqvae.py --data data/pong data/breakout data/spaceinvaders   # one tokenizer of 3 games (seed 004)
  torchrun --nproc_per_node 2 train_vqvae.py               # 2 processes, same global --batch
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

p = common.flags(__doc__)
p.add_argument("--data", default=["data/pong"], nargs="+",
               help="folder of episodes from collect.py; several folders (one game each): one tokenizer of them all")
p.add_argument("--out", default=None,
               help="checkpoint path (default: checkpoints/<data name>/vqvae.pt; several: names joined by +)")
p.add_argument("--frame-space", default="rgb84x64", choices=list(common.FRAME_SPACES),
               help="preprocessing of raw frames")
p.add_argument("--hidden", type=common.positive_int, default=16, help="channels of the full-resolution conv layers")
p.add_argument("--code-dim", type=common.positive_int, default=32,
               help="channels at the token grid: the size of each codebook vector")
p.add_argument("--codes", type=common.positive_int, default=None,
               help="codebook size (default: 64 for each game; seed 003: 32)")
p.add_argument("--split-codes", action=argparse.BooleanOptionalAction, default=True,
               help="several games: each game draws from its own equal slice of the codebook "
                    "(--no-split-codes: the games share every code)")
p.add_argument("--encoder", default="patch", choices=["conv", "patch"],
               help="conv: seed 003's, whose tokens also see their neighbours; "
                    "patch: each token sees only its own patch")
p.add_argument("--down", type=common.positive_int, default=2,
               help="stride-2 stages: token grid = frame / 2^down (84x64 -> 21x16)")
p.add_argument("--steps", type=common.positive_int, default=800, help="optimizer steps")
p.add_argument("--batch", type=common.positive_int, default=32, help="frames per batch")
p.add_argument("--lr", type=common.positive_float, default=2e-3, help="AdamW learning rate")
p.add_argument("--beta", type=common.nonneg_float, default=0.25,
               help="commitment loss weight (van den Oord et al. 2017)")
p.add_argument("--fg-weight", type=common.nonneg_float, default=20.0,
               help="extra loss weight on pixels that differ from the median frame: the ball is 0.1%% of a Pong frame")
p.add_argument("--reset-every", type=common.positive_int, default=100,
               help="re-seed dead codes every N steps (seed 003: 500 at larger batches)")
p.add_argument("--eval-every", type=common.positive_int, default=200, help="validation and checkpoint every N steps")
p.add_argument("--val-frac", type=common.probability, default=0.1,
               help="fraction of episodes held out (split by episode)")
p.add_argument("--seed", type=int, default=0, help="random seed")
p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on CUDA, not on CPU)")
p.add_argument("--resume", action="store_true", help="continue from --out with its optimizer and step")
p.add_argument("--workers", type=common.nonneg_int, default=common.STREAM_WORKERS,
               help="processes that read and preprocess episodes beside training (0: in this one; "
                    "default: a quarter of the cores, at most 4)")
p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
               help="write the token cache train_world.py reads (--no-cache: tokenizer sweeps, benchmarks)")
p.add_argument("--skip-bad", action="store_true", help="skip unreadable episode files instead of stopping")
p.add_argument("--assets", default="assets", help="where the reconstruction PNG goes")
common.renamed(p, "--latent", "--code-dim", type=common.positive_int)


# -----------------------------------------------------------------------------

@torch.no_grad()
def recon_grid(model, V, path, device):
    """8 validation frames, real on top, reconstruction below, 3x upscaled."""
    model.eval()
    x = V[torch.linspace(0, len(V) - 1, 8).long()].to(device)
    rec = common.to_uint8(model(x)[0])
    model.train()
    grid = np.concatenate([np.concatenate([common.to_image(a) for a in row], 1) for row in (x.cpu(), rec.cpu())], 0)
    imageio.imwrite(path, grid.repeat(3, 0).repeat(3, 1))


@torch.no_grad()
def evaluate(model, val, device, games, batch=256):
    """Validation PSNR (dB, on [0, 255]), over all frames and per game, codes used, perplexity,
    and stability: the share of token cells whose pixels do not change between consecutive
    frames that keep their code (a flip there is noise the world model would have to predict).
    `val` holds frame pairs, one block per game: games {game: its frames in val}."""
    model.eval()
    mse, counts, stable = [], torch.zeros(model.n_codes), []
    for x in val.split(batch):
        x = x.to(device)
        rec, idx, _, _ = model(x)
        mse.append(common.frame_mse(common.to_uint8(rec), x).cpu())
        counts += torch.bincount(idx.flatten().cpu(), minlength=model.n_codes)
        still = F.max_pool2d((x[0::2] != x[1::2]).any(1, keepdim=True).float(), 2 ** model.down)[:, 0] == 0
        stable.append((idx[0::2] == idx[1::2])[still].float().cpu())
    model.train()
    prob = counts / counts.sum()
    perplexity = torch.exp(-(prob[prob > 0] * prob[prob > 0].log()).sum()).item()
    psnr = common.psnr(torch.cat(mse))
    by_game = {game: part.mean().item() for game, part in zip(games, psnr.split(list(games.values())))}
    return dict(val_psnr=psnr.mean().item(), val_psnr_by_game=by_game, codes_used=int((counts > 0).sum()),
                perplexity=perplexity, stability=torch.cat(stable).mean().item())


def own_game(x, bgs):
    """Each frame's game (B,) long, the one of the nearest median frame (bgs (G, C, H, W)):
    frames of two games differ far more than a frame differs from its own background."""
    if len(bgs) == 1:
        return torch.zeros(len(x), dtype=torch.long, device=x.device)
    return (x[:, None].float() - bgs).abs().mean((2, 3, 4)).argmin(1)


def main():
    args = p.parse_args()
    common.seed_everything(args.seed)
    rank, ranks, device = common.distributed(args.device)  # torchrun: one process per rank
    rank_batch = common.per_rank(args.batch, ranks)
    name = "+".join(os.path.basename(os.path.normpath(d)) for d in args.data)
    out = args.out or os.path.join("checkpoints", name, "vqvae.pt")
    args.codes = args.codes or 64 * len(args.data)
    args.split_codes = args.split_codes and len(args.data) > 1
    if args.codes < 2:
        raise common.KitError("--codes must be at least 2")
    if args.split_codes and args.codes % len(args.data):
        raise common.KitError(f"--codes {args.codes} cannot be cut into {len(args.data)} equal slices, one per game "
                              "(or --no-split-codes)")

    # -------------------------------------------------------------------------
    # data: frames streamed from the training episodes; validation = held-out episodes
    train, val, games, V, bgs = [], [], {}, [], []
    for t, v, meta in common.scan_datasets(args.data, args.val_frac, args.seed, args.skip_bad):
        games[meta["game"]] = meta["action_meanings"]
        train, val = train + t, val + v
        # consecutive frames (for stability), an equal share of each game's; and each game's background
        V.append(common.frame_runs(v or t, args.frame_space, 512 // len(args.data), 2).flatten(0, 1))
        bgs.append(common.background(t, args.frame_space, args.seed))
    shares = dict(zip(games, map(len, V)))  # each game's validation frames
    V, bgs = torch.cat(V), torch.stack(bgs).to(device)
    meta = dict(game=next(iter(games)), action_meanings=next(iter(games.values())))
    if len(games) > 1:
        meta["games"] = games
    # every rank reads the same stream of global batches and trains on its slice: the run is the one
    # process's, whatever the number of ranks (up to float rounding)
    stream = common.frame_stream(train, args.frame_space, args.batch, 1, args.workers, args.seed, args.skip_bad)
    mine = slice(rank * rank_batch, (rank + 1) * rank_batch)
    print(f"data: {sum(n for _, n in train)} train frames ({len(train)} episodes, streamed by {args.workers} "
          f"workers), {len(V)} val frames ({len(val)} episodes), {', '.join(games)}, {args.frame_space}")

    # -------------------------------------------------------------------------
    # model
    C = common.frame_shape(args.frame_space)[2]
    model_args = dict(in_ch=C, hidden=args.hidden, code_dim=args.code_dim, n_codes=args.codes, down=args.down,
                      patch=args.encoder == "patch")
    if args.split_codes:
        model_args["games"] = len(args.data)
    model = common.VQVAE(**model_args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, metrics = 0, {}
    if args.resume:
        _, step, metrics = common.resume(out, "vqvae", model, opt, model_args=model_args, frame_space=args.frame_space)
    fwd = common.compiled(model, device) if args.compile else model
    os.makedirs(args.assets, exist_ok=True)
    png = os.path.join(args.assets, f"{name}_vqvae_recon.png")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")

    watch = common.LossWatch()

    def save():
        watch.check(out)  # a NaN is never saved over the last good checkpoint
        if rank:  # one writer
            return
        common.save_checkpoint(out, dict(
            kind="vqvae", model_args=model_args, model=model.state_dict(), optimizer=opt.state_dict(),
            frame_space=args.frame_space, **meta, step=step, args=vars(args), metrics=metrics))

    # -------------------------------------------------------------------------
    # loop
    bar = tqdm(total=args.steps, initial=step, desc="vqvae", unit="step")
    t0, first = time.time(), step
    try:
        while step < args.steps:
            x = next(stream)[mine, 0].to(device)
            game = own_game(x, bgs)
            w = 1 + args.fg_weight * ((x.float() - bgs[game]).abs().amax(1, keepdim=True) > 12).float()
            lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / args.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            rec, idx, commit, z = fwd(x, game if args.split_codes else None)
            # normalized by the global batch's weight: the ranks' mean gradient is the whole batch's
            recon = (w * (rec - common.to_float(x)) ** 2).sum() * ranks / (common.all_sum(w.sum(), ranks) * x.shape[1])
            loss = recon + args.beta * commit
            read = watch(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            common.average_gradients(model.parameters(), ranks)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if read:  # the loss leaves the device every few steps, not every step
                watch.check(out)
                bar.set_postfix(loss=f"{recon.item():.4f}")
            if step % args.reset_every == 0 and step < 0.8 * args.steps:
                model.quantizer.reset_dead(common.all_gather(z, ranks),
                                           common.all_gather(F.max_pool2d(w - 1, 2 ** args.down)[:, 0], ranks),
                                           common.all_gather(game, ranks))
            if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
                metrics = dict(recon=recon.item(), **evaluate(model, V, device, shares))
                tqdm.write(f"step {step}: recon {recon.item():.5f}  val PSNR {metrics['val_psnr']:.2f} dB  codes used "
                           f"{metrics['codes_used']}/{args.codes}  perplexity {metrics['perplexity']:.1f}  "
                           f"stability {metrics['stability']:.3f}")
                save()
                recon_grid(model, V, png, device)
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"interrupted at step {step}: checkpoint saved to {out} (continue with --resume)", file=sys.stderr)
        sys.exit(130)
    bar.close()
    stream.close()  # its workers and their frames go before the cache is written
    if rank:
        return

    # -------------------------------------------------------------------------
    # outputs: the token cache (the reconstruction grid is written at every eval)
    seconds = max(time.time() - t0, 1e-9)
    if args.cache:
        for folder in args.data:
            common.token_cache(folder, out, model, args.frame_space, device, list(games), args.skip_bad, read=False)
    print(f"trained {step} steps in {seconds / 60:.1f} min ({(step - first) / seconds:.1f} steps/s): val PSNR "
          f"{metrics.get('val_psnr', float('nan')):.2f} dB"
          + (" (" + ", ".join(f"{g[4:-3]} {v:.2f}" for g, v in metrics["val_psnr_by_game"].items()) + ")"
             if len(games) > 1 and "val_psnr_by_game" in metrics else "")
          + f", {metrics.get('codes_used')} codes used; wrote {out}, {png}"
          + (f" and the token cache for {len(train) + len(val)} episodes" if args.cache else ""))


if __name__ == "__main__":
    common.run(main)
