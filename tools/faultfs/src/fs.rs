//! The FUSE side of faultfs: answers the kernel's requests from the shared
//! [`Model`].
//!
//! Three choices keep the kernel from hiding what the model must see:
//! every open is `FOPEN_DIRECT_IO` (reads and writes bypass the page cache,
//! so after a power loss a program reads what the model holds, and
//! `sync_file_range` has no cached pages to write: it reaches nothing, as it
//! reaches no device cache on a real disk); entries and attributes are never
//! cached (TTL 0); and `fsync`/`fsyncdir` are implemented (answering ENOSYS
//! once would make the kernel turn every later sync into a silent success).
//! The writeback cache is not requested.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::model::{Attr, Model, NodeType};

/// Nothing is cached by the kernel: each lookup and stat asks the model.
const TTL: Duration = Duration::ZERO;

/// The file system handed to fuser; shares the model with [`crate::Mounted`].
pub struct FaultFs {
    pub model: Arc<Mutex<Model>>,
    /// Called before each sync (see `Mounted::before_sync`).
    pub hook: Arc<Mutex<Option<crate::SyncHook>>>,
}

impl FaultFs {
    fn model(&self) -> MutexGuard<'_, Model> {
        // A panic while holding the lock leaves a model a test cannot trust,
        // but reporting that is the test's job: keep serving.
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Syncs `ino` unless the hook says the power fails first.
    fn sync(&self, ino: u64, reply: ReplyEmpty) {
        let mut hook = self.hook.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hook) = hook.as_mut() {
            // The model's lock is not held while the hook runs.
            let path = self.model().path(ino).unwrap_or_default();
            if hook(&path) {
                reply.error(Errno::EIO);
                return;
            }
        }
        drop(hook);
        reply_empty(self.model().sync(ino), reply);
    }

    fn entry(&self, result: Result<u64, i32>, reply: ReplyEntry) {
        match result.and_then(|ino| self.model().attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    let (kind, nlink) = match attr.kind {
        NodeType::File => (FileType::RegularFile, 1),
        NodeType::Dir => (FileType::Directory, 2),
    };
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: UNIX_EPOCH,
        kind,
        perm: attr.perm,
        nlink,
        // The mounting user (root in the tests) owns everything.
        uid: owner_id("Uid:"),
        gid: owner_id("Gid:"),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// This process's effective user or group id (`field` is `Uid:` or `Gid:`),
/// read from procfs since the crate forbids `unsafe` (and so `geteuid`).
fn owner_id(field: &str) -> u32 {
    use std::sync::OnceLock;
    static STATUS: OnceLock<String> = OnceLock::new();
    let status =
        STATUS.get_or_init(|| std::fs::read_to_string("/proc/self/status").unwrap_or_default());
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .unwrap_or(0)
}

fn reply_empty(result: Result<(), i32>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.model().lookup(parent.0, name);
        self.entry(result, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.model().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut model = self.model();
        let result = (|| {
            if let Some(size) = size {
                model.set_len(ino.0, size)?;
            }
            if let Some(mode) = mode {
                model.set_perm(ino.0, mode as u16)?;
            }
            if let Some(mtime) = mtime {
                let mtime = match mtime {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                model.set_mtime(ino.0, mtime)?;
            }
            model.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        let result = self.model().create(parent.0, name, (mode & !umask) as u16);
        self.entry(result, reply);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.model().mkdir(parent.0, name, (mode & !umask) as u16);
        self.entry(result, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.model().unlink(parent.0, name), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.model().rmdir(parent.0, name), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            // RENAME_EXCHANGE and RENAME_WHITEOUT: nothing here uses them.
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        reply_empty(
            self.model()
                .rename(parent.0, name, newparent.0, newname, no_replace),
            reply,
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.model().attr(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.model().read(ino.0, offset, size as usize) {
            Ok(data) => reply.data(data),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.model().write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino.0, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.model().readdir(ino.0) {
            Ok(entries) => entries,
            Err(e) => {
                reply.error(Errno::from_i32(e));
                return;
            }
        };
        let dots = [
            (".".into(), ino.0, NodeType::Dir),
            ("..".into(), ino.0, NodeType::Dir),
        ];
        for (i, (name, child, kind)) in dots
            .into_iter()
            .chain(entries)
            .enumerate()
            .skip(offset as usize)
        {
            let kind = match kind {
                NodeType::File => FileType::RegularFile,
                NodeType::Dir => FileType::Directory,
            };
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino.0, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A roomy 64 GiB disk, so nobody refuses to write for lack of space.
        reply.statfs(
            16 << 20,
            16 << 20,
            16 << 20,
            1 << 20,
            1 << 20,
            4096,
            255,
            4096,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut model = self.model();
        match model
            .create(parent.0, name, (mode & !umask) as u16)
            .and_then(|ino| model.attr(ino))
        {
            Ok(attr) => reply.created(
                &TTL,
                &file_attr(&attr),
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let mut model = self.model();
        let result = model.attr(ino.0).and_then(|attr| {
            let end = offset.saturating_add(length);
            if end > attr.size {
                model.set_len(ino.0, end)
            } else {
                Ok(())
            }
        });
        reply_empty(result, reply);
    }
}
