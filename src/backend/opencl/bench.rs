//! Device measurements for `ternmux bench-device`: copy bandwidth (device→device), host→device
//! bandwidth from pageable and pinned memory, and the ternary matmul kernels on real model
//! shapes, reported as achieved GB/s of weights against the copy bandwidth.
//!
//! Kernel timings cycle through copies of each matrix — 256 MiB of them, at most 64 copies, so at
//! least 88 MB for the smallest matrix measured (TQ1_0 2560 × 2560), above the 50 MB L2 of an
//! H100/H200 — so they measure weights streamed from device memory, as in decoding.

use super::device::{ClDevice, DevBuf, KernelTime, Pinned};
use super::ops::TernaryOut;
use crate::error::Result;
use opencl3::event::Event;
use std::time::Instant;
use ternmux_kernels::ternary::TernaryFormat;

/// One bandwidth measurement.
#[derive(Clone, Debug)]
pub struct Bandwidth {
    /// What was measured.
    pub what: String,
    /// Bytes per transfer.
    pub bytes: usize,
    /// Best seconds per transfer.
    pub seconds: f64,
    /// GB/s (10⁹ bytes per second) counting the bytes the memory system moved: a
    /// device→device copy counts its bytes twice (read and write).
    pub gb_s: f64,
}

/// One kernel measurement.
#[derive(Clone, Debug)]
pub struct KernelTiming {
    /// Format.
    pub format: TernaryFormat,
    /// Output rows.
    pub rows: usize,
    /// Row length.
    pub cols: usize,
    /// Tokens (batch).
    pub batch: usize,
    /// Mean seconds per launch (queued back to back, cold weights).
    pub seconds: f64,
    /// Weight bytes read per launch.
    pub weight_bytes: usize,
    /// Weight GB/s.
    pub gb_s: f64,
    /// Mean device seconds per launch from profiling events (start to end of execution), when
    /// the device is [profiling](ClDevice::profiling): the kernel alone, without queueing.
    pub device_seconds: Option<f64>,
}

impl KernelTiming {
    /// Weight GB/s over the device time alone, when profiled.
    pub fn device_gb_s(&self) -> Option<f64> {
        self.device_seconds
            .map(|s| self.weight_bytes as f64 / s.max(1e-12) / 1e9)
    }
}

/// Mean device seconds per launch over a profile's kernels.
fn mean_device_s(profile: &[KernelTime]) -> f64 {
    let (n, t) = profile
        .iter()
        .fold((0u64, 0.0), |(n, t), k| (n + k.launches, t + k.device_s));
    t / n.max(1) as f64
}

