//! The start itself: [`prepare`] allocates what the new process needs,
//! [`Prepared::start`] starts it, directly or through the intermediate
//! process, and says why it failed ([`SpawnError`]).

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgrp};

use super::child::{Child, Heard, Intermediate, Via};
use super::exec::{
    ACK, PID_DIGITS, Plan, REC_EXECD, REC_FAILED, REC_STARTED, Stack, Step, clone_vfork,
    intermediate,
};
use super::layout;
use super::pidfd::{ANSWER, pidfd_open};
use super::platform::{can_start_directly, pidfds};
use super::reserve::{Reserve, SpawnFds};
use super::sigmask::SigmaskGuard;
use crate::{env, sys};

/// Spare fds of the [`Reserve`] freed for what a start opens, taken again
/// when dropped (best effort: an accept loop at the limit may take a slot
/// first).
struct SparesFreed<'a>(&'a Mutex<Reserve>);

impl<'a> SparesFreed<'a> {
    fn new(reserve: &'a Mutex<Reserve>, n: usize) -> SparesFreed<'a> {
        crate::lifecycle::lock(reserve).free_spare_fds(n);
        SparesFreed(reserve)
    }
}

impl Drop for SparesFreed<'_> {
    fn drop(&mut self) {
        let _ = crate::lifecycle::lock(self.0).refill_spares();
    }
}

/// Why a spawn failed.
#[derive(Debug)]
pub(crate) enum SpawnError {
    /// Failed in this process, before or at fork.
    Parent(&'static str, io::Error),
    /// The child reported a failure in `step` and exited; it was reaped.
    Child { step: Step, err: io::Error },
    /// The child had not exec'd by the deadline; it was killed and reaped.
    ExecTimeout { pid: libc::pid_t },
}

impl SpawnError {
    /// The failure a new process reported: `code` is a [`Step`]'s.
    fn child(code: u32, errno: i32) -> SpawnError {
        let err = io::Error::from_raw_os_error(errno);
        match Step::from_code(code) {
            Some(step) => SpawnError::Child { step, err },
            None => SpawnError::Parent(
                "exec",
                io::Error::other(format!(
                    "a new process reported an unknown step {code} ({err})"
                )),
            ),
        }
    }
}

fn cstring(bytes: &[u8], what: &'static str) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| {
        SpawnError::Parent(
            what,
            io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"),
        )
    })
}

/// A successor ready to start: everything its start needs, allocated.
pub(crate) struct Prepared {
    plan: Plan,
    /// The successor's end of the channel (the last source of `plan`).
    _channel: OwnedFd,
}

