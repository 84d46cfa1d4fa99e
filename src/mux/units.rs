//! Units of residency: what one page-in copies. A transformer block (its seven matrices with
//! their biases and norm vectors, and the next block's attention norm, packed into one
//! allocation) or the output head (the head
//! matrix — the embeddings when tied — and the final norm). Token embeddings are gathered on the
//! host for each pass (a few rows per token), so they never take device memory.

use crate::backend::{LayerMat, Mat, Norm};
use crate::model::Model;
use std::fmt;

/// One unit of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnitId {
    /// Transformer block `n`.
    Block(usize),
    /// The output head and final norm.
    Head,
}

impl fmt::Display for UnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnitId::Block(n) => write!(f, "blk.{n}"),
            UnitId::Head => f.write_str("head"),
        }
    }
}

/// What a piece of a unit holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PieceKind {
    /// A matrix (packed as in the file).
    Mat(Mat),
    /// The f32 bias of a block matrix.
    Bias(LayerMat),
    /// An f32 norm weight.
    Norm(Norm),
    /// The codes of the CPU's int8 head (`crate::model::HeadMode::Int8`), in place of
    /// `Mat(Output)` on a host store.
    Int8Codes,
    /// The f32 row scales of the CPU's int8 head.
    Int8Scales,
}

/// A piece of a unit: where it sits in the unit's allocation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub kind: PieceKind,
    pub offset: usize,
    pub len: usize,
}

/// The packed layout of one unit.
#[derive(Clone, Debug)]
pub struct UnitLayout {
    /// Which unit.
    pub id: UnitId,
    pub(crate) pieces: Vec<Piece>,
    /// Size of the unit's allocation in bytes (pieces plus alignment padding).
    pub bytes: usize,
}

impl UnitLayout {
    pub(crate) fn piece(&self, kind: PieceKind) -> Option<&Piece> {
        self.pieces.iter().find(|p| p.kind == kind)
    }
}

const MATS: [LayerMat; 7] = [
    LayerMat::Q,
    LayerMat::K,
    LayerMat::V,
    LayerMat::O,
    LayerMat::Gate,
    LayerMat::Up,
    LayerMat::Down,
];

/// The bytes of a piece of `unit`, borrowed from the model (the mapping, the f32 vectors
/// decoded at load, or the int8 head, made on the first call that needs it; empty if it could
/// not be made).
pub(crate) fn piece_bytes(model: &Model, unit: UnitId, kind: PieceKind) -> &[u8] {
    let w = model.weights();
    let file = model.file().as_bytes();
    match (unit, kind) {
        (_, PieceKind::Int8Codes) => model.int8_head().map_or(&[][..], |h| h.matrix.codes()),
        (_, PieceKind::Int8Scales) => model
            .int8_head()
            .map_or(&[][..], |h| f32_bytes(h.matrix.scales())),
        (_, PieceKind::Mat(m)) => w
            .matrix(unit, m)
            .map_or(&[][..], |(t, _, _)| &file[t.range.clone()]),
        (_, PieceKind::Norm(n)) => f32_bytes(w.norm(unit, n).unwrap_or(&[])),
        (_, PieceKind::Bias(m)) => f32_bytes(
            w.matrix(unit, Mat::Layer(m))
                .and_then(|(_, _, b)| b)
                .unwrap_or(&[]),
        ),
    }
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// The length of a piece, without making the int8 head.
fn piece_len(model: &Model, unit: UnitId, kind: PieceKind) -> usize {
    let t = &model.weights().output;
    match kind {
        PieceKind::Int8Codes => t.rows * t.cols,
        PieceKind::Int8Scales => t.rows * 4,
        _ => piece_bytes(model, unit, kind).len(),
    }
}

/// Every unit of `model`, blocks first then the head. Pieces start at multiples of `align`;
/// `with_vectors` packs the f32 norms and biases too (devices need them; the CPU reads them from
/// the model). Without them (a host store) a head the CPU computes in int8 is packed as its
/// int8 codes and scales, which is what the CPU reads.
pub fn layouts(model: &Model, align: usize, with_vectors: bool) -> Vec<UnitLayout> {
    let align = align.max(1);
    let mut out = Vec::with_capacity(model.config.n_layer + 1);
    let mut pack = |id: UnitId, kinds: &[PieceKind]| {
        let mut pieces = Vec::with_capacity(kinds.len());
        let mut at = 0usize;
        for &kind in kinds {
            let len = piece_len(model, id, kind);
            if len == 0 {
                continue;
            }
            pieces.push(Piece {
                kind,
                offset: at,
                len,
            });
            at = (at + len).next_multiple_of(align);
        }
        out.push(UnitLayout {
            id,
            pieces,
            bytes: at.max(align),
        });
    };
    for l in 0..model.config.n_layer {
        let mut kinds: Vec<PieceKind> = MATS
            .iter()
            .map(|&m| PieceKind::Mat(Mat::Layer(m)))
            .collect();
        if with_vectors {
            kinds.extend(MATS[..4].iter().map(|&m| PieceKind::Bias(m)));
            kinds.extend(
                [
                    Norm::Attn,
                    Norm::Ffn,
                    Norm::AttnSub,
                    Norm::FfnSub,
                    Norm::Next,
                ]
                .map(PieceKind::Norm),
            );
        }
        pack(UnitId::Block(l), &kinds);
    }
    let mut head = if !with_vectors && model.int8_head_applies() {
        vec![PieceKind::Int8Codes, PieceKind::Int8Scales]
    } else {
        vec![PieceKind::Mat(Mat::Output)]
    };
    if with_vectors {
        head.push(PieceKind::Norm(Norm::Output));
    }
    pack(UnitId::Head, &head);
    out
}
