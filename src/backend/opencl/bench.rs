//! Device measurements for `ternmux bench-device`: copy bandwidth (device→device), host→device
//! bandwidth from pageable and pinned memory, and the ternary matmul kernels on real model
//! shapes, reported as achieved GB/s of weights against the copy bandwidth.
//!
//! Kernel timings cycle through copies of each matrix — 256 MiB of them, at most 64 copies, so at
//! least 88 MB for the smallest matrix measured (TQ1_0 2560 × 2560), above the 50 MB L2 of an
//! H100/H200 — so they measure weights streamed from device memory, as in decoding.

use super::device::{Arg, ClDevice, DevBuf, KernelTime, Pinned};
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
    /// The 8 MiB copy when its pinned source was just written again by all cores (as a
    /// staged page-in fills its staging buffer just before the copy); the fill is not timed.
    pub big_copy_refilled_s: f64,
    /// The 8 MiB copy with a dozen read-only views of its destination made while it is in
    /// flight (as a page-in makes its unit's tensor views).
    pub big_copy_viewed_s: f64,
    /// The 8 MiB copy after all cores rewrote its source with streaming stores (what a staged
    /// page-in's fill does; `ternmux_kernels::copy`).
    pub big_copy_streamed_s: f64,
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
    let align = dev.info().base_align.max(256);
    // How a trip differs from a plain timed copy.
    #[derive(Clone, Copy, PartialEq)]
    enum Trip {
        Plain,
        Fenced,
        Refilled,
        Streamed,
        Viewed,
    }
    let host = vec![5u8; 8 << 20];
    let trip = |dst: &mut DevBuf, src: &mut Pinned, bytes: usize, how: Trip| -> Result<Vec<f64>> {
        let mut trips = Vec::with_capacity(reps);
        for _ in 0..reps {
            if matches!(how, Trip::Refilled | Trip::Streamed) {
                use rayon::prelude::*;
                src.as_mut_slice()[..bytes]
                    .par_chunks_mut(256 << 10)
                    .zip(host[..bytes].par_chunks(256 << 10))
                    .for_each(|(d, s)| {
                        if how == Trip::Streamed {
                            ternmux_kernels::copy::copy_streaming(d, s);
                        } else {
                            d.copy_from_slice(s);
                        }
                    });
            }
            let t = Instant::now();
            let fence = if how == Trip::Fenced {
                Some(dev.fence()?)
            } else {
                None
            };
            let after: Vec<&Event> = fence.iter().collect();
            let ev = dev.write_async(dst, 0, src, 0, bytes, &after)?;
            dev.flush_copies()?;
            let views = if how == Trip::Viewed {
                (0..12)
                    .map(|i| dev.sub_buffer(dst, i * align, align))
                    .collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            dev.wait_host(&[&ev])?;
            trips.push(t.elapsed().as_secs_f64());
            drop(views);
        }
        Ok(trips)
    };
    let mut pinned = pinned;
    let trips = trip(&mut dst, &mut pinned, small, Trip::Plain)?;
    let fenced = trip(&mut dst, &mut pinned, small, Trip::Fenced)?;
    let big = 8 << 20;
    let mut big_src = dev.pinned(big)?;
    big_src.as_mut_slice().fill(3);
    let mut big_dst = dev.alloc(big)?;
    let big_trips = trip(&mut big_dst, &mut big_src, big, Trip::Plain)?;
    let big_fenced = trip(&mut big_dst, &mut big_src, big, Trip::Fenced)?;
    let big_refilled = trip(&mut big_dst, &mut big_src, big, Trip::Refilled)?;
    let big_viewed = trip(&mut big_dst, &mut big_src, big, Trip::Viewed)?;
    let big_streamed = trip(&mut big_dst, &mut big_src, big, Trip::Streamed)?;
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
        big_copy_refilled_s: median(big_refilled),
        big_copy_viewed_s: median(big_viewed),
        big_copy_streamed_s: median(big_streamed),
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

/// Device copies of `data` to cycle through so that each launch reads its weights from device
/// memory, not the L2: `count` of them, or by default 256 MiB worth (2 to 64).
fn cold_copies(dev: &ClDevice, data: &[u8], count: Option<usize>) -> Result<Vec<DevBuf>> {
    let n = count.unwrap_or(((256usize << 20) / data.len().max(1)).clamp(2, 64));
    (0..n).map(|_| dev.upload(data)).collect()
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
    let bufs = cold_copies(dev, &data, None)?;
    let copies = bufs.len();
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

/// Wall seconds per launch of one kernel queued three ways: all on one compute queue; spread
/// over two queues by one thread (alternating); spread over two queues by two threads, one
/// each (how an engine's model workers queue). When the device runs two queues' kernels side by
/// side, the two-queue figures fall toward half the one-queue figure; when it takes them in
/// turns (or the driver serializes the threads' queueing), they stay near it.
#[derive(Clone, Copy, Debug)]
pub struct QueueOverlap {
    /// One queue: wall seconds per launch.
    pub one_queue_s: f64,
    /// Host seconds to queue one launch (one queue, one thread).
    pub queue_s: f64,
    /// Two queues, one thread.
    pub two_queues_s: f64,
    /// Two queues, two threads.
    pub two_threads_s: f64,
}

/// Measures [`QueueOverlap`] for `launches` launches of `launch(i)` (`i` counts the launches
/// of one queue; the caller's closure is called on the thread that is bound to that queue).
pub fn queue_overlap(
    dev: &ClDevice,
    launches: usize,
    launch: impl Fn(usize, usize) -> Result<()> + Sync,
) -> Result<QueueOverlap> {
    let n = launches.max(2) & !1;
    let lanes = dev.lanes().min(2);
    let on = |lane: usize, i: usize| -> Result<()> {
        ClDevice::bind_lane(lane);
        launch(lane, i)
    };
    // Warm: every queue has run the kernel once (kernel objects made, arguments set).
    for lane in 0..lanes {
        on(lane, 0)?;
    }
    dev.finish()?;
    let best = |f: &dyn Fn() -> Result<f64>| -> Result<(f64, f64)> {
        let (mut wall, mut queue) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            let t = Instant::now();
            let q = f()?;
            dev.finish()?;
            wall = wall.min(t.elapsed().as_secs_f64());
            queue = queue.min(q);
        }
        Ok((wall / n as f64, queue / n as f64))
    };
    let (one, queue_s) = best(&|| {
        let t = Instant::now();
        for i in 0..n {
            on(0, i)?;
        }
        Ok(t.elapsed().as_secs_f64())
    })?;
    let (two, _) = best(&|| {
        for i in 0..n {
            on(i % lanes, i / lanes)?;
        }
        Ok(0.0)
    })?;
    let (threads, _) = best(&|| {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..lanes)
                .map(|lane| {
                    let on = &on;
                    s.spawn(move || -> Result<()> {
                        for i in 0..n / lanes {
                            on(lane, i)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| {
                    crate::Error::Device("opencl: a queueing thread panicked".into())
                })??;
            }
            Ok(0.0)
        })
    })?;
    ClDevice::bind_lane(0);
    Ok(QueueOverlap {
        one_queue_s: one,
        queue_s,
        two_queues_s: two,
        two_threads_s: threads,
    })
}

/// [`queue_overlap`] of the batch-1 TQ2_0 GEMV over `rows × cols` (cold weights: cycled
/// copies, as in [`ternary_kernels`]), of `norm_quant` over one 2560-float row, and of
/// `norm_quant` over one 2²⁰-float row — a single work-group, one compute unit busy for a long
/// while, so a device that runs two queues side by side shows it whatever the host's queueing
/// costs.
pub fn queue_overlap_probes(
    dev: &ClDevice,
    rows: usize,
    cols: usize,
    launches: usize,
) -> Result<[QueueOverlap; 3]> {
    let fmt = TernaryFormat::Tq2_0;
    let data = weights(fmt, rows, cols, 7);
    let bufs = cold_copies(dev, &data, None)?;
    let copies = bufs.len();
    let q = dev.upload(&vec![1u8; cols])?;
    let s = dev.upload(bytemuck::cast_slice(&[1.0f32]))?;
    let outs = [dev.alloc(rows * 4)?, dev.alloc(rows * 4)?];
    let gemv = queue_overlap(dev, launches, |lane, i| {
        let o = TernaryOut {
            w: &bufs[(i * 2 + lane) % copies],
            rows,
            out: &outs[lane % 2],
            scale: 1.0,
            bias: None,
        };
        dev.ternary_matmul(fmt, cols, &q, &s, 1, &[o], false)
    })?;
    let n = 2560;
    let w = dev.upload(bytemuck::cast_slice(&vec![1.0f32; n]))?;
    let rows_in = [dev.alloc(n * 4)?, dev.alloc(n * 4)?];
    let ys = [dev.alloc(n * 4)?, dev.alloc(n * 4)?];
    let qs = [dev.alloc(n)?, dev.alloc(n)?];
    let ss = [dev.alloc(4)?, dev.alloc(4)?];
    let norm = queue_overlap(dev, launches, |lane, _| {
        let l = lane % 2;
        dev.norm_quant(
            &rows_in[l],
            n,
            0,
            1,
            Some(&w),
            1e-5,
            Some(&ys[l]),
            Some((&qs[l], &ss[l])),
        )
    })?;
    let long = 1 << 20;
    let w = dev.upload(bytemuck::cast_slice(&vec![1.0f32; long]))?;
    let rows_in = [dev.alloc(long * 4)?, dev.alloc(long * 4)?];
    let ys = [dev.alloc(long * 4)?, dev.alloc(long * 4)?];
    let qs = [dev.alloc(long)?, dev.alloc(long)?];
    let one_group = queue_overlap(dev, 32, |lane, _| {
        let l = lane % 2;
        dev.norm_quant(
            &rows_in[l],
            long,
            0,
            1,
            Some(&w),
            1e-5,
            Some(&ys[l]),
            Some((&qs[l], &ss[l])),
        )
    })?;
    Ok([gemv, norm, one_group])
}

/// Host microseconds per call of `launch(i)` for `i` in `0..n`, the best of four rounds, each
/// after `before` (not timed) and followed by a `finish` (not timed).
fn best_queue_us(
    dev: &ClDevice,
    n: usize,
    before: impl Fn() -> Result<()>,
    launch: impl Fn(usize) -> Result<()>,
) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        before()?;
        let t = Instant::now();
        for i in 0..n {
            launch(i)?;
        }
        best = best.min(t.elapsed().as_secs_f64());
        dev.finish()?;
    }
    Ok(best / n as f64 * 1e6)
}

