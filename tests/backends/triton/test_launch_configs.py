"""The launch-config files of the Triton kernels (dsv3/backends/cuda/configs): they load on a machine
without a GPU or triton, every entry is a launch the chip can run, every DeepSeek-V3 linear shape at
tensor parallel 1, 8 and 16 resolves to a config (its own entry or the default), and no entry names a
shape DeepSeek-V3 does not have (a typo would silently never be used)."""

from __future__ import annotations

import json

import pytest

from dsv3.backends.cuda import launch as L

FILES = sorted(L.CONFIG_DIR.glob("*.json"))
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch):
    monkeypatch.delenv("DSV3_LAUNCH_CONFIGS", raising=False)
    L.load_table.cache_clear()
    yield
    L.load_table.cache_clear()


def test_there_is_a_file_per_primary_chip():
    names = {f.stem for f in FILES}
    assert {f"{t}-{a}" for t, a in L.PRIMARY_ARCH.items()} <= names, names


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_each_file_loads_and_every_entry_is_a_valid_launch(path):
    target, arch = path.stem.split("-", 1)
    table = L.load_table(target, arch)  # parse_table checks each config against the chip's shared memory
    assert table.arch == arch, f"{path.name} says arch {table.arch!r}"
    assert table.sms > 0 and table.smem_bytes >= 64 * 1024
    for kind in (table.gemm, table.moe):
        for buckets in kind.values():
            for _, cfg in buckets:
                assert L.gemm_smem_bytes(cfg, b_tiles=2) <= table.smem_bytes
    for elt in (2, 4):  # bf16 and fp32 latent caches at DeepSeek's C = 512, R = 64 fit (fp32 failed on an H200)
        cfg = L.attn_config(target, 512, 64, elt) if arch == L.PRIMARY_ARCH[target] else None
        if cfg is not None:
            assert L.attn_smem_bytes(cfg, cfg.block_t, 512, 64, elt, target) <= table.smem_bytes, (arch, elt, cfg)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_entries_name_deepseek_v3_shapes(path):
    data = json.loads(path.read_text())
    linears = {f"{n}x{k}" for tp in L.V3_TP for n, k in L.v3_linear_shapes(tp).values()}
    experts = {f"{n}x{k}" for n, k in L.V3_EXPERTS.values()}
    for shape in data["gemm"]:
        assert shape == "default" or shape in linears, f"{path.name}: gemm entry {shape} is no DeepSeek-V3 linear"
    for shape in data["moe"]:
        assert shape == "default" or shape in experts, f"{path.name}: moe entry {shape} is no DeepSeek-V3 expert"


@pytest.mark.parametrize("target", L.TARGETS)
@pytest.mark.parametrize("tp", L.V3_TP)
def test_every_v3_linear_resolves_at_every_m(target, tp):
    table = L.load_table(target)
    for name, (n, k) in L.v3_linear_shapes(tp).items():
        for m in M_BUCKETS:
            cfg = L.gemm_config(m, target, n, k)
            own = table.gemm.get(f"{n}x{k}")
            assert cfg in [c for _, c in (own or table.gemm["default"])], (name, m)
            L.check_config(cfg, table.smem_bytes, f"{name} tp={tp} m={m}")
    for n, k in L.V3_EXPERTS.values():
        for rows in (0.03, 1, 16, 128, 4096):
            L.check_config(L.moe_config(rows, target, n, k), table.smem_bytes, f"moe {n}x{k} rows={rows}")


def test_the_nearest_bucket_wins_in_log_scale():
    b = ((1, "a"), (16, "b"), (128, "c"))
    assert [L.nearest(b, m) for m in (1, 3, 4, 5, 16, 45, 46, 100, 4096)] == list("aabbbbccc")
    # 4 is 4x from both 1 and 16: the larger tile; 45 < sqrt(16 * 128) ~ 45.25 < 46
    assert L.nearest(b, 0) == "a"


def test_a_shape_entry_overrides_the_default_and_other_chips_take_defaults_only():
    q_b = L.gemm_config(1, "nvidia", 24576, 1536)
    assert (q_b.block_m, q_b.block_n, q_b.num_warps, q_b.num_stages) == (16, 256, 8, 3)  # the H200 sweep
    assert L.gemm_config(1, "nvidia", 24576, 1536) != L.gemm_config(1, "nvidia", 100, 1536)
    other = L.load_table("nvidia", "sm100")  # no file of its own: the sm90 defaults, not its measurements
    assert set(other.gemm) == {"default"} and other.arch == "sm100"


