//! The one module that calls OpenCL: discovery, the context and queue, the program, buffers,
//! copies and launches. Every `unsafe` block of the OpenCL backend is here, each with its
//! `// SAFETY:` line; the rest of the backend uses the safe API below.

use crate::error::{Error, Result};
use opencl3::command_queue::CommandQueue;
use opencl3::context::Context;
use opencl3::device::{
    CL_DEVICE_TYPE_ACCELERATOR, CL_DEVICE_TYPE_ALL, CL_DEVICE_TYPE_CPU, CL_DEVICE_TYPE_GPU,
    Device as RawDevice,
};
use opencl3::error_codes::ClError;
use opencl3::event::Event;
use opencl3::kernel::Kernel;
use opencl3::memory::{
    Buffer, CL_MAP_READ, CL_MAP_WRITE, CL_MEM_ALLOC_HOST_PTR, CL_MEM_READ_ONLY, CL_MEM_READ_WRITE,
};
use opencl3::program::Program;
use opencl3::types::{CL_BLOCKING, CL_NON_BLOCKING, cl_mem};
use std::collections::HashMap;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

const FIX: &str = "install an OpenCL driver (an ICD: e.g. `apt install pocl-opencl-icd \
ocl-icd-libopencl1` for CPUs, the GPU vendor's driver for GPUs) or point OCL_ICD_VENDORS at a \
directory of .icd files";

/// Why no OpenCL device can be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// `libOpenCL.so.1` (the ICD loader) could not be loaded.
    NoLibrary(String),
    /// The loader found no platform (no driver registered).
    NoPlatform(String),
    /// Platforms exist but none offers a usable device (of the asked kind).
    NoDevice(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::NoLibrary(why) => write!(
                f,
                "no OpenCL library: libOpenCL.so.1 could not be loaded ({why}); install \
                 ocl-icd-libopencl1 (or set OPENCL_DYLIB_PATH), then {FIX}"
            ),
            Unavailable::NoPlatform(why) => {
                write!(
                    f,
                    "no OpenCL platform: the loader found no driver ({why}); {FIX}"
                )
            }
            Unavailable::NoDevice(why) => write!(f, "no OpenCL device: {why}"),
        }
    }
}

/// What a device is, as reported by its driver.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Index in [`list_devices`] (`--device opencl:N`).
    pub index: usize,
    /// Device name.
    pub name: String,
    /// Platform name (driver).
    pub platform: String,
    /// `GPU`, `CPU`, `accelerator` or `other`.
    pub kind: &'static str,
    /// Compute units.
    pub compute_units: u32,
    /// Global memory in bytes.
    pub global_mem: u64,
    /// Largest single allocation in bytes.
    pub max_alloc: u64,
    /// Largest work-group.
    pub max_work_group: usize,
    /// Local memory per work-group in bytes.
    pub local_mem: u64,
    /// OpenCL version string.
    pub version: String,
    /// Alignment in bytes a sub-buffer's origin must have (`CL_DEVICE_MEM_BASE_ADDR_ALIGN`).
    pub base_align: usize,
    /// Whether the device shares the host's memory (CPU devices, integrated GPUs).
    pub host_unified: bool,
    /// The driver's extension names for the device (`CL_DEVICE_EXTENSIONS`), space-separated.
    pub extensions: String,
    raw: usize,
}

impl DeviceInfo {
    /// Whether the driver lists extension `name` for the device.
    pub fn has_extension(&self, name: &str) -> bool {
        self.extensions.split_whitespace().any(|e| e == name)
    }
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "#{} {} ({}, {}, {} CUs, {:.1} GiB)",
            self.index,
            self.name.trim(),
            self.platform.trim(),
            self.kind,
            self.compute_units,
            self.global_mem as f64 / (1u64 << 30) as f64
        )
    }
}

fn cl_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Device(format!("opencl: {what}: {e}"))
}

/// Every device of every platform, in a stable order (platform, then device). Discovered once
/// per process: some drivers (PoCL 3) crash when queried from several threads at once.
pub fn list_devices() -> std::result::Result<Vec<DeviceInfo>, Unavailable> {
    static FOUND: OnceLock<std::result::Result<Vec<DeviceInfo>, Unavailable>> = OnceLock::new();
    FOUND.get_or_init(discover).clone()
}

fn discover() -> std::result::Result<Vec<DeviceInfo>, Unavailable> {
    if let Err(e) = cl3::load_library() {
        return Err(Unavailable::NoLibrary(e.to_string()));
    }
    let platforms =
        opencl3::platform::get_platforms().map_err(|e| Unavailable::NoPlatform(e.to_string()))?;
    if platforms.is_empty() {
        return Err(Unavailable::NoPlatform("zero platforms".into()));
    }
    let mut out = Vec::new();
    for p in platforms {
        let pname = p.name().unwrap_or_else(|_| "unknown platform".into());
        // A platform with no device answers CL_DEVICE_NOT_FOUND: skip it.
        let Ok(ids) = p.get_devices(CL_DEVICE_TYPE_ALL) else {
            continue;
        };
        for id in ids {
            let d = RawDevice::new(id);
            let ty = d.dev_type().unwrap_or(0);
            let kind = if ty & CL_DEVICE_TYPE_GPU != 0 {
                "GPU"
            } else if ty & CL_DEVICE_TYPE_CPU != 0 {
                "CPU"
            } else if ty & CL_DEVICE_TYPE_ACCELERATOR != 0 {
                "accelerator"
            } else {
                "other"
            };
            out.push(DeviceInfo {
                index: out.len(),
                name: d.name().unwrap_or_default(),
                platform: pname.clone(),
                kind,
                compute_units: d.max_compute_units().unwrap_or(0),
                global_mem: d.global_mem_size().unwrap_or(0),
                max_alloc: d.max_mem_alloc_size().unwrap_or(0),
                max_work_group: d.max_work_group_size().unwrap_or(1),
                local_mem: d.local_mem_size().unwrap_or(0),
                version: d.version().unwrap_or_default(),
                base_align: (d.mem_base_addr_align().unwrap_or(1024) as usize / 8).max(1),
                host_unified: d.host_unified_memory().unwrap_or(kind == "CPU"),
                extensions: d.extensions().unwrap_or_default(),
                raw: id as usize,
            });
        }
    }
    if out.is_empty() {
        return Err(Unavailable::NoDevice(format!(
            "the OpenCL platforms report no devices; {FIX}"
        )));
    }
    Ok(out)
}

/// A second handle to the same event (OpenCL reference counting).
pub fn retain_event(e: &Event) -> Result<Event> {
    // SAFETY: `e` is a valid event; `Event::new` takes ownership of exactly the reference
    // `retain_event` added, which its drop releases.
    unsafe {
        cl3::event::retain_event(e.get()).map_err(|c| cl_err("retain an event", c))?;
        Ok(Event::new(e.get()))
    }
}

/// A device buffer of raw bytes (kernels give it a type).
pub struct DevBuf {
    buf: Buffer<u8>,
    bytes: usize,
    /// Unique for the process: what the kernel-argument cache compares (a freed buffer's
    /// handle value can come back for a new buffer; its id never does).
    id: u64,
    /// Where a sub-buffer starts in its parent (`None`: not a sub-buffer).
    origin: Option<usize>,
}

/// The next [`DevBuf`] id.
static NEXT_BUF_ID: AtomicU64 = AtomicU64::new(1);