/// Host microseconds to queue one launch of a kernel that does next to nothing (`cl/probe.cl`),
/// one thread, one queue, arguments unchanged between launches (so only the queueing call is
/// timed): with one buffer argument; with twelve distinct buffers; with one buffer and twelve
/// ints; with twelve of which eleven are the device's dummy buffer (passed as NULL pointers
/// unless `TERNMUX_CL_NULL_ARGS=0`); with one buffer in all twelve slots. The difference
/// between the first two prices the buffer arguments the driver handles per launch; the last
/// tells whether it charges per argument or per distinct buffer. Each is the best of four
/// rounds of `launches`.
pub fn launch_arg_costs(dev: &ClDevice, launches: usize) -> Result<[f64; 5]> {
    let bufs: Vec<DevBuf> = (0..12).map(|_| dev.alloc(64)).collect::<Result<_>>()?;
    let n = launches.max(1);
    let time = |name: &str, args: &[Arg<'_>]| {
        best_queue_us(dev, n, || Ok(()), |_| dev.launch(name, &[32], &[32], args))
    };
    let one = time("probe_buffers1", &[Arg::Buf(&bufs[0]), Arg::I32(1)])?;
    let mut twelve: Vec<Arg<'_>> = bufs.iter().map(Arg::Buf).collect();
    twelve.push(Arg::I32(1));
    let twelve = time("probe_buffers12", &twelve)?;
    let mut scalars = vec![Arg::Buf(&bufs[0])];
    scalars.extend((0..12).map(Arg::I32));
    let scalars = time("probe_scalars12", &scalars)?;
    // Eleven of the twelve the device's dummy buffer: NULL pointers unless
    // TERNMUX_CL_NULL_ARGS=0.
    let mut nulls = vec![Arg::Buf(&bufs[0])];
    nulls.extend((1..12).map(|_| Arg::Buf(dev.dummy())));
    nulls.push(Arg::I32(1));
    let nulls = time("probe_buffers12", &nulls)?;
    // One buffer in all twelve slots: whether the driver's cost is per argument or per
    // distinct buffer.
    let mut same: Vec<Arg<'_>> = (0..12).map(|_| Arg::Buf(&bufs[1])).collect();
    same.push(Arg::I32(1));
    let same = time("probe_buffers12", &same)?;
    Ok([one, twelve, scalars, nulls, same])
}

