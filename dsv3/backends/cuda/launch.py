"""Launch configurations per GPU, read from data files, and facts the kernels are built around.

Pure Python (no triton import): the backends read these tables to describe themselves. Every
kernel file takes a `target` ("nvidia" or "amd") and a device, and looks its block sizes up here,
so the ROCm backend runs the same kernel source with wave64-appropriate settings instead of a copy.

The tables are JSON files in `configs/`, one per GPU architecture (`nvidia-sm90.json`,
`amd-gfx942.json`): per weight shape "NxK" a config per M bucket, nearest bucket wins (in log
scale, a tie to the larger), and a `default` section for shapes without an entry. A GPU of the
vendor without a file of its own takes the vendor's file's defaults only (shape entries are
measured on one chip). `benchmarks/gpu_kernels.py --tune` sweeps a GPU and writes its file;
DSV3_LAUNCH_CONFIGS=path.json replaces the packaged file (a tuning run not yet committed).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

TARGETS = ("nvidia", "amd")
#: the file a vendor's GPUs fall back to, and the interpreter's stand-in for that vendor's chip
PRIMARY_ARCH = {"nvidia": "sm90", "amd": "gfx942"}
CONFIG_DIR = Path(__file__).parent / "configs"
#: up to this many rows a linear quantizes its activation inside the FP8 GEMM (one launch); above, each
#: N tile would redo the quantization of every row, so act_quant runs once first
FUSED_QUANT_ROWS = 64
#: split-K programs of one launch meet on a counter per output tile (see jit.split_k_gather); a launch
#: with more tiles than this runs unsplit
MAX_SPLIT_TILES = 1 << 14
MAX_SPLIT_K = 16
#: shared memory a GEMM takes past its pipelined tiles (scales, barriers), kept free when tiles are fitted to a chip:
#: Triton's NVIDIA compiler used up to 512 bytes more than the tiles in every launch benchmarks/gpu_compile.py
#: measured; AMD's at most 2/3 of the tiles' bytes
SMEM_RESERVE = {"nvidia": 2048, "amd": 0}
#: every launch asks for FP fusion (a * b + c as one FMA) itself: the default of Triton up to 3.9, under which the
#: kernels were measured and their tolerances set, which 3.10 turns off (3.9 warns at each compile until asked)
FP_FUSION = True
#: tokens one program of a row-wise kernel (rms_norm, rope, the gate's selection, the MoE combine) takes under
#: Triton's interpreter, which replays a program's Python for each one (3-15 ms: most of a prefill's time in the
#: tests). On a GPU a program takes one token, as measured on the H200; the kernels are the same code on a
#: [rows, ...] tile either way, and their tests run both. benchmarks/gpu_compile.py sets 1 to record the GPU's launches.
INTERPRETER_ROWS = 16

# DeepSeek-V3's FP8 linears as (N, K) and which of them tensor parallelism divides: 0 = N (column
# parallel), 1 = K (row parallel), None = replicated. Routed experts are placed whole (expert parallel).
V3_LINEARS = {
    "wq_a": (1536, 7168, None), "wkv_a": (576, 7168, None), "wq_b": (24576, 1536, 0), "wkv_b": (32768, 512, 0),
    "wo": (7168, 16384, 1), "dense w1/w3": (18432, 7168, 0), "dense w2": (7168, 18432, 1),
    "shared w1/w3": (2048, 7168, 0), "shared w2": (7168, 2048, 1), "eh_proj": (7168, 14336, None),
}
V3_EXPERTS = {"expert w1/w3": (2048, 7168), "expert w2": (7168, 2048)}
V3_TP = (1, 8, 16)


def v3_linear_shapes(tp: int) -> dict[str, tuple[int, int]]:
    """(N, K) of every FP8 linear of DeepSeek-V3 on one rank of `tp`."""
    out = {}
    for name, (n, k, dim) in V3_LINEARS.items():
        out[name] = (n // tp, k) if dim == 0 else (n, k // tp) if dim == 1 else (n, k)
    return out


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    #: programs over K per output tile; 0 = as many as fill the GPU once (small M), 1 = no split
    split_k: int = 1


@dataclass(frozen=True)
class AttnConfig:
    block_h: int
    block_t: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LaunchTable:
    arch: str
    sms: int  # streaming multiprocessors / compute units: what split-K and key slices aim to fill
    smem_bytes: int  # shared memory (LDS) per block the tiles must fit in
    gemm: dict  # "NxK" or "default" -> ((m bucket, GemmConfig), ...) sorted by bucket
    moe: dict  # the same for the grouped expert GEMMs; M is the mean rows per expert
    attention: AttnConfig


def _buckets(section: dict, where: str) -> tuple[tuple[int, GemmConfig], ...]:
    names = {f.name for f in fields(GemmConfig)}
    out = []
    for m, cfg in section.items():
        if not str(m).isdigit() or int(m) < 1:
            raise ValueError(f"{where}: M bucket {m!r} is not a positive integer")
        if not isinstance(cfg, dict) or set(cfg) - names or not {"block_m", "block_n", "num_warps", "num_stages"} <= set(cfg):
            raise ValueError(f"{where}[{m}]: {cfg!r}; expected keys {sorted(names)} (group_m, split_k optional)")
        out.append((int(m), GemmConfig(**cfg)))
    if not out:
        raise ValueError(f"{where}: no M buckets")
    return tuple(sorted(out, key=lambda p: p[0]))


POW2_TILES = (16, 32, 64, 128, 256)


def check_config(cfg: GemmConfig, smem_bytes: int, where: str) -> None:
    """ValueError naming the entry unless cfg is a launch Triton can run on a chip with smem_bytes of shared
    memory: power-of-two tiles of 16..256 (tl.dot's smallest is 16), 1..16 warps, 1..6 stages, the
    pipelined tiles of gate and up (the larger of the GEMMs that use the table) within shared memory."""
    problems = []
    if cfg.block_m not in POW2_TILES or cfg.block_n not in POW2_TILES:
        problems.append(f"tiles {cfg.block_m}x{cfg.block_n} are not powers of two in {POW2_TILES}")
    if cfg.num_warps not in (1, 2, 4, 8, 16):
        problems.append(f"num_warps={cfg.num_warps} is not 1, 2, 4, 8 or 16")
    if not 1 <= cfg.num_stages <= 6:
        problems.append(f"num_stages={cfg.num_stages} is outside 1..6")
    if cfg.group_m < 1 or not 0 <= cfg.split_k <= MAX_SPLIT_K:
        problems.append(f"group_m={cfg.group_m} (>= 1) or split_k={cfg.split_k} (0 = auto .. {MAX_SPLIT_K})")
    if gemm_smem_bytes(cfg, b_tiles=2) > smem_bytes:
        problems.append(f"needs {gemm_smem_bytes(cfg, b_tiles=2)} bytes of shared memory, the chip has {smem_bytes}")
    if problems:
        raise ValueError(f"{where}: {cfg}: " + "; ".join(problems))


def parse_table(data: dict, where: str) -> LaunchTable:
    """A LaunchTable from a config file's JSON; ValueError naming the entry when it is malformed."""
    for key in ("arch", "sms", "smem_bytes", "gemm", "moe", "attention"):
        if key not in data:
            raise ValueError(f"{where}: no {key!r} key")
    tables = {}
    for kind in ("gemm", "moe"):
        if "default" not in data[kind]:
            raise ValueError(f"{where}: {kind} has no 'default' section")
        for shape in data[kind]:
            if shape != "default" and not _shape_key(shape):
                raise ValueError(f"{where}: {kind} shape {shape!r}; expected 'NxK' such as '24576x1536' or 'default'")
        tables[kind] = {shape: _buckets(sec, f"{where}: {kind}[{shape}]") for shape, sec in data[kind].items()}
        for shape, buckets in tables[kind].items():
            for m, cfg in buckets:
                check_config(cfg, int(data["smem_bytes"]), f"{where}: {kind}[{shape}][{m}]")
    attention = AttnConfig(**data["attention"])
    if attention.block_h not in POW2_TILES or attention.block_t not in POW2_TILES:
        raise ValueError(f"{where}: attention {attention}: block_h and block_t must be powers of two in {POW2_TILES}")
    return LaunchTable(str(data["arch"]), int(data["sms"]), int(data["smem_bytes"]), tables["gemm"], tables["moe"],
                       attention)


def _shape_key(shape: str) -> tuple[int, int] | None:
    parts = shape.split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def table_json(table: LaunchTable, about: str) -> dict:
    """The file form of a table (what --tune writes)."""
    def sec(kind):
        return {shape: {str(m): asdict(c) for m, c in buckets} for shape, buckets in kind.items()}

    return {"about": about, "arch": table.arch, "sms": table.sms, "smem_bytes": table.smem_bytes,
            "gemm": sec(table.gemm), "moe": sec(table.moe), "attention": asdict(table.attention)}


@functools.lru_cache(maxsize=None)
def load_table(target: str, arch: str | None = None) -> LaunchTable:
    """The launch table of `target`'s GPU `arch` (None: the interpreter's stand-in, PRIMARY_ARCH)."""
    check_target(target)
    arch = arch or PRIMARY_ARCH[target]
    override = os.environ.get("DSV3_LAUNCH_CONFIGS")
    path = Path(override) if override else CONFIG_DIR / f"{target}-{arch}.json"
    own = path.is_file()
    if not own:
        path = CONFIG_DIR / f"{target}-{PRIMARY_ARCH[target]}.json"
    try:
        table = parse_table(json.loads(path.read_text()), str(path))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"launch configs {path}: {e}") from None
    if not own:  # another chip's measurements do not carry over; its defaults are a sensible start
        table = LaunchTable(arch, table.sms, table.smem_bytes, {"default": table.gemm["default"]},
                            {"default": table.moe["default"]}, table.attention)
    return table


