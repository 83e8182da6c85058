#!/usr/bin/env python3
"""The PyTorch training a typical user would write, on the same ISIC 2017 data, the same
train/validation ids and the same scores as derm, for a fixed budget of CPU minutes.

    # 1. write split files once (both frameworks then read the same ids)
    python reference_train.py --make-split SPLITDIR [--data DIR] [--val-fraction 0.2] [--seed 0]
    # 2. train and score
    python reference_train.py seg --train-ids SPLITDIR/shift_train.txt --val-ids SPLITDIR/shift_val.txt \\
        --minutes 30 --threads 2
    python reference_train.py cls --arch resnet18 --size 128 --train-ids ... --val-ids ... --minutes 30

Tasks:
  seg  plain U-Net (Ronneberger et al.: two conv3x3-BN-ReLU per level, 2x2 max pooling, 2x2
       transposed convolutions, widths 32..512), BCEWithLogits, Adam lr 1e-4, batch 8, input
       --size px (128) normalised to [-1, 1], random horizontal/vertical flips.
       Score on the validation ids: the sigmoid is resized (bilinear) to the ground-truth mask's
       own size (256 here), thresholded at 0.5; per-image Jaccard averaged over the images
       (`jaccard_mean`; two empty masks count 1.0), ISIC 2018's thresholded Jaccard (an image
       below 0.65 counts 0; `jaccard_thresholded`), global Jaccard and mean Dice.
  cls  torchvision resnet18 or resnet50 (weights=None: from scratch), fc replaced by 3 outputs
       (melanoma, seborrheic_keratosis, nevus: derm's class order), cross-entropy, Adam lr 1e-4,
       batch 16, ImageNet normalisation; images resized to round(size*8/7), random size x size crop
       and horizontal/vertical flips for training, centre crop for scoring. Scores: ROC AUC of
       each class one-vs-rest, `mean_auc` over melanoma and seborrheic keratosis (ISIC 2017's
       score, as derm's ClassificationReport::mean_auc), `mean_auc_all` over the three,
       balanced accuracy (mean per-class recall of the arg-max over the classes present) and
       accuracy.

Split files: one image id per line (ISIC_0000000); blank lines and lines starting with '#' are
skipped; a CSV whose first line names an `image_id` or `id` column also works (that column).
--make-split writes, for N labelled images and fraction f (default 0.2):
  shift_{train,val}.txt      the round(f*N) highest ISIC id numbers held out: ISIC ids are
                             consecutive and archive collections come in id blocks, so this is
                             a collection / acquisition shift split;
  random_{train,val}.txt     a seeded uniform random round(f*N) held out (numpy default_rng(seed));
  dermhash_{train,val}.txt   derm's own Dataset::split_by_id(f, seed) (FNV-1a of the id mixed with
                             SplitMix64; about f*N held out), so the default derm split can be
                             reproduced without running derm.

Output: one JSON line on stdout (progress goes to stderr): task, arch, metrics, epochs (images
seen / training images), images_seen, steps, train_seconds, eval_seconds, and the settings.
"""
import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np

CLASSES = ["melanoma", "seborrheic_keratosis", "nevus"]
DEFAULT_DATA = None  # --data is required: an ISIC 2017 training folder
IMAGES = "ISIC-2017_Training_Data"
MASKS = "ISIC-2017_Training_Part1_GroundTruth"
LABELS = "ISIC-2017_Training_Part3_GroundTruth.csv"


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


# =============================================================================== data and splits

def read_labels(data):
    """{image id: class index} from the Part 3 CSV (one-hot melanoma / seborrheic_keratosis, else nevus)."""
    out = {}
    with open(os.path.join(data, LABELS), newline="") as f:
        for rec in csv.DictReader(f):
            if float(rec["melanoma"]) >= 0.5:
                out[rec["image_id"]] = 0
            elif float(rec["seborrheic_keratosis"]) >= 0.5:
                out[rec["image_id"]] = 1
            else:
                out[rec["image_id"]] = 2
    return out


def read_ids(path):
    with open(path, newline="") as f:
        lines = [ln.strip() for ln in f]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if lines and "," in lines[0]:
        head = [h.strip() for h in lines[0].split(",")]
        col = head.index("image_id") if "image_id" in head else head.index("id") if "id" in head else None
        if col is not None:
            return [ln.split(",")[col].strip() for ln in lines[1:]]
        return [ln.split(",")[0].strip() for ln in lines]
    return lines


def id_number(image_id):
    return int("".join(ch for ch in image_id if ch.isdigit()))


_M64 = (1 << 64) - 1


