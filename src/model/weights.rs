//! Weight lookup and validation: every tensor a graph needs is found and shape-checked at load,
//! so a file that does not fit its architecture fails with the tensor's name — never later in the
//! forward pass.
//!
//! Linear layers stay in the mapping: a [`TensorRef`] records a tensor's type and byte range, and
//! [`TensorRef::linear`] wraps those bytes as a kernel matrix on use (O(1), no copy). Only the
//! 1-D norm vectors and `.scale` scalars are decoded to f32 at load (a few MB for a 2B model;
//! counted in [`Weights::decoded_bytes`]).

use super::config::{Arch, Config};
use crate::error::{Error, Result};
use crate::gguf::{GgmlType, GgufFile, TensorInfo};
use std::ops::Range;
use ternmux_kernels::dequant::FloatFormat;
use ternmux_kernels::matmul::FloatMatrix;
use ternmux_kernels::ternary::TernaryMatrix;

/// A tensor's type, location and 2-D shape (`rows` outputs × `cols` inputs).
#[derive(Clone, Debug)]
pub struct TensorRef {
    /// Storage type.
    pub ty: GgmlType,
    /// Byte range in the file.
    pub range: Range<usize>,
    /// Rows (`ne[1]`, output features / vocabulary entries).
    pub rows: usize,
    /// Row length (`ne[0]`, input features).
    pub cols: usize,
}

/// A linear layer's weights, borrowed from the mapping.
pub enum Linear<'a> {
    /// TQ1_0, TQ2_0 or I2_S.
    Ternary(TernaryMatrix<'a>),
    /// Any float or block-quantized format.
    Float(FloatMatrix<'a>),
}

impl TensorRef {
    /// Wraps the tensor's bytes as a kernel matrix.
    pub fn linear<'a>(&self, file: &'a GgufFile) -> Result<Linear<'a>> {
        let bytes = &file.as_bytes()[self.range.clone()];
        Ok(match self.ty {
            GgmlType::Ternary(f) => {
                Linear::Ternary(TernaryMatrix::new(f, bytes, self.rows, self.cols)?)
            }
            GgmlType::Float(f) => Linear::Float(FloatMatrix::new(f, bytes, self.rows, self.cols)?),
        })
    }

    /// Dequantizes row `r` (an embedding lookup) into `out` (`cols` values).
    pub fn row_f32(&self, file: &GgufFile, r: usize, out: &mut [f32]) -> Result<()> {
        let GgmlType::Float(f) = self.ty else {
            return Err(Error::Quant(format!(
                "row lookup in a {} tensor is not supported",
                self.ty.name()
            )));
        };
        if r >= self.rows {
            return Err(Error::Quant(format!(
                "row {r} out of range (tensor has {} rows)",
                self.rows
            )));
        }
        let rb = f.row_bytes(self.cols);
        let bytes = &file.as_bytes()[self.range.start + r * rb..self.range.start + (r + 1) * rb];
        f.dequantize(bytes, &mut out[..self.cols]);
        Ok(())
    }
}

/// One transformer block's weights.
pub struct Layer {
    /// Pre-attention RMSNorm weight.
    pub attn_norm: Vec<f32>,
    /// Query projection.
    pub wq: TensorRef,
    /// Key projection.
    pub wk: TensorRef,
    /// Value projection.
    pub wv: TensorRef,
    /// Output projection.
    pub wo: TensorRef,
    /// Norm applied to the attention output before `wo` (bitnet families).
    pub attn_sub_norm: Option<Vec<f32>>,
    /// Pre-FFN RMSNorm weight.
    pub ffn_norm: Vec<f32>,
    /// Gate projection.
    pub w_gate: TensorRef,
    /// Up projection.
    pub w_up: TensorRef,
    /// Down projection.
    pub w_down: TensorRef,
    /// Norm applied to the FFN hidden state before `w_down` (bitnet families).
    pub ffn_sub_norm: Option<Vec<f32>>,
    /// Optional per-tensor output scales (`blk.N.*.scale`) for q, k, v, o, gate, up, down.
    pub scales: [f32; 7],
    /// Optional biases for q, k, v, o (llama).
    pub biases: [Option<Vec<f32>>; 4],
}

