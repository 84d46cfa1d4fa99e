//! Products kept on the calling thread: inside [`serial`], every product of this crate (and the
//! int8 requantization of a matrix) runs on the thread that calls it instead of splitting its
//! rows between the rayon pool's threads.
//!
//! A caller that already spreads independent work over the threads (the rows of a batch split
//! by sequence, each part a whole pass on one thread) runs each part serially: forking inside
//! a part would only add wake-ups and latches to work that is already parallel.
//!
//! ```
//! use ternmux_kernels::serial::{is_serial, serial};
//! assert!(!is_serial());
//! assert!(serial(is_serial));
//! assert!(!is_serial());
//! ```

use std::cell::Cell;

thread_local! {
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Restores the flag on the way out of [`serial`], unwinding included.
struct Restore(bool);

impl Drop for Restore {
    fn drop(&mut self) {
        SERIAL.with(|s| s.set(self.0));
    }
}

/// Runs `f` with this thread's products kept on this thread (nested calls are fine).
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let _restore = Restore(SERIAL.with(|s| s.replace(true)));
    f()
}

/// Whether this thread is inside [`serial`]: products called here must not fork.
pub fn is_serial() -> bool {
    SERIAL.with(Cell::get)
}
