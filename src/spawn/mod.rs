//! Building and starting the successor: the one fork/exec seam.
//!
//! An upgrade starts its successor in two steps. [`prepare`] allocates
//! everything the new process needs (argv, envp, the steps that put the
//! handed fds in place) while the caller holds the fd registry's lock;
//! [`Prepared::start`] then starts it without that lock, so that an exec
//! hung on a dead file system blocks no task that touches the registry.
//! What `start` opens (a pidfd, the intermediate's pipes) takes the spare
//! fds of the [`Reserve`], freed just before: an upgrade works when the
//! process is at its fd limit — which is when a fix for an fd leak must be
//! deployed.
//!
//! # Directly
//!
//! Without a service manager the old generation's upgrade thread starts the
//! successor the way `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)` on
//! a stack of its own, sharing its parent's memory until it execs, while
//! the parent thread waits — no page table is copied and nothing needs
//! tearing down. The kernel makes a pidfd for it in the same call
//! (`CLONE_PIDFD`): it is watched, waited for (`waitid(P_PIDFD)`) and
//! signalled through it, never by a pid that may have been reaped and
//! reused. It stays the old generation's child until that exits. A failure
//! before its exec is written into memory the two share (the parent reads
//! it once `clone` returns, which `CLONE_VFORK` makes after the exec or the
//! exit): nothing depends on the end of file of an fd that a child the
//! application forks (without exec) might hold a copy of.
//!
//! Every signal is blocked in the calling thread around the start, with the
//! system call itself as `posix_spawn` does, so that glibc's two internal
//! signals (which its `pthread_sigmask` leaves unblocked) are blocked too;
//! a guard restores the mask on every path. (Around the intermediate's
//! `fork` those two stay unblocked, as glibc's `fork` wants: they are only
//! ever sent to threads of this process, never to the new one.)
//!
//! The direct start needs `CLONE_PIDFD` and `waitid(P_PIDFD)` (Linux 5.4),
//! and, on glibc, version 2.25 or later (older ones kept a pid cache that a
//! `CLONE_VM` child would write into its parent's thread): both are checked
//! once ([`can_start_directly`]). It is also refused, at each start, while
//! this process's `SIGCHLD` disposition is `SIG_IGN` or has `SA_NOCLDWAIT`:
//! the kernel would then reap the successor the moment it exits, its wait
//! status lost (a crash could not be told from a clean exit) and its pid
//! free for reuse before its process group is killed. A wait status can
//! only be had from a process that is not reaped at exit, so such an
//! application's successors start through the intermediate, which sets
//! `SIGCHLD` back to the default first thing. (An application that turns
//! `SIGCHLD` off while a directly started successor is not yet committed,
//! or reaps children it did not start with `waitpid(-1)`, loses that
//! successor's status: the upgrade then fails with the status unknown.)
//!
//! # Through an intermediate process
//!
//! Under a service manager (which must see the successor as its own child
//! before it is named main), on kernels or libcs the direct start cannot
//! use, and while `SIGCHLD` is ignored, the old generation forks an
//! *intermediate* process, which:
//!
//! 1. sets `SIGCHLD` to its default (so that it, not the kernel, reaps the
//!    successor), and closes every fd it does not need: it is a copy of the
//!    old generation, which may hold thousands of connections and have no fd
//!    slot left;
//! 2. makes the successor's error pipe — itself, single-threaded, so that
//!    only the successor holds the write end and its end of file means the
//!    exec — forks the successor, puts it into a process group of its own
//!    (`setpgid` from both sides, so that the group exists before its pid is
//!    reported), and reports its pid — before the exec, so that a successor
//!    hung before it is killed at the deadline — then whether it exec'd;
//! 3. then waits: released (a byte, or end of file on the release socket),
//!    it exits and leaves the successor to the nearest subreaper; asked to
//!    kill (a byte), or seeing the successor exit, it kills the successor's
//!    whole process group — while the successor is still its unreaped child,
//!    so the group id cannot have been reused — reaps it and reports its wait
//!    status; it does not reap before the old generation says it has the
//!    pid (and a pidfd for it), and it never exits before it is released, so
//!    that the old generation can hold a pidfd for it too.
//!
//! Its pipes are made for each start, just before the fork (not reserved at
//! `ready()`, where a child the application forks later would hold them),
//! and nothing the old generation learns depends on their end of file:
//! every report is a record ([`RECORD_LEN`] bytes), every request a byte.
//!
//! # The successor, between its start and exec
//!
//! It only makes async-signal-safe system calls on memory prepared before:
//!
//! 1. `setpgid(0, 0)`: a process group of its own, so that a signal sent to
//!    the service's group (`kill -HUP -- -PGID`, a terminal's hangup) does
//!    not reach it before it can handle it, and so that killing the group
//!    ends everything it started; started directly, it then closes every fd
//!    it does not need, as an intermediate would have;
//! 2. moves the error pipe (if it has one) above the target range, then
//!    takes the steps planned before the start (`layout::plan`, a pure
//!    function) that put each handed fd at `3, 4, ...`: `dup2` (which
//!    clears `FD_CLOEXEC` on the target), `FD_CLOEXEC` cleared on an fd
//!    already at its target, one copy above the layout to break a cycle of
//!    fds sitting on each other's targets, and each old copy above the
//!    layout closed after its last use — never more than one fd more than
//!    the layout open at once, for a process at its fd limit;
//! 3. marks every fd above the layout close-on-exec (`close_range` with
//!    `CLOSE_RANGE_CLOEXEC`; on older kernels it closes them, but the error
//!    pipe);
//! 4. discards the signals that reached it before it had its own group,
//!    resets every disposition to the default except SIGHUP, which starts
//!    ignored (see the crate docs, "Signals and process groups"), and
//!    unblocks all signals;
//! 5. writes its own pid into the pre-allocated `LISTEN_PID=` entry;
//! 6. `execve`s. If anything fails, it reports `(step, errno)` (into the
//!    shared memory, or to the intermediate's pipe; the step is an
//!    `exec::Step`) and `_exit(127)`s.
//!
//! # Where what is
//!
//! - `start`: [`prepare`] and [`Prepared::start`], directly or through
//!   the intermediate, and [`SpawnError`];
//! - `exec`: everything that runs in a new process before its exec, the
//!   only async-signal-safe code, and the records it reports;
//! - `layout`: the plan of the fd moves, pure and tested on a model;
//! - `child`: the started successor, [`Child`]: watched ([`Exit`]), killed,
//!   reaped, released; `pidfd` and `group` below it;
//! - `platform`: what the kernel and C library allow (checked once);
//! - `preflight`: the checks before a start; `sigmask`: the signal mask
//!   around it; `reserve`: the fds an upgrade opens in advance.
//!
//! [`RECORD_LEN`]: exec::RECORD_LEN
//! [`Prepared::start`]: start::Prepared::start

mod child;
mod exec;
mod group;
mod layout;
mod pidfd;
mod platform;
mod preflight;
mod reserve;
mod sigmask;
mod start;

pub(crate) use child::{Child, Exit};
pub(crate) use group::join_predecessor_group;
pub(crate) use preflight::{check_program, preflight};
pub(crate) use reserve::{ChannelFds, Reserve};
pub(crate) use start::{SpawnError, prepare};
