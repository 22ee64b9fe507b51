//! faultfs: a FUSE file system, held in memory, that models a disk with a
//! volatile cache, so tests can pull the plug on a program and see what an
//! honest disk would have kept.
//!
//! What survives a power loss is exactly what the program made durable: a
//! file's content as of its last `fsync`/`fdatasync`, a directory's entries
//! as of its last `fsync` of that directory (see [`model`]).
//!
//! # Layout
//! - [`model`]: the disk model, pure and unit-tested, no FUSE.
//! - `fs`: the fuser `Filesystem` answering the kernel from the model.
//! - [`Mounted`]: mounts it (as root, straight on `/dev/fuse`, or through
//!   `fusermount3` otherwise) and offers [`Mounted::power_loss`].
//! - `src/main.rs`: the same as a command, driven from standard input.
#![forbid(unsafe_code)]

mod fs;
pub mod model;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use model::{Loss, Model, Stats};

/// See [`Mounted::before_sync`].
pub type SyncHook = Box<dyn FnMut(&str) -> bool + Send>;

/// Set to `1` to let the tests that need FUSE (root and `/dev/fuse`) skip,
/// saying so, on a machine without it. Unset, they fail there: a durability
/// test must never pass by not running.
pub const SKIP_ENV: &str = "FLAGSTREAM_SKIP_FUSE_TESTS";

/// Mounts a faultfs for a test on `mountpoint`, or, when that fails and
/// [`SKIP_ENV`] is `1`, prints why and returns `None`. Panics with the reason
/// and the way out otherwise.
pub fn mount_for_test(mountpoint: &Path) -> Option<Mounted> {
    match Mounted::mount(mountpoint) {
        Ok(mounted) => Some(mounted),
        Err(e) if std::env::var(SKIP_ENV).as_deref() == Ok("1") => {
            eprintln!(
                "SKIPPED: cannot mount faultfs on {} ({e}); {SKIP_ENV}=1 allows skipping",
                mountpoint.display()
            );
            None
        }
        Err(e) => panic!(
            "cannot mount faultfs on {}: {e}. This test needs FUSE: run as root with /dev/fuse \
             present (the CI machine has both). Set {SKIP_ENV}=1 to skip it knowingly.",
            mountpoint.display()
        ),
    }
}

/// A mounted faultfs; unmounted when dropped.
pub struct Mounted {
    /// Shared with the FUSE thread, which answers every request under its lock.
    model: Arc<Mutex<Model>>,
    /// Shared with the FUSE thread, which calls it before each sync.
    hook: Arc<Mutex<Option<SyncHook>>>,
    /// The FUSE thread; `None` once unmounted.
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl Mounted {
    /// Mounts an empty faultfs on `mountpoint` (an existing directory).
    pub fn mount(mountpoint: &Path) -> io::Result<Mounted> {
        let model = Arc::new(Mutex::new(Model::new()));
        let hook: Arc<Mutex<Option<SyncHook>>> = Arc::default();
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("faultfs".into()),
            fuser::MountOption::Subtype("faultfs".into()),
            fuser::MountOption::NoAtime,
        ];
        let session = fuser::spawn_mount(
            fs::FaultFs {
                model: model.clone(),
                hook: hook.clone(),
            },
            mountpoint,
            &config,
        )?;
        Ok(Mounted {
            model,
            hook,
            session: Some(session),
            mountpoint: mountpoint.to_owned(),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Drops everything not durable. Call it only once the program writing
    /// here is dead (as power loss would find it): a live program's open
    /// files would see their content change under them.
    pub fn power_loss(&self) -> Loss {
        self.model().power_loss()
    }

    /// Drops what is not durable, after `persist()` chose which unsynced
    /// changes the disk's cache wrote anyway (see [`Model::power_loss_with`]).
    pub fn power_loss_with(&self, persist: &mut dyn FnMut(&str) -> bool) -> Loss {
        self.model().power_loss_with(persist)
    }

    /// Calls `hook` with the path of each file or directory about to be
    /// synced, before syncing it; when it returns `true` the sync is not
    /// made and fails with EIO. A test kills the program from the hook to
    /// crash it at an exact point (send the signal only: the program is
    /// blocked in this very sync until the hook returns). `None` removes it.
    pub fn before_sync(&self, hook: Option<SyncHook>) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    /// Counters of syncs and power losses so far.
    pub fn stats(&self) -> Stats {
        self.model().stats.clone()
    }

    /// Whether everything written so far is durable.
    pub fn is_clean(&self) -> bool {
        self.model().is_clean()
    }

    /// Unmounts and waits for the FUSE thread to end.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(session) => session.umount_and_join(),
            None => Ok(()),
        }
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}
