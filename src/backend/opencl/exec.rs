//! A model on an OpenCL device: weights copied to device buffers (one per tensor, so no
//! sub-buffer alignment rules apply), the KV cache in device memory (f16), and the forward ops
//! as launches of the `cl/` kernels. Nothing waits for the device until logits are read.

use super::device::{ClDevice, DevBuf};
use super::ops::{RopeShape, TernaryOut};
use crate::backend::cpu::extend_rope_tables;
use crate::backend::{Backend, Mat, Norm};
use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::model::{FfnAct, KvType, Model, TensorRef};
use std::cell::Cell;
use std::sync::{Arc, Mutex};
use ternmux_kernels::ternary::{TernaryFormat, TernaryMatrix};

/// Most tokens in one pass (sizes every activation's per-token scale buffer).
const MAX_PASS_ROWS: usize = 128;

/// One matrix on the device.
pub struct DevMat {
    buf: Arc<DevBuf>,
    ty: GgmlType,
    rows: usize,
    cols: usize,
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
    bytes: usize,
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
    let scale = match t.ty {
        GgmlType::Ternary(f) => scale * TernaryMatrix::new(f, data, t.rows, t.cols)?.tensor_scale(),
        GgmlType::Float(_) => scale,
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
        ty: t.ty,
        rows: t.rows,
        cols: t.cols,
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
        if matches!(embd.ty, GgmlType::Ternary(_)) {
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
        Ok(ClWeights {
            dev,
            embd,
            output,
            output_norm,
            layers,
            bytes,
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
        let max_pass = ((64usize << 20) / per_token.max(1)).clamp(1, MAX_PASS_ROWS);
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
}

impl<'a> ClExec<'a> {
    /// Runs `model` with its device weights `w`.
    pub fn new(w: &'a ClWeights, model: &'a Model) -> ClExec<'a> {
        ClExec { w, model }
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

    fn shape(&self) -> RopeShape {
        let c = &self.model.config;
        RopeShape {
            head_dim: c.head_dim,
            n_rot: c.n_rot,
            neox: c.rope_neox,
            n_head: c.n_head,
            n_kv: c.n_head_kv,
        }
    }
}

fn ternary_out<'b>(m: &'b DevMat, o: &'b Raw) -> TernaryOut<'b> {
    TernaryOut {
        w: &m.buf,
        rows: m.rows,
        out: &o.f,
        scale: m.scale,
        bias: m.bias.as_ref(),
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
                    s: dev.alloc(MAX_PASS_ROWS * 4)?,
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
        let GgmlType::Float(fmt) = m.ty else {
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
        self.dev().get_rows(
            fmt,
            m.cols,
            &m.buf,
            m.rows,
            &ids.raw()?.f,
            tokens.len(),
            &x.raw()?.f,
        )?;
        x.quantized.set(false);
        Ok(())
    }

    fn norm(&self, x: &ClBuf, row0: usize, rows: usize, norm: Norm, out: &mut ClBuf) -> Result<()> {
        let w = self.norm_buf(norm)?;
        let n = w.bytes() / 4;
        let y = out.raw()?;
        self.dev().norm_quant(
            &x.raw()?.f,
            n,
            row0,
            rows,
            Some(w),
            self.model.config.rms_eps,
            Some(&y.f),
            Some((&y.q, &y.s)),
        )?;
        out.quantized.set(true);
        Ok(())
    }

    fn norm_inplace(&self, x: &mut ClBuf, rows: usize, norm: Norm) -> Result<()> {
        let w = self.norm_buf(norm)?;
        let n = w.bytes() / 4;
        let r = x.raw()?;
        self.dev().norm_quant(
            &r.f,
            n,
            0,
            rows,
            Some(w),
            self.model.config.rms_eps,
            Some(&r.f),
            Some((&r.q, &r.s)),
        )?;
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
        let formats: Vec<Option<TernaryFormat>> = mats
            .iter()
            .map(|m| match m.ty {
                GgmlType::Ternary(f) => Some(f),
                GgmlType::Float(_) => None,
            })
            .collect();
        if formats.iter().any(Option::is_some) && !x.quantized.get() {
            self.dev()
                .norm_quant(&xr.f, k, 0, rows, None, 0.0, None, Some((&xr.q, &xr.s)))?;
            x.quantized.set(true);
        }
        let raws: Vec<&Raw> = outs.iter().map(|(_, o)| o.raw()).collect::<Result<_>>()?;
        // Matrices of one ternary format sharing the input go in one launch.
        let one_launch = formats[0].is_some()
            && formats.iter().all(|f| *f == formats[0])
            && mats.iter().all(|m| m.cols == k)
            && mats.len() <= 3;
        if let (true, Some(fmt)) = (one_launch, formats[0]) {
            let group: Vec<TernaryOut<'_>> = mats
                .iter()
                .zip(&raws)
                .map(|(m, o)| ternary_out(m, o))
                .collect();
            self.dev()
                .ternary_matmul(fmt, k, &xr.q, &xr.s, rows, &group, accumulate)?;
        } else {
            for (m, o) in mats.iter().zip(&raws) {
                match m.ty {
                    GgmlType::Ternary(f) => self.dev().ternary_matmul(
                        f,
                        m.cols,
                        &xr.q,
                        &xr.s,
                        rows,
                        &[ternary_out(m, o)],
                        accumulate,
                    )?,
                    GgmlType::Float(f) => {
                        if m.bias.is_some() {
                            return Err(Error::Device(
                                "opencl: biases on float-typed layer matrices are not supported"
                                    .into(),
                            ));
                        }
                        self.dev().float_matmul(
                            f, m.cols, &xr.f, rows, &m.buf, m.rows, &o.f, m.scale, accumulate,
                        )?
                    }
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
        let half = self.model.config.n_rot / 2;
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
        self.dev().rope_store(
            &q.raw()?.f,
            &k.raw()?.f,
            &v.raw()?.f,
            &q_out.raw()?.f,
            &kv.k[layer],
            &kv.v[layer],
            &kv.rope,
            pos0,
            rows,
            self.shape(),
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
        self.dev().attention(
            &q.raw()?.f,
            &kv.k[layer],
            &kv.v[layer],
            &kv.scores,
            kv.n_ctx,
            pos0,
            rows,
            self.shape(),
            &out.raw()?.f,
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
        let w = sub_norm.map(|s| self.norm_buf(s)).transpose()?;
        let gr = g.raw()?;
        self.dev().ffn_act_quant(
            &gr.f,
            &u.raw()?.f,
            self.model.config.n_ff,
            rows,
            act,
            w,
            self.model.config.rms_eps,
            &gr.q,
            &gr.s,
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
