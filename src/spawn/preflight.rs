//! The checks before a start: that the program is an executable file (a
//! clear error before any fork), and the application's preflight command,
//! run with its output captured and a deadline.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::reserve::Reserve;
use crate::sys;

/// Checks that `path` is an executable regular file, for a clear error
/// before fork.
pub(crate) fn check_program(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path",
        ));
    }
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not executable",
        ));
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)?;
    Ok(())
}

/// Runs `program args` as a check, with its output captured (64 KiB at
/// most), killed at `deadline`. `Err((status, output))` unless it exits 0.
///
/// The spare fds of `reserve` are freed for it, and taken again after.
pub(crate) fn preflight(
    program: &Path,
    args: &[OsString],
    deadline: Instant,
    reserve: &Mutex<Reserve>,
) -> Result<(), (Option<ExitStatus>, String)> {
    let spares = |f: fn(&mut Reserve)| f(&mut reserve.lock().unwrap_or_else(|p| p.into_inner()));
    spares(Reserve::free_spares);
    let result = run_check(program, args, deadline);
    spares(|r| {
        let _ = r.refill_spares();
    });
    result
}

fn run_check(
    program: &Path,
    args: &[OsString],
    deadline: Instant,
) -> Result<(), (Option<ExitStatus>, String)> {
    use std::process::{Command, Stdio};
    const LIMIT: usize = 64 * 1024;
    let fail = |e: io::Error| (None, format!("cannot run the check: {e}"));
    let (r, w) = sys::pipe_cloexec().map_err(fail)?;
    let w2 = w.try_clone().map_err(fail)?;
    // Every fd of this process is close-on-exec: the check inherits only
    // 0, 1 and 2.
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::from(w2))
        .spawn()
        .map_err(fail)?;
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    let mut timed_out = false;
    loop {
        match sys::poll_until(&[(r.as_fd(), libc::POLLIN)], deadline) {
            Ok(rev) if rev[0] == 0 => {
                timed_out = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
        match sys::read(r.as_fd(), &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = LIMIT.saturating_sub(output.len());
                output.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    // A check that closed its output may still run: wait for it, bounded.
    while !timed_out && matches!(child.try_wait(), Ok(None)) {
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait().ok();
    let text = String::from_utf8_lossy(&output).into_owned();
    match status {
        Some(s) if s.success() && !timed_out => Ok(()),
        _ if timed_out => Err((None, text)),
        s => Err((s, text)),
    }
}