impl Layer {
    /// Bytes of the block's seven linear layers in the file (what one token's pass reads).
    pub fn matrix_bytes(&self) -> usize {
        [
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
        .iter()
        .map(|t| t.range.len())
        .sum()
    }

    /// The tensor of one of the block's linear layers.
    pub fn tensor(&self, m: crate::backend::LayerMat) -> &TensorRef {
        use crate::backend::LayerMat;
        match m {
            LayerMat::Q => &self.wq,
            LayerMat::K => &self.wk,
            LayerMat::V => &self.wv,
            LayerMat::O => &self.wo,
            LayerMat::Gate => &self.w_gate,
            LayerMat::Up => &self.w_up,
            LayerMat::Down => &self.w_down,
        }
    }
}

/// All weights of a model.
pub struct Weights {
    /// Token embeddings (`n_vocab` rows of `n_embd`).
    pub token_embd: TensorRef,
    /// Final RMSNorm weight.
    pub output_norm: Vec<f32>,
    /// Output head (the embeddings when tied).
    pub output: TensorRef,
    /// Whether the head is tied to the embeddings.
    pub tied: bool,
    /// Per-dimension RoPE frequency divisors (`rope_freqs.weight`), if present.
    pub rope_freqs: Option<Vec<f32>>,
    /// Transformer blocks.
    pub layers: Vec<Layer>,
    /// Bytes of f32 decoded at load (norms, scales, biases).
    pub decoded_bytes: usize,
}

impl Weights {
    /// Matrix `m` of `unit`: its tensor, output scale (`.scale`, 1 when absent) and bias. The head
    /// unit holds only [`Mat::Output`](crate::backend::Mat::Output), and a block only its layers.
    pub fn matrix(
        &self,
        unit: crate::mux::UnitId,
        m: crate::backend::Mat,
    ) -> Option<(&TensorRef, f32, Option<&[f32]>)> {
        use crate::backend::Mat;
        use crate::mux::UnitId;
        match (unit, m) {
            (UnitId::Head, Mat::Output) => Some((&self.output, 1.0, None)),
            (UnitId::Block(l), Mat::Layer(which)) => {
                let layer = self.layers.get(l)?;
                let bias = layer.biases.get(which.index()).and_then(|b| b.as_deref());
                Some((layer.tensor(which), layer.scales[which.index()], bias))
            }
            _ => None,
        }
    }

    /// Norm `n` of `unit` (`None` when the architecture has no such norm there).
    pub fn norm(&self, unit: crate::mux::UnitId, n: crate::backend::Norm) -> Option<&[f32]> {
        use crate::backend::Norm;
        use crate::mux::UnitId;
        match (unit, n) {
            (UnitId::Head, Norm::Output) => Some(&self.output_norm),
            (UnitId::Block(l), _) => {
                let layer = self.layers.get(l)?;
                match n {
                    Norm::Attn => Some(&layer.attn_norm),
                    Norm::Ffn => Some(&layer.ffn_norm),
                    Norm::AttnSub => layer.attn_sub_norm.as_deref(),
                    Norm::FfnSub => layer.ffn_sub_norm.as_deref(),
                    Norm::Next => self.layers.get(l + 1).map(|next| &next.attn_norm[..]),
                    Norm::Output => None,
                }
            }
            _ => None,
        }
    }
}

struct Loader<'a> {
    file: &'a GgufFile,
    decoded: usize,
}

impl Loader<'_> {
    fn find(&self, name: &str) -> Result<&TensorInfo> {
        self.file
            .tensor(name)
            .ok_or_else(|| Error::Gguf(format!("missing tensor {name:?}")))
    }

    fn check_dims(&self, t: &TensorInfo, want: &[usize]) -> Result<()> {
        let dims: Vec<usize> = t.dims().iter().map(|&d| d as usize).collect();
        let mut trimmed = dims.clone();
        while trimmed.len() > want.len() && trimmed.last() == Some(&1) {
            trimmed.pop();
        }
        if trimmed != want {
            return Err(Error::Gguf(format!(
                "tensor {:?} has shape {dims:?} but the configuration needs {want:?}",
                t.name()
            )));
        }
        Ok(())
    }

    /// A 2-D weight of `rows` outputs × `cols` inputs.
    fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<TensorRef> {
        let t = self.find(name)?;
        self.check_dims(t, &[cols, rows])?;
        let ty = t
            .ggml_type()
            .map_err(|e| Error::Gguf(format!("tensor {name:?}: {e}")))?;
        Ok(TensorRef {
            ty,
            range: t.file_range(),
            rows,
            cols,
        })
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.find(name)?;
        self.check_dims(t, &[len])?;
        let ty = t
            .ggml_type()
            .map_err(|e| Error::Gguf(format!("tensor {name:?}: {e}")))?;
        if !matches!(
            ty,
            GgmlType::Float(FloatFormat::F32 | FloatFormat::F16 | FloatFormat::BF16)
        ) {
            return Err(Error::Gguf(format!(
                "tensor {name:?}: norm/bias of type {} (expected F32, F16 or BF16)",
                ty.name()
            )));
        }
        let v = crate::quant::decode(ty, self.file.tensor_data(t)?, 1, len)?;
        self.decoded += v.len() * 4;
        Ok(v)
    }

    fn optional_vector(&mut self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        if self.file.tensor(name).is_none() {
            return Ok(None);
        }
        self.vector(name, len).map(Some)
    }
}

