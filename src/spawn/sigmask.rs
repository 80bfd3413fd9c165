//! The calling thread's signal mask around a start (see the module docs of
//! `spawn`): every signal blocked while a new process shares or copies this
//! one, the old mask restored on every path.

/// The size of the kernel's signal set (`_NSIG / 8`), for `rt_sigprocmask`.
const KERNEL_SIGSET: usize = if cfg!(any(target_arch = "mips", target_arch = "mips64")) {
    16
} else {
    8
};

/// Blocks signals in the calling thread until dropped, restoring the mask
/// it had then.
pub(super) struct SigmaskGuard {
    old: libc::sigset_t,
}

impl SigmaskGuard {
    /// Every signal, with the system call itself, as glibc's `posix_spawn`
    /// does around its `CLONE_VM` start: glibc's `pthread_sigmask` silently
    /// leaves its two internal signals (SIGCANCEL, SIGSETXID) unblocked, and
    /// no handler may run in a child that shares this memory. A thread of
    /// this process that calls `setuid` meanwhile (glibc signals every
    /// thread with SIGSETXID and waits for each) waits until the mask is
    /// restored: after the exec.
    pub(super) fn block_all() -> SigmaskGuard {
        // SAFETY: a zeroed sigset_t is a valid value.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: writes bytes into a local of that type: a full set (the
        // kernel ignores SIGKILL and SIGSTOP in it).
        unsafe { std::ptr::write_bytes(&mut all, 0xff, 1) };
        SigmaskGuard::set(&all)
    }

    /// Every signal but glibc's two internal ones, which its
    /// `pthread_sigmask` refuses to block, for the intermediate's `fork`:
    /// glibc runs the application's `pthread_atfork` handlers in it, which
    /// may wait for a lock that a thread in `setuid` holds while it waits
    /// for every thread to take SIGSETXID. (glibc blocks them itself around
    /// the system call of the fork.)
    pub(super) fn block_all_but_libc() -> SigmaskGuard {
        use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
        let mut old = SigSet::empty();
        // Cannot fail with a valid `how`.
        let _ = pthread_sigmask(
            SigmaskHow::SIG_SETMASK,
            Some(&SigSet::all()),
            Some(&mut old),
        );
        SigmaskGuard { old: *old.as_ref() }
    }

    fn set(mask: &libc::sigset_t) -> SigmaskGuard {
        // SAFETY: a zeroed sigset_t is a valid value.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: rt_sigprocmask reads KERNEL_SIGSET bytes of `mask` and
        // writes as many into `old`, both of a type larger than that. It
        // cannot fail with these arguments.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                mask as *const libc::sigset_t,
                &mut old as *mut libc::sigset_t,
                KERNEL_SIGSET,
            )
        };
        SigmaskGuard { old }
    }
}

impl Drop for SigmaskGuard {
    fn drop(&mut self) {
        // SAFETY: as in `set`: the mask read when the guard was made, given
        // back with the system call (so that whatever glibc's
        // `pthread_sigmask` would filter is restored exactly).
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &self.old as *const libc::sigset_t,
                std::ptr::null_mut::<libc::sigset_t>(),
                KERNEL_SIGSET,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's mask as the kernel has it (bit `n - 1` for
    /// signal `n`): glibc's `pthread_sigmask` hides its internal signals.
    fn kernel_mask() -> u64 {
        let mut old: libc::sigset_t = unsafe_zeroed();
        // SAFETY: rt_sigprocmask with a null new set only writes the
        // current mask, KERNEL_SIGSET bytes, into a local larger than that.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_BLOCK,
                std::ptr::null::<libc::sigset_t>(),
                &mut old as *mut libc::sigset_t,
                KERNEL_SIGSET,
            )
        };
        assert_eq!(r, 0);
        // SAFETY: the first 8 bytes of the set, as the kernel wrote them.
        unsafe { std::ptr::read_unaligned((&old as *const libc::sigset_t).cast::<u64>()) }
    }

    fn unsafe_zeroed() -> libc::sigset_t {
        // SAFETY: a zeroed sigset_t is a valid value.
        unsafe { std::mem::zeroed() }
    }

    fn bit(sig: libc::c_int) -> u64 {
        1 << (sig - 1)
    }

    #[test]
    fn every_signal_is_blocked_while_the_guard_lives_and_the_mask_is_restored() {
        let before = kernel_mask();
        assert_eq!(before & bit(libc::SIGUSR2), 0);
        {
            let _guard = SigmaskGuard::block_all();
            let during = kernel_mask();
            // glibc's internal signals (32 and 33) too; the kernel never
            // blocks SIGKILL and SIGSTOP.
            let unblockable = bit(libc::SIGKILL) | bit(libc::SIGSTOP);
            assert_eq!(during | unblockable, u64::MAX, "{during:#x}");
        }
        assert_eq!(kernel_mask(), before);
    }

    #[test]
    fn the_fork_guard_blocks_all_but_the_libc_signals_and_restores_the_mask() {
        let before = kernel_mask();
        {
            let _guard = SigmaskGuard::block_all_but_libc();
            let during = kernel_mask();
            for sig in (1..32).filter(|s| ![libc::SIGKILL, libc::SIGSTOP].contains(s)) {
                assert_ne!(during & bit(sig), 0, "signal {sig}");
            }
            assert_ne!(during & bit(libc::SIGRTMAX()), 0);
        }
        assert_eq!(kernel_mask(), before);
    }
}
