#!/usr/bin/env python3
"""Writes torchvision models with random (seeded) weights and their reference outputs as
safetensors, so that derm's Rust models can be checked against torchvision without downloads.

    python export_torchvision.py OUT_DIR [--models resnet18,resnet50,vgg16] [--seed 0] [--dtype f32]

For each model NAME, two files in OUT_DIR:

  NAME.safetensors     the state_dict exactly as torchvision names it (conv1.weight, bn1.running_var,
                       layer1.0.bn1.num_batches_tracked (int64), fc.weight, features.0.weight, ...).
                       Batch-norm weight, bias, running_mean and running_var are randomised so that
                       eval-mode batch norm is not the identity (statistics measured on a random batch,
                       then perturbed); num_batches_tracked is kept (int64, value 1).
                       For vgg16 only `features.N.weight/bias` are written (59 MB; derm ignores the
                       classifier) unless --vgg-full.
  NAME_io.safetensors  `input` (float32 NCHW, standard normal) and the eval-mode outputs:
                         resnetXX: input (2, 3, 64, 64); `logits` (2, 1000), `stem`
                           (relu(bn1(conv1)), before the max pooling) and `layer1` .. `layer4`;
                         vgg16: input (1, 3, 64, 64); `relu1_2`, `relu2_2`, `relu3_3`, `relu4_3`
                           (features.3, .8, .15, .22: the layers perceptual/style losses use) and
                           `pool1` .. `pool5` (features.4, .9, .16, .23, .30: what derm's
                           Vgg16Features::forward returns per block).

A JSON line on stdout lists the files, tensor counts and sizes. No weights are downloaded
(weights=None); torch.manual_seed(seed) fixes everything. resnet50 is about 100 MB in f32:
`--models resnet18` keeps a test small.

--pretrained: torchvision's ImageNet weights instead (weights="DEFAULT": resnet18 IMAGENET1K_V1,
resnet50 IMAGENET1K_V2, vgg16 IMAGENET1K_V1), downloaded by torchvision on first use (needs the
internet once; cached in ~/.cache/torch), batch norm left as trained. The files are the same
two per model, so derm's equivalence tests run on the real weights too. What a user runs:

    python bench/peer/export_torchvision.py weights --pretrained --models resnet50,vgg16
    derm classify train --pretrained weights/resnet50.safetensors ...
"""
import argparse
import json
import os

import torch
import torchvision
from safetensors.torch import save_file

RESNET_INPUT = (2, 3, 64, 64)
VGG_INPUT = (1, 3, 64, 64)
# torchvision vgg16().features indices: the ReLU after the last conv of blocks 1-4, and the 5 pools.
VGG_RELU = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}
VGG_POOL = {"pool1": 4, "pool2": 9, "pool3": 16, "pool4": 23, "pool5": 30}


