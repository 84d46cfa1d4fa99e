//! A CPU batch split by sequence. When a block's weights (and the head) fit in a core's cache,
//! the sequences of a batched step are dealt to the rayon pool's threads and each part runs as
//! a whole pass on one thread, its products kept there
//! ([`ternmux_kernels::serial::serial`]).
//!
//! Splitting every product's rows between threads instead costs a fork and a join per product:
//! about 40 a step for the bundled 8-block model, each with its wake-ups, around serial norms,
//! rotations and activations that leave the other cores idle. On the 2-core CI machine, two
//! threads ran the bundled model's 12-row steps only 1.2–1.4 times as fast as one. A part reads
//! every weight again, which is free while they stay in cache and doubles the memory traffic
//! when they do not, so large models keep splitting their products.
//!
//! A sequence's rows stay in one part: a prompt chunk's rows attend to one another's keys.
//! Parts are dealt largest first to the least loaded, and a batch whose largest part would
//! still hold most of the rows (a long prompt chunk beside a few decoding rows) is not split.

/// Bytes of a block's linear layers, and of the head, up to which a batch may be split: each
/// part reads all of them, so they must stay in a core's L2 (1–2 MiB on current x86 and Arm
/// server cores) while the parts run.
pub(crate) const SPLIT_MAX_UNIT_BYTES: usize = 1 << 20;

/// The least `rows ÷ rows of the largest part` for which a split is taken: splitting each
/// product's rows between two threads ran the bundled model 1.2–1.4 times as fast as one
/// thread, so a split must promise more.
pub(crate) const MIN_SPLIT_GAIN: f64 = 1.4;

/// Deals sequences of `rows[i]` rows to at most `threads` parts: each part lists its sequences
/// in their original order. `None` when fewer than two parts would have rows or the split
/// gains less than [`MIN_SPLIT_GAIN`].
///
/// Largest first, each to the part with the fewest rows so far (ties to the lowest part).
pub(crate) fn plan(rows: &[usize], threads: usize) -> Option<Vec<Vec<usize>>> {
    let n_parts = threads.min(rows.len());
    if n_parts < 2 {
        return None;
    }
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i]));
    let mut parts: Vec<(usize, Vec<usize>)> = vec![(0, Vec::new()); n_parts];
    for i in order {
        let least = parts
            .iter_mut()
            .min_by_key(|(load, _)| *load)
            .expect("at least two parts");
        least.0 += rows[i];
        least.1.push(i);
    }
    let total: usize = rows.iter().sum();
    let largest = parts.iter().map(|(load, _)| *load).max().unwrap_or(0);
    let used = parts.iter().filter(|(load, _)| *load > 0).count();
    if used < 2 || (total as f64) < MIN_SPLIT_GAIN * largest as f64 {
        return None;
    }
    Some(
        parts
            .into_iter()
            .filter(|(load, _)| *load > 0)
            .map(|(_, mut seqs)| {
                seqs.sort_unstable();
                seqs
            })
            .collect(),
    )
}

#[cfg(test)]
thread_local! {
    /// Split passes begun on this thread (tests check that a batch really split).
    pub(crate) static SPLIT_PASSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether batches may be split at all (`TERNMUX_CPU_SPLIT=0` turns it off, to compare).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_CPU_SPLIT").is_none_or(|v| v != "0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{KvCache, KvType, Model, SeqChunk};

    /// Logits of `chunks` (one step) as one batch, and of each chunk run alone in its own
    /// cache, must agree; `steps` are run in turn on the same caches.
    fn batch_against_alone(m: &Model, steps: &[Vec<Vec<u32>>]) -> usize {
        let n = steps[0].len();
        let v = m.config.n_vocab;
        let mut batch = KvCache::with_slots(m, 64, n, KvType::F16).unwrap();
        let mut alone: Vec<KvCache> = (0..n)
            .map(|_| KvCache::with_slots(m, 64, 1, KvType::F16).unwrap())
            .collect();
        let before = SPLIT_PASSES.with(|c| c.get());
        for step in steps {
            let chunks: Vec<SeqChunk<'_>> = step
                .iter()
                .enumerate()
                .map(|(slot, tokens)| SeqChunk {
                    slot,
                    tokens,
                    logits: true,
                    pick: false,
                })
                .collect();
            let together = m.forward_batch(&mut batch, &chunks).unwrap();
            for (i, tokens) in step.iter().enumerate() {
                let one = SeqChunk {
                    slot: 0,
                    tokens,
                    logits: true,
                    pick: false,
                };
                let own = m.forward_batch(&mut alone[i], &[one]).unwrap();
                let got = &together[i * v..(i + 1) * v];
                let scale = own.iter().fold(1f32, |a, x| a.max(x.abs()));
                let diff = own
                    .iter()
                    .zip(got)
                    .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                assert!(diff <= 1e-4 * scale, "sequence {i}: max diff {diff}");
            }
        }
        SPLIT_PASSES.with(|c| c.get()) - before
    }

    #[test]
    fn a_split_batch_gives_each_sequence_its_own_logits() {
        let m = Model::open("models/bitllama2c-stories3M-TQ2_0.gguf").unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let prompts = ["Once upon a time", "The dog", "Lily saw a big red", "Tom"];
        let prefill: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| m.tokenizer.encode(p, true, false))
            .collect();
        // Prompts of different lengths, then two decoding steps of one row each.
        let steps = vec![prefill, vec![vec![42]; 4], vec![vec![7]; 4]];
        let splits = pool.install(|| batch_against_alone(&m, &steps));
        assert_eq!(
            splits, 3,
            "every step of four sequences splits on three threads"
        );
    }

    #[test]
    fn decoding_rows_are_dealt_evenly_and_keep_their_order() {
        assert_eq!(
            plan(&[1; 7], 2),
            Some(vec![vec![0, 2, 4, 6], vec![1, 3, 5]])
        );
        assert_eq!(plan(&[1, 1], 4), Some(vec![vec![0], vec![1]]));
    }

    #[test]
    fn a_long_chunk_goes_alone_and_the_rest_fill_the_other_parts() {
        // 12 rows: 6 | 3 | 1 + 1 + 1, so the largest part holds half.
        assert_eq!(
            plan(&[1, 6, 1, 3, 1], 3),
            Some(vec![vec![1], vec![3], vec![0, 2, 4]])
        );
    }

    #[test]
    fn no_split_that_gains_too_little() {
        // A 38-row prompt chunk beside seven decoding rows: 45 / 38 < 1.4.
        let mut rows = vec![1; 7];
        rows.push(38);
        assert_eq!(plan(&rows, 2), None);
        assert_eq!(plan(&[5], 2), None);
        assert_eq!(plan(&[1, 1], 1), None);
        assert_eq!(plan(&[], 2), None);
    }
}
