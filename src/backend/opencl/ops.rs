//! One method per kernel of `cl/`: the OpenCL twins of the CPU ops, each a single queued launch
//! over device buffers. The forward pass ([`super::exec`]) is built from these, and
//! `tests/opencl_kernels.rs` checks each against an f64 reference.
//!
//! Buffers are raw bytes ([`DevBuf`]); lengths are checked here so a wrong shape is an
//! [`Error::Device`], never an out-of-bounds read on the device.

use super::device::{Arg, ClDevice, DevBuf, TICKETS};
use crate::backend::RowPlace;
use crate::error::{Error, Result};
use crate::model::FfnAct;
use ternmux_kernels::dequant::FloatFormat;
use ternmux_kernels::ternary::TernaryFormat;

/// Work-items per row team in the matmul kernels (cl/ternary.cl `TEAM`, cl/float.cl `FTEAM`).
const TEAM: usize = 32;
/// Tokens per pass of a matmul work-group (cl/ternary.cl `TB`, cl/float.cl `FTB`).
const TB: usize = 8;
/// Rows per matmul work-group.
const ROWS_PER_GROUP: usize = 8;
/// The tiled TQ2_0 GEMM's rows and tokens per work-item and local words per staged token
/// (cl/ternary.cl `TT_RPT`, `TT_TPT`, `TT_STRIDE`).
const TILED_RPT: usize = 2;
const TILED_TPT: usize = 16;
const TILED_STRIDE: usize = 36;
/// The smallest batch that takes the tiled TQ2_0 GEMM: on the H100, batched decode passes of
/// 8 / 12 / 16 tokens ran 10% / 13% / 6% faster on the two-row kernel, 32 and more faster tiled
/// (BENCHMARKS, session 8, call 4).
const TILED_MIN_TOKENS: usize = 17;
/// Work-groups per compute unit below which the tiled GEMM splits the row length over several
/// work-groups per tile, and the most it splits it. On the H100, batch-64 passes of the 2B model
/// took 25.0 / 25.7 ms with 2 per CU, 25.2 / 26.0 with 4, 26.2 / 26.9 with 8 and 26.9 / 29.1
/// without splitting.
const TILED_GROUPS_PER_CU: usize = 2;
const TILED_MAX_SPLITS: usize = 8;

/// The tensor-core TQ2_0 GEMM (cl/ternary_mma.cl, NVIDIA sm_80+): rows and tokens of a
/// work-group's tile (four warps of 16 rows), local words per staged token, and the smallest
/// batch that takes it (on the H100 a batch-decode pass of the 2B model took 5.31 / 5.58 / 6.11
/// ms at 2 / 4 / 8 tokens on its first, unpipelined build against 4.41 / 5.34 / 7.26 ms on the
/// other kernels).
const MMA_ROWS: usize = 64;
const MMA_TOKS: usize = 64;
const MMA_STRIDE: usize = 72;
const MMA_MIN_TOKENS: usize = 8;

/// The most tokens the few-token kernel takes (`FEW_T` in cl/ternary.cl).
pub const FEW_MAX_TOKENS: usize = 8;

/// Batches of 2 to this many tokens take the few-token kernel on GPUs, for rows of `k`:
/// [`FEW_MAX_TOKENS`], or 4 for rows of 14336 and longer, where the tensor cores were as quick
/// or quicker at 8 tokens (measured on an H100, BENCHMARKS.md).
/// `TERNMUX_CL_FEW_MAX` sets the count for every row length, to measure it (1 or 0: off).
fn few_max_tokens(k: usize) -> usize {
    static MAX: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let set = *MAX.get_or_init(|| {
        std::env::var("TERNMUX_CL_FEW_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    set.unwrap_or(if k >= 14336 { 4 } else { FEW_MAX_TOKENS })
        .min(FEW_MAX_TOKENS)
}
/// Blocks whose codes a warp of the tensor-core few-token kernel loads at once (`MF_U` in
/// cl/ternary_mma.cl); the host gives a work-group enough warps, at most [`MF_WARPS`], that
/// each has about half that many of the row's blocks (rounded up to a power of two).
const MF_U: usize = 4;
/// The most warps of a work-group of the tensor-core few-token kernel.
const MF_WARPS: usize = 8;

/// The most tokens the tensor-core few-token kernel takes (its wider entry point,
/// `ternary_few16_*_mma`: two n-tiles of eight).
pub const FEW_MMA_MAX_TOKENS: usize = 16;

/// Batches of [`FEW_MMA_MIN_TOKENS`] to this many tokens take the tensor-core few-token kernel
/// (where the device has it), larger ones the tiled tensor-core GEMM: 16, for every row
/// length. On the H100 it took 13.1–14.6 µs a launch at 9–16 tokens of a 2560 × 2560 TQ2_0
/// matrix against 20.2–20.3 for the tiled GEMM, 24.2–30.7 against 63.1–63.3 for 4096 × 14336;
/// a four-tile entry lost to the tiled GEMM at 24 and 32 tokens (BENCHMARKS.md, issue 6,
/// session 26). `TERNMUX_CL_FEW_MMA_MAX` lowers the count, to measure it.
fn few_mma_max_tokens() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("TERNMUX_CL_FEW_MMA_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(FEW_MMA_MAX_TOKENS)
            .min(FEW_MMA_MAX_TOKENS)
    })
}

/// The fewest tokens that take the tensor-core few-token kernel: at 2 tokens the team-per-row
/// kernel was quicker (passes of the 2B shape on the H100, 3.12–3.14 ms against 3.27–3.68 for a
/// first build of the tensor-core kernel; at 4 and 8 tokens this build takes 3.50–3.67 and
/// 3.92–3.94 ms against 3.78–3.89 and 4.81–4.88: BENCHMARKS.md, issue 6, session 22).
pub const FEW_MMA_MIN_TOKENS: usize = 3;

/// Refuses a token count the few-token kernel `what` does not take (1..=`most`).
fn few_tokens(what: &str, n_tok: usize, most: usize) -> Result<()> {
    if (1..=most).contains(&n_tok) {
        return Ok(());
    }
    Err(Error::Device(format!(
        "opencl: the {what} takes 1 to {most} tokens, not {n_tok}"
    )))
}

/// Whether batches of [`FEW_MMA_MIN_TOKENS`] or more take the tensor-core few-token kernel
/// where the kernels have it (`ternary_few_tq2_mma`; `TERNMUX_CL_FEW_MMA=0`: the team-per-row
/// kernels instead).
fn few_mma_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_FEW_MMA").is_none_or(|v| v != "0"))
}

/// Warps in a work-group of the tensor-core few-token kernel for rows of `k`: enough that each
/// has about `MF_U / 2` of the row's blocks, a power of two, at most [`MF_WARPS`].
fn few_mma_warps(k: usize) -> usize {
    (k / 256)
        .div_ceil(MF_U / 2)
        .next_power_of_two()
        .clamp(1, MF_WARPS)
}

/// Whether projections of a few tokens norm their own input where the device can
/// ([`ClDevice::few_mma_norm_takes`]; `TERNMUX_CL_FUSE_NORM=0`: a `norm_quant` launch first).
fn fuse_norm_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_FUSE_NORM").is_none_or(|v| v != "0"))
}

/// Local bytes of the normed few-token kernel's rows: eight scales, then `n_tok` rows of `k`
/// int8 values, `k + 16` bytes apart (cl/ternary_mma.cl `mma_few_norm`).
fn few_norm_local(k: usize, n_tok: usize) -> usize {
    32 + n_tok * (k + 16)
}

/// The tensor-core F16 GEMM (cl/float_mma.cl, NVIDIA sm_80+): rows and tokens of a
/// work-group's tile (eight warps of 16 rows), elements per staged chunk, local words per
/// staged token.
const MF_ROWS: usize = 128;
const MF_TOKS: usize = 64;
const MF_CHUNK: usize = 64;
const MF_STRIDE: usize = 80;
/// The tiled F16 GEMM (cl/float.cl `float_matmul_f16_tiled`): rows and tokens per work-item
/// (`FT_RPT`, `FT_TPT`), columns staged per step (`FT_CHUNK`), local floats per staged token
/// (`FT_STRIDE`), teams per work-group, and the smallest batch that takes it.
const FLOAT_TILED_RPT: usize = 4;
const FLOAT_TILED_TPT: usize = 8;
const FLOAT_TILED_CHUNK: usize = 32;
const FLOAT_TILED_STRIDE: usize = 36;
const FLOAT_TILED_TEAMS: usize = 8;
const FLOAT_TILED_MIN_TOKENS: usize = 9;