def randomise_batch_norm(model, gen, probe_shape):
    """Gives every BatchNorm2d non-trivial parameters and running statistics of a sensible scale:
    weight in 0.5..1.5 and bias ~ 0.1 N(0, 1); the running statistics are first measured on a
    random batch (one training-mode forward pass, cumulative average), then shifted by 0.1 standard
    deviations (random sign and size) and the variance scaled by 0.5..1.5. Without the
    measurement, eval-mode activations of a deep network drift to the hundreds."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms:
        return
    with torch.no_grad():
        for m in norms:
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=gen))
            m.bias.copy_(0.1 * torch.randn(c, generator=gen))
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the one batch's statistics
        model.train()
        model(torch.randn(*probe_shape, generator=gen))
        for m in norms:
            c = m.num_features
            m.running_mean.add_(0.1 * torch.randn(c, generator=gen) * m.running_var.sqrt())
            m.running_var.mul_(0.5 + torch.rand(c, generator=gen))
            m.momentum = 0.1
    model.eval()


def resnet_outputs(model, x):
    """Eval-mode forward keeping each stage (torchvision's own forward for the logits)."""
    out = {}
    h = model.relu(model.bn1(model.conv1(x)))
    out["stem"] = h
    h = model.maxpool(h)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        h = getattr(model, name)(h)
        out[name] = h
    out["logits"] = model(x)
    if not torch.allclose(out["logits"], model.fc(torch.flatten(model.avgpool(h), 1)), atol=1e-5):
        raise SystemExit("resnet: stage-by-stage forward disagrees with model(x)")
    return out


def vgg_outputs(model, x):
    wanted = {i: n for n, i in {**VGG_RELU, **VGG_POOL}.items()}
    out = {}
    h = x
    for i, layer in enumerate(model.features):
        h = layer(h)
        if i in wanted:
            out[wanted[i]] = h
    return out


def export(name, out_dir, seed, dtype, vgg_full, pretrained=False):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = "DEFAULT" if pretrained else None
    model = getattr(torchvision.models, name)(weights=weights)
    shape = VGG_INPUT if name.startswith("vgg") else RESNET_INPUT
    if pretrained:
        weights = str(torchvision.models.get_model_weights(name).DEFAULT)
    else:
        randomise_batch_norm(model, gen, (4,) + shape[1:])
    model.eval()
    # The in-place ReLUs of torchvision would overwrite the features we keep: turn them off.
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    x = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        io = vgg_outputs(model, x) if name.startswith("vgg") else resnet_outputs(model, x)
    io = {"input": x, **io}

    def cast(t):
        return t.to(dtype) if t.is_floating_point() else t

    state = {k: cast(v).contiguous() for k, v in model.state_dict().items()
             if vgg_full or not (name.startswith("vgg") and k.startswith("classifier."))}
    io = {k: cast(v).contiguous() for k, v in io.items()}
    meta = {"source": f"torchvision {torchvision.__version__} {name}(weights={weights})", "seed": str(seed),
            "torch": torch.__version__}
    w_path = os.path.join(out_dir, f"{name}.safetensors")
    io_path = os.path.join(out_dir, f"{name}_io.safetensors")
    save_file(state, w_path, metadata=meta)
    save_file(io, io_path, metadata={**meta, "mode": "eval", "input_layout": "NCHW"})
    return {
        "model": name,
        "weights": w_path,
        "io": io_path,
        "weights_source": str(weights),
        "tensors": len(state),
        "num_batches_tracked": sum(k.endswith("num_batches_tracked") for k in state),
        "params_in_file": int(sum(v.numel() for k, v in state.items()
                                  if "running_" not in k and not k.endswith("num_batches_tracked"))),
        "weights_bytes": os.path.getsize(w_path),
        "io_shapes": {k: list(v.shape) for k, v in io.items()},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="folder for the .safetensors files (created if missing)")
    ap.add_argument("--models", default="resnet18,resnet50,vgg16",
                    help="comma-separated: resnet18, resnet34, resnet50, resnet101, vgg16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32",
                    help="float type of weights and outputs (outputs are computed in f32 either way)")
    ap.add_argument("--vgg-full", action="store_true",
                    help="also write VGG's classifier (120 M parameters, +490 MB); by default only features.*")
    ap.add_argument("--pretrained", action="store_true",
                    help='torchvision\'s ImageNet weights (weights="DEFAULT", downloaded once) instead of random ones')
    ap.add_argument("--threads", type=int, default=2)
    o = ap.parse_args()
    torch.set_num_threads(o.threads)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[o.dtype]
    os.makedirs(o.out_dir, exist_ok=True)
    done = [export(n.strip(), o.out_dir, o.seed, dtype, o.vgg_full, o.pretrained)
            for n in o.models.split(",") if n.strip()]
    print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "seed": o.seed,
                      "pretrained": o.pretrained,
                      "dtype": o.dtype, "models": done}), flush=True)


if __name__ == "__main__":
    main()
