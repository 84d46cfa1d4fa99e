//! A model on an OpenCL device: weights copied to device buffers (one per tensor, so no
//! sub-buffer alignment rules apply), the KV cache in device memory (f16), and the forward ops
//! as launches of the `cl/` kernels. Nothing waits for the device until logits are read.

use super::device::{Arg, ClDevice, DevBuf};
use crate::backend::cpu::extend_rope_tables;
use crate::backend::{Backend, Mat, Norm};
use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::model::{FfnAct, KvType, Model, TensorRef};
use std::cell::Cell;
use std::sync::{Arc, Mutex};
use ternmux_kernels::dequant::FloatFormat;
use ternmux_kernels::ternary::{TernaryFormat, TernaryMatrix};

/// Work-items per row team in the matmul kernels (cl/ternary.cl `TEAM`, cl/float.cl `FTEAM`).
const TEAM: usize = 32;
/// Tokens per pass of a matmul work-group (cl/ternary.cl `TB`, cl/float.cl `FTB`).
const TB: usize = 8;
/// Rows per matmul work-group.
const ROWS_PER_GROUP: usize = 8;

/// How a matrix is stored on the device.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// cl/ternary.cl format id.
    Ternary(i32),
    /// cl/common.cl FMT_* id.
    Float(i32),
}

