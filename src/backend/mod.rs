//! Compute backends: the only way the forward pass touches compute.
//!
//! The architecture code ([`crate::model`]) describes *what* to compute — a short list of ops per
//! layer, written once over the [`Backend`] trait — and a backend decides *how*: [`cpu`] runs the
//! `ternmux-kernels` crate over the memory-mapped weights, [`opencl`] runs the OpenCL C kernels in
//! `cl/` over device copies of them. Each backend owns its buffers ([`Backend::Buf`], its KV
//! cache [`Backend::Kv`]).
//!
//! [`Device`] names where a model should run; [`Device::resolve`] turns it into a
//! [`Placement`], falling back to the CPU with a message that says why when OpenCL cannot be used
//! (no library, no platform, no device) — never a panic.
//!
//! ```
//! use ternmux::backend::Device;
//! let d: Device = "opencl:1".parse()?;
//! assert_eq!(d, Device::OpenCl(Some(1)));
//! assert_eq!("cpu".parse::<Device>()?, Device::Cpu);
//! assert!("gpu9".parse::<Device>().is_err());
//! # Ok::<(), ternmux::Error>(())
//! ```

pub mod cpu;
pub mod opencl;

use crate::error::{Error, Result};
use crate::model::FfnAct;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Where a model should run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// The best OpenCL GPU if there is one, else the CPU.
    #[default]
    Auto,
    /// The CPU kernels.
    Cpu,
    /// An OpenCL device: `None` picks the best one (GPUs first), `Some(n)` the n-th of
    /// [`opencl::list_devices`].
    OpenCl(Option<usize>),
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "opencl" | "gpu" => Ok(Device::OpenCl(None)),
            _ => match s.strip_prefix("opencl:") {
                Some(n) => n.parse().map(|n| Device::OpenCl(Some(n))).map_err(|_| {
                    Error::Device(format!(
                        "{s:?}: the device index must be a number (see `ternmux devices`)"
                    ))
                }),
                None => Err(Error::Device(format!(
                    "unknown device {s:?}: use auto, cpu, opencl or opencl:N"
                ))),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::OpenCl(None) => f.write_str("opencl"),
            Device::OpenCl(Some(n)) => write!(f, "opencl:{n}"),
        }
    }
}

/// A resolved device: what a model will run on, and why.
#[derive(Clone)]
pub enum Placement {
    /// The CPU kernels.
    Cpu,
    /// An OpenCL device (shared by every model placed on it).
    OpenCl(Arc<opencl::ClDevice>),
}

impl Placement {
    /// One line naming the device, e.g. `opencl: NVIDIA H100 80GB HBM3 (NVIDIA CUDA, GPU)`.
    pub fn describe(&self) -> String {
        match self {
            Placement::Cpu => format!(
                "cpu: {} kernels, {} threads",
                ternmux_kernels::Kernels::get().isa().name(),
                rayon::current_num_threads()
            ),
            Placement::OpenCl(d) => format!(
                "opencl: {}{}{}",
                d.info(),
                if d.dp4a() { ", dp4a byte sums" } else { "" },
                if d.mma() { ", int8 tensor cores" } else { "" }
            ),
        }
    }
}

impl Device {
    /// Picks the device. `Auto` takes the best OpenCL GPU, else the CPU; `OpenCl` takes the
    /// requested device. When OpenCL cannot be used the result is the CPU, and the note says why
    /// and how to fix it (the note is `None` when the request was met).
    pub fn resolve(self) -> (Placement, Option<String>) {
        match self {
            Device::Cpu => (Placement::Cpu, None),
            Device::Auto => match opencl::ClDevice::best(true) {
                Ok(d) => (Placement::OpenCl(d), None),
                Err(why) => (
                    Placement::Cpu,
                    Some(format!("no OpenCL GPU, running on the CPU: {why}")),
                ),
            },
            Device::OpenCl(index) => {
                let got = match index {
                    Some(i) => opencl::ClDevice::open(i),
                    None => opencl::ClDevice::best(false),
                };
                match got {
                    Ok(d) => (Placement::OpenCl(d), None),
                    Err(why) => (
                        Placement::Cpu,
                        Some(format!(
                            "OpenCL unusable, running on the CPU instead: {why}"
                        )),
                    ),
                }
            }
        }
    }
}