@functools.lru_cache(maxsize=None)
def arch_of(device: torch.device) -> str | None:
    """The chip's name in the config files' terms (sm90, gfx942); None off the GPU (the interpreter)."""
    if device.type != "cuda":
        return None
    if getattr(torch.version, "hip", None):
        return getattr(torch.cuda.get_device_properties(device), "gcnArchName", "unknown").split(":")[0]
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device) -> tuple[int, int | None]:
    """(SMs, shared memory a block may opt into, or None where torch does not say) of a GPU."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", None) or None


def table_for(target: str, device: torch.device) -> LaunchTable:
    """The launch table for a device. On a GPU, its own SM count and shared memory replace the file's: a chip
    without a file of its own (an A10 has 99 KB where the sm90 file it falls back to says 227) must size its
    tiles by what it has (fit_smem, attn_config)."""
    table = load_table(target, arch_of(device))
    if device.type != "cuda":
        return table
    sms, smem = _device_limits(device)
    return replace(table, sms=sms, smem_bytes=smem or table.smem_bytes)


def sm_count(target: str, device: torch.device) -> int:
    """The device's SMs (CUs); under the interpreter, those of the table's chip, so split choices match a GPU's."""
    return _sm_count(device) if device.type == "cuda" else load_table(target).sms


def nearest(buckets: tuple[tuple[int, GemmConfig], ...], m: int) -> GemmConfig:
    """The config of the bucket nearest m in log scale; a tie goes to the larger bucket."""
    m = max(m, 1)
    return min(buckets, key=lambda p: (abs(math.log(p[0] / m)), -p[0]))[1]


