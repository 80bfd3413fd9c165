//! The pid file, written atomically, and the upgrade lock next to it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::sys::syscall;

/// Writes `pid` to `path` atomically: a temporary file in the same
/// directory, renamed over `path`. A reader sees the old content or the
/// new, never a partial one. It is not synced to disk: a pid file means
/// nothing after a crash of the machine (it lives on a tmpfs under /run as
/// a rule), and an `fdatasync` cost up to 1.4 ms between ready and commit.
pub(crate) fn write(path: &Path, pid: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "pid file path has no file name",
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        // std opens files with O_CLOEXEC.
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(format!("{pid}\n").as_bytes())?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a pid file written by [`write`].
pub fn read(path: &Path) -> io::Result<u32> {
    let s = std::fs::read_to_string(path)?;
    s.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} does not hold a pid: {s:?}", path.display()),
        )
    })
}

/// The lock file for `pid_file`: `<pid_file>.lock`.
pub(crate) fn lock_path(pid_file: &Path) -> PathBuf {
    let mut p = pid_file.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// An exclusive `flock` on the lock file, released on drop. The fd is
/// close-on-exec, so a successor never holds it.
#[derive(Debug)]
pub(crate) struct UpgradeLock {
    _file: File,
}

/// Takes the upgrade lock without waiting. `Ok(None)`: another process holds it.
pub(crate) fn try_lock(path: &Path) -> io::Result<Option<UpgradeLock>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)?;
    // flock on an fd we own.
    match syscall!(flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)) {
        Ok(_) => Ok(Some(UpgradeLock { _file: file })),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}