impl DevBuf {
    fn new(buf: Buffer<u8>, bytes: usize) -> DevBuf {
        DevBuf {
            buf,
            bytes,
            id: NEXT_BUF_ID.fetch_add(1, Ordering::Relaxed),
            origin: None,
        }
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Unique for the process (never reused): what identifies the buffer to the kernel
    /// argument cache.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// Where this view starts in its parent buffer, for a view made by
    /// [`ClDevice::sub_buffer`].
    pub fn origin(&self) -> Option<usize> {
        self.origin
    }
    fn mem(&self) -> cl_mem {
        use opencl3::memory::ClMem;
        self.buf.get()
    }
}

/// A kernel argument.
#[derive(Clone, Copy)]
pub enum Arg<'a> {
    /// A buffer.
    Buf(&'a DevBuf),
    /// A 32-bit integer.
    I32(i32),
    /// A float.
    F32(f32),
    /// Local memory of this many bytes.
    Local(usize),
    /// A pointer `offset` bytes into coarse-grained shared virtual memory
    /// (`clSetKernelArgSVMPointer`).
    Svm(&'a SvmBuf, usize),
}

/// Coarse-grained shared virtual memory (`clSVMAlloc`): device memory a kernel argument
/// reaches by address (`clSetKernelArgSVMPointer`), not as a memory object. Freed on drop.
pub struct SvmBuf {
    context: opencl3::types::cl_context,
    ptr: *mut std::ffi::c_void,
    bytes: usize,
}

// SAFETY: the allocation is owned by this value, and it holds its own reference on the
// context (retained in `ClDevice::svm_alloc`, released on drop), so both stay valid on any
// thread for as long as it lives.
unsafe impl Send for SvmBuf {}
// SAFETY: as above; `&SvmBuf` only reads the address and size.
unsafe impl Sync for SvmBuf {}

impl SvmBuf {
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for SvmBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `clSVMAlloc` on `context` and is freed once, here (callers
        // finish the queues that used it before dropping it); the context reference this value
        // retained is released after it.
        unsafe {
            let _ = cl3::memory::svm_free(self.context, self.ptr);
            let _ = cl3::context::release_context(self.context);
        }
    }
}

/// Host memory the driver can copy from at full speed (`CL_MEM_ALLOC_HOST_PTR`, mapped).
pub struct Pinned {
    /// Owns the mapped storage `ptr` points into.
    _storage: Buffer<u8>,
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value and only reached through `&mut self` / `&self`.
unsafe impl Send for Pinned {}

impl Pinned {
    /// The mapped bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` maps `bytes` bytes for as long as `_storage` lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }
}

/// One compute queue's kernel objects. Each lane has its own, so threads queueing on different
/// lanes (the engine's model workers) never wait for one another to set arguments and queue:
/// with one table for the device, the launches of two models' passes took turns.
struct KernelTable {
    /// Per kernel name, the kernel objects in use (see [`Instance`]).
    kernels: HashMap<String, Vec<Instance>>,
    /// Launch counter, for least-recently-used replacement of instances.
    tick: u64,
}

/// Most kernel objects a lane keeps per kernel name.
const MAX_INSTANCES: usize = 512;

/// One kernel object with the arguments last set on it. A launch takes the instance whose
/// buffers are the launch's own (one per layer and call site, in effect), so a decode step
/// finds every argument already set and only queues: `clSetKernelArg` is skipped for each
/// argument equal to the one the instance holds.
struct Instance {
    kernel: Kernel,
    /// Hash of the launch's buffer ids.
    key: u64,
    /// What each argument holds; `None` where unknown (never set, or a set that failed).
    args: Vec<Option<ArgVal>>,
    last_use: u64,
}

/// An argument as set on a kernel object (buffers by [`DevBuf`] id).
#[derive(Clone, Copy, PartialEq, Debug)]
enum ArgVal {
    Buf(u64),
    I32(i32),
    F32(u32),
    Local(usize),
    Svm(usize),
}

impl Arg<'_> {
    fn val(&self) -> ArgVal {
        match self {
            Arg::Buf(b) => ArgVal::Buf(b.id),
            Arg::I32(v) => ArgVal::I32(*v),
            Arg::F32(v) => ArgVal::F32(v.to_bits()),
            Arg::Local(n) => ArgVal::Local(*n),
            Arg::Svm(b, off) => ArgVal::Svm(b.ptr as usize + off),
        }
    }
}

/// The instance key of a launch: its buffers, in order.
fn buffer_key(args: &[Arg<'_>]) -> u64 {
    args.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, a| match a {
        Arg::Buf(b) => (h ^ b.id).wrapping_mul(0x0000_0100_0000_01b3),
        _ => h,
    })
}

/// Whether launches reuse kernel objects with their arguments already set
/// (`TERNMUX_CL_ARG_CACHE=0` turns it off, to measure what it saves).
fn arg_cache_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_ARG_CACHE").is_none_or(|v| v != "0"))
}

/// Whether a launch passes a NULL pointer where it would pass [`ClDevice::dummy`] (an output,
/// bias or norm slot the kernel leaves alone because its flag or row count says so):
/// `TERNMUX_CL_NULL_ARGS=0` passes the dummy buffer, to compare. NVIDIA's driver spends about
/// 0.35 µs of every launch's queueing on each buffer argument it is given (`ternmux
/// bench-device`: a do-nothing kernel 4.4–4.9 µs with one buffer, 8.3–8.5 with twelve), and
/// about what an int costs on a NULL one (7.5 µs with eleven of the twelve NULL, against 11.4).
/// OpenCL 1.2 allows a NULL buffer argument (`clSetKernelArg`).
fn null_args_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_NULL_ARGS").is_none_or(|v| v != "0"))
}

/// Whether runs of launches are queued holding the device's baton ([`ClDevice::queueing`];
/// `TERNMUX_CL_BATON=0` turns it off).
fn baton_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TERNMUX_CL_BATON").is_none_or(|v| v != "0"))
}

/// How the host waits for a read (`TERNMUX_CL_WAIT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadWait {
    /// In the driver's blocking call (`block`).
    Block,
    /// Asking the read's event for its status, spinning then yielding the core between asks
    /// (`poll`).
    Poll,
    /// Asking the read's event for its status with a short sleep between asks (`nap`, the
    /// default): the driver's lock is free for other threads between asks.
    Nap,
}

/// The read wait in use. NVIDIA's driver serializes the threads that queue work on a context,
/// and a thread inside a blocking read holds the others off until its read ends: two models'
/// workers then take turns for whole passes. Polled, the other thread queues its pass while
/// this one waits (H100, two 2B models at one client each: see BENCHMARKS.md, issue 6).
fn read_wait() -> ReadWait {
    static WAIT: OnceLock<ReadWait> = OnceLock::new();
    *WAIT.get_or_init(|| match std::env::var("TERNMUX_CL_WAIT").as_deref() {
        Ok("block") => ReadWait::Block,
        Ok("poll") => ReadWait::Poll,
        _ => ReadWait::Nap,
    })
}

/// Checks that `len` bytes at `offset` lie inside `bytes`; `Ok(false)` when there is nothing
/// to move (`what` names the transfer in the error).
fn span(what: &str, offset: usize, len: usize, bytes: usize) -> Result<bool> {
    match offset.checked_add(len) {
        Some(end) if end <= bytes => Ok(len > 0),
        _ => Err(Error::Device(format!(
            "opencl: {what} of {len} bytes at {offset} past a {bytes}-byte buffer"
        ))),
    }
}

/// Waits for `event` by asking its status (`how`: [`ReadWait::Poll`] or [`ReadWait::Nap`]).
fn poll_until_done(event: &Event, how: ReadWait) -> Result<()> {
    let mut asked = 0u32;
    loop {
        let status = event
            .command_execution_status()
            .map_err(|e| cl_err("ask a read's status", e))?
            .0;
        if status == opencl3::event::CL_COMPLETE {
            return Ok(());
        }
        if status < 0 {
            return Err(cl_err("read", ClError(status)));
        }
        asked += 1;
        match how {
            ReadWait::Nap => std::thread::sleep(std::time::Duration::from_micros(20)),
            _ if asked < 64 => std::hint::spin_loop(),
            _ => std::thread::yield_now(),
        }
    }
}

/// The environment variable that turns on per-kernel profiling (`TERNMUX_CL_PROFILE=1`).
pub const PROFILE_ENV: &str = "TERNMUX_CL_PROFILE";

/// One launch recorded while profiling: the kernel, the host time spent setting its
/// arguments and queueing it, and its event (device timestamps).
struct Launched {
    name: String,
    host_ns: u64,
    event: Event,
}

/// The profile's name for a page-in copy on the copy queue.
const COPY_NAME: &str = "page-in copy";
/// The profile's name for a unit's fence (a marker on a compute queue).
const FENCE_NAME: &str = "fence";
/// The profile's name for a compute queue's barrier on a page-in.
const BARRIER_NAME: &str = "barrier";

/// One profiled command's device timestamps (ns): queued by the host, submitted to the device,
/// started, ended.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandTimes {
    /// The kernel's name, or `page-in copy`, `fence`, `barrier`.
    pub name: String,
    /// When the host queued it.
    pub queued: u64,
    /// When the driver handed it to the device.
    pub submit: u64,
    /// When it started.
    pub start: u64,
    /// When it ended.
    pub end: u64,
}

impl CommandTimes {
    /// Whether the command is a kernel (not a page-in copy, a fence or a barrier).
    pub fn is_kernel(&self) -> bool {
        !matches!(self.name.as_str(), COPY_NAME | FENCE_NAME | BARRIER_NAME)
    }
}

/// How a device's time was spent over a stretch of work (profiling timestamps, seconds): the
/// span from the first command's start to the last one's end, and within it the time kernels
/// ran, page-in copies ran, and both ran at once.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timeline {
    /// First start to last end.
    pub span_s: f64,
    /// Time at least one kernel ran.
    pub kernels_s: f64,
    /// Every kernel's own time added up: above `kernels_s` by the time kernels of several
    /// queues ran at once.
    pub kernels_sum_s: f64,
    /// Time at least one copy ran.
    pub copies_s: f64,
    /// Time a kernel and a copy ran at once.
    pub both_s: f64,
}

