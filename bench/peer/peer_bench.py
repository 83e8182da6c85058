#!/usr/bin/env python3
"""PyTorch + OpenCV counterpart of `cargo xtask bench` (derm's Rust/Candle benchmarks).

Usage:
    python peer_bench.py SUBCOMMAND [--repeats N] [--warmup N] [--threads T] [--seed S] [options]

Subcommands (same shapes as the Rust groups in xtask/src/bench.rs):
    hair         OpenCV DullRazor-style hair mask and TELEA inpainting on a synthetic 512x512 image
    metrics      Jaccard over 1000 masks of 256x256 and ROC AUC over 10000 scores (sklearn)
    unet_train   one Adam step of the dilated U-Net, batch 8, at 128 and/or 256 px
    unet_infer   U-Net forward pass, batch 8, 256 px
    resnet50     torchvision ResNet-50 (3 classes): inference and one SGD step, batch 8, 224 px
    vbp          VisualBackProp on ResNet-50, one 224 px image
    pconv_train  one step of the partial-convolution inpainting U-Net, batch 4, 256 px
    dcgan_train  one discriminator + generator step of a DCGAN, batch 64, 64 and/or 128 px
    all          every one of the above with its default options

Output: exactly one JSON object per subcommand, on one line of stdout. Its `results` list has one
entry per measured row: `name` (the row name the Rust side matches), `median_ms`, `min_ms`,
`mean_ms`, `samples_ms` (every timed call) and `shapes`, plus row-specific fields. The top level
also records versions, thread counts, the OMP_* environment and the load average.

Timing: `--warmup` calls that are not timed, then `--repeats` calls each timed with
time.perf_counter. Inputs are synthetic and seeded; nothing is read from disk.
"""
import argparse
import json
import os
import platform
import statistics
import time

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _loadavg():
    return [round(x, 2) for x in os.getloadavg()]


STATE = {"load_at_start": _loadavg()}


# =============================================================================== plumbing

def measure(call, warmup, repeats):
    """Runs `call` warmup times untimed, then repeats times timed; returns the timing fields."""
    for _ in range(warmup):
        call()
    took = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        took.append(1000.0 * (time.perf_counter() - start))
    return {
        "median_ms": round(statistics.median(took), 3),
        "min_ms": round(min(took), 3),
        "mean_ms": round(sum(took) / len(took), 3),
        "samples_ms": [round(v, 3) for v in took],
    }


def row(name, timing, **fields):
    out = {"name": name}
    out.update(fields)
    out.update(timing)
    return out


def count_params(module):
    return int(sum(p.numel() for p in module.parameters()))


