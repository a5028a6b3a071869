//! The open-files limit. A proxied stream holds two file descriptors (the
//! client's connection and the upstream's), so `limits.max_connections`
//! streams need twice as many open files, where a shell's default soft
//! limit is 1,024.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Descriptors besides the streams' own: standard streams, the listeners
/// and each worker's copy of them, the runtimes' epoll and wake-up
/// descriptors, admin connections, Redis. Idle pooled upstream connections
/// are not counted: the streaming client keeps up to 256 per upstream and
/// worker, the pooled client for other requests has no cap, and they come
/// from requests that ended, mostly in the place of their descriptors.
pub const HEADROOM: u64 = 64;

/// The open files `max_connections` needs: two per connection (a client's
/// and, for a stream, its upstream's) and [`HEADROOM`].
pub fn needed(max_connections: usize) -> u64 {
    (max_connections as u64).saturating_mul(2).saturating_add(HEADROOM)
}

/// What [`prepare`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit in force afterwards.
    pub limit: u64,
    /// `limits.max_connections`, and what it needs ([`needed`]).
    pub max_connections: usize,
    pub needed: u64,
    /// The soft limit before, when it was raised.
    pub raised_from: Option<u64>,
}

impl OpenFiles {
    /// A warning for the log when the limit is below what is needed.
    pub fn warning(&self) -> Option<String> {
        (self.limit < self.needed).then(|| {
            format!(
                "the open-files limit is {}, below the {} that limits.max_connections = {} needs \
                 (two per proxied stream, and {HEADROOM} more): past about {} streams, new connections wait and \
                 upstream connects fail; raise it (LimitNOFILE= for systemd, ulimit -n in a shell)",
                self.limit,
                self.needed,
                self.max_connections,
                self.limit.saturating_sub(HEADROOM) / 2,
            )
        })
    }
}

/// Raises the soft open-files limit to the hard one (as the Go runtime
/// does; where the hard one is unlimited and cannot be set, to what
/// `max_connections` needs), then sizes the process's descriptor table for
/// that at once.
///
/// The table otherwise grows by doubling as connections open (from 256 in
/// a process started by bash, four times for the 4,000 descriptors of
/// 2,000 streams). In a process with more than one thread, each growth
/// waits for an RCU grace period, and every thread that opens a descriptor
/// meanwhile (an accept, an upstream connect) waits with it. Call this
/// before the runtime's threads start: growing then waits for one grace
/// period at most (jemalloc's background thread already runs), with
/// nothing else to hold up. The table costs the
/// kernel 8 bytes per descriptor, rounded up to a power of two (256 KiB
/// for the 20,064 that 10,000 connections need).
pub fn prepare(max_connections: usize) -> std::io::Result<OpenFiles> {
    let needed = needed(max_connections);
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let want = to_rlim(needed);
    for target in [lim.rlim_max, lim.rlim_max.min(want)] {
        if target <= lim.rlim_cur {
            break;
        }
        let raised = libc::rlimit { rlim_cur: target, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads only `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = target;
            break;
        }
        tracing::debug!(error = %std::io::Error::last_os_error(), target, "the open-files limit could not be raised");
    }
    let limit = to_u64(lim.rlim_cur);
    presize_table(limit.min(needed));
    Ok(OpenFiles { limit, max_connections, needed, raised_from: (lim.rlim_cur > before).then(|| to_u64(before)) })
}

/// `rlim_t` is 32 bits on some targets, 64 on Linux's 64-bit ones.
#[allow(clippy::useless_conversion)]
fn to_u64(v: libc::rlim_t) -> u64 {
    u64::from(v)
}

#[allow(clippy::useless_conversion)]
fn to_rlim(v: u64) -> libc::rlim_t {
    v.try_into().unwrap_or(libc::rlim_t::MAX)
}

/// Makes the descriptor table hold `size` descriptors: a duplicate at
/// `size - 1` or above grows it, closing it leaves it grown. Best effort:
/// the table still grows on demand when this fails.
fn presize_table(size: u64) {
    let Some(top) = size.checked_sub(1).and_then(|t| libc::c_int::try_from(t).ok()) else { return };
    // The root directory: open in any process, unlike /dev/null in a bare
    // chroot.
    let root = match std::fs::File::open("/") {
        Ok(f) => f,
        Err(e) => return tracing::debug!(error = %e, "the descriptor table was not sized"),
    };
    // SAFETY: F_DUPFD_CLOEXEC duplicates an open descriptor onto the lowest
    // free one at or above `top`, which nothing else owns.
    let dup = unsafe { libc::fcntl(root.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top) };
    if dup < 0 {
        return tracing::debug!(error = %std::io::Error::last_os_error(), "the descriptor table was not sized");
    }
    // SAFETY: `dup` was just opened and is owned here alone; dropping closes it.
    drop(unsafe { OwnedFd::from_raw_fd(dup) });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_below_two_per_connection_and_the_headroom_is_warned_about() {
        let enough =
            OpenFiles { limit: 20_064, max_connections: 10_000, needed: needed(10_000), raised_from: Some(1_024) };
        assert_eq!(enough.warning(), None);
        let short = OpenFiles { limit: 20_000, ..enough };
        let warning = short.warning().unwrap_or_default();
        assert!(
            warning.starts_with(
                "the open-files limit is 20000, below the 20064 that limits.max_connections = 10000 needs"
            ),
            "{warning}"
        );
        assert!(warning.contains("past about 9968 streams"), "{warning}");
    }
}