/// Prepares the start of `program` with `args`, the environment `vars` (the
/// caller has removed what must not be inherited) plus the successor
/// variables, and the fds `fds` at `3, 4, ...`, followed by `channel`.
///
/// Only the numbers of `fds` are kept: see [`Prepared::start`].
pub(crate) fn prepare(
    program: &Path,
    args: &[OsString],
    vars: impl Iterator<Item = (OsString, OsString)>,
    successor_vars: &[(&'static str, String)],
    fds: &[BorrowedFd<'_>],
    channel: OwnedFd,
) -> Result<Prepared, SpawnError> {
    let program_c = cstring(program.as_os_str().as_bytes(), "program path")?;
    let mut argv = Vec::with_capacity(args.len() + 1);
    argv.push(cstring(program.as_os_str().as_bytes(), "program path")?);
    for a in args {
        argv.push(cstring(a.as_bytes(), "argument")?);
    }
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let mut envp: Vec<Vec<u8>> = Vec::new();
    for (k, v) in vars {
        let mut e = k.into_vec();
        if e.is_empty() || e.contains(&b'=') || e.contains(&0) || v.as_bytes().contains(&0) {
            continue;
        }
        e.push(b'=');
        e.extend_from_slice(v.as_bytes());
        e.push(0);
        envp.push(e);
    }
    for (k, v) in successor_vars {
        let mut e = format!("{k}={v}").into_bytes();
        e.push(0);
        envp.push(e);
    }
    // The process group the successor joins when it reports ready (see
    // `join_predecessor_group`).
    let pgrp = getpgrp();
    envp.push(format!("{}={pgrp}\0", env::PGID).into_bytes());
    let mut pid_entry = format!("{}=", env::LISTEN_PID).into_bytes();
    let prefix = pid_entry.len();
    pid_entry.resize(prefix + PID_DIGITS + 1, 0);
    envp.push(pid_entry);
    let last = envp.len() - 1;
    // SAFETY: `prefix` is within the entry, whose heap buffer never moves:
    // `envp` is not resized after this point.
    let pid_slot = unsafe { envp[last].as_mut_ptr().add(prefix) };
    let envp_ptrs: Vec<*const libc::c_char> = envp
        .iter()
        .map(|e| e.as_ptr().cast())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let max_fd = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != libc::RLIM_INFINITY => soft.min(i32::MAX as u64) as RawFd,
        _ => 65536,
    };
    let sources: Vec<RawFd> = fds
        .iter()
        .map(|f| f.as_raw_fd())
        .chain(std::iter::once(channel.as_raw_fd()))
        .collect();
    let layout = layout::plan(&sources, env::FDS_START);
    // The fds the first new process keeps: 0-2, the sources, and (room
    // made here) the intermediate's two.
    let mut keep: Vec<RawFd> = Vec::with_capacity(sources.len() + 5);
    keep.extend_from_slice(&[0, 1, 2]);
    keep.extend_from_slice(&sources);
    Ok(Prepared {
        plan: Plan {
            program: program_c,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            pid_slot,
            sources,
            layout,
            err_fd: -1,
            report: AtomicU64::new(0),
            keep,
            max_fd,
            max_signal: libc::SIGRTMAX(),
            close_first: false,
        },
        _channel: channel,
    })
}

impl Prepared {
    /// Starts the successor: directly if `direct_allowed` (no service
    /// manager must adopt it) and this process can (see the module docs),
    /// else through an intermediate process. The spare fds of `reserve` are
    /// freed for what the start opens. A successor that has not exec'd by
    /// `deadline` is killed (through an intermediate; started directly, the
    /// calling thread waits for the exec).
    ///
    /// # Safety
    /// Every fd given to [`prepare`] must still be open, under the same
    /// number, until this returns: the new process takes them by number.
    pub(crate) unsafe fn start(
        self,
        reserve: &Mutex<Reserve>,
        deadline: Instant,
        direct_allowed: bool,
    ) -> Result<Child, SpawnError> {
        let Prepared { mut plan, _channel } = self;
        if direct_allowed && can_start_directly() && !sys::children_reaped_by_kernel() {
            plan.keep.sort_unstable();
            plan.keep.dedup();
            plan.close_first = true;
            start_direct(plan, reserve)
        } else {
            start_intermediate(plan, reserve, deadline)
        }
    }
}

/// The direct start: the successor is this process's child.
fn start_direct(mut plan: Plan, reserve: &Mutex<Reserve>) -> Result<Child, SpawnError> {
    let mut stack = Stack::new().map_err(|e| SpawnError::Parent("mmap", e))?;
    // One slot, for the pidfd.
    let spares = SparesFreed::new(reserve, 1);
    let mask = SigmaskGuard::block_all();
    // SAFETY: every signal is blocked in this thread with the system call;
    // `plan` was built by `prepare`, its fds are open (`start`'s contract);
    // `can_start_directly` said the kernel knows CLONE_PIDFD. The call
    // returns once the child has exec'd or exited.
    let (pid, pidfd) = unsafe { clone_vfork(&mut plan, &mut stack) };
    // (The child shares this thread's errno: this is clone's only if it failed.)
    let clone_err = io::Error::last_os_error();
    drop(mask);
    drop(spares);
    if pid < 0 {
        return Err(SpawnError::Parent("clone", clone_err));
    }
    if pidfd < 0 {
        // The kernel ignored CLONE_PIDFD after all. Our unreaped child: its
        // pid is its own.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let mut status = 0;
        // SAFETY: waitpid writes an int through a valid pointer to a local.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(SpawnError::Parent(
            "clone",
            io::Error::other("the kernel made no pidfd (CLONE_PIDFD)"),
        ));
    }
    // SAFETY: the kernel made this pidfd for us in the clone (close-on-exec);
    // nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut child = Child {
        pid,
        via: Via::Direct { pidfd, done: false },
    };
    // Written by the child before its `_exit`, if it failed; CLONE_VFORK
    // resumed this thread only after that.
    let report = plan.report.load(Ordering::SeqCst);
    if report == 0 {
        return Ok(child);
    }
    child.kill_and_reap();
    Err(SpawnError::child(
        (report >> 32) as u32,
        report as u32 as i32,
    ))
}

