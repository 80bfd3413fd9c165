//! Which binary a plain upgrade runs.
//!
//! Operators deploy to a path: they rename a new build over it, or switch a
//! symlink on the way to it (`current -> releases/v2`). So the program of a
//! service is the path it was started with — not what that path resolved to
//! at start — and it is resolved again at every upgrade. A successor gets
//! the same path (`HANDOVER_PROGRAM`), even when it was started from another
//! binary (a rollback), so a rollback is a one-off.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The path this process was started with, made absolute: `argv[0]` when it
/// names this very binary (directly or through symlinks), else the binary
/// itself as the kernel names it.
pub(crate) fn started_as() -> io::Result<PathBuf> {
    let exe = running_binary()?;
    let Some(argv0) = std::env::args_os().next() else {
        return Ok(exe);
    };
    let me = std::fs::metadata("/proc/self/exe").ok();
    let same = |p: &Path| match (&me, std::fs::metadata(p)) {
        (Some(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    let argv0 = Path::new(&argv0);
    if argv0.as_os_str().as_bytes().contains(&b'/') {
        let abs = match argv0.is_absolute() {
            true => argv0.to_owned(),
            false => std::env::current_dir()?.join(argv0),
        };
        if same(&abs) {
            return Ok(normalize(&abs));
        }
    } else if let Some(path) = std::env::var_os("PATH") {
        // Started through a PATH search: the first match that is this binary.
        for dir in std::env::split_paths(&path).filter(|d| d.is_absolute()) {
            let candidate = dir.join(argv0);
            if same(&candidate) {
                return Ok(normalize(&candidate));
            }
        }
    }
    Ok(exe)
}

/// The binary this process runs, as the kernel names it. A binary replaced
/// while running reads as `"/path (deleted)"`; the suffix is removed, so that
/// the path names what is there now.
pub(crate) fn running_binary() -> io::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe").or_else(|_| std::env::current_exe())?;
    let bytes = exe.as_os_str().as_bytes();
    Ok(match bytes.strip_suffix(b" (deleted)") {
        Some(stripped) => PathBuf::from(OsStr::from_bytes(stripped)),
        None => exe,
    })
}

/// Removes `.` components and redundant separators without touching the
/// file system (`..` is kept: behind a symlink it is not the lexical parent).
fn normalize(p: &Path) -> PathBuf {
    p.components().collect()
}

/// What `path` names now, symlinks followed: the binary an upgrade execs and
/// reports, so that a symlink switched during the upgrade cannot change it
/// half way.
pub(crate) fn resolve(path: &Path) -> io::Result<PathBuf> {
    std::fs::canonicalize(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_binary_is_found_as_started() {
        let p = started_as().unwrap();
        assert!(p.is_absolute(), "{}", p.display());
        let a = std::fs::metadata(&p).unwrap();
        let b = std::fs::metadata("/proc/self/exe").unwrap();
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    }

    #[test]
    fn resolve_follows_symlinks() {
        let dir = std::env::temp_dir().join(format!("handover-program-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("v1")).unwrap();
        std::fs::write(dir.join("v1/svc"), b"").unwrap();
        std::os::unix::fs::symlink("v1", dir.join("current")).unwrap();
        let got = resolve(&dir.join("current/svc")).unwrap();
        assert_eq!(got, std::fs::canonicalize(dir.join("v1/svc")).unwrap());
        assert_eq!(normalize(Path::new("/a/./b//c")), PathBuf::from("/a/b/c"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
