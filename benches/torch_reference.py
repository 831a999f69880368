"""PyTorch reference for `mp bench speed`: the same computations as the Rust engine.

Prints one JSON object of median seconds per operation. Run by `mp bench speed`, which
passes the same sizes and thread count it uses itself.
"""
import argparse
import io
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCnn(nn.Module):
    """conv32-pool-conv64-pool-fc128-fc(classes), as the engine's small-cnn (thesis 3.1.3)."""

    def __init__(self, classes=10, channels=1, side=28):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (side // 4) * (side // 4), 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(o)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(o)
        self.down = None
        if stride != 1 or i != o:
            self.down = nn.Sequential(nn.Conv2d(i, o, 1, stride, 0, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """The engine's resnet18: torchvision's layout, with a 3x3 stride-1 stem and no max-pool
    for inputs up to 64 pixels."""

    def __init__(self, classes=10, channels=3, side=224):
        super().__init__()
        self.small = side <= 64
        if self.small:
            self.stem = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        else:
            self.stem = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        self.stem_bn = nn.BatchNorm2d(64)
        blocks, i = [], 64
        for layer, o in enumerate([64, 128, 256, 512]):
            for b in range(2):
                blocks.append(BasicBlock(i, o, 2 if layer > 0 and b == 0 else 1))
                i = o
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        h = F.relu(self.stem_bn(self.stem(x)))
        if not self.small:
            h = F.max_pool2d(h, 3, 2, 1)
        h = self.blocks(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def ce_sum(logits, y):
    return -logits.log_softmax(-1).gather(1, y.unsqueeze(1)).sum()


def input_grad(model, x, y, target, create_graph, train=True):
    model.train(train)
    x = x.detach().requires_grad_(True)
    logits = model(x)
    if target == "ce":
        score = ce_sum(logits, y)
    else:  # sum of log-probabilities (rrr)
        score = logits.log_softmax(-1).sum()
    (g,) = torch.autograd.grad(score, x, create_graph=create_graph)
    return logits, g


def rrr(g, marks):
    red = (marks > 0).float()
    return (g * red).square().sum() / g.shape[0]


SYNC = lambda: None


def serialise(state):
    """The state as bytes, as the engine ships a proposal's weights (safetensors)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    try:
        from safetensors.torch import save

        return save(state)
    except ImportError:
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()


def timed(fn, warmup, reps):
    """Median seconds of fn; on a GPU each repetition waits for its kernels."""
    for _ in range(warmup):
        fn()
    SYNC()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        SYNC()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--refine-iterations", type=int, default=20)
    ap.add_argument("--val-images", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="small-cnn", choices=["small-cnn", "resnet18"])
    ap.add_argument("--side", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--module", default=None, help="TorchScript module to time instead of --arch (kept in eval mode)")
    a = ap.parse_args()
    global SYNC
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        SYNC = lambda: torch.cuda.synchronize(dev)
    c, side = a.channels, a.side

    def make():
        if a.module:
            m = torch.jit.load(a.module, map_location=dev)
            m.eval()
            return m
        if a.arch == "resnet18":
            return ResNet18(10, c, side).to(dev)
        return SmallCnn(10, c, side).to(dev)

    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(a.batch, c, side, side, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    m = max(1, side // 7)
    marks = torch.zeros(a.batch, 1, side, side, device=dev)
    marks[:, :, :m, :m] = 1.0

    def ce_step():
        if not a.module:
            model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def guided_step():
        logits, g = input_grad(model, x, y, "rrr", True)
        loss = F.cross_entropy(logits, y) + 10.0 * rrr(g, marks)
        opt.zero_grad()
        loss.backward()
        opt.step()

    x1, y1 = x[:1], y[:1]
    res = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ce_step": timed(ce_step, 5, a.reps),
        "guided_step": timed(guided_step, 5, a.reps),
        "saliency_b1": timed(lambda: input_grad(model, x1, y1, "ce", False, False)[1].abs().amax(1), 5, a.reps * 4),
        "saliency_b64": timed(lambda: input_grad(model, x, y, "ce", False, False)[1].abs().amax(1), 5, a.reps),
    }

    val_x = torch.rand(a.val_images, c, side, side, device=dev)
    val_y = torch.randint(0, 10, (a.val_images,), device=dev)
    m1 = marks[:1]

    def saliency(net):
        return input_grad(net, x1, y1, "ce", False, False)[1].abs().amax(1)

    def evaluate(net):
        net.eval()
        with torch.no_grad():
            logits = net(val_x)
            return ce_sum(logits, val_y) / a.val_images, (logits.argmax(-1) == val_y).sum()

    def proposal():
        # The engine's whole proposal with every early stop off: the saliency map and the
        # validation figures before, a fixed number of iterations of forward + input gradient
        # + impact shares + validation loss + update, then the best weights' saliency map,
        # validation figures and serialised state (what the proposal ships).
        m = make()
        m.load_state_dict(model.state_dict())
        best = make()
        best.load_state_dict(model.state_dict())
        o = torch.optim.Adam(m.parameters(), lr=1e-3)
        before = saliency(model).cpu()
        val0, _ = evaluate(model)
        best_loss = float("inf")
        for it in range(a.refine_iterations):
            # The engine refines with batch norm in evaluation mode (one image per batch).
            logits, g = input_grad(m, x1, y1, "rrr", True, False)
            sal = rrr(g, m1)
            ce = F.cross_entropy(logits, y1)
            _, gm = input_grad(m, x1, y1, "ce", False, False)
            gm = gm.abs().amax(1)
            share_red = (gm * (m1[:, 0] > 0)).sum() / gm.sum()
            # The guard: the engine reuses the figures before for iteration 0.
            val = val0 if it == 0 else evaluate(m)[0]
            total = 0.2 * ce.item() + sal.item()
            if total < best_loss and val.item() < 1.2 * val0.item() + 1e9:
                best_loss = total
                best.load_state_dict(m.state_dict())
            if it + 1 == a.refine_iterations:
                break
            loss = 0.2 * ce + sal
            o.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()
        after = saliency(best).cpu()
        val_after, correct = evaluate(best)
        weights = serialise(best.state_dict())
        return share_red, before, after, val_after.item(), correct.item(), len(weights)

    res["proposal_fixed"] = timed(proposal, 1, max(3, a.reps // 6))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