/// Host microseconds to queue one batch-1 TQ2_0 GEMV (`rows × cols`), one thread, one queue,
/// `launches` launches cycling over 30 weight copies (as a decode cycles over its layers):
/// weights in buffers of their own; weights as read-only sub-buffer views of one allocation
/// (how the multiplexer's units hand tensors to kernels); the first again queued behind a
/// one-work-group kernel that keeps the device busy for a millisecond or more (so the launches
/// pile up in the queue, as in a decode); and the first again with 4096 more buffers alive in
/// the context. Each is the best of four rounds, µs per launch.
pub fn launch_cost_variants(
    dev: &ClDevice,
    rows: usize,
    cols: usize,
    launches: usize,
) -> Result<[f64; 4]> {
    let fmt = TernaryFormat::Tq2_0;
    let data = weights(fmt, rows, cols, 11);
    let own = cold_copies(dev, &data, Some(30))?;
    let copies = own.len();
    let align = dev.info().base_align.max(256);
    let stride = data.len().div_ceil(align) * align;
    let mut whole = dev.alloc(stride * copies)?;
    for i in 0..copies {
        dev.write(&mut whole, i * stride, &data)?;
    }
    let views: Vec<DevBuf> = (0..copies)
        .map(|i| dev.sub_buffer(&whole, i * stride, data.len()))
        .collect::<Result<_>>()?;
    let q = dev.upload(&vec![1u8; cols])?;
    let s = dev.upload(bytemuck::cast_slice(&[1.0f32]))?;
    let out = dev.alloc(rows * 4)?;
    let n = launches.max(1);
    let long = 1 << 20;
    let (lx, ly, lw) = (
        dev.alloc(long * 4)?,
        dev.alloc(long * 4)?,
        dev.alloc(long * 4)?,
    );
    let (lq, ls) = (dev.alloc(long)?, dev.alloc(4)?);
    let time = |bufs: &[DevBuf], busy: bool| -> Result<f64> {
        let before = || {
            if busy {
                let q = Some((&lq, &ls));
                dev.norm_quant(&lx, long, 0, 1, Some(&lw), 1e-5, Some(&ly), q)?;
            }
            Ok(())
        };
        best_queue_us(dev, n, before, |i| {
            let o = TernaryOut {
                w: &bufs[i % bufs.len()],
                rows,
                out: &out,
                scale: 1.0,
                bias: None,
            };
            dev.ternary_matmul(fmt, cols, &q, &s, 1, &[o], false)
        })
    };
    let plain = time(&own, false)?;
    let viewed = time(&views, false)?;
    let behind = time(&own, true)?;
    let crowd: Vec<DevBuf> = (0..4096).map(|_| dev.alloc(4096)).collect::<Result<_>>()?;
    let crowded = time(&own, false)?;
    drop(crowd);
    Ok([plain, viewed, behind, crowded])
}