/// A linear layer of one transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerMat {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// FFN gate.
    Gate,
    /// FFN up.
    Up,
    /// FFN down.
    Down,
}

impl LayerMat {
    /// Index into [`crate::model::Layer::scales`] (q, k, v, o, gate, up, down).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A matrix of a resident unit, as the forward pass names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mat {
    /// The output head (the embeddings when tied), in the head unit.
    Output,
    /// A linear layer of the block unit.
    Layer(LayerMat),
}

/// An RMSNorm weight of a resident unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// Before attention.
    Attn,
    /// Before the FFN.
    Ffn,
    /// On the attention output (bitnet families).
    AttnSub,
    /// On the FFN hidden state (bitnet families).
    FfnSub,
    /// After the last block (head unit).
    Output,
    /// The next block's [`Norm::Attn`], packed with this block too (absent from the last
    /// block), so that the block's last projection can norm its output for the next block in
    /// the same launch ([`Backend::project_residual_norm`]) without that block's unit.
    Next,
}

/// Where one row of a pass belongs: its sequence's KV-cache slot and its position there. A pass
/// may hold rows of several sequences (continuous batching); the linear layers see one batch of
/// rows, RoPE and attention follow each row's place.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowPlace {
    /// Cache slot (sequence) of the row.
    pub slot: u32,
    /// Position of the row's token in its sequence.
    pub pos: u32,
}

/// The weights of one unit (a block or the head) where a backend can compute with them: host
/// bytes (the mapping itself, or a copy the multiplexer owns) or device buffers.
pub enum Resident {
    /// CPU: the mapping or a host copy.
    Host(cpu::HostUnit),
    /// OpenCL: one device allocation with a view per tensor.
    Device(opencl::DevUnit),
}