fn float_id(f: FloatFormat) -> i32 {
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

fn ternary_id(f: TernaryFormat) -> i32 {
    match f {
        TernaryFormat::Tq2_0 => 0,
        TernaryFormat::Tq1_0 => 1,
        TernaryFormat::I2S => 2,
    }
}

/// One matrix on the device.
pub struct DevMat {
    buf: Arc<DevBuf>,
    kind: Kind,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// Output scale: the layer's `.scale` times I2_S's per-tensor `w_s`.
    scale: f32,
    bias: Option<DevBuf>,
}

struct DevLayer {
    attn_norm: DevBuf,
    ffn_norm: DevBuf,
    attn_sub: Option<DevBuf>,
    ffn_sub: Option<DevBuf>,
    mats: [DevMat; 7],
}

/// Device buffers of one activation: f32 values, their int8 quantization and per-row scales.
struct Raw {
    f: DevBuf,
    q: DevBuf,
    s: DevBuf,
    cap: usize,
}

/// A model's weights on an OpenCL device, with a pool of activation buffers.
pub struct ClWeights {
    dev: Arc<ClDevice>,
    embd: DevMat,
    output: DevMat,
    output_norm: DevBuf,
    layers: Vec<DevLayer>,
    dummy: DevBuf,
    bytes: usize,
    max_rows: usize,
    pool: Arc<Mutex<Vec<Raw>>>,
}

fn upload_f32(dev: &ClDevice, v: &[f32], bytes: &mut usize) -> Result<DevBuf> {
    *bytes += v.len() * 4;
    dev.upload(bytemuck::cast_slice(v))
}

fn upload_mat(
    dev: &ClDevice,
    model: &Model,
    t: &TensorRef,
    scale: f32,
    bias: Option<&[f32]>,
    bytes: &mut usize,
    shared: Option<&Arc<DevBuf>>,
) -> Result<DevMat> {
    let data = &model.file.as_bytes()[t.range.clone()];
    let (kind, row_bytes, scale) = match t.ty {
        GgmlType::Ternary(f) => {
            let m = TernaryMatrix::new(f, data, t.rows, t.cols)?;
            (
                Kind::Ternary(ternary_id(f)),
                f.row_bytes(t.cols),
                scale * m.tensor_scale(),
            )
        }
        GgmlType::Float(f) => (Kind::Float(float_id(f)), f.row_bytes(t.cols), scale),
    };
    let buf = match shared {
        Some(b) => b.clone(),
        None => {
            *bytes += data.len();
            Arc::new(dev.upload(data)?)
        }
    };
    let bias = bias.map(|b| upload_f32(dev, b, bytes)).transpose()?;
    Ok(DevMat {
        buf,
        kind,
        rows: t.rows,
        cols: t.cols,
        row_bytes,
        scale,
        bias,
    })
}

impl ClWeights {
    /// Copies `model`'s weights to `dev` (one buffer per tensor; a tied head shares the
    /// embedding's buffer).
    pub fn upload(dev: Arc<ClDevice>, model: &Model) -> Result<ClWeights> {
        let w = &model.weights;
        let mut bytes = 0usize;
        let d = &*dev;
        let embd = upload_mat(d, model, &w.token_embd, 1.0, None, &mut bytes, None)?;
        if matches!(embd.kind, Kind::Ternary(_)) {
            return Err(Error::Device(
                "opencl: embedding lookup in a ternary tensor is not supported".into(),
            ));
        }
        let tied = w.output.range == w.token_embd.range;
        let output = upload_mat(
            d,
            model,
            &w.output,
            1.0,
            None,
            &mut bytes,
            tied.then_some(&embd.buf),
        )?;
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            let mats = [
                (&l.wq, 0),
                (&l.wk, 1),
                (&l.wv, 2),
                (&l.wo, 3),
                (&l.w_gate, 4),
                (&l.w_up, 5),
                (&l.w_down, 6),
            ]
            .map(|(t, i)| {
                let bias = if i < 4 { l.biases[i].as_deref() } else { None };
                upload_mat(d, model, t, l.scales[i], bias, &mut bytes, None)
            });
            let [q, k, v, o, g, u, dn] = mats;
            layers.push(DevLayer {
                attn_norm: upload_f32(d, &l.attn_norm, &mut bytes)?,
                ffn_norm: upload_f32(d, &l.ffn_norm, &mut bytes)?,
                attn_sub: l
                    .attn_sub_norm
                    .as_deref()
                    .map(|v| upload_f32(d, v, &mut bytes))
                    .transpose()?,
                ffn_sub: l
                    .ffn_sub_norm
                    .as_deref()
                    .map(|v| upload_f32(d, v, &mut bytes))
                    .transpose()?,
                mats: [q?, k?, v?, o?, g?, u?, dn?],
            });
        }
        let output_norm = upload_f32(d, &w.output_norm, &mut bytes)?;
        let dummy = dev.alloc(16)?;
        Ok(ClWeights {
            dev,
            embd,
            output,
            output_norm,
            layers,
            dummy,
            bytes,
            max_rows: 128,
            pool: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<ClDevice> {
        &self.dev
    }

    /// Bytes of weights on the device.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// One sequence's KV cache in device memory (f16), with the RoPE table and attention scratch.
pub struct ClKv {
    k: Vec<DevBuf>,
    v: Vec<DevBuf>,
    rope: DevBuf,
    cos: Vec<f32>,
    sin: Vec<f32>,
    rope_filled: usize,
    scores: DevBuf,
    max_pass: usize,
    n_ctx: usize,
    bytes: usize,
}

impl ClKv {
    /// A cache for `n_ctx` positions on the weights' device.
    pub fn new(w: &ClWeights, model: &Model, n_ctx: usize, ty: KvType) -> Result<ClKv> {
        if ty != KvType::F16 {
            return Err(Error::Device(
                "opencl: the KV cache is f16 on OpenCL (KvType::F32 is CPU-only)".into(),
            ));
        }
        let c = &model.config;
        let kvd = c.n_head_kv * c.head_dim;
        let layer_bytes = n_ctx * kvd * 2;
        let mut k = Vec::with_capacity(c.n_layer);
        let mut v = Vec::with_capacity(c.n_layer);
        for _ in 0..c.n_layer {
            k.push(w.dev.alloc(layer_bytes)?);
            v.push(w.dev.alloc(layer_bytes)?);
        }
        // Attention scores of one pass: keep the scratch near 64 MiB.
        let per_token = c.n_head * n_ctx * 4;
        let max_pass = ((64usize << 20) / per_token.max(1)).clamp(1, w.max_rows);
        let scores = w.dev.alloc(max_pass * per_token)?;
        let rope = w.dev.alloc(n_ctx * (c.n_rot / 2) * 8)?;
        let bytes = 2 * c.n_layer * layer_bytes + scores.bytes() + rope.bytes();
        Ok(ClKv {
            k,
            v,
            rope,
            cos: Vec::new(),
            sin: Vec::new(),
            rope_filled: 0,
            scores,
            max_pass,
            n_ctx,
            bytes,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// An activation on the device. Its buffers return to the model's pool when dropped.
pub struct ClBuf {
    raw: Option<Raw>,
    quantized: Cell<bool>,
    pool: Arc<Mutex<Vec<Raw>>>,
}

impl ClBuf {
    fn raw(&self) -> Result<&Raw> {
        self.raw
            .as_ref()
            .ok_or_else(|| Error::Device("opencl: activation buffer already released".into()))
    }
}

impl Drop for ClBuf {
    fn drop(&mut self) {
        if let (Some(raw), Ok(mut pool)) = (self.raw.take(), self.pool.lock())
            && pool.len() < 32
        {
            pool.push(raw);
        }
    }
}

/// The OpenCL backend bound to one model.
pub struct ClExec<'a> {
    w: &'a ClWeights,
    model: &'a Model,
    wg: usize,
}

impl<'a> ClExec<'a> {
    /// Runs `model` with its device weights `w`.
    pub fn new(w: &'a ClWeights, model: &'a Model) -> ClExec<'a> {
        // Work-group size of the row kernels: a power of two the device accepts.
        let max = w.dev.info().max_work_group.clamp(1, 256);
        let wg = 1usize << (usize::BITS - 1 - max.leading_zeros());
        ClExec { w, model, wg }
    }

    fn dev(&self) -> &ClDevice {
        &self.w.dev
    }

    fn mat(&self, m: Mat) -> &'a DevMat {
        match m {
            Mat::Output => &self.w.output,
            Mat::Layer(l, which) => &self.w.layers[l].mats[which.index()],
        }
    }

    fn norm_buf(&self, n: Norm) -> Result<&'a DevBuf> {
        let missing = || Error::Device(format!("opencl: the model has no {n:?} norm"));
        Ok(match n {
            Norm::Attn(l) => &self.w.layers[l].attn_norm,
            Norm::Ffn(l) => &self.w.layers[l].ffn_norm,
            Norm::AttnSub(l) => self.w.layers[l].attn_sub.as_ref().ok_or_else(missing)?,
            Norm::FfnSub(l) => self.w.layers[l].ffn_sub.as_ref().ok_or_else(missing)?,
            Norm::Output => &self.w.output_norm,
        })
    }

    /// Launches norm_quant: `y = norm(x rows row0..)` (or `y = x` without a norm) and its int8
    /// quantization.
    #[allow(clippy::too_many_arguments)]
    fn norm_quant(
        &self,
        x: &DevBuf,
        n: usize,
        row0: usize,
        rows: usize,
        norm: Option<&DevBuf>,
        y: &Raw,
        write_y: bool,
    ) -> Result<()> {
        self.dev().launch(
            "norm_quant",
            &[rows * self.wg],
            &[self.wg],
            &[
                Arg::Buf(x),
                Arg::I32(n as i32),
                Arg::I32(row0 as i32),
                Arg::Buf(norm.unwrap_or(&self.w.dummy)),
                Arg::I32(i32::from(norm.is_some())),
                Arg::F32(self.model.config.rms_eps),
                Arg::Buf(&y.f),
                Arg::I32(i32::from(write_y)),
                Arg::Buf(&y.q),
                Arg::Buf(&y.s),
                Arg::I32(1),
                Arg::Local(self.wg * 4),
            ],
        )
    }

    fn ternary_launch(
        &self,
        fmt: i32,
        x: &Raw,
        rows: usize,
        mats: &[(&DevMat, &Raw)],
        accumulate: bool,
    ) -> Result<()> {
        let k = mats[0].0.cols;
        let total: usize = mats.iter().map(|(m, _)| m.rows).sum();
        let mut args = vec![
            Arg::I32(fmt),
            Arg::I32(k as i32),
            Arg::Buf(&x.q),
            Arg::Buf(&x.s),
            Arg::I32(rows as i32),
        ];
        for i in 0..3 {
            match mats.get(i) {
                Some((m, out)) => args.extend([
                    Arg::Buf(&m.buf),
                    Arg::I32(m.rows as i32),
                    Arg::Buf(&out.f),
                    Arg::F32(m.scale),
                    Arg::Buf(m.bias.as_ref().unwrap_or(&self.w.dummy)),
                    Arg::I32(i32::from(m.bias.is_some())),
                ]),
                None => args.extend([
                    Arg::Buf(&self.w.dummy),
                    Arg::I32(0),
                    Arg::Buf(&self.w.dummy),
                    Arg::F32(0.0),
                    Arg::Buf(&self.w.dummy),
                    Arg::I32(0),
                ]),
            }
        }
        args.push(Arg::I32(i32::from(accumulate)));
        args.push(Arg::Local(ROWS_PER_GROUP * TB * TEAM * 4));
        self.dev().launch(
            "ternary_matmul",
            &[total.div_ceil(ROWS_PER_GROUP) * ROWS_PER_GROUP * TEAM, rows.div_ceil(TB)],
            &[ROWS_PER_GROUP * TEAM, 1],
            &args,
        )
    }

    fn float_launch(
        &self,
        fmt: i32,
        x: &Raw,
        rows: usize,
        m: &DevMat,
        out: &Raw,
        accumulate: bool,
    ) -> Result<()> {
        if m.bias.is_some() {
            return Err(Error::Device(
                "opencl: biases on float-typed layer matrices are not supported".into(),
            ));
        }
        self.dev().launch(
            "float_matmul",
            &[m.rows.div_ceil(ROWS_PER_GROUP) * ROWS_PER_GROUP * TEAM, rows.div_ceil(TB)],
            &[ROWS_PER_GROUP * TEAM, 1],
            &[
                Arg::I32(fmt),
                Arg::I32(m.cols as i32),
                Arg::I32(m.row_bytes as i32),
                Arg::Buf(&x.f),
                Arg::I32(rows as i32),
                Arg::Buf(&m.buf),
                Arg::I32(m.rows as i32),
                Arg::Buf(&out.f),
                Arg::F32(m.scale),
                Arg::I32(i32::from(accumulate)),
                Arg::Local(ROWS_PER_GROUP * TB * TEAM * 4),
            ],
        )
    }
}

fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if need > have {
        return Err(Error::Device(format!(
            "opencl: {what} needs {need} values but the buffer holds {have}"
        )));
    }
    Ok(())
}

impl Backend for ClExec<'_> {
    type Buf = ClBuf;
    type Kv = ClKv;

    fn max_tokens_per_pass(&self, kv: &ClKv) -> usize {
        kv.max_pass
    }

    fn alloc(&self, len: usize) -> Result<ClBuf> {
        let mut pool = self
            .w
            .pool
            .lock()
            .map_err(|_| Error::Device("opencl: buffer pool poisoned".into()))?;
        // Smallest pooled buffer that fits, else a new one.
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, r)| r.cap >= len)
            .min_by_key(|(_, r)| r.cap)
            .map(|(i, _)| i);
        let raw = match best {
            Some(i) => pool.swap_remove(i),
            None => {
                let dev = self.dev();
                Raw {
                    f: dev.alloc(len * 4)?,
                    q: dev.alloc(len)?,
                    s: dev.alloc(self.w.max_rows * 4)?,
                    cap: len,
                }
            }
        };
        Ok(ClBuf {
            raw: Some(raw),
            quantized: Cell::new(false),
            pool: self.w.pool.clone(),
        })
    }

    fn embed(&self, tokens: &[u32], x: &mut ClBuf) -> Result<()> {
        let m = &self.w.embd;
        let Kind::Float(fmt) = m.kind else {
            return Err(Error::Device("opencl: ternary embeddings".into()));
        };
        let mut ids = self.alloc(tokens.len())?;
        let as_i32: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        // The f32 slots of a pooled buffer hold the i32 token ids here (same width).
        let ids_raw = ids
            .raw
            .as_mut()
            .ok_or_else(|| Error::Device("opencl: activation buffer already released".into()))?;
        self.dev()
            .write(&mut ids_raw.f, 0, bytemuck::cast_slice(&as_i32))?;
        let ids_raw = ids.raw()?;
        let out = x.raw()?;
        check_len("embedding", out.cap, tokens.len() * m.cols)?;
        self.dev().launch(
            "get_rows",
            &[m.cols, tokens.len()],
            &[64.min(m.cols), 1],
            &[
                Arg::I32(fmt),
                Arg::I32(m.cols as i32),
                Arg::I32(m.row_bytes as i32),
                Arg::Buf(&m.buf),
                Arg::Buf(&ids_raw.f),
                Arg::Buf(&out.f),
            ],
        )?;
        x.quantized.set(false);
        Ok(())
    }

    fn norm(&self, x: &ClBuf, row0: usize, rows: usize, norm: Norm, out: &mut ClBuf) -> Result<()> {
        let w = self.norm_buf(norm)?;
        let n = w.bytes() / 4;
        let (xr, yr) = (x.raw()?, out.raw()?);
        check_len("norm input", xr.cap, (row0 + rows) * n)?;
        check_len("norm output", yr.cap, rows * n)?;
        self.norm_quant(&xr.f, n, row0, rows, Some(w), yr, true)?;
        out.quantized.set(true);
        Ok(())
    }

    fn norm_inplace(&self, x: &mut ClBuf, rows: usize, norm: Norm) -> Result<()> {
        let w = self.norm_buf(norm)?;
        let n = w.bytes() / 4;
        let xr = x.raw()?;
        check_len("norm", xr.cap, rows * n)?;
        self.norm_quant(&xr.f, n, 0, rows, Some(w), xr, true)?;
        x.quantized.set(true);
        Ok(())
    }

    fn project(
        &self,
        x: &ClBuf,
        rows: usize,
        outs: &mut [(Mat, &mut ClBuf)],
        accumulate: bool,
    ) -> Result<()> {
        let xr = x.raw()?;
        let mats: Vec<&DevMat> = outs.iter().map(|(m, _)| self.mat(*m)).collect();
        let k = mats.first().map_or(0, |m| m.cols);
        check_len("matmul input", xr.cap, rows * k)?;
        for ((_, o), m) in outs.iter().zip(&mats) {
            check_len("matmul output", o.raw()?.cap, rows * m.rows)?;
        }
        let ternary: Vec<i32> = mats
            .iter()
            .filter_map(|m| match m.kind {
                Kind::Ternary(f) => Some(f),
                Kind::Float(_) => None,
            })
            .collect();
        if !ternary.is_empty() && !x.quantized.get() {
            self.norm_quant(&xr.f, k, 0, rows, None, xr, false)?;
            x.quantized.set(true);
        }
        let all_same = ternary.len() == mats.len()
            && ternary.windows(2).all(|p| p[0] == p[1])
            && mats.iter().all(|m| m.cols == k)
            && mats.len() <= 3;
        if all_same {
            let pairs: Vec<(&DevMat, &Raw)> = outs
                .iter()
                .zip(&mats)
                .map(|((_, o), m)| Ok((*m, o.raw()?)))
                .collect::<Result<_>>()?;
            self.ternary_launch(ternary[0], xr, rows, &pairs, accumulate)?;
        } else {
            for ((_, o), m) in outs.iter().zip(&mats) {
                match m.kind {
                    Kind::Ternary(f) => {
                        self.ternary_launch(f, xr, rows, &[(*m, o.raw()?)], accumulate)?
                    }
                    Kind::Float(f) => self.float_launch(f, xr, rows, m, o.raw()?, accumulate)?,
                }
            }
        }
        for (_, o) in outs.iter() {
            o.quantized.set(false);
        }
        Ok(())
    }

    fn rope_store(
        &self,
        kv: &mut ClKv,
        layer: usize,
        pos0: usize,
        rows: usize,
        q: &ClBuf,
        k: &ClBuf,
        v: &ClBuf,
        q_out: &mut ClBuf,
    ) -> Result<()> {
        let c = &self.model.config;
        let half = c.n_rot / 2;
        let end = pos0 + rows;
        if end > kv.n_ctx {
            return Err(Error::Context {
                needed: end,
                limit: kv.n_ctx,
            });
        }
        if end > kv.rope_filled {
            extend_rope_tables(self.model, end, &mut kv.cos, &mut kv.sin);
            let from = kv.rope_filled;
            let mut inter = Vec::with_capacity((end - from) * half * 2);
            for i in from * half..end * half {
                inter.push(kv.cos[i]);
                inter.push(kv.sin[i]);
            }
            self.dev()
                .write(&mut kv.rope, from * half * 8, bytemuck::cast_slice(&inter))?;
            kv.rope_filled = end;
        }
        let (qd, kvd) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        check_len("rope q", q.raw()?.cap, rows * qd)?;
        check_len("rope k", k.raw()?.cap, rows * kvd)?;
        check_len("rope v", v.raw()?.cap, rows * kvd)?;
        check_len("rope out", q_out.raw()?.cap, rows * qd)?;
        self.dev().launch(
            "rope_store",
            &[c.head_dim, c.n_head + 2 * c.n_head_kv, rows],
            &[c.head_dim.min(64), 1, 1],
            &[
                Arg::Buf(&q.raw()?.f),
                Arg::Buf(&k.raw()?.f),
                Arg::Buf(&v.raw()?.f),
                Arg::Buf(&q_out.raw()?.f),
                Arg::Buf(&kv.k[layer]),
                Arg::Buf(&kv.v[layer]),
                Arg::Buf(&kv.rope),
                Arg::I32(pos0 as i32),
                Arg::I32(c.head_dim as i32),
                Arg::I32(c.n_rot as i32),
                Arg::I32(i32::from(c.rope_neox)),
                Arg::I32(c.n_head as i32),
                Arg::I32(c.n_head_kv as i32),
            ],
        )?;
        q_out.quantized.set(false);
        Ok(())
    }

    fn attention(
        &self,
        kv: &ClKv,
        layer: usize,
        pos0: usize,
        rows: usize,
        q: &ClBuf,
        out: &mut ClBuf,
    ) -> Result<()> {
        let c = &self.model.config;
        if rows > kv.max_pass {
            return Err(Error::Device(format!(
                "opencl: an attention pass of {rows} tokens exceeds the scratch for {}",
                kv.max_pass
            )));
        }
        let wg = self.wg.min(128);
        check_len("attention out", out.raw()?.cap, rows * c.n_head * c.head_dim)?;
        self.dev().launch(
            "attention",
            &[wg * c.n_head, rows],
            &[wg, 1],
            &[
                Arg::Buf(&q.raw()?.f),
                Arg::Buf(&kv.k[layer]),
                Arg::Buf(&kv.v[layer]),
                Arg::Buf(&kv.scores),
                Arg::I32(kv.n_ctx as i32),
                Arg::I32(pos0 as i32),
                Arg::I32(c.head_dim as i32),
                Arg::I32(c.n_head as i32),
                Arg::I32(c.n_head_kv as i32),
                Arg::F32(1.0 / (c.head_dim as f32).sqrt()),
                Arg::Buf(&out.raw()?.f),
                Arg::Local(wg * 4),
                Arg::Local(c.head_dim * 4),
            ],
        )?;
        out.quantized.set(false);
        Ok(())
    }

    fn ffn_act(
        &self,
        g: &mut ClBuf,
        u: &ClBuf,
        rows: usize,
        act: FfnAct,
        sub_norm: Option<Norm>,
    ) -> Result<()> {
        let n = self.model.config.n_ff;
        let w = sub_norm.map(|s| self.norm_buf(s)).transpose()?;
        let (gr, ur) = (g.raw()?, u.raw()?);
        check_len("ffn gate", gr.cap, rows * n)?;
        check_len("ffn up", ur.cap, rows * n)?;
        self.dev().launch(
            "ffn_act_quant",
            &[rows * self.wg],
            &[self.wg],
            &[
                Arg::Buf(&gr.f),
                Arg::Buf(&ur.f),
                Arg::I32(n as i32),
                Arg::I32(match act {
                    FfnAct::Silu => 0,
                    FfnAct::Relu2 => 1,
                }),
                Arg::Buf(w.unwrap_or(&self.w.dummy)),
                Arg::I32(i32::from(w.is_some())),
                Arg::F32(self.model.config.rms_eps),
                Arg::Buf(&gr.q),
                Arg::Buf(&gr.s),
                Arg::Local(self.wg * 4),
            ],
        )?;
        g.quantized.set(true);
        Ok(())
    }

    fn read(&self, x: &ClBuf, len: usize, out: &mut Vec<f32>) -> Result<()> {
        let r = x.raw()?;
        check_len("read", r.cap, len)?;
        let at = out.len();
        out.resize(at + len, 0.0);
        self.dev()
            .read(&r.f, 0, bytemuck::cast_slice_mut(&mut out[at..]))
    }
}