/// What buffer arguments passed as shared-virtual-memory addresses cost the driver's queueing,
/// against memory objects ([`svm_arg_costs`]); µs per launch, the best of four rounds.
#[derive(Clone, Copy, Debug)]
pub struct SvmArgCosts {
    /// The do-nothing kernel with twelve distinct buffers (memory objects).
    pub mem12_us: f64,
    /// The same with twelve SVM addresses, unchanged between launches.
    pub svm12_us: f64,
    /// The same with twelve SVM addresses that change every launch (each re-set).
    pub svm12_reset_us: f64,
    /// A 4-token tensor-core few-token launch of a Q/K/V triple (2560 × 2560, 640 × 2560 twice),
    /// buffers as memory objects: host µs to queue, then wall µs per launch.
    pub few_mem: Option<(f64, f64)>,
    /// The same launch with every buffer an SVM address.
    pub few_svm: Option<(f64, f64)>,
}

/// Measures [`SvmArgCosts`] (`None` where the device has no coarse-grained SVM).
pub fn svm_arg_costs(dev: &ClDevice, launches: usize) -> Result<Option<SvmArgCosts>> {
    if !dev.svm_coarse() {
        return Ok(None);
    }
    let n = launches.max(1);
    let bufs: Vec<DevBuf> = (0..12).map(|_| dev.alloc(64)).collect::<Result<_>>()?;
    let svms: Vec<super::device::SvmBuf> =
        (0..12).map(|_| dev.svm_alloc(128)).collect::<Result<_>>()?;
    fn time<'a>(
        dev: &ClDevice,
        n: usize,
        name: &str,
        args: impl Fn(usize) -> Vec<Arg<'a>>,
    ) -> Result<f64> {
        best_queue_us(
            dev,
            n,
            || Ok(()),
            |i| dev.launch(name, &[32], &[32], &args(i)),
        )
    }
    let mem12 = time(dev, n, "probe_buffers12", |_| {
        let mut a: Vec<Arg<'_>> = bufs.iter().map(Arg::Buf).collect();
        a.push(Arg::I32(1));
        a
    })?;
    let svm12 = time(dev, n, "probe_buffers12", |_| {
        let mut a: Vec<Arg<'_>> = svms.iter().map(|b| Arg::Svm(b, 0)).collect();
        a.push(Arg::I32(1));
        a
    })?;
    let svm12_reset = time(dev, n, "probe_buffers12", |i| {
        let mut a: Vec<Arg<'_>> = svms.iter().map(|b| Arg::Svm(b, (i % 2) * 64)).collect();
        a.push(Arg::I32(1));
        a
    })?;
    let (few_mem, few_svm) = if dev.mma() {
        let (k, n_tok) = (2560usize, 4usize);
        let fmt = TernaryFormat::Tq2_0;
        let shapes = [2560usize, 640, 640];
        let w: Vec<DevBuf> = shapes
            .iter()
            .map(|&r| dev.upload(&weights(fmt, r, k, r as u64)))
            .collect::<Result<_>>()?;
        let o: Vec<DevBuf> = shapes
            .iter()
            .map(|&r| dev.alloc(r * n_tok * 4))
            .collect::<Result<_>>()?;
        let q = dev.upload(&vec![1u8; k * n_tok])?;
        let s = dev.upload(bytemuck::cast_slice(&vec![1.0f32; n_tok]))?;
        let outs: Vec<TernaryOut<'_>> = w
            .iter()
            .zip(&o)
            .zip(shapes)
            .map(|((w, o), rows)| TernaryOut {
                w,
                rows,
                out: o,
                scale: 1.0,
                bias: None,
            })
            .collect();
        let (name, global, local, args) =
            dev.few_mma_launch(fmt, k, &q, &s, n_tok, &outs, false)?;
        // The same buffers as SVM copies (the same sizes; weights copied).
        let mut shadow: Vec<(u64, super::device::SvmBuf)> = Vec::new();
        for a in &args {
            if let Arg::Buf(b) = a {
                if std::ptr::eq(*b, dev.dummy()) || shadow.iter().any(|(id, _)| *id == b.id()) {
                    continue;
                }
                let sb = dev.svm_alloc(b.bytes())?;
                let mut bytes = vec![0u8; b.bytes()];
                dev.read(b, 0, &mut bytes)?;
                dev.svm_write(&sb, 0, &bytes)?;
                shadow.push((b.id(), sb));
            }
        }
        let svm_args: Vec<Arg<'_>> = args
            .iter()
            .map(|a| match a {
                Arg::Buf(b) => shadow
                    .iter()
                    .find(|(id, _)| *id == b.id())
                    .map_or(*a, |(_, sb)| Arg::Svm(sb, 0)),
                _ => *a,
            })
            .collect();
        let run = |args: &[Arg<'_>]| -> Result<(f64, f64)> {
            let queue = best_queue_us(
                dev,
                n,
                || Ok(()),
                |_| dev.launch(name, &[global], &[local], args),
            )?;
            let wall = time_best(3, || {
                for _ in 0..n {
                    dev.launch(name, &[global], &[local], args)?;
                }
                dev.finish()
            })? / n as f64
                * 1e6;
            Ok((queue, wall))
        };
        let mem = run(&args)?;
        let svm = run(&svm_args)?;
        // Both wrote the same outputs from the same inputs.
        let mut a = vec![0u8; o[0].bytes()];
        dev.read(&o[0], 0, &mut a)?;
        let sb = shadow
            .iter()
            .find(|(id, _)| *id == o[0].id())
            .map(|(_, sb)| sb)
            .ok_or_else(|| {
                crate::Error::Device("opencl: the SVM launch had no copy of its output".into())
            })?;
        let tmp = dev.alloc(sb.bytes())?;
        let ints = i32::try_from(sb.bytes() / 4)
            .map_err(|_| crate::Error::Device("opencl: SVM output too large to compare".into()))?;
        let copy = [Arg::Svm(sb, 0), Arg::Buf(&tmp), Arg::I32(ints)];
        dev.launch("probe_copy_svm", &[sb.bytes() / 4], &[64], &copy)?;
        let mut b = vec![0u8; o[0].bytes()];
        dev.read(&tmp, 0, &mut b)?;
        if a != b {
            return Err(crate::Error::Device(
                "opencl: the SVM launch wrote other outputs than the buffer launch".into(),
            ));
        }
        (Some(mem), Some(svm))
    } else {
        (None, None)
    };
    dev.finish()?;
    Ok(Some(SvmArgCosts {
        mem12_us: mem12,
        svm12_us: svm12,
        svm12_reset_us: svm12_reset,
        few_mem,
        few_svm,
    }))
}