def _splitmix_mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def derm_id_unit(image_id, seed):
    """derm_data::dataset::id_unit: a number in [0, 1) from an id and a seed."""
    h = 0xCBF29CE484222325
    for byte in image_id.encode():
        h = ((h ^ byte) * 0x100000001B3) & _M64
    return (_splitmix_mix(h ^ _splitmix_mix(seed & _M64)) >> 11) / float(1 << 53)


def make_split(o):
    labels = read_labels(o.data)
    have = {fn[:-4] for fn in os.listdir(os.path.join(o.data, IMAGES)) if fn.endswith(".jpg")}
    ids = sorted((i for i in labels if i in have), key=id_number)
    n_val = int(round(o.val_fraction * len(ids)))
    rng = np.random.default_rng(o.seed)
    picked = set(ids[i] for i in rng.permutation(len(ids))[:n_val])
    rules = {
        "shift": set(ids[len(ids) - n_val:]),
        "random": picked,
        "dermhash": {i for i in ids if derm_id_unit(i, o.seed) < o.val_fraction},
    }
    os.makedirs(o.make_split, exist_ok=True)
    summary = {"data": o.data, "images": len(ids), "val_fraction": o.val_fraction, "seed": o.seed, "splits": {}}
    for rule, val in rules.items():
        train = [i for i in ids if i not in val]
        held = [i for i in ids if i in val]
        note = {"shift": f"# hold-out: the {len(held)} highest ISIC id numbers (from {held[0] if held else '-'})",
                "random": f"# hold-out: uniform random {len(held)} ids, numpy default_rng({o.seed})",
                "dermhash": f"# hold-out: derm split_by_id({o.val_fraction}, seed {o.seed})"}[rule]
        for part, chosen in (("train", train), ("val", held)):
            with open(os.path.join(o.make_split, f"{rule}_{part}.txt"), "w") as f:
                f.write(f"{note}; {part}: {len(chosen)} images\n")
                f.write("\n".join(chosen) + "\n")
        counts = lambda xs: {c: sum(labels[i] == k for i in xs) for k, c in enumerate(CLASSES)}
        summary["splits"][rule] = {"train": len(train), "val": len(held), "train_classes": counts(train),
                                   "val_classes": counts(held),
                                   "val_id_range": [held[0], held[-1]] if held else None}
    print(json.dumps(summary), flush=True)


def load_images(data, ids, size, with_masks):
    """uint8 arrays: images (N, size, size, 3) RGB resized with area averaging; masks (N, H, W) at
    their own size (0/1)."""
    import cv2
    imgs = np.empty((len(ids), size, size, 3), np.uint8)
    masks = []
    for k, i in enumerate(ids):
        bgr = cv2.imread(os.path.join(data, IMAGES, i + ".jpg"), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"cannot read image {i}")
        if bgr.shape[:2] != (size, size):
            bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
        imgs[k] = bgr[:, :, ::-1]
        if with_masks:
            m = cv2.imread(os.path.join(data, MASKS, i + "_segmentation.png"), cv2.IMREAD_GRAYSCALE)
            if m is None:
                raise SystemExit(f"cannot read the mask of {i}")
            masks.append((m > 127).astype(np.uint8))
    return imgs, masks


def resize_masks(masks, size):
    import cv2
    out = np.empty((len(masks), size, size), np.float32)
    for k, m in enumerate(masks):
        out[k] = cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) >= 0.5
    return out


# =============================================================================== models

def build_unet(base=32, depth=4):
    import torch
    import torch.nn as nn

    def double(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [base * 2 ** i for i in range(depth + 1)]
            self.downs = nn.ModuleList([double(3, widths[0])] +
                                       [double(widths[i], widths[i + 1]) for i in range(depth)])
            self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                     for i in reversed(range(depth)))
            self.merges = nn.ModuleList(double(2 * widths[i], widths[i]) for i in reversed(range(depth)))
            self.head = nn.Conv2d(widths[0], 1, 1)

        def forward(self, x):
            skips = []
            for k, down in enumerate(self.downs):
                if k:
                    x = torch.nn.functional.max_pool2d(x, 2)
                x = down(x)
                skips.append(x)
            skips.pop()
            for up, merge in zip(self.ups, self.merges):
                x = merge(torch.cat([up(x), skips.pop()], 1))
            return self.head(x)

    return UNet()


# =============================================================================== scores