/// Token groups per team and teams per work-group of the tiled GEMM for a batch of `n_tok`:
/// up to 32 tokens, 8 teams with a tile of 32 (2 groups); more, 4 teams with a tile of 64 (4
/// groups), which reads the weights and makes the masks half as often. Both stage 36 KiB.
fn tiled_shape(n_tok: usize) -> (usize, usize) {
    if n_tok <= 2 * TILED_TPT {
        (n_tok.div_ceil(TILED_TPT).max(1), 8)
    } else {
        (4, 4)
    }
}

/// The norm the last work-group of a launch does once every other work-group has written its
/// part of the row (`last_group` in cl/common.cl): what would otherwise be the next launch —
/// RMSNorm · `w` of the launch's row (a GEMV's output, each attention output row), into `y` (a
/// GEMV; attention norms in place), and its int8 quantization into `q` / `s`
/// ([`ClDevice::row_tails`] says when the forward pass asks for one).
pub struct RowTail<'a> {
    /// Norm weight (f32, one per value of the row).
    pub w: &'a DevBuf,
    /// RMS epsilon.
    pub eps: f32,
    /// Where the normed row goes (ignored by attention, which norms in place).
    pub y: &'a DevBuf,
    /// Quantized rows (int8).
    pub q: &'a DevBuf,
    /// Their scales (one f32 per row).
    pub s: &'a DevBuf,
}

/// The FFN activation of a gate/up GEMV's two outputs, done by the launch's last work-group
/// ([`ClDevice::ternary_gemv_act`]): `gate = act(gate) · up`, the sub-norm · `norm` when given,
/// and the int8 quantization of the result into `q` / `s`.
pub struct ActTail<'a> {
    /// SiLU or ReLU².
    pub act: FfnAct,
    /// The FFN sub-norm's weight (f32, one per row of the gate), if the model has one.
    pub norm: Option<&'a DevBuf>,
    /// RMS epsilon.
    pub eps: f32,
    /// The quantized activation (int8, one per row of the gate).
    pub q: &'a DevBuf,
    /// Its scale (one f32).
    pub s: &'a DevBuf,
}

fn act_id(act: FfnAct) -> i32 {
    match act {
        FfnAct::Silu => 0,
        FfnAct::Relu2 => 1,
    }
}

/// cl/common.cl `FMT_*` id of a float format.
pub fn float_format_id(f: FloatFormat) -> i32 {
    match f {
        FloatFormat::F32 => 0,
        FloatFormat::F16 => 1,
        FloatFormat::BF16 => 2,
        FloatFormat::Q8_0 => 3,
        FloatFormat::Q4_0 => 4,
        FloatFormat::Q4_1 => 5,
        FloatFormat::Q4K => 6,
        FloatFormat::Q5K => 7,
        FloatFormat::Q6K => 8,
    }
}

/// cl/ternary.cl `TFMT_*` id of a ternary format.
pub fn ternary_format_id(f: TernaryFormat) -> i32 {
    match f {
        TernaryFormat::Tq2_0 => 0,
        TernaryFormat::Tq1_0 => 1,
        TernaryFormat::I2S => 2,
    }
}

/// The kernel family of ternary rows that TQ2_0's GPU kernels take: TQ2_0 itself, and I2_S
/// rows of a multiple of 256 (TQ2_0 code bytes with the planes reversed and no block scale,
/// cl/ternary.cl) — each kernel has a `tq2` and an `i2s` entry point.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tq2Like {
    Tq2,
    I2s,
}

impl Tq2Like {
    fn of(fmt: TernaryFormat, k: usize) -> Option<Tq2Like> {
        match fmt {
            TernaryFormat::Tq2_0 => Some(Tq2Like::Tq2),
            TernaryFormat::I2S if k.is_multiple_of(256) => Some(Tq2Like::I2s),
            _ => None,
        }
    }

    /// The kernel names of this family.
    fn kernels(self) -> Tq2Kernels {
        match self {
            Tq2Like::Tq2 => Tq2Kernels {
                gemv: "ternary_gemv_tq2",
                gemv_norm: "ternary_gemv_tq2_norm",
                gemv_act: "ternary_gemv_tq2_act",
                few: ["ternary_few2_tq2", "ternary_few4_tq2", "ternary_few8_tq2"],
                few_mma: ["ternary_few_tq2_mma", "ternary_few16_tq2_mma"],
                few_mma_norm: "ternary_few_tq2_mma_norm",
                pair: "ternary_matmul_tq2_pair",
                tiled: "ternary_matmul_tq2_tiled",
                mma: "ternary_matmul_tq2_mma",
            },
            Tq2Like::I2s => Tq2Kernels {
                gemv: "ternary_gemv_i2s",
                gemv_norm: "ternary_gemv_i2s_norm",
                gemv_act: "ternary_gemv_i2s_act",
                few: ["ternary_few2_i2s", "ternary_few4_i2s", "ternary_few8_i2s"],
                few_mma: ["ternary_few_i2s_mma", "ternary_few16_i2s_mma"],
                few_mma_norm: "ternary_few_i2s_mma_norm",
                pair: "ternary_matmul_i2s_pair",
                tiled: "ternary_matmul_i2s_tiled",
                mma: "ternary_matmul_i2s_mma",
            },
        }
    }
}