/// The ops of the forward pass. Buffers hold rows of f32 (one row per token); which row widths
/// they hold is the caller's business, as in any tensor library.
pub trait Backend: Sync {
    /// An activation buffer.
    type Buf: Send;
    /// One sequence's KV cache.
    type Kv: Send;
    /// A resident unit's weights in this backend's form.
    type Unit: Sync;
    /// Runs `ops`, one block's compute over `work` bytes (its weight bytes × rows), where this
    /// backend computes best. The CPU runs a large block as one job inside its thread pool, so
    /// the products within it fork and join among pool threads instead of waking the pool and
    /// sleeping on a latch once per product. `ops` must not block on anything but its own work
    /// (no page-in, no lock another pass holds): a pool thread waiting in a join may run
    /// another pass's `ops` on top of its stack.
    fn compute<R: Send>(&self, work: usize, ops: impl FnOnce() -> R + Send) -> R {
        let _ = work;
        ops()
    }
    /// Whether the forward pass should hand [`Backend::compute`] every resident block it can
    /// pin at once (one job for the run), rather than one block at a time. A device queues
    /// each block's ops as soon as its unit is pinned and frees the pin when they are queued,
    /// so it keeps one block at a time; the CPU saves a handoff to its pool per block.
    fn runs_of_blocks(&self) -> bool {
        false
    }
    /// Whether the forward pass keeps the pins of resident blocks until the pass is queued and
    /// gives them back together (a block that must be paged in first gives back the pins held
    /// so far, so a model streaming through a budget smaller than itself still frees each block
    /// after use). On a device each pin given back queues a fence; given back together, the
    /// pass's blocks share one ([`crate::backend::opencl::ClDevice::fence`]).
    fn unpins_together(&self) -> bool {
        false
    }
    /// Makes, before [`Backend::compute`] runs the head, what projecting with `head`'s
    /// [`Mat::Output`] needs and may be slow to make the first time (the CPU's int8 head, built
    /// on first use behind a lock that `compute`'s ops must not wait on).
    fn prepare_head(&self, head: &Self::Unit) -> Result<()> {
        let _ = head;
        Ok(())
    }
    /// This backend's view of a resident unit (an error if it belongs to another backend).
    fn unit<'r>(&self, r: &'r Resident) -> Result<&'r Self::Unit>;
    /// The most tokens one pass may hold (longer prompts are split into passes).
    fn max_tokens_per_pass(&self, kv: &Self::Kv) -> usize;
    /// A buffer of `len` f32 values (contents unspecified).
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// Embedding rows of `tokens` into `x` (`tokens.len()` rows of `n_embd`). `tied_head` is the
    /// head unit when the head is the embedding table and already resident (a device looks the
    /// rows up there); otherwise rows are gathered on the host from the mapping.
    fn embed(
        &self,
        tied_head: Option<&Self::Unit>,
        tokens: &[u32],
        x: &mut Self::Buf,
    ) -> Result<()>;
    /// `out` = RMSNorm of rows `row0 .. row0 + rows` of `x`, times unit `u`'s norm weight.
    #[allow(clippy::too_many_arguments)]
    fn norm(
        &self,
        u: &Self::Unit,
        norm: Norm,
        x: &Self::Buf,
        row0: usize,
        rows: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// RMSNorm of `rows` rows of `x` in place.
    fn norm_inplace(
        &self,
        u: &Self::Unit,
        norm: Norm,
        x: &mut Self::Buf,
        rows: usize,
    ) -> Result<()>;
    /// `out_i = x · W_iᵀ` (times the layer's `.scale`, plus its bias) for matrices of unit `u`
    /// that share the input `x` (`rows` tokens); `accumulate` adds into `out_i` instead
    /// (residual connections).
    fn project(
        &self,
        u: &Self::Unit,
        x: &Self::Buf,
        rows: usize,
        outs: &mut [(Mat, &mut Self::Buf)],
        accumulate: bool,
    ) -> Result<()>;
    /// Rotates `q` into `q_out` and `k`, and stores rotated `k` and `v` of each row at its
    /// place (slot, position) in block `layer`'s cache.
    #[allow(clippy::too_many_arguments)]
    fn rope_store(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        rows: &[RowPlace],
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        q_out: &mut Self::Buf,
    ) -> Result<()>;
    /// Causal grouped-query attention of each row's query over positions `0..=pos` of its
    /// slot in block `layer`'s cache (stored by [`Backend::rope_store`] for this pass's rows).
    fn attention(
        &self,
        kv: &Self::Kv,
        layer: usize,
        rows: &[RowPlace],
        q: &Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// [`Backend::rope_store`] then [`Backend::attention`] of the rotated queries (through
    /// `q_rot`) into `out`, then unit `sub_norm`'s [`Norm::AttnSub`] of `out` in place when
    /// given — unless the backend fuses them (then `q_rot` is left as it was).
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        rows: &[RowPlace],
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        q_rot: &mut Self::Buf,
        out: &mut Self::Buf,
        sub_norm: Option<&Self::Unit>,
    ) -> Result<()> {
        self.rope_store(kv, layer, rows, q, k, v, q_rot)?;
        self.attention(kv, layer, rows, q_rot, out)?;
        match sub_norm {
            Some(u) => self.norm_inplace(u, Norm::AttnSub, out, rows.len()),
            None => Ok(()),
        }
    }
    /// `x += inp · W_matᵀ` (a residual projection), then `out` = unit `u`'s `norm` of `x`: the
    /// [`Backend::project`] and [`Backend::norm`] that follow each other inside every block,
    /// which a backend may do in one launch.
    #[allow(clippy::too_many_arguments)]
    fn project_residual_norm(
        &self,
        u: &Self::Unit,
        inp: &Self::Buf,
        rows: usize,
        mat: Mat,
        x: &mut Self::Buf,
        norm: Norm,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.project(u, inp, rows, &mut [(mat, &mut *x)], true)?;
        self.norm(u, norm, x, 0, rows, out)
    }
    /// Whether a pass of `rows` tokens has its projections norm their own input
    /// ([`Backend::norm_project`]) instead of ending each residual projection with the next
    /// norm ([`Backend::project_residual_norm`]): where a projection does both in one launch.
    fn norms_in_projections(&self, rows: usize) -> bool {
        let _ = rows;
        false
    }
    /// `h` = unit `u`'s `norm` of the first `rows` rows of `x`, then [`Backend::project`] of
    /// `h` into `outs`: the two calls by default; a backend that norms inside the projection's
    /// launch leaves `h` unwritten.
    #[allow(clippy::too_many_arguments)]
    fn norm_project(
        &self,
        u: &Self::Unit,
        norm: Norm,
        x: &Self::Buf,
        rows: usize,
        h: &mut Self::Buf,
        outs: &mut [(Mat, &mut Self::Buf)],
    ) -> Result<()> {
        self.norm(u, norm, x, 0, rows, h)?;
        self.project(u, h, rows, outs, false)
    }
    /// `g = act(g) · u`, then unit `w`'s FFN sub-norm when `sub_norm`, for `rows` rows.
    #[allow(clippy::too_many_arguments)]
    fn ffn_act(
        &self,
        w: &Self::Unit,
        g: &mut Self::Buf,
        u: &Self::Buf,
        rows: usize,
        act: FfnAct,
        sub_norm: bool,
    ) -> Result<()>;
    /// The FFN's gate and up projections of `x` into `g` and `u`, then [`Backend::ffn_act`]
    /// on them: two calls by default; a device may do both in one launch.
    #[allow(clippy::too_many_arguments)]
    fn project_act(
        &self,
        w: &Self::Unit,
        x: &Self::Buf,
        rows: usize,
        g: &mut Self::Buf,
        u: &mut Self::Buf,
        act: FfnAct,
        sub_norm: bool,
    ) -> Result<()> {
        project_act_apart(self, w, x, rows, g, u, act, sub_norm)
    }
    /// Appends the first `len` values of `x` to `out` (waits for the device).
    fn read(&self, x: &Self::Buf, len: usize, out: &mut Vec<f32>) -> Result<()>;
    /// Appends to `out` the greedy token (largest logit, lowest id on ties, as
    /// [`crate::sampling::argmax`]) of each of `rows` rows of `logits` from row `row0` (rows of
    /// `n_vocab`); waits for the device. A device chooses there and sends back only the ids;
    /// by default the rows are read and chosen on the host.
    #[allow(clippy::too_many_arguments)]
    fn pick_rows(
        &self,
        _kv: &mut Self::Kv,
        logits: &Self::Buf,
        row0: usize,
        rows: usize,
        n_vocab: usize,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let mut all = Vec::new();
        self.read(logits, (row0 + rows) * n_vocab, &mut all)?;
        out.extend(
            all[row0 * n_vocab..]
                .chunks_exact(n_vocab.max(1))
                .map(crate::sampling::argmax),
        );
        Ok(())
    }
    /// Embeds, as one row of `x`, the token the last [`Backend::pick_greedy`] on `kv` chose.
    /// `tied_head` as in [`Backend::embed`]; without a table on the device the backend waits
    /// for the token and embeds it from the host.
    fn embed_picked(
        &self,
        _kv: &mut Self::Kv,
        _tied_head: Option<&Self::Unit>,
        _x: &mut Self::Buf,
    ) -> Result<()> {
        Err(crate::error::Error::Device(
            "this backend does not choose tokens on a device".into(),
        ))
    }
    /// Chooses the greedy token (largest logit, lowest id on ties) of the one row of `logits`
    /// on the device, keeps it there for the next pass, moves the row's place to the next
    /// position, and starts bringing the token back to the host (in order, for
    /// `take_pick`). Returns without waiting for the device.
    fn pick_greedy(&self, _kv: &mut Self::Kv, _logits: &Self::Buf, _n_vocab: usize) -> Result<()> {
        Err(crate::error::Error::Device(
            "this backend does not choose tokens on a device".into(),
        ))
    }
}

/// [`Backend::project_act`] as its two calls: the gate and up projections, then
/// [`Backend::ffn_act`] (the default, and a device's way where one launch cannot do both).
#[allow(clippy::too_many_arguments)]
pub fn project_act_apart<B: Backend + ?Sized>(
    be: &B,
    w: &B::Unit,
    x: &B::Buf,
    rows: usize,
    g: &mut B::Buf,
    u: &mut B::Buf,
    act: FfnAct,
    sub_norm: bool,
) -> Result<()> {
    be.project(
        w,
        x,
        rows,
        &mut [
            (Mat::Layer(LayerMat::Gate), &mut *g),
            (Mat::Layer(LayerMat::Up), &mut *u),
        ],
        false,
    )?;
    be.ffn_act(w, g, u, rows, act, sub_norm)
}
