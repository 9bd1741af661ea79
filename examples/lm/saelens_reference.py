# SPDX-License-Identifier: MIT
"""The reference row `topk_saelens_lib`: a TopK transcoder trained by SAELens itself (6.x),
to check mxd's imitation of its recipe (`mxd train --tc-recipe saelens`) against the library.

Run by a Python that has sae_lens (a virtual environment: it needs a current torch), never by
the experiment's own Python; layers.py calls it and splices the result like the other methods:

    /work/venv215/bin/python examples/lm/saelens_reference.py --data acts_train.safetensors \\
        --k 8 --latents 2048 --batch 1024 --steps 1000 --lr 4e-4 --seed 0 --out DIR

What is SAELens's and what is not:
- the model is its `TopKTrainingSAE` with `TopKTrainingSAEConfig`'s defaults (decoder rows at
  norm 0.1, W_enc = W_dec^T, TopK on pre-activations scaled by the decoder rows' norms, AuxK
  with k_aux = d_in / 2), except `apply_b_dec_to_input=False`: SAELens's own transcoders
  refuse it (the output bias has no business centring the input);
- the loop is its `SAETrainer.fit` unchanged, with `SAETrainerConfig`'s defaults (Adam 0.9 /
  0.999, constant lr, no warm-up, clip grad norm 1, dead after 1000 steps without firing)
  but the experiment's lr, batch and steps;
- the one change, `TargetSwapped` below: the trainer feeds rows [x, y]; the encoder reads x
  and every loss (MSE, AuxK's residual) targets y, the MLP's output, instead of the input;
- the data: the dump's rows less the last 5 %, held out as `mxd train` does, reshuffled each
  epoch (a torch generator, not mxd's order).

Writes DIR/topk_transcoder.safetensors in mxd's transcoder format (decoder norms folded into
the encoder, checked against SAELens's forward) and DIR/metrics.json like `mxd train`'s
(held-out FVU, dead fraction). `--probe` only prints SAELens's version (exit 1 without it);
`--no-rescale` turns off SAELens's decoder-norm rescaling (mxd's counterpart:
`--tc-rank-by-dec-norm`), to see what it is worth.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", action="store_true", help="print sae_lens's version and exit")
    ap.add_argument("--data", help="activation dump: tensors x [N, d_in], y [N, d_out]")
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-rescale", action="store_true",
                    help="rescale_acts_by_decoder_norm=False (a diagnostic: SAELens's default has it, "
                         "as mxd's --tc-rank-by-dec-norm on)")
    args = ap.parse_args(argv)
    import sae_lens
    if args.probe:
        print(sae_lens.__version__)
        return 0
    from safetensors.torch import load_file, save_file
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    class TargetSwapped(TopKTrainingSAE):
        """SAELens's TopK training SAE as a transcoder: a batch row is [x, y]; the base
        training pass runs with y as its `sae_in` (MSE target, AuxK residual, logged
        variance) while the encoder is handed x."""

        def training_forward_pass(self, step_input):
            self._x, y = step_input.sae_in.split(self.cfg.d_in, dim=-1)
            try:
                return super().training_forward_pass(dataclasses.replace(step_input, sae_in=y))
            finally:
                del self._x

        def encode_with_hidden_pre(self, sae_in):  # outside training (encode), x itself
            return super().encode_with_hidden_pre(getattr(self, "_x", sae_in))

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = load_file(args.data)
    x, y = t["x"].float(), t["y"].float()
    n = x.shape[0]
    held = max(1, int(n * args.eval_fraction))  # mxd train's split: the last rows held out
    xy = torch.cat([x[:n - held], y[:n - held]], 1)
    d_in, d_out = x.shape[1], y.shape[1]
    if d_in != d_out:  # the SAE's b_dec and W_dec are d_in wide
        raise SystemExit(f"SAELens's TopK SAE needs d_in == d_out, not {d_in} -> {d_out}")

    def batches():  # the training rows, reshuffled each epoch, as one stream
        g = torch.Generator().manual_seed(args.seed)
        order, pos = torch.randperm(len(xy), generator=g), 0
        while True:
            if pos + args.batch > len(order):
                order, pos = torch.cat([order[pos:], torch.randperm(len(xy), generator=g)]), 0
            yield xy[order[pos:pos + args.batch]]
            pos += args.batch

    torch.manual_seed(args.seed)
    sae = TargetSwapped(TopKTrainingSAEConfig(d_in=d_in, d_sae=args.latents, k=args.k,
                                              apply_b_dec_to_input=False,
                                              rescale_acts_by_decoder_norm=not args.no_rescale))
    cfg = SAETrainerConfig(total_training_samples=args.steps * args.batch,
                           train_batch_size_samples=args.batch, lr=args.lr, device="cpu",
                           lr_end=args.lr / 10)  # as LanguageModelSAERunnerConfig sets it (unused: constant lr)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches())
    t0 = time.time()
    trainer.fit()
    seconds = time.time() - t0

    with torch.no_grad():
        xh, yh = x[n - held:], y[n - held:]
        sae.eval()
        ref = sae.decode(sae.encode(xh))  # SAELens's own forward, before the fold
        if not args.no_rescale:  # selection and output unchanged up to rounding (_fold_norm_topk)
            sae.fold_W_dec_norm()
        p = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec_out": sae.b_dec}
        p = {k: v.detach().float().contiguous().clone() for k, v in p.items()}
        top = torch.topk(torch.relu(xh @ p["W_enc"] + p["b_enc"]), args.k, dim=-1)
        acts = torch.zeros(len(xh), args.latents).scatter(-1, top.indices, top.values)
        pred = acts @ p["W_dec"] + p["b_dec_out"]  # layers.TranscoderLayer's formula
        # Folding rounds the pre-activations differently, so a near-tie at the k-th latent can
        # flip in a row or two; any more is a wrong conversion.
        row_err, tol = (pred - ref).abs().amax(-1), 1e-4 * float(ref.abs().max())
        flipped, fold_err = int((row_err > tol).sum()), float(row_err[row_err <= tol].max())
        if flipped > 1e-3 * len(xh):
            raise SystemExit(f"the folded weights disagree with SAELens's forward in {flipped} of {len(xh)} rows")
        fvu = float(((pred - yh) ** 2).sum() / ((yh - yh.mean(0)) ** 2).sum())
        dead = 1.0 - float((acts > 0).any(0).float().mean())
    meta = {"model": "topk_transcoder", "d_in": str(d_in), "d_out": str(d_out),
            "n_latents": str(args.latents), "k": str(args.k), "skip": "0",
            "trained_by": f"sae_lens {sae_lens.__version__} TopKTrainingSAE, SAETrainer, target swapped",
            "rescale_acts_by_decoder_norm": str(int(not args.no_rescale))}
    save_file(p, str(out / "topk_transcoder.safetensors"), metadata=meta)
    metrics = {"models": [{"name": "topk_transcoder", "k": args.k, "params": sum(v.numel() for v in p.values()),
                           "fvu": fvu, "dead_fraction": dead, "train_dead_fraction":
                           float(trainer.dead_neurons.float().mean()), "fold_max_abs_err": fold_err,
                           "fold_flipped_rows": flipped,
                           "seconds": seconds, "sae_lens": sae_lens.__version__}]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics["models"][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
