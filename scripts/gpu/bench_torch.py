#!/usr/bin/env python3
"""The training step of `leuknet-train gpu bench` in PyTorch eager, for the throughput comparison.

Same network (VGG-16 conv base, Caffe input normalisation in the graph, head 25088-1024-256-1
with dropout 0.5 / 0.6), same loss (BCE with logits), same optimiser (SGD lr 0.001, momentum
0.8), same batch, random inputs on the device, and the loss read back every step as the Rust
training loop does. Variants: fp32 (PyTorch's defaults: TF32 convolutions through cuDNN, as
libtorch has them), bf16 autocast, bf16 autocast + channels_last. Prints one JSON object.

Usage: python3 bench_torch.py [--device cuda] [--batch 32] [--steps 20] [--warmup 5] [--width-div 1]
"""
import argparse
import json
import sys
import time

try:
    import torch
    import torch.nn as nn
except ImportError as e:  # the CPU test machine may have no PyTorch
    print(json.dumps({"skipped": f"no torch: {e}"}))
    sys.exit(0)

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class LeukNet(nn.Module):
    def __init__(self, width_div: int):
        super().__init__()
        layers, c = [], 3
        for v in CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                o = max(1, v // width_div)
                layers += [nn.Conv2d(c, o, 3, padding=1), nn.ReLU(inplace=True)]
                c = o
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * 7 * 7, 1024), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(1024, 256), nn.ReLU(inplace=True), nn.Dropout(0.6),
            nn.Linear(256, 1),
        )
        self.register_buffer("mean", torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1))

    def forward(self, x):
        x = x.flip(1) * 255.0 - self.mean  # RGB [0,1] -> Caffe BGR 0-255 minus mean
        return self.head(self.features(x)).view(-1)


def run(device, batch, steps, warmup, width_div, autocast, channels_last):
    torch.manual_seed(1)
    model = LeukNet(width_div).to(device)
    x = torch.rand(batch, 3, 224, 224, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.rand(batch, device=device).round()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.8)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    ms = (time.perf_counter() - t) * 1000.0 / steps
    return {"step_ms": ms, "images_per_s": batch * 1000.0 / ms}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--width-div", type=int, default=1)
    ap.add_argument("--variants", default="fp32,bf16_autocast,bf16_autocast_channels_last",
                    help="comma-separated subset of fp32, bf16_autocast, bf16_autocast_channels_last")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = default)")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    out = {
        "torch": torch.__version__,
        "device": a.device,
        "device_name": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
        "batch": a.batch,
        "steps": a.steps,
        "width_div": a.width_div,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    variants = {"fp32": (False, False), "bf16_autocast": (True, False),
                "bf16_autocast_channels_last": (True, True)}
    out["threads"] = torch.get_num_threads()
    wanted = set(a.variants.split(","))
    for name, (ac, cl) in variants.items():
        if name not in wanted:
            continue
        try:
            out[name] = run(a.device, a.batch, a.steps, a.warmup, a.width_div, ac, cl)
        except Exception as e:  # report, keep the other variants
            out[name] = {"error": str(e)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