/// The entry points of one [`Tq2Like`] family.
struct Tq2Kernels {
    /// One token.
    gemv: &'static str,
    /// One token, then the output row's RMSNorm and quantization by the last work-group.
    gemv_norm: &'static str,
    /// One token of an FFN's gate and up, then their activation by the last work-group.
    gemv_act: &'static str,
    /// Up to 2, 4 and 8 tokens, each code word's masks applied to all of them.
    few: [&'static str; 3],
    /// Up to 8 and 16 tokens on NVIDIA's int8 tensor cores (sm_80+), 16 rows a work-group.
    few_mma: [&'static str; 2],
    /// Up to 8 tokens on the int8 tensor cores, the input normed and quantized by each
    /// work-group itself.
    few_mma_norm: &'static str,
    /// Small batches, two rows per team.
    pair: &'static str,
    /// Batches from `TILED_MIN_TOKENS`, tiled in local memory.
    tiled: &'static str,
    /// Batches from `MMA_MIN_TOKENS` on NVIDIA's int8 tensor cores.
    mma: &'static str,
}

/// One output of a ternary launch: `out[t][r] (+)= (Σ w·q)/s_t · scale + bias[r]`.
pub struct TernaryOut<'a> {
    /// Packed weights (`rows` rows of the format's row bytes; I2_S's tail may follow).
    pub w: &'a DevBuf,
    /// Output rows.
    pub rows: usize,
    /// Output buffer (f32, `n_tok × rows`).
    pub out: &'a DevBuf,
    /// Output scale (the layer's `.scale` times I2_S's `w_s`).
    pub scale: f32,
    /// Optional bias (f32, `rows`).
    pub bias: Option<&'a DevBuf>,
}

/// Where the rows of a pass go, on the device (`int2` slot, position per row) with the host
/// copy it was made from: the kernels index caches by it, so it is checked here against the
/// caches' shape when made.
pub struct Places {
    host: Vec<RowPlace>,
    buf: DevBuf,
    slots: usize,
    n_ctx: usize,
    one_per_slot: bool,
}

impl Places {
    /// Uploads `rows` for caches of `slots` slots of `n_ctx` positions, reusing `old`'s device
    /// buffer when it is large enough. Every slot and position must lie inside the caches.
    pub fn new(
        dev: &ClDevice,
        rows: &[RowPlace],
        slots: usize,
        n_ctx: usize,
        old: Option<Places>,
    ) -> Result<Places> {
        if let Some(bad) = rows
            .iter()
            .find(|r| r.slot as usize >= slots || r.pos as usize >= n_ctx)
        {
            return Err(Error::Device(format!(
                "opencl: row at slot {} position {} outside caches of {slots} slots of {n_ctx} \
                 positions",
                bad.slot, bad.pos
            )));
        }
        let bytes = rows.len().max(1) * std::mem::size_of::<RowPlace>();
        let mut buf = match old {
            Some(o) if o.buf.bytes() >= bytes => o.buf,
            _ => dev.alloc(bytes.next_power_of_two())?,
        };
        dev.write(&mut buf, 0, bytemuck::cast_slice(rows))?;
        let mut sorted: Vec<u32> = rows.iter().map(|r| r.slot).collect();
        sorted.sort_unstable();
        Ok(Places {
            host: rows.to_vec(),
            buf,
            slots,
            n_ctx,
            one_per_slot: sorted.windows(2).all(|w| w[0] != w[1]),
        })
    }
    /// Whether no two rows share a slot (a decode step): what
    /// [`ClDevice::attention_rope`] needs.
    pub fn one_row_per_slot(&self) -> bool {
        self.one_per_slot
    }
    /// The rows as uploaded.
    pub fn rows(&self) -> &[RowPlace] {
        &self.host
    }
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.host.len()
    }
    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    /// Moves the single row to its next position in the host's record only: what
    /// [`ClDevice::greedy_pick`] does to the device's copy, so the next pass finds its place
    /// already uploaded. Refused for a pass of several rows.
    pub fn advance(&mut self) -> Result<()> {
        match self.host.as_mut_slice() {
            // Past the cache's end only after its last position: no pass follows (the model
            // checks the context before every pass).
            [row] => {
                row.pos += 1;
                Ok(())
            }
            rows => Err(Error::Device(format!(
                "opencl: a device pick moves one row, not {}",
                rows.len()
            ))),
        }
    }
    /// The rows as the device holds them (`int2` slot, position per row).
    pub fn device_buf(&self) -> &DevBuf {
        &self.buf
    }
    /// One past the largest position.
    pub fn end(&self) -> usize {
        self.host
            .iter()
            .map(|r| r.pos as usize + 1)
            .max()
            .unwrap_or(0)
    }
}

/// Rows per team of `float_gemv_f16` (`GV_R` in cl/float.cl).
const GEMV_F16_ROWS: usize = 4;

/// Whether one-token F16 matmuls take `float_gemv_f16` on GPUs (`TERNMUX_CL_HEAD_GEMV=0` turns
/// it off, to compare).
fn head_gemv_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_HEAD_GEMV").is_none_or(|v| v != "0"))
}

/// Most work-groups of one [`ClDevice::greedy_pick`].
const PICK_GROUPS: usize = 256;
/// Bytes of the partial results of a [`ClDevice::greedy_pick`] of `rows` rows (a value and an
/// index per work-group).
pub fn pick_part_bytes(rows: usize) -> usize {
    rows.max(1) * PICK_GROUPS * 8
}

/// Shape of a RoPE + KV store.
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    /// Head dimension.
    pub head_dim: usize,
    /// Rotated dimensions per head.
    pub n_rot: usize,
    /// NEOX pairing (i, i + n_rot/2) instead of (2i, 2i + 1).
    pub neox: bool,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv: usize,
}

fn need(what: &str, buf: &DevBuf, bytes: usize) -> Result<()> {
    if bytes > buf.bytes() {
        return Err(Error::Device(format!(
            "opencl: {what} needs {bytes} bytes but its buffer holds {}",
            buf.bytes()
        )));
    }
    Ok(())
}

/// The shape and buffer checks of a RoPE + KV store over `places`: q, k, v rows, the caches and
/// the (cos, sin) table.
fn check_rope(
    sh: RopeShape,
    places: &Places,
    [q, k, v]: [&DevBuf; 3],
    kc: &DevBuf,
    vc: &DevBuf,
    rope: &DevBuf,
) -> Result<()> {
    if sh.n_rot > sh.head_dim || !sh.n_rot.is_multiple_of(2) {
        return Err(Error::Device(format!(
            "opencl: rope of {} dimensions in heads of {}",
            sh.n_rot, sh.head_dim
        )));
    }
    let (qd, kvd, n_tok) = (sh.n_head * sh.head_dim, sh.n_kv * sh.head_dim, places.len());
    need("q", q, n_tok * qd * 4)?;
    need("k", k, n_tok * kvd * 4)?;
    need("v", v, n_tok * kvd * 4)?;
    need("key cache", kc, places.slots * places.n_ctx * kvd * 2)?;
    need("value cache", vc, places.slots * places.n_ctx * kvd * 2)?;
    need("rope table", rope, places.end() * sh.n_rot / 2 * 8)
}

/// The shape and buffer checks of attention over `places`: grouped heads, the caches, the score
/// scratch and the output.
fn check_attention(
    sh: RopeShape,
    places: &Places,
    kc: &DevBuf,
    vc: &DevBuf,
    scores: &DevBuf,
    out: &DevBuf,
) -> Result<()> {
    if sh.n_kv == 0 || !sh.n_head.is_multiple_of(sh.n_kv) {
        return Err(Error::Device(format!(
            "opencl: attention of {} heads over {} KV heads",
            sh.n_head, sh.n_kv
        )));
    }
    let (qd, kvd) = (sh.n_head * sh.head_dim, sh.n_kv * sh.head_dim);
    let (n_tok, n_ctx) = (places.len(), places.n_ctx);
    need("key cache", kc, places.slots * n_ctx * kvd * 2)?;
    need("value cache", vc, places.slots * n_ctx * kvd * 2)?;
    need("scores", scores, n_tok * sh.n_head * n_ctx * 4)?;
    need("attention output", out, n_tok * qd * 4)
}

fn int(v: usize) -> Result<Arg<'static>> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| Error::Device(format!("opencl: {v} exceeds the kernels' 32-bit indices")))
}

impl ClDevice {
    /// Work-group size of the row kernels: the largest power of two ≤ 256 the device accepts.
    pub fn row_group(&self) -> usize {
        let max = self.info().max_work_group.clamp(1, 256);
        1usize << (usize::BITS - 1 - max.leading_zeros())
    }