def jaccard_scores(preds, truths):
    ious, dices = [], []
    inter_all = union_all = 0
    for p, t in zip(preds, truths):
        p = p.astype(bool)
        t = t.astype(bool)
        inter = int(np.count_nonzero(p & t))
        union = int(np.count_nonzero(p | t))
        total = int(p.sum() + t.sum())
        ious.append(inter / union if union else 1.0)
        dices.append(2 * inter / total if total else 1.0)
        inter_all += inter
        union_all += union
    ious = np.array(ious)
    return {
        "images": len(ious),
        "jaccard_mean": float(ious.mean()),
        "jaccard_thresholded": float(np.where(ious < 0.65, 0.0, ious).mean()),
        "jaccard_global": inter_all / union_all if union_all else 1.0,
        "dice_mean": float(np.mean(dices)),
    }


def classification_scores(probs, labels):
    from sklearn.metrics import roc_auc_score
    labels = np.asarray(labels)
    auc = []
    for c in range(len(CLASSES)):
        y = labels == c
        auc.append(float(roc_auc_score(y, probs[:, c])) if 0 < y.sum() < len(y) else None)
    pred = probs.argmax(1)
    recalls = [float(np.mean(pred[labels == c] == c)) for c in range(len(CLASSES)) if (labels == c).any()]
    two = [a for a in auc[:2] if a is not None]
    every = [a for a in auc if a is not None]
    return {
        "images": int(len(labels)),
        "class_counts": [int((labels == c).sum()) for c in range(len(CLASSES))],
        "auc": dict(zip(CLASSES, auc)),
        "mean_auc": float(np.mean(two)) if two else None,
        "mean_auc_all": float(np.mean(every)) if every else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
        "accuracy": float(np.mean(pred == labels)),
    }


# =============================================================================== training

class Clock:
    """Counts training time only (scoring is outside the budget)."""

    def __init__(self, minutes):
        self.budget = 60.0 * minutes
        self.used = 0.0
        self._start = None

    def start(self):
        self._start = time.perf_counter()

    def stop(self):
        self.used += time.perf_counter() - self._start

    def left(self):
        return self.used + (time.perf_counter() - self._start) < self.budget


def random_flips(x, gen):
    import torch
    n = x.shape[0]
    h = torch.rand(n, generator=gen) < 0.5
    v = torch.rand(n, generator=gen) < 0.5
    x = x.clone()
    x[h] = x[h].flip(-1)
    x[v] = x[v].flip(-2)
    return x


