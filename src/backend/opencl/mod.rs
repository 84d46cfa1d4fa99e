//! The OpenCL backend, loaded at run time: `libOpenCL.so.1` is opened with `dlopen` on first use
//! (cl3's dynamic loading), so the binary has no link-time OpenCL dependency and runs on machines
//! without it. The kernels are the OpenCL C 1.2 sources in `cl/`, built by the driver once per
//! device and cached for the process.
//!
//! * [`device`] — discovery ([`list_devices`]), why OpenCL is unusable ([`Unavailable`]), and the
//!   one safe wrapper over the OpenCL API ([`ClDevice`]).
//! * [`exec`] — a resident unit on the device ([`DevUnit`]; between units, its storage
//!   [`DevStorage`]), a KV cache ([`ClKv`]) and the [`crate::backend::Backend`] implementation
//!   ([`ClExec`]).
//!
//! ```no_run
//! use ternmux::backend::opencl::list_devices;
//! match list_devices() {
//!     Ok(devs) => devs.iter().for_each(|d| println!("{d}")),
//!     Err(why) => println!("{why}"),
//! }
//! ```

pub mod bench;
pub mod device;
pub mod exec;
pub mod ops;

pub use device::{
    Arg, ClDevice, CommandTimes, DevBuf, DeviceInfo, KernelTime, PROFILE_ENV, Pinned, SvmBuf,
    Timeline, Unavailable, list_devices,
};
pub use exec::{ClExec, ClKv, DevStorage, DevUnit};
pub use ops::{
    ActTail, FEW_MAX_TOKENS, FEW_MMA_MAX_TOKENS, FEW_MMA_MIN_TOKENS, Places, RopeShape, RowTail,
    TernaryOut, pick_part_bytes,
};