    /// `y = RMSNorm(x rows row0..row0+rows) · norm` (plain copy when `norm` is `None`) into `y`
    /// when given, and its per-token int8 quantization into `q` / `s` when given
    /// (`s_t = 127 / max(absmax, 1e-5)`, `q = clamp(rint(y · s_t))`).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_quant(
        &self,
        x: &DevBuf,
        n: usize,
        row0: usize,
        rows: usize,
        norm: Option<&DevBuf>,
        eps: f32,
        y: Option<&DevBuf>,
        q: Option<(&DevBuf, &DevBuf)>,
    ) -> Result<()> {
        need("norm input", x, (row0 + rows) * n * 4)?;
        if let Some(w) = norm {
            need("norm weight", w, n * 4)?;
        }
        if let Some(y) = y {
            need("norm output", y, rows * n * 4)?;
        }
        if let Some((qb, sb)) = q {
            need("quantized output", qb, rows * n)?;
            need("token scales", sb, rows * 4)?;
        }
        let wg = self.row_group();
        let d = self.dummy();
        self.launch(
            "norm_quant",
            &[rows * wg],
            &[wg],
            &[
                Arg::Buf(x),
                int(n)?,
                int(row0)?,
                Arg::Buf(norm.unwrap_or(d)),
                Arg::I32(i32::from(norm.is_some())),
                Arg::F32(eps),
                Arg::Buf(y.unwrap_or(d)),
                Arg::I32(i32::from(y.is_some())),
                Arg::Buf(q.map_or(d, |p| p.0)),
                Arg::Buf(q.map_or(d, |p| p.1)),
                Arg::I32(i32::from(q.is_some())),
                Arg::I32(i32::from(self.gpu_kernels())),
                Arg::Local(wg * 4),
            ],
        )
    }

    /// `g = act(g) · u`, the optional sub-norm, and the int8 quantization into `q` / `s`.
    #[allow(clippy::too_many_arguments)]
    pub fn ffn_act_quant(
        &self,
        g: &DevBuf,
        u: &DevBuf,
        n: usize,
        rows: usize,
        act: FfnAct,
        norm: Option<&DevBuf>,
        eps: f32,
        q: &DevBuf,
        s: &DevBuf,
    ) -> Result<()> {
        need("ffn gate", g, rows * n * 4)?;
        need("ffn up", u, rows * n * 4)?;
        need("quantized output", q, rows * n)?;
        need("token scales", s, rows * 4)?;
        if let Some(w) = norm {
            need("sub-norm weight", w, n * 4)?;
        }
        let wg = self.row_group();
        self.launch(
            "ffn_act_quant",
            &[rows * wg],
            &[wg],
            &[
                Arg::Buf(g),
                Arg::Buf(u),
                int(n)?,
                Arg::I32(act_id(act)),
                Arg::Buf(norm.unwrap_or(self.dummy())),
                Arg::I32(i32::from(norm.is_some())),
                Arg::F32(eps),
                Arg::Buf(q),
                Arg::Buf(s),
                Arg::I32(i32::from(self.gpu_kernels())),
                Arg::Local(wg * 4),
            ],
        )
    }

    /// Ternary matrices × per-token int8 activations `q` (`n_tok × k`) with scales `s`: up to
    /// three matrices sharing the input in one launch; `accumulate` adds into the outputs.
    #[allow(clippy::too_many_arguments)]
    pub fn ternary_matmul(
        &self,
        fmt: TernaryFormat,
        k: usize,
        q: &DevBuf,
        s: &DevBuf,
        n_tok: usize,
        outs: &[TernaryOut<'_>],
        accumulate: bool,
    ) -> Result<()> {
        if outs.is_empty() || outs.len() > 3 || k == 0 || !k.is_multiple_of(fmt.k_multiple()) {
            return Err(Error::Device(format!(
                "opencl: ternary matmul of {} matrices with row length {k} ({} needs a multiple of {})",
                outs.len(),
                fmt.name(),
                fmt.k_multiple()
            )));
        }
        need("activations", q, n_tok * k)?;
        need("token scales", s, n_tok * 4)?;
        let like = Tq2Like::of(fmt, k);
        // One TQ2_0 (or I2_S) token on a GPU: the GEMV, which keeps more weight loads in
        // flight per team.
        if like.is_some() && n_tok == 1 && self.gpu_kernels() {
            return self.ternary_gemv(fmt, k, q, s, outs, accumulate, None);
        }
        // A few tokens: each block's weights read once and applied to all of them.
        if like.is_some() && self.gpu_kernels() {
            if (FEW_MMA_MIN_TOKENS..=few_mma_max_tokens()).contains(&n_tok)
                && self.mma()
                && few_mma_enabled()
            {
                return self.ternary_few_mma(fmt, k, q, s, n_tok, outs, accumulate);
            }
            if n_tok <= few_max_tokens(k) {
                return self.ternary_few(fmt, k, q, s, n_tok, outs, accumulate);
            }
        }
        let mut args = vec![
            Arg::I32(ternary_format_id(fmt)),
            int(k)?,
            Arg::Buf(q),
            Arg::Buf(s),
            int(n_tok)?,
        ];
        let total = self.push_outs(&mut args, outs, fmt, k, n_tok)?;
        args.push(Arg::I32(i32::from(accumulate)));
        // The tensor-core GEMM's entry for this format, where batches take it (NVIDIA sm_80+):
        // TQ2_0, I2_S rows of a multiple of 256, and TQ1_0 (its own entry: base-3 codes).
        let mma = match (like, fmt) {
            (Some(l), _) => Some(l.kernels().mma),
            (None, TernaryFormat::Tq1_0) => Some("ternary_matmul_tq1_mma"),
            _ => None,
        };
        if let Some(mma) =
            mma.filter(|_| n_tok >= MMA_MIN_TOKENS && self.mma() && self.tiled_gemm())
        {
            args.remove(0);
            let words = 2 * MMA_TOKS * MMA_STRIDE + 4;
            args.push(Arg::Local(words * 4));
            let tiles = (total.div_ceil(MMA_ROWS), n_tok.div_ceil(MMA_TOKS));
            let splits = self.tiled_splits(tiles.0 * tiles.1, k / 256);
            let global = [tiles.0 * MMA_ROWS / 16 * TEAM, tiles.1, splits];
            let local = [MMA_ROWS / 16 * TEAM, 1, 1];
            args.push(int(splits)?);
            if splits == 1 {
                args.extend([Arg::Buf(self.dummy()), Arg::Buf(self.tickets())]);
                return self.launch(mma, &global, &local, &args);
            }
            return self.with_split_part(splits * n_tok * total * 4, |part| {
                let mut args = args;
                args.extend([Arg::Buf(part), Arg::Buf(self.tickets())]);
                self.launch(mma, &global, &local, &args)
            });
        }
        let Some(like) = like else {
            args.push(Arg::Local(ROWS_PER_GROUP * TB * TEAM * 4));
            return self.launch(
                "ternary_matmul",
                &[
                    total.div_ceil(ROWS_PER_GROUP) * ROWS_PER_GROUP * TEAM,
                    n_tok.div_ceil(TB),
                ],
                &[ROWS_PER_GROUP * TEAM, 1],
                &args,
            );
        };
        let Tq2Kernels { pair, tiled, .. } = like.kernels();
        // Batches on a GPU: the tiled kernel (activations staged in local memory, each
        // work-item a block of rows × tokens).
        if n_tok >= TILED_MIN_TOKENS && self.tiled_gemm() {
            args.remove(0);
            let (tgroups, teams) = tiled_shape(n_tok);
            args.insert(4, Arg::I32(tgroups as i32));
            let (rows, toks) = (TEAM / tgroups * TILED_RPT, tgroups * TILED_TPT);
            let words = teams * (toks * TILED_STRIDE).max(rows * toks) + 1;
            args.push(Arg::Local(words * 4));
            let tiles = (total.div_ceil(rows), n_tok.div_ceil(toks));
            let rounds = (k / 128).div_ceil(teams);
            let splits = self.tiled_splits(tiles.0 * tiles.1, rounds);
            let global = [tiles.0 * teams * TEAM, tiles.1, splits];
            let local = [teams * TEAM, 1, 1];
            args.push(int(splits)?);
            if splits == 1 {
                args.extend([Arg::Buf(self.dummy()), Arg::Buf(self.tickets())]);
                return self.launch(tiled, &global, &local, &args);
            }
            return self.with_split_part(splits * n_tok * total * 4, |part| {
                let mut args = args;
                args.extend([Arg::Buf(part), Arg::Buf(self.tickets())]);
                self.launch(tiled, &global, &local, &args)
            });
        }
        // Other batches take two rows per team (activations loaded once for both).
        args.remove(0);
        args.push(Arg::Local(ROWS_PER_GROUP * 2 * TB * TEAM * 4));
        self.launch(
            pair,
            &[
                total.div_ceil(ROWS_PER_GROUP * 2) * ROWS_PER_GROUP * TEAM,
                n_tok.div_ceil(TB),
            ],
            &[ROWS_PER_GROUP * TEAM, 1],
            &args,
        )
    }

    /// Whether batches take the tiled GEMMs (`ternary_matmul_tq2_tiled`,
    /// `float_matmul_f16_tiled`): with the GPU-shaped kernels, unless `TERNMUX_CL_TILED=0` (the
    /// row-team kernels instead, for comparison).
    fn tiled_gemm(&self) -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_TILED").is_none_or(|v| v != "0"))
            && self.gpu_kernels()
    }

    /// Work-groups that share one tile of the tiled TQ2_0 GEMM, each a share of its `rounds`:
    /// enough that `tiles` tiles make [`TILED_GROUPS_PER_CU`] work-groups per compute unit,
    /// at most [`TILED_MAX_SPLITS`]; 1 where the kernels have no device-wide fence (the last
    /// work-group's ticket needs one) or the tiles outnumber the tickets.
    fn tiled_splits(&self, tiles: usize, rounds: usize) -> usize {
        let fence = self.device_fences();
        let target = TILED_GROUPS_PER_CU * self.info().compute_units.max(1) as usize;
        if !fence || tiles >= target || tiles > super::device::TICKETS {
            return 1;
        }
        target
            .div_ceil(tiles)
            .min(rounds)
            .clamp(1, TILED_MAX_SPLITS)
    }

    /// Whether the forward pass ends one-token launches with their row op ([`RowTail`]): with
    /// the GPU-shaped kernels, on devices where the kernels have a device-wide fence (NVIDIA's
    /// inline PTX; CPU devices, whose caches are coherent), unless `TERNMUX_CL_ROW_TAILS=0`.
    pub fn row_tails(&self) -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on =
            *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_ROW_TAILS").is_none_or(|v| v != "0"));
        on && self.device_fences() && self.gpu_kernels()
    }

    /// Whether the kernels have a device-wide fence, which a launch's last work-group needs to
    /// see the others' writes (`device_fence` in cl/common.cl): NVIDIA's inline PTX, and CPU
    /// devices, whose caches are coherent.
    fn device_fences(&self) -> bool {
        self.dp4a() || self.info().kind == "CPU"
    }

    /// TQ2_0 matrices (or I2_S ones with rows of a multiple of 256: [`Self::gemv_takes`]) × one
    /// token's int8 activations `q` (scale `s`): the GEMV kernel, which issues several blocks'
    /// loads per work-item before summing (what a GPU needs to keep its memory busy). Same
    /// results as [`ternary_matmul`](Self::ternary_matmul) with one token, which takes this
    /// path on GPUs. With a `tail`, the launch's last work-group then does that row op on the
    /// outputs (one launch instead of two; same results).
    #[allow(clippy::too_many_arguments)]
    pub fn ternary_gemv(
        &self,
        fmt: TernaryFormat,
        k: usize,
        q: &DevBuf,
        s: &DevBuf,
        outs: &[TernaryOut<'_>],
        accumulate: bool,
        tail: Option<&RowTail<'_>>,
    ) -> Result<()> {
        let (kernels, mut args, total) = self.gemv_args(fmt, k, q, s, None, outs, accumulate)?;
        let n = outs[0].rows;
        let name = match tail {
            None => kernels.gemv,
            Some(RowTail { w, eps, y, q, s }) => {
                need("norm weight", w, n * 4)?;
                need("norm output", y, n * 4)?;
                need("quantized output", q, n)?;
                need("token scale", s, 4)?;
                args.extend([
                    Arg::Buf(self.tickets()),
                    Arg::Buf(w),
                    Arg::F32(*eps),
                    Arg::Buf(y),
                    Arg::Buf(q),
                    Arg::Buf(s),
                ]);
                kernels.gemv_norm
            }
        };
        let wg = ROWS_PER_GROUP * TEAM;
        self.launch(name, &[total.div_ceil(ROWS_PER_GROUP) * wg], &[wg], &args)
    }

    /// The gate and up matrices of an FFN (same rows, same row length `k`) × one token's int8
    /// activations, then, by the launch's last work-group, what [`Self::ffn_act_quant`] does
    /// with the two outputs (`gate = act(gate) · up`, the optional sub-norm, the int8
    /// quantization into `q` / `s`): one launch instead of two, the same results. Only where
    /// [`Self::row_tails`] holds.
    #[allow(clippy::too_many_arguments)]
    pub fn ternary_gemv_act(
        &self,
        fmt: TernaryFormat,
        k: usize,
        x: (&DevBuf, &DevBuf),
        gate: TernaryOut<'_>,
        up: TernaryOut<'_>,
        tail: &ActTail<'_>,
    ) -> Result<()> {
        let n = gate.rows;
        if up.rows != n {
            return Err(Error::Device(format!(
                "opencl: FFN gate of {n} rows and up of {} rows in one activation",
                up.rows
            )));
        }
        let outs = [gate, up];
        let (kernels, mut args, total) = self.gemv_args(fmt, k, x.0, x.1, None, &outs, false)?;
        need("quantized output", tail.q, n)?;
        need("token scale", tail.s, 4)?;
        if let Some(w) = tail.norm {
            need("sub-norm weight", w, n * 4)?;
        }
        args.extend([
            Arg::Buf(self.tickets()),
            Arg::I32(act_id(tail.act)),
            Arg::Buf(tail.norm.unwrap_or(self.dummy())),
            Arg::I32(i32::from(tail.norm.is_some())),
            Arg::F32(tail.eps),
            Arg::Buf(tail.q),
            Arg::Buf(tail.s),
        ]);
        let wg = ROWS_PER_GROUP * TEAM;
        self.launch(
            kernels.gemv_act,
            &[total.div_ceil(ROWS_PER_GROUP) * wg],
            &[wg],
            &args,
        )
    }

    /// The arguments every GEMV and few-token entry point starts with (row length,
    /// activations, their scales, the token count for `Some(n_tok)` (the few-token kernel), the
    /// matrices, `accumulate`, the team's local sums: one float per work-item, or
    /// [`FEW_MAX_TOKENS`] for the few-token kernel), its kernel family, and the rows of all the
    /// matrices; buffers checked for one token or `n_tok`.
    #[allow(clippy::too_many_arguments)]
    fn gemv_args<'b>(
        &'b self,
        fmt: TernaryFormat,
        k: usize,
        q: &'b DevBuf,
        s: &'b DevBuf,
        few: Option<usize>,
        outs: &[TernaryOut<'b>],
        accumulate: bool,
    ) -> Result<(Tq2Kernels, Vec<Arg<'b>>, usize)> {
        let like = Tq2Like::of(fmt, k);
        let Some(like) = like.filter(|_| !outs.is_empty() && outs.len() <= 3 && k > 0) else {
            return Err(Error::Device(format!(
                "opencl: GEMV of {} {} matrices with row length {k} (TQ2_0, or I2_S with rows \
                 of a multiple of 256)",
                outs.len(),
                fmt.name()
            )));
        };
        let n_tok = few.unwrap_or(1);
        need("activations", q, n_tok * k)?;
        need("token scales", s, n_tok * 4)?;
        let mut args = vec![int(k)?, Arg::Buf(q), Arg::Buf(s)];
        if few.is_some() {
            args.push(int(n_tok)?);
        }
        let total = self.push_outs(&mut args, outs, fmt, k, n_tok)?;
        args.push(Arg::I32(i32::from(accumulate)));
        let sums = if few.is_some() { FEW_MAX_TOKENS } else { 1 };
        args.push(Arg::Local(ROWS_PER_GROUP * TEAM * sums * 4));
        Ok((like.kernels(), args, total))
    }

    /// TQ2_0 matrices (or I2_S ones with rows of a multiple of 256: [`Self::gemv_takes`]) ×
    /// 1..=[`FEW_MAX_TOKENS`] tokens' int8 activations: a team of work-items per row, each
    /// work-item's share of every block chosen so that the team loads activations as whole
    /// contiguous lines, several blocks' codes in flight per work-item, each code word made
    /// into masks once and applied to every token. A token's outputs are the same bits however
    /// many tokens share the launch.
    #[allow(clippy::too_many_arguments)]
    pub fn ternary_few(
        &self,
        fmt: TernaryFormat,
        k: usize,
        q: &DevBuf,
        s: &DevBuf,
        n_tok: usize,
        outs: &[TernaryOut<'_>],
        accumulate: bool,
    ) -> Result<()> {
        few_tokens("team-per-row few-token kernel", n_tok, FEW_MAX_TOKENS)?;
        let (kernels, args, total) = self.gemv_args(fmt, k, q, s, Some(n_tok), outs, accumulate)?;
        let wg = ROWS_PER_GROUP * TEAM;
        // The entry built for the fewest tokens that hold these.
        let name = kernels.few[match n_tok {
            ..=2 => 0,
            3..=4 => 1,
            _ => 2,
        }];
        self.launch(name, &[total.div_ceil(ROWS_PER_GROUP) * wg], &[wg], &args)
    }

    /// What [`Self::ternary_few`] computes, on NVIDIA's int8 tensor cores (sm_80 and later:
    /// [`Self::mma`]): a work-group of warps per 16 rows, each warp a share of the blocks, the
    /// 1..=[`FEW_MMA_MAX_TOKENS`] tokens one or two tiles of eight of the tensor core's
    /// `m16n8k32`, each block's weight fragments made once for all of them. Its cost barely
    /// grows with the tokens (the team-per-row kernel's does), so batches of
    /// [`FEW_MMA_MIN_TOKENS`] or more take it (H100, BENCHMARKS.md, issue 6, session 22), and
    /// up to 16 tokens it is quicker than the tiled GEMM (session 26). A token's outputs are
    /// the same bits however many tokens share the launch.
    #[allow(clippy::too_many_arguments)]
    pub fn ternary_few_mma(
        &self,
        fmt: TernaryFormat,
        k: usize,
        q: &DevBuf,
        s: &DevBuf,
        n_tok: usize,
        outs: &[TernaryOut<'_>],
        accumulate: bool,
    ) -> Result<()> {
        if !self.mma() {
            return Err(Error::Device(
                "opencl: the tensor-core few-token kernel needs NVIDIA sm_80 or later".into(),
            ));
        }
        let (name, global, local, args) =
            self.few_mma_launch(fmt, k, q, s, n_tok, outs, accumulate)?;
        self.launch(name, &[global], &[local], &args)
    }

    /// The kernel, global and local sizes and arguments of [`Self::ternary_few_mma`] (whose
    /// caller checks [`Self::mma`]).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub(crate) fn few_mma_launch<'b>(
        &'b self,
        fmt: TernaryFormat,
        k: usize,
        q: &'b DevBuf,
        s: &'b DevBuf,
        n_tok: usize,
        outs: &[TernaryOut<'b>],
        accumulate: bool,
    ) -> Result<(&'static str, usize, usize, Vec<Arg<'b>>)> {
        few_tokens("tensor-core few-token kernel", n_tok, FEW_MMA_MAX_TOKENS)?;
        let (kernels, mut args, total) =
            self.gemv_args(fmt, k, q, s, Some(n_tok), outs, accumulate)?;
        // The entry built for the fewest n-tiles of eight that hold the tokens.
        let tiles = n_tok.div_ceil(8);
        let name = kernels.few_mma[tiles - 1];
        // 16 rows per work-group of `ks` warps; their sums meet in local memory.
        let ks = few_mma_warps(k);
        // The team sums' local buffer, which `gemv_args` puts last, sized for this kernel.
        match args.last_mut() {
            Some(sums @ Arg::Local(_)) => *sums = Arg::Local(ks * TEAM * 4 * tiles * 4),
            _ => {
                return Err(Error::Device(
                    "opencl: the few-token arguments do not end with their local sums".into(),
                ));
            }
        }
        let wg = ks * TEAM;
        Ok((name, total.div_ceil(16) * wg, wg, args))
    }

    /// Whether [`Self::ternary_few_mma_norm`] takes `n_tok` tokens of rows of `k` into
    /// matrices of `fmt` on this device: NVIDIA's tensor cores with the GPU-shaped row
    /// kernels, TQ2_0 (or I2_S with rows of a multiple of 256), [`FEW_MMA_MIN_TOKENS`] to 8
    /// tokens (the batches that take the tensor-core few-token kernel's one-tile entry), rows
    /// whose work-groups have the row kernels' size (256 work-items: rows of 2304 or more), so
    /// that both the norm's order of sums and the product's are those of the two launches, and
    /// the rows within local memory. `TERNMUX_CL_FUSE_NORM=0` turns it off, to compare.
    pub fn few_mma_norm_takes(&self, fmt: TernaryFormat, k: usize, n_tok: usize) -> bool {
        let wg = self.row_group();
        Tq2Like::of(fmt, k).is_some()
            && few_mma_warps(k) * TEAM == wg
            && fuse_norm_enabled()
            && few_mma_enabled()
            && self.mma()
            && self.gpu_kernels()
            && (FEW_MMA_MIN_TOKENS..=few_mma_max_tokens().min(8)).contains(&n_tok)
            && wg % TEAM == 0
            && few_norm_local(k, n_tok) + wg * 16 + 1024 <= self.info().local_mem as usize
    }

    /// The few-token product on the tensor cores ([`Self::ternary_few_mma`]) of
    /// `RMSNorm(x) · norm` (rows of `k`, the first `n_tok` of `x`), each work-group norming and
    /// quantizing the rows itself as [`Self::norm_quant`] would (the same bits): one launch
    /// instead of two. Only where [`Self::few_mma_norm_takes`] (an error otherwise).
    #[allow(clippy::too_many_arguments)]
    pub fn ternary_few_mma_norm(
        &self,
        fmt: TernaryFormat,
        k: usize,
        x: &DevBuf,
        norm: &DevBuf,
        eps: f32,
        n_tok: usize,
        outs: &[TernaryOut<'_>],
        accumulate: bool,
    ) -> Result<()> {
        if !self.few_mma_norm_takes(fmt, k, n_tok) {
            return Err(Error::Device(format!(
                "opencl: no normed tensor-core few-token kernel here for {n_tok} tokens of {}                  rows of {k} (NVIDIA sm_80+, {FEW_MMA_MIN_TOKENS} to 8 tokens)",
                fmt.name()
            )));
        }
        let like = Tq2Like::of(fmt, k).ok_or_else(|| {
            Error::Device(format!("opencl: {} rows of {k} for the tensor cores", fmt.name()))
        })?;
        if outs.is_empty() || outs.len() > 3 {
            return Err(Error::Device(format!(
                "opencl: a few-token launch of {} matrices (1 to 3)",
                outs.len()
            )));
        }
        need("norm input", x, n_tok * k * 4)?;
        need("norm weight", norm, k * 4)?;
        let wg = self.row_group();
        let mut args = vec![
            int(k)?,
            Arg::Buf(x),
            Arg::Buf(norm),
            Arg::F32(eps),
            int(n_tok)?,
        ];
        let total = self.push_outs(&mut args, outs, fmt, k, n_tok)?;
        args.extend([
            Arg::I32(i32::from(accumulate)),
            Arg::Local(wg * 16),
            Arg::Local(few_norm_local(k, n_tok)),
        ]);
        self.launch(
            like.kernels().few_mma_norm,
            &[total.div_ceil(16) * wg],
            &[wg],
            &args,
        )
    }

    /// Whether [`Self::ternary_gemv`] takes matrices of `fmt` with rows of `k`.
    pub fn gemv_takes(fmt: TernaryFormat, k: usize) -> bool {
        Tq2Like::of(fmt, k).is_some()
    }

    /// Appends the three (weights, rows, output, scale, bias, has-bias) argument groups of a
    /// ternary launch, checking each output's sizes; returns the rows of all of them.
    fn push_outs<'b>(
        &'b self,
        args: &mut Vec<Arg<'b>>,
        outs: &[TernaryOut<'b>],
        fmt: TernaryFormat,
        k: usize,
        n_tok: usize,
    ) -> Result<usize> {
        let d = self.dummy();
        for i in 0..3 {
            match outs.get(i) {
                Some(o) => {
                    need("ternary weights", o.w, o.rows * fmt.row_bytes(k))?;
                    need("matmul output", o.out, n_tok * o.rows * 4)?;
                    if let Some(b) = o.bias {
                        need("bias", b, o.rows * 4)?;
                    }
                    args.extend([
                        Arg::Buf(o.w),
                        int(o.rows)?,
                        Arg::Buf(o.out),
                        Arg::F32(o.scale),
                        Arg::Buf(o.bias.unwrap_or(d)),
                        Arg::I32(i32::from(o.bias.is_some())),
                    ]);
                }
                None => args.extend([
                    Arg::Buf(d),
                    Arg::I32(0),
                    Arg::Buf(d),
                    Arg::F32(0.0),
                    Arg::Buf(d),
                    Arg::I32(0),
                ]),
            }
        }
        Ok(outs.iter().map(|o| o.rows).sum())
    }

    /// A float/block-quantized matrix (`n` rows of `k`) × f32 activations `x` (`n_tok × k`).
    #[allow(clippy::too_many_arguments)]
    pub fn float_matmul(
        &self,
        fmt: FloatFormat,
        k: usize,
        x: &DevBuf,
        n_tok: usize,
        w: &DevBuf,
        n: usize,
        out: &DevBuf,
        scale: f32,
        accumulate: bool,
    ) -> Result<()> {
        if k == 0 || !k.is_multiple_of(fmt.block_elems()) {
            return Err(Error::Device(format!(
                "opencl: {} rows of length {k} are not whole blocks",
                fmt.name()
            )));
        }
        need("activations", x, n_tok * k * 4)?;
        need("weights", w, n * fmt.row_bytes(k))?;
        need("matmul output", out, n_tok * n * 4)?;
        // The parameters every float matmul kernel starts with, in order, and its local memory
        // last (kernels with more parameters insert them).
        let rb = int(fmt.row_bytes(k))?;
        let (ki, ti, ni) = (int(k)?, int(n_tok)?, int(n)?);
        let shared = |local: usize| {
            vec![
                ki,
                rb,
                Arg::Buf(x),
                ti,
                Arg::Buf(w),
                ni,
                Arg::Buf(out),
                Arg::F32(scale),
                Arg::I32(i32::from(accumulate)),
                Arg::Local(local),
            ]
        };
        // Batches of F16 rows on NVIDIA sm_80+: the f16 tensor cores (activations split into
        // two f16 parts per power-of-two-scaled chunk: f32-grade sums). Batches of 2–8 take the
        // one-tile kernel: on the H100 it reads a 2B model's head (656 MB) at 2–8 tokens in
        // 252–255 µs, as fast as the one-token GEMV, where the 64-token tile took 502–537 µs
        // and the row-team kernel 395–877 µs.
        let (mf_name, mf_toks) = if n_tok < FLOAT_TILED_MIN_TOKENS {
            ("float_matmul_f16_mma8", 8)
        } else {
            ("float_matmul_f16_mma", MF_TOKS)
        };
        let mf_local = 2 * mf_toks * (MF_STRIDE + 1) * 4;
        if fmt == FloatFormat::F16
            && n_tok >= 2
            && k.is_multiple_of(MF_CHUNK)
            && self.mma_f16()
            && self.tiled_gemm()
            && self.info().local_mem >= mf_local as u64
        {
            let args = shared(mf_local);
            return self.launch(
                mf_name,
                &[
                    n.div_ceil(MF_ROWS) * MF_ROWS / 16 * TEAM,
                    n_tok.div_ceil(mf_toks),
                ],
                &[MF_ROWS / 16 * TEAM, 1],
                &args,
            );
        }
        // Batches of F16 rows on a GPU: the tiled kernel (tokens staged in local memory, each
        // work-item a block of rows × tokens).
        if fmt == FloatFormat::F16
            && n_tok >= FLOAT_TILED_MIN_TOKENS
            && k.is_multiple_of(FLOAT_TILED_CHUNK)
            && self.tiled_gemm()
        {
            // Token groups per team: a power of two dividing the team, at most 8 (64 tokens,
            // 9 KiB of local memory); larger batches take several token tiles.
            let tgroups = n_tok.div_ceil(FLOAT_TILED_TPT).next_power_of_two().min(8);
            let (rows, toks) = (
                FLOAT_TILED_TEAMS * TEAM / tgroups * FLOAT_TILED_RPT,
                tgroups * FLOAT_TILED_TPT,
            );
            let mut args = shared(toks * FLOAT_TILED_STRIDE * 4);
            args.insert(4, Arg::I32(tgroups as i32));
            return self.launch(
                "float_matmul_f16_tiled",
                &[
                    n.div_ceil(rows) * FLOAT_TILED_TEAMS * TEAM,
                    n_tok.div_ceil(toks),
                ],
                &[FLOAT_TILED_TEAMS * TEAM, 1],
                &args,
            );
        }
        // One token of F16 rows on a GPU (a decode step's head): the GEMV, several rows per
        // team with their loads issued together (`TERNMUX_CL_HEAD_GEMV=0` sends it to
        // `float_matmul`, to compare).
        if fmt == FloatFormat::F16
            && n_tok == 1
            && k.is_multiple_of(8)
            && self.gpu_kernels()
            && head_gemv_enabled()
        {
            let teams = ROWS_PER_GROUP;
            return self.launch(
                "float_gemv_f16",
                &[n.div_ceil(teams * GEMV_F16_ROWS) * teams * TEAM],
                &[teams * TEAM],
                &[
                    ki,
                    rb,
                    Arg::Buf(x),
                    Arg::Buf(w),
                    ni,
                    Arg::Buf(out),
                    Arg::F32(scale),
                    Arg::I32(i32::from(accumulate)),
                    Arg::Local(teams * TEAM * GEMV_F16_ROWS * 4),
                ],
            );
        }
        // Other batches of F16 rows take four rows per team (activations loaded once for all
        // four).
        let quad_local = ROWS_PER_GROUP * 4 * TB * TEAM * 4;
        let quad = fmt == FloatFormat::F16
            && n_tok > 1
            && k.is_multiple_of(8)
            && TB * 4 == TEAM
            && self.info().local_mem >= quad_local as u64;
        let (kernel, rows_per_team, local) = if quad {
            ("float_matmul_f16_quad", 4, quad_local)
        } else {
            ("float_matmul", 1, ROWS_PER_GROUP * TB * TEAM * 4)
        };
        let mut args = shared(local);
        if !quad {
            args.insert(0, Arg::I32(float_format_id(fmt)));
        }
        self.launch(
            kernel,
            &[
                n.div_ceil(ROWS_PER_GROUP * rows_per_team) * ROWS_PER_GROUP * TEAM,
                n_tok.div_ceil(TB),
            ],
            &[ROWS_PER_GROUP * TEAM, 1],
            &args,
        )
    }

    /// Embedding lookup: `out[t] = dequantize(row ids[t] of w)` for `n_tok` i32 ids. The ids
    /// must be `< n_rows` (checked by the caller against the vocabulary).
    #[allow(clippy::too_many_arguments)]
    pub fn get_rows(
        &self,
        fmt: FloatFormat,
        k: usize,
        w: &DevBuf,
        n_rows: usize,
        ids: &DevBuf,
        n_tok: usize,
        out: &DevBuf,
    ) -> Result<()> {
        need("embedding table", w, n_rows * fmt.row_bytes(k))?;
        need("token ids", ids, n_tok * 4)?;
        need("embedding output", out, n_tok * k * 4)?;
        self.launch(
            "get_rows",
            &[k, n_tok],
            &[64.min(k).max(1), 1],
            &[
                Arg::I32(float_format_id(fmt)),
                int(k)?,
                int(fmt.row_bytes(k))?,
                Arg::Buf(w),
                Arg::Buf(ids),
                Arg::Buf(out),
            ],
        )
    }

    /// Greedy decoding on the device (cl/pick.cl): for each of `rows` rows of `n` values of
    /// `logits` from row `row0`, the index of the largest (lowest index on ties, as
    /// [`crate::sampling::argmax`]) into `ids[row]`. With `advance` (a single row: one sequence
    /// decoding alone), its place moves to the next position too, so the next pass's
    /// [`ClDevice::get_rows`] can read its token from `ids` and its place from the device (the
    /// caller moves the host's record with [`Places::advance`]). On devices with row epilogues
    /// several work-groups share each row and the last one to finish combines their results,
    /// kept in `part` (at least [`pick_part_bytes`]`(rows)`); elsewhere one work-group per row
    /// does it all.
    #[allow(clippy::too_many_arguments)]
    pub fn greedy_pick(
        &self,
        logits: &DevBuf,
        row0: usize,
        n: usize,
        rows: usize,
        ids: &DevBuf,
        part: &DevBuf,
        advance: Option<&Places>,
    ) -> Result<()> {
        need("logits", logits, (row0 + rows) * n * 4)?;
        need("picked tokens", ids, rows * 4)?;
        need("pick partials", part, pick_part_bytes(rows))?;
        if n == 0
            || rows == 0
            || rows > TICKETS
            || advance.is_some_and(|p| p.len() != 1 || rows != 1)
        {
            return Err(Error::Device(format!(
                "opencl: a device pick takes 1..={TICKETS} rows of at least one logit, and one \
                 row when it moves a place (got {rows} rows of {n})"
            )));
        }
        let wg = self.row_group();
        // About 16 logits a work-item.
        let groups = if self.row_tails() {
            (n / (wg * 16)).clamp(1, PICK_GROUPS)
        } else {
            1
        };
        self.launch(
            "greedy_pick",
            &[groups * wg, rows],
            &[wg, 1],
            &[
                Arg::Buf(logits),
                int(row0)?,
                int(n)?,
                Arg::Buf(ids),
                Arg::Buf(advance.map_or(self.dummy(), |p| &p.buf)),
                Arg::I32(i32::from(advance.is_some())),
                int(groups)?,
                Arg::Buf(part),
                Arg::Buf(self.tickets()),
                Arg::Local(wg * 4),
                Arg::Local(wg * 4),
            ],
        )
    }

    /// Rotates q (into `qr`) and k of each row of `places`, and stores rotated k and v as f16
    /// at the row's slot and position of the caches `kc` / `vc` (`slots × n_ctx` positions).
    /// `rope` holds (cos, sin) pairs per position and rotated pair.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_store(
        &self,
        q: &DevBuf,
        k: &DevBuf,
        v: &DevBuf,
        qr: &DevBuf,
        kc: &DevBuf,
        vc: &DevBuf,
        rope: &DevBuf,
        places: &Places,
        sh: RopeShape,
    ) -> Result<()> {
        check_rope(sh, places, [q, k, v], kc, vc, rope)?;
        need("rotated q", qr, places.len() * sh.n_head * sh.head_dim * 4)?;
        self.launch(
            "rope_store",
            &[sh.head_dim, sh.n_head + 2 * sh.n_kv, places.len()],
            &[sh.head_dim.min(64), 1, 1],
            &[
                Arg::Buf(q),
                Arg::Buf(k),
                Arg::Buf(v),
                Arg::Buf(qr),
                Arg::Buf(kc),
                Arg::Buf(vc),
                Arg::Buf(rope),
                Arg::Buf(&places.buf),
                int(places.n_ctx)?,
                int(sh.head_dim)?,
                int(sh.n_rot)?,
                Arg::I32(i32::from(sh.neox)),
                int(sh.n_head)?,
                int(sh.n_kv)?,
            ],
        )
    }

    /// Causal GQA attention of each row of `places` (query row `t` of `qr`) over positions
    /// `0..=pos` of its slot in the f16 caches `kc` / `vc`; `scores` is scratch of
    /// `n_tok × n_head × n_ctx` floats.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        qr: &DevBuf,
        kc: &DevBuf,
        vc: &DevBuf,
        scores: &DevBuf,
        places: &Places,
        sh: RopeShape,
        out: &DevBuf,
    ) -> Result<()> {
        let (n_tok, n_ctx) = (places.len(), places.n_ctx);
        check_attention(sh, places, kc, vc, scores, out)?;
        need("queries", qr, n_tok * sh.n_head * sh.head_dim * 4)?;
        let wg = self.row_group();
        let mut args = vec![
            Arg::Buf(qr),
            Arg::Buf(kc),
            Arg::Buf(vc),
            Arg::Buf(scores),
            int(n_ctx)?,
            Arg::Buf(&places.buf),
            int(sh.head_dim)?,
            int(sh.n_head)?,
            int(sh.n_kv)?,
            Arg::F32(1.0 / (sh.head_dim as f32).sqrt()),
            Arg::Buf(out),
        ];
        args.extend(self.attention_tail(wg, sh, n_ctx));
        self.launch("attention", &[wg * sh.n_head, n_tok], &[wg, 1], &args)
    }

    /// The arguments both attention kernels end with: whether scores stay in local memory, the
    /// GPU-shaped flag, and the local buffers (reduction scratch, the query, the value partial
    /// sums, the scores).
    fn attention_tail(&self, wg: usize, sh: RopeShape, n_ctx: usize) -> [Arg<'static>; 6] {
        let (use_lsc, lsc) = self.local_scores(wg, sh, n_ctx);
        [
            Arg::I32(use_lsc),
            Arg::I32(i32::from(self.gpu_kernels())),
            Arg::Local(wg * 4),
            Arg::Local(sh.head_dim * 4),
            Arg::Local(wg * 32),
            Arg::Local(lsc),
        ]
    }

    /// Whether an attention work-group keeps its scores in local memory (`n_ctx` floats next
    /// to its other local buffers, within the device's local memory), and the bytes to ask for.
    fn local_scores(&self, wg: usize, sh: RopeShape, n_ctx: usize) -> (i32, usize) {
        let others = wg * 4 + sh.head_dim * 4 + wg * 32 + sh.head_dim * 12;
        let want = n_ctx * 4;
        if others + want + 1024 <= self.info().local_mem as usize {
            (1, want)
        } else {
            (0, 4)
        }
    }

    /// [`rope_store`](Self::rope_store) and [`attention`](Self::attention) in one launch, for
    /// passes where no two rows share a slot (decoding): each row's own key and value are
    /// stored and used from local memory, earlier positions read from the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_rope(
        &self,
        q: &DevBuf,
        k: &DevBuf,
        v: &DevBuf,
        kc: &DevBuf,
        vc: &DevBuf,
        rope: &DevBuf,
        scores: &DevBuf,
        places: &Places,
        sh: RopeShape,
        out: &DevBuf,
        tail: Option<&RowTail<'_>>,
    ) -> Result<()> {
        let (n_tok, n_ctx) = (places.len(), places.n_ctx);
        check_attention(sh, places, kc, vc, scores, out)?;
        check_rope(sh, places, [q, k, v], kc, vc, rope)?;
        if !places.one_row_per_slot() {
            return Err(Error::Device(
                "opencl: fused rope and attention need one row per slot".into(),
            ));
        }
        let wg = self.row_group();
        let mut args = vec![
            Arg::Buf(q),
            Arg::Buf(k),
            Arg::Buf(v),
            Arg::Buf(kc),
            Arg::Buf(vc),
            Arg::Buf(rope),
            Arg::Buf(scores),
            int(n_ctx)?,
            Arg::Buf(&places.buf),
            int(sh.head_dim)?,
            int(sh.n_rot)?,
            Arg::I32(i32::from(sh.neox)),
            int(sh.n_head)?,
            int(sh.n_kv)?,
            Arg::F32(1.0 / (sh.head_dim as f32).sqrt()),
            Arg::Buf(out),
        ];
        args.extend(self.attention_tail(wg, sh, n_ctx));
        // The row's own key and value: as floats, and as f16 for the rounding.
        args.extend([Arg::Local(sh.head_dim * 8), Arg::Local(sh.head_dim * 4)]);
        let name = match tail {
            None => "attention_rope",
            Some(RowTail { w, eps, q, s, .. }) => {
                let qd = sh.n_head * sh.head_dim;
                if n_tok > TICKETS {
                    return Err(Error::Device(format!(
                        "opencl: an attention row epilogue takes up to {TICKETS} rows, not {n_tok}"
                    )));
                }
                need("sub-norm weight", w, qd * 4)?;
                need("quantized output", q, n_tok * qd)?;
                need("token scales", s, n_tok * 4)?;
                args.extend([
                    Arg::Buf(self.tickets()),
                    Arg::Buf(w),
                    Arg::F32(*eps),
                    Arg::Buf(q),
                    Arg::Buf(s),
                ]);
                "attention_rope_norm"
            }
        };
        self.launch(name, &[wg * sh.n_head, n_tok], &[wg, 1], &args)
    }
}
