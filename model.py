"""MambaVision: a hybrid Mamba-Transformer vision backbone (Hatamizadeh & Kautz, CVPR 2025).

The network is four levels of a hierarchy, as in the paper's Figure 2:

    image (B, 3, H, W)
    -> stem (PatchEmbed)             two stride-2 convs                 (B, C, H/4, W/4)
    -> level 0: ConvBlocks, then a stride-2 conv                        (B, 2C, H/8, W/8)
    -> level 1: ConvBlocks, then a stride-2 conv                        (B, 4C, H/16, W/16)
    -> level 2: windowed token Blocks (first half MambaVisionMixer, second half self-attention),
                then a stride-2 conv                                    (B, 8C, H/32, W/32)
    -> level 3: windowed token Blocks, same pattern
    -> head: BatchNorm, global average pool, Linear                     (B, num_classes)

Glossary (code name -> paper symbol):
    dim, C        channel width of level 0 (level i has C * 2^i)
    ws            window size: levels 2 and 3 cut the feature map into ws x ws windows of tokens
    d_state, n    SSM state size N (8)
    dt_rank, R    rank of the step-size projection, ceil(C_level / 16)
    A_log, D      the SSM's state matrix A = -exp(A_log) and skip D
    dt, delta     the step size Delta of the discretisation
    x, z          the two halves of the mixer: x goes through the SSM, z is a symmetric branch
                  without SSM (Sec. 3.2: "concatenated, not gated")
    gamma_1/2     per-channel layer scale (only in the variants that set layer_scale)

State-dict names and order are exactly the official ones, so released checkpoints load unchanged.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from scan import selective_scan

# alias -> official settings. Parameter counts (1000 classes) equal the released code's.
_224 = dict(resolution=224, crop_mode="center")
_T_HEADS, _L_HEADS = (2, 4, 8, 16), (4, 8, 16, 32)
_WIN, _WIN512 = (8, 8, 14, 7), (8, 8, 32, 16)
VARIANTS = {
    # mamba_vision_T: 31.79M
    "t": dict(depths=(1, 3, 8, 4), num_heads=_T_HEADS, window_size=_WIN, dim=80, in_dim=32,
              layer_scale=None, drop_path_rate=0.2, crop_pct=1.0, **_224),
    # mamba_vision_T2: 35.10M
    "t2": dict(depths=(1, 3, 11, 4), num_heads=_T_HEADS, window_size=_WIN, dim=80, in_dim=32,
               layer_scale=None, drop_path_rate=0.2, crop_pct=0.98, **_224),
    # mamba_vision_S: 50.14M
    "s": dict(depths=(3, 3, 7, 5), num_heads=_T_HEADS, window_size=_WIN, dim=96, in_dim=64,
              layer_scale=None, drop_path_rate=0.2, crop_pct=0.93, **_224),
    # mamba_vision_B: 97.69M (the seed's older table says 91.8M)
    "b": dict(depths=(3, 3, 10, 5), num_heads=_T_HEADS, window_size=_WIN, dim=128, in_dim=64,
              layer_scale=1e-5, drop_path_rate=0.3, crop_pct=1.0, **_224),
    # mamba_vision_L: 227.96M (seed: 206.9M)
    "l": dict(depths=(3, 3, 10, 5), num_heads=_L_HEADS, window_size=_WIN, dim=196, in_dim=64,
              layer_scale=1e-5, drop_path_rate=0.3, crop_pct=1.0, **_224),
    # mamba_vision_L2: 241.55M (seed: 227.9M)
    "l2": dict(depths=(3, 3, 12, 5), num_heads=_L_HEADS, window_size=_WIN, dim=196, in_dim=64,
               layer_scale=1e-5, drop_path_rate=0.3, crop_pct=1.0, **_224),
    # ImageNet-21K pre-trained, fine-tuned on 1K: same shapes as B and L
    "b_21k": dict(depths=(3, 3, 10, 5), num_heads=_T_HEADS, window_size=_WIN, dim=128, in_dim=64,
                  layer_scale=1e-5, drop_path_rate=0.3, crop_pct=1.0, **_224),
    "l_21k": dict(depths=(3, 3, 10, 5), num_heads=_L_HEADS, window_size=_WIN, dim=196, in_dim=64,
                  layer_scale=1e-5, drop_path_rate=0.3, crop_pct=1.0, **_224),
    # mamba_vision_L2_512_21k: 241.55M at 512 px, larger windows, 'squash' eval crop
    "l2_512_21k": dict(depths=(3, 3, 12, 5), num_heads=_L_HEADS, window_size=_WIN512, dim=196,
                       in_dim=64, layer_scale=1e-5, drop_path_rate=0.3, crop_pct=0.93,
                       resolution=512, crop_mode="squash"),
    # mamba_vision_L3_256_21k / _512_21k: 739.57M
    "l3_256_21k": dict(depths=(3, 3, 20, 10), num_heads=_L_HEADS, window_size=(8, 8, 16, 8),
                       dim=256, in_dim=64, layer_scale=1e-5, drop_path_rate=0.5, crop_pct=1.0,
                       resolution=256, crop_mode="center"),
    "l3_512_21k": dict(depths=(3, 3, 20, 10), num_heads=_L_HEADS, window_size=_WIN512, dim=256,
                       in_dim=64, layer_scale=1e-5, drop_path_rate=0.5, crop_pct=0.93,
                       resolution=512, crop_mode="squash"),
}
_ARCH_KEYS = ("depths", "num_heads", "window_size", "dim", "in_dim", "layer_scale")


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, scale the kept ones by 1/keep."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
        return x * mask  # one pass over x: the 1/keep scale is folded into the small mask


class PatchEmbed(nn.Module):
    """Stem: two conv3x3 stride 2 + BN (eps 1e-4) + ReLU, from 3 to in_dim to dim channels."""

    def __init__(self, in_chans, in_dim, dim):
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(in_dim, eps=1e-4), nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False), nn.BatchNorm2d(dim, eps=1e-4), nn.ReLU())

    def forward(self, x):
        return self.conv_down(x)  # (B, 3, H, W) -> (B, dim, H/4, W/4)


class Downsample(nn.Module):
    """End of levels 0-2: one conv3x3 stride 2 doubles the width and halves the resolution."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x):
        return self.reduction(x)  # (B, C, H, W) -> (B, 2C, H/2, W/2)


