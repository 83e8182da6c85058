#!/usr/bin/env python3
"""The PyTorch side of derm's GPU bench rows (`cargo xtask bench --device cuda`), on a CUDA GPU.

peer_bench.py times the peer on the CPU only; this script times the same networks (taken from
peer_bench.py) on `cuda` with the GPU batch sizes of derm's rows:

    unet_train_step b8 128x128 / 256x256   dilated U-Net, BCE with logits, Adam 1e-4
    resnet50_infer b64 224x224             torchvision ResNet-50 (3 classes), eval mode
    resnet50_train_step b32 224x224        the same, one SGD step (momentum 0.9)
    pconv_train_step b8 256x256            partial-convolution U-Net (5 levels), L1 + 6 L1 + 0.1 TV
    dcgan_joint_step b64 64x64             DCGAN 64: one discriminator and one generator step

Each call ends with torch.cuda.synchronize(); no loss is read back inside a step (as in derm's
rows). f32 throughout, TF32 off (derm's CUDA matmuls are plain f32), cuDNN benchmark mode on.
Output: one JSON object (rows as `cargo xtask bench --json` writes them: name, median_ms, min_ms,
samples_ms) on stdout and, with --json, in a file.

    python3 bench/peer/cuda_bench.py [--repeats 10] [--warmup 3] [--json OUT]
"""
import argparse
import json
import os
import statistics
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import cv2  # noqa: F401  (peer_bench needs it; a GPU machine's torch environment may lack it)
except ImportError:  # pragma: no cover - depends on the machine
    def _line(img, a, b, value, width):
        """cv2.line's thick segment, drawn as discs along the segment (only the masks use it)."""
        (x0, y0), (x1, y1) = a, b
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        yy, xx = np.ogrid[: img.shape[0], : img.shape[1]]
        for t in np.linspace(0.0, 1.0, n + 1):
            cx, cy = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= (width / 2.0) ** 2] = value

    sys.modules["cv2"] = types.SimpleNamespace(line=_line, __version__="stub", getNumThreads=lambda: 0)

import peer_bench as pb  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(call, warmup, repeats):
    for _ in range(warmup):
        call()
    sync()
    took = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        took.append(1000.0 * (time.perf_counter() - start))
    return {"median_ms": round(statistics.median(took), 3), "min_ms": round(min(took), 3),
            "samples_ms": [round(v, 3) for v in took]}


def unet_rows(o, dev):
    rows = []
    for size in (128, 256):
        pb.reseed(o.seed)
        gen = torch.Generator().manual_seed(o.seed)
        net = pb.UNet().to(dev).train()
        adam = torch.optim.Adam(net.parameters(), lr=1e-4)
        x, y = (t.to(dev) for t in pb.disc_batch(8, size, gen))

        def step():
            adam.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(net(x), y).backward()
            adam.step()

        rows.append({"name": f"unet_train_step b8 {size}x{size}", **measure(step, o.warmup, o.repeats)})
    return rows


def resnet_rows(o, dev):
    pb.reseed(o.seed)
    net = pb.resnet50_3().to(dev)
    gen = torch.Generator().manual_seed(o.seed)
    xi = torch.rand(64, 3, 224, 224, generator=gen).to(dev)
    net.eval()

    def infer():
        with torch.inference_mode():
            net(xi)

    infer_row = {"name": "resnet50_infer b64 224x224", **measure(infer, o.warmup, o.repeats)}
    x = torch.rand(32, 3, 224, 224, generator=gen).to(dev)
    y = torch.randint(0, 3, (32,), generator=gen).to(dev)
    net.train()
    sgd = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def step():
        sgd.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        sgd.step()

    return [infer_row, {"name": "resnet50_train_step b32 224x224 SGD m0.9", **measure(step, o.warmup, o.repeats)}]


def pconv_rows(o, dev):
    pb.reseed(o.seed)
    net = pb.PConvNet(5, "fast").to(dev).train()
    adam = torch.optim.Adam(net.parameters(), lr=2e-4)
    gen = torch.Generator().manual_seed(o.seed)
    truth = torch.rand(8, 3, 256, 256, generator=gen).to(dev)
    valid = torch.from_numpy(pb.scribble_masks(8, 256, o.seed)).to(dev)
    holes = 1 - valid
    given = truth * valid

    def step():
        adam.zero_grad(set_to_none=True)
        pred, _ = net(given, valid)
        composite = valid * truth + holes * pred
        loss = (F.l1_loss(valid * pred, valid * truth) + 6.0 * F.l1_loss(holes * pred, holes * truth)
                + 0.1 * pb.total_variation(composite))
        loss.backward()
        adam.step()

    return [{"name": "pconv_train_step b8 256x256 L5 mask=fast", **measure(step, o.warmup, o.repeats)}]


def dcgan_rows(o, dev):
    pb.reseed(o.seed)
    widths = (512, 256, 128, 64)
    G, D = pb.generator(100, widths).to(dev), pb.discriminator(widths[::-1]).to(dev)
    G.apply(pb.gan_init)
    D.apply(pb.gan_init)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(o.seed)
    real = (torch.rand(64, 3, 64, 64, generator=gen) * 2 - 1).to(dev)
    z = torch.randn(64, 100, 1, 1, generator=gen).to(dev)
    yes, no = torch.ones(64, device=dev), torch.zeros(64, device=dev)
    bce = F.binary_cross_entropy_with_logits

    def step():
        opt_d.zero_grad(set_to_none=True)
        fake = G(z)
        (bce(D(real), yes) + bce(D(fake.detach()), no)).backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        bce(D(fake), yes).backward()
        opt_g.step()

    return [{"name": "dcgan_joint_step b64 64x64", **measure(step, o.warmup, o.repeats)}]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to smoke-test this script")
    o = ap.parse_args()
    if o.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_bench.py: torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    dev = torch.device(o.device)
    rows = unet_rows(o, dev) + resnet_rows(o, dev) + pconv_rows(o, dev) + dcgan_rows(o, dev)
    gpu = torch.cuda.get_device_name(0) if o.device == "cuda" else None
    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu, "device": o.device,
              "warmup": o.warmup, "repeats": o.repeats, "rows": rows}
    print(json.dumps(record), flush=True)
    if o.json:
        with open(o.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