def test_a_malformed_file_is_refused_with_the_entry_named(tmp_path, monkeypatch):
    data = json.loads((L.CONFIG_DIR / "nvidia-sm90.json").read_text())
    data["gemm"]["7168x2048"]["128"]["block_n"] = 96
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    monkeypatch.setenv("DSV3_LAUNCH_CONFIGS", str(bad))
    with pytest.raises(ValueError, match=r"gemm\[7168x2048\]\[128\].*powers of two"):
        L.load_table("nvidia")
    data["gemm"]["7168x2048"]["128"].update(block_n=256, num_stages=6)  # 6 * 128 * (128 + 512) bytes
    bad.write_text(json.dumps(data))
    L.load_table.cache_clear()
    with pytest.raises(ValueError, match="bytes of shared memory"):
        L.load_table("nvidia")


def test_an_override_file_replaces_the_packaged_one(tmp_path, monkeypatch):
    data = json.loads((L.CONFIG_DIR / "nvidia-sm90.json").read_text())
    data["gemm"]["576x7168"] = {"1": {"block_m": 16, "block_n": 32, "num_warps": 2, "num_stages": 2, "split_k": 7}}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv("DSV3_LAUNCH_CONFIGS", str(path))
    assert L.gemm_config(1, "nvidia", 576, 7168).split_k == 7


@pytest.mark.parametrize("tiles,n_kb", [(1, 1), (1, 56), (9, 3), (9, 56), (31, 7), (132, 56), (4, 12), (500, 2)])
def test_split_k_fills_the_gpu_and_leaves_no_split_empty(tiles, n_kb):
    import torch

    auto = L.GemmConfig(16, 64, 4, 2, split_k=0)
    splits, per = L.split_k(auto, tiles, n_kb, "nvidia", torch.device("cpu"))  # the table's 132 SMs
    assert (splits - 1) * per < n_kb <= splits * per, "a split without K blocks, or K blocks without a split"
    assert 1 <= splits <= min(L.MAX_SPLIT_K, n_kb)
    if tiles >= 132:
        assert splits == 1
    elif n_kb >= L.MAX_SPLIT_K:
        assert tiles * splits >= min(132, tiles * L.MAX_SPLIT_K) * 0.5, "split-K leaves most SMs idle"
    fixed = L.split_k(L.GemmConfig(16, 64, 4, 2, split_k=5), tiles, n_kb, "nvidia", torch.device("cpu"))
    assert fixed[0] <= 5 and (fixed[0] - 1) * fixed[1] < n_kb <= fixed[0] * fixed[1]


def test_fp32_latent_tiles_fit_where_bf16_ones_do():
    """The H200 refused fp32 MLA decode at C = 512 (249856 bytes of shared memory for 232448): the key block
    shrinks for 4-byte elements; bf16 keeps the table's."""
    bf16, fp32 = L.attn_config("nvidia", 512, 64, 2), L.attn_config("nvidia", 512, 64, 4)
    assert bf16.block_t == L.load_table("nvidia").attention.block_t and fp32.block_t < bf16.block_t
    assert L.attn_smem_bytes(fp32, fp32.block_t, 512, 64, 4) <= L.load_table("nvidia").smem_bytes


#: shared memory Triton 3.9's compilers gave the MLA decode kernel at C = 512, R = 64, 16 heads (benchmarks/
#: gpu_compile.py): (vendor, bytes per element, keys per step, stages) -> bytes. The old estimate (stages x keys x
#: (C + R) x bytes) said 147456 for fp32 at 32 keys on sm90, under the compiler's 176128: an A100 would have refused
#: it. AMD's compiler (gfx942) keeps far less in LDS.
COMPILED_MLA_SMEM = {("nvidia", 2, 64, 2): 94208, ("nvidia", 2, 32, 2): 56320, ("nvidia", 4, 32, 2): 176128,
                     ("nvidia", 4, 16, 2): 106496, ("amd", 2, 32, 1): 32768, ("amd", 4, 16, 1): 32768}


@pytest.mark.parametrize("case", sorted(COMPILED_MLA_SMEM))
def test_latent_tile_estimate_covers_what_the_compiler_allocates(case):
    target, elt, block_t, stages = case
    cfg = L.AttnConfig(block_h=16, block_t=block_t, num_warps=4, num_stages=stages)
    assert L.attn_smem_bytes(cfg, block_t, 512, 64, elt, target) >= COMPILED_MLA_SMEM[case]


#: the same for FP8 GEMMs on sm90: (kernel, block_m, block_n, stages, weight tiles, activation bytes) -> bytes; the
#: tiles alone with FP8 activations said 73728 and 131072 for the first two (a bf16 activation quantized inside)
COMPILED_GEMM_SMEM = {("fp8_swiglu", 16, 64, 4, 2, 2): 77824, ("fp8_linear", 128, 64, 4, 1, 2): 147456,
                      ("moe gate/up", 64, 128, 3, 2, 1): 123392}