class ConvBlock(nn.Module):
    """Levels 0 and 1 (Eq. 1 of the paper): x + conv(GELU(BN(conv(x)))) with BN after each conv."""

    def __init__(self, dim, drop_path=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")  # the tanh form, as the official code has it
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):  # (B, C, H, W)
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return x + self.drop_path(y)


class MambaVisionMixer(nn.Module):
    """The paper's redesigned Mamba mixer (Sec. 3.2, Fig. 3), over the tokens of one window.

    The input is projected and split in two halves of C/2 channels. x goes through a depthwise
    conv1d, SiLU and the selective scan; z through its own depthwise conv1d and SiLU only (no SSM,
    no gating). The halves are concatenated and projected back. The convolutions are not causal:
    an image has no direction.
    """

    def __init__(self, d_model, d_state=8, d_conv=3):
        super().__init__()
        d_half = d_model // 2
        self.d_state, self.dt_rank = d_state, math.ceil(d_model / 16)
        # A = -exp(A_log): row d is -(1, 2, ..., N), the S4D-real initialisation
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_half, 1))
        self.D = nn.Parameter(torch.ones(d_half))
        self.in_proj = nn.Linear(d_model, d_model, bias=False)
        self.x_proj = nn.Linear(d_half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_half, bias=True)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        pad = (d_conv - 1) // 2  # 'same' padding
        self.conv1d_x = nn.Conv1d(d_half, d_half, d_conv, padding=pad, groups=d_half, bias=False)
        self.conv1d_z = nn.Conv1d(d_half, d_half, d_conv, padding=pad, groups=d_half, bias=False)

    def forward(self, x):  # (b, l, c): b = images x windows, l = ws * ws tokens, c channels
        xz = self.in_proj(x).transpose(1, 2)                   # (b, c, l)
        x, z = xz.chunk(2, dim=1)                              # (b, c/2, l) each
        x = F.silu(self.conv1d_x(x))
        z = F.silu(self.conv1d_z(z))
        x_dbl = self.x_proj(x.transpose(1, 2))                 # (b, l, R + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt).transpose(1, 2)                  # (b, c/2, l), bias added here...
        B = B.transpose(1, 2).contiguous()                     # (b, N, l)  the SSM's input matrix
        C = C.transpose(1, 2).contiguous()                     # (b, N, l)  and output matrix
        # ...and the official code passes the same bias again as the scan's delta_bias, so the step
        # is softplus(dt_proj(dt) + bias): the bias counts twice. A, D and that bias go in float32.
        A = -torch.exp(self.A_log.float())                     # (c/2, N)
        y = selective_scan(x, dt.contiguous(), A, B, C, self.D.float(),
                           self.dt_proj.bias.float(), delta_softplus=True)  # (b, c/2, l)
        y = torch.cat([y, z], dim=1).transpose(1, 2)           # (b, l, c)
        return self.out_proj(y)


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of one window (no q/k norm)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):  # (B, L, C)
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)        # 3 x (B, heads, L, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)          # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that returns its input's dtype. Under autocast torch's returns float32, which
    the next Linear casts straight back to bf16: a wasted pass over every token. The statistics are
    still computed in float32 inside the kernel."""

    def forward(self, x):
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact GELU here, unlike the ConvBlock
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm token block (Eq. 5): x + g1 * mixer(LN(x)), then x + g2 * MLP(LN(x))."""

    def __init__(self, dim, num_heads, attention, mlp_ratio=4, drop_path=0.0, layer_scale=None):
        super().__init__()
        if layer_scale is not None:
            self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:  # no layer scale: skip the multiply (the official code multiplies by 1)
            self.gamma_1 = self.gamma_2 = None
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.mixer = Attention(dim, num_heads) if attention else MambaVisionMixer(dim)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):  # (B, L, C)
        x = x + self.drop_path(layer_scale(self.gamma_1, self.mixer(self.norm1(x))))
        return x + self.drop_path(layer_scale(self.gamma_2, self.mlp(self.norm2(x))))