def train_seg(o, train_ids, val_ids):
    import torch
    import torch.nn.functional as F
    imgs, masks = load_images(o.data, train_ids, o.size, True)
    x_all = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(resize_masks(masks, o.size)).unsqueeze(1)
    vimgs, vmasks = load_images(o.data, val_ids, o.size, True)
    log(f"seg: {len(train_ids)} train, {len(val_ids)} val images at {o.size}px")

    net = build_unet(o.width)
    opt = torch.optim.Adam(net.parameters(), lr=o.lr)
    gen = torch.Generator().manual_seed(o.seed)
    clock = Clock(o.minutes)
    seen = steps = 0
    n = len(train_ids)
    net.train()
    clock.start()
    while clock.left():
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, o.batch):
            idx = order[s:s + o.batch]
            both = torch.cat([x_all[idx].float() / 127.5 - 1.0, y_all[idx]], 1)
            both = random_flips(both, gen)
            x, y = both[:, :3], both[:, 3:]
            loss = F.binary_cross_entropy_with_logits(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            steps += 1
            if steps % 20 == 0:
                log(f"  step {steps} images {seen} loss {loss.item():.4f} {clock.used + time.perf_counter() - clock._start:.0f}s")
            if not clock.left():
                break
    clock.stop()

    t0 = time.perf_counter()
    net.eval()
    preds = []
    with torch.inference_mode():
        for s in range(0, len(val_ids), o.batch):
            x = torch.from_numpy(vimgs[s:s + o.batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            prob = torch.sigmoid(net(x))
            for k in range(prob.shape[0]):
                h, w = vmasks[s + k].shape
                p = F.interpolate(prob[k:k + 1], size=(h, w), mode="bilinear", align_corners=False)
                preds.append((p[0, 0] >= o.threshold).numpy())
    scores = jaccard_scores(preds, vmasks)
    return scores, {"epochs": seen / n, "images_seen": seen, "steps": steps, "train_seconds": clock.used,
                    "eval_seconds": time.perf_counter() - t0,
                    "params": int(sum(p.numel() for p in net.parameters())),
                    "arch": f"unet base {o.width} depth 4 (conv-BN-ReLU x2)"}


def train_cls(o, train_ids, val_ids):
    import torch
    import torch.nn.functional as F
    import torchvision
    labels = read_labels(o.data)
    pre = int(round(o.size * 8 / 7))
    imgs, _ = load_images(o.data, train_ids, pre, False)
    vimgs, _ = load_images(o.data, val_ids, pre, False)
    x_all = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    y_all = torch.tensor([labels[i] for i in train_ids])
    y_val = [labels[i] for i in val_ids]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    log(f"cls: {len(train_ids)} train, {len(val_ids)} val images, resized {pre}, crop {o.size}")

    net = getattr(torchvision.models, o.arch)(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, len(CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=o.lr)
    gen = torch.Generator().manual_seed(o.seed)
    clock = Clock(o.minutes)
    seen = steps = 0
    n = len(train_ids)
    net.train()
    clock.start()
    while clock.left():
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, o.batch):
            idx = order[s:s + o.batch]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            tops = torch.randint(0, pre - o.size + 1, (len(idx),), generator=gen)
            lefts = torch.randint(0, pre - o.size + 1, (len(idx),), generator=gen)
            x = torch.stack([x_all[i, :, t:t + o.size, l:l + o.size] for i, t, l in zip(idx, tops, lefts)])
            x = random_flips((x.float() - mean) / std, gen)
            loss = F.cross_entropy(net(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            steps += 1
            if steps % 20 == 0:
                log(f"  step {steps} images {seen} loss {loss.item():.4f} {clock.used + time.perf_counter() - clock._start:.0f}s")
            if not clock.left():
                break
    clock.stop()

    t0 = time.perf_counter()
    net.eval()
    off = (pre - o.size) // 2
    probs = []
    with torch.inference_mode():
        for s in range(0, len(val_ids), o.batch):
            x = torch.from_numpy(vimgs[s:s + o.batch, off:off + o.size, off:off + o.size]).permute(0, 3, 1, 2)
            probs.append(torch.softmax(net((x.float() - mean) / std), 1).double().numpy())
    scores = classification_scores(np.concatenate(probs), y_val)
    return scores, {"epochs": seen / n, "images_seen": seen, "steps": steps, "train_seconds": clock.used,
                    "eval_seconds": time.perf_counter() - t0,
                    "params": int(sum(p.numel() for p in net.parameters())), "arch": o.arch}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", nargs="?", choices=["seg", "cls"])
    ap.add_argument("--data", required=True, help="ISIC 2017 training layout (see its README.md)")
    ap.add_argument("--make-split", metavar="DIR", help="write the split files into DIR and exit")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="for --make-split")
    ap.add_argument("--train-ids", help="file of training image ids")
    ap.add_argument("--val-ids", help="file of validation image ids")
    ap.add_argument("--limit-train", type=int, default=0, help="use only the first N training ids (smoke tests)")
    ap.add_argument("--limit-val", type=int, default=0, help="use only the first N validation ids")
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget (scoring not counted)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="input px (seg default 128, cls default 224)")
    ap.add_argument("--batch", type=int, default=None, help="seg default 8, cls default 16")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--width", type=int, default=32, help="seg: U-Net width of the first level")
    ap.add_argument("--threshold", type=float, default=0.5, help="seg: probability threshold of the mask")
    ap.add_argument("--arch", choices=["resnet18", "resnet50"], default="resnet18", help="cls network")
    o = ap.parse_args()

    if o.make_split:
        make_split(o)
        return
    if not (o.task and o.train_ids and o.val_ids):
        ap.error("give a task (seg or cls) with --train-ids and --val-ids, or --make-split DIR")
    import torch
    torch.set_num_threads(o.threads)
    torch.manual_seed(o.seed)
    np.random.seed(o.seed)
    o.size = o.size or (128 if o.task == "seg" else 224)
    o.batch = o.batch or (8 if o.task == "seg" else 16)
    train_ids, val_ids = read_ids(o.train_ids), read_ids(o.val_ids)
    if set(train_ids) & set(val_ids):
        raise SystemExit("the training and validation ids overlap")
    if o.limit_train:
        train_ids = train_ids[:o.limit_train]
    if o.limit_val:
        val_ids = val_ids[:o.limit_val]
    run = train_seg if o.task == "seg" else train_cls
    metrics, info = run(o, train_ids, val_ids)
    out = {"task": o.task, "framework": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "metrics": metrics, **info,
           "settings": {"size": o.size, "batch": o.batch, "lr": o.lr, "optimizer": "adam", "minutes": o.minutes,
                        "seed": o.seed, "train_ids": o.train_ids, "val_ids": o.val_ids,
                        "train_images": len(train_ids), "val_images": len(val_ids), "data": o.data}}
    for k in ("train_seconds", "eval_seconds", "epochs"):
        out[k] = round(out[k], 4)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