impl Timeline {
    /// The idle time: neither a kernel nor a copy ran.
    pub fn idle_s(&self) -> f64 {
        (self.span_s - self.kernels_s - self.copies_s + self.both_s).max(0.0)
    }

    /// Builds it from profiled commands (fences and barriers take no time of their own).
    pub fn from_commands(commands: &[CommandTimes]) -> Timeline {
        let mut kernels = Vec::new();
        let mut copies = Vec::new();
        for c in commands {
            if c.is_kernel() {
                kernels.push((c.start, c.end));
            } else if c.name == COPY_NAME {
                copies.push((c.start, c.end));
            }
        }
        Timeline::from_intervals(kernels, copies)
    }

    /// Builds it from `(start, end)` nanosecond intervals of kernels and of copies.
    ///
    /// ```
    /// use ternmux::backend::opencl::Timeline;
    /// let t = Timeline::from_intervals(vec![(0, 10), (5, 20)], vec![(15, 40)]);
    /// let ns = |s: f64| (s * 1e9).round() as u64;
    /// assert_eq!([t.span_s, t.kernels_s, t.copies_s, t.both_s].map(ns), [40, 20, 25, 5]);
    /// assert_eq!(ns(t.kernels_sum_s), 25); // 5 ns of the two kernels ran at once
    /// assert_eq!(ns(t.idle_s()), 0);
    /// ```
    pub fn from_intervals(kernels: Vec<(u64, u64)>, copies: Vec<(u64, u64)>) -> Timeline {
        let kernels_sum: u64 = kernels.iter().map(|i| i.1.saturating_sub(i.0)).sum();
        let kernels = union(kernels);
        let copies = union(copies);
        let first = kernels.iter().chain(&copies).map(|i| i.0).min();
        let last = kernels.iter().chain(&copies).map(|i| i.1).max();
        let total = |v: &[(u64, u64)]| v.iter().map(|i| i.1 - i.0).sum::<u64>();
        // Both sorted and disjoint: a merge walk sums their intersection.
        let (mut both, mut i, mut j) = (0u64, 0, 0);
        while i < kernels.len() && j < copies.len() {
            let (a, b) = (kernels[i], copies[j]);
            both += a.1.min(b.1).saturating_sub(a.0.max(b.0));
            if a.1 < b.1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        let s = |ns: u64| ns as f64 * 1e-9;
        Timeline {
            span_s: s(last.unwrap_or(0) - first.unwrap_or(0)),
            kernels_s: s(total(&kernels)),
            kernels_sum_s: s(kernels_sum),
            copies_s: s(total(&copies)),
            both_s: s(both),
        }
    }
}

/// Sorted, disjoint intervals covering the same time as `v`.
fn union(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|i| i.1 > i.0);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Time spent in one kernel over the launches since the last [`ClDevice::take_profile`].
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// Kernel name (as in `cl/`).
    pub name: String,
    /// Launches of it.
    pub launches: u64,
    /// Host seconds spent setting arguments and queueing, summed.
    pub host_s: f64,
    /// Device seconds from the start to the end of execution (profiling events), summed.
    pub device_s: f64,
}

/// An OpenCL device with its context, in-order queue and built program. One per device per
/// process (shared by every model on it): the program is built once and cached.
pub struct ClDevice {
    info: DeviceInfo,
    context: Context,
    /// In-order compute queues, each with what its launches share (see [`Lane`]); a thread
    /// queues on the one [`ClDevice::bind_lane`] chose for it (the first by default).
    lanes: Vec<Lane>,
    /// A second in-order queue for weight page-ins, so copies overlap kernels.
    copy_queue: CommandQueue,
    /// The built program (kernel objects are made from it per lane).
    program: Program,
    launches: AtomicU64,
    /// `clSetKernelArg` calls so far (arguments the instance did not hold already).
    arg_sets: AtomicU64,
    /// Fences made (a marker queued and flushed) and fences that reused the last marker of
    /// their queue ([`ClDevice::fence`]).
    fences_made: AtomicU64,
    fences_shared: AtomicU64,
    /// Host nanoseconds spent in [`ClDevice::launch`] (argument setting and queueing), summed.
    queue_ns: AtomicU64,
    build_time: std::time::Duration,
    /// Whether the kernels were built with `-DTERNMUX_DP4A` (NVIDIA inline PTX accepted).
    dp4a: bool,
    /// Whether the kernels were built with `-DTERNMUX_MMA` (NVIDIA sm_80+: the int8 tensor-core
    /// TQ2_0 GEMM).
    mma: bool,
    /// Whether the kernels were built with `-DTERNMUX_MMA_F16` (the f16 tensor-core GEMM of
    /// batched F16 heads).
    mma_f16: bool,
    /// The build logs of the kernel builds that failed before the one in use.
    build_fallbacks: Vec<String>,
    dummy: DevBuf,
    /// Launches recorded since the last [`ClDevice::take_profile`], when [`PROFILE_ENV`] was
    /// set at open (the queue then records timestamps).
    profile: Option<Mutex<Vec<Launched>>>,
    /// Whether the GPU-shaped kernel paths are chosen ([`ClDevice::gpu_kernels`]).
    gpu_shaped: bool,
    /// Held while a thread queues a run of launches ([`ClDevice::queueing`]), so the threads
    /// of models side by side take turns per run instead of per launch.
    baton: Mutex<()>,
}

/// One compute queue and what the launches on it share. Launches on one in-order queue never
/// overlap, so these need no more than that; several lanes let the models of an engine (one
/// worker thread each) run their passes at the same time — a model's kernels never wait
/// behind another model's.
struct Lane {
    queue: CommandQueue,
    /// [`TICKETS`] zeroed counters for the launches whose last work-group finishes the row
    /// (`last_group` in `cl/common.cl`; one per row of a pass, or per tile of a split GEMM; each
    /// back to 0 when its launch ends).
    tickets: DevBuf,
    /// Pinned host memory that large reads (the logits of a batch) land in first: transfers to
    /// and from pageable memory go through the driver's own staging (host→device 10 against
    /// 55 GB/s pinned on the H100, `ternmux bench-device`). Grown on demand.
    read_stage: Mutex<Option<Pinned>>,
    /// Partial sums of launches that split a row length over work-groups (the tiled GEMM of
    /// small matrices). Grown on demand.
    split_part: Mutex<Option<DevBuf>>,
    /// The kernel objects this lane's launches use.
    kernels: Mutex<KernelTable>,
    /// Counts the calls that may queue a command here (every [`ClDevice::lane`]), so that a
    /// fence can tell that nothing was queued since the last one.
    touched: AtomicU64,
    /// The last fence's marker and the count of `touched` it was made at.
    last_fence: Mutex<Option<(u64, Event)>>,
}

thread_local! {
    /// The lane this thread queues on ([`ClDevice::bind_lane`]).
    static LANE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Compute queues per device (`TERNMUX_CL_QUEUES` overrides; 1 puts every model on one queue,
/// as before lanes existed).
const LANES: usize = 4;

/// Reads of at least this many bytes go through a lane's `read_stage`.
const STAGED_READ_MIN: usize = 1 << 20;

/// Runs `f` on the value in `slot` (a buffer the device keeps and grows on demand), made anew
/// by `make` when there is none or it is not `big_enough`; the lock is held meanwhile.
fn with_grown<T, R>(
    slot: &Mutex<Option<T>>,
    what: &str,
    big_enough: impl Fn(&T) -> bool,
    make: impl FnOnce() -> Result<T>,
    f: impl FnOnce(&mut T) -> Result<R>,
) -> Result<R> {
    let mut held = slot
        .lock()
        .map_err(|_| Error::Device(format!("opencl: {what} poisoned")))?;
    if held.as_ref().is_none_or(|t| !big_enough(t)) {
        *held = None;
        *held = Some(make()?);
    }
    match held.as_mut() {
        Some(t) => f(t),
        None => Err(Error::Device(format!("opencl: no {what}"))),
    }
}

/// Counters in a lane's `tickets`: the most rows (or tiles) one launch with an epilogue may have.
pub const TICKETS: usize = 4096;

static OPEN: OnceLock<Mutex<HashMap<usize, Arc<ClDevice>>>> = OnceLock::new();

/// The OpenCL C sources, `common.cl` first: from `TERNMUX_CL_DIR` when set (kernel work without
/// rebuilding), else those embedded by `build.rs`.
fn sources() -> Result<Vec<(String, String)>> {
    let mut v: Vec<(String, String)> = match std::env::var_os("TERNMUX_CL_DIR") {
        Some(dir) => {
            let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            let mut v = Vec::new();
            for entry in rd.flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|x| x == "cl") {
                    let s = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
                    v.push((
                        p.file_name().unwrap_or_default().to_string_lossy().into(),
                        s,
                    ));
                }
            }
            v
        }
        None => crate::CL_SOURCES
            .iter()
            .map(|(n, s)| ((*n).to_string(), (*s).to_string()))
            .collect(),
    };
    v.sort_by_key(|(n, _)| (n != "common.cl", n.clone()));
    if v.first().is_none_or(|(n, _)| n != "common.cl") {
        return Err(Error::Device(
            "opencl: kernel sources lack common.cl (check TERNMUX_CL_DIR)".into(),
        ));
    }
    Ok(v)
}

