//! The pid file, written atomically, and the upgrade lock next to it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Writes `pid` to `path` atomically: a temporary file in the same
/// directory, renamed over `path`. A reader sees the old content or the
/// new, never a partial one. It is not synced to disk: a pid file means
/// nothing after a crash of the machine (it lives on a tmpfs under /run as
/// a rule), and an `fdatasync` cost up to 1.4 ms between ready and commit.
pub(crate) fn write(path: &Path, pid: u32) -> io::Result<()> {
    stage(path, pid, None)?.publish()
}

/// A pid file written under a temporary name beside its path (a dot file
/// named after it and this process), waiting to be renamed into place by
/// [`publish`](Staged::publish); removed if dropped unpublished. An upgrade
/// stages its successor's pid while the successor starts, so that a pid file
/// that cannot be written fails the upgrade before the commit, and only the
/// rename is left for after it.
#[derive(Debug)]
pub(crate) struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    published: bool,
}

impl Staged {
    /// The pid file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the staged file over the pid file.
    pub(crate) fn publish(mut self) -> io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.published = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `pid` under the temporary name of the pid file at `path`: through
/// `reserved`, a [`TempFile`] opened in advance, when there is one (written,
/// then named with `linkat` through `/proc/self/fd`, which needs no new fd),
/// else — or if that fails — in a file created under that name.
pub(crate) fn stage(path: &Path, pid: u32, reserved: Option<TempFile>) -> io::Result<Staged> {
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
    let staged = Staged {
        tmp: dir.join(tmp_name),
        path: path.to_owned(),
        published: false,
    };
    let content = format!("{pid}\n");
    if let Some(TempFile(mut file)) = reserved {
        let linked = (|| {
            use nix::fcntl::{AT_FDCWD, AtFlags};
            file.write_all(content.as_bytes())?;
            let from = format!("/proc/self/fd/{}", file.as_raw_fd());
            let link = || {
                // AT_SYMLINK_FOLLOW resolves the /proc link to the open,
                // unnamed file.
                nix::unistd::linkat(
                    AT_FDCWD,
                    from.as_str(),
                    AT_FDCWD,
                    &staged.tmp,
                    AtFlags::AT_SYMLINK_FOLLOW,
                )
            };
            match link() {
                Err(Errno::EEXIST) => {
                    // Left by an earlier process with this pid.
                    std::fs::remove_file(&staged.tmp)?;
                    link()?;
                }
                other => other?,
            }
            Ok::<(), io::Error>(())
        })();
        match linked {
            Ok(()) => return Ok(staged),
            Err(e) => {
                tracing::debug!(error = %e, "reserved pid file write failed; writing it anew");
            }
        }
    }
    // std opens files with O_CLOEXEC.
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&staged.tmp)?;
    f.write_all(content.as_bytes())?;
    Ok(staged)
}

/// Checks, before an upgrade starts anything, that the pid file can be
/// replaced: its directory is writable (`access(W_OK)`, which also sees a
/// read-only mount) and nothing but a file stands at the path. Two cheap
/// calls; the commit writes the file for real, and a failure there still
/// fails the upgrade.
pub(crate) fn check_replaceable(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("{} is not writable: {e}", dir.display()),
        )
    })?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            format!("{} is a directory", path.display()),
        )),
        _ => Ok(()),
    }
}

/// Reads a pid file written by [`write`].
pub(crate) fn read(path: &Path) -> io::Result<u32> {
    let s = std::fs::read_to_string(path)?;
    s.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} does not hold a pid: {s:?}", path.display()),
        )
    })
}

/// Removes the pid file at `path` if it names `pid` (a stopping generation
/// removes its own, never another process's). `Ok(true)` if it did.
pub(crate) fn remove_if_names(path: &Path, pid: u32) -> io::Result<bool> {
    if read(path).ok() != Some(pid) {
        return Ok(false);
    }
    remove_if(path, |p| Ok(read(p).ok() == Some(pid)))
}