@pytest.mark.parametrize("case", sorted(COMPILED_GEMM_SMEM))
def test_gemm_estimate_covers_what_the_compiler_allocates(case):
    _, bm, bn, stages, b_tiles, a_elt = case
    cfg = L.GemmConfig(block_m=bm, block_n=bn, num_warps=4, num_stages=stages)
    assert L.gemm_smem_bytes(cfg, b_tiles, 1, a_elt) + L.SMEM_RESERVE["nvidia"] >= COMPILED_GEMM_SMEM[case]


def test_an_fp32_cache_that_fits_nowhere_takes_the_reference_attention(monkeypatch):
    """fp32 at C = 512 does not fit 99 KB (sm89, sm86) even 16 keys in one stage: attn_config says so (None), the
    kernel's launcher refuses in one line, and the backend runs the reference attention instead."""
    import torch

    from dsv3.backends.cuda import CudaKernels
    from dsv3.backends.reference import ReferenceKernels

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(L, "arch_of", lambda device: "sm86")
    monkeypatch.setattr(L, "_device_limits", lambda device: (84, 101376))
    assert L.attn_config("nvidia", 512, 64, 4, gpu) is None
    assert L.attn_config("nvidia", 512, 64, 2, gpu).block_t == 32
    monkeypatch.setattr(L, "table_for", lambda target, device: L.replace(L.load_table(target), smem_bytes=101376))
    pytest.importorskip("triton")
    from dsv3.backends.cuda.mla_decode import mla_decode

    q, kv = torch.zeros(1, 1, 16, 512), torch.zeros(1, 8, 512)
    with pytest.raises(ValueError, match=r"does not fit this GPU's shared memory .* use a bf16 cache"):
        mla_decode(q, torch.zeros(1, 1, 16, 64), kv, torch.zeros(1, 8, 64), 0.1)
    called = []
    monkeypatch.setattr(ReferenceKernels, "mla_attention", lambda self, *a: called.append(a) or "reference")
    k = CudaKernels.__new__(CudaKernels)  # no device needed: only the dispatch is under test
    k.target, k.name, k._mla_fits = "nvidia", "cuda", {}
    assert k.mla_attention(q, None, kv, torch.zeros(1, 8, 64), 0.1, None) == "reference" and called


def test_the_config_files_ship_with_the_package():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    assert "configs/*.json" in pyproject["tool"]["setuptools"]["package-data"]["dsv3.backends.cuda"]


