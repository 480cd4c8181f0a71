//! Listening UNIX sockets, bound one way for every socket sluice serves (the
//! control socket, vhost-user exports), and socket paths compared by what
//! they name rather than how they are spelled.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// Why a socket could not be bound. The caller names the socket and adds
/// what the user should pass instead.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Something that is not a socket is at the path; it is left alone.
    #[error("exists and is {what}, not a socket; nothing was removed")]
    NotASocket {
        /// "a directory", "a regular file", "a symbolic link", ...
        what: &'static str,
    },
    /// A live process accepts connections on the path.
    #[error("busy: another process is serving it")]
    Busy,
    /// The directory the socket goes in is missing.
    #[error("directory {0} does not exist; create it first")]
    NoDirectory(PathBuf),
    /// Looking at what is at the path failed.
    #[error("cannot look at the path: {0}")]
    Inspect(#[source] io::Error),
    /// A stale socket could not be removed.
    #[error("cannot remove the stale socket: {0}")]
    RemoveStale(#[source] io::Error),
    /// `bind(2)` failed.
    #[error("cannot bind: {0}")]
    Bind(#[source] io::Error),
    /// The socket was bound but its mode could not be set (it is removed
    /// again).
    #[error("cannot set mode {mode:o}: {source}")]
    SetMode {
        /// The mode asked for.
        mode: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Serializes umask swaps. The mask is process-wide: two binds at once (two
/// monitor clients adding exports) would otherwise restore each other's
/// 0o177 and leave it in place for good.
static UMASK_LOCK: Mutex<()> = Mutex::new(());

/// Binds a listening socket at `path` with file mode `mode`.
///
/// Only a socket is ever replaced: a stale one (nobody accepts on it) is
/// removed, a live one is [`BindError::Busy`], anything else is
/// [`BindError::NotASocket`] and stays as it is. The socket is created under
/// umask 0o177, so it never exists with a wider mode than 0600, and then
/// gets exactly `mode`.
pub(crate) fn bind(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            let ft = meta.file_type();
            if !ft.is_socket() {
                let what = if ft.is_dir() {
                    "a directory"
                } else if ft.is_file() {
                    "a regular file"
                } else if ft.is_symlink() {
                    "a symbolic link"
                } else {
                    "a device or FIFO"
                };
                return Err(BindError::NotASocket { what });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(BindError::Busy);
            }
            tracing::info!("removing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(BindError::RemoveStale)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(BindError::Inspect(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(BindError::NoDirectory(dir.to_owned()));
        }
    }
    let bound = {
        let _serial = UMASK_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: umask only swaps the process file-mode mask; it touches no
        // memory.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        bound
    };
    let listener = bound.map_err(BindError::Bind)?;
    if let Err(source) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(path);
        return Err(BindError::SetMode { mode, source });
    }
    Ok(listener)
}

/// The path `path` names, for comparing socket paths: absolute (from the
/// current directory), with the parent directory canonicalized when it
/// exists (so `a/../s.sock`, `./s.sock` and a path through a symlinked
/// directory all compare equal), else with `.` and `..` resolved lexically.
pub(crate) fn path_key(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        match std::env::current_dir() {
            Ok(cwd) => cwd.join(path),
            Err(_) => path.to_owned(),
        }
    };
    if let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) {
        if let Ok(dir) = parent.canonicalize() {
            return dir.join(name);
        }
    }
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_key_names_the_same_socket_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let want = path_key(&real.join("s.sock"));
        for p in [
            real.join("./s.sock"),
            real.join("../real/s.sock"),
            dir.path().join("link/s.sock"),
        ] {
            assert_eq!(path_key(&p), want, "{}", p.display());
        }
        assert_ne!(path_key(&real.join("t.sock")), want);
        // A missing directory is resolved lexically.
        let base = dir.path().canonicalize().unwrap();
        assert_eq!(
            path_key(&base.join("gone/x/../s.sock")),
            base.join("gone/s.sock")
        );
    }

    fn current_umask() -> libc::mode_t {
        let _serial = UMASK_LOCK.lock().unwrap();
        // SAFETY: umask only swaps the process file-mode mask.
        let mask = unsafe { libc::umask(0o022) };
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(mask) };
        mask
    }

    #[test]
    fn concurrent_binds_leave_the_umask_as_it_was() {
        let before = current_umask();
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            for t in 0..8 {
                let dir = dir.path();
                s.spawn(move || {
                    for i in 0..50 {
                        let path = dir.join(format!("{t}-{i}.sock"));
                        drop(bind(&path, 0o600).unwrap());
                    }
                });
            }
        });
        assert_eq!(current_umask(), before);
    }

    #[test]
    fn bind_leaves_what_is_not_a_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"keep").unwrap();
        let err = bind(&file, 0o600).unwrap_err();
        assert!(
            matches!(
                err,
                BindError::NotASocket {
                    what: "a regular file"
                }
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        let err = bind(dir.path(), 0o600).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");

        let sock = dir.path().join("s.sock");
        let listener = bind(&sock, 0o640).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert!(matches!(bind(&sock, 0o600), Err(BindError::Busy)));
        drop(listener);
        // Stale now: replaced.
        bind(&sock, 0o600).unwrap();
    }
}