fn time_best(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Device→device copy and host→device (pageable, pinned) bandwidth for `bytes`-sized transfers.
pub fn transfer_bandwidth(dev: &ClDevice, bytes: usize, reps: usize) -> Result<Vec<Bandwidth>> {
    let src = dev.alloc(bytes)?;
    let mut dst = dev.alloc(bytes)?;
    // Touch both once so first-use allocation is not timed.
    dev.copy(&src, &mut dst, bytes)?;
    dev.finish()?;
    let d2d = time_best(reps, || {
        dev.copy(&src, &mut dst, bytes)?;
        dev.finish()
    })?;
    let host = vec![1u8; bytes];
    dev.write(&mut dst, 0, &host)?;
    let pageable = time_best(reps, || dev.write(&mut dst, 0, &host))?;
    let mut pinned = dev.pinned(bytes)?;
    pinned.as_mut_slice().fill(1);
    dev.write_from_pinned(&pinned, &mut dst, bytes)?
        .wait()
        .map_err(|e| crate::Error::Device(format!("opencl: pinned write: {e}")))?;
    let pin = time_best(reps, || {
        dev.write_from_pinned(&pinned, &mut dst, bytes)?;
        dev.finish()
    })?;
    let gb = |b: f64, s: f64| b / s / 1e9;
    Ok(vec![
        Bandwidth {
            what: "device→device copy (read + write)".into(),
            bytes,
            seconds: d2d,
            gb_s: gb(2.0 * bytes as f64, d2d),
        },
        Bandwidth {
            what: "host→device, pageable".into(),
            bytes,
            seconds: pageable,
            gb_s: gb(bytes as f64, pageable),
        },
        Bandwidth {
            what: "host→device, pinned (CL_MEM_ALLOC_HOST_PTR)".into(),
            bytes,
            seconds: pin,
            gb_s: gb(bytes as f64, pin),
        },
    ])
}

/// Fixed costs inside a multiplexer page-in, each the median of `reps` tries: a 4 KiB copy from
/// pinned memory on the copy queue waited for by the host (the round trip of a page-in's
/// event), and one read-only sub-buffer view (a unit makes one per tensor).
#[derive(Clone, Copy, Debug)]
pub struct PageInCosts {
    /// Seconds from queueing a 4 KiB pinned copy on the copy queue to its event completing.
    pub copy_round_trip_s: f64,
    /// Seconds to create one sub-buffer view.
    pub sub_buffer_s: f64,
    /// The same 4 KiB copy made to wait for a marker just queued (and flushed) on the idle
    /// compute queue, as a page-in into an evicted unit's storage waits for its eviction fence.
    pub copy_after_fence_s: f64,
    /// Seconds for an 8 MiB pinned copy on the copy queue, waited for by the host.
    pub big_copy_s: f64,
    /// The 8 MiB copy after a fresh compute-queue marker.
    pub big_copy_after_fence_s: f64,
}

/// Measures [`PageInCosts`] on `dev`.
pub fn page_in_costs(dev: &ClDevice, reps: usize) -> Result<PageInCosts> {
    let reps = reps.max(3);
    let small = 4 << 10;
    let pinned = dev.pinned(small)?;
    let mut dst = dev.alloc(small)?;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let trip = |dst: &mut DevBuf, src: &Pinned, bytes: usize, fenced: bool| -> Result<Vec<f64>> {
        let mut trips = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            let fence = if fenced { Some(dev.fence()?) } else { None };
            let after: Vec<&Event> = fence.iter().collect();
            let ev = dev.write_async(dst, 0, src, bytes, &after)?;
            dev.flush_copies()?;
            dev.wait_host(&[&ev])?;
            trips.push(t.elapsed().as_secs_f64());
        }
        Ok(trips)
    };
    let trips = trip(&mut dst, &pinned, small, false)?;
    let fenced = trip(&mut dst, &pinned, small, true)?;
    let big = 8 << 20;
    let mut big_src = dev.pinned(big)?;
    big_src.as_mut_slice().fill(3);
    let mut big_dst = dev.alloc(big)?;
    let big_trips = trip(&mut big_dst, &big_src, big, false)?;
    let big_fenced = trip(&mut big_dst, &big_src, big, true)?;
    let align = dev.info().base_align.max(256);
    let parent = dev.alloc(align * 16)?;
    let mut views = Vec::with_capacity(reps);
    for i in 0..reps {
        let t = Instant::now();
        let v = dev.sub_buffer(&parent, (i % 16) * align, align)?;
        views.push(t.elapsed().as_secs_f64());
        drop(v);
    }
    Ok(PageInCosts {
        copy_round_trip_s: median(trips),
        sub_buffer_s: median(views),
        copy_after_fence_s: median(fenced),
        big_copy_s: median(big_trips),
        big_copy_after_fence_s: median(big_fenced),
    })
}

/// Pseudo-random bytes with every TQ block scale set to a finite f16 (1.0).
fn weights(fmt: TernaryFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let n = fmt.tensor_bytes(rows, cols).unwrap_or(0);
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let (bb, at) = match fmt {
        TernaryFormat::Tq2_0 => (66, 64),
        TernaryFormat::Tq1_0 => (54, 52),
        TernaryFormat::I2S => (0, 0),
    };
    if bb > 0 {
        for blk in v.chunks_exact_mut(bb) {
            blk[at] = 0x00;
            blk[at + 1] = 0x3C;
        }
    }
    v
}