def test_fit_smem_drops_stages_then_narrows_tiles():
    cfg = L.GemmConfig(block_m=64, block_n=128, num_warps=4, num_stages=4)
    assert L.fit_smem(cfg, 10**9) == cfg  # it fits: unchanged
    need = L.gemm_smem_bytes(cfg, b_tiles=2, elt=2)  # 4 stages x 128 x (64 + 256) x 2 bytes
    assert need == 4 * 128 * 320 * 2
    got = L.fit_smem(cfg, need // 2, b_tiles=2, elt=2)
    assert (got.num_stages, got.block_n, got.block_m) == (2, 128, 64), got  # stages go first
    got = L.fit_smem(cfg, 60 * 1024, b_tiles=2, elt=2)
    assert got.num_stages == 1 and got.block_n < 128 and L.gemm_smem_bytes(got, 2, 2) <= 60 * 1024, got


@pytest.mark.parametrize("arch,sms,smem", [("sm86", 84, 101376), ("sm80", 108, 166912), ("sm120", 170, 101376)])
def test_a_gpu_without_a_file_of_its_own_sizes_tiles_by_its_own_shared_memory(monkeypatch, arch, sms, smem):
    """An A10 (sm86), A100 (sm80) or RTX 5090 (sm120) falls back to the sm90 file's defaults, measured with 227 KB of
    shared memory: its own SM count and shared memory take over, and every launch the kernels would ask for fits
    it (FP8 GEMMs and SwiGLU, the fused MoE with FP8 or bf16 experts, MLA decode over bf16 and fp32 caches)."""
    import torch

    gpu = torch.device("cuda", 0)  # never touched: the device's facts are patched in
    monkeypatch.setattr(L, "arch_of", lambda device: arch)
    monkeypatch.setattr(L, "_device_limits", lambda device: (sms, smem))
    table = L.table_for("nvidia", gpu)
    assert (table.sms, table.smem_bytes) == (sms, smem)
    for m in M_BUCKETS:
        assert L.gemm_smem_bytes(L.gemm_config(m, "nvidia", 7168, 2048, gpu), b_tiles=2) <= smem
        for a_elt in (2, 4):  # a decode-sized linear quantizing its bf16/fp32 activation inside
            cfg = L.gemm_config(m, "nvidia", 7168, 2048, gpu, a_elt=a_elt)
            assert L.gemm_smem_bytes(cfg, 2, 1, a_elt) + L.SMEM_RESERVE["nvidia"] <= smem, (m, a_elt, cfg)
        for elt in (1, 2):
            cfg = L.moe_config(m / 8, "nvidia", 2048, 7168, gpu, elt=elt)
            assert L.gemm_smem_bytes(cfg, b_tiles=2, elt=elt) <= smem, (m, elt, cfg)
    for elt in (2, 4):
        cfg = L.attn_config("nvidia", 512, 64, elt, gpu)
        if cfg is None:  # fp32 on a 99 KB chip: the backend takes the reference attention
            assert elt == 4 and smem < 110000
            continue
        assert L.attn_smem_bytes(cfg, cfg.block_t, 512, 64, elt) <= smem, (elt, cfg)


#: launches sm90's ptxas spilled to local memory (benchmarks/gpu_compile.py): (block_m, block_n, warps, accumulators,
#: quantizes its activation) -> bytes spilled a thread. Table entries measured as plain FP8 GEMMs, reused for SwiGLU
#: (two accumulators) and in-GEMM quantization.
SPILLED_ON_SM90 = {(64, 128, 4, 2, True): 1492, (128, 64, 4, 1, True): 848, (128, 128, 8, 2, False): 900,
                   (64, 128, 4, 2, False): 172}


@pytest.mark.parametrize("case", sorted(SPILLED_ON_SM90))
def test_gemm_variants_that_spilled_get_more_warps_or_narrower_tiles(case):
    bm, bn, warps, accs, quant = case
    cfg = L.GemmConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=3)
    got = L.fit_registers(cfg, accs, quant)
    held = (got.block_m * got.block_n * accs + (got.block_m * 128 if quant else 0)) / (32 * got.num_warps)
    assert held <= L.THREAD_VALUES and got.block_m == bm and got.num_warps <= 8, got  # block_m: the routing's tiles
    plain = L.GemmConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    assert L.fit_registers(plain, 1, False) == plain  # a measured plain entry is left as it is


#: vector registers a lane the AMDGPU backend gave the MLA decode kernel at C = 512, R = 64, 16 heads, 4 warps
#: (benchmarks/gpu_compile.py): (chip, bytes per element, keys per step) -> (registers, registers spilled), Triton 3.9.
#: gfx950's 160 KB of LDS admits 32 fp32 keys, which spill: the key tile lives in registers on AMD.
COMPILED_MLA_VGPRS = {("gfx950", 4, 32): (512, 267), ("gfx942", 4, 32): (512, 79), ("gfx950", 4, 16): (493, 0),
                      ("gfx942", 4, 16): (419, 0), ("gfx90a", 4, 16): (445, 0)}


@pytest.mark.parametrize("smem", [65536, 163840])  # gfx942/gfx90a, gfx950
def test_amd_latent_tiles_stay_in_registers(monkeypatch, smem):
    """fp32 caches at C = 512 take 16 keys per step on every AMD chip (32 spill, COMPILED_MLA_VGPRS), whatever its
    LDS; bf16 keeps the table's 32."""
    monkeypatch.setattr(L, "table_for", lambda target, device: L.replace(L.load_table(target), smem_bytes=smem))
    fp32, bf16 = L.attn_config("amd", 512, 64, 4), L.attn_config("amd", 512, 64, 2)
    assert fp32.block_t == 16 and not COMPILED_MLA_VGPRS[("gfx942", 4, 16)][1], fp32
    assert bf16.block_t == L.load_table("amd").attention.block_t == 32, bf16
    for (chip, elt, keys), (_, spilled) in COMPILED_MLA_VGPRS.items():
        assert (L.key_tile_bytes(keys, 512, 64, elt) > L.AMD_KEY_TILE_BYTES) == (spilled > 0), (chip, elt, keys)


def test_every_launch_asks_for_fp_fusion():
    """Triton 3.10 turns FP fusion off by default (3.9 warns at each compile): each launch of the cuda/rocm kernels
    asks for it, so the arithmetic stays the one the kernels were measured and toleranced with."""
    import ast
    from pathlib import Path

    launches = []
    for path in sorted((Path(L.__file__).parent).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel")):
                launches.append((path.name, node.lineno, {k.arg for k in node.keywords}))
    assert len(launches) >= 14, launches
    missing = [(name, line) for name, line, kws in launches if "enable_fp_fusion" not in kws]
    assert not missing, f"launches without enable_fp_fusion: {missing}"