def reseed(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


def report(opts, bench, rows, **extra):
    """Prints the one JSON line the Rust side reads (it takes the last line starting with '{')."""
    record = {
        "bench": bench,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cv2": cv2.__version__,
        "cv2_threads": cv2.getNumThreads(),
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "seed": opts.seed,
        "results": rows,
        "env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "loadavg_start": STATE["load_at_start"],
        "loadavg_end": _loadavg(),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    record.update(extra)
    print(json.dumps(record), flush=True)
    return record


# =============================================================================== hair removal

def synthetic_hairy_image(seed, size, hairs):
    """A dermoscopy-like picture: skin tone with vignetting, a blurred mottled brown lesion,
    sensor noise, then `hairs` dark anti-aliased quadratic Bezier curves of 1-3 px.
    Returns (hairy RGB uint8 HWC, clean RGB uint8 HWC, boolean hair ground truth drawn without
    anti-aliasing). Random draws come from numpy's default_rng(seed) in a fixed order, which the
    reference numbers in README.md depend on."""
    rng = np.random.default_rng(seed)
    n = size
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    radius2 = ((xs - n / 2) ** 2 + (ys - n / 2) ** 2) / (n / 2) ** 2
    shade = 1.0 - 0.12 * radius2
    base = np.array([222.0, 178.0, 160.0], np.float32)[None, None, :] * shade[..., None]

    lesion = np.zeros((n, n), np.float32)
    cx = int(n / 2 + rng.integers(-40, 41))
    cy = int(n / 2 + rng.integers(-40, 41))
    ax_a = int(rng.integers(100, 150))
    ax_b = int(rng.integers(70, 115))
    tilt = float(rng.uniform(0, 180))
    cv2.ellipse(lesion, (cx, cy), (ax_a, ax_b), tilt, 0, 360, 1.0, -1)
    lesion = cv2.GaussianBlur(lesion, (0, 0), 9)
    blotch = cv2.GaussianBlur(rng.normal(0, 1, (n, n)).astype(np.float32), (0, 0), 6)
    blotch /= np.abs(blotch).max() + 1e-6
    brown = np.array([128.0, 84.0, 62.0], np.float32)[None, None, :] * (1.0 + 0.25 * blotch[..., None])
    picture = base * (1 - lesion[..., None]) + brown * lesion[..., None]
    picture = picture + rng.normal(0, 3.0, picture.shape)
    clean = np.clip(picture, 0, 255).astype(np.uint8)

    hairy = clean.copy()
    truth = np.zeros((n, n), np.uint8)
    steps = np.linspace(0, 1, 40)[:, None]
    for _ in range(hairs):
        start = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(80, 320)
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        side = np.array([-np.sin(angle), np.cos(angle)])
        ctrl = (start + end) / 2 + side * rng.uniform(-0.35, 0.35) * length  # how far the curve bows
        curve = (1 - steps) ** 2 * start + 2 * (1 - steps) * steps * ctrl + steps ** 2 * end
        curve = curve.round().astype(np.int32).reshape(-1, 1, 2)
        width = int(rng.integers(1, 4))
        dark = int(rng.integers(15, 50))
        red = dark + int(rng.integers(0, 16))
        green = dark + int(rng.integers(0, 9))
        cv2.polylines(hairy, [curve], False, (red, green, dark), thickness=width, lineType=cv2.LINE_AA)
        cv2.polylines(truth, [curve], False, 1, thickness=width, lineType=cv2.LINE_8)
    return hairy, clean, truth.astype(bool)


def oriented_lines(k):
    """Line structuring elements at 0, 90, 45 and 135 degrees (the original DullRazor)."""
    horiz = np.zeros((k, k), np.uint8)
    horiz[k // 2, :] = 1
    diag = np.eye(k, dtype=np.uint8)
    return [horiz, horiz.T.copy(), diag, np.ascontiguousarray(diag[:, ::-1])]


def recall_precision(pred, truth):
    hit = float(np.count_nonzero(pred & truth))
    return {
        "recall": round(hit / max(int(truth.sum()), 1), 4),
        "precision": round(hit / max(int(pred.sum()), 1), 4),
        "pred_pixels": int(pred.sum()),
    }


def run_hair(o):
    img, clean, truth = synthetic_hairy_image(o.seed, o.size, o.n_hairs)
    grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (o.dilate, o.dilate))
    if o.kernel == "cross":
        shapes_k = [cv2.getStructuringElement(cv2.MORPH_CROSS, (o.ksize, o.ksize))]
    else:
        shapes_k = oriented_lines(o.ksize)

    def detect():
        lum = cv2.cvtColor(img, cv2.COLOR_RGB2Luv)[:, :, 0]
        if len(shapes_k) == 1:
            tophat = cv2.morphologyEx(lum, cv2.MORPH_BLACKHAT, shapes_k[0])
        else:
            tophat = np.maximum.reduce([cv2.morphologyEx(lum, cv2.MORPH_BLACKHAT, k) for k in shapes_k])
        _, raw = cv2.threshold(tophat, o.thresh, 255, cv2.THRESH_BINARY)
        grown = cv2.dilate(raw, grow, iterations=o.dilate_iter) if o.dilate_iter > 0 else raw
        return raw, grown

    raw, grown = detect()
    t_detect = measure(detect, o.warmup, o.repeats)

    def repair():
        return cv2.inpaint(img, grown, o.radius, cv2.INPAINT_TELEA)

    fixed = repair()
    t_repair = measure(repair, o.warmup, o.repeats)

    truth_grown = cv2.dilate(truth.astype(np.uint8), grow, iterations=o.dilate_iter).astype(bool)
    q_grown = recall_precision(grown > 0, truth)
    q_grown["precision_vs_dilated_gt"] = round(
        float(np.count_nonzero((grown > 0) & truth_grown)) / max(int((grown > 0).sum()), 1), 4)
    err_after = np.abs(fixed.astype(np.float32) - clean.astype(np.float32))
    err_before = np.abs(img.astype(np.float32) - clean.astype(np.float32))

    def psnr(err):
        return round(10 * np.log10(255 ** 2 / float((err ** 2).mean())), 3)

    quality = {
        "gt_hair_pixels": int(truth.sum()),
        "mask_raw": recall_precision(raw > 0, truth),
        "mask_dilated": q_grown,
        "mae_on_hair_px_before": round(float(err_before[truth].mean()), 3),
        "mae_on_hair_px_after": round(float(err_after[truth].mean()), 3),
        "psnr_vs_clean_before": psnr(err_before),
        "psnr_vs_clean_after": psnr(err_after),
    }
    if o.save:
        os.makedirs(o.save, exist_ok=True)
        bgr = lambda a: cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
        for name, pic in (("hair_input", bgr(img)), ("hair_clean", bgr(clean)),
                          ("hair_gt", truth.astype(np.uint8) * 255), ("hair_mask", grown),
                          ("hair_inpainted", bgr(fixed))):
            cv2.imwrite(os.path.join(o.save, name + ".png"), pic)
    shp = {"image_chw": [3, o.size, o.size], "cv2_layout": "HWC uint8 RGB"}
    settings = {"kernel": o.kernel, "ksize": o.ksize, "thresh": o.thresh, "dilate": o.dilate,
                "dilate_iter": o.dilate_iter, "inpaint": "TELEA", "radius": o.radius, "n_hairs": o.n_hairs}
    return report(o, "hair", [
        row("hair_mask (Luv->L, blackhat, thresh, dilate)", t_detect, shapes=shp),
        row("hair_inpaint (cv2.inpaint TELEA)", t_repair, shapes=shp),
        {"name": "hair_total_median_ms", "median_ms": round(t_detect["median_ms"] + t_repair["median_ms"], 3)},
    ], params=settings, quality=quality)


# =============================================================================== dilated U-Net

def conv_relu_bn(cin, cout, dilation=1):
    """3x3 convolution (with bias, padding = dilation), then ReLU, then batch norm."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation),
                         nn.ReLU(inplace=True), nn.BatchNorm2d(cout))


class UNet(nn.Module):
    """Encoder 32/64/128/256 (two conv-ReLU-BN each, 2x2 max pooling), bottleneck of two dilated
    3x3 convolutions (dilation 2 then 4) at 512 channels, decoder of 2x2 stride-2 transposed
    convolutions, concatenation with the skip, two conv-ReLU-BN; 1x1 head to one logit.
    7,765,985 parameters."""

    def __init__(self, widths=(32, 64, 128, 256), middle=512, dilations=(2, 4)):
        super().__init__()
        self.down = nn.ModuleList()
        c = 3
        for w in widths:
            self.down.append(nn.Sequential(conv_relu_bn(c, w), conv_relu_bn(w, w)))
            c = w
        mid = []
        for d in dilations:
            mid.append(conv_relu_bn(c, middle, d))
            c = middle
        self.middle = nn.Sequential(*mid)
        self.lift = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in widths[::-1]:
            self.lift.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.up.append(nn.Sequential(conv_relu_bn(2 * w, w), conv_relu_bn(w, w)))
            c = w
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        kept = []
        for stage in self.down:
            x = stage(x)
            kept.append(x)
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for lift, stage, skip in zip(self.lift, self.up, kept[::-1]):
            x = stage(torch.cat([lift(x), skip], 1))
        return self.out(x)


def disc_batch(batch, size, gen):
    """Uniform noise images and one filled disc per image (centre in the middle half, radius
    0.1-0.3 of the size) as target."""
    x = torch.rand(batch, 3, size, size, generator=gen)
    cy = torch.rand(batch, generator=gen) * size * 0.5 + size * 0.25
    cx = torch.rand(batch, generator=gen) * size * 0.5 + size * 0.25
    rad = torch.rand(batch, generator=gen) * size * 0.2 + size * 0.1
    grid = torch.arange(size)
    d2 = (grid.view(1, -1, 1) - cy.view(-1, 1, 1)) ** 2 + (grid.view(1, 1, -1) - cx.view(-1, 1, 1)) ** 2
    y = (d2 < rad.view(-1, 1, 1) ** 2).float().unsqueeze(1)
    return x, y


def run_unet_train(o):
    rows = []
    for size in o.sizes:
        reseed(o.seed)
        gen = torch.Generator().manual_seed(o.seed)
        net = UNet().train()
        adam = torch.optim.Adam(net.parameters(), lr=1e-4)
        x, y = disc_batch(o.batch, size, gen)
        seen = []

        def step():
            adam.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(net(x), y)
            loss.backward()
            adam.step()
            seen.append(loss.item())

        t = measure(step, o.warmup, o.repeats)
        rows.append(row(f"unet_train_step b{o.batch} {size}x{size}", t,
                        shapes={"input": list(x.shape), "target": list(y.shape), "logits": list(y.shape)},
                        params=count_params(net), first_loss=round(seen[0], 5), last_loss=round(seen[-1], 5)))
    return report(o, "unet_train", rows, arch=UNet.__doc__.split("7,765")[0].strip() + " BCEWithLogits, Adam 1e-4")


def run_unet_infer(o):
    rows = []
    for size in o.sizes:
        reseed(o.seed)
        gen = torch.Generator().manual_seed(o.seed)
        net = UNet().eval()
        x, _ = disc_batch(o.batch, size, gen)

        def forward():
            with torch.inference_mode():
                return net(x)

        y = forward()
        t = measure(forward, o.warmup, o.repeats)
        rows.append(row(f"unet_infer b{o.batch} {size}x{size}", t,
                        shapes={"input": list(x.shape), "output": list(y.shape)}, params=count_params(net),
                        per_image_ms=round(t["median_ms"] / o.batch, 3)))
    return report(o, "unet_infer", rows)


# =============================================================================== partial convolutions

class PConv(nn.Module):
    """Partial convolution (Liu et al. 2018) with a per-channel mask (NVIDIA's multi_channel=True).

    out = (conv(x * m) - b) * (k*k*C_in / window_sum(m)) + b where the window holds any valid
    pixel, 0 elsewhere; the new mask is 1 where the window held any valid pixel.
    how='nvidia' sums the mask with a ones(C_out, C_in, k, k) convolution as the reference code does;
    how='fast' convolves the channel sum of the mask with ones(1, 1, k, k) (same numbers, cheaper)."""

    def __init__(self, cin, cout, k, stride, bias, how):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
        self.how = how
        self.cout = cout
        ones = torch.ones(cout, cin, k, k) if how == "nvidia" else torch.ones(1, 1, k, k)
        self.register_buffer("ones", ones, persistent=False)
        self.window = float(cin * k * k)

    def forward(self, x, m):
        with torch.no_grad():
            src = m if self.how == "nvidia" else m.sum(1, keepdim=True)
            counts = F.conv2d(src, self.ones, stride=self.conv.stride, padding=self.conv.padding)
            new_mask = counts.clamp(0, 1)
            scale = self.window / (counts + 1e-8) * new_mask
        out = self.conv(x * m)
        if self.conv.bias is not None:
            b = self.conv.bias.view(1, -1, 1, 1)
            out = ((out - b) * scale + b) * new_mask
        else:
            out = out * scale
        if self.how != "nvidia":
            new_mask = new_mask.expand(-1, self.cout, -1, -1)
        return out, new_mask


class PStage(nn.Module):
    def __init__(self, cin, cout, k, stride, norm, act, how):
        super().__init__()
        self.pconv = PConv(cin, cout, k, stride, bias=not norm, how=how)
        self.norm = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.act = {"relu": nn.ReLU(), "lrelu": nn.LeakyReLU(0.2), "none": nn.Identity()}[act]

    def forward(self, x, m):
        x, m = self.pconv(x, m)
        return self.act(self.norm(x)), m


class PConvNet(nn.Module):
    """Encoder: PConv kernels 7,5,5,3,3,... stride 2, widths 64,128,256,512,512,... (batch norm on
    all but the first, ReLU). Decoder: nearest 2x upsampling of features and mask, concatenation
    with the skip's features and mask, PConv 3x3 + BN + LeakyReLU(0.2); the last layer gives 3
    channels with bias and no BN/activation. 11,619,988 parameters at 5 levels."""

    WIDTHS = (64, 128, 256, 512, 512, 512, 512, 512)
    KERNELS = (7, 5, 5, 3, 3, 3, 3, 3)

    def __init__(self, levels, how):
        super().__init__()
        widths = self.WIDTHS[:levels]
        self.enc = nn.ModuleList()
        c = 3
        for i in range(levels):
            self.enc.append(PStage(c, widths[i], self.KERNELS[i], 2, i > 0, "relu", how))
            c = widths[i]
        skips = (3,) + widths[:-1]
        self.dec = nn.ModuleList()
        for i in range(levels - 1, -1, -1):
            last = i == 0
            out = 3 if last else widths[i - 1]
            self.dec.append(PStage(c + skips[i], out, 3, 1, not last, "none" if last else "lrelu", how))
            c = out

    def forward(self, x, m):
        feats, masks = [x], [m]
        for stage in self.enc:
            x, m = stage(x, m)
            feats.append(x)
            masks.append(m)
        x, m = feats.pop(), masks.pop()
        for stage in self.dec:
            x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), feats.pop()], 1)
            m = torch.cat([F.interpolate(m, scale_factor=2, mode="nearest"), masks.pop()], 1)
            x, m = stage(x, m)
        return x, m


def scribble_masks(batch, size, seed):
    """Irregular holes: 6-11 random walks of 2-5 thick line segments each; 1 = valid, 0 = hole.
    Returns (batch, 3, size, size) float32."""
    rng = np.random.default_rng(seed)
    out = np.empty((batch, size, size), np.float32)
    for b in range(batch):
        m = np.ones((size, size), np.float32)
        for _ in range(int(rng.integers(6, 12))):
            at = rng.integers(0, size, 2)
            for _ in range(int(rng.integers(2, 6))):
                to = np.clip(at + rng.integers(-size // 5, size // 5 + 1, 2), 0, size - 1)
                width = max(1, int(int(rng.integers(5, 20)) * size / 256))
                cv2.line(m, (int(at[0]), int(at[1])), (int(to[0]), int(to[1])), 0.0, width)
                at = to
        out[b] = m
    return np.repeat(out[:, None], 3, axis=1)


def total_variation(x):
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def run_pconv_train(o):
    rows = []
    for how in o.mask_impls:
        reseed(o.seed)
        net = PConvNet(o.levels, how).train()
        adam = torch.optim.Adam(net.parameters(), lr=2e-4)
        gen = torch.Generator().manual_seed(o.seed)
        truth = torch.rand(o.batch, 3, o.size, o.size, generator=gen)
        valid = torch.from_numpy(scribble_masks(o.batch, o.size, o.seed))
        holes = 1 - valid
        given = truth * valid
        seen = []

        def step():
            adam.zero_grad(set_to_none=True)
            pred, _ = net(given, valid)
            composite = valid * truth + holes * pred
            loss = (F.l1_loss(valid * pred, valid * truth) + 6.0 * F.l1_loss(holes * pred, holes * truth)
                    + 0.1 * total_variation(composite))
            loss.backward()
            adam.step()
            seen.append(loss.item())

        t = measure(step, o.warmup, o.repeats)
        rows.append(row(f"pconv_train_step b{o.batch} {o.size}x{o.size} L{o.levels} mask={how}", t,
                        shapes={"input": list(given.shape), "mask": list(valid.shape)},
                        hole_fraction=round(float(holes.mean()), 4), params=count_params(net),
                        first_loss=round(seen[0], 5), last_loss=round(seen[-1], 5)))
    return report(o, "pconv_train", rows,
                  arch="PConv U-Net (Liu et al. 2018), loss 1*L1 valid + 6*L1 hole + 0.1*TV(composite), Adam 2e-4")


# =============================================================================== DCGAN

def gan_init(module):
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def generator(nz, widths):
    """z (N, nz, 1, 1) -> ConvT 4x4 s1 p0 to 4x4, then ConvT 4x4 s2 p1 per width (BN + ReLU),
    last ConvT 4x4 s2 p1 to 3 channels + tanh; no biases."""
    parts = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
    for a, b in zip(widths, widths[1:]):
        parts += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
    parts += [nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*parts)


def discriminator(widths):
    """Conv 4x4 s2 p1 per width with LeakyReLU(0.2) (BN on all but the first), then Conv 4x4 s1 p0
    to one logit; no biases."""
    parts = [nn.Conv2d(3, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    for a, b in zip(widths, widths[1:]):
        parts += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)]
    parts += [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False), nn.Flatten(0)]
    return nn.Sequential(*parts)


def run_dcgan_train(o):
    nz = 100
    rows = []
    for res in o.resolutions:
        if res not in (64, 128):
            raise SystemExit("dcgan_train: --resolutions takes 64 and/or 128")
        reseed(o.seed)
        g_widths = (512, 256, 128, 64) if res == 64 else (o.top128, 512, 256, 128, 64)
        d_widths = g_widths[::-1]
        G, D = generator(nz, g_widths), discriminator(d_widths)
        G.apply(gan_init)
        D.apply(gan_init)
        G.train()
        D.train()
        opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        gen = torch.Generator().manual_seed(o.seed)
        real = torch.rand(o.batch, 3, res, res, generator=gen) * 2 - 1
        z = torch.randn(o.batch, nz, 1, 1, generator=gen)
        yes, no = torch.ones(o.batch), torch.zeros(o.batch)
        bce = F.binary_cross_entropy_with_logits
        seen = []

        def step():
            opt_d.zero_grad(set_to_none=True)
            fake = G(z)
            loss_d = bce(D(real), yes) + bce(D(fake.detach()), no)
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad(set_to_none=True)
            loss_g = bce(D(fake), yes)
            loss_g.backward()
            opt_g.step()
            seen.append((loss_d.item(), loss_g.item()))

        with torch.no_grad():
            out_shape = list(G(z[:2]).shape[1:])
        t = measure(step, o.warmup, o.repeats)
        rows.append(row(f"dcgan_joint_step b{o.batch} {res}x{res}", t,
                        shapes={"z": list(z.shape), "fake": [o.batch] + out_shape, "real": list(real.shape)},
                        G_channels=list(g_widths), D_channels=list(d_widths),
                        params_G=count_params(G), params_D=count_params(D),
                        first_lossD_lossG=[round(v, 5) for v in seen[0]]))
    return report(o, "dcgan_train", rows,
                  arch="DCGAN, BCEWithLogits, Adam 2e-4 betas (0.5, 0.999); D step on real + fake.detach(), "
                       "then G step on the same fake")


# =============================================================================== ResNet-50 and VisualBackProp

def resnet50_3():
    import torchvision
    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Linear(net.fc.in_features, 3)
    return net


def run_resnet50(o):
    import torchvision
    reseed(o.seed)
    net = resnet50_3()
    gen = torch.Generator().manual_seed(o.seed)
    x = torch.rand(o.batch, 3, o.size, o.size, generator=gen)
    y = torch.randint(0, 3, (o.batch,), generator=gen)

    net.eval()

    def infer():
        with torch.inference_mode():
            return net(x)

    logits = infer()
    t_inf = measure(infer, o.warmup, o.repeats)

    net.train()
    sgd = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    seen = []

    def step():
        sgd.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        sgd.step()
        seen.append(loss.item())

    t_step = measure(step, o.warmup, o.repeats)
    return report(o, "resnet50", [
        row(f"resnet50_infer b{o.batch} {o.size}x{o.size}", t_inf,
            shapes={"input": list(x.shape), "output": list(logits.shape)}, params=count_params(net),
            per_image_ms=round(t_inf["median_ms"] / o.batch, 3)),
        row(f"resnet50_train_step b{o.batch} {o.size}x{o.size} SGD m0.9", t_step,
            shapes={"input": list(x.shape), "labels": list(y.shape)}, first_loss=round(seen[0], 5)),
    ], torchvision=torchvision.__version__)


def vbp_from_stages(stages):
    """VisualBackProp (Bojarski et al.) from the stage outputs, shallowest first:
    relu(bn1(conv1)) 1/2, layer1 1/4, layer2 1/8, layer3 1/16, layer4 1/32.
    Average over channels; from the deepest, scale up with a 3x3 stride-2 transposed convolution of
    ones (padding 1, output padding 1) and multiply with the next shallower average, four times
    (the last one undoes the max pooling); then a 7x7 stride-2 transposed convolution of ones
    (padding 3, output padding 1) undoes conv1. Each image is scaled to [0, 1]."""
    avg = [s.mean(1, keepdim=True) for s in stages]
    ones3 = torch.ones(1, 1, 3, 3)
    ones7 = torch.ones(1, 1, 7, 7)
    m = avg[-1]
    for shallower in avg[-2::-1]:
        m = F.conv_transpose2d(m, ones3, stride=2, padding=1, output_padding=1) * shallower
    m = F.conv_transpose2d(m, ones7, stride=2, padding=3, output_padding=1)
    lo = m.amin(dim=(2, 3), keepdim=True)
    hi = m.amax(dim=(2, 3), keepdim=True)
    return (m - lo) / (hi - lo + 1e-12)


def run_vbp(o):
    reseed(o.seed)
    net = resnet50_3().eval()
    stages = []
    for part in (net.relu, net.layer1, net.layer2, net.layer3, net.layer4):
        part.register_forward_hook(lambda _m, _i, out: stages.append(out))
    gen = torch.Generator().manual_seed(o.seed)
    x = torch.rand(1, 3, o.size, o.size, generator=gen)

    def forward():
        stages.clear()
        with torch.no_grad():
            return net(x)

    def full():
        forward()
        with torch.no_grad():
            return vbp_from_stages(stages)

    mask = full()
    stage_shapes = [list(s.shape) for s in stages]
    t_full = measure(full, o.warmup, o.repeats)
    t_fwd = measure(forward, o.warmup, o.repeats)
    forward()
    cached = list(stages)

    def post():
        with torch.no_grad():
            return vbp_from_stages(cached)

    if not torch.allclose(post(), mask):
        raise SystemExit("vbp: post-processing on cached stages differs from the full run")
    t_post = measure(post, o.warmup, o.repeats)
    if o.dump:
        os.makedirs(o.dump, exist_ok=True)
        np.save(os.path.join(o.dump, "vbp_input.npy"), x.numpy())
        np.save(os.path.join(o.dump, "vbp_mask.npy"), mask.numpy())
        torch.save(net.state_dict(), os.path.join(o.dump, f"resnet50_3cls_seed{o.seed}.pt"))
    s = o.size
    return report(o, "vbp", [
        row(f"vbp_resnet50 1x3x{s}x{s} (forward + VBP)", t_full,
            shapes={"input": list(x.shape), "mask": list(mask.shape), "stage_feats": stage_shapes}),
        row("resnet50_forward_only b1 (for subtraction)", t_fwd, shapes={"input": list(x.shape)}),
        row("vbp_postprocess_only (channel means + ConvT-of-ones chain + normalise)", t_post,
            shapes={"mask": list(mask.shape)}),
    ], mask_stats={"mean": round(float(mask.mean()), 6), "std": round(float(mask.std()), 6),
                   "finite": bool(torch.isfinite(mask).all())})


# =============================================================================== metrics

_MASK64 = (1 << 64) - 1


def counter_u64(seed, stream, count):
    """Counter-based SplitMix64 (derm_core::rng::splitmix_counter): value i of a stream is the
    SplitMix64 finaliser of seed + stream*0xD1B54A32D192ED03 + (i+1)*0x9E3779B97F4A7C15, wrapping."""
    with np.errstate(over="ignore"):
        start = np.uint64((seed + stream * 0xD1B54A32D192ED03) & _MASK64)
        z = start + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def counter_bits(seed, stream, count):
    """Element j is bit j % 64 (least significant first) of value j // 64."""
    words = counter_u64(seed, stream, -(-count // 64))
    return np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")[:count].astype(bool)


def run_metrics(o):
    import sklearn
    from scipy.stats import rankdata
    from sklearn.metrics import jaccard_score, roc_auc_score

    n, s = o.n_masks, o.mask_size
    total = n * s * s
    a = counter_bits(o.seed, 1, total)
    b = a ^ (counter_bits(o.seed, 2, total) & counter_bits(o.seed, 3, total) & counter_bits(o.seed, 4, total))
    a = a.reshape(n, s, s)
    b = b.reshape(n, s, s)

    def global_iou():
        union = np.count_nonzero(a | b)
        return np.count_nonzero(a & b) / union if union else 1.0

    def per_image_iou():
        inter = (a & b).sum(axis=(1, 2), dtype=np.float64)
        union = (a | b).sum(axis=(1, 2), dtype=np.float64)
        return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)

    labels = (counter_u64(o.seed, 10, o.n_scores) >> np.uint64(63)).astype(np.int64)
    scores = (counter_u64(o.seed, 11, o.n_scores) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 + 0.35 * labels
    tied = np.round(scores * 20.0) / 20.0

    def mann_whitney(sc, y):
        ranks = rankdata(sc)
        pos = int(y.sum())
        neg = len(y) - pos
        return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))

    if o.dump:
        os.makedirs(o.dump, exist_ok=True)
        for name, arr in (("masks_a", a.astype(np.uint8)), ("masks_b", b.astype(np.uint8)),
                          ("auc_labels", labels), ("auc_scores", scores), ("auc_scores_tied", tied)):
            np.save(os.path.join(o.dump, name + ".npy"), arr)
    per = per_image_iou()
    first10 = float(np.count_nonzero(a[:10] & b[:10])) / float(np.count_nonzero(a[:10] | b[:10]))
    values = {
        "jaccard_global": float(global_iou()),
        "jaccard_per_image_mean": float(per.mean()),
        "jaccard_per_image_first3": [float(v) for v in per[:3]],
        "jaccard_first10_global_numpy": first10,
        "jaccard_first10_sklearn": float(jaccard_score(a[:10].ravel(), b[:10].ravel())),
        "mask_a_foreground_fraction": float(a.mean()),
        "mask_b_foreground_fraction": float(b.mean()),
        "auc_sklearn": float(roc_auc_score(labels, scores)),
        "auc_mann_whitney": mann_whitney(scores, labels),
        "auc_tied_sklearn": float(roc_auc_score(labels, tied)),
        "auc_tied_mann_whitney": mann_whitney(tied, labels),
        "n_pos": int(labels.sum()),
        "first_u64_seed_stream1_hex": [hex(int(v)) for v in counter_u64(o.seed, 1, 3)],
        "first_scores": [float(v) for v in scores[:3]],
    }
    t_g = measure(global_iou, o.warmup, o.repeats)
    t_p = measure(per_image_iou, o.warmup, o.repeats)
    t_auc = measure(lambda: roc_auc_score(labels, scores), o.warmup, o.repeats)
    return report(o, "metrics", [
        row(f"jaccard_global {n}x{s}x{s}", t_g, shapes={"masks": [n, s, s]}),
        row(f"jaccard_per_image {n}x{s}x{s}", t_p, shapes={"masks": [n, s, s]}),
        row(f"roc_auc_sklearn n={o.n_scores}", t_auc, shapes={"scores": [o.n_scores]}),
    ], values=values, sklearn=sklearn.__version__,
        generator="counter SplitMix64 (see counter_u64); A = bits(stream 1), B = A xor (bits 2 & bits 3 & bits 4); "
                  "label = u64(stream 10) >> 63; score = (u64(stream 11) >> 11) * 2^-53 + 0.35 * label; "
                  "tied = round(score * 20) / 20")


# =============================================================================== command line

def _ints(text):
    return [int(v) for v in text.split(",") if v]


def _words(text):
    return [v for v in text.split(",") if v]


RUNNERS = {
    "hair": run_hair,
    "unet_train": run_unet_train,
    "unet_infer": run_unet_infer,
    "pconv_train": run_pconv_train,
    "dcgan_train": run_dcgan_train,
    "resnet50": run_resnet50,
    "vbp": run_vbp,
    "metrics": run_metrics,
}


def parser():
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = top.add_subparsers(dest="cmd", required=True)

    def add(name, repeats, warmup, help_text=None):
        sp = subs.add_parser(name, help=help_text)
        sp.add_argument("--repeats", type=int, default=repeats, help="timed calls")
        sp.add_argument("--warmup", type=int, default=warmup, help="untimed calls first")
        sp.add_argument("--threads", type=int, default=2,
                        help="torch intra- and inter-op threads and OpenCV threads")
        sp.add_argument("--seed", type=int, default=0)
        return sp

    sp = add("hair", 20, 3)
    sp.add_argument("--size", type=int, default=512)
    sp.add_argument("--n-hairs", type=int, default=30)
    sp.add_argument("--kernel", choices=["cross", "lines"], default="cross",
                    help="cross: one cross element; lines: max over 4 line orientations")
    sp.add_argument("--ksize", type=int, default=17)
    sp.add_argument("--thresh", type=int, default=10)
    sp.add_argument("--dilate", type=int, default=3, help="elliptic dilation element size")
    sp.add_argument("--dilate-iter", type=int, default=1)
    sp.add_argument("--radius", type=int, default=5, help="TELEA inpainting radius")
    sp.add_argument("--save", default=None, help="folder for the PNGs")

    sp = add("unet_train", 5, 1)
    sp.add_argument("--batch", type=int, default=8)
    sp.add_argument("--sizes", type=_ints, default=[128, 256])

    sp = add("unet_infer", 5, 1)
    sp.add_argument("--batch", type=int, default=8)
    sp.add_argument("--sizes", type=_ints, default=[256])

    sp = add("pconv_train", 5, 1)
    sp.add_argument("--batch", type=int, default=4)
    sp.add_argument("--size", type=int, default=256)
    sp.add_argument("--levels", type=int, default=5)
    sp.add_argument("--mask-impls", type=_words, default=["nvidia", "fast"])

    sp = add("dcgan_train", 5, 1)
    sp.add_argument("--batch", type=int, default=64)
    sp.add_argument("--resolutions", type=_ints, default=[64, 128])
    sp.add_argument("--top128", type=int, default=1024, help="generator width at 4x4 for the 128 px model")

    sp = add("resnet50", 5, 1)
    sp.add_argument("--batch", type=int, default=8)
    sp.add_argument("--size", type=int, default=224)

    sp = add("vbp", 10, 2)
    sp.add_argument("--size", type=int, default=224)
    sp.add_argument("--dump", default=None, help="folder: input and mask (.npy), state_dict (.pt)")

    sp = add("metrics", 5, 1)
    sp.add_argument("--n-masks", type=int, default=1000)
    sp.add_argument("--mask-size", type=int, default=256)
    sp.add_argument("--n-scores", type=int, default=10000)
    sp.add_argument("--dump", default=None, help="folder: masks, labels and scores (.npy)")

    add("all", 3, 1, "every subcommand with its default shapes")
    return top


def set_threads(n):
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only allowed before any parallel work
        pass
    cv2.setNumThreads(n)


def main(argv=None):
    top = parser()
    o = top.parse_args(argv)
    set_threads(o.threads)
    if o.cmd != "all":
        RUNNERS[o.cmd](o)
        return
    for name, runner in RUNNERS.items():
        STATE["load_at_start"] = _loadavg()
        runner(top.parse_args([name, "--repeats", str(o.repeats), "--warmup", str(o.warmup),
                               "--threads", str(o.threads), "--seed", str(o.seed)]))


if __name__ == "__main__":
    main()