/// Removes the file at `path` if `ours` says, of the file itself, that it is
/// ours; `Ok(true)` if it did. A check of the path followed by an unlink
/// could remove a file another process put there in between; so the file is
/// first moved aside (one atomic rename: exactly one version of it is
/// taken), checked there, and removed — or, not ours after all, put back
/// unless a newer one took the path meanwhile (then it is dropped: it was
/// replaced anyway).
pub(crate) fn remove_if(path: &Path, ours: impl Fn(&Path) -> io::Result<bool>) -> io::Result<bool> {
    let mut aside = std::ffi::OsString::from(".");
    aside.push(
        path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name")
        })?,
    );
    aside.push(format!(".{}.removing", std::process::id()));
    let aside = path.with_file_name(aside);
    match std::fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    if ours(&aside).unwrap_or(false) {
        std::fs::remove_file(&aside)?;
        return Ok(true);
    }
    // link(2) fails rather than replace a file that took the path meanwhile.
    let back = std::fs::hard_link(&aside, path);
    std::fs::remove_file(&aside)?;
    match back {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the upgrade lock file at `path` unless an upgrade holds it: the
/// lock is taken (without waiting) first, and the file removed while it is
/// held. A process that has the file open already and locks it later sees
/// that it was removed, and locks the file at the path instead (see
/// [`LockFile::try_lock`]). `Ok(true)` if it was removed.
pub(crate) fn remove_lock(path: &Path) -> io::Result<bool> {
    // std opens files with O_CLOEXEC; no O_CREAT: a missing file stays so.
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        Err((_, Errno::EWOULDBLOCK)) => return Ok(false), // an upgrade runs
        Err((_, e)) => return Err(e.into()),
    };
    if !is_at(&held, path)? {
        return Ok(false);
    }
    std::fs::remove_file(path)?;
    drop(held);
    Ok(true)
}