def fit_smem(cfg: GemmConfig, smem_bytes: int, b_tiles: int = 1, elt: int = 1, a_elt: int | None = None,
             reserve: int = 0) -> GemmConfig:
    """cfg with fewer pipeline stages, then narrower and shorter tiles, until its tiles and `reserve` bytes fit
    smem_bytes (a chip with less shared memory than the one the entry was measured on, 2-byte weights in a table
    made for FP8, or a bf16/fp32 activation the GEMM quantizes itself); cfg itself where it fits."""
    while gemm_smem_bytes(cfg, b_tiles, elt, a_elt) + reserve > smem_bytes:
        if cfg.num_stages > 1:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_n > 16:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
        elif cfg.block_m > 16:
            cfg = replace(cfg, block_m=cfg.block_m // 2)
        else:
            break
    return cfg


#: fp32 values a GEMM thread may hold in its accumulators and activation tile before ptxas spills to local memory
#: (255 registers; benchmarks/gpu_compile.py found SwiGLU and in-GEMM quantization variants of the table's entries
#: spilling up to 1.5 KB a thread on sm90 at 128 and 192 values)
THREAD_VALUES = 96


def fit_registers(cfg: GemmConfig, accumulators: int, quant_a: bool) -> GemmConfig:
    """cfg with more warps (up to 8), then narrower tiles, until each thread holds at most THREAD_VALUES fp32 values:
    its share of the accumulators (2: gate and up) and, where the GEMM quantizes its activation itself, of the
    [BLOCK_M, 128] activation tile. The tables' entries were measured as plain FP8 GEMMs; these variants were not."""
    def values(c):
        return (c.block_m * c.block_n * accumulators + (c.block_m * 128 if quant_a else 0)) / (32 * c.num_warps)

    while values(cfg) > THREAD_VALUES:
        if cfg.num_warps < 8:
            cfg = replace(cfg, num_warps=cfg.num_warps * 2)
        elif cfg.block_n > 32:
            cfg = replace(cfg, block_n=cfg.block_n // 2)
        else:
            break
    return cfg


def gemm_config(m: int, target: str, n: int | None = None, k: int | None = None,
                device: torch.device = torch.device("cpu"), a_elt: int = 1, elt: int = 1) -> GemmConfig:
    """The FP8 GEMM's launch config for an [m, k] activation times an [n, k] weight (fitted for two weight tiles, as
    the SwiGLU linear reads them and as check_config admits entries). a_elt: bytes per activation element as the
    GEMM reads it (1: quantized already; 2 or 4: quantized inside); elt: per weight element (2: the BF16 mode's
    16-bit weights, whose tiles take twice the shared memory)."""
    table = table_for(target, device)
    return fit_smem(nearest(table.gemm.get(f"{n}x{k}", table.gemm["default"]), m), table.smem_bytes, b_tiles=2,
                    elt=elt, a_elt=a_elt, reserve=SMEM_RESERVE[target])


def moe_config(rows_per_expert: float, target: str, n: int | None = None, k: int | None = None,
               device: torch.device = torch.device("cpu"), elt: int = 1, a_elt: int | None = None) -> GemmConfig:
    """Grouped GEMM tiles: rows of one expert share a tile, so the tile height follows their mean count. `elt`:
    the weights' bytes per element (2: bf16 experts, whose tiles take twice the shared memory); `a_elt`: the
    activation's as the GEMM reads it (default elt; 2 or 4 where it quantizes a bf16/fp32 activation itself)."""
    table = table_for(target, device)
    cfg = nearest(table.moe.get(f"{n}x{k}", table.moe["default"]), int(rows_per_expert))
    return fit_smem(cfg, table.smem_bytes, b_tiles=2, elt=elt, a_elt=a_elt, reserve=SMEM_RESERVE[target])


def split_k(cfg: GemmConfig, tiles: int, n_kb: int, target: str, device: torch.device) -> tuple[int, int]:
    """(splits, K blocks per split) for `tiles` output tiles over n_kb K blocks. cfg.split_k = 0 (auto)
    splits until the launch fills the GPU's SMs once; no split leaves a program without K blocks."""
    want = cfg.split_k or (1 if tiles >= sm_count(target, device) else -(-sm_count(target, device) // tiles))
    want = max(1, min(want, MAX_SPLIT_K, n_kb))
    if tiles > MAX_SPLIT_TILES:
        want = 1
    per = -(-n_kb // want)
    return -(-n_kb // per), per


def gemm_smem_bytes(cfg: GemmConfig, b_tiles: int = 1, elt: int = 1, a_elt: int | None = None) -> int:
    """Shared memory the software pipeline of a GEMM needs: num_stages copies of the A and B tiles (BLOCK_K = 128;
    `elt` bytes per weight element, 1 for FP8; `a_elt` per activation element, default elt: 2 or 4 where the GEMM
    quantizes a bf16/fp32 activation itself); b_tiles = 2 for gate and up read in one pass."""
    a_elt = elt if a_elt is None else a_elt
    return cfg.num_stages * 128 * (cfg.block_m * a_elt + b_tiles * cfg.block_n * elt)


def attn_smem_bytes(cfg: AttnConfig, block_t: int, c: int, r: int, elt: int, target: str = "nvidia") -> int:
    """Shared memory (LDS) of the MLA decode kernel's tiles as each vendor's Triton compiler lays them out
    (benchmarks/gpu_compile.py checks this against the compilers): per pipeline stage a [BLOCK_T, C + R] tile of
    the latent cache. On NVIDIA its C part twice for 4-byte elements (the second product reads it transposed, which
    32-bit types cannot do in place), plus the query tile [BLOCK_H, C + R] and the probabilities [BLOCK_H, BLOCK_T];
    AMD's compiler keeps only the key tile there. Widths padded as the kernel pads."""
    cp, rp = max(16, 1 << (c - 1).bit_length()), max(16, 1 << (r - 1).bit_length())
    stages = max(1, cfg.num_stages)
    if target == "amd":
        return stages * key_tile_bytes(block_t, c, r, elt)
    copies = 2 if elt >= 4 else 1
    return elt * (stages * block_t * (copies * cp + rp) + cfg.block_h * (cp + rp + block_t))


def key_tile_bytes(block_t: int, c: int, r: int, elt: int) -> int:
    """One [BLOCK_T, C + R] tile of the latent cache, widths padded as the MLA decode kernel pads them."""
    return elt * block_t * (max(16, 1 << (c - 1).bit_length()) + max(16, 1 << (r - 1).bit_length()))


#: AMD's compiler keeps the MLA decode's key tile [BLOCK_T, C + R] in vector registers, not LDS. Compiled for
#: gfx942/gfx950/gfx90a (benchmarks/gpu_compile.py, Triton 3.6 and 3.9, 16 heads, 4 warps): 16 fp32 keys at C = 512
#: take 419-493 of a lane's 512 registers, 32 bf16 keys 224-264; 32 fp32 keys spill 79-267 registers a lane
#: (gfx950 has the LDS for them, so only this bound stops it).
AMD_KEY_TILE_BYTES = 16 * 576 * 4


def attn_config(target: str, c: int = 512, r: int = 64, elt: int = 2,
                device: torch.device = torch.device("cpu")) -> AttnConfig | None:
    """The MLA decode tiles for latent width c, rope width r and element size elt: the table's key
    block, halved until the tiles fit the chip's shared memory (an fp32 cache at C = 512 needs a
    quarter of the keys per step of a bf16 one) and, on AMD, its registers; then one pipeline stage;
    None when even that does not fit (an fp32 cache at C = 512 on a 99 KB chip): the caller runs the
    reference attention."""
    table = table_for(target, device)
    cfg = table.attention

    def too_big(block_t: int) -> bool:
        return (attn_smem_bytes(cfg, block_t, c, r, elt, target) > table.smem_bytes
                or target == "amd" and key_tile_bytes(block_t, c, r, elt) > AMD_KEY_TILE_BYTES)

    block_t = cfg.block_t
    while block_t > 16 and too_big(block_t):
        block_t //= 2
    cfg = AttnConfig(cfg.block_h, block_t, cfg.num_warps, cfg.num_stages)
    if attn_smem_bytes(cfg, block_t, c, r, elt, target) > table.smem_bytes:
        cfg = replace(cfg, num_stages=1)
    return cfg if attn_smem_bytes(cfg, block_t, c, r, elt, target) <= table.smem_bytes else None


def interpreted(device: torch.device) -> bool:
    """True when kernels run on CPU tensors under Triton's interpreter."""
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def rows_per_program(device: torch.device, rows: int | None = None) -> int:
    """Tokens per program of a row-wise kernel on `device` (see INTERPRETER_ROWS); `rows` overrides (the tests)."""
    if rows is not None:
        if rows < 1 or rows & (rows - 1):
            raise ValueError(f"rows per program {rows}; expected a power of two >= 1")
        return rows
    return INTERPRETER_ROWS if interpreted(device) else 1


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {TARGETS}")
