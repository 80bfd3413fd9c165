//! What this kernel and C library let a start do: whether a successor can
//! be started directly (`clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)`, see
//! the module docs of `spawn`), and whether processes can be watched
//! through pidfds. Each is asked once.

use std::os::fd::AsFd;

use super::pidfd::{pidfd_open, waitid_pidfd};

/// Whether this kernel has what watching a process through a pidfd needs:
/// `pidfd_open` (Linux 5.3), and `waitid(P_PIDFD)` (5.4; also the version
/// that has `CLONE_PIDFD`, which older kernels silently ignore). Asked once,
/// unless no fd slot was free to ask.
pub(super) fn pidfds() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if let Some(can) = CAN.get() {
        return *can;
    }
    let me = match pidfd_open(std::process::id() as libc::pid_t) {
        Ok(fd) => fd,
        // No fd slot free just now (EMFILE, ENFILE) says nothing about the
        // kernel: not this time, and ask again next.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => return false,
        Err(_) => return *CAN.get_or_init(|| false),
    };
    // We are not our own child: ECHILD where P_PIDFD is known, EINVAL where
    // it is not.
    let known = match waitid_pidfd(me.as_fd(), libc::WEXITED | libc::WNOHANG) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(libc::ECHILD),
    };
    *CAN.get_or_init(|| known)
}

/// Whether the C library lets a `CLONE_VM` child run without harm: glibc
/// 2.25 or later (no pid cache); other libcs keep none.
fn libc_allows_clone_vm() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
        let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
        glibc_at_least(version.to_bytes(), (2, 25))
    }
    #[cfg(not(target_env = "gnu"))]
    true
}

/// Whether a glibc version string ("2.36", "2.25.90") is at least `min`.
#[cfg_attr(not(target_env = "gnu"), allow(dead_code))]
fn glibc_at_least(version: &[u8], min: (u32, u32)) -> bool {
    let text = String::from_utf8_lossy(version);
    let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= min,
        _ => false,
    }
}

/// Whether this kernel and C library can start a successor directly (see
/// the module docs): checked once, and by `Reserve::refill`, while fd slots
/// are plentiful.
pub(crate) fn can_start_directly() -> bool {
    libc_allows_clone_vm() && pidfds()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_versions_compare_by_number() {
        assert!(glibc_at_least(b"2.36", (2, 25)));
        assert!(glibc_at_least(b"2.25", (2, 25)));
        assert!(glibc_at_least(b"3.0", (2, 25)));
        assert!(!glibc_at_least(b"2.24", (2, 25)));
        assert!(!glibc_at_least(b"2.9", (2, 25)));
        assert!(!glibc_at_least(b"garbage", (2, 25)));
    }

    /// A probe that always said no would send every start through the
    /// intermediate, and every test would still pass.
    #[test]
    fn a_kernel_from_5_4_on_starts_directly() {
        // SAFETY: a zeroed utsname is a valid value; uname fills it in.
        let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: uname writes into a valid pointer to a local.
        assert_eq!(unsafe { libc::uname(&mut uts) }, 0);
        // SAFETY: uname NUL-terminates `release`.
        let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
        let release = release.to_string_lossy().into_owned();
        let mut v = release
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        if (major, minor) >= (5, 4) {
            assert!(can_start_directly(), "Linux {release}");
        }
    }
}