/// Times `fmt` matmuls of `rows × cols` at each batch, weights cold (cycled copies).
pub fn ternary_kernels(
    dev: &ClDevice,
    fmt: TernaryFormat,
    rows: usize,
    cols: usize,
    batches: &[usize],
    launches: usize,
) -> Result<Vec<KernelTiming>> {
    let data = weights(fmt, rows, cols, (rows * 31 + cols) as u64);
    let copies = ((256usize << 20) / data.len().max(1)).clamp(2, 64);
    let bufs: Vec<DevBuf> = (0..copies)
        .map(|_| dev.upload(&data))
        .collect::<Result<_>>()?;
    let max_b = batches.iter().copied().max().unwrap_or(1);
    let q = dev.upload(&vec![1u8; max_b * cols])?;
    let s = dev.upload(bytemuck::cast_slice(&vec![1.0f32; max_b]))?;
    let out = dev.alloc(max_b * rows * 4)?;
    let row_bytes = fmt.row_bytes(cols) * rows;
    let mut res = Vec::new();
    for &b in batches {
        let run = |n: usize| -> Result<()> {
            for i in 0..n {
                let o = TernaryOut {
                    w: &bufs[i % copies],
                    rows,
                    out: &out,
                    scale: 1.0,
                    bias: None,
                };
                dev.ternary_matmul(fmt, cols, &q, &s, b, &[o], false)?;
            }
            dev.finish()
        };
        run(copies)?;
        let secs = time_best(3, || run(launches))? / launches as f64;
        let device_seconds = if dev.profiling() {
            dev.take_profile()?;
            run(launches)?;
            Some(mean_device_s(&dev.take_profile()?))
        } else {
            None
        };
        res.push(KernelTiming {
            format: fmt,
            rows,
            cols,
            batch: b,
            seconds: secs,
            weight_bytes: row_bytes,
            gb_s: row_bytes as f64 / secs / 1e9,
            device_seconds,
        });
    }
    Ok(res)
}

/// Per-launch cost of a row kernel: host time to queue it, wall time per launch when queued back
/// to back (the floor under any kernel's time), and — when the device is
/// [profiling](ClDevice::profiling) — its mean device time.
#[derive(Clone, Copy, Debug)]
pub struct LaunchCost {
    /// Host seconds to queue one launch.
    pub queue_s: f64,
    /// Wall seconds per launch, back to back.
    pub wall_s: f64,
    /// Device seconds per launch (profiling events), when profiled.
    pub device_s: Option<f64>,
}

/// [`LaunchCost`] of `norm_quant` over one row of `n` floats (RMSNorm + int8 quantization when
/// `norm`; a plain copy when not: the tiniest kernel).
pub fn launch_overhead(
    dev: &ClDevice,
    n: usize,
    norm: bool,
    launches: usize,
) -> Result<LaunchCost> {
    let x = dev.alloc(n * 4)?;
    let (y, w) = (
        dev.alloc(n * 4)?,
        dev.upload(bytemuck::cast_slice(&vec![1.0f32; n]))?,
    );
    let (q, s) = (dev.alloc(n)?, dev.alloc(4)?);
    let run = |k: usize| -> Result<f64> {
        let t = Instant::now();
        for _ in 0..k {
            if norm {
                dev.norm_quant(&x, n, 0, 1, Some(&w), 1e-5, Some(&y), Some((&q, &s)))?;
            } else {
                dev.norm_quant(&x, n, 0, 1, None, 0.0, Some(&y), None)?;
            }
        }
        Ok(t.elapsed().as_secs_f64())
    };
    run(16)?;
    dev.finish()?;
    dev.take_profile()?;
    let k = launches.max(1);
    let t = Instant::now();
    let queued = run(k)?;
    dev.finish()?;
    let wall = t.elapsed().as_secs_f64();
    let device_s = if dev.profiling() {
        Some(mean_device_s(&dev.take_profile()?))
    } else {
        None
    };
    Ok(LaunchCost {
        queue_s: queued / k as f64,
        wall_s: wall / k as f64,
        device_s,
    })
}