/// Whether `file` is still the file at `path` (not removed or replaced).
fn is_at(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(at) => Ok(open.nlink() > 0 && open.dev() == at.dev() && open.ino() == at.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The lock file for `pid_file`: `<pid_file>.lock`.
pub(crate) fn lock_path(pid_file: &Path) -> PathBuf {
    let mut p = pid_file.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// The lock file, opened once (at build, while fds are plentiful) and kept
/// open, so that an upgrade can lock it even when every other fd slot is
/// taken. Close-on-exec: no successor or other child holds it.
#[derive(Debug)]
pub(crate) struct LockFile {
    path: PathBuf,
    /// The open file while no upgrade holds the lock (a held lock owns it).
    file: Arc<Mutex<Option<File>>>,
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    // std opens files with O_CLOEXEC.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
}

impl LockFile {
    /// Opens (creating it if need be) the lock file at `path`.
    pub(crate) fn open(path: &Path) -> io::Result<LockFile> {
        Ok(LockFile {
            path: path.to_owned(),
            file: Arc::new(Mutex::new(Some(open_lock_file(path)?))),
        })
    }

    /// The path it was opened at.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the upgrade lock without waiting. `Ok(None)`: another process
    /// holds it.
    ///
    /// `flock` locks belong to the open file description: another process
    /// (another generation) opened its own and conflicts. While this process
    /// holds the lock the file is lent to it, and a second attempt opens a
    /// description of its own, which conflicts too.
    ///
    /// A lock taken on a file that is no longer at the path (a stopped
    /// generation removed it, see [`remove_lock`]) excludes nobody: it is
    /// let go, and the file at the path (created if need be) is locked
    /// instead.
    pub(crate) fn try_lock(&self) -> io::Result<Option<UpgradeLock>> {
        for _ in 0..3 {
            let lent = self.file.lock().unwrap_or_else(|p| p.into_inner()).take();
            let file = match lent {
                Some(f) => f,
                None => open_lock_file(&self.path)?,
            };
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => {
                    if !is_at(&held, &self.path)? {
                        // Dropping it unlocks and closes it; the next round
                        // opens the file now at the path.
                        continue;
                    }
                    return Ok(Some(UpgradeLock {
                        held: Some(held),
                        home: self.file.clone(),
                    }));
                }
                Err((file, errno)) => {
                    give_back(&self.file, file);
                    return if errno == Errno::EWOULDBLOCK {
                        Ok(None)
                    } else {
                        Err(errno.into())
                    };
                }
            }
        }
        Err(io::Error::other(format!(
            "{} keeps being removed while it is locked",
            self.path.display()
        )))
    }
}

/// Puts the lock file back for the next upgrade, unless one is there.
fn give_back(home: &Mutex<Option<File>>, file: File) {
    let mut slot = home.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        *slot = Some(file);
    }
}

/// An exclusive `flock` on the lock file, released on drop (the file stays
/// open for the next upgrade).
#[derive(Debug)]
pub(crate) struct UpgradeLock {
    held: Option<Flock<File>>,
    home: Arc<Mutex<Option<File>>>,
}

impl Drop for UpgradeLock {
    fn drop(&mut self) {
        // A failed unlock drops the file: closing it releases the lock.
        if let Some(Ok(file)) = self.held.take().map(Flock::unlock) {
            give_back(&self.home, file);
        }
    }
}

/// An unnamed file in the pid file's directory (`O_TMPFILE`), opened in
/// advance so that writing the pid file in an upgrade needs no new fd; see
/// [`stage`].
#[derive(Debug)]
pub(crate) struct TempFile(File);

impl TempFile {
    /// Opens an unnamed temporary file beside `pid_file`. Fails where the
    /// file system has no `O_TMPFILE` (then [`stage`] creates a file).
    pub(crate) fn reserve(pid_file: &Path) -> io::Result<TempFile> {
        let dir = match pid_file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o644)
            .open(dir)?;
        Ok(TempFile(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("handover-pidfile-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_lock_excludes_another_open_file_and_is_released_on_drop() {
        let dir = temp_dir("lock");
        let path = dir.join("x.pid.lock");
        let a = LockFile::open(&path).unwrap();
        let b = LockFile::open(&path).unwrap();
        let held = a.try_lock().unwrap().expect("free at first");
        assert!(b.try_lock().unwrap().is_none(), "held by the other file");
        drop(held);
        let again = b.try_lock().unwrap().expect("released on drop");
        assert!(a.try_lock().unwrap().is_none());
        drop(again);
        assert!(a.try_lock().unwrap().is_some(), "the file stays usable");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_our_own_pid_file_is_removed() {
        let dir = temp_dir("remove");
        let path = dir.join("x.pid");
        assert!(!remove_if_names(&path, 7).unwrap(), "nothing there");
        write(&path, 8).unwrap();
        assert!(!remove_if_names(&path, 7).unwrap());
        assert_eq!(read(&path).unwrap(), 8, "another process's pid file stays");
        write(&path, 7).unwrap();
        assert!(remove_if_names(&path, 7).unwrap());
        assert!(!path.exists());
        // Replaced between the check and the removal: the newer file stays.
        write(&path, 9).unwrap();
        let removed = remove_if(&path, |_| {
            write(&path, 10)?; // another process writes meanwhile
            Ok(false)
        })
        .unwrap();
        assert!(!removed);
        assert_eq!(read(&path).unwrap(), 10);
        // Not ours, nobody wrote: put back as it was.
        assert!(!remove_if(&path, |_| Ok(false)).unwrap());
        assert_eq!(read(&path).unwrap(), 10);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.pid")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_held_lock_file_stays_and_a_removed_one_is_not_locked() {
        let dir = temp_dir("remove-lock");
        let path = dir.join("x.pid.lock");
        let a = LockFile::open(&path).unwrap();
        let b = LockFile::open(&path).unwrap();
        let held = a.try_lock().unwrap().expect("free");
        assert!(!remove_lock(&path).unwrap(), "held by an upgrade");
        assert!(path.exists());
        drop(held);
        assert!(remove_lock(&path).unwrap());
        assert!(!path.exists());
        // Both had the removed file open: each locks the file at the path
        // now, so they still exclude each other.
        let held = a.try_lock().unwrap().expect("free");
        assert!(path.exists(), "created again");
        assert!(b.try_lock().unwrap().is_none());
        drop(held);
        assert!(b.try_lock().unwrap().is_some());
        assert!(!remove_lock(&dir.join("missing")).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reserved_temp_file_becomes_the_pid_file() {
        let dir = temp_dir("tmp");
        let path = dir.join("x.pid");
        write(&path, 1).unwrap();
        let tmp = TempFile::reserve(&path).ok();
        let staged = stage(&path, 4242, tmp).unwrap();
        assert_eq!(read(&path).unwrap(), 1, "unchanged until published");
        staged.publish().unwrap();
        assert_eq!(read(&path).unwrap(), 4242);
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.pid")]);
        // Staged and dropped: nothing left, the pid file unchanged.
        drop(stage(&path, 7, TempFile::reserve(&path).ok()).unwrap());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.pid")]);
        assert_eq!(read(&path).unwrap(), 4242);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
