//! Shared by the load tool and the origin.

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes on one machine, so the
/// load tool can subtract the origin's send time from its own receive time.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