def layer_scale(gamma, x):
    return x if gamma is None else gamma * x


def window_partition(x, ws):
    """(B, C, H, W) -> (B * H/ws * W/ws, ws * ws, C): non-overlapping windows, row-major tokens."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // ws, ws, W // ws, ws)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, C)


def window_reverse(windows, ws, H, W):
    """(B * H/ws * W/ws, ws * ws, C) -> (B, C, H, W): the inverse of window_partition."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, C, H, W)


def is_attention_block(i, depth):
    """The second half of a token level is attention: blocks d//2.. (d even), d//2+1.. (d odd)."""
    return i >= (depth + 1) // 2


class MambaVisionLayer(nn.Module):
    """One level: its blocks, then (levels 0-2) a Downsample, which the caller applies."""

    def __init__(self, dim, depth, num_heads, window_size, conv, drop_path, downsample,
                 mlp_ratio=4, layer_scale=None):
        super().__init__()
        self.conv, self.window_size = conv, window_size
        if conv:
            self.blocks = nn.ModuleList(ConvBlock(dim, drop_path[i]) for i in range(depth))
        else:
            self.blocks = nn.ModuleList(
                Block(dim, num_heads, is_attention_block(i, depth), mlp_ratio, drop_path[i], layer_scale)
                for i in range(depth))
        self.downsample = Downsample(dim) if downsample else None

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W), before the downsample
        if self.conv:
            for blk in self.blocks:
                x = blk(x)
            return x
        _, _, H, W = x.shape
        ws = self.window_size
        # zero-pad right and bottom to a multiple of the window; padded tokens are not masked
        x = F.pad(x, (0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
        Hp, Wp = x.shape[2:]
        x = window_partition(x, ws)                         # (B * windows, ws * ws, C)
        for blk in self.blocks:
            x = blk(x)
        return window_reverse(x, ws, Hp, Wp)[:, :, :H, :W]  # crop the padding back off


class MambaVision(nn.Module):
    def __init__(self, depths, num_heads, window_size, dim, in_dim, mlp_ratio=4, drop_path_rate=0.2,
                 layer_scale=None, num_classes=1000, in_chans=3):
        super().__init__()
        self.model_args = dict(depths=tuple(depths), num_heads=tuple(num_heads),
                               window_size=tuple(window_size), dim=dim, in_dim=in_dim,
                               mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                               layer_scale=layer_scale, num_classes=num_classes, in_chans=in_chans)
        # stochastic depth rises linearly over all blocks of all levels
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.patch_embed = PatchEmbed(in_chans, in_dim, dim)
        self.levels = nn.ModuleList(
            MambaVisionLayer(dim * 2 ** i, depths[i], num_heads[i], window_size[i], conv=i < 2,
                             drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < 3,
                             mlp_ratio=mlp_ratio, layer_scale=layer_scale)
            for i in range(4))
        self.num_features = dim * 8
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # as the official code: it runs last, so it also overwrites dt_proj's Mamba-style init
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_stages(self, x):
        """The four feature maps for dense-task necks, each before its level's downsample:
        (B, C * 2^i, H / 2^(i+2), W / 2^(i+2)) for i = 0..3 (sizes rounded up)."""
        x = self.patch_embed(x)
        stages = []
        for level in self.levels:
            x = level(x)
            stages.append(x)
            if level.downsample is not None:
                x = level.downsample(x)
        return stages

    def forward_features(self, x):
        x = self.norm(self.forward_stages(x)[-1])  # (B, 8C, H/32, W/32)
        return x.mean(dim=(2, 3))                  # global average pool: (B, 8C)

    def forward(self, x):
        return self.head(self.forward_features(x))


def build_model(variant, num_classes=1000, drop_path_rate=None, **overrides):
    """An official variant by alias ('t', 't2', 's', 'b', 'l', 'l2', 'b_21k', ...); `overrides`
    replace its architecture settings (e.g. a tiny network for tests)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    unknown = set(overrides) - set(_ARCH_KEYS) - {"mlp_ratio", "in_chans"}
    if unknown:
        raise ValueError(f"unknown model settings {sorted(unknown)}; valid: {', '.join(_ARCH_KEYS)}")
    cfg = {k: VARIANTS[variant][k] for k in _ARCH_KEYS} | overrides
    if drop_path_rate is None:
        drop_path_rate = VARIANTS[variant]["drop_path_rate"]
    return MambaVision(num_classes=num_classes, drop_path_rate=drop_path_rate, **cfg)


def count_flops(model, img_size):
    """Multiply-accumulates (GMACs) of one image, in two conventions.

    'published': what module forward hooks see, the way the paper's numbers were made (ptflops):
        convolutions and linear layers (bias included), norms and affine (2 per element),
        activations (1 per element); not the mixer's depthwise conv1d (the official code calls it
        functionally), not the attention core, not the scan.
    'full': every convolution, matrix product and attention product (torch's FlopCounterMode),
        plus the scan: 3 MACs per (window, channel, token, state) (decay, input, output).
    Runs on the meta device, so it is cheap even for the largest variants.
    """
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    with torch.device("meta"):
        meta = MambaVision(**model.model_args).eval()
    counts = {"published": 0, "scan": 0}

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            counts["published"] += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            counts["published"] += out.numel() if m.bias is not None else 0
        elif isinstance(m, nn.Linear):
            counts["published"] += inputs[0].numel() * m.out_features + (m.out_features if m.bias is not None else 0)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            counts["published"] += 2 * inputs[0].numel()
        elif isinstance(m, (nn.ReLU, nn.GELU)):
            counts["published"] += out.numel()
        elif isinstance(m, MambaVisionMixer):  # the scan over (B, C/2, L) with N states
            counts["scan"] += 3 * inputs[0].numel() // 2 * m.d_state

    handles = [m.register_forward_hook(hook) for m in meta.modules()]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        meta(torch.empty(1, meta.model_args["in_chans"], H, W, device="meta"))
    for h in handles:
        h.remove()
    return {"published": counts["published"] / 1e9, "scan": counts["scan"] / 1e9,
            "full": (fc.get_total_flops() / 2 + counts["scan"]) / 1e9}