/// The start through an intermediate process.
fn start_intermediate(
    mut plan: Plan,
    reserve: &Mutex<Reserve>,
    deadline: Instant,
) -> Result<Child, SpawnError> {
    // Its pipes (4), a pidfd for it, one for the successor later (its own
    // two pipe ends are closed by then).
    let spares = SparesFreed::new(reserve, 5);
    let SpawnFds {
        status: (status_r, status_w),
        release: (release_ours, release_theirs),
    } = SpawnFds::open().map_err(|e| SpawnError::Parent("pipe2", e))?;
    let (status_fd, release_fd) = (status_w.as_raw_fd(), release_theirs.as_raw_fd());
    plan.keep.extend_from_slice(&[status_fd, release_fd]);
    plan.keep.sort_unstable();
    plan.keep.dedup();
    // Every signal blocked around fork (but glibc's internal two, which
    // glibc sends only to threads of this process), so that no handler of
    // this process runs in the intermediate or the child before its
    // dispositions are reset; the guard restores the mask on every path.
    let mask = SigmaskGuard::block_all_but_libc();
    // SAFETY: the child branch only runs `intermediate`, which makes
    // async-signal-safe calls on memory allocated before fork and never
    // returns; the parent branch continues normally. The fds of `plan` are
    // open (`start`'s contract).
    let ipid = unsafe { libc::fork() };
    if ipid == 0 {
        // SAFETY: we are the child of fork; see `intermediate`.
        unsafe { intermediate(&mut plan, status_fd, release_fd) }
    }
    let fork_err = io::Error::last_os_error();
    drop(mask);
    if ipid < 0 {
        return Err(SpawnError::Parent("fork", fork_err));
    }
    // It never exits before it is released (see `exec::linger`): its pid is
    // still its own.
    let ipidfd = if pidfds() {
        pidfd_open(ipid).ok()
    } else {
        None
    };
    drop((status_w, release_theirs));
    let mut it = Intermediate {
        proc: Some((ipid, ipidfd)),
        successor: None,
        status: status_r,
        release: Some(release_ours),
        done: false,
    };
    let pid = match it.next(deadline) {
        Heard::Record(REC_STARTED, pid, _) if pid > 0 => pid,
        Heard::Record(REC_FAILED, step, errno) => {
            it.let_go();
            return Err(SpawnError::child(step as u32, errno));
        }
        _ => {
            // Silent past the deadline (stopped?), or dead.
            it.kill_proc();
            it.let_go();
            return Err(SpawnError::Parent(
                "fork",
                io::Error::other("the intermediate process failed"),
            ));
        }
    };
    // It does not reap the successor before the ACK: the pid is the
    // successor's.
    it.successor = if pidfds() { pidfd_open(pid).ok() } else { None };
    it.send(ACK);
    drop(spares);
    let mut child = Child {
        pid,
        via: Via::Intermediate(it),
    };
    let Via::Intermediate(it) = &child.via else {
        unreachable!("made just above")
    };
    match it.next(deadline) {
        Heard::Record(REC_EXECD, ..) => Ok(child),
        Heard::Record(REC_FAILED, step, errno) => {
            // The successor reported and _exit()ed: collect its status.
            child.wait_exit(Instant::now() + ANSWER);
            child.kill_and_reap();
            Err(SpawnError::child(step as u32, errno))
        }
        Heard::Nothing => {
            // The deadline passed while the child was still before exec
            // (e.g. a hung filesystem). Kill it; the caller reports a
            // timeout.
            child.kill_and_reap();
            Err(SpawnError::ExecTimeout { pid })
        }
        Heard::Record(..) | Heard::Gone => {
            child.kill_and_reap();
            Err(SpawnError::Parent(
                "exec",
                io::Error::other("the intermediate process died before the successor's exec"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
    use std::process::{Command, Stdio};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::{Reserve, SpawnError, Step, prepare};
    use crate::spawn::child::Exit;
    use crate::sys;

    #[test]
    fn a_reported_step_decodes_to_its_step_and_an_unknown_one_to_an_error() {
        let steps = [Step::Fds, Step::Exec, Step::Fork, Step::Pipe];
        for step in steps {
            assert_ne!(step.code(), 0, "0 is no failure");
            assert_eq!(Step::from_code(step.code()), Some(step));
            match SpawnError::child(step.code(), libc::EMFILE) {
                SpawnError::Child { step: got, err } => {
                    assert_eq!(got, step);
                    assert_eq!(err.raw_os_error(), Some(libc::EMFILE));
                }
                other => panic!("{other:?}"),
            }
        }
        let names: Vec<String> = steps.iter().map(Step::to_string).collect();
        assert_eq!(
            names,
            [
                "arranging the handed fds",
                "execve",
                "fork",
                "pipe2 in the intermediate process"
            ]
        );
        assert_eq!(Step::from_code(0), None);
        match SpawnError::child(99, libc::ENOENT) {
            SpawnError::Parent("exec", e) => assert!(e.to_string().contains("step 99"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    const ROLE: &str = "HANDOVER_TEST_LAYOUT_ROLE";
    const EXPECT: &str = "HANDOVER_TEST_LAYOUT_EXPECT";
    const NAME: &str = "spawn::start::tests::handed_fds_on_each_others_targets_land_in_place";

    /// Where the test's old generation puts its fds, and the order it hands
    /// them in: a cycle (3 wants the file at 5, 4 the one at 3, 5 the one
    /// at 4), one above the layout (9), fd 3 handed twice, then the channel
    /// at 6 — itself a target.
    const HANDED: [RawFd; 5] = [5, 3, 4, 9, 3];
    const CHANNEL: RawFd = 6;

    fn inode(fd: BorrowedFd<'_>) -> u64 {
        nix::sys::stat::fstat(fd).expect("fstat").st_ino
    }

    /// Whether `fd` is open in this process.
    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only reads the flags of an fd number.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    /// A socket pair, both ends out of the way of `HANDED` (from fd 100 on).
    fn pair() -> (OwnedFd, OwnedFd) {
        let high = |fd: OwnedFd| {
            // SAFETY: F_DUPFD_CLOEXEC makes a new fd, owned by no one else.
            let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
            assert!(
                r >= 100,
                "F_DUPFD_CLOEXEC: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: made just above for us.
            unsafe { OwnedFd::from_raw_fd(r) }
        };
        let (a, b) = sys::socketpair_cloexec().expect("socketpair");
        (high(a), high(b))
    }

    /// Puts `fd` at exactly `at` (close-on-exec), which must be free.
    fn place(fd: OwnedFd, at: RawFd) -> OwnedFd {
        if fd.as_raw_fd() == at {
            return fd;
        }
        assert!(
            !is_open(at),
            "fd {at} is taken in the test's old generation"
        );
        // SAFETY: dup3 onto a number checked free above, in a process whose
        // only thread is this one (the role runs alone, see below).
        let r = unsafe { libc::dup3(fd.as_raw_fd(), at, libc::O_CLOEXEC) };
        assert_eq!(r, at, "dup3: {}", std::io::Error::last_os_error());
        // SAFETY: dup3 made `at` for us; nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(at) }
    }

    /// The new process: fd `3 + i` is the socket expected `i`-th, and
    /// nothing else above 2 is open.
    fn successor(expected: &str) {
        let inodes: Vec<u64> = expected.split(',').map(|i| i.parse().unwrap()).collect();
        for (i, want) in inodes.iter().enumerate() {
            let fd = 3 + i as RawFd;
            assert!(is_open(fd), "fd {fd} not open");
            // SAFETY: open, checked above; only borrowed for the fstat.
            let got = inode(unsafe { BorrowedFd::borrow_raw(fd) });
            assert_eq!(got, *want, "fd {fd}");
        }
        let leaked: Vec<RawFd> = (3 + inodes.len() as RawFd..256)
            .filter(|&fd| is_open(fd))
            .collect();
        assert!(leaked.is_empty(), "open above the layout: {leaked:?}");
    }

    /// The old generation: hands its fds, arranged as `HANDED`, to a copy of
    /// this test binary in the successor role, started directly and through
    /// the intermediate, and waits for each to exit 0.
    fn old_generation() {
        let mut kept = Vec::new();
        let mut expected = Vec::new();
        let mut handed: Vec<OwnedFd> = Vec::new();
        for &at in &HANDED {
            if let Some(fd) = handed.iter().find(|f| f.as_raw_fd() == at) {
                expected.push(inode(fd.as_fd()));
                continue;
            }
            let (a, b) = pair();
            let a = place(a, at);
            expected.push(inode(a.as_fd()));
            handed.push(a);
            kept.push(b);
        }
        let fds: Vec<BorrowedFd<'_>> = HANDED
            .iter()
            .map(|&at| handed.iter().find(|f| f.as_raw_fd() == at).unwrap().as_fd())
            .collect();
        let program = std::env::current_exe().expect("current_exe");
        let args: Vec<OsString> = [NAME, "--exact", "--test-threads=1"]
            .into_iter()
            .map(OsString::from)
            .collect();
        for direct in [true, false] {
            let (ours, theirs) = pair();
            let theirs = place(theirs, CHANNEL);
            let mut want = expected.clone();
            want.push(inode(theirs.as_fd()));
            let want: Vec<String> = want.iter().map(u64::to_string).collect();
            let vars = [
                (OsString::from(ROLE), OsString::from("successor")),
                (OsString::from(EXPECT), OsString::from(want.join(","))),
            ];
            let prepared = prepare(&program, &args, vars.into_iter(), &[], &fds, theirs)
                .unwrap_or_else(|e| panic!("prepare: {e:?}"));
            let reserve = Mutex::new(Reserve::default());
            let deadline = Instant::now() + Duration::from_secs(20);
            // SAFETY: every fd in `fds` stays open, under its number, until
            // the start returns (they live to the end of this function).
            let mut child = unsafe { prepared.start(&reserve, deadline, direct) }
                .unwrap_or_else(|e| panic!("start (direct: {direct}): {e:?}"));
            match child.wait_exit(deadline) {
                Exit::Exited(status) => assert!(status.success(), "direct: {direct}: {status}"),
                other => panic!("direct: {direct}: {other:?}"),
            }
            drop((child, reserve, ours));
        }
    }

    /// The fd layout of `layout`, taken for real by both ways of starting:
    /// a cycle, an fd above the layout, one handed twice and the channel on
    /// a target land at `3, 4, ...`, and nothing else stays open. Runs in a
    /// copy of this test binary (a process with nothing else at fds 3 to
    /// 9, and one thread), which starts another as its successor.
    #[test]
    fn handed_fds_on_each_others_targets_land_in_place() {
        match std::env::var(ROLE).as_deref() {
            Ok("old") => return old_generation(),
            Ok("successor") => return successor(&std::env::var(EXPECT).expect(EXPECT)),
            _ => {}
        }
        let mut run = Command::new(std::env::current_exe().expect("current_exe"))
            .args([NAME, "--exact", "--test-threads=1", "--nocapture"])
            .env(ROLE, "old")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the old generation");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = run.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = run.kill();
                let _ = run.wait();
                panic!("the old generation did not finish in 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = run.wait_with_output().expect("output");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(status.success(), "{text}");
        assert!(text.contains("1 passed"), "{text}");
    }
}