impl ClDevice {
    /// Opens device `index` of [`list_devices`] (or returns the already open one).
    pub fn open(index: usize) -> std::result::Result<Arc<ClDevice>, Unavailable> {
        let all = list_devices()?;
        let info = all.get(index).cloned().ok_or_else(|| {
            Unavailable::NoDevice(format!(
                "there is no OpenCL device {index}; the devices are: {}",
                all.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        })?;
        Self::open_info(info).map_err(|e| Unavailable::NoDevice(e.to_string()))
    }

    /// The best device: GPUs first (most compute units × memory), then anything else unless
    /// `gpu_only`.
    pub fn best(gpu_only: bool) -> std::result::Result<Arc<ClDevice>, Unavailable> {
        let all = list_devices()?;
        let rank = |d: &DeviceInfo| {
            (
                d.kind == "GPU",
                u64::from(d.compute_units) * (d.global_mem >> 20),
            )
        };
        let best = all
            .iter()
            .filter(|d| !gpu_only || d.kind == "GPU")
            .max_by_key(|d| rank(d))
            .cloned()
            .ok_or_else(|| {
                Unavailable::NoDevice(format!(
                    "no OpenCL GPU among: {} (ask for one with --device opencl:N)",
                    all.iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            })?;
        Self::open_info(best).map_err(|e| Unavailable::NoDevice(e.to_string()))
    }

    fn open_info(info: DeviceInfo) -> Result<Arc<ClDevice>> {
        let registry = OPEN.get_or_init(|| Mutex::new(HashMap::new()));
        let mut open = registry
            .lock()
            .map_err(|_| Error::Device("opencl: device registry poisoned".into()))?;
        if let Some(d) = open.get(&info.raw) {
            return Ok(d.clone());
        }
        let raw = RawDevice::new(info.raw as opencl3::types::cl_device_id);
        let context = Context::from_device(&raw).map_err(|e| cl_err("create context", e))?;
        // No profiling unless asked: timestamps per command cost launch latency on some
        // drivers.
        let profiling = std::env::var_os(PROFILE_ENV).is_some_and(|v| v != "0" && !v.is_empty());
        let props = if profiling {
            opencl3::command_queue::CL_QUEUE_PROFILING_ENABLE
        } else {
            0
        };
        let n_lanes = std::env::var("TERNMUX_CL_QUEUES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(LANES)
            .clamp(1, 16);
        let queues = (0..n_lanes)
            .map(|_| {
                CommandQueue::create_default_with_properties(&context, props, 0)
                    .map_err(|e| cl_err("create command queue", e))
            })
            .collect::<Result<Vec<_>>>()?;
        let copy_queue = CommandQueue::create_default_with_properties(&context, props, 0)
            .map_err(|e| cl_err("create the copy queue", e))?;
        let gpu_shaped = match std::env::var("TERNMUX_CL_GPU_KERNELS").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => info.kind == "GPU",
        };
        let start = Instant::now();
        let srcs = sources()?;
        let joined: String = srcs
            .iter()
            .map(|(n, s)| format!("// ---- {n}\n{s}\n"))
            .collect();
        // NVIDIA drivers take inline PTX: the ternary GEMM then sums selected activation bytes
        // with dp4a (sm_61 and later), and from sm_80 batches of TQ2_0 and of F16 heads also
        // run on the tensor cores (`cl/ternary_mma.cl`, `cl/float_mma.cl`; `TERNMUX_CL_MMA=0`
        // leaves them out). Each build that fails falls back to the next (its log kept for
        // `build_fallbacks`): both tensor-core GEMMs, the int8 one, dp4a, portable.
        let nvidia = info.platform.contains("NVIDIA");
        let sm_major = if nvidia {
            raw.compute_capability_major_nv().unwrap_or(0)
        } else {
            0
        };
        let mma_wanted =
            nvidia && sm_major >= 8 && std::env::var_os("TERNMUX_CL_MMA").is_none_or(|v| v != "0");
        // (options, dp4a, int8 tensor cores, f16 tensor cores)
        let mut tiers: Vec<(&str, bool, bool, bool)> = Vec::new();
        if mma_wanted {
            tiers.push((
                "-cl-std=CL1.2 -DTERNMUX_DP4A -DTERNMUX_MMA -DTERNMUX_MMA_F16",
                true,
                true,
                true,
            ));
            tiers.push((
                "-cl-std=CL1.2 -DTERNMUX_DP4A -DTERNMUX_MMA",
                true,
                true,
                false,
            ));
        }
        if nvidia {
            tiers.push(("-cl-std=CL1.2 -DTERNMUX_DP4A", true, false, false));
        }
        tiers.push(("-cl-std=CL1.2", false, false, false));
        let mut build_fallbacks = Vec::new();
        let mut built = None;
        for (options, dp4a, mma, mma_f16) in tiers {
            match Program::create_and_build_from_source(&context, &joined, options) {
                Ok(p) => {
                    built = Some((p, dp4a, mma, mma_f16));
                    break;
                }
                Err(log) => build_fallbacks.push(format!("`{options}` failed: {log}")),
            }
        }
        let Some((program, dp4a, mma, mma_f16)) = built else {
            return Err(Error::Device(format!(
                "opencl: the kernels in cl/ failed to build on {}: {}",
                info.name,
                build_fallbacks.join("\n")
            )));
        };
        // `TERNMUX_CL_DUMP=FILE` writes the built program as the driver returns it (PTX on
        // NVIDIA), to inspect register spills and the instructions chosen.
        let dump = std::env::var_os("TERNMUX_CL_DUMP");
        if let Some(path) = &dump {
            let bins = program
                .get_binaries()
                .map_err(|e| cl_err("read the program binary", e))?;
            let bytes = bins.into_iter().next().unwrap_or_default();
            std::fs::write(path, bytes).map_err(|e| Error::io(path, e))?;
        }
        let names = program
            .kernel_names()
            .split(';')
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>();
        let mut kernels = HashMap::new();
        let mut names_seen: Vec<String> = Vec::new();
        // With the dump, FILE.kernels lists what the driver gives each kernel: the largest
        // work-group it can launch and its private (spill / stack) and local bytes.
        let mut limits = String::new();
        for n in names {
            let k = Kernel::create(&program, &n).map_err(|e| cl_err(&format!("kernel {n}"), e))?;
            if dump.is_some() {
                let id = info.raw as opencl3::types::cl_device_id;
                limits.push_str(&format!(
                    "{n}: work-group ≤ {:?}, private {:?} B, local {:?} B\n",
                    k.get_work_group_size(id).ok(),
                    k.get_private_mem_size(id).ok(),
                    k.get_local_mem_size(id).ok()
                ));
            }
            names_seen.push(n.clone());
            kernels.insert(
                n,
                vec![Instance {
                    kernel: k,
                    key: 0,
                    args: Vec::new(),
                    last_use: 0,
                }],
            );
        }
        if let Some(path) = dump {
            let mut path = std::path::PathBuf::from(path);
            path.as_mut_os_string().push(".kernels");
            std::fs::write(&path, limits).map_err(|e| Error::io(&path, e))?;
        }
        // SAFETY: no host pointer is passed, so the driver owns the storage.
        let dummy =
            unsafe { Buffer::<u8>::create(&context, CL_MEM_READ_WRITE, 16, ptr::null_mut()) }
                .map_err(|e| cl_err("allocate a placeholder buffer", e))?;
        let zeros = vec![0u8; TICKETS * 4];
        let mut lanes = Vec::with_capacity(queues.len());
        // The first lane takes the kernel objects made above; the others make theirs on use.
        let mut first_table = Some(kernels);
        for queue in queues {
            let mut tickets = unsafe {
                // SAFETY: no host pointer is passed, so the driver owns the storage.
                Buffer::<u8>::create(&context, CL_MEM_READ_WRITE, TICKETS * 4, ptr::null_mut())
            }
            .map_err(|e| cl_err("allocate the launch tickets", e))?;
            // SAFETY: blocking write of TICKETS · 4 bytes into a buffer of that size; `zeros`
            // outlives the call.
            unsafe { queue.enqueue_write_buffer(&mut tickets, CL_BLOCKING, 0, &zeros, &[]) }
                .map_err(|e| cl_err("zero the launch tickets", e))?;
            lanes.push(Lane {
                queue,
                tickets: DevBuf::new(tickets, TICKETS * 4),
                read_stage: Mutex::new(None),
                split_part: Mutex::new(None),
                kernels: Mutex::new(KernelTable {
                    kernels: first_table.take().unwrap_or_else(|| {
                        names_seen.iter().map(|n| (n.clone(), Vec::new())).collect()
                    }),
                    tick: 0,
                }),
                touched: AtomicU64::new(0),
                last_fence: Mutex::new(None),
            });
        }
        let dev = Arc::new(ClDevice {
            dummy: DevBuf::new(dummy, 16),
            info,
            context,
            lanes,
            copy_queue,
            program,
            launches: AtomicU64::new(0),
            arg_sets: AtomicU64::new(0),
            fences_made: AtomicU64::new(0),
            fences_shared: AtomicU64::new(0),
            queue_ns: AtomicU64::new(0),
            build_time: start.elapsed(),
            dp4a,
            mma,
            mma_f16,
            build_fallbacks,
            profile: profiling.then(|| Mutex::new(Vec::new())),
            gpu_shaped,
            baton: Mutex::new(()),
        });
        open.insert(dev.info.raw, dev.clone());
        Ok(dev)
    }

    /// A 16-byte buffer bound to unused kernel arguments (given to the driver as a NULL pointer
    /// unless `TERNMUX_CL_NULL_ARGS=0`).
    pub(crate) fn dummy(&self) -> &DevBuf {
        &self.dummy
    }

    /// The [`TICKETS`] launch counters of `last_group` (`cl/common.cl`).
    pub(crate) fn tickets(&self) -> &DevBuf {
        &self.lane().tickets
    }

    /// What the device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }
    /// Time the driver took to build the kernels.
    pub fn build_time(&self) -> std::time::Duration {
        self.build_time
    }
    /// Whether the kernels were built with `-DTERNMUX_DP4A` (NVIDIA: byte sums by dp4a).
    pub fn dp4a(&self) -> bool {
        self.dp4a
    }
    /// Whether the kernels were built with `-DTERNMUX_MMA` (NVIDIA sm_80 and later: batches of
    /// TQ2_0 run on the int8 tensor cores, `ternary_matmul_tq2_mma`).
    pub fn mma(&self) -> bool {
        self.mma
    }
    /// Whether the kernels were built with `-DTERNMUX_MMA_F16` (NVIDIA sm_80 and later: batches
    /// of F16 rows — output heads — run on the f16 tensor cores, `float_matmul_f16_mma`).
    pub fn mma_f16(&self) -> bool {
        self.mma_f16
    }
    /// Why a richer kernel build was not taken: the option set and build log of each build that
    /// failed before the one in use (empty when the first one built).
    pub fn build_fallbacks(&self) -> &[String] {
        &self.build_fallbacks
    }
    /// Kernel launches so far (all models on this device).
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// Kernel arguments set so far: those a launch's kernel object did not hold already
    /// (all models on this device). Against [`ClDevice::launches`] it shows how often the
    /// argument cache missed.
    pub fn arg_sets(&self) -> u64 {
        self.arg_sets.load(Ordering::Relaxed)
    }

    /// Fences so far ([`ClDevice::fence`]): those that queued and flushed a marker, and those
    /// that reused their queue's last marker (nothing queued there since).
    pub fn fences(&self) -> (u64, u64) {
        (
            self.fences_made.load(Ordering::Relaxed),
            self.fences_shared.load(Ordering::Relaxed),
        )
    }

    /// Host time spent queueing kernels so far (argument setting and the enqueue call), summed
    /// over every thread: against a pass's wall time it tells whether the host's queueing or
    /// the device bounds it.
    pub fn queue_time(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.queue_ns.load(Ordering::Relaxed))
    }

    /// Whether the GPU-shaped kernel paths are chosen where they exist (the TQ2_0 GEMV, rows
    /// kept in registers by the row kernels, split value sums in attention): on GPUs, unless
    /// `TERNMUX_CL_GPU_KERNELS=0|1` says otherwise when the device opens. On CPU devices (PoCL)
    /// they are slower — launches are cheap there and registers live across barriers are not —
    /// so CI runs the OpenCL tests a second time with `TERNMUX_CL_GPU_KERNELS=1` to check them
    /// on PoCL as well.
    pub fn gpu_kernels(&self) -> bool {
        self.gpu_shaped
    }

    /// Runs `queue` (which queues launches and must not wait for the device or for another
    /// thread) holding the device's queueing baton, so that one thread at a time queues a run.
    ///
    /// NVIDIA's driver serializes the threads that queue work on a context, and when two
    /// threads queue launch by launch each pays for the other's: on the H100, two 2B models
    /// side by side, two or four clients each, took 24.7–26.6 µs of host time per launch
    /// against 11.9 µs for one model alone (BENCHMARKS.md, issue 6, session 22). Handed over per run
    /// (a block's launches), a thread queues its run at the uncontended cost while the other
    /// waits, or waits for its own results. `TERNMUX_CL_BATON=0` turns it off, to compare.
    pub fn queueing<R>(&self, queue: impl FnOnce() -> R) -> R {
        if !baton_enabled() {
            return queue();
        }
        // A poisoned baton guards nothing (it holds no data): take it anyway.
        let _held = self.baton.lock().unwrap_or_else(|p| p.into_inner());
        queue()
    }

    /// Whether launches are being profiled ([`PROFILE_ENV`] was set when the device opened).
    pub fn profiling(&self) -> bool {
        self.profile.is_some()
    }

    /// Every command recorded since the last call (kernels, page-in copies, fences and the
    /// barriers that wait for copies), in the order queued, with its device timestamps.
    /// Empty when not [`profiling`](Self::profiling).
    pub fn take_commands(&self) -> Result<Vec<CommandTimes>> {
        self.take_launched()?
            .into_iter()
            .map(|(l, start, end)| {
                let stamp = |r: std::result::Result<u64, _>| {
                    r.map_err(|e| cl_err("read a profiling timestamp", e))
                };
                Ok(CommandTimes {
                    queued: stamp(l.event.profiling_command_queued())?,
                    submit: stamp(l.event.profiling_command_submit())?,
                    start,
                    end,
                    name: l.name,
                })
            })
            .collect()
    }

    /// Waits for the queues, then hands over the launches (and page-in copies) recorded since
    /// the last call, with their device start and end timestamps (ns).
    fn take_launched(&self) -> Result<Vec<(Launched, u64, u64)>> {
        let Some(p) = &self.profile else {
            return Ok(Vec::new());
        };
        self.finish()?;
        self.finish_copies()?;
        let launched = std::mem::take(
            &mut *p
                .lock()
                .map_err(|_| Error::Device("opencl: profile poisoned".into()))?,
        );
        launched
            .into_iter()
            .map(|l| {
                let start = l
                    .event
                    .profiling_command_start()
                    .map_err(|e| cl_err("read a profiling timestamp", e))?;
                let end = l
                    .event
                    .profiling_command_end()
                    .map_err(|e| cl_err("read a profiling timestamp", e))?;
                Ok((l, start, end))
            })
            .collect()
    }

    /// Waits for the queue, then returns the time per kernel of the launches since the last
    /// call (most device time first) and forgets them; page-in copies, fences and barriers
    /// are the rows `page-in copy`, `fence` and `barrier`. Empty when not
    /// [`profiling`](Self::profiling).
    pub fn take_profile(&self) -> Result<Vec<KernelTime>> {
        let mut by_name: Vec<KernelTime> = Vec::new();
        for (l, start, end) in self.take_launched()? {
            let device_s = end.saturating_sub(start) as f64 * 1e-9;
            let host_s = l.host_ns as f64 * 1e-9;
            match by_name.iter_mut().find(|k| k.name == l.name) {
                Some(k) => {
                    k.launches += 1;
                    k.host_s += host_s;
                    k.device_s += device_s;
                }
                None => by_name.push(KernelTime {
                    name: l.name,
                    launches: 1,
                    host_s,
                    device_s,
                }),
            }
        }
        by_name.sort_by(|a, b| b.device_s.total_cmp(&a.device_s));
        Ok(by_name)
    }

    fn create(&self, flags: u64, bytes: usize) -> Result<Buffer<u8>> {
        if bytes as u64 > self.info.max_alloc {
            return Err(Error::Device(format!(
                "opencl: a {bytes}-byte buffer exceeds {}'s largest allocation ({} bytes)",
                self.info.name, self.info.max_alloc
            )));
        }
        // SAFETY: no host pointer is passed (null), so the driver owns the storage.
        unsafe { Buffer::<u8>::create(&self.context, flags, bytes.max(4), ptr::null_mut()) }
            .map_err(|e| cl_err(&format!("allocate {bytes} bytes"), e))
    }

    /// A read-write device buffer of `bytes` bytes (contents unspecified).
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        Ok(DevBuf::new(self.create(CL_MEM_READ_WRITE, bytes)?, bytes))
    }

    /// A device buffer holding a copy of `data` (blocking copy). Read-write: kernels may update
    /// it (a KV cache, an accumulated output); weights are never written by any kernel.
    pub fn upload(&self, data: &[u8]) -> Result<DevBuf> {
        let mut buf = self.create(CL_MEM_READ_WRITE, data.len())?;
        if !data.is_empty() {
            // SAFETY: blocking write of `data.len()` bytes into a buffer at least that large;
            // `data` outlives the call.
            unsafe {
                self.lane()
                    .queue
                    .enqueue_write_buffer(&mut buf, CL_BLOCKING, 0, data, &[])
            }
            .map_err(|e| cl_err("upload", e))?;
        }
        Ok(DevBuf::new(buf, data.len()))
    }

    /// Copies `data` into `dst` at byte `offset` (blocking).
    pub fn write(&self, dst: &mut DevBuf, offset: usize, data: &[u8]) -> Result<()> {
        if !span("write", offset, data.len(), dst.bytes)? {
            return Ok(());
        }
        // SAFETY: bounds checked above; blocking, so `data` outlives the transfer.
        unsafe {
            self.lane()
                .queue
                .enqueue_write_buffer(&mut dst.buf, CL_BLOCKING, offset, data, &[])
        }
        .map_err(|e| cl_err("write", e))?;
        Ok(())
    }

    /// Whether the device offers coarse-grained shared virtual memory ([`SvmBuf`]).
    pub fn svm_coarse(&self) -> bool {
        let id = self.info.raw as opencl3::types::cl_device_id;
        cl3::device::get_device_info(id, cl3::device::CL_DEVICE_SVM_CAPABILITIES)
            .map(|v| u64::from(v) & cl3::device::CL_DEVICE_SVM_COARSE_GRAIN_BUFFER != 0)
            .unwrap_or(false)
    }

    /// `bytes` of coarse-grained shared virtual memory, zeroed.
    pub fn svm_alloc(&self, bytes: usize) -> Result<SvmBuf> {
        if !self.svm_coarse() {
            return Err(Error::Device(format!(
                "opencl: {} offers no coarse-grained shared virtual memory",
                self.info.name
            )));
        }
        // SAFETY: a valid context; the flags ask for plain read-write device memory; a null
        // result is turned into an error by cl3.
        let ptr = unsafe {
            cl3::memory::svm_alloc(
                self.context.get(),
                cl3::memory::CL_MEM_READ_WRITE,
                bytes.max(1),
                0,
            )
        }
        .map_err(|e| cl_err("allocate shared virtual memory", ClError(e)))?;
        // SAFETY: a valid context; the reference is released when the buffer drops.
        if let Err(e) = unsafe { cl3::context::retain_context(self.context.get()) } {
            // SAFETY: `ptr` was just allocated on this context and is not used elsewhere.
            let _ = unsafe { cl3::memory::svm_free(self.context.get(), ptr) };
            return Err(cl_err("retain the context", ClError(e)));
        }
        let buf = SvmBuf {
            context: self.context.get(),
            ptr,
            bytes,
        };
        self.svm_write(&buf, 0, &vec![0u8; bytes])?;
        Ok(buf)
    }

    /// Copies `data` into `dst` at byte `offset` (blocking).
    pub fn svm_write(&self, dst: &SvmBuf, offset: usize, data: &[u8]) -> Result<()> {
        if !span("SVM write", offset, data.len(), dst.bytes)? {
            return Ok(());
        }
        // SAFETY: bounds checked above; blocking, so `data` outlives the copy.
        unsafe {
            cl3::command_queue::enqueue_svm_mem_cpy(
                self.lane().queue.get(),
                CL_BLOCKING,
                dst.ptr.cast::<u8>().add(offset).cast(),
                data.as_ptr().cast(),
                data.len(),
                0,
                ptr::null(),
            )
        }
        .map(|ev| {
            // SAFETY: the event the call returned, released once.
            let _ = unsafe { cl3::event::release_event(ev) };
        })
        .map_err(|e| cl_err("SVM write", ClError(e)))
    }

    /// Copies `out.len()` bytes from `src` at byte `offset` (blocking: waits for queued work).
    pub fn read(&self, src: &DevBuf, offset: usize, out: &mut [u8]) -> Result<()> {
        if !span("read", offset, out.len(), src.bytes)? {
            return Ok(());
        }
        let queue = &self.lane().queue;
        let how = read_wait();
        if how == ReadWait::Block {
            // SAFETY: bounds checked above; blocking, so `out` is written before the call
            // returns.
            unsafe { queue.enqueue_read_buffer(&src.buf, CL_BLOCKING, offset, out, &[]) }
                .map_err(|e| cl_err("read", e))?;
            return Ok(());
        }
        // SAFETY: bounds checked above. The read is not blocking, so `out` must stay untouched
        // and alive until it ends: this function does not return before the read's event says
        // it ended (or, when its status cannot be had, before the queue has finished).
        let event =
            unsafe { queue.enqueue_read_buffer(&src.buf, CL_NON_BLOCKING, offset, out, &[]) }
                .map_err(|e| cl_err("read", e))?;
        let waited = queue
            .flush()
            .map_err(|e| cl_err("flush", e))
            .and_then(|()| poll_until_done(&event, how));
        if waited.is_err() {
            // The read may still be under way: it must end before `out` is handed back.
            let _ = queue.finish();
        }
        waited
    }

    /// Queues a copy of `len` bytes of `src` from byte `offset` into `dst` at byte `at`, on this
    /// thread's compute queue after the work queued so far, and submits it; returns its event
    /// (wait with [`ClDevice::wait_read`]). `dst` must not be read, written or dropped before
    /// the event completes: callers keep it with the event and wait first (see
    /// `backend::opencl::exec`'s device picks).
    pub fn read_async(
        &self,
        src: &DevBuf,
        offset: usize,
        dst: &mut Pinned,
        at: usize,
        len: usize,
    ) -> Result<Event> {
        if offset + len > src.bytes || at + len > dst.bytes {
            return Err(Error::Device(format!(
                "opencl: read of {len} bytes at {offset} of a {}-byte buffer into {at} of {} \
                 pinned bytes",
                src.bytes, dst.bytes
            )));
        }
        let queue = &self.lane().queue;
        // SAFETY: ranges checked above; the read is not blocking, so `dst` stays untouched and
        // alive until the event completes (the documented contract of this function).
        let event = unsafe {
            queue.enqueue_read_buffer(
                &src.buf,
                CL_NON_BLOCKING,
                offset,
                &mut dst.as_mut_slice()[at..at + len],
                &[],
            )
        }
        .map_err(|e| cl_err("read", e))?;
        queue.flush().map_err(|e| cl_err("flush", e))?;
        Ok(event)
    }

    /// Waits for `event` (a read from [`ClDevice::read_async`]) the way reads wait
    /// (`TERNMUX_CL_WAIT`): asking its status between short naps by default, so other threads
    /// can queue work on the device meanwhile.
    pub fn wait_read(&self, event: &Event) -> Result<()> {
        match read_wait() {
            ReadWait::Block => event.wait().map_err(|e| cl_err("wait for a read", e)),
            how => poll_until_done(event, how),
        }
    }

    /// Runs `f` with the device's split-sum scratch buffer, at least `bytes` long (see
    /// the lane's `split_part`); the lock is held meanwhile, so `f` queues its launch with it.
    pub(crate) fn with_split_part<T>(
        &self,
        bytes: usize,
        f: impl FnOnce(&DevBuf) -> Result<T>,
    ) -> Result<T> {
        // A buffer replaced while a queued launch still uses it lives until that launch ends
        // (OpenCL keeps the memory objects of enqueued commands).
        with_grown(
            &self.lane().split_part,
            "split scratch",
            |b| b.bytes >= bytes,
            || self.alloc(bytes.max(4)),
            |b| f(b),
        )
    }

    /// Appends the first `len` floats of `src` to `out` (blocking). Large reads land in pinned
    /// memory first and are copied from there by all cores, which on the H100 is faster than the
    /// driver's own path into pageable memory.
    pub fn read_f32_append(&self, src: &DevBuf, len: usize, out: &mut Vec<f32>) -> Result<()> {
        let bytes = len * 4;
        if bytes < STAGED_READ_MIN {
            let at = out.len();
            out.resize(at + len, 0.0);
            return self.read(src, 0, bytemuck::cast_slice_mut(&mut out[at..]));
        }
        with_grown(
            &self.lane().read_stage,
            "read staging",
            |p| p.bytes >= bytes,
            || self.pinned(bytes),
            |pinned| {
                self.read(src, 0, &mut pinned.as_mut_slice()[..bytes])?;
                let data = &pinned.as_slice()[..bytes];
                match bytemuck::try_cast_slice::<u8, f32>(data) {
                    // On all cores: a batch's logits are tens of megabytes.
                    Ok(f) => {
                        use rayon::prelude::*;
                        out.par_extend(f.par_iter().copied());
                    }
                    Err(_) => out.extend(
                        data.chunks_exact(4)
                            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
                    ),
                }
                Ok(())
            },
        )
    }

    /// Device-to-device copy of `bytes` bytes (queued; returns its event for timing).
    pub fn copy(&self, src: &DevBuf, dst: &mut DevBuf, bytes: usize) -> Result<Event> {
        if bytes > src.bytes || bytes > dst.bytes {
            return Err(Error::Device("opencl: copy larger than its buffers".into()));
        }
        // SAFETY: both ranges lie inside their buffers (checked above).
        unsafe {
            self.lane()
                .queue
                .enqueue_copy_buffer(&src.buf, &mut dst.buf, 0, 0, bytes, &[])
        }
        .map_err(|e| cl_err("copy", e))
    }

    /// Pinned, mapped host memory of `bytes` bytes for fast host→device copies.
    pub fn pinned(&self, bytes: usize) -> Result<Pinned> {
        let buf = self.create(CL_MEM_ALLOC_HOST_PTR | CL_MEM_READ_WRITE, bytes)?;
        let mut p: cl_mem = ptr::null_mut();
        // SAFETY: blocking map of the whole buffer; the pointer stays valid until unmapped in
        // `Pinned`'s owner's drop (the buffer's release).
        unsafe {
            self.lane().queue.enqueue_map_buffer(
                &buf,
                CL_BLOCKING,
                CL_MAP_READ | CL_MAP_WRITE,
                0,
                bytes.max(4),
                &mut p,
                &[],
            )
        }
        .map_err(|e| cl_err("map pinned memory", e))?;
        if p.is_null() {
            return Err(Error::Device(
                "opencl: mapping pinned memory returned null".into(),
            ));
        }
        Ok(Pinned {
            _storage: buf,
            ptr: p.cast(),
            bytes,
        })
    }

    /// Host→device copy from `src` (queued, non-blocking; returns its event). The host memory
    /// must stay untouched until the event completes: `Pinned` is borrowed for the call and the
    /// caller waits on the event (or [`ClDevice::finish`]) before reusing it.
    pub fn write_from_pinned(&self, src: &Pinned, dst: &mut DevBuf, bytes: usize) -> Result<Event> {
        if bytes > src.bytes || bytes > dst.bytes {
            return Err(Error::Device(
                "opencl: write larger than its buffers".into(),
            ));
        }
        // SAFETY: ranges checked above; `src` is mapped host memory owned by the driver-backed
        // buffer, which outlives the queued copy as long as the caller waits (documented).
        unsafe {
            self.lane().queue.enqueue_write_buffer(
                &mut dst.buf,
                opencl3::types::CL_NON_BLOCKING,
                0,
                &src.as_slice()[..bytes],
                &[],
            )
        }
        .map_err(|e| cl_err("write from pinned memory", e))
    }

    /// A read-only view of `bytes` bytes of `parent` from `origin` (a weight inside a unit's
    /// allocation). `origin` must be a multiple of [`DeviceInfo::base_align`].
    pub fn sub_buffer(&self, parent: &DevBuf, origin: usize, bytes: usize) -> Result<DevBuf> {
        if !origin.is_multiple_of(self.info.base_align)
            || origin + bytes > parent.bytes
            || bytes == 0
        {
            return Err(Error::Device(format!(
                "opencl: sub-buffer {origin}+{bytes} of a {}-byte buffer is out of range or not \
                 {}-byte aligned",
                parent.bytes, self.info.base_align
            )));
        }
        // SAFETY: the region lies inside the parent (checked above) at an aligned origin; the
        // sub-buffer keeps the parent's storage alive (OpenCL reference counting).
        let buf = unsafe {
            parent
                .buf
                .create_sub_buffer(CL_MEM_READ_ONLY, origin, bytes)
        }
        .map_err(|e| cl_err("create a sub-buffer", e))?;
        let mut view = DevBuf::new(buf, bytes);
        view.origin = Some(origin);
        Ok(view)
    }

    /// Queues a copy of `len` bytes of `src` from `src_offset` into `dst` at `offset` on the
    /// copy queue, after the events in `after` (the previous user of `dst` finishing). Returns
    /// the copy's event.
    ///
    /// `src` must stay untouched until the returned event completes: callers copy from pinned
    /// staging memory they wait on before reuse (see `mux::store`).
    pub fn write_async(
        &self,
        dst: &mut DevBuf,
        offset: usize,
        src: &Pinned,
        src_offset: usize,
        len: usize,
        after: &[&Event],
    ) -> Result<Event> {
        if offset + len > dst.bytes || src_offset + len > src.bytes {
            return Err(Error::Device(format!(
                "opencl: page-in of {len} bytes at {offset} past a {}-byte buffer",
                dst.bytes
            )));
        }
        // Events already complete are left out: a dependency on another queue's event can hold
        // the copy back (on NVIDIA) even when that event finished long ago.
        let wait: Vec<_> = after
            .iter()
            .filter(|e| {
                e.command_execution_status()
                    .map_or(true, |st| st.0 != opencl3::event::CL_COMPLETE)
            })
            .map(|e| e.get())
            .collect();
        let entered = Instant::now();
        // SAFETY: ranges checked above; `src` is driver-owned mapped memory that the caller keeps
        // unmodified until the event completes (documented contract above).
        let ev = unsafe {
            self.copy_queue.enqueue_write_buffer(
                &mut dst.buf,
                opencl3::types::CL_NON_BLOCKING,
                offset,
                &src.as_slice()[src_offset..src_offset + len],
                &wait,
            )
        }
        .map_err(|e| cl_err("queue a page-in", e))?;
        self.record(COPY_NAME, entered, &ev)?;
        Ok(ev)
    }

    /// Keeps a command's event for the profile (when profiling).
    fn record(&self, name: &str, entered: Instant, ev: &Event) -> Result<()> {
        if let Some(p) = &self.profile {
            let record = Launched {
                name: name.to_string(),
                host_ns: entered.elapsed().as_nanos() as u64,
                event: retain_event(ev)?,
            };
            p.lock()
                .map_err(|_| Error::Device("opencl: profile poisoned".into()))?
                .push(record);
        }
        Ok(())
    }

    /// Copies `data` into `dst` at `offset` on the copy queue (blocking: the driver stages
    /// pageable memory itself), after the events in `after`.
    pub fn write_direct(
        &self,
        dst: &mut DevBuf,
        offset: usize,
        data: &[u8],
        after: &[&Event],
    ) -> Result<()> {
        if offset + data.len() > dst.bytes {
            return Err(Error::Device(format!(
                "opencl: page-in of {} bytes at {offset} past a {}-byte buffer",
                data.len(),
                dst.bytes
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let wait: Vec<_> = after.iter().map(|e| e.get()).collect();
        // SAFETY: range checked above; blocking, so `data` outlives the transfer.
        unsafe {
            self.copy_queue
                .enqueue_write_buffer(&mut dst.buf, CL_BLOCKING, offset, data, &wait)
        }
        .map_err(|e| cl_err("page-in", e))?;
        Ok(())
    }

    /// An event that completes when every kernel queued so far has run (the end of a unit's
    /// use by a forward pass). The queue is flushed after it: a page-in on the copy queue may
    /// wait for this marker, and a marker the driver has not been handed yet completes only
    /// when something else flushes the queue.
    ///
    /// When nothing was queued on this thread's queue since its last fence, that fence's
    /// marker serves again (it completes at the same point): the units a pass pins for one
    /// run of launches are given back together, and each used to queue and flush a marker of
    /// its own, 30-odd a pass, while another model's worker queued its launches.
    pub fn fence(&self) -> Result<Event> {
        let entered = Instant::now();
        let lane = self.lane_uncounted();
        let mut last = lane
            .last_fence
            .lock()
            .map_err(|_| Error::Device("opencl: fence record poisoned".into()))?;
        let now = lane.touched.load(Ordering::Relaxed);
        if let Some((at, marker)) = last.as_ref()
            && *at == now
        {
            self.fences_shared.fetch_add(1, Ordering::Relaxed);
            return retain_event(marker);
        }
        // SAFETY: a marker with an empty wait list reads no memory.
        let marker = unsafe { lane.queue.enqueue_marker_with_wait_list(&[]) }
            .map_err(|e| cl_err("marker", e))?;
        lane.queue.flush().map_err(|e| cl_err("flush", e))?;
        self.record(FENCE_NAME, entered, &marker)?;
        *last = Some((now, retain_event(&marker)?));
        self.fences_made.fetch_add(1, Ordering::Relaxed);
        Ok(marker)
    }

    /// Makes kernels queued from now on wait for `events` (page-ins on the copy queue).
    pub fn wait_on_device(&self, events: &[&Event]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let entered = Instant::now();
        let wait: Vec<_> = events.iter().map(|e| e.get()).collect();
        // SAFETY: the events belong to this device's context and are alive for the call.
        let barrier = unsafe { self.lane().queue.enqueue_barrier_with_wait_list(&wait) }
            .map_err(|e| cl_err("barrier", e))?;
        self.record(BARRIER_NAME, entered, &barrier)
    }

    /// Blocks the calling thread until `events` have completed (their queues are flushed).
    pub fn wait_host(&self, events: &[&Event]) -> Result<()> {
        for e in events {
            e.wait().map_err(|c| cl_err("wait for an event", c))?;
        }
        Ok(())
    }

    /// Submits queued page-ins to the device (non-blocking).
    pub fn flush_copies(&self) -> Result<()> {
        self.copy_queue
            .flush()
            .map_err(|e| cl_err("flush page-ins", e))
    }

    /// Waits for every queued page-in.
    pub fn finish_copies(&self) -> Result<()> {
        self.copy_queue
            .finish()
            .map_err(|e| cl_err("finish page-ins", e))
    }

    /// Queues kernel `name` over `global` work-items in groups of `local`.
    pub fn launch(
        &self,
        name: &str,
        global: &[usize],
        local: &[usize],
        args: &[Arg<'_>],
    ) -> Result<()> {
        let entered = Instant::now();
        let t0 = self.profile.as_ref().map(|_| entered);
        let lane = self.lane();
        let mut guard = lane
            .kernels
            .lock()
            .map_err(|_| Error::Device("opencl: kernel table poisoned".into()))?;
        let table = &mut *guard;
        table.tick += 1;
        let tick = table.tick;
        let instances = table
            .kernels
            .get_mut(name)
            .ok_or_else(|| Error::Device(format!("opencl: no kernel {name} in cl/")))?;
        let key = if arg_cache_enabled() {
            buffer_key(args)
        } else {
            0
        };
        let at = match instances.iter().position(|x| x.key == key) {
            Some(at) => at,
            None if instances.len() < MAX_INSTANCES => {
                let kernel = Kernel::create(&self.program, name)
                    .map_err(|e| cl_err(&format!("kernel {name}"), e))?;
                instances.push(Instance {
                    kernel,
                    key,
                    args: Vec::new(),
                    last_use: 0,
                });
                instances.len() - 1
            }
            None => {
                // Full: the least recently used instance takes the new buffers.
                let at = instances
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, x)| x.last_use)
                    .map_or(0, |(at, _)| at);
                instances[at].key = key;
                at
            }
        };
        let inst = &mut instances[at];
        inst.last_use = tick;
        let cache = arg_cache_enabled();
        if inst.args.len() != args.len() {
            inst.args = vec![None; args.len()];
        }
        for (i, a) in args.iter().enumerate() {
            let v = a.val();
            if cache && inst.args[i] == Some(v) {
                continue;
            }
            // Unknown until the driver accepts it.
            inst.args[i] = None;
            let k = &inst.kernel;
            let ix = i as u32;
            // SAFETY: each argument matches the kernel's parameter list in cl/ (buffers as
            // cl_mem, ints as i32, floats as f32, local memory as a byte count); the driver
            // checks sizes and returns CL_INVALID_ARG_SIZE/INDEX instead of reading past them.
            // A NULL buffer (OpenCL 1.2 allows one) stands only for the dummy, which every
            // kernel leaves unread: its slot's flag or row count is 0.
            let set = unsafe {
                match a {
                    Arg::Buf(b) if null_args_enabled() && b.id == self.dummy.id => {
                        let null: cl_mem = ptr::null_mut();
                        k.set_arg(ix, &null)
                    }
                    Arg::Buf(b) => k.set_arg(ix, &b.mem()),
                    Arg::I32(v) => k.set_arg(ix, v),
                    Arg::F32(v) => k.set_arg(ix, v),
                    Arg::Local(n) => k.set_arg_local_buffer(ix, *n),
                    Arg::Svm(b, off) => {
                        if *off > b.bytes {
                            return Err(Error::Device(format!(
                                "opencl: SVM argument {i} of {name} past its allocation"
                            )));
                        }
                        k.set_arg_svm_pointer(ix, b.ptr.cast::<u8>().add(*off).cast())
                    }
                }
            };
            set.map_err(|e| cl_err(&format!("argument {i} of {name}"), e))?;
            inst.args[i] = Some(v);
            self.arg_sets.fetch_add(1, Ordering::Relaxed);
        }
        let k = &inst.kernel;
        if global.len() != local.len() || global.is_empty() || global.len() > 3 {
            return Err(Error::Device(format!(
                "opencl: bad launch geometry for {name}"
            )));
        }
        // Round the global size up to whole work-groups (kernels check their bounds).
        let global: Vec<usize> = global
            .iter()
            .zip(local)
            .map(|(&g, &l)| g.div_ceil(l.max(1)) * l.max(1))
            .collect();
        match (&self.profile, t0) {
            (Some(p), Some(t0)) => {
                // SAFETY: as below; the returned event is owned by the profile record.
                let event = unsafe {
                    lane.queue.enqueue_nd_range_kernel(
                        k.get(),
                        global.len() as u32,
                        ptr::null(),
                        global.as_ptr(),
                        local.as_ptr(),
                        &[],
                    )
                }
                .map_err(|e| cl_err(&format!("launch {name}"), e))?;
                let host_ns = t0.elapsed().as_nanos() as u64;
                p.lock()
                    .map_err(|_| Error::Device("opencl: profile poisoned".into()))?
                    .push(Launched {
                        name: name.to_string(),
                        host_ns,
                        event,
                    });
            }
            _ => {
                let rt = cl3::load_library()
                    .as_ref()
                    .map_err(|e| cl_err("the OpenCL library", e))?;
                // The loader's entry point is declared safe by cl3; what makes the call sound:
                // every argument is set (the driver reports CL_INVALID_KERNEL_ARGS otherwise);
                // the size arrays hold `work_dim` entries; no event is asked for (a null event
                // pointer is allowed and saves creating and releasing one per launch); buffers
                // outlive the queued launch because every caller holds them until a later
                // blocking read or `finish`.
                let status = rt.clEnqueueNDRangeKernel(
                    lane.queue.get(),
                    k.get(),
                    global.len() as u32,
                    ptr::null(),
                    global.as_ptr(),
                    local.as_ptr(),
                    0,
                    ptr::null(),
                    ptr::null_mut(),
                );
                match status {
                    Some(0) => {}
                    Some(code) => {
                        return Err(cl_err(&format!("launch {name}"), ClError(code)));
                    }
                    None => {
                        return Err(Error::Device(
                            "opencl: the library lacks clEnqueueNDRangeKernel".into(),
                        ));
                    }
                }
            }
        }
        self.launches.fetch_add(1, Ordering::Relaxed);
        self.queue_ns
            .fetch_add(entered.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Waits for every command queued on every compute queue.
    pub fn finish(&self) -> Result<()> {
        for lane in &self.lanes {
            lane.queue.finish().map_err(|e| cl_err("finish", e))?;
        }
        Ok(())
    }

    /// The compute queue (and its tickets and scratch) this thread queues on. Counted as a
    /// possible command on it (see [`ClDevice::fence`]).
    fn lane(&self) -> &Lane {
        let lane = self.lane_uncounted();
        lane.touched.fetch_add(1, Ordering::Relaxed);
        lane
    }

    /// This thread's lane, not counted as a command on it.
    fn lane_uncounted(&self) -> &Lane {
        &self.lanes[LANE.with(|l| l.get()) % self.lanes.len()]
    }

    /// Makes this thread queue its kernels (and reads, writes, markers and barriers) on
    /// compute queue `i` (modulo the device's queues; `TERNMUX_CL_QUEUES`, 4 by default): the
    /// engine gives each model's worker its own, so models' passes run side by side instead of
    /// one after another. Every thread starts on queue 0. Work on one queue stays in order;
    /// work on different queues is ordered only by events (the multiplexer's page-in and
    /// eviction fences are events, so they hold across queues).
    pub fn bind_lane(i: usize) {
        LANE.with(|l| l.set(i));
    }

    /// Compute queues of this device.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }
}