impl Weights {
    /// Finds and validates every tensor `cfg` needs.
    pub fn load(file: &GgufFile, cfg: &Config) -> Result<Weights> {
        let mut l = Loader { file, decoded: 0 };
        let (e, q, kv, ff) = (
            cfg.n_embd,
            cfg.n_head * cfg.head_dim,
            cfg.n_head_kv * cfg.head_dim,
            cfg.n_ff,
        );
        let token_embd = l.matrix("token_embd.weight", e, cfg.n_vocab)?;
        if !matches!(token_embd.ty, GgmlType::Float(_)) {
            return Err(Error::Gguf(format!(
                "tensor \"token_embd.weight\": embeddings of type {} are not supported",
                token_embd.ty.name()
            )));
        }
        let output_norm = l.vector("output_norm.weight", e)?;
        let (output, tied) = match file.tensor("output.weight") {
            Some(_) => (l.matrix("output.weight", e, cfg.n_vocab)?, false),
            None => (token_embd.clone(), true),
        };
        let rope_freqs = l.optional_vector("rope_freqs.weight", cfg.n_rot / 2)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let sub = cfg.sub_norms;
            let mut scales = [1.0f32; 7];
            for (slot, s) in scales.iter_mut().zip([
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ]) {
                if cfg.arch != Arch::Llama
                    && let Some(v) = l.optional_vector(&n(&format!("{s}.scale")), 1)?
                {
                    *slot = v[0];
                }
            }
            let biases = [
                l.optional_vector(&n("attn_q.bias"), q)?,
                l.optional_vector(&n("attn_k.bias"), kv)?,
                l.optional_vector(&n("attn_v.bias"), kv)?,
                l.optional_vector(&n("attn_output.bias"), e)?,
            ];
            layers.push(Layer {
                attn_norm: l.vector(&n("attn_norm.weight"), e)?,
                wq: l.matrix(&n("attn_q.weight"), e, q)?,
                wk: l.matrix(&n("attn_k.weight"), e, kv)?,
                wv: l.matrix(&n("attn_v.weight"), e, kv)?,
                wo: l.matrix(&n("attn_output.weight"), q, e)?,
                attn_sub_norm: if sub {
                    Some(l.vector(&n("attn_sub_norm.weight"), q)?)
                } else {
                    None
                },
                ffn_norm: l.vector(&n("ffn_norm.weight"), e)?,
                w_gate: l.matrix(&n("ffn_gate.weight"), e, ff)?,
                w_up: l.matrix(&n("ffn_up.weight"), e, ff)?,
                w_down: l.matrix(&n("ffn_down.weight"), ff, e)?,
                ffn_sub_norm: if sub {
                    Some(l.vector(&n("ffn_sub_norm.weight"), ff)?)
                } else {
                    None
                },
                scales,
                biases,
            });
        }
        // Every linear layer must be one the kernels can multiply.
        for (i, layer) in layers.iter().enumerate() {
            for (name, t) in [
                ("attn_q", &layer.wq),
                ("attn_k", &layer.wk),
                ("attn_v", &layer.wv),
                ("attn_output", &layer.wo),
                ("ffn_gate", &layer.w_gate),
                ("ffn_up", &layer.w_up),
                ("ffn_down", &layer.w_down),
            ] {
                t.linear(file)
                    .map_err(|e| Error::Gguf(format!("tensor \"blk.{i}.{name}.weight\": {e}")))?;
            }
        }
        output
            .linear(file)
            .map_err(|e| Error::Gguf(format!("output head: {e}")))?;
        Ok(Weights {
            token_embd,
            output_norm,
            output,
            tied,
            rope_freqs,
            layers,
            decoded_bytes: l.decoded,
        })
    }
}
